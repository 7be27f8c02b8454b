"""MiniCloud settings: one module, driven by environment variables (README, docs/deploy.md). Importing it has no
side effects: no app imported, no device probed, no file written (minicloud/apps.py makes the folders and the key)."""
import os
import socket
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def envbool(name, default="False"):
    return os.environ.get(name, default).lower() in ("1", "true", "yes", "on")


def envint(name, default):
    return int(os.environ.get(name, default))


HOME = Path(os.environ.get("MINICLOUD_HOME", BASE_DIR / "var")).resolve()
NODE_NAME = os.environ.get("MINICLOUD_NODE") or socket.gethostname()
DEVICES_SPEC = os.environ.get("MINICLOUD_DEVICES", "")
PORT = envint("PORT", 8000)
REDIS_URL = os.environ.get("REDIS_URL", "")
# Distinguishes several MiniCloud sites (or test runs) sharing one Redis: queue name and channel prefix.
INSTANCE = os.environ.get("MINICLOUD_INSTANCE", "minicloud")
# Each node's job runner listens on its own queue, so the scheduler can hand a job to the node it chose.
NODE_QUEUE = f"{INSTANCE}.{NODE_NAME}"
# A worker node writes a heartbeat every NODE_HEARTBEAT_S; the devices page shows one silent for NODE_TIMEOUT_S as
# down (a job that spans machines, or moves when one fails, is Slurm's: MINICLOUD_EXECUTOR=slurm).
NODE_HEARTBEAT_S = float(os.environ.get("MINICLOUD_HEARTBEAT_S", "10"))
# daphne processes of a web node (they share one listening socket; each renders pages on its own core). Each runs
# WEB_REQUESTS requests at a time (Python runs one thread at a time: more in flight only makes each slower and
# stretches SQLite's write lock; on PostgreSQL a request waits on the server for most of its time, which a second one
# uses); a request that has run WEB_LONG_REQUEST_MS gives its turn to the next (minicloud/handler.py). One process
# more than the cores, up to 4, so a core is not idle while a process waits on the database (docs/performance.md).
WEB_PROCESSES = envint("MINICLOUD_WEB_PROCESSES", min(4, (os.cpu_count() or 1) + 1))
WEB_REQUESTS = envint("MINICLOUD_WEB_REQUESTS", 2 if os.environ.get("DATABASE_URL") else 1)
WEB_LONG_REQUEST_MS = envint("MINICLOUD_WEB_LONG_REQUEST_MS", 100)
NODE_TIMEOUT_S = float(os.environ.get("MINICLOUD_NODE_TIMEOUT_S", "90"))
# Chats (the playground, /v1/chat/completions) one user may have at the node's generation worker at once, generating
# or waiting for their turn; one more is answered 429 (training/chat_worker.py, Turns).
CHAT_REQUESTS_PER_USER = envint("MINICLOUD_CHAT_REQUESTS_PER_USER", 4)
# Chats the node's worker generates at once, together (one forward pass per token for all of them: on the CPU eight
# chats get ~3.4x the tokens per second of one; a class of thirty at 32 got 2.2x the tokens per second of three
# per-process workers of 8, docs/performance.md); the others wait for their turn. The KV cache they hold is bounded
# apart (training/chat_batch.py KV_TOKENS).
CHAT_BATCH = max(1, envint("MINICLOUD_CHAT_BATCH", 32))
# The weights (GiB, fp32 on the CPU) the node's worker keeps loaded, the least recently used leaving first (a model a
# chat uses always stays): 0, a quarter of the machine's memory (training/chat_batch.py Models).
CHAT_MODELS_GB = float(os.environ.get("MINICLOUD_CHAT_MODELS_GB", "0"))
# The node's generation worker, which `serve` starts and names for its web processes (models_registry/inference.py
# node_socket); empty where a process runs alone (runserver, the tests): it starts a worker of its own.
CHAT_SOCKET = os.environ.get("MINICLOUD_CHAT_SOCKET", "")

# A per-install key kept under MINICLOUD_HOME (so sessions survive restarts without a committed secret), unless given.
# This module only reads it: the first start writes it (minicloud.apps.MinicloudConfig.ready, or `serve`).
SECRET_KEY = os.environ.get("SECRET_KEY", "") or (
    (HOME / "secret_key").read_text().strip() if (HOME / "secret_key").exists() else "")
DEBUG = envbool("DEBUG")
ALLOWED_HOSTS = os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]").split(",")
CSRF_TRUSTED_ORIGINS = [f"http://{h}:{PORT}" for h in ALLOWED_HOSTS if h and h != "*"]
# Behind a TLS-terminating proxy (nginx, docs/security.md): secure cookies, HTTPS redirects, HSTS.
BEHIND_TLS = envbool("MINICLOUD_TLS")
if BEHIND_TLS:
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = envbool("MINICLOUD_SSL_REDIRECT", "True")
    SECURE_HSTS_SECONDS = envint("MINICLOUD_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("MINICLOUD_HSTS_SUBDOMAINS", "True")
    CSRF_TRUSTED_ORIGINS += [f"https://{h}" for h in ALLOWED_HOSTS if h and h != "*"]
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_q",
    "accounts",
    "jobs",
    "models_registry",
    "minicloud",
]

MIDDLEWARE = [
    "minicloud.metrics.RecordLatency",  # outermost: each request's whole time (Prometheus, /metrics)
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "minicloud.middleware.RefuseNulCharacters",
    "minicloud.middleware.SyncMiddlewareChain",  # innermost: the chain above runs in one thread (see its docstring)
]

ROOT_URLCONF = "minicloud.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.template.context_processors.i18n",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "minicloud.navigation.navigation",
            ],
        },
    },
]
ASGI_APPLICATION = "minicloud.asgi.application"

# Set by `serve` for its web processes (minicloud/handler.py), not for the job workers, which django-q2 forks: how
# they keep database connections.
WEB_PROCESS = envbool("MINICLOUD_WEB_PROCESS")
if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=0)}
    if WEB_PROCESS:
        # serve's web processes: a pool of open connections (Django's psycopg pool) instead of a new connection per
        # request. Not in the job workers, which django-q2 forks (a forked pool would share sockets).
        DATABASES["default"]["OPTIONS"] = {**DATABASES["default"].get("OPTIONS", {}),
                                           "pool": {"min_size": 1, "max_size": 8, "timeout": 20}}
else:
    DATABASES = {
        "default": {
            "ENGINE": "minicloud.db",  # Django's SQLite backend, writers queued on a lock file (minicloud/db/base.py)
            "NAME": HOME / "minicloud.sqlite3",
            # WAL lets readers run beside the one writer; IMMEDIATE takes the write lock at BEGIN so a read-then-write
            # transaction never fails on upgrade; 20 s busy timeout (docs/architecture.md, "Databases").
            "OPTIONS": {
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
            },
            "TEST": {"NAME": HOME / "test.sqlite3"},
        }
    }
    if WEB_PROCESS:
        # serve's web processes keep their request threads (minicloud/handler.py), and each thread its connection,
        # checked before each request: no new SQLite connection per request. The job workers keep Django's default.
        DATABASES["default"].update(CONN_MAX_AGE=None, CONN_HEALTH_CHECKS=True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "/accounts/login/"
# Login rate limit: this many failures for one username or address within the window block further tries.
LOGIN_MAX_FAILURES = envint("MINICLOUD_LOGIN_MAX_FAILURES", 10)
LOGIN_FAILURE_WINDOW_S = envint("MINICLOUD_LOGIN_WINDOW_S", 900)
# The proxies (addresses or networks, comma-separated) whose X-Forwarded-For names the real client: behind nginx on the
# same box, 127.0.0.1. Without it the peer's address is the client's (a forged header is never believed).
TRUSTED_PROXIES = [p.strip() for p in os.environ.get("MINICLOUD_TRUSTED_PROXIES", "").split(",") if p.strip()]
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("zh-hans", "简体中文")]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = HOME / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATICFILES_FINDERS = [
    "django.contrib.staticfiles.finders.FileSystemFinder",
    "django.contrib.staticfiles.finders.AppDirectoriesFinder",
    "minicloud.staticfinders.PlotlyFinder",
]
# Hashed, compressed files once `collectstatic` has run (`serve` runs it before starting the web server); plain
# names before that, so a page never fails for want of a manifest.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
                    if (STATIC_ROOT / "staticfiles.json").exists()
                    else "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True
WHITENOISE_MANIFEST_STRICT = False

DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 2**20
# Dataset uploads stream to a temporary file (never into memory); larger requests are refused with 413.
UPLOAD_MAX_BYTES = envint("MINICLOUD_UPLOAD_MAX_BYTES", 50 * 10**9)
# A finished upload at least this large is checked on the background cluster (the request answers 202 at once and
# the upload reports its progress); a smaller one in its request (~60 MB/s: about half a second).
VALIDATE_INLINE_BYTES = envint("MINICLOUD_VALIDATE_INLINE_BYTES", 32 * 2**20)
# Any other request body (JSON, forms): refused with a 413 at the ASGI layer beyond this (minicloud/bodylimit.py).
MAX_BODY_BYTES = envint("MINICLOUD_MAX_BODY_BYTES", DATA_UPLOAD_MAX_MEMORY_SIZE)
# Prometheus scrapes /metrics with this bearer token; empty: /metrics is off (minicloud/metrics.py, docs/deploy.md).
METRICS_TOKEN = os.environ.get("MINICLOUD_METRICS_TOKEN", "")
# The key of the secrets kept encrypted at rest (minicloud/secrets.py); empty: derived from SECRET_KEY.
SECRETS_KEY = os.environ.get("MINICLOUD_SECRETS_KEY", "")
# Where notification links point (the portal's address as users reach it) and the mail they come from. Mail goes
# through Django's SMTP settings: EMAIL_HOST, EMAIL_PORT, EMAIL_HOST_USER, EMAIL_HOST_PASSWORD, EMAIL_USE_TLS.
PUBLIC_URL = os.environ.get("MINICLOUD_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")
DEFAULT_FROM_EMAIL = os.environ.get("MINICLOUD_EMAIL_FROM", "MiniCloud <minicloud@localhost>")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = envint("EMAIL_PORT", 25)
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = os.environ.get("EMAIL_USE_TLS", "") == "1"
EMAIL_TIMEOUT = 10
FILE_UPLOAD_PERMISSIONS = 0o600  # Django's default is 0644: a user's data is theirs (docs/security.md)
FILE_UPLOAD_DIRECTORY_PERMISSIONS = 0o700
FILE_UPLOAD_TEMP_DIR = str(HOME / "uploads")  # the same disk as the dataset store: storing is a rename (made at start)
FILE_UPLOAD_MAX_MEMORY_SIZE = 10 * 2**20

# django-q2 must never run a job twice (docs/architecture.md, "The processes"): one attempt, failures acked, and a retry window far
# above any job length. A task only "claims the next job"; job time limits and cancellation live in the supervisor.
# Jobs that may share one GPU while their memory estimates fit (CPU slots take one job each).
JOBS_PER_GPU = envint("MINICLOUD_JOBS_PER_GPU", 4)

# Work people start that runs for minutes (a tokenizer's training, a dataset's statistics) has a queue and a cluster of
# its own on each node (`serve` starts both; django-q2's ALT_CLUSTERS): it never takes a job runner, nor queues ahead
# of a job's start. MINICLOUD_BACKGROUND_WORKERS: how many such tasks a node runs at once.
BACKGROUND_QUEUE = f"{NODE_QUEUE}.background"
BACKGROUND_WORKERS = envint("MINICLOUD_BACKGROUND_WORKERS", 1)
# The checks that make a dataset usable (a large upload's check, a preview's index; minutes for a 9 GB file) have a
# cluster of their own beside it, so that they never wait behind a statistics build or a tokenizer's training (an
# hour for MiniMind's 9 GB SFT file on two cores). MINICLOUD_CHECK_WORKERS: how many a node runs at once.
CHECKS_QUEUE = f"{NODE_QUEUE}.checks"
CHECK_WORKERS = envint("MINICLOUD_CHECK_WORKERS", 1)
# The largest tokenizer.json / tokenizer_config.json an upload may hold (a 256k-token vocabulary's is ~35 MB): the
# upload is parsed in the web process to check it.
TOKENIZER_MAX_BYTES = envint("MINICLOUD_TOKENIZER_MAX_BYTES", 200 * 10**6)
# Tokenizer trainings one user may have in progress at once (queued or training); more are refused.
TOKENIZER_TRAININGS_PER_USER = envint("MINICLOUD_TOKENIZER_TRAININGS_PER_USER", 2)
# Uploads one user may have started and not finished at once (each a row and a file; a script that only ever
# starts them filled the database until the day-old ones were pruned): one more is answered 429.
UPLOADS_PER_USER = envint("MINICLOUD_UPLOADS_PER_USER", 10)

Q_CLUSTER = {
    "name": INSTANCE,
    "cluster_name": NODE_QUEUE,
    # One worker per job that can run at once (each supervises one job), plus one for the node's own short work (the
    # housekeeping, notifications, following a Slurm run again) so that it never waits behind training. `serve`
    # counts this node's devices and passes the number to its qcluster (no device probe here); a qcluster started by
    # hand gets one runner.
    "workers": envint("MINICLOUD_JOB_RUNNERS", 1) + 1,
    "ALT_CLUSTERS": {BACKGROUND_QUEUE: {"workers": BACKGROUND_WORKERS, "label": "Background work"},
                     CHECKS_QUEUE: {"workers": CHECK_WORKERS, "label": "Dataset checks"}},
    "recycle": 50,
    "timeout": 6 * 24 * 3600,
    "retry": 7 * 24 * 3600,
    "max_attempts": 1,
    "ack_failures": True,
    "queue_limit": 1,
    "bulk": 1,
    "catch_up": False,
    "label": "Jobs queue",
    "save_limit": 100,
    "poll": 0.5,
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py 8 times socket reads out after 5 s by default, exactly channels_redis's blocking-pop wait: a
            # consumer then dies with "Timeout reading". Reads may take longer than the pop they wait on.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 30}], "prefix": f"{INSTANCE}:asgi"},
        }
    }
else:
    Q_CLUSTER["orm"] = "default"
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# The job supervisor: seconds between SIGTERM and SIGKILL, and how often it flushes events and checks for cancel.
JOB_KILL_GRACE_S = envint("MINICLOUD_KILL_GRACE", 8)
JOB_POLL_S = 0.5
QUOTA_CHECK_S = 30.0  # how often a supervisor checks its owner's weekly device-hours while the job runs
# Single-process jobs on CPU slots fork from a warm engine that imported torch and transformers once (jobs/engine_process.py).
WARM_START = envbool("MINICLOUD_WARM_START", "1")
# The niceness of training processes on CPU slots (0 = the portal's own): they share the cores that answer requests,
# and the scheduler gives the CPU to the requests first (docs/decisions.md, "CPU jobs yield to the portal").
CPU_JOB_NICE = envint("MINICLOUD_CPU_JOB_NICE", 10)
# Threads of each training process on CPU slots: 0 = the node's cores shared among its CPU slots (jobs/devices.py).
CPU_JOB_THREADS = envint("MINICLOUD_CPU_JOB_THREADS", 0)
# Token caches of datasets (training/token_cache.py): shared by every job on the same data, counted against nobody's
# quota, least recently used ones removed beyond this many GB (`manage.py data_cache` lists and clears them).
DATA_CACHE_DIR = HOME / "cache" / "data"
DATA_CACHE_GB = float(os.environ.get("MINICLOUD_DATA_CACHE_GB", "100"))
# A dataset's statistics from a file of at least this many MB are computed by building the token cache that a job with
# the default options reads (exact lengths, and that job then tokenises nothing); a smaller file is counted in the
# background worker (the engine's start, ~5 s, would cost more than the tokenising it saves).
STATS_TOKEN_CACHE_MB = float(os.environ.get("MINICLOUD_STATS_TOKEN_CACHE_MB", "4"))
# Where a released job runs (jobs/executors.py): "local" (this node's GPUs or CPU slots) or "slurm" (a batch job of
# the Slurm cluster this node submits to: jobs/slurm.py, docs/deploy.md). MINICLOUD_HOME must then be the shared path
# that every Slurm node mounts at the same place, with this checkout and its .venv on it.
EXECUTOR = os.environ.get("MINICLOUD_EXECUTOR", "local").strip().lower() or "local"
if EXECUTOR not in ("local", "slurm"):
    raise ValueError(f"MINICLOUD_EXECUTOR={EXECUTOR!r}: use 'local' or 'slurm'")
SLURM_PARTITION = os.environ.get("MINICLOUD_SLURM_PARTITION", "")
SLURM_ACCOUNT = os.environ.get("MINICLOUD_SLURM_ACCOUNT", "")
SLURM_QOS = os.environ.get("MINICLOUD_SLURM_QOS", "")
# How many jobs the portal hands to Slurm at once (the portal keeps the fair order and the quotas, Slurm places them).
SLURM_MAX_JOBS = envint("MINICLOUD_SLURM_MAX_JOBS", 16)
# ... of which at most this many may wait in Slurm's queue (which orders by age): the fair order stays the portal's.
SLURM_MAX_PENDING = envint("MINICLOUD_SLURM_MAX_PENDING", 3)
# GPUs (or, with SLURM_GRES empty, CPU tasks) per node: a job asking for more spans ceil(devices / this) nodes.
SLURM_DEVICES_PER_NODE = envint("MINICLOUD_SLURM_DEVICES_PER_NODE", 8)
SLURM_GRES = os.environ.get("MINICLOUD_SLURM_GRES", "gpu")  # "" for a CPU-only partition
SLURM_CPUS_PER_DEVICE = envint("MINICLOUD_SLURM_CPUS_PER_DEVICE", 1)
# Slurm's GPU sharing (gres/shard, when the admin configured it): a one-GPU job whose memory estimate fits in K of a
# GPU's SHARDS_PER_GPU shares asks --gres=shard:K instead of a whole GPU (SLURM_GPU_MEMORY_GB: one GPU's memory).
SLURM_SHARDS_PER_GPU = envint("MINICLOUD_SLURM_SHARDS_PER_GPU", 0)
SLURM_GPU_MEMORY_GB = float(os.environ.get("MINICLOUD_SLURM_GPU_MEMORY_GB", "0"))
SLURM_EXTRA_ARGS = os.environ.get("MINICLOUD_SLURM_EXTRA_ARGS", "")  # more sbatch options, shell-quoted
SLURM_POLL_S = float(os.environ.get("MINICLOUD_SLURM_POLL_S", "2"))
# How many times a job whose process crashed (killed, node lost) is resumed automatically from its checkpoint.
AUTO_RESUME_LIMIT = envint("MINICLOUD_AUTO_RESUME", 1)
# Fair share: a user's past device use counts half as much after this many hours.
FAIR_SHARE_HALF_LIFE_H = float(os.environ.get("MINICLOUD_FAIR_SHARE_HALF_LIFE_H", "24"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "WARNING")},
    "loggers": {"minicloud": {"level": "INFO"}, "jobs": {"level": "INFO"}},
}
