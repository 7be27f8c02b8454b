import time
import uuid
from collections import Counter
from datetime import datetime, timezone as dt_timezone
from pathlib import Path

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone
from django.utils.translation import gettext, gettext_lazy as _, gettext_noop

from accounts.models import Shareable, UsageRecord
from minicloud.files import disk_usage
from minicloud.errors import stored_text  # noqa: F401 -- read here by the job and its events
from training.spec import is_problem

STAGE_CHOICES = [("pretrain", _("Pretrain")), ("sft", _("Supervised fine-tuning")), ("lora", _("LoRA")),
                 ("dpo", _("DPO")), ("distill", _("Distillation")), ("ppo", _("PPO")), ("grpo", _("GRPO"))]
JOB_STAGE_CHOICES = STAGE_CHOICES + [("eval", _("Evaluation"))]  # evaluations start from a model's page
_STAGE_LABELS = dict(JOB_STAGE_CHOICES)


def stage_label(stage: str) -> str:
    """A stage's name in the active language (jobs and the models they make)."""
    return str(_STAGE_LABELS.get(stage, stage))
KIND_CHOICES = [("pretrain", _("Pretrain text")), ("sft", _("Conversations (SFT)")),
                ("dpo", _("Preference pairs (DPO)")), ("rlaif", _("RL prompts"))]


# Why statistics failed when the worker computing them was gone (Dataset.background_work).
STATS_LOST = gettext_noop("the worker computing them stopped (its node restarted, or the process was killed): "
                          "compute them again")


class Dataset(Shareable):
    name = models.CharField(_("name"), max_length=200)
    kind = models.CharField(_("kind"), max_length=20, choices=KIND_CHOICES)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE)
    path = models.CharField(max_length=500)
    records = models.PositiveIntegerField(_("records"), default=0)
    size_bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    version = models.PositiveIntegerField(_("version"), default=1)
    created_at = models.DateTimeField(default=timezone.now)
    validation = models.JSONField(default=dict, blank=True)  # jobs.validation.Report.to_dict(), warnings included
    stats = models.JSONField(default=dict, blank=True)  # token statistics (jobs.dataset_stats), when computed
    stats_status = models.CharField(max_length=20, blank=True)  # "", "queued", "running", "done", "failed"
    stats_progress = models.FloatField(default=0.0)
    stats_worker = models.CharField(max_length=200, blank=True)  # "<node>:<pid>" computing them, while it does
    stats_request = models.PositiveIntegerField(default=0)  # the latest request's number: older tasks stop
    stats_ask = models.JSONField(default=dict, blank=True)  # the latest request's settings and when it was sent

    class Meta:
        verbose_name = _("dataset")
        verbose_name_plural = _("datasets")
        ordering = ["name", "-version"]

    @classmethod
    def background_work(cls):
        """Statistics being computed, the field naming their worker, and what they become when it is gone
        (jobs.services.reconcile_background)."""
        return cls.objects.filter(stats_status="running"), "stats_worker", {"stats_status": "failed",
                                                                              "stats": {"error": STATS_LOST}}

    @classmethod
    def queued_work(cls):
        """Statistics asked for and not started, the field keeping the ask (``at``: when it was sent), and the task
        that computes them (jobs.services.resend_background)."""
        return cls.objects.filter(stats_status="queued"), "stats_ask", lambda ds: (
            "jobs.tasks.dataset_stats", ds.pk, ds.stats_ask.get("max_seq_len"), ds.stats_ask.get("tokenizer_id"),
            ds.stats_request)

    @classmethod
    def home_files(cls) -> tuple[str, set]:
        """The dataset store's files that versions name, and their record indexes (minicloud/orphans.py: the rest
        is what a kill left)."""
        paths = [Path(p) for p in cls.objects.values_list("path", flat=True)]
        return "datasets", {p.name for path in paths for p in (path, *cls.index_paths(path))}

    @staticmethod
    def index_paths(path) -> tuple[Path, Path]:
        """A stored file's record index and, for a gzip file, its seek points, beside it."""
        path = Path(path)
        return path.with_name(f"{path.name}.idx.npy"), path.with_name(f"{path.name}.gzidx")

    @property
    def index_path(self) -> Path:
        """The file's sparse record index (training.records.INDEX_STRIDE): written when the file is stored, or in the
        background at a preview's first deep page for a version stored before indexes were
        (jobs.services.datasets.dataset_records)."""
        return self.index_paths(self.path)[0]

    @property
    def gzip_index_path(self) -> Path:
        """A gzip file's seek points (training.records.save_gzip_index), built in the background."""
        return self.index_paths(self.path)[1]

    def __str__(self):
        return f"{self.name} v{self.version}" if self.version > 1 else self.name

    def to_dict(self):
        return {"id": self.pk, "name": self.name, "version": self.version, "kind": self.kind, "records": self.records,
                "size_bytes": self.size_bytes, "sha256": self.sha256, **self.sharing_dict(),
                "owner": self.owner.username if self.owner else None, "created_at": self.created_at.isoformat(),
                "warnings": self.validation.get("warning_count", 0), "stats_status": self.stats_status or None}

    @property
    def stats_error(self) -> str:
        """Why the statistics failed, in the active language where the portal wrote it (the reader's own errors as
        they are)."""
        error = self.stats.get("error") if self.stats_status == "failed" else None
        return gettext(error) if error else ""

    @property
    def warning_lines(self) -> list[list]:
        """The upload's warnings as [line, text], the text in the active language (older ones as written)."""
        return [[w[0], stored_text(w[1], w[2]) if len(w) > 2 else w[1]] for w in self.validation.get("warnings", [])]

    def validation_report(self) -> dict:
        """The stored validation report as the API shows it (warnings as [line, text])."""
        return {**self.validation, "warnings": self.warning_lines} if self.validation else {}


# Why an upload's check ended without a verdict when the worker checking it was gone (Upload.background_work).
CHECK_LOST = gettext_noop("the worker checking it stopped (its node restarted, or the process was killed): "
                          "finish the upload again")


class Upload(models.Model):
    """A file arriving in chunks (resumable): ``HOME/uploads/<id>.part`` until it becomes a dataset. Finished, it is
    checked (``status`` "checking", with ``progress``; in the background when large) and becomes a dataset version
    ("done", ``dataset``) or is refused ("refused", ``outcome``: the error and the validation's line errors), when it
    may be finished again (another kind). Done and refused uploads are forgotten after a day."""

    class Status(models.TextChoices):
        RECEIVING = "", "receiving"
        CHECKING = "checking", "checking"
        REFUSED = "refused", "refused"
        DONE = "done", "done"

    # a worker checks it (one only queued may be dropped: its task then finds nothing)
    BEING_CHECKED = models.Q(status="checking") & ~models.Q(worker="")

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    size = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    status = models.CharField(max_length=20, blank=True, choices=Status.choices, default=Status.RECEIVING)
    progress = models.FloatField(default=0.0)  # of the check, 0..1
    finish = models.JSONField(default=dict, blank=True)  # the dataset asked for: name, kind, the asker's language
    outcome = models.JSONField(default=dict, blank=True)  # a refusal: error, field, status, details
    worker = models.CharField(max_length=200, blank=True)  # "<node>:<pid>" checking it, while it does
    checked_at = models.DateTimeField(null=True, blank=True)  # when its last check began (next_to_check's turns)
    dataset = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    @property
    def path(self):
        return settings.HOME / "uploads" / f"{self.id}.part"

    @classmethod
    def stored_bytes(cls, user) -> int:
        """Unfinished uploads count against the storage quota like finished files (a done one is its dataset)."""
        return cls.objects.filter(owner=user).exclude(status="done").aggregate(n=models.Sum("size"))["n"] or 0

    @classmethod
    def home_files(cls) -> tuple[str, set]:
        """The parts of the uploads in progress (minicloud/orphans.py)."""
        return "uploads", {f"{pk}.part" for pk in cls.objects.values_list("pk", flat=True)}

    @classmethod
    def background_work(cls):
        """Uploads being checked, the field naming their worker, and what they become when it is gone
        (jobs.services.reconcile_background): refused, saying so; the part is kept and may be finished again."""
        return cls.objects.filter(status="checking"), "worker", {"status": "refused", "outcome": {"error": CHECK_LOST}}

    @classmethod
    def queued_work(cls):
        """Checks sent to a background cluster and not taken by a worker, the field keeping the ask (``at``: when it
        was sent), and the task that checks one (jobs.services.resend_background)."""
        return cls.objects.filter(status="checking", worker=""), "finish", lambda upload: (
            "jobs.tasks.check_upload", str(upload.pk))

    @classmethod
    def next_to_check(cls, hint=None):
        """The waiting upload whose background check comes next, in fair order: the owner with the fewest checks
        running, then the one whose last check began longest ago (never first), goes next, with their upload begun
        first; so one member's ten 9 GB uploads (an hour of checks) take turns with each classmate's instead of
        holding them all behind. Only uploads finished for a background check (``finish["background"]``; also
        ``hint``, the upload whose finish sent the task, were it finished before that mark): an inline check's
        request claims its own. Its id, or None when none waits."""
        waiting = list(cls.objects.filter(models.Q(finish__background=True) | models.Q(pk=hint), status="checking",
                                          worker="").order_by("created_at", "pk").values_list("pk", "owner_id"))
        if not waiting:
            return None
        owners = {owner for _pk, owner in waiting}
        running = Counter(cls.objects.filter(cls.BEING_CHECKED, owner__in=owners).values_list("owner_id", flat=True))
        last = dict(cls.objects.filter(owner__in=owners, checked_at__isnull=False).values("owner_id")
                    .annotate(at=models.Max("checked_at")).values_list("owner_id", "at"))
        never = datetime.min.replace(tzinfo=dt_timezone.utc)
        return min(waiting, key=lambda row: (running[row[1]], last.get(row[1], never)))[0]  # stable: begun first

    @property
    def waiting(self) -> bool:
        """Checking, but for its turn on the checks cluster (``next_to_check``): no worker has it yet."""
        return self.status == self.Status.CHECKING and not self.worker

    @property
    def silent_s(self) -> float:
        """Seconds since its file last grew (since it started, if its file is gone): an unfinished upload silent for
        long was given up on (a page closed during it)."""
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return (timezone.now() - self.created_at).total_seconds()

    @property
    def kind_label(self) -> str:
        """The kind of dataset asked for, in the active language."""
        kind = self.finish.get("kind", "")
        return str(dict(KIND_CHOICES).get(kind, kind))

    def to_dict(self) -> dict:
        out = {"id": str(self.id), "offset": self.size, "status": self.get_status_display(),
               "progress": round(self.progress, 4)}
        if self.status == self.Status.CHECKING:
            out["waiting"] = self.waiting
        if self.status == self.Status.DONE and self.dataset is not None:
            out["dataset"] = {**self.dataset.to_dict(), "validation": self.dataset.validation_report()}
        if self.status == self.Status.REFUSED:
            out.update(error=gettext(self.outcome.get("error", "")),
                       **{k: self.outcome[k] for k in ("field", "details") if self.outcome.get(k)})
        return out


class Node(models.Model):
    """A machine running `serve`: its devices (from NVML or MINICLOUD_DEVICES), refreshed while it runs."""

    name = models.CharField(max_length=200, unique=True)
    devices = models.JSONField(default=list)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    stopping = models.BooleanField(default=False)

    def __str__(self):
        return self.name

    @staticmethod
    def heartbeat_cutoff(now=None):
        """A node whose last heartbeat is older than this is down (MINICLOUD_NODE_TIMEOUT_S)."""
        from datetime import timedelta

        return (now or timezone.now()) - timedelta(seconds=settings.NODE_TIMEOUT_S)

    @classmethod
    def live(cls):
        """Nodes that beat recently and are not stopping: the ones that take jobs."""
        return cls.objects.filter(stopping=False, heartbeat_at__gte=cls.heartbeat_cutoff())

    @property
    def state(self) -> str:
        """"up", "stopping", or "down" (no heartbeat for MINICLOUD_NODE_TIMEOUT_S)."""
        if self.stopping:
            return "stopping"
        return "up" if self.heartbeat_at and self.heartbeat_at >= self.heartbeat_cutoff() else "down"


class Setting(models.Model):
    """Site-wide values the nodes share (e.g. the id in MINICLOUD_HOME's storage marker)."""

    key = models.CharField(max_length=100, unique=True)
    value = models.TextField()

    def __str__(self):
        return self.key


class DeviceSample(models.Model):
    """One reading of a node's devices (compact: one row per node per minute, pruned after a day)."""

    node = models.CharField(max_length=200, db_index=True)
    time = models.DateTimeField(default=timezone.now, db_index=True)
    # [[index, utilisation %, memory used bytes, running jobs], ...]; a CPU slot's utilisation is 100 while busy.
    readings = models.JSONField(default=list)

    class Meta:
        ordering = ["time"]


class JobTemplate(models.Model):
    """A saved new-job form (stage, data, model and settings) to start similar jobs from."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="job_templates")
    name = models.CharField(_("name"), max_length=200)
    fields = models.JSONField(default=dict)  # the form's values by field name
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["owner", "name"], name="unique_template_name")]

    def __str__(self):
        return self.name


def clip_params(params: dict | None, limit: int = 2000) -> dict | None:
    """Parameters bounded for storage (an exception's text or a log tail can be long), those of a nested (template,
    params) pair too."""
    if params is None:
        return None
    return {k: v[:limit] if isinstance(v, str) else [v[0][:limit], clip_params(v[1], limit)] if is_problem(v) else v
            for k, v in params.items()}


class Job(Shareable):
    class Status(models.TextChoices):
        QUEUED = "queued", _("queued")
        RUNNING = "running", _("running")
        PAUSING = "pausing", _("pausing")
        PAUSED = "paused", _("paused")
        CANCELLING = "cancelling", _("cancelling")
        SUCCEEDED = "succeeded", _("succeeded")
        FAILED = "failed", _("failed")
        CANCELLED = "cancelled", _("cancelled")
        INTERRUPTED = "interrupted", _("interrupted")

    S = Status
    # The legal transitions, in one place: every status change goes through Job.transition().
    TRANSITIONS = {
        S.QUEUED: {S.RUNNING, S.PAUSED, S.CANCELLED},
        S.RUNNING: {S.PAUSING, S.CANCELLING, S.CANCELLED, S.SUCCEEDED, S.FAILED, S.INTERRUPTED},  # cancelled: by Slurm
        S.PAUSING: {S.PAUSED, S.CANCELLING, S.SUCCEEDED, S.FAILED, S.INTERRUPTED},
        S.CANCELLING: {S.CANCELLED, S.SUCCEEDED, S.FAILED},
        S.PAUSED: {S.QUEUED, S.CANCELLED},
        S.INTERRUPTED: {S.QUEUED, S.CANCELLED, S.FAILED},
        S.FAILED: {S.QUEUED},
        S.SUCCEEDED: set(),
        S.CANCELLED: set(),
    }
    # What a person may ask for, by the job's current status → the status it moves to (a subset of TRANSITIONS).
    USER_ACTIONS = {
        "pause": {S.QUEUED: S.PAUSED, S.RUNNING: S.PAUSING},
        "resume": {S.PAUSED: S.QUEUED},
        "retry": {S.FAILED: S.QUEUED, S.INTERRUPTED: S.QUEUED},
        "cancel": {S.QUEUED: S.CANCELLED, S.PAUSED: S.CANCELLED, S.INTERRUPTED: S.CANCELLED,
                   S.RUNNING: S.CANCELLING, S.PAUSING: S.CANCELLING},
    }
    ACTIVE = (S.QUEUED, S.RUNNING, S.PAUSING, S.CANCELLING)
    LIVE = (S.RUNNING, S.PAUSING, S.CANCELLING)  # a training process may exist
    FINAL = (S.SUCCEEDED, S.FAILED, S.CANCELLED)
    # What planning the queue reads of each queued job (services.queue_plan; scheduler.plan, fair_order, the forecast)
    PLAN_FIELDS = ("owner", "stage", "status", "priority", "gpus", "memory_estimate", "created_at")
    # What the lists of jobs show beside the fields, set per row by their views (selectors.mark_hidden, the queue
    # page). The defaults matter for speed too: a template variable that does not resolve costs a row several
    # exceptions (half of the queue table's rendering).
    hidden = False
    position = None
    reason = ""
    expected_start = ""

    name = models.CharField(_("name"), max_length=200)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs")
    stage = models.CharField(_("stage"), max_length=20, choices=JOB_STAGE_CHOICES)
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="jobs")
    eval_dataset = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                                     verbose_name=_("eval dataset"))
    base_model = models.ForeignKey("models_registry.ModelVersion", null=True, blank=True, on_delete=models.PROTECT,
                                   related_name="+")
    teacher_model = models.ForeignKey("models_registry.ModelVersion", null=True, blank=True, on_delete=models.PROTECT,
                                      related_name="+")
    tokenizer = models.ForeignKey("models_registry.Tokenizer", on_delete=models.PROTECT, related_name="+")
    config = models.JSONField(_("config"), default=dict)  # as submitted (user's keys only)
    resolved_config = models.JSONField(default=dict)  # every key, defaults filled in
    priority = models.IntegerField(_("priority"), default=0)
    gpus = models.PositiveSmallIntegerField(_("devices"), default=1)
    status = models.CharField(_("status"), max_length=20, choices=Status.choices, default=Status.QUEUED,
                              db_index=True)
    node = models.CharField(max_length=200, blank=True)
    devices = models.JSONField(default=list)
    pid = models.IntegerField(null=True, blank=True)
    executor = models.CharField(max_length=10, blank=True)  # where its current or last run ran: "local" or "slurm"
    # A run under the Slurm executor (jobs/slurm.py): {"id", "state", "reason", "nodes", "start", "read", "token",
    # "script"}: Slurm's job id, its state and reason (squeue's %T and %r), its node list, the expected or actual
    # start, how far the portal has read the job's output file, the run's event token.
    slurm = models.JSONField(default=dict, blank=True)
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    eta_s = models.FloatField(null=True, blank=True)
    # What the engine does before its first step, while it does it: {"name": "prepare", "fraction", "records"}
    phase = models.JSONField(default=dict, blank=True)
    worker_pid = models.IntegerField(null=True, blank=True)  # the django-q2 worker supervising it
    resume = models.BooleanField(default=False)  # continue from the run's last checkpoint when next started
    # The fencing token of the job's current run: one more at every start, and a supervisor writes only while the
    # job still has the generation it started with (a node declared down and its job restarted elsewhere cannot
    # write over the new run, whatever it still believes).
    generation = models.PositiveIntegerField(default=0)
    time_limit_s = models.PositiveIntegerField(_("time limit (s)"), null=True, blank=True)
    auto_resumes = models.PositiveSmallIntegerField(default=0)  # automatic resumes after crashes so far
    memory_estimate = models.BigIntegerField(null=True, blank=True)  # bytes per device (training.estimate)
    peak_memory = models.BigIntegerField(null=True, blank=True)  # bytes, the run's real peak (CUDA only)
    # Bytes in the run folder, measured when the job ended (null while it may still change): the storage quota
    # adds these up instead of walking every finished job's folder at each submission (stored_bytes).
    disk_bytes = models.BigIntegerField(null=True, blank=True, editable=False)
    error = models.TextField(blank=True)
    error_params = models.JSONField(null=True, blank=True)  # the portal's own errors: error is their English template
    output_model = models.ForeignKey("models_registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")
    # The events this job notifies its owner of (None: the owner's own choice, Integrations.events; []: none).
    notify = models.JSONField(null=True, blank=True)
    # Experiment trackers this job also logs to, logged by its supervisor: {"wandb": {"project", "mode"}, "swanlab":
    # {...}}; TensorBoard event files are written for every job (jobs/trackers.py).
    trackers = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = _("job")
        verbose_name_plural = _("jobs")
        ordering = ["-created_at"]

    @classmethod
    def stored_bytes(cls, user) -> int:
        """The run folders: checkpoints and trained weights (a trained model's files live there). A finished job's
        folder counts what was measured when it ended; only the others' folders (queued, running, paused: a few)
        are walked, so a submission's storage check does not walk hundreds of finished runs (on shared storage, a
        stat per file over the network)."""
        return sum(cls.folder_bytes(pk, size)
                   for pk, size in cls.objects.filter(owner=user).order_by().values_list("pk", "disk_bytes"))

    @classmethod
    def home_files(cls) -> tuple[str, set]:
        """The run folders of the jobs there are (minicloud/orphans.py)."""
        return "runs", {cls.folder(pk).name for pk in cls.objects.values_list("pk", flat=True)}

    @classmethod
    def folder_bytes(cls, pk, disk_bytes=None) -> int:
        """Bytes in job ``pk``'s run folder: as measured when the job ended (``disk_bytes``), else walked now."""
        return disk_usage(cls.folder(pk)) if disk_bytes is None else disk_bytes

    def __str__(self):
        return f"#{self.pk} {self.name}"

    # Django's generated get_FOO_display rebuilds a hashable copy of the choices on every call (0.3 ms each with
    # translated labels): a queue page of 500 jobs spent a third of its time there. Same labels, by lookup.
    def get_status_display(self):
        return _STATUS_LABELS.get(self.status, self.status)

    def get_stage_display(self):
        return stage_label(self.stage)

    def transition(self, to: str, actor: str = "", message: str = "", params: dict | None = None, **fields) -> bool:
        """Move to ``to`` if the current status allows it (a conditional UPDATE); record the event (``message``: an
        English template marked for the catalogue, with its ``params``; see stored_text). Returns success.

        Leaving a running state closes the job's run segment in the usage accounting."""
        sources = [s for s, targets in self.TRANSITIONS.items() if to in targets]
        if to in self.FINAL:
            fields.setdefault("finished_at", timezone.now())
        # the run folder's size once the job has ended (its process has exited): measured here, outside the write
        # transaction; unknown again when it leaves (a retry)
        fields.setdefault("disk_bytes", disk_usage(self.run_dir) if to in self.FINAL else None)
        now = timezone.now()
        ends_run = to not in self.LIVE
        with transaction.atomic():
            live_sources = [s for s in sources if s in self.LIVE] if ends_run else []
            before = Job.objects.filter(pk=self.pk, status__in=live_sources).values_list("started_at", flat=True)
            started = before.first() if live_sources else None
            done = Job.objects.filter(pk=self.pk, status__in=sources).update(status=to, **fields)
            if done:
                JobEvent.objects.create(job=self, kind=to, actor=actor, message=message[:2000],
                                        params=clip_params(params))
            self.refresh_from_db()
            if done and started is not None:
                self.started_at = started
                UsageRecord.close_segment(self, now)
        return bool(done)

    @property
    def checkpoint_path(self):
        return self.run_dir / "checkpoints" / "resume.pt"

    @property
    def batch_can_shrink(self) -> bool:
        return {**(self.config or {}), **(self.resolved_config or {})}.get("batch_size", 2) > 1

    @property
    def can_halve_batch(self) -> bool:
        """Failed for lack of memory while training (the engine's hint then names batch_size), with a batch that
        can still shrink: the job page offers a clone with half the batch and twice the accumulation (to_dict
        carries it, so job.js shows the offer when the job fails so while the page is open)."""
        return (self.status == self.Status.FAILED and self.error.startswith("out of memory:")
                and "batch_size" in self.error and self.batch_can_shrink)

    @property
    def progress(self) -> float:
        if self.status == self.Status.SUCCEEDED:
            return 1.0
        return min(self.step / self.total_steps, 1.0) if self.total_steps else 0.0

    @property
    def run_dir(self):
        return self.folder(self.pk)

    @staticmethod
    def folder(pk):
        """The run folder of job ``pk``."""
        return settings.HOME / "runs" / f"job-{pk}"

    @property
    def error_text(self) -> str:
        """The error in the active language."""
        return stored_text(self.error, self.error_params)

    @property
    def config_json(self) -> str:
        """The resolved configuration as the API and a spec file write it (true, null; not Python's True, None)."""
        import json

        return json.dumps(self.resolved_config, indent=2, sort_keys=True, ensure_ascii=False)

    @property
    def is_final(self):
        return self.status in self.FINAL

    @property
    def memory_error(self) -> float | None:
        """(estimate − peak) / peak: how far the memory estimate was from the run's real peak."""
        if not self.memory_estimate or not self.peak_memory:
            return None
        return (self.memory_estimate - self.peak_memory) / self.peak_memory

    @property
    def phase_text(self) -> str:
        """"preparing data: 41 %, 2.1 M records" while the engine tokenises the dataset, else ""."""
        if (self.phase or {}).get("name") != "prepare" or self.status not in self.LIVE:
            return ""
        return _("preparing data: %(percent)s %%, %(records)s records") % {
            "percent": round(100 * float(self.phase.get("fraction") or 0)),
            "records": _count(int(self.phase.get("records") or 0))}

    @property
    def slurm_text(self) -> str:
        """Slurm's word on the run, in the active language: "Slurm job 13: PENDING (Resources)", or "… RUNNING on
        node[1-2]"; "" for a run that is not Slurm's."""
        if not self.slurm.get("id"):
            return ""
        reason = self.slurm.get("reason")
        text = _("Slurm job %(id)s: %(state)s") % {"id": self.slurm["id"], "state": self.slurm.get("state") or "?"}
        if reason and reason != "None":
            text += f" ({reason})"
        if self.slurm.get("nodes"):
            text += " " + _("on %(nodes)s") % {"nodes": self.slurm["nodes"]}
        return text

    @property
    def slurm_expected_start(self):
        """When Slurm expects a pending run to start (its backfill estimate, squeue --start), or None."""
        from datetime import datetime

        if self.slurm.get("state") != "PENDING" or not self.slurm.get("start"):
            return None
        return datetime.fromisoformat(self.slurm["start"])

    @property
    def slurm_info(self) -> dict | None:
        """What users see of a Slurm run: Slurm's job id, state, reason, nodes and (expected) start."""
        if not self.slurm:
            return None
        return {**{k: self.slurm.get(k) for k in ("id", "state", "reason", "nodes", "start")}, "text": self.slurm_text}

    # The JSON columns to_dict copies as they are stored (the API listing writes their stored text unparsed).
    STORED_JSON = ("config", "resolved_config", "devices", "notify", "trackers")

    def stored_json(self) -> dict:
        return {name: getattr(self, name) for name in self.STORED_JSON}

    def to_dict(self):
        return {
            "id": self.pk, "name": self.name, "owner": self.owner.username, "stage": self.stage, **self.sharing_dict(),
            "dataset": self.dataset_id, "eval_dataset": self.eval_dataset_id, "base_model": self.base_model_id,
            "teacher_model": self.teacher_model_id,
            "tokenizer": self.tokenizer_id,
            **self.stored_json(), "priority": self.priority,
            "gpus": self.gpus, "status": self.status, "node": self.node or None,
            "executor": self.executor or None, "slurm": self.slurm_info,
            "step": self.step, "total_steps": self.total_steps, "progress": round(self.progress, 4),
            "phase": self.phase or None, "phase_text": self.phase_text or None,
            "eta_s": self.eta_s, "error": self.error_text or None, "output_model": self.output_model_id,
            "time_limit_s": self.time_limit_s, "auto_resumes": self.auto_resumes,
            "can_halve_batch": self.can_halve_batch,
            "memory_estimate": self.memory_estimate, "peak_memory": self.peak_memory,
            "created_at": self.created_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


_STATUS_LABELS = dict(Job.Status.choices)


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 10**6 else f"{n / 1e3:.1f} k" if n >= 10**4 else str(n)


class MetricPoint(models.Model):
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="metrics")
    seq = models.PositiveIntegerField()
    step = models.PositiveIntegerField()
    time = models.FloatField()
    values = models.JSONField(default=dict)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "seq"], name="metric_job_seq")]
        ordering = ["seq"]

    def to_dict(self):
        return {"seq": self.seq, "step": self.step, "time": self.time, "values": self.values}


class LogChunk(models.Model):
    """A batch of log text; ``offset`` is the character offset of its first character in the job's whole log."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="log_chunks")
    offset = models.PositiveBigIntegerField()
    text = models.TextField()

    class Meta:
        ordering = ["offset"]
        indexes = [models.Index(fields=["job", "offset"])]


NOTIFY_EVENTS = ("succeeded", "failed", "paused_quota", "waiting")


def default_notify_events():
    return ["succeeded", "failed", "paused_quota"]


class Integrations(models.Model):
    """A user's notification channels and events, and their experiment-tracker keys (encrypted at rest:
    minicloud/secrets.py). A job may override the events (``Job.notify``)."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="integrations")
    email_enabled = models.BooleanField(_("e-mail me"), default=False)
    email = models.EmailField(_("e-mail address (empty: the account's)"), blank=True)
    webhook_url = models.URLField(_("webhook URL"), blank=True, max_length=500)
    webhook_secret = models.TextField(blank=True)  # encrypted; signs each webhook (HMAC-SHA256)
    events = models.JSONField(default=default_notify_events)
    wait_minutes = models.PositiveIntegerField(_("tell me when a job waits longer than (minutes)"), default=60)
    # The language the user last switched the portal to or saved these settings in: the notifications are written in
    # it (the worker that sends them has no request to take a language from). Empty: the site's default.
    language = models.CharField(max_length=10, blank=True)
    wandb_key = models.TextField(blank=True)  # encrypted
    swanlab_key = models.TextField(blank=True)  # encrypted

    @classmethod
    def of(cls, user) -> "Integrations":
        return cls.objects.get_or_create(user=user)[0]

    def secret(self, name: str) -> str:
        from minicloud.secrets import decrypt

        return decrypt(getattr(self, name))

    def set_secret(self, name: str, value: str) -> None:
        from minicloud.secrets import encrypt

        setattr(self, name, encrypt(value))


class Notification(models.Model):
    """One message about one event of one job on one channel: made once (the unique constraint), sent by the
    housekeeping and the task queued at the event, retried with backoff while the receiver fails."""

    class Status(models.TextChoices):
        PENDING = "pending", _("pending")
        SENT = "sent", _("sent")
        FAILED = "failed", _("failed")

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="notifications")
    event = models.CharField(max_length=20)
    channel = models.CharField(max_length=10)  # "email" or "webhook"
    target = models.CharField(max_length=500)
    payload = models.JSONField(default=dict)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now, db_index=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "event", "channel"], name="notification_once")]
        ordering = ["created_at", "pk"]


class JobEvent(models.Model):
    """A lifecycle event of a job (submitted, started, cancel requested, finished ...), with time and actor. The
    portal's own notes are stored as an English template and its ``params`` and read in the reader's language."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    time = models.DateTimeField(default=timezone.now)
    kind = models.CharField(max_length=40)
    actor = models.CharField(max_length=150, blank=True)
    message = models.TextField(blank=True)
    params = models.JSONField(null=True, blank=True)

    @property
    def text(self) -> str:
        """The message in the active language."""
        return stored_text(self.message, self.params)

    class Meta:
        ordering = ["time", "pk"]

    @property
    def label(self) -> str:
        """The event's kind in the active language (a status, or "submitted")."""
        if self.kind == "submitted":
            return gettext("submitted")
        return str(_STATUS_LABELS.get(self.kind, self.kind))
