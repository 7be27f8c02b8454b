"""The fair queue: planning which queued job runs where (jobs/scheduler.py decides), claiming it on a node, its engine
spec, the queue page's snapshot."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.db.models import Count, F, Sum, Window
from django.db.models.functions import RowNumber
from django.utils import timezone
from django.utils.translation import gettext_noop
from django_q.tasks import async_task

from minicloud.files import exclusive_lock

from .. import scheduler
from ..devices import inventory
from ..models import Job, Node
from .quota import _owner_quotas, _quota_gate, recent_usage
from .reasons import wait_reason_text


def node_queue(node_name: str) -> str:
    """The django-q2 queue a node's job runner listens on."""
    return f"{settings.INSTANCE}.{node_name}"


def live_nodes() -> list[str]:
    """Worker nodes that beat recently and are not stopping, most recent heartbeat first."""
    return list(Node.live().order_by("-heartbeat_at").values_list("name", flat=True))


def kick_queue(nodes: list[str] | None = None) -> None:
    """Ask every live node's runner to claim what the scheduler places on it (tokens, not jobs: duplicates or stale
    tokens do nothing). ``nodes``: the live nodes, when the caller has just read them (a submission has: one query
    fewer, one round trip fewer to PostgreSQL)."""
    _kick_nodes(nodes or live_nodes() or [settings.NODE_NAME])


def kick_waiting(nodes: list[str] | None = None) -> None:
    """``kick_queue(nodes)`` while jobs wait: the housekeeping's periodic kick (a lost token), and a runner's that has
    just claimed a job and is about to supervise it (``nodes``: its own), so that a free runner claims the next job
    now. One token starts one runner, which trains what it claimed before it claims again; the one token that a
    restart or a burst of submissions sent (the database broker keeps one waiting at a time) left every other slot
    idle until the next housekeeping minute. Bounded: a runner hands on only after a successful claim."""
    if Job.objects.filter(status=Job.Status.QUEUED).exists():
        kick_queue(nodes)


# Background work that makes a dataset usable, minutes at most: a lane (a cluster) of its own on each node
# (settings.CHECKS_QUEUE), so that it never waits behind an hour of statistics or a tokenizer's training.
CHECK_TASKS = frozenset({"jobs.tasks.check_upload", "jobs.tasks.index_dataset"})


def background_queue(node_name: str, func: str = "") -> str:
    """The django-q2 queue of the node's background cluster that runs ``func``: its checks' (settings.CHECKS_QUEUE on
    that node) for ``CHECK_TASKS``, else its background work's (settings.BACKGROUND_QUEUE)."""
    return f"{node_queue(node_name)}.{'checks' if func in CHECK_TASKS else 'background'}"


def _worker_node() -> str:
    """A live worker node to give work to: this one when it is one."""
    nodes = live_nodes()
    return settings.NODE_NAME if settings.NODE_NAME in nodes or not nodes else nodes[0]


def background_task(func: str, *args, task_name: str) -> None:
    """Queue work that people start and that runs for minutes (an upload's check, statistics, tokenizer training) on
    a live worker node's background clusters (``background_queue``): never on a job runner, never ahead of a job's
    start, and a check never behind the long work. The work names its worker (``this_worker``) on its record while
    it runs (``nodes.reconcile_background``)."""
    enqueue(func, *args, queue=background_queue(_worker_node(), func), task_name=task_name)


def node_task(func: str, *args, task_name: str) -> None:
    """Queue the portal's own short work (sending notifications) on a live worker node's job cluster, whose worker
    beyond the job runners takes it."""
    enqueue(func, *args, queue=node_queue(_worker_node()), task_name=task_name)


def this_worker() -> str:
    """This process as a record of background work names the worker doing it: ``<node>:<pid>``."""
    return f"{settings.NODE_NAME}:{os.getpid()}"


def enqueue(func: str, *args, queue: str, task_name: str, **q_options) -> None:
    """django-q2's ``async_task`` of ``func(*args)`` on ``queue``, failures acked, through this process's broker."""
    async_task(func, *args, task_name=task_name, cluster=queue,
               q_options={"ack_failure": True, **q_options, **_broker(queue)})


_brokers: dict[tuple[str, str], object] = {}


def _broker(queue: str) -> dict:
    """``async_task``'s broker option for ``queue``: with Redis, one broker per queue and process. django-q2 builds a
    broker for every task it is not given one, and a Redis broker is a client with a connection pool of its own: a
    new TCP connection to Redis for every submission's claim token (a quarter of a submission's time in a burst on
    PostgreSQL + Redis, docs/performance.md). redis-py's clients are thread-safe and reset their pool in a forked
    child. The database broker reads Django's connection of the calling thread at each use: nothing to keep."""
    if not settings.REDIS_URL:
        return {}
    key = (queue, settings.REDIS_URL)
    if key not in _brokers:
        from django_q.brokers import get_broker

        _brokers[key] = get_broker(queue)
    return {"broker": _brokers[key]}


def _local_devices():
    return inventory()


def _queued() -> list:
    """The queued jobs with only the fields planning reads (a 500-job queue spent most of its time building full jobs
    and their owners)."""
    return list(Job.objects.filter(status=Job.Status.QUEUED).only(*Job.PLAN_FIELDS))


def queue_order(jobs: list, owners_quotas: tuple[dict, dict] | None = None) -> list:
    """scheduler.fair_order over the owners' priority bonus, running jobs and decayed recent device use.
    ``owners_quotas``: ``_owner_quotas(jobs)``, when already read."""
    owners, quotas = _owner_quotas(jobs) if owners_quotas is None else owners_quotas
    ids = set(owners)
    usage = recent_usage(ids)
    running = dict.fromkeys(ids, 0)
    for owner_id in Job.objects.filter(status__in=Job.LIVE, owner_id__in=ids).values_list("owner_id", flat=True):
        running[owner_id] += 1
    bonus = {**dict.fromkeys(ids, 0), **{pk: q["priority"] or 0 for pk, q in quotas.items()}}
    staff = {pk for pk, user in owners.items() if user.is_staff}
    return scheduler.fair_order(jobs, bonus, running, usage, staff)


def device_state(node_name: str | None = None, slots: int | None = None,
                 jobs: bool = True) -> dict[str, list[scheduler.Device]]:
    """Every live node's devices with the live jobs placed on them (``jobs=False``: the devices alone). ``node_name``
    is always included (its devices from its Node row, else this machine's inventory; ``slots`` CPU slots when
    given)."""
    nodes = {n.name: scheduler.devices_from_inventory(n.name, n.devices) for n in Node.live()}
    if node_name:
        if slots is not None:
            nodes[node_name] = [scheduler.Device(node_name, i) for i in range(slots)]
        elif node_name not in nodes:
            nodes[node_name] = node_devices(node_name)
    if not jobs:
        return nodes
    placed = live_jobs_by_device()
    for devs in nodes.values():
        for d in devs:
            d.jobs.extend(placed.get((d.node, d.index), []))
    return nodes


def node_devices(node_name: str) -> list[scheduler.Device]:
    """One node's devices from its Node row (live or not), else this machine's inventory."""
    row = Node.objects.filter(name=node_name).first()
    return scheduler.devices_from_inventory(node_name, row.devices if row else _local_devices())


def live_jobs_by_device() -> dict[tuple[str, int], list[int]]:
    """``{(node, device index): [memory estimate of each live job on it]}`` (0 for a job without an estimate)."""
    out: dict[tuple[str, int], list[int]] = {}
    for node, devices, memory in Job.objects.filter(status__in=Job.LIVE).values_list(
            "node", "devices", "memory_estimate"):
        for i in devices or []:
            out.setdefault((node, i), []).append(memory or 0)
    return out


def queue_plan(node_name: str | None = None, slots: int | None = None, nodes=None) -> list[scheduler.Decision]:
    """Every queued job in queue order, with where it would start now or why it waits (``nodes``: the
    ``device_state(node_name, slots)`` the caller already read)."""
    queued = _queued()
    owners, quotas = _owner_quotas(queued)
    queued = queue_order(queued, (owners, quotas))
    blocked, placed = _quota_gate(owners, quotas)
    needs = {}
    if settings.EXECUTOR == "slurm":  # one job slot per job released to Slurm, whatever it asks: Slurm places it
        blocked, placed = _slurm_gate(blocked, placed)
        needs = {"memory_of": lambda j: 0, "gpus_of": lambda j: 1}
    nodes = nodes if nodes is not None else device_state(node_name, slots)
    return scheduler.plan(queued, nodes, settings.JOBS_PER_GPU, blocked=blocked,
                          on_place=placed, **needs)


def _slurm_gate(blocked, placed):
    """Under Slurm the portal releases a job only while fewer than MINICLOUD_SLURM_MAX_PENDING of its released jobs
    wait in Slurm's own queue: Slurm orders what waits there by age, so a short queue there keeps the portal's fair
    order deciding who goes next (bench/cluster_sim.py --placement slurm, docs/performance.md)."""
    # every live job not run locally: one released a moment ago has no executor or Slurm state yet, and waits too
    released = Job.objects.filter(status__in=Job.LIVE).exclude(executor="local").values_list("slurm", flat=True)
    waiting = [sum(1 for s in released if (s or {}).get("state", "PENDING") == "PENDING")]  # this pass adds to it

    def slurm_blocked(job):
        if waiting[0] >= settings.SLURM_MAX_PENDING:
            return "slurm_pending", {"n": waiting[0]}
        return blocked(job)

    def slurm_placed(job):
        waiting[0] += 1
        placed(job)

    return slurm_blocked, slurm_placed


def _typical_durations() -> dict:
    """Median run seconds of each stage's last 20 succeeded jobs (one query: a row number per stage)."""
    runs = (Job.objects.filter(status=Job.Status.SUCCEEDED, started_at__isnull=False, finished_at__isnull=False)
            .annotate(n=Window(RowNumber(), partition_by=F("stage"), order_by=F("finished_at").desc()))
            .filter(n__lte=20).values_list("stage", "started_at", "finished_at"))
    lengths = {}
    for stage, started, finished in runs:
        lengths.setdefault(stage, []).append((finished - started).total_seconds())
    return {stage: sorted(v)[len(v) // 2] for stage, v in lengths.items()}


def queue_forecast(plan: list[scheduler.Decision]) -> dict:
    """Estimated seconds until each queued job starts (None: cannot be told yet), from the running jobs' ETAs and
    the typical length of each stage's recent jobs."""
    typical = _typical_durations()
    busy = {(d.node, d.index): 0.0 for devs in device_state(jobs=False).values() for d in devs}
    for node, devices, eta_s, stage in Job.objects.filter(status__in=Job.LIVE).values_list("node", "devices", "eta_s",
                                                                                           "stage"):
        left = eta_s if eta_s is not None else typical.get(stage)
        for i in devices or []:
            if (node, i) in busy:
                prev = busy[(node, i)]
                busy[(node, i)] = None if left is None or prev is None else max(prev, left)
    return scheduler.estimated_starts(plan, busy, lambda j: typical.get(j.stage))


def claim_next_job(node_name: str, slots: int | None = None) -> Job | None:
    """Take the first queued job that the plan places on this node (see ``queue_order`` and ``scheduler.plan``),
    one claim at a time per node. ``slots``: treat this node as that many CPU slots (tests).

    On PostgreSQL the claims of every node serialise on this node's row (SELECT ... FOR UPDATE) inside one
    transaction. SQLite has one writer for the whole database and one machine: there a file lock serialises this
    node's claims, the plan is read outside any write transaction and only the claim itself (a conditional update)
    writes. Planning inside SQLite's write lock held every submission for as long as planning a 200-job queue took
    (most of a burst's tail latency)."""
    from django.db import connection

    if connection.vendor == "sqlite":
        with exclusive_lock(settings.HOME / "run" / f"claim-{node_name}.lock"):
            return _claim(node_name, slots)
    with transaction.atomic():
        Node.objects.select_for_update().filter(name=node_name).exists()
        return _claim(node_name, slots)


def _claim(node_name: str, slots: int | None) -> Job | None:
    nodes = device_state(node_name, slots)
    devices = nodes.get(node_name, [])
    if devices and all(len(d.jobs) >= d.capacity(settings.JOBS_PER_GPU) for d in devices):
        return None  # every device here holds all the jobs it may: no plan places anything (and planning a long
        # queue after every submission while a node is busy kept a core busy during a burst)
    for decision in queue_plan(node_name, slots, nodes):
        if decision.node != node_name:
            continue
        job, devices = Job.objects.get(pk=decision.job.pk), decision.devices  # the plan read only what it needs
        if job.transition(Job.Status.RUNNING, node_name, gettext_noop("devices %(devices)s"),
                          {"devices": str(devices)}, node=node_name, devices=devices, started_at=timezone.now(),
                          error="", error_params=None, pid=None, worker_pid=os.getpid(),
                          generation=F("generation") + 1):
            return job
    return None


CLAIM_TASK = "jobs.tasks.run_next_job"


def _claim_token_waiting(queue: str) -> bool:
    """Whether the database broker's ``queue`` holds a claim token that no runner has taken yet (taken ones are
    locked). Such a token's claim runs later and sees what the caller writes now: another one would only repeat it."""
    from django_q.models import OrmQ

    pending = OrmQ.objects.filter(key=queue, lock__lte=timezone.now()).order_by("pk")[:50]
    return any(row.task.get("func") == CLAIM_TASK for row in pending)


def _kick_nodes(names) -> None:
    """A claim token to each node's runners; with the database as the broker (no Redis), not when one is already
    waiting there: a burst of 200 submissions sent 200 tokens, and each made a runner plan the whole queue and write
    its bookkeeping while the submitters waited for the one SQLite writer. Claims' results are not stored."""
    for name in names:
        queue = node_queue(name)
        if not settings.REDIS_URL and _claim_token_waiting(queue):
            continue
        enqueue(CLAIM_TASK, queue=queue, task_name="run_next_job", save=False)


def build_spec(job: Job) -> dict:
    spec = {
        "job_id": job.pk, "stage": job.stage, "run_dir": str(job.run_dir), "dataset": job.dataset.path,
        "tokenizer": job.tokenizer.path, "device": "auto", "resume": job.resume, "config": job.resolved_config,
        "data_cache": str(settings.DATA_CACHE_DIR), "data_cache_gb": settings.DATA_CACHE_GB,
        "compile_cache": str(settings.HOME / "cache" / "compile"),
        "checksums": {job.dataset.path: job.dataset.sha256} if job.dataset.sha256 else {},
    }
    if job.eval_dataset:
        spec["eval_dataset"] = job.eval_dataset.path
        if job.eval_dataset.sha256:
            spec["checksums"][job.eval_dataset.path] = job.eval_dataset.sha256
    if job.base_model:
        spec["base_model"] = {"path": job.base_model.path, "config": job.base_model.config}
    if job.teacher_model:
        spec["teacher_model"] = {"path": job.teacher_model.path, "config": job.teacher_model.config}
    return spec


def write_spec(job: Job) -> Path:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    path = job.run_dir / "spec.json"
    path.write_text(json.dumps(build_spec(job), indent=2))
    return path


QUEUE_SNAPSHOT_S = 2.0  # how long one planned queue serves every queue page


def queue_snapshot(fresh: bool = False) -> list[dict]:
    """Every queued job in queue order as {"id", "owner_id", "reason", "params", "starts_in"} (reason codes, not
    text: the caller renders them in its visitor's language).

    Planning a queue of 500 jobs takes tens of milliseconds and a lab's 200 people open the queue page, so one plan
    serves every visitor of this process for QUEUE_SNAPSHOT_S seconds, or until a job starts or ends; jobs submitted
    meanwhile join at the next plan (``fresh``: plan now, as a job's own page does when it is not in the plan yet).
    """
    signature = list(Job.objects.filter(status__in=Job.LIVE).values_list("status").annotate(n=Count("id"), s=Sum("id"))
                     .order_by("status"))
    key = "minicloud:queue:" + hashlib.sha1(repr(signature).encode()).hexdigest()
    snapshot = None if fresh else cache.get(key)
    if snapshot is None:
        plan = queue_plan()
        forecast = queue_forecast(plan)
        snapshot = [{"id": d.job.pk, "owner_id": d.job.owner_id, "reason": d.reason, "params": d.params,
                     "starts_in": forecast.get(d.job)} for d in plan]
        cache.set(key, snapshot, QUEUE_SNAPSHOT_S)
    return snapshot


def queue_info(job: Job) -> dict | None:
    """Where a queued job stands: its position, why it waits (code and text) and the estimated seconds until it
    starts (None: unknown). None when the job is not queued."""
    if job.status != Job.Status.QUEUED:
        return None
    for fresh in (False, True):  # a job submitted since the last plan: plan again
        for position, entry in enumerate(queue_snapshot(fresh), 1):
            if entry["id"] == job.pk:
                return {"position": position, "reason": entry["reason"] or "starting",
                        "reason_text": wait_reason_text(entry["reason"], entry["params"]),
                        "expected_start_s": entry["starts_in"]}
    return None


def queue_position(job: Job) -> int | None:
    """1 for the next job to start, or None when the job is not queued."""
    if job.status != Job.Status.QUEUED:
        return None
    ordered = queue_order(_queued())
    # None as well when the job was claimed between reading it and reading the queue.
    return next((i for i, j in enumerate(ordered, 1) if j.pk == job.pk), None)
