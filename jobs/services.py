"""Job lifecycle: submit, claim, cancel, finish, reconcile. Views, consumers and tasks call these."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from models_registry.models import ModelVersion, Tokenizer
from models_registry.services import demo_tokenizer, register_tokenizer
from training import spec as tspec

from .models import Dataset, Job, JobEvent, Node


class ServiceError(Exception):
    """A refused request. ``status`` is the HTTP status the API answers with; ``field`` names the bad input."""

    def __init__(self, message, *, status=400, field=None):
        super().__init__(message)
        self.status = status
        self.field = field


def record_event(job: Job, kind: str, actor: str = "", message: str = "") -> None:
    JobEvent.objects.create(job=job, kind=kind, actor=actor, message=message)


# --- demo data -------------------------------------------------------------------------------------------------

def install_demo_data() -> None:
    """Generate the demo datasets and tokenizer (deterministic) and register them as public. Idempotent."""
    from training.demo_data import DEMO_KINDS

    demo_dir = settings.HOME / "demo"
    missing = not (demo_dir / "demo-tokenizer" / "tokenizer.json").exists() or any(
        not (demo_dir / f"{name}.jsonl").exists() for name in DEMO_KINDS)
    if missing:
        from training.demo_data import iter_texts, write_demo_datasets
        from training.tokenizer import train_tokenizer

        paths = write_demo_datasets(demo_dir)
        train_tokenizer([t for p in paths.values() for t in iter_texts(p)], demo_dir / "demo-tokenizer")
    for name, kind in DEMO_KINDS.items():
        path = demo_dir / f"{name}.jsonl"
        data = path.read_bytes()
        Dataset.objects.update_or_create(
            name=name, owner=None,
            defaults={"kind": kind, "is_public": True, "path": str(path), "records": data.count(b"\n"),
                      "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    register_tokenizer(name="demo-tokenizer", path=demo_dir / "demo-tokenizer", is_public=True)


# --- submit ----------------------------------------------------------------------------------------------------

def _visible(qs, pk, field, user):
    if pk in (None, ""):
        return None
    try:
        return qs.visible_to(user).get(pk=int(pk))
    except (ValueError, TypeError, qs.model.DoesNotExist):
        raise ServiceError(f"{field}: no {qs.model._meta.verbose_name} with id {pk!r} that you can use",
                           field=field) from None


def submit_job(*, owner, name: str, stage: str, dataset, config: dict | None = None, base_model=None,
               teacher_model=None, tokenizer=None, priority: int = 0, gpus: int = 1) -> Job:
    """Validate and queue a job. ``dataset``/``base_model``/``tokenizer`` are ids (or model instances)."""
    name = (name or "").strip()
    if not name:
        raise ServiceError("name: is required", field="name")
    if len(name) > 200:
        raise ServiceError("name: at most 200 characters", field="name")
    if stage not in tspec.STAGES:
        raise ServiceError(f"stage: unknown stage {stage!r}; choose one of {', '.join(tspec.STAGES)}", field="stage")
    if stage not in tspec.IMPLEMENTED_STAGES:
        raise ServiceError(f"stage: {stage!r} is not available in this version yet", field="stage")
    ds = dataset if isinstance(dataset, Dataset) else _visible(Dataset.objects, dataset, "dataset", owner)
    if ds is None:
        raise ServiceError("dataset: is required", field="dataset")
    if ds.kind != tspec.STAGE_DATASET_KIND[stage]:
        raise ServiceError(f"dataset: stage {stage} needs a {tspec.STAGE_DATASET_KIND[stage]} dataset, "
                           f"{ds.name} is {ds.kind}", field="dataset")
    base = base_model if isinstance(base_model, ModelVersion) or base_model is None else \
        _visible(ModelVersion.objects, base_model, "base_model", owner)
    if base is None and stage in ("lora", "dpo", "ppo", "grpo"):
        raise ServiceError(f"base_model: the {stage} stage starts from a trained model", field="base_model")
    teacher = teacher_model if isinstance(teacher_model, ModelVersion) or teacher_model is None else \
        _visible(ModelVersion.objects, teacher_model, "teacher_model", owner)
    if stage == "distill" and teacher is None:
        raise ServiceError("teacher_model: distillation needs a teacher model", field="teacher_model")
    if stage != "distill" and teacher is not None:
        raise ServiceError("teacher_model: only the distill stage takes a teacher", field="teacher_model")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else _visible(Tokenizer.objects, tokenizer, "tokenizer", owner)
    if tok is None:
        tok = base.tokenizer if base and base.tokenizer else demo_tokenizer()
    if tok is None:
        raise ServiceError("tokenizer: none given and the demo tokenizer is not installed", field="tokenizer")
    try:
        # A base model fixes the architecture: its keys replace any the job's config gives.
        arch = {k: v for k, v in (base.config if base else {}).items() if k in tspec.MODEL_DEFAULTS}
        resolved = tspec.resolve_config(stage, {**(config or {}), **arch})
    except tspec.SpecError as exc:
        raise ServiceError(f"config.{exc}", field=f"config.{exc.field}") from None
    if tok.vocab_size > resolved["vocab_size"]:
        raise ServiceError(f"config.vocab_size: the tokenizer has {tok.vocab_size} tokens, more than the model's "
                           f"{resolved['vocab_size']}", field="config.vocab_size")
    try:
        priority, gpus = int(priority), int(gpus)
    except (TypeError, ValueError):
        raise ServiceError("priority and gpus must be integers", field="gpus") from None
    slots = max((len(n.devices) for n in Node.objects.all()), default=0) or len(_local_devices())
    if gpus < 1 or gpus > slots:
        raise ServiceError(f"gpus: must be between 1 and {slots}, the most devices any node has", field="gpus")
    if gpus > 1:
        raise ServiceError("gpus: multi-device jobs are not available in this version yet", field="gpus")
    with transaction.atomic():
        job = Job.objects.create(owner=owner, name=name, stage=stage, dataset=ds, base_model=base,
                                 teacher_model=teacher, tokenizer=tok,
                                 config=config or {}, resolved_config=resolved, priority=priority, gpus=gpus)
        record_event(job, "submitted", owner.username)
        transaction.on_commit(kick_queue)
    return job


def kick_queue() -> None:
    """Ask a worker to claim the next runnable job (a token, not a job: duplicates or stale tokens do nothing)."""
    from django_q.tasks import async_task

    async_task("jobs.tasks.run_next_job", task_name="run_next_job", q_options={"ack_failure": True})


# --- claim and run ---------------------------------------------------------------------------------------------

def _local_devices():
    from .devices import inventory

    return inventory()


def claim_next_job(node_name: str, slots: int) -> Job | None:
    """Atomically take the best queued job that fits this node's free slots (priority, then age)."""
    with transaction.atomic():
        Node.objects.select_for_update().filter(name=node_name).exists()  # serialises claims on PostgreSQL
        used = set()
        for devs in Job.objects.filter(status=Job.Status.RUNNING, node=node_name).values_list("devices", flat=True):
            used.update(devs or [])
        free = [i for i in range(slots) if i not in used]
        for job in Job.objects.filter(status=Job.Status.QUEUED).order_by("-priority", "created_at", "pk"):
            if job.gpus > len(free):
                continue
            devices = free[: job.gpus]
            claimed = Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED).update(
                status=Job.Status.RUNNING, node=node_name, devices=devices, started_at=timezone.now(),
                cancel_requested=False, error="", pid=None)
            if claimed:
                job.refresh_from_db()
                record_event(job, "started", node_name, f"devices {devices}")
                return job
    return None


def build_spec(job: Job) -> dict:
    spec = {
        "job_id": job.pk, "stage": job.stage, "run_dir": str(job.run_dir), "dataset": job.dataset.path,
        "tokenizer": job.tokenizer.path, "device": "auto", "resume": job.resume, "config": job.resolved_config,
    }
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


# --- cancel ----------------------------------------------------------------------------------------------------

def cancel_job(job: Job, actor) -> Job:
    who = getattr(actor, "username", str(actor))
    if Job.objects.filter(pk=job.pk, status__in=[Job.Status.QUEUED, Job.Status.INTERRUPTED, Job.Status.PAUSED]).update(
            status=Job.Status.CANCELLED, finished_at=timezone.now()):
        record_event(job, "cancelled", who)
    elif Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING).update(cancel_requested=True):
        record_event(job, "cancel_requested", who)
    else:
        job.refresh_from_db()
        raise ServiceError(f"job {job.pk} is {job.status}; only queued or running jobs can be cancelled", status=409)
    job.refresh_from_db()
    return job


# --- finish and recover ----------------------------------------------------------------------------------------

def finish_job(job: Job, status: str, *, error: str = "", output_model=None) -> None:
    Job.objects.filter(pk=job.pk).update(status=status, error=error[:4000], finished_at=timezone.now(), pid=None,
                                         output_model=output_model)
    record_event(job, status, job.node, error[:500])


def requeue_interrupted(job: Job, reason: str) -> None:
    """Put an interrupted job back in the queue to continue from its last checkpoint."""
    resume = (job.run_dir / "checkpoints" / "resume.pt").exists()
    Job.objects.filter(pk=job.pk).update(status=Job.Status.QUEUED, pid=None, node="", devices=[], resume=resume,
                                         cancel_requested=False)
    record_event(job, "requeued", "system", reason + (" (resuming from checkpoint)" if resume else ""))


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reconcile_node(node_name: str) -> list[int]:
    """At start: jobs this node was running whose process is gone are interrupted and requeued to resume."""
    requeued = []
    for job in Job.objects.filter(node=node_name, status__in=[Job.Status.RUNNING, Job.Status.INTERRUPTED]):
        if job.status == Job.Status.RUNNING and _pid_alive(job.pid):
            try:
                os.killpg(job.pid, 9)  # an orphan from a dead serve: nobody reads its events any more
            except OSError:
                pass
        if job.cancel_requested:
            finish_job(job, Job.Status.CANCELLED)
            continue
        Job.objects.filter(pk=job.pk).update(status=Job.Status.INTERRUPTED)
        record_event(job, "interrupted", "system", "the node stopped while the job ran")
        requeue_interrupted(job, "node restarted")
        requeued.append(job.pk)
    return requeued


def register_node(node_name: str) -> Node:
    node, _ = Node.objects.update_or_create(
        name=node_name, defaults={"devices": _local_devices(), "started_at": timezone.now(),
                                  "heartbeat_at": timezone.now(), "stopping": False})
    return node


def refresh_node(node_name: str) -> None:
    Node.objects.filter(name=node_name).update(devices=_local_devices(), heartbeat_at=timezone.now())


def queue_position(job: Job) -> int | None:
    """1 for the next job to start, or None when the job is not queued."""
    if job.status != Job.Status.QUEUED:
        return None
    ahead = Job.objects.filter(status=Job.Status.QUEUED).filter(
        Q(priority__gt=job.priority) | Q(priority=job.priority, created_at__lt=job.created_at))
    return ahead.count() + 1
