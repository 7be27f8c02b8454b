"""Submitting a job: the request checked field by field, its memory estimate, the job row and its first event;
templates."""
from __future__ import annotations

from functools import partial

from django.conf import settings
from django.db import transaction
from django.utils.translation import gettext as _

from minicloud.db.writes import add, together
from minicloud.errors import ServiceError, clean_name, whole_number
from training import spec as tspec
from training.estimate import estimate_memory

from .. import scheduler
from ..models import Dataset, Job, JobEvent, JobTemplate
from .queue import device_state, kick_queue, node_devices
from .quota import check_submission_quota
from .reasons import never_fits_text, spec_error_text

# A job's inputs that models_registry owns (above jobs in the layer order, docs/architecture.md), reached through the
# job's own foreign keys as Django resolves them: the schema names them, no code of models_registry is used.
ModelVersion = Job._meta.get_field("base_model").related_model
Tokenizer = Job._meta.get_field("tokenizer").related_model


def record_event(job: Job, kind: str, actor: str = "", message: str = "") -> None:
    add(JobEvent(job=job, kind=kind, actor=actor, message=message))


def _model_version(value, field, owner):
    """A ModelVersion given as an instance, an id the owner can use, or nothing."""
    if value is None or isinstance(value, ModelVersion):
        return value
    mv = ModelVersion.objects.usable_by(owner, value, field)
    if mv is not None and mv.source == "reward":
        raise ServiceError(_("%(field)s: %(name)s is a reward model, not a language model")
                           % {"field": field, "name": str(mv)}, field=field)
    return mv


def _reward_model_config(owner, config: dict) -> dict:
    """The config the engine gets: ``reward_model`` (the registry id of a reward model the owner may use, resolved
    through the same visibility rule as every object a request names) becomes the engine's ``reward_model_path``.
    A folder on the server is never a member's to name: the training process reads it with the portal's rights, so
    anyone could name another user's folder, and its error would say what exists there (admins may)."""
    config = dict(config)
    if config.get("reward_model_path") and not owner.is_superuser:
        raise ServiceError(_("config.reward_model_path: only admins name a folder on the server; give "
                             "config.reward_model, the id of a reward model in the registry"), status=403,
                           field="config.reward_model_path")
    if "reward_model" not in config:
        return config
    reward = ModelVersion.objects.usable_by(owner, config.pop("reward_model"), "config.reward_model")
    if reward is not None and reward.source != "reward":
        raise ServiceError(_("config.reward_model: %(name)s is not a reward model (import a Hugging Face "
                             "sequence-classification folder)") % {"name": str(reward)}, field="config.reward_model")
    if reward is not None:
        config["reward_model_path"] = reward.path
    return config


def prepare_job(*, owner, name: str, stage: str, dataset, config: dict | None = None, base_model=None,
                teacher_model=None, tokenizer=None, priority: int = 0, gpus: int = 1,
                time_limit_s: int | None = None, eval_dataset=None, estimate: dict | None = None,
                notify=None, trackers=None) -> dict:
    """Validate a job request; returns the Job fields. Raises ServiceError naming the first bad field.

    ``estimate``, when given, receives the memory estimate (bytes and parts), whether the devices are GPUs and the
    nodes that could run the job (the live ones, else this one)."""
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
        tok = base.tokenizer if base and base.tokenizer else Tokenizer.demo()
    if tok is None:
        raise ServiceError(_("tokenizer: none given and the demo tokenizer is not installed"), field="tokenizer")
    if tok.status != "ready":
        raise ServiceError(
            _("tokenizer: %(name)s is %(status)s, not ready") % {"name": tok.name, "status": tok.status},
            field="tokenizer",
        )
    engine_config = _reward_model_config(owner, config or {})
    try:
        # A base model fixes the architecture: its keys replace any the job's config gives.
        arch = {k: v for k, v in (base.config if base else {}).items() if k in tspec.MODEL_DEFAULTS}
        resolved = tspec.resolve_config(stage, {**engine_config, **arch})
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
        estimate.update(memory=memory_parts, cuda=cuda, nodes=list(nodes))
    # under the Slurm executor the cluster's nodes are Slurm's to know: sbatch refuses what none of them could run
    why = None if settings.EXECUTOR == "slurm" else scheduler.never_fits(nodes, gpus, memory)
    if why:
        field = "gpus" if why[0] == "gpus" else "config.batch_size"
        raise ServiceError(
            _("%(field)s: this job can never start: it %(reason)s") % {"field": field, "reason": never_fits_text(*why)},
            field=field,
        )
    return dict(owner=owner, name=name, stage=stage, dataset=ds, eval_dataset=eval_ds, base_model=base,
                teacher_model=teacher, tokenizer=tok,
                config=config or {}, resolved_config=resolved, priority=priority, gpus=gpus,
                time_limit_s=time_limit_s, memory_estimate=memory, notify=_notify_events(notify),
                trackers=_trackers(owner, trackers))


def _notify_events(notify):
    """None (the owner's own choice) or a list of events this job tells of."""
    from ..models import NOTIFY_EVENTS

    if notify is None:
        return None
    if not isinstance(notify, list) or any(e not in NOTIFY_EVENTS for e in notify):
        raise ServiceError(_("notify: a list of events among %(events)s (or null: your own settings)")
                           % {"events": ", ".join(NOTIFY_EVENTS)}, field="notify")
    return list(dict.fromkeys(notify))


TRACKER_MODES = ("auto", "online", "offline")


def _trackers(owner, trackers) -> dict:
    """``{"wandb": {"project", "mode"}, "swanlab": {...}}``: checked, defaults filled in. Online logging needs the
    owner's key (Notifications and trackers page); ``auto`` logs online when a key and the network are there."""
    from ..models import Integrations

    if not trackers:
        return {}
    if not isinstance(trackers, dict) or any(k not in ("wandb", "swanlab") for k in trackers):
        raise ServiceError(_("trackers: an object with wandb and/or swanlab"), field="trackers")
    out = {}
    for name, opts in trackers.items():
        opts = opts if isinstance(opts, dict) else {}
        project = str(opts.get("project") or "minicloud").strip()[:100]
        mode = opts.get("mode", "auto")
        if mode not in TRACKER_MODES:
            raise ServiceError(_("trackers.%(name)s.mode: one of %(modes)s") % {
                "name": name, "modes": ", ".join(TRACKER_MODES)}, field=f"trackers.{name}.mode")
        if mode == "online" and not getattr(Integrations.objects.filter(user=owner).first(), f"{name}_key", ""):
            raise ServiceError(_("trackers.%(name)s: online logging needs your API key (Notifications and "
                                 "trackers page), or choose offline") % {"name": name}, field=f"trackers.{name}")
        out[name] = {"project": project, "mode": mode}
    return out


def _devices_that_could_run() -> dict:
    """Every node's devices as the scheduler sees them idle (no live node yet: this machine's)."""
    return device_state(jobs=False) or {settings.NODE_NAME: node_devices(settings.NODE_NAME)}


def largest_device_memory() -> int | None:
    """The most memory one device of any node has (GPU memory, or RAM for a CPU slot); None when unknown."""
    sizes = [d.memory_total for devs in _devices_that_could_run().values() for d in devs if d.memory_total]
    return max(sizes) if sizes else None


def _memory_need(stage: str, resolved: dict, teacher) -> tuple[dict, bool, dict]:
    """What could ever run a job, not what runs now; whether those are GPUs; the job's memory estimate per device
    (bytes and parts)."""
    nodes = _devices_that_could_run()
    cuda = any(d.kind == "cuda" for devs in nodes.values() for d in devs) or (
        settings.EXECUTOR == "slurm" and bool(settings.SLURM_GRES))  # Slurm's nodes: GPUs unless a CPU partition
    teacher_cfg = {k: v for k, v in teacher.config.items() if k in tspec.MODEL_DEFAULTS} if teacher else None
    return nodes, cuda, estimate_memory(stage, resolved, teacher_cfg, cuda=cuda)


def submit_job(*, http_request=None, audit_detail: dict | None = None, **request) -> Job:
    """Validate and queue a job (``prepare_job``'s arguments: ``dataset``/``base_model``/``tokenizer`` are ids or
    model instances); with ``http_request``, audited (``audit_detail``) in the same transaction.

    One write transaction in all: the job, its event, the audit entry and, with the database as the task broker
    (no Redis), the token that asks the nodes to claim, which becomes visible with the job (with Redis, sent once
    the job is committed). Under a burst on SQLite every write transaction queues for the one writer: four of them
    per submission made ten people submitting at once wait 1-2 s (docs/performance.md). On PostgreSQL its statements
    are pipelined (``minicloud.db.writes.together``): three round trips, not five."""
    from accounts.services import audit

    checked = {}
    fields = prepare_job(**request, estimate=checked)
    kick = partial(kick_queue, checked["nodes"])  # the nodes prepare_job read, not read again
    with together():
        job = Job.objects.create(**fields)
        record_event(job, "submitted", fields["owner"].username)
        if http_request is not None:
            audit(fields["owner"], "submit", job, request=http_request, **(audit_detail or {}))
        if settings.REDIS_URL:
            transaction.on_commit(kick)
        else:
            kick()
    return job


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


def save_template(owner, name: str, fields: dict) -> JobTemplate:
    """Save (or replace) one of the owner's new-job templates."""
    name = clean_name(name, 200)
    template, _created = JobTemplate.objects.update_or_create(owner=owner, name=name,
                                                              defaults={"fields": fields})
    return template
