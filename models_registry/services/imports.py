"""Models from outside and from merges: an uploaded .pth or Hugging Face zip (unpacked safely), its tokenizer, and LoRA
merged into its base."""
from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.db import transaction
from django.utils.translation import gettext as _

from accounts.services import audit, check_storage
from jobs.services import largest_device_memory, spec_error_text
from training import spec as tspec
from minicloud.errors import ServiceError, clean_name, strict_loads
from minicloud.files import check_upload_size, save_upload

from ..models import ModelVersion, Tokenizer
from .conversions import _write_json, run_engine
from .registry import _parameters, next_version
from .tokenizers import upload_tokenizer


def _weight_bytes(folder: Path) -> int:
    """The bytes of a Hugging Face folder's weight files."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.suffix in (".safetensors", ".bin", ".pth"))


def _folder_config(folder: Path) -> dict:
    try:
        config = strict_loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ServiceError(_("file: the folder's config.json is unreadable (%(error)s)") % {"error": exc},
                           field="file") from None
    if not isinstance(config, dict):
        raise ServiceError(_("file: the folder's config.json is not a JSON object"), field="file")
    return config


def _extract_zip(src: Path, dest: Path) -> Path:
    """Unpack a zipped Hugging Face folder safely (no paths outside ``dest``, bounded size); the folder that holds
    config.json."""
    import zipfile


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
    if tokenizer_json is not None or tokenizer_config is not None:
        return upload_tokenizer(owner=owner, name=_free_tokenizer_name(owner, name), tokenizer_json=tokenizer_json,
                                tokenizer_config=tokenizer_config, request=request)
    if folder is not None and (folder / "tokenizer.json").exists() and (folder / "tokenizer_config.json").exists():
        with open(folder / "tokenizer.json", "rb") as tj, open(folder / "tokenizer_config.json", "rb") as tc:
            return upload_tokenizer(owner=owner, name=_free_tokenizer_name(owner, name), tokenizer_json=File(tj),
                                    tokenizer_config=File(tc), request=request)
    if tokenizer_id:
        tok = Tokenizer.objects.visible_to(owner).filter(pk=tokenizer_id, status="ready").first()
        if tok is None:
            raise ServiceError(_("tokenizer: one you can use"), field="tokenizer")
    else:
        tok = Tokenizer.demo()
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


def check_model_size(config: dict, weights_bytes: int) -> None:
    """Refuse, before the engine builds anything from it, a config whose model no device here could hold (its fp32
    weights alone against the largest device's memory, a CPU slot's RAM included) or that a file of
    ``weights_bytes`` could not hold (at least one byte per parameter): the engine would allocate the model the
    config describes before it reads the file."""
    known = {k: v for k, v in config.items() if k in tspec.MODEL_DEFAULTS}
    try:
        total = tspec.parameter_count(tspec.model_config(tspec.resolve_config("pretrain", known)))["total"]
    except tspec.SpecError as exc:
        raise ServiceError(_("config: %(error)s") % {"error": spec_error_text(exc)}, field="config") from None
    largest = largest_device_memory()
    if largest is not None and 4 * total > largest:
        raise ServiceError(
            _("config: a model of %(params)s parameters needs %(need)s GiB for its weights alone; the largest device "
              "here has %(largest)s GiB") % {"params": f"{total:,}", "need": f"{4 * total / 2**30:.1f}",
                                            "largest": f"{largest / 2**30:.1f}"}, field="config")
    if total > weights_bytes:
        raise ServiceError(
            _("config: it describes %(params)s parameters, more than a file of %(bytes)s bytes holds")
            % {"params": f"{total:,}", "bytes": f"{weights_bytes:,}"}, field="config")


def import_model(*, owner, name: str, upload, config=None, tokenizer_json=None, tokenizer_config=None,
                 tokenizer_id=None, request=None) -> ModelVersion:
    """Register an existing model: a MiniMind ``.pth`` (with its MiniMind config) or a zipped Hugging Face folder
    of a MiniMind/Qwen3 model. The engine checks it strictly (and verifies a folder's conversion by logits)."""
    import shutil
    import uuid


    name = clean_name(name, 200)
    if upload is None:
        raise ServiceError(_("file: send a MiniMind .pth or a zipped Hugging Face folder"), field="file")
    check_upload_size(upload.size)
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
        src = save_upload(upload, work / "upload")
        weights = work / "model.pth"
        folder = None
        if _is_hf_zip(src):
            folder = _extract_zip(src, work / "hf")
            hf_config = _folder_config(folder)
            if any(str(a).endswith("ForSequenceClassification") for a in hf_config.get("architectures") or ()):
                return _import_reward_model(owner, name, folder, hf_config, request)
            if hf_config.get("model_type") in tspec.SUPPORTED_MODEL_TYPES:  # the engine names what it does not read
                check_model_size(hf_config, _weight_bytes(folder))
            report = run_engine("convert", "pth", folder, weights)
            if not report["verification"]["ok"]:
                raise ServiceError(_("the imported weights do not reproduce the folder's logits"), status=400)
        else:
            if not config:
                raise ServiceError(
                    _("config: a .pth needs its MiniMind config (hidden_size, num_hidden_layers, use_moe, ...)"),
                    field="config",
                )
            check_model_size(config, src.stat().st_size)
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
            mv.measure_files()
        audit(owner, "model_import", mv, request=request, kind="hf" if folder else "pth")
        return mv
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _import_reward_model(owner, name: str, folder: Path, hf_config: dict, request=None) -> ModelVersion:
    """A Hugging Face sequence-classification folder (with its tokenizer) kept as it is: the reward model RL jobs
    name by its registry id (``config.reward_model``); its weights are bounded by the devices' memory."""
    weights = _weight_bytes(folder)
    if not weights or not (folder / "tokenizer_config.json").exists():
        raise ServiceError(_("file: a reward model folder needs its weights (.safetensors) and its tokenizer"),
                           field="file")
    largest = largest_device_memory()
    if largest is not None and 2 * weights > largest:
        raise ServiceError(_("file: a reward model of %(gib)s GiB does not fit the largest device here")
                           % {"gib": f"{weights / 2**30:.1f}"}, field="file")
    with transaction.atomic():
        mv = ModelVersion.objects.create(
            name=name, version=next_version(owner, name), owner=owner, stage="reward", source="reward",
            config={k: hf_config[k] for k in ("model_type", "architectures", "hidden_size", "num_hidden_layers",
                                              "vocab_size") if k in hf_config},
            path="", size_bytes=weights)
        final = mv.files_dir / "reward"
        final.parent.mkdir(parents=True, exist_ok=True)
        folder.replace(final)
        ModelVersion.objects.filter(pk=mv.pk).update(path=str(final))
        mv.path = str(final)
        mv.measure_files()
    audit(owner, "model_import", mv, request=request, kind="reward")
    return mv


def merge_lora(*, owner, mv: ModelVersion, request=None) -> ModelVersion:
    """A LoRA version's MiniMind LoRA ``.pth`` merged into its base: a new full model version (lineage: base →
    LoRA → merged), verified against the unmerged forward."""

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
    merged.measure_files()
    audit(owner, "model_merge", merged, request=request, lora=mv.pk, base=base.pk)
    return merged
