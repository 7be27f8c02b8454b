"""Registering models and tokenizers. No torch here: the engine writes the files, the portal records them."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from django.utils.translation import gettext as _

from .models import Evaluation, ModelVersion, Tokenizer


def vocab_size_of(folder: Path) -> int:
    data = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    return len(data["model"]["vocab"]) + sum(1 for t in data.get("added_tokens", [])
                                             if t["content"] not in data["model"]["vocab"])


def register_tokenizer(*, name: str, path: Path, owner=None, is_public=False) -> Tokenizer:
    tok, _created = Tokenizer.objects.update_or_create(
        name=name, owner=owner, defaults={"path": str(path), "is_public": is_public, "vocab_size": vocab_size_of(path)}
    )
    return tok


def demo_tokenizer() -> Tokenizer | None:
    return Tokenizer.objects.filter(name="demo-tokenizer", is_public=True).first()


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
    from jobs.models import MetricPoint

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
        metrics=final_metrics(job), source="job")


def record_evaluation(job, metrics: dict) -> Evaluation:
    """Attach a finished ``eval`` job's metrics to the model version it measured."""
    return Evaluation.objects.create(model=job.base_model, job=job, dataset=job.dataset, metrics=metrics)


def start_evaluation(*, owner, mv: ModelVersion, dataset, config: dict | None = None):
    """Queue an ``eval`` job for a model version on a dataset (it waits in the fair queue like any job)."""
    from jobs.services import submit_job

    from minicloud.errors import ServiceError

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


def download_name(mv: ModelVersion, fmt: str = "pth") -> str:
    hidden = mv.config.get("hidden_size", "")
    moe = "_moe" if mv.config.get("use_moe") else ""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in mv.name)
    base = f"{safe}_v{mv.version}_{hidden}{moe}"
    return {"pth": f"{base}.pth", "hf": f"{base}_hf.zip", "lora": f"{base}_lora.zip"}[fmt]


# --- the engine, run as a subprocess (no torch in a Django process) ----------------------------------------------

ENGINE_TIMEOUT_S = 1800


def run_engine(*args, timeout: int = ENGINE_TIMEOUT_S) -> dict:
    """``python -m training ARGS`` → its JSON report; its one-line error becomes a ServiceError (400)."""
    import subprocess
    import sys

    from django.conf import settings

    from minicloud.errors import ServiceError

    try:
        out = subprocess.run([sys.executable, "-m", "training", *map(str, args)], cwd=settings.BASE_DIR,
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ServiceError(
            _("the conversion took longer than %(timeout)s s") % {"timeout": timeout}, status=504
        ) from None
    lines = out.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        report = {}
    if out.returncode != 0 or "error" in report or not report:
        message = report.get("error") or (out.stderr.strip().splitlines() or ["the engine failed"])[-1]
        raise ServiceError(message[:500], status=400)
    return report


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


class _Lock:
    """An exclusive lock file: one conversion of a model at a time, across processes and nodes."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()


def _zip_folder(folder: Path, out: Path, prefix: str = "") -> Path:
    import zipfile

    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f"{prefix}{f.relative_to(folder)}")
    tmp.replace(out)
    return out


def _record_verification(mv: ModelVersion, fmt: str, report: dict) -> None:
    from django.utils import timezone

    mv.verifications = {**ModelVersion.objects.get(pk=mv.pk).verifications,
                        fmt: {**report["verification"], "checked_at": timezone.now().isoformat()}}
    ModelVersion.objects.filter(pk=mv.pk).update(verifications=mv.verifications)


def hf_zip(mv: ModelVersion) -> Path:
    """The Hugging Face folder of a model, zipped: converted on first request (verified by logits), then cached."""
    import shutil

    from minicloud.errors import ServiceError

    out = mv.files_dir / "hf.zip"
    with _Lock(mv.files_dir / ".lock"):
        if out.exists():
            return out
        folder = mv.files_dir / "hf"
        shutil.rmtree(folder, ignore_errors=True)
        config = _write_json(mv.files_dir / "config.json", mv.config)
        args = ["convert", "hf", mv.pth_path, folder, "--config", config]
        if mv.tokenizer_id and mv.tokenizer.status == "ready":
            args += ["--tokenizer", mv.tokenizer.path]
        report = run_engine(*args)
        _record_verification(mv, "hf", report)
        if not report["verification"]["ok"]:
            raise ServiceError(
                _("conversion check failed: logits differ by %(max_abs_diff)s (> %(tolerance)s)")
                % {
                    "max_abs_diff": format(report["verification"]["max_abs_diff"], ".3g"),
                    "tolerance": format(report["verification"]["tolerance"], "g"),
                },
                status=500,
            )
        _zip_folder(folder, out)
        shutil.rmtree(folder, ignore_errors=True)
    return out


def lora_zip(mv: ModelVersion) -> Path:
    """A zip of the LoRA outputs: MiniMind's LoRA .pth and the peft adapter folder (built once, kept)."""
    import zipfile

    out = mv.files_dir / "lora.zip"
    with _Lock(mv.files_dir / ".lock"):
        if not out.exists():
            tmp = out.with_suffix(".tmp")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
                zf.write(mv.lora_path, download_name(mv).replace(".pth", "_lora.pth"))
                for f in sorted(Path(mv.adapter_path).rglob("*")) if mv.adapter_path else []:
                    if f.is_file():
                        zf.write(f, f"adapter/{f.relative_to(mv.adapter_path)}")
            tmp.replace(out)
    return out


def format_file(mv: ModelVersion, fmt: str) -> Path:
    """The file to download for ``fmt`` (pth, hf or lora), produced on demand and cached."""
    from minicloud.errors import ServiceError

    if fmt not in ("pth", "hf", "lora"):
        raise ServiceError(_("format: %(fmt)s is not one of pth, hf, lora") % {"fmt": repr(fmt)}, field="format")
    if fmt == "lora" and not mv.lora_path:
        raise ServiceError(
            _("format: model %(pk)s has no LoRA adapter (only LoRA jobs make one)") % {"pk": mv.pk}, field="format"
        )
    if not mv.pth_path.exists():
        raise ServiceError(_("the weights file of model %(pk)s is missing on disk") % {"pk": mv.pk}, status=404)
    return {"pth": lambda: mv.pth_path, "hf": lambda: hf_zip(mv), "lora": lambda: lora_zip(mv)}[fmt]()


# --- import, merge, edit, delete -------------------------------------------------------------------------------

def _save_upload(upload, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as f:
        for chunk in upload.chunks():
            f.write(chunk)
    return dest


def _extract_zip(src: Path, dest: Path) -> Path:
    """Unpack a zipped Hugging Face folder safely (no paths outside ``dest``, bounded size); the folder that holds
    config.json."""
    import zipfile

    from django.conf import settings

    from minicloud.errors import ServiceError

    try:
        zf = zipfile.ZipFile(src)
    except zipfile.BadZipFile:
        raise ServiceError(
            _("file: neither a MiniMind .pth nor a zip of a Hugging Face folder"), field="file"
        ) from None
    with zf:
        members = zf.infolist()
        if len(members) > 2000 or sum(m.file_size for m in members) > settings.UPLOAD_MAX_BYTES:
            raise ServiceError(_("file: the zip is too large when unpacked"), status=413, field="file")
        root = dest.resolve()
        for m in members:
            target = (dest / m.filename).resolve()
            if root not in target.parents and target != root:
                raise ServiceError(
                    _("file: unsafe path in the zip: %(filename)s") % {"filename": m.filename}, field="file"
                )
        zf.extractall(dest)
    configs = sorted(dest.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise ServiceError(_("file: the zip has no config.json (a Hugging Face model folder has one)"), field="file")
    return configs[0].parent


def _is_hf_zip(path: Path) -> bool:
    """A zip with a config.json in it (``torch.save`` files are zips too, but hold ``data.pkl`` and no config)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.rsplit("/", 1)[-1] == "config.json" for n in names) or not any(n.endswith("data.pkl")
                                                                                  for n in names)


def _tokenizer_for_import(owner, name: str, folder: Path | None, tokenizer_json, tokenizer_config, tokenizer_id,
                          vocab_size: int, request=None) -> Tokenizer:
    from minicloud.errors import ServiceError

    if tokenizer_json is not None or tokenizer_config is not None:
        return upload_tokenizer(owner=owner, name=_free_tokenizer_name(owner, name), tokenizer_json=tokenizer_json,
                                tokenizer_config=tokenizer_config, request=request)
    if folder is not None and (folder / "tokenizer.json").exists() and (folder / "tokenizer_config.json").exists():
        from django.core.files import File

        with open(folder / "tokenizer.json", "rb") as tj, open(folder / "tokenizer_config.json", "rb") as tc:
            return upload_tokenizer(owner=owner, name=_free_tokenizer_name(owner, name), tokenizer_json=File(tj),
                                    tokenizer_config=File(tc), request=request)
    if tokenizer_id:
        tok = Tokenizer.objects.visible_to(owner).filter(pk=tokenizer_id, status="ready").first()
        if tok is None:
            raise ServiceError(_("tokenizer: one you can use"), field="tokenizer")
    else:
        tok = demo_tokenizer()
        if tok is None:
            raise ServiceError(_("tokenizer: send tokenizer_json and tokenizer_config"), field="tokenizer_json")
    if tok.vocab_size > vocab_size:
        raise ServiceError(
            _(
                "tokenizer: %(name)s has %(vocab_size)s tokens but the model only %(model_vocab)s; "
                "send the model's own tokenizer_json and tokenizer_config"
            )
            % {"name": tok.name, "vocab_size": tok.vocab_size, "model_vocab": vocab_size},
            field="tokenizer_json",
        )
    return tok


def _free_tokenizer_name(owner, name: str) -> str:
    base = f"{name}-tokenizer"[:90]
    taken = set(Tokenizer.objects.filter(owner=owner, name__startswith=base).values_list("name", flat=True))
    return next(n for n in [base] + [f"{base}-{i}" for i in range(2, 1000)] if n not in taken)


def import_model(*, owner, name: str, upload, config=None, tokenizer_json=None, tokenizer_config=None,
                 tokenizer_id=None, request=None) -> ModelVersion:
    """Register an existing model: a MiniMind ``.pth`` (with its MiniMind config) or a zipped Hugging Face folder
    of a MiniMind/Qwen3 model. The engine checks it strictly (and verifies a folder's conversion by logits)."""
    import shutil
    import uuid

    from django.conf import settings
    from django.db import transaction

    from accounts.services import audit, check_storage
    from jobs.services import _check_upload_size
    from minicloud.api import strict_loads
    from minicloud.errors import ServiceError, clean_name

    name = clean_name(name, 200)
    if upload is None:
        raise ServiceError(_("file: send a MiniMind .pth or a zipped Hugging Face folder"), field="file")
    _check_upload_size(upload.size)
    check_storage(owner, upload.size)
    if isinstance(config, str):
        try:
            config = strict_loads(config) if config.strip() else {}
        except ValueError as exc:
            raise ServiceError(_("config: not valid JSON (%(msg)s)") % {"msg": getattr(exc, "msg", exc)},
                               field="config") from None
    if config is not None and not isinstance(config, dict):
        raise ServiceError(_("config: a JSON object of MiniMind config names"), field="config")
    work = settings.HOME / "models" / f"import-{uuid.uuid4().hex}"
    try:
        src = _save_upload(upload, work / "upload")
        weights = work / "model.pth"
        folder = None
        if _is_hf_zip(src):
            folder = _extract_zip(src, work / "hf")
            report = run_engine("convert", "pth", folder, weights)
            if not report["verification"]["ok"]:
                raise ServiceError(_("the imported weights do not reproduce the folder's logits"), status=400)
        else:
            if not config:
                raise ServiceError(
                    _("config: a .pth needs its MiniMind config (hidden_size, num_hidden_layers, use_moe, ...)"),
                    field="config",
                )
            src.rename(weights)
            report = run_engine("inspect", weights, "--config", _write_json(work / "config.json", config))
        mcfg = report["config"]
        params = _parameters(mcfg)
        tok = _tokenizer_for_import(owner, name, folder, tokenizer_json, tokenizer_config, tokenizer_id,
                                    mcfg["vocab_size"], request)
        with transaction.atomic():
            mv = ModelVersion.objects.create(
                name=name, version=next_version(owner, name), owner=owner, stage="import", source="import",
                tokenizer=tok, config=mcfg, parameters=params["total"], active_parameters=params["active"],
                path="", size_bytes=weights.stat().st_size,
                verifications={"pth": report["verification"]} if "verification" in report else {})
            mv.files_dir.mkdir(parents=True, exist_ok=True)
            final = mv.files_dir / "model.pth"
            weights.replace(final)
            ModelVersion.objects.filter(pk=mv.pk).update(path=str(final))
            mv.path = str(final)
        audit(owner, "model_import", mv, request=request, kind="hf" if folder else "pth")
        return mv
    finally:
        shutil.rmtree(work, ignore_errors=True)


def merge_lora(*, owner, mv: ModelVersion, request=None) -> ModelVersion:
    """A LoRA version's MiniMind LoRA ``.pth`` merged into its base: a new full model version (lineage: base →
    LoRA → merged), verified against the unmerged forward."""
    from django.db import transaction

    from accounts.services import audit, check_storage
    from minicloud.errors import ServiceError

    if not mv.lora_path:
        raise ServiceError(_("model %(pk)s is not a LoRA version (nothing to merge)") % {"pk": mv.pk}, status=409)
    base = mv.parent
    if base is None or not base.pth_path.exists():
        raise ServiceError(_("the LoRA's base model is gone; it cannot be merged"), status=409)
    check_storage(owner, base.pth_path.stat().st_size)  # the merged model is about as large as its base
    with transaction.atomic():
        name = f"{mv.name}-merged"
        merged = ModelVersion.objects.create(
            name=name, version=next_version(owner, name), owner=owner, stage=mv.stage, source="merge", parent=mv,
            dataset=mv.dataset, tokenizer=mv.tokenizer, config=base.config, parameters=base.parameters,
            active_parameters=base.active_parameters, path="")
    try:
        out = merged.files_dir / "model.pth"
        merged.files_dir.mkdir(parents=True, exist_ok=True)
        report = run_engine("merge-lora", base.pth_path, mv.lora_path, out, "--config",
                            _write_json(merged.files_dir / "config.json", base.config))
    except Exception:
        merged.delete()
        raise
    ModelVersion.objects.filter(pk=merged.pk).update(
        path=str(out), size_bytes=out.stat().st_size, config=report["config"],
        verifications={"merge": {**report["verification"], "adapted_modules": report["adapted_modules"],
                                 "rank": report["rank"]}})
    merged.refresh_from_db()
    audit(owner, "model_merge", merged, request=request, lora=mv.pk, base=base.pk)
    return merged


def update_model(actor, mv: ModelVersion, *, notes=None, tags=None) -> ModelVersion:
    from minicloud.errors import ServiceError

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
    """What still needs this model: jobs that start from it or learn from it, and models derived from it."""
    from django.db.models import Q

    from jobs.models import Job

    jobs = Job.objects.filter(Q(base_model=mv) | Q(teacher_model=mv)).order_by("pk")[:50]
    refs = [f"job #{j.pk} {j.name}" for j in jobs]
    refs += [f"model #{m.pk} {m.name} v{m.version}" for m in mv.children.order_by("pk")[:50]]
    return refs


def delete_model(actor, mv: ModelVersion, request=None) -> None:
    """Delete a model version nothing depends on, with its files (the owner's storage shrinks accordingly)."""
    import shutil

    from accounts.services import audit, check_deletable

    check_deletable(actor, mv, "model", model_references(mv))
    files = [Path(p) for p in (mv.path, mv.lora_path) if p]
    folders = [mv.files_dir] + ([Path(mv.adapter_path)] if mv.adapter_path else [])
    audit(actor, "delete", mv, request=request, name=mv.name, version=mv.version)
    mv.delete()
    for f in files:
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
    from jobs.selectors import metric_history

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


# --- tokenizers as first-class objects ----------------------------------------------------------------------------

MINIMIND_IDS = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}


def _tokenizer_dir() -> Path:
    import uuid

    from django.conf import settings

    path = settings.HOME / "tokenizers" / uuid.uuid4().hex
    path.mkdir(parents=True)
    return path


def check_tokenizer_files(folder: Path) -> str | None:
    """Why a tokenizer folder cannot be used by MiniCloud's models, or None."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # the library raises plain Exceptions for bad files
        return f"tokenizer.json: not a tokenizers file ({str(exc)[:200]})"
    for i, token in MINIMIND_IDS.items():
        if tok.id_to_token(i) != token:
            return (f"tokenizer.json: id {i} must be {token} (MiniMind's layout: pad, bos, eos), "
                    f"not {tok.id_to_token(i)!r}")
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return f"tokenizer_config.json: not valid JSON ({exc})"
    if not isinstance(config, dict):
        return "tokenizer_config.json: must be a JSON object"
    return None


def _new_tokenizer_name(owner, name: str) -> str:
    """A valid name that the owner has not used for a tokenizer yet."""
    from minicloud.errors import ServiceError, clean_name

    name = clean_name(name, 100)
    if Tokenizer.objects.filter(owner=owner, name=name).exists():
        raise ServiceError(
            _("name: you already have a tokenizer called %(name)s") % {"name": repr(name)}, field="name", status=409
        )
    return name


def upload_tokenizer(*, owner, name: str, tokenizer_json, tokenizer_config, request=None) -> Tokenizer:
    """Store an uploaded tokenizer (tokenizer.json + tokenizer_config.json, e.g. MiniMind's own). A config without a
    chat template gets MiniMind's (training/chat_template.jinja)."""
    import shutil

    from accounts.services import audit
    from minicloud.errors import ServiceError
    from training.tokenizer import CHAT_TEMPLATE

    name = _new_tokenizer_name(owner, name)
    if tokenizer_json is None or tokenizer_config is None:
        raise ServiceError(_("files: send tokenizer_json and tokenizer_config"), field="tokenizer_json")
    folder = _tokenizer_dir()
    for upload, filename in ((tokenizer_json, "tokenizer.json"), (tokenizer_config, "tokenizer_config.json")):
        with open(folder / filename, "wb") as f:
            for chunk in upload.chunks():
                f.write(chunk)
    problem = check_tokenizer_files(folder)
    if problem:
        shutil.rmtree(folder, ignore_errors=True)
        raise ServiceError(problem, field="tokenizer_json")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    if not config.get("chat_template"):
        config["chat_template"] = CHAT_TEMPLATE
        (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2),
                                                      encoding="utf-8")
    tok = register_tokenizer(name=name, path=folder, owner=owner)
    audit(owner, "tokenizer_upload", tok, request=request)
    return tok


def start_tokenizer_training(*, owner, name: str, dataset, vocab_size: int = 6400, request=None) -> Tokenizer:
    """Queue the training of a byte-level BPE tokenizer (MiniMind's reserved ids and chat template) on a dataset."""
    from django.db import transaction

    from accounts.services import audit
    from jobs.services import background_task
    from minicloud.errors import ServiceError

    name = _new_tokenizer_name(owner, name)
    if not isinstance(vocab_size, int) or not 300 <= vocab_size <= 200_000:
        raise ServiceError(_("vocab_size: between 300 and 200000"), field="vocab_size")
    tok = Tokenizer.objects.create(name=name, owner=owner, path="", status="training", trained_on=dataset,
                                   vocab_size=vocab_size)
    audit(owner, "tokenizer_train", tok, request=request, dataset=dataset.pk, vocab_size=vocab_size)
    transaction.on_commit(lambda: background_task("models_registry.tasks.train_tokenizer", tok.pk,
                                                  task_name=f"tokenizer-{tok.pk}"))
    return tok


def train_tokenizer_now(tokenizer_id: int, max_records: int = 200_000) -> None:
    """The background part: read the dataset's texts (the first ``max_records`` records), train, register."""
    from jobs.validation import open_text, record_text
    from training.tokenizer import train_tokenizer

    tok = Tokenizer.objects.select_related("trained_on").get(pk=tokenizer_id)
    ds = tok.trained_on

    def texts():
        with open_text(ds.path) as f:
            for i, line in enumerate(f):
                if i >= max_records:
                    return
                if line.strip():
                    yield record_text(ds.kind, json.loads(line))

    try:
        folder = _tokenizer_dir()
        train_tokenizer(texts(), folder, vocab_size=tok.vocab_size)
    except Exception as exc:  # the task records why instead of vanishing
        Tokenizer.objects.filter(pk=tok.pk).update(status="failed", error=str(exc)[:2000])
        raise
    Tokenizer.objects.filter(pk=tok.pk).update(path=str(folder), status="ready", vocab_size=vocab_size_of(folder))


def encode(tok: Tokenizer, text: str) -> dict:
    """The playground: how a text splits into tokens and ids."""
    from training.tokenizer import load_tokenizer

    from minicloud.errors import ServiceError

    if tok.status != "ready":
        raise ServiceError(_("tokenizer %(name)s is %(status)s") % {"name": tok.name, "status": tok.get_status_display()},
                           status=409)
    hf = load_tokenizer(tok.path)
    enc = hf.encode(text[:20_000], add_special_tokens=False)
    pieces, fragments = [], []
    for n, i in enumerate(enc.ids):
        piece = hf.decode([i], skip_special_tokens=False)
        if "\ufffd" in piece:  # a byte-level token holding part of a character's UTF-8 bytes
            piece = _byte_notation(hf.id_to_token(i))
            fragments.append(n)
        pieces.append(piece)
    return {"ids": enc.ids, "pieces": pieces, "fragments": fragments, "count": len(enc.ids),
            "characters": len(text[:20_000])}


@functools.cache
def _byte_of_character() -> dict:
    """GPT-2's byte-level alphabet inverted: the byte each of its 256 printable characters stands for."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _byte_notation(token: str) -> str:
    """A byte-level BPE token (GPT-2's alphabet: one printable character per byte, as MiniMind's tokenizer stores
    them) written as its bytes, ``<0xE4><0xBD>``, the notation of SentencePiece's byte tokens; a token of any other
    alphabet is shown as stored."""
    to_byte = _byte_of_character()
    if not token or any(c not in to_byte for c in token):
        return token
    return "".join(f"<0x{to_byte[c]:02X}>" for c in token)
