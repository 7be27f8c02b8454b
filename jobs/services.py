"""Job lifecycle: submit, claim, cancel, finish, reconcile. Views, consumers and tasks call these."""
from __future__ import annotations

import hashlib
import json
import os
import signal
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.translation import gettext as _, gettext_noop

from minicloud.errors import ServiceError, clean_name, whole_number
from models_registry.models import ModelVersion, Tokenizer
from models_registry.services import demo_tokenizer, register_tokenizer
from training import spec as tspec
from training.estimate import estimate_memory

from . import scheduler
from .models import Dataset, DeviceSample, Job, JobEvent, JobPart, JobTemplate, Node, clip_params



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

def _model_version(value, field, owner):
    """A ModelVersion given as an instance, an id the owner can use, or nothing."""
    if value is None or isinstance(value, ModelVersion):
        return value
    return ModelVersion.objects.usable_by(owner, value, field)


def prepare_job(*, owner, name: str, stage: str, dataset, config: dict | None = None, base_model=None,
                teacher_model=None, tokenizer=None, priority: int = 0, gpus: int = 1,
                time_limit_s: int | None = None, eval_dataset=None, estimate: dict | None = None) -> dict:
    """Validate a job request; returns the Job fields. Raises ServiceError naming the first bad field.

    ``estimate``, when given, receives the memory estimate (bytes and parts) and whether the devices are GPUs."""
    name = clean_name(name, 200)
    if config is not None and not isinstance(config, dict):
        raise ServiceError(_("config: a JSON object of MiniMind argument names and values"), field="config")
    priority = whole_number(priority, "priority", -10**6, 10**6)
    gpus = whole_number(gpus, "gpus", 1, 1024)
    if time_limit_s is not None:
        time_limit_s = whole_number(time_limit_s, "time_limit_s", 1, 2**31 - 1)
    if stage not in tspec.STAGES:
        raise ServiceError(
            _("stage: unknown stage %(stage)s; choose one of %(stages)s")
            % {"stage": repr(stage), "stages": ", ".join(tspec.STAGES)},
            field="stage",
        )
    ds = dataset if isinstance(dataset, Dataset) else Dataset.objects.usable_by(owner, dataset, "dataset")
    if ds is None:
        raise ServiceError(_("dataset: is required"), field="dataset")
    if tspec.STAGE_DATASET_KIND[stage] and ds.kind != tspec.STAGE_DATASET_KIND[stage]:
        raise ServiceError(
            _("dataset: stage %(stage)s needs a %(needed)s dataset, %(name)s is %(kind)s")
            % {"stage": stage, "needed": tspec.STAGE_DATASET_KIND[stage], "name": ds.name, "kind": ds.kind},
            field="dataset",
        )
    eval_ds = None
    if eval_dataset not in (None, ""):
        eval_ds = eval_dataset if isinstance(eval_dataset, Dataset) else Dataset.objects.usable_by(
            owner, eval_dataset, "eval_dataset")
        if eval_ds.kind != ds.kind:
            raise ServiceError(
                _("eval_dataset: must be a %(kind)s dataset like the training data, %(name)s is %(other_kind)s")
                % {"kind": ds.kind, "name": eval_ds.name, "other_kind": eval_ds.kind},
                field="eval_dataset",
            )
    base = _model_version(base_model, "base_model", owner)
    if base is None and stage in tspec.NEEDS_BASE:
        raise ServiceError(
            _("base_model: the %(stage)s stage starts from a trained model") % {"stage": stage}, field="base_model"
        )
    teacher = _model_version(teacher_model, "teacher_model", owner)
    if stage == "distill" and teacher is None:
        raise ServiceError(_("teacher_model: distillation needs a teacher model"), field="teacher_model")
    if stage != "distill" and teacher is not None:
        raise ServiceError(_("teacher_model: only the distill stage takes a teacher"), field="teacher_model")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.objects.usable_by(owner, tokenizer, "tokenizer")
    if tok is None:
        tok = base.tokenizer if base and base.tokenizer else demo_tokenizer()
    if tok is None:
        raise ServiceError(_("tokenizer: none given and the demo tokenizer is not installed"), field="tokenizer")
    if tok.status != "ready":
        raise ServiceError(
            _("tokenizer: %(name)s is %(status)s, not ready") % {"name": tok.name, "status": tok.status},
            field="tokenizer",
        )
    try:
        # A base model fixes the architecture: its keys replace any the job's config gives.
        arch = {k: v for k, v in (base.config if base else {}).items() if k in tspec.MODEL_DEFAULTS}
        resolved = tspec.resolve_config(stage, {**(config or {}), **arch})
    except tspec.SpecError as exc:
        raise ServiceError(spec_error_text(exc), field=f"config.{exc.field}") from None
    if tok.vocab_size > resolved["vocab_size"]:
        raise ServiceError(
            _("config.vocab_size: the tokenizer has %(vocab_size)s tokens, more than the model's %(model_vocab)s")
            % {"vocab_size": tok.vocab_size, "model_vocab": resolved["vocab_size"]},
            field="config.vocab_size",
        )
    time_limit_s = check_submission_quota(owner, gpus, time_limit_s)
    nodes, cuda, memory_parts = _memory_need(stage, resolved, teacher)
    memory = memory_parts["bytes"]
    if estimate is not None:
        estimate.update(memory=memory_parts, cuda=cuda)
    why = scheduler.never_fits(nodes, gpus, memory, multi_node=settings.MULTI_NODE_JOBS)
    if why:
        field = "gpus" if why[0] == "gpus" else "config.batch_size"
        raise ServiceError(
            _("%(field)s: this job can never start: it %(reason)s") % {"field": field, "reason": never_fits_text(*why)},
            field=field,
        )
    return dict(owner=owner, name=name, stage=stage, dataset=ds, eval_dataset=eval_ds, base_model=base,
                teacher_model=teacher, tokenizer=tok,
                config=config or {}, resolved_config=resolved, priority=priority, gpus=gpus,
                time_limit_s=time_limit_s, memory_estimate=memory)


def _memory_need(stage: str, resolved: dict, teacher) -> tuple[dict, bool, dict]:
    """What could ever run a job (no live node yet: this machine's devices), not what runs now; whether those are
    GPUs; the job's memory estimate per device (bytes and parts)."""
    nodes = device_state(jobs=False) or device_state(settings.NODE_NAME, jobs=False)
    cuda = any(d.kind == "cuda" for devs in nodes.values() for d in devs)
    teacher_cfg = {k: v for k, v in teacher.config.items() if k in tspec.MODEL_DEFAULTS} if teacher else None
    return nodes, cuda, estimate_memory(stage, resolved, teacher_cfg, cuda=cuda)


def submit_job(**request) -> Job:
    """Validate and queue a job (``prepare_job``'s arguments: ``dataset``/``base_model``/``tokenizer`` are ids or
    model instances)."""
    fields = prepare_job(**request)
    with transaction.atomic():
        job = Job.objects.create(**fields)
        record_event(job, "submitted", fields["owner"].username)
        transaction.on_commit(kick_queue)
    return job


def check_submission_quota(owner, gpus: int, time_limit_s, requeue: bool = False):
    """Refuse (403, naming the quota) what the owner's quota forbids at submission; returns the job's time limit,
    capped by the quota's wall-clock limit."""
    from accounts.services import check_storage, device_hours, effective_quota, week_start

    quota = effective_quota(owner)
    if not requeue:
        check_storage(owner, quota=quota)
    if not requeue and quota["max_gpus_per_job"] is not None and gpus > quota["max_gpus_per_job"]:
        raise ServiceError(
            _("gpus: over your quota: at most %(max_gpus_per_job)s device(s) per job")
            % {"max_gpus_per_job": quota["max_gpus_per_job"]},
            status=403,
            field="gpus",
        )
    if quota["max_queued_jobs"] is not None:
        queued = Job.objects.filter(owner=owner, status=Job.Status.QUEUED).count()
        if queued >= quota["max_queued_jobs"]:
            raise ServiceError(
                _("quota: you already have %(queued)s queued job(s), your limit is %(max_queued_jobs)s")
                % {"queued": queued, "max_queued_jobs": quota["max_queued_jobs"]},
                status=403,
                field="quota",
            )
    limit = quota["device_hours_per_week"]
    if limit is not None:
        used = device_hours(owner, week_start())
        if used >= limit:
            raise ServiceError(
                _("quota: you have used %(used)s of your %(limit)s device-hours this week")
                % {"used": format(used, ".1f"), "limit": format(limit, "g")},
                status=403,
                field="quota",
            )
    if quota["max_job_hours"] is not None:
        cap = max(int(quota["max_job_hours"] * 3600), 1)
        time_limit_s = cap if time_limit_s is None else min(time_limit_s, cap)
    return time_limit_s


def estimate_job(**request) -> dict:
    """What the new-job page shows while the form is filled in: the validated request's resolved config, parameter
    count, memory per device (with its parts) and a rough time on H100-class GPUs. Raises like ``prepare_job``."""
    from training.estimate import estimate_seconds

    request["name"] = request.get("name") or "estimate"  # a name is not needed to estimate
    est = {}
    fields = prepare_job(**request, estimate=est)
    cfg, stage = fields["resolved_config"], fields["stage"]
    return {"stage": stage, "resolved_config": cfg, "parameters": tspec.parameter_count(tspec.model_config(cfg)),
            "memory": est["memory"], "cuda": est["cuda"],
            "seconds": estimate_seconds(stage, cfg, fields["dataset"].records, fields["gpus"])}


def node_queue(node_name: str) -> str:
    """The django-q2 queue a node's job runner listens on."""
    return f"{settings.INSTANCE}.{node_name}"


def live_nodes() -> list[str]:
    """Worker nodes that beat recently and are not stopping, most recent heartbeat first."""
    return list(Node.live().order_by("-heartbeat_at").values_list("name", flat=True))


def kick_queue() -> None:
    """Ask every live node's runner to claim what the scheduler places on it (tokens, not jobs: duplicates or stale
    tokens do nothing)."""
    _kick_nodes(live_nodes() or [settings.NODE_NAME])


def background_task(func: str, *args, task_name: str) -> None:
    """Queue background work (statistics, tokenizer training) on a live worker node: this one when it is one."""
    from django_q.tasks import async_task

    nodes = live_nodes()
    target = settings.NODE_NAME if settings.NODE_NAME in nodes or not nodes else nodes[0]
    async_task(func, *args, task_name=task_name, cluster=node_queue(target), q_options={"ack_failure": True})


def fail_over(now=None) -> list[int]:
    """Interrupt the live jobs of nodes that stopped beating (their runner is gone), so that they resume on a live
    node from their last checkpoint; a down node takes no new jobs until it beats again."""
    down = set(Node.objects.filter(heartbeat_at__lt=Node.heartbeat_cutoff(now)).values_list("name", flat=True))
    moved = []
    spanning = JobPart.objects.filter(node__in=down, finished_at__isnull=True).values_list("job_id", flat=True)
    for job in Job.objects.filter(Q(node__in=down) | Q(pk__in=list(spanning)), status__in=Job.LIVE):
        lost = job.node if job.node in down else ", ".join(sorted({p.node for p in job.parts.all()} & down))
        if _end_orphaned(job, gettext_noop("node %(lost)s stopped answering (no heartbeat for %(seconds)s s)"),
                         gettext_noop("node %(node)s went down while pausing"),
                         {"lost": lost, "node": job.node, "seconds": f"{settings.NODE_TIMEOUT_S:g}"}):
            moved.append(job.pk)
    if moved:
        kick_queue()
    return moved


def check_shared_storage() -> None:
    """Every node must see the same MINICLOUD_HOME (datasets, checkpoints and models live there): the first node
    writes a marker with a random id and records the id in the database; a node that cannot read the same id
    refuses to start."""
    import uuid

    from .models import Setting

    marker = settings.HOME / ".minicloud-storage"
    with transaction.atomic():
        row, created = Setting.objects.get_or_create(key="storage_id", defaults={"value": uuid.uuid4().hex})
    if created:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(row.value)
    found = marker.read_text().strip() if marker.exists() else None
    if found != row.value:
        raise ServiceError(
            f"MINICLOUD_HOME={settings.HOME} is not the storage the other nodes use: "
            + ("it has no marker file .minicloud-storage" if found is None else "its marker file names another one")
            + ". Mount the shared filesystem (NFS) there on every node (docs/deploy.md).", status=500)


# --- claim and run ---------------------------------------------------------------------------------------------

def _local_devices():
    from .devices import inventory

    return inventory()


def recent_usage(owner_ids, now=None) -> dict:
    """Device-seconds each owner used, each job's share halved every FAIR_SHARE_HALF_LIFE_H since it ended."""
    now = now or timezone.now()
    half_life = settings.FAIR_SHARE_HALF_LIFE_H * 3600
    since = now - timedelta(seconds=half_life * 8)
    usage = {pk: 0.0 for pk in owner_ids}
    jobs = Job.objects.filter(owner_id__in=owner_ids, started_at__isnull=False).filter(
        Q(finished_at__isnull=True) | Q(finished_at__gte=since)).values("owner_id", "gpus", "started_at", "finished_at")
    for j in jobs:
        end = j["finished_at"] or now
        usage[j["owner_id"]] += scheduler.decayed_seconds(j["started_at"].timestamp(), end.timestamp(), j["gpus"],
                                                          now.timestamp(), half_life)
    return usage


def _queued() -> list:
    """The queued jobs with only the fields planning reads (a 500-job queue spent most of its time building full jobs
    and their owners)."""
    return list(Job.objects.filter(status=Job.Status.QUEUED).only(*Job.PLAN_FIELDS))


def _owner_quotas(jobs) -> tuple[dict, dict]:
    """The owners of ``jobs`` ({id: user}) and their effective quotas ({id: quotas}), one read for all of them."""
    from django.contrib.auth import get_user_model

    from accounts.services import effective_quotas

    owners = get_user_model().objects.in_bulk({job.owner_id for job in jobs})
    return owners, effective_quotas(owners.values())


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


def _quota_gate(owners: dict, quotas: dict):
    """The scheduler's quota check for one planning pass over the jobs of ``owners`` (with their ``quotas``):
    (blocked(job) -> reason or None, placed(job)), counting the jobs the pass places as running."""
    from accounts.services import device_hours, week_start

    running, hours = {}, {}
    for owner_id in Job.objects.filter(status__in=Job.LIVE).values_list("owner_id", flat=True):
        running[owner_id] = running.get(owner_id, 0) + 1
    since = week_start()

    def blocked(job):
        owner = owners[job.owner_id]
        q = quotas[owner.pk]
        if q["max_running_jobs"] is not None and running.get(owner.pk, 0) >= q["max_running_jobs"]:
            return "quota_running", {"n": running.get(owner.pk, 0), "limit": q["max_running_jobs"]}
        if q["device_hours_per_week"] is not None:
            if owner.pk not in hours:
                hours[owner.pk] = device_hours(owner, since)
            if hours[owner.pk] >= q["device_hours_per_week"]:
                return "quota_hours", {"used": f"{hours[owner.pk]:.1f}", "limit": f"{q['device_hours_per_week']:g}"}
        return None

    def placed(job):
        running[job.owner_id] = running.get(job.owner_id, 0) + 1

    return blocked, placed


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
            row = Node.objects.filter(name=node_name).first()
            nodes[node_name] = scheduler.devices_from_inventory(node_name, row.devices if row else _local_devices())
    if not jobs:
        return nodes
    index = {(d.node, d.index): d for devs in nodes.values() for d in devs}
    for node, devices, memory, placement in Job.objects.filter(status__in=Job.LIVE).values_list(
            "node", "devices", "memory_estimate", "placement"):
        for part_node, part_devices in placement or [(node, devices)]:
            for i in part_devices or []:
                if (part_node, i) in index:
                    index[(part_node, i)].jobs.append(memory or 0)
    return nodes


def queue_plan(node_name: str | None = None, slots: int | None = None) -> list[scheduler.Decision]:
    """Every queued job in queue order, with where it would start now or why it waits."""
    queued = _queued()
    owners, quotas = _owner_quotas(queued)
    queued = queue_order(queued, (owners, quotas))
    blocked, placed = _quota_gate(owners, quotas)
    return scheduler.plan(queued, device_state(node_name, slots), settings.JOBS_PER_GPU, blocked=blocked,
                          multi_node=settings.MULTI_NODE_JOBS,
                          on_place=placed)


def _typical_durations() -> dict:
    """Median run seconds of each stage's last 20 succeeded jobs (one query: a row number per stage)."""
    from django.db.models import F, Window
    from django.db.models.functions import RowNumber

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


def wait_reason_text(code: str, p: dict) -> str:
    """Why a queued job waits: a reason code of ``scheduler.REASONS`` (or "new": not planned yet) with its parameters,
    in the active language ("starting" once it has a place)."""
    if code == "":
        return _("starting")
    if code == "new":
        return _("just queued: its place is being planned")
    if code == "held":
        return _("held for an earlier multi-device job")
    if code == "gpu_memory":
        return _("waiting for %(n)s GPU(s) with %(gib)s GiB free") % p
    if code == "slots":
        return _("waiting for %(n)s free device slot(s)") % p
    if code == "no_nodes":
        return _("no worker node is running")
    if code == "quota_running":
        return _("over your concurrent-job quota (%(n)s of %(limit)s running)") % p
    if code == "quota_hours":
        return _("you have used %(used)s of your %(limit)s device-hours this week") % p
    return code


def spec_error_text(exc) -> str:
    """A ``training.spec.SpecError`` about a config key in the active language (its message is a catalogue entry)."""
    return f"config.{exc.field}: {exc.text(_)}"


def never_fits_text(kind: str, p: dict) -> str:
    """``scheduler.never_fits``'s answer in the active language."""
    if kind == "gpus":
        return _("needs %(gpus)s devices on one node; the largest node has %(most)s") % p
    return (
        _("needs about %(gib)s GiB per GPU; the largest GPU has %(largest)s GiB (lower batch_size or max_seq_len)") % p
    )


def claim_next_job(node_name: str, slots: int | None = None) -> Job | None:
    """Atomically take the first queued job that the plan places on this node (see ``queue_order`` and
    ``scheduler.plan``). ``slots``: treat this node as that many CPU slots (tests)."""
    with transaction.atomic():
        Node.objects.select_for_update().filter(name=node_name).exists()  # serialises claims on PostgreSQL
        for decision in queue_plan(node_name, slots):
            if decision.node != node_name:
                continue
            job, devices, now = decision.job, decision.devices, timezone.now()
            placement = [[n, d] for n, d in decision.parts]
            rendezvous = {"address": Node.objects.filter(name=node_name).values_list("address", flat=True).first()
                          or settings.NODE_ADDRESS, "port": _free_port()} if placement else {}
            where = ((gettext_noop("devices %(devices)s"), {"devices": str(devices)}) if not placement else
                     (gettext_noop("nodes and devices: %(placement)s"),
                      {"placement": "; ".join(f"{n} {d}" for n, d in placement)}))
            job = Job.objects.get(pk=job.pk)  # the plan read only what planning needs
            if job.transition(Job.Status.RUNNING, node_name, *where, node=node_name, devices=devices, started_at=now,
                              error="", error_params=None, pid=None, worker_pid=os.getpid(), placement=placement,
                              rendezvous=rendezvous):
                for rank, (other, devs) in enumerate(placement[1:], 1):
                    JobPart.objects.create(job=job, node=other, rank=rank, devices=devs, run_started_at=now)
                if placement:
                    transaction.on_commit(lambda: _kick_nodes([n for n, _ in placement[1:]]))
                return job
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _kick_nodes(names) -> None:
    from django_q.tasks import async_task

    for name in names:
        async_task("jobs.tasks.run_next_job", task_name="run_next_job", cluster=node_queue(name),
                   q_options={"ack_failure": True})


def claim_part(node_name: str):
    """This node's share of a running multi-node job that nobody started yet, claimed atomically, or None."""
    for part in JobPart.objects.filter(node=node_name, claimed_at__isnull=True,
                                       job__status=Job.Status.RUNNING).select_related("job"):
        if part.run_started_at != part.job.started_at:
            continue  # a part of an earlier run of the job
        if JobPart.objects.filter(pk=part.pk, claimed_at__isnull=True).update(claimed_at=timezone.now()):
            return part
    return None


def build_spec(job: Job) -> dict:
    spec = {
        "job_id": job.pk, "stage": job.stage, "run_dir": str(job.run_dir), "dataset": job.dataset.path,
        "tokenizer": job.tokenizer.path, "device": "auto", "resume": job.resume, "config": job.resolved_config,
        "data_cache": str(settings.DATA_CACHE_DIR), "data_cache_gb": settings.DATA_CACHE_GB,
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


# --- cancel, pause, resume, retry, clone ---------------------------------------------------------------------

def _who(actor) -> str:
    return getattr(actor, "username", str(actor))


def _refuse(job: Job, action: str):
    states = [str(s) for s in Job.USER_ACTIONS[action]]
    allowed = ", ".join(states[:-1]) + f" or {states[-1]}" if len(states) > 1 else states[0]
    raise ServiceError(
        _("job %(pk)s is %(status)s; %(action)s needs a %(allowed)s job")
        % {"pk": job.pk, "status": job.status, "action": action, "allowed": allowed},
        status=409,
    )


def _user_action(job: Job, action: str, actor) -> Job:
    """Move the job as ``Job.USER_ACTIONS[action]`` says for its status, or refuse (409)."""
    job.refresh_from_db()
    target = Job.USER_ACTIONS[action].get(job.status)
    if target is None or not job.transition(target, _who(actor)):
        _refuse(job, action)
    return job


def cancel_job(job: Job, actor) -> Job:
    """Queued/paused/interrupted: cancelled at once. Running/pausing: cancelling (the supervisor stops it)."""
    return _user_action(job, "cancel", actor)


def pause_job(job: Job, actor) -> Job:
    """Running: checkpoint, free the device, keep the place (pausing → paused). Queued: paused at once."""
    return _user_action(job, "pause", actor)


# The history's notes for a job put back in the queue, and the same when it continues from its checkpoint.
_RESUMING = {
    gettext_noop("resumed"): gettext_noop("resumed (continues from its last checkpoint)"),
    gettext_noop("retry"): gettext_noop("retry (continues from its last checkpoint)"),
    gettext_noop("retry with batch size %(batch_from)s → %(batch_to)s"): gettext_noop(
        "retry with batch size %(batch_from)s → %(batch_to)s (continues from its last checkpoint)"),
    gettext_noop("retry with batch size %(batch_from)s → %(batch_to)s and accumulation steps %(acc_from)s → "
                 "%(acc_to)s"): gettext_noop(
        "retry with batch size %(batch_from)s → %(batch_to)s and accumulation steps %(acc_from)s → %(acc_to)s "
        "(continues from its last checkpoint)"),
    gettext_noop("requeued after the node stopped"): gettext_noop(
        "requeued after the node stopped (continues from its last checkpoint)"),
    gettext_noop("automatic resume %(n)s/%(limit)s"): gettext_noop(
        "automatic resume %(n)s/%(limit)s (continues from its last checkpoint)"),
}


def _requeue(job: Job, actor: str, message: str, params: dict | None = None) -> bool:
    resume = job.checkpoint_path.exists()
    ok = job.transition(Job.Status.QUEUED, actor, _RESUMING[message] if resume else message, params or {},
                        resume=resume, pid=None, worker_pid=None, node="", devices=[], finished_at=None)
    if ok:
        transaction.on_commit(kick_queue)
    return ok


def resume_job(job: Job, actor) -> Job:
    job.refresh_from_db()
    check_submission_quota(job.owner, job.gpus, None, requeue=True)
    if job.status not in Job.USER_ACTIONS["resume"] or not _requeue(job, _who(actor), "resumed"):
        _refuse(job, "resume")
    return job


def retry_job(job: Job, actor, half_batch: bool = False) -> Job:
    """A failed or interrupted job goes back to the queue, continuing from its last checkpoint when it has one.
    ``half_batch`` (after running out of memory): with half the batch size and twice the accumulation steps, the same
    effective batch in less memory; the engine continues at the same row of its data."""
    job.refresh_from_db()
    check_submission_quota(job.owner, job.gpus, None, requeue=True)
    if job.status not in Job.USER_ACTIONS["retry"]:
        _refuse(job, "retry")
    with transaction.atomic():
        message, params = gettext_noop("retry"), {}
        if half_batch:
            message, params = _halve_batch(job)
        if not _requeue(job, _who(actor), message, params):
            _refuse(job, "retry")  # moved meanwhile: the halved batch rolls back with it
    return job


def _halve_batch(job: Job) -> tuple[str, dict]:
    """Half the job's batch size, twice its accumulation steps, and its memory estimate for that; returns what
    changed, for the job's history (a template and its parameters)."""
    cfg = job.resolved_config
    if not job.batch_can_shrink:
        raise ServiceError(
            _("config.batch_size: the batch size is 1 already; it cannot be halved"), field="config.batch_size"
        )
    changes = tspec.halved_batch(job.stage, cfg)
    resolved = {**cfg, **changes}
    memory = _memory_need(job.stage, resolved, job.teacher_model)[2]["bytes"]
    Job.objects.filter(pk=job.pk).update(config={**job.config, **changes}, resolved_config=resolved,
                                         memory_estimate=memory)
    job.refresh_from_db()
    params = {"batch_from": cfg["batch_size"], "batch_to": changes["batch_size"],
              "acc_from": cfg["accumulation_steps"], "acc_to": changes["accumulation_steps"]}
    if params["acc_from"] == params["acc_to"]:  # PPO takes fewer rollouts per step instead
        return gettext_noop("retry with batch size %(batch_from)s → %(batch_to)s"), params
    return gettext_noop("retry with batch size %(batch_from)s → %(batch_to)s and accumulation steps %(acc_from)s → "
                        "%(acc_to)s"), params


def clone_job(job: Job, actor, name: str | None = None, **changes) -> Job:
    """A new queued job with the same stage, data, models and configuration. ``changes`` (``submit_job``'s
    arguments) edit the copy before it is submitted; a ``config`` there is merged over the job's."""
    if "config" in changes:
        if not isinstance(changes["config"], dict):
            raise ServiceError(_("config: must be a JSON object"), field="config")
        changes["config"] = {**job.config, **changes["config"]}
    return submit_job(**{"owner": actor, "name": name or f"{job.name} (copy)", "stage": job.stage,
                         "dataset": job.dataset_id, "eval_dataset": job.eval_dataset_id, "config": job.config,
                         "base_model": job.base_model_id, "teacher_model": job.teacher_model_id,
                         "tokenizer": job.tokenizer_id, "priority": job.priority, "gpus": job.gpus,
                         "time_limit_s": job.time_limit_s, **changes})


# --- finish and recover ----------------------------------------------------------------------------------------

def finish_job(job: Job, status: str, *, error: str = "", error_params: dict | None = None, output_model=None,
               actor: str = "") -> bool:
    """``error``: the engine's one line as it is, or the portal's own English template (marked with gettext_noop)
    with ``error_params``, which the job's readers see in their language."""
    params = clip_params(error_params)
    return job.transition(status, actor or job.node, error[:500], params, error=error[:4000], error_params=params,
                          pid=None, worker_pid=None, output_model=output_model)


def interrupt_job(job: Job, reason: str, params: dict | None = None, *, counts: bool = True) -> None:
    """The job's process stopped without finishing: mark it interrupted, and requeue it to resume from its last
    checkpoint. After a crash (``counts``) only while the automatic-resume budget (MINICLOUD_AUTO_RESUME, default 1)
    lasts; a clean node shutdown always requeues. One transaction: nobody sees a requeued job as interrupted (its
    history keeps both events)."""
    with transaction.atomic():
        if not job.transition(Job.Status.INTERRUPTED, "system", reason, params or {}, pid=None, worker_pid=None):
            return
        if not counts:
            _requeue(job, "system", gettext_noop("requeued after the node stopped"))
        elif job.auto_resumes < settings.AUTO_RESUME_LIMIT:
            Job.objects.filter(pk=job.pk).update(auto_resumes=F("auto_resumes") + 1)
            job.refresh_from_db()
            _requeue(job, "system", gettext_noop("automatic resume %(n)s/%(limit)s"),
                     {"n": job.auto_resumes, "limit": settings.AUTO_RESUME_LIMIT})


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def die_with_parent(sig):
    """A preexec_fn asking Linux to send ``sig`` to the child when its parent dies (prctl PR_SET_PDEATHSIG)."""

    def set_pdeathsig():
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig), 0, 0, 0)
        except OSError:
            pass

    return set_pdeathsig


def kill_group(pid: int | None, sig: int = signal.SIGKILL) -> None:
    """Signal a process group (a training child, a `serve` child); gone or not ours is not an error."""
    if pid:
        try:
            os.killpg(pid, sig)
        except OSError:
            pass


def reconcile_node(node_name: str, *, starting: bool) -> list[int]:
    """Jobs of this node whose supervisor is gone: stop any orphan training process, then interrupt (and maybe
    requeue) them. At start every live job is orphaned; later (housekeeping) only those whose worker died."""
    done = []
    for job in Job.objects.filter(node=node_name, status__in=Job.LIVE):
        if not starting and _pid_alive(job.worker_pid):
            continue
        kill_group(job.pid)  # nobody reads its events any more
        why = gettext_noop("the node restarted") if starting else gettext_noop("the job's supervisor died")
        _end_orphaned(job, why, gettext_noop("the node stopped while pausing"))
        done.append(job.pk)
    return done


def _end_orphaned(job: Job, reason: str, pausing_reason: str, params: dict | None = None) -> bool:
    """A live job whose supervisor is gone: a cancel completes, a pause completes (resumable from its checkpoint),
    a running job is interrupted with ``reason`` (and maybe requeued). True for the interrupted case."""
    if job.status == Job.Status.CANCELLING:
        finish_job(job, Job.Status.CANCELLED, actor="system")
    elif job.status == Job.Status.PAUSING:
        job.transition(Job.Status.PAUSED, "system", pausing_reason, params or {}, pid=None, worker_pid=None,
                       resume=job.checkpoint_path.exists())
    else:
        interrupt_job(job, reason, params)
        return True
    return False


def register_node(node_name: str) -> Node:
    devices = _local_devices()
    node, _created = Node.objects.update_or_create(
        name=node_name, defaults={"devices": devices, "started_at": timezone.now(), "address": settings.NODE_ADDRESS,
                                  "heartbeat_at": timezone.now(), "stopping": False})
    sample_devices(node_name, devices)
    return node


def beat(node_name: str) -> None:
    """This node's heartbeat (the serve loop of a worker node, every MINICLOUD_HEARTBEAT_S)."""
    Node.objects.filter(name=node_name).update(heartbeat_at=timezone.now(), stopping=False)


def refresh_node(node_name: str) -> None:
    devices = _local_devices()
    Node.objects.filter(name=node_name).update(devices=devices, heartbeat_at=timezone.now())
    sample_devices(node_name, devices)


SAMPLES_KEPT = timedelta(hours=24)


def sample_devices(node_name: str, devices: list[dict]) -> None:
    """Store one compact reading of the node's devices (the devices page charts the last hour); prune old ones."""
    running = {}
    for devs in Job.objects.filter(node=node_name, status__in=Job.LIVE).values_list("devices", flat=True):
        for i in devs or []:
            running[i] = running.get(i, 0) + 1
    readings = []
    for d in devices:
        i = d["index"]
        util = d.get("utilization") if d.get("kind") == "cuda" else (100 if running.get(i) else 0)
        readings.append([i, util, d.get("memory_used"), running.get(i, 0)])
    DeviceSample.objects.create(node=node_name, readings=readings)
    DeviceSample.objects.filter(time__lt=timezone.now() - SAMPLES_KEPT).delete()


def save_template(owner, name: str, fields: dict) -> JobTemplate:
    """Save (or replace) one of the owner's new-job templates."""
    name = clean_name(name, 200)
    template, _created = JobTemplate.objects.update_or_create(owner=owner, name=name,
                                                              defaults={"fields": fields})
    return template


QUEUE_SNAPSHOT_S = 2.0  # how long one planned queue serves every queue page


def queue_snapshot(fresh: bool = False) -> list[dict]:
    """Every queued job in queue order as {"id", "owner_id", "reason", "params", "starts_in"} (reason codes, not
    text: the caller renders them in its visitor's language).

    Planning a queue of 500 jobs takes tens of milliseconds and a lab's 200 people open the queue page, so one plan
    serves every visitor of this process for QUEUE_SNAPSHOT_S seconds, or until a job starts or ends; jobs submitted
    meanwhile join at the next plan (``fresh``: plan now, as a job's own page does when it is not in the plan yet).
    """
    from django.core.cache import cache
    from django.db.models import Count, Sum

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


# --- datasets ------------------------------------------------------------------------------------------------------

def _dataset_store() -> Path:
    path = settings.HOME / "datasets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def create_dataset(*, owner, name: str, kind: str, source, keep_source: bool = False, request=None) -> Dataset:
    """Validate a JSONL(.gz) file and store it as a new immutable dataset version; a bad file is refused with its
    line-numbered errors and nothing is stored. ``source``: a file path (moved into the store unless
    ``keep_source``). The same name again makes the next version; the same content again returns the stored one."""
    import shutil

    from accounts.services import audit, check_storage

    from .validation import validate_file

    name = clean_name(name, 200)
    kinds = dict(Dataset._meta.get_field("kind").choices)
    if kind not in kinds:
        raise ServiceError(_("kind: one of %(kinds)s") % {"kinds": ", ".join(kinds)}, field="kind")
    check_storage(owner, Path(source).stat().st_size)
    report = validate_file(source, kind)
    if not report.ok:
        raise ServiceError(f"file: {report.summary()}", field="file", details={"validation": report.to_dict()})
    latest = Dataset.objects.filter(owner=owner, name=name).order_by("-version").first()
    if latest and latest.sha256 == report.sha256:
        return latest
    with open(source, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    dest = _dataset_store() / f"{report.sha256}.jsonl{'.gz' if gz else ''}"
    if not dest.exists():
        tmp = dest.with_suffix(dest.suffix + ".part")
        if keep_source:
            shutil.copyfile(source, tmp)
        else:
            shutil.move(str(source), tmp)
        os.replace(tmp, dest)
    elif not keep_source:
        Path(source).unlink(missing_ok=True)
    ds = Dataset.objects.create(owner=owner, name=name, kind=kind, path=str(dest), records=report.records,
                                size_bytes=report.size_bytes, sha256=report.sha256,
                                version=(latest.version + 1) if latest else 1, validation=report.to_dict())
    audit(owner, "upload", ds, request=request, sha256=report.sha256, version=ds.version)
    request_dataset_stats(ds)
    return ds


def dataset_references(ds: Dataset) -> list[str]:
    """What uses a dataset version: jobs (any state) and models trained on it."""
    jobs = Job.objects.filter(Q(dataset=ds) | Q(eval_dataset=ds)).order_by("pk")[:50]
    refs = [f"job #{j.pk} {j.name}" for j in jobs]
    refs += [f"model #{m.pk} {m.name}" for m in ModelVersion.objects.filter(dataset=ds).order_by("pk")[:50]]
    return refs


def delete_dataset(actor, ds: Dataset, request=None) -> None:
    """Delete a dataset version nobody uses (its file too, unless another version shares it)."""
    from accounts.services import audit, check_deletable

    check_deletable(actor, ds, "dataset", dataset_references(ds))
    path = Path(ds.path)
    audit(actor, "delete", ds, request=request, name=ds.name, version=ds.version)
    ds.delete()
    if path.parent == _dataset_store() and not Dataset.objects.filter(path=str(path)).exists():
        path.unlink(missing_ok=True)


def request_dataset_stats(ds: Dataset, max_seq_len: int | None = None, tokenizer_id: int | None = None) -> None:
    """Queue the token statistics of a dataset (a background task with progress)."""
    Dataset.objects.filter(pk=ds.pk).update(stats_status="queued", stats_progress=0.0)
    transaction.on_commit(lambda: background_task("jobs.tasks.dataset_stats", ds.pk, max_seq_len, tokenizer_id,
                                                  task_name=f"dataset-stats-{ds.pk}"))


def compute_dataset_stats(ds_id: int, max_seq_len: int | None = None, tokenizer_id: int | None = None) -> None:
    """Run the statistics of one dataset version (the background task), recording progress and the result."""
    from . import dataset_stats

    ds = Dataset.objects.filter(pk=ds_id).first()
    if ds is None:
        return
    tok = Tokenizer.objects.filter(pk=tokenizer_id).first() if tokenizer_id else None
    tok = tok or demo_tokenizer()
    stage = {"pretrain": "pretrain", "sft": "sft", "dpo": "dpo", "rlaif": "grpo"}[ds.kind]
    msl = max_seq_len or tspec.STAGE_DEFAULTS[stage]["max_seq_len"]
    Dataset.objects.filter(pk=ds.pk).update(stats_status="running", stats_progress=0.0)
    cached = None
    if ds.sha256:  # a job already tokenised this dataset with this tokenizer: its exact lengths, no tokenising
        from training import token_cache

        processing = token_cache.PROCESSING[stage]
        cached = token_cache.find(settings.DATA_CACHE_DIR, ds.sha256, token_cache.tokenizer_digest(tok.path),
                                  processing)
    try:
        stats = dataset_stats.compute(ds.path, ds.kind, Path(tok.path) / "tokenizer.json", msl, ds.records,
                                      progress=lambda p: Dataset.objects.filter(pk=ds.pk).update(stats_progress=p),
                                      known_lengths=token_cache.record_lengths(cached) if cached else None)
    except Exception as exc:  # a task must record why, not vanish
        Dataset.objects.filter(pk=ds.pk).update(stats_status="failed", stats={"error": str(exc)[:500]})
        raise
    stats["tokenizer"] = tok.name
    stats["from_token_cache"] = cached is not None
    Dataset.objects.filter(pk=ds.pk).update(stats_status="done", stats_progress=1.0, stats=stats)


def _check_upload_size(n_bytes: int) -> None:
    if n_bytes > settings.UPLOAD_MAX_BYTES:
        raise ServiceError(
            _("file: larger than the upload limit of %(gb)s GB") % {"gb": format(settings.UPLOAD_MAX_BYTES / 1e9, "g")},
            status=413,
            field="file",
        )


def find_upload(owner, upload_id):
    """One of the owner's unfinished uploads, or None (also for an id that is not a UUID)."""
    from django.core.exceptions import ValidationError

    from .models import Upload

    try:
        return Upload.objects.filter(pk=upload_id, owner=owner).first()
    except ValidationError:
        return None


def upload_dataset(request, owner) -> Dataset:
    """A dataset from a multipart request (``file``, ``name``, ``kind``; admins may give ``server_path`` instead of a
    file). The file was streamed to a temporary file by Django's upload handler; too large a request is a 413."""
    _check_upload_size(int(request.META.get("CONTENT_LENGTH") or 0))
    name, kind = request.POST.get("name", ""), request.POST.get("kind", "")
    upload_id = request.POST.get("upload", "").strip()
    if upload_id:  # a chunked upload finished: see start_upload / append_upload
        upload = find_upload(owner, upload_id)
        if upload is None:
            raise ServiceError(
                _("upload: no upload %(upload_id)s of yours") % {"upload_id": upload_id}, status=404, field="upload"
            )
        return finish_upload(upload, name=name, kind=kind, request=request)
    server_path = request.POST.get("server_path", "").strip()
    if server_path:
        if not owner.is_superuser:
            raise ServiceError(
                _("server_path: only admins import files from the server"), status=403, field="server_path"
            )
        path = Path(server_path)
        if not path.is_absolute() or not path.is_file():
            raise ServiceError(
                _("server_path: no file at %(server_path)s") % {"server_path": server_path}, field="server_path"
            )
        return create_dataset(owner=owner, name=name, kind=kind, source=path, keep_source=True, request=request)
    upload = request.FILES.get("file")
    if upload is None:
        raise ServiceError(_("file: attach a .jsonl or .jsonl.gz file"), field="file")
    _check_upload_size(upload.size)
    if not name:
        name = Path(upload.name or "dataset").name.removesuffix(".gz").removesuffix(".jsonl")[:200]
    if hasattr(upload, "temporary_file_path"):  # streamed to disk: validated, then moved into the store
        return create_dataset(owner=owner, name=name, kind=kind, source=upload.temporary_file_path(), request=request)
    import tempfile

    with tempfile.NamedTemporaryFile(dir=settings.FILE_UPLOAD_TEMP_DIR, delete=False) as tmp:
        for chunk in upload.chunks():
            tmp.write(chunk)
    try:
        return create_dataset(owner=owner, name=name, kind=kind, source=tmp.name, request=request)
    finally:
        Path(tmp.name).unlink(missing_ok=True)  # moved into the store, or refused


def start_upload(owner):
    from accounts.services import check_storage

    from .models import Upload

    check_storage(owner)  # refused before the first chunk when the owner's storage is full
    upload = Upload.objects.create(owner=owner)
    upload.path.parent.mkdir(parents=True, exist_ok=True)
    upload.path.touch()
    return upload


def append_upload(upload, offset: int, stream, length: int) -> int:
    """Append one chunk at ``offset`` (which must be the bytes received so far: a client resumes from there)."""
    if offset != upload.size:
        raise ServiceError(
            _("offset: this upload has %(size)s bytes; send from there") % {"size": upload.size},
            status=409,
            field="offset",
            details={"offset": upload.size},
        )
    _check_upload_size(upload.size + length)
    written = 0
    with open(upload.path, "ab") as f:
        for block in iter(lambda: stream.read(1 << 20), b""):
            f.write(block)
            written += len(block)
    type(upload).objects.filter(pk=upload.pk).update(size=upload.size + written)
    upload.size += written
    return upload.size


def finish_upload(upload, *, name: str, kind: str, request=None) -> Dataset:
    """Turn a complete upload into a dataset version (validated; refused files keep the upload for a fix-up)."""
    ds = create_dataset(owner=upload.owner, name=name, kind=kind, source=upload.path, keep_source=True,
                        request=request)
    upload.path.unlink(missing_ok=True)
    upload.delete()
    return ds


def prune_uploads(max_age_h: float = 24) -> int:
    """Forget uploads left unfinished for a day (housekeeping)."""
    from .models import Upload

    old = Upload.objects.filter(created_at__lt=timezone.now() - timedelta(hours=max_age_h))
    for upload in old:
        upload.path.unlink(missing_ok=True)
    return old.delete()[0]
