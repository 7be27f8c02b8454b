"""The model registry: a job's output registered with its lineage and final metrics, evaluations, notes and tags,
references and deletion, loss thumbnails."""
from __future__ import annotations

from pathlib import Path

from django.db.models import Q
from django.utils.translation import gettext as _

from accounts.services import audit, check_deletable
from jobs.models import Job, MetricPoint
from jobs.selectors import metric_history
from jobs.services import submit_job
from minicloud.errors import ServiceError

from ..models import Evaluation, ModelVersion


def next_version(owner, name: str) -> int:
    last = ModelVersion.objects.filter(owner=owner, name=name).order_by("-version").values_list("version", flat=True)
    return (last.first() or 0) + 1


def _parameters(mcfg: dict) -> dict:
    from training.spec import parameter_count

    try:
        return parameter_count(mcfg)
    except (KeyError, TypeError, ZeroDivisionError):
        return {"total": 0, "active": 0}


def final_metrics(job) -> dict:
    """The last value of every metric the job reported (its final loss, eval loss, reward ...)."""
    found: dict = {}
    for values in MetricPoint.objects.filter(job=job).order_by("-seq").values_list("values", flat=True)[:500]:
        for key, value in values.items():
            found.setdefault(key, value)
    return found


def register_job_output(job, *, model_path: str, model_config: dict, parameters: int, lora_path: str = "",
                        adapter_path: str = "") -> ModelVersion:
    """Record a finished job's final weights as a model version, with its lineage and final metrics."""
    path = Path(model_path)
    name = f"{job.name}-{job.stage}"
    return ModelVersion.objects.create(
        name=name, version=next_version(job.owner, name), owner=job.owner, stage=job.stage, job=job,
        parent=job.base_model, dataset=job.dataset, tokenizer=job.tokenizer, config=model_config,
        parameters=parameters, active_parameters=_parameters(model_config)["active"] or parameters,
        path=str(path), lora_path=lora_path, adapter_path=adapter_path, size_bytes=path.stat().st_size,
        metrics=final_metrics(job), source="job", files_bytes=0)  # its weights are in the run folder; no files yet


def record_evaluation(job, metrics: dict) -> Evaluation:
    """Attach a finished ``eval`` job's metrics to the model version it measured."""
    return Evaluation.objects.create(model=job.base_model, job=job, dataset=job.dataset, metrics=metrics)


def start_evaluation(*, owner, mv: ModelVersion, dataset, config: dict | None = None):
    """Queue an ``eval`` job for a model version on a dataset (it waits in the fair queue like any job)."""

    if not isinstance(config or {}, dict):
        raise ServiceError(_("config: a JSON object"), field="config")
    allowed = {"eval_records", "accuracy_tasks", "max_gen_len", "max_seq_len", "batch_size"}
    unknown = sorted(set(config or {}) - allowed)
    if unknown:
        raise ServiceError(
            _("config.%(key)s: not an evaluation setting (%(allowed)s)")
            % {"key": unknown[0], "allowed": ", ".join(sorted(allowed))},
            field=f"config.{unknown[0]}",
        )
    return submit_job(owner=owner, name=f"eval {mv.name} v{mv.version}", stage="eval", dataset=dataset,
                      base_model=mv, config=config or {})


def evaluation_table(evaluations) -> dict:
    """Evaluations as rows (model version, dataset) × the metric columns any of them has."""
    evaluations = list(evaluations)
    columns = [m for m in Evaluation.METRICS if any(m in e.metrics for e in evaluations)]
    rows = [{"evaluation": e, "values": [e.metrics.get(c) for c in columns]} for e in evaluations]
    return {"columns": columns, "rows": rows}


def update_model(actor, mv: ModelVersion, *, notes=None, tags=None) -> ModelVersion:
    if not ModelVersion.objects.manageable_by(actor).filter(pk=mv.pk).exists():
        raise ServiceError(_("only the owner can edit this model"), status=403)
    if notes is not None:
        if not isinstance(notes, str) or len(notes) > 20_000:
            raise ServiceError(_("notes: text up to 20000 characters"), field="notes")
        mv.notes = notes
    if tags is not None:
        if isinstance(tags, str):
            tags = [t for t in (x.strip() for x in tags.split(",")) if t]
        if not isinstance(tags, list) or len(tags) > 20 or not all(isinstance(t, str) and 0 < len(t) <= 40
                                                                    for t in tags):
            raise ServiceError(_("tags: up to 20 tags of 1 to 40 characters"), field="tags")
        mv.tags = list(dict.fromkeys(tags))
    mv.save(update_fields=["notes", "tags"])
    return mv


def model_references(mv: ModelVersion) -> list[str]:
    """What still needs this model: jobs that start from it, learn from it or are rewarded by it (a PPO/GRPO job
    keeps the reward model's folder in its resolved config, not as a foreign key), and models derived from it."""

    uses = Q(base_model=mv) | Q(teacher_model=mv)
    if mv.source == "reward":
        uses |= Q(resolved_config__reward_model_path=mv.path)
    jobs = Job.objects.filter(uses).order_by("pk")[:50]
    refs = [f"job #{j.pk} {j.name}" for j in jobs]
    refs += [f"model #{m.pk} {m.name} v{m.version}" for m in mv.children.order_by("pk")[:50]]
    return refs


def delete_model(actor, mv: ModelVersion, request=None) -> None:
    """Delete a model version nothing depends on, with its files (the owner's storage shrinks accordingly)."""
    import shutil


    check_deletable(actor, mv, model_references(mv))
    files = [Path(p) for p in (mv.path, mv.lora_path) if p]
    folders = [mv.files_dir] + ([Path(mv.adapter_path)] if mv.adapter_path else [])
    audit(actor, "delete", mv, request=request, name=mv.name, version=mv.version)
    mv.delete()
    for f in files:
        if f.is_dir():  # a reward model's path is its Hugging Face folder
            folders.append(f)
        else:
            f.unlink(missing_ok=True)
    for d in folders:
        shutil.rmtree(d, ignore_errors=True)


def lineage(mv: ModelVersion, user) -> dict:
    """The model's ancestors (oldest first) and its descendants as a tree, limited to what ``user`` may see."""
    visible = set(ModelVersion.objects.visible_to(user).values_list("pk", flat=True))
    ancestors, node, seen = [], mv.parent, {mv.pk}
    while node is not None and node.pk not in seen and len(ancestors) < 50:
        seen.add(node.pk)
        ancestors.insert(0, node if node.pk in visible else None)
        node = node.parent

    def tree(m, depth=0):
        kids = [c for c in m.children.order_by("created_at") if c.pk in visible] if depth < 10 else []
        return {"model": m, "children": [tree(c, depth + 1) for c in kids]}

    return {"ancestors": ancestors, "descendants": tree(mv)["children"]}


def loss_thumbnail(mv: ModelVersion, width: int = 240, height: int = 60, points: int = 80) -> str:
    """An SVG polyline of the training job's loss (empty when there is none)."""
    if not mv.job_id:
        return ""
    series = [(p["step"], p["values"]["loss"]) for p in metric_history(mv.job, max_points=points)
              if isinstance(p["values"].get("loss"), (int, float))]
    if len(series) < 2:
        return ""
    xs, ys = [s for s, _ in series], [v for _, v in series]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - 4) / ((x1 - x0) or 1)
    sy = (height - 4) / ((y1 - y0) or 1)
    return " ".join(f"{2 + (x - x0) * sx:.1f},{height - 2 - (y - y0) * sy:.1f}" for x, y in series)
