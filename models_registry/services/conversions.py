"""Model files on demand: the engine run as a subprocess (no torch in a Django process), the Hugging Face (transformers 5
or 4.57 layout), GGUF and LoRA zips (verified, cached), download names."""
from __future__ import annotations

import json
from pathlib import Path

from django.conf import settings
from django.utils import timezone
from django.utils.translation import gettext as _

from minicloud.errors import ServiceError, explained, stored_text
from minicloud.files import exclusive_lock, folder_entries, zip_files
from minicloud.processes import die_with_parent, engine_env
from training import gguf_export  # its support table and types: plain Python (numpy), no torch

from ..models import ModelVersion


GGUF_TYPES = gguf_export.TYPES
HF_LAYOUTS = ("transformers5", "transformers4")
VARIANTS = {"gguf": GGUF_TYPES, "hf": HF_LAYOUTS}  # ?type= of a GGUF download, ?layout= of a Hugging Face one


def download_name(mv: ModelVersion, fmt: str = "pth", variant: str = "") -> str:
    hidden = mv.config.get("hidden_size", "")
    moe = "_moe" if mv.config.get("use_moe") else ""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in mv.name)
    base = f"{safe}_v{mv.version}_{hidden}{moe}"
    hf = "_hf4" if variant == "transformers4" else "_hf"
    return {"pth": f"{base}.pth", "hf": f"{base}{hf}.zip", "lora": f"{base}_lora.zip",
            "gguf": f"{base}_{variant or 'q8_0'}_gguf.zip"}[fmt]


def gguf_support(mv: ModelVersion) -> dict:
    """What llama.cpp can take of this model, per GGUF type (shown on the page before anyone downloads), with each
    note in the active language."""
    from django.utils.translation import gettext

    notes = gguf_export.support(mv.config, mv.has_tokenizer)
    for n in notes.values():
        n["note"] = gettext(n["template"]) % n["params"] if n["template"] else ""
    return notes


def download_choices(mv: ModelVersion) -> list[dict]:
    """The model page's download rows: ``key`` (pth, hf, hf4, gguf-<type>, lora), the query string, the recorded
    check (``kind`` logits or perplexity), and for GGUF whether llama.cpp takes it and what falls back."""
    rows = []
    for fmt in mv.formats:
        if fmt == "hf":
            rows.append({"key": "hf", "query": "format=hf", "check": mv.verifications.get("hf"), "kind": "logits"})
            if mv.config.get("use_moe"):
                rows.append({"key": "hf4", "query": "format=hf&layout=transformers4",
                             "check": mv.verifications.get("hf4"), "kind": "logits"})
        elif fmt == "gguf":
            support = gguf_support(mv)
            for t in GGUF_TYPES:
                check = mv.verifications.get("gguf" if t == "f16" else f"gguf_{t}")
                rows.append({"key": f"gguf-{t}", "query": f"format=gguf&type={t}", "check": check,
                             "kind": "logits" if t == "f16" else "perplexity", **support[t]})
        else:
            rows.append({"key": fmt, "query": f"format={fmt}", "check": mv.verifications.get(fmt), "kind": "logits"})
    for row in rows:
        row.setdefault("available", True)
    return rows


ENGINE_TIMEOUT_S = 1800


def run_engine(*args, timeout: int = ENGINE_TIMEOUT_S) -> dict:
    """``python -m training ARGS`` → its JSON report; its one-line error becomes a ServiceError (400), in the
    reader's language where the engine explains it (a template and its parameters: ``minicloud.errors.stored_text``)."""
    import signal
    import subprocess
    import sys


    try:
        out = subprocess.run([sys.executable, "-m", "training", *map(str, args)], cwd=settings.BASE_DIR,
                             capture_output=True, text=True, timeout=timeout, env=engine_env(),
                             preexec_fn=die_with_parent(signal.SIGKILL))  # ends with the worker that asked
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
        if (pair := explained(report)) is not None:
            message = stored_text(*pair)
        raise ServiceError(message[:500], status=400)
    return report


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _store_check(mv: ModelVersion, key: str, check: dict) -> dict:
    """``check`` (with the time) into ``mv.verifications[key]``, beside what other processes stored meanwhile."""
    check = {**check, "checked_at": timezone.now().isoformat()}
    mv.verifications = {**ModelVersion.objects.get(pk=mv.pk).verifications, key: check}
    ModelVersion.objects.filter(pk=mv.pk).update(verifications=mv.verifications)
    return check


def _record_verification(mv: ModelVersion, fmt: str, report: dict, **more) -> None:
    """Keep a conversion's check in ``mv.verifications[fmt]``; a failed check stops the download (500)."""
    check = _store_check(mv, fmt, {**report["verification"], **more})
    if not check["ok"]:
        raise ServiceError(
            _("conversion check failed: logits differ by %(max_abs_diff)s (> %(tolerance)s)")
            % {"max_abs_diff": format(check["max_abs_diff"], ".3g"), "tolerance": format(check["tolerance"], "g")}
            if check["max_abs_diff"] > check["tolerance"] else
            _("conversion check failed: llama.cpp's greedy tokens or tokenizer differ from ours"), status=500)


def hf_zip(mv: ModelVersion, layout: str = "transformers5") -> Path:
    """The Hugging Face folder of a model, zipped: converted on first request (verified by logits), then cached. A
    dense model has one layout for both; a MoE model's ``transformers4`` layout has one module per expert."""
    import shutil

    if not mv.config.get("use_moe"):
        layout = "transformers5"
    suffix = "" if layout == "transformers5" else "4"
    out = mv.files_dir / f"hf{suffix}.zip"
    with exclusive_lock(mv.files_dir / ".lock"):
        if out.exists():
            return out
        folder = mv.files_dir / f"hf{suffix}"
        shutil.rmtree(folder, ignore_errors=True)
        config = _write_json(mv.files_dir / "config.json", mv.config)
        args = ["convert", "hf", mv.pth_path, folder, "--config", config, "--layout", layout]
        if mv.has_tokenizer:
            args += ["--tokenizer", mv.tokenizer.path]
        _record_verification(mv, f"hf{suffix}", run_engine(*args))
        zip_files(out, folder_entries(folder))
        shutil.rmtree(folder, ignore_errors=True)
        mv.measure_files()
    return out


def _eval_dataset(mv: ModelVersion):
    """The data a GGUF file's perplexity is measured on: the eval split of the model's own dataset (or of the demo
    pretraining set, for an imported model that has none); None when neither is on disk."""
    from jobs.models import Dataset

    for ds in (mv.dataset if mv.dataset_id else None, Dataset.objects.filter(name="demo-pretrain").first()):
        if ds is not None and Path(ds.path).exists():
            return ds
    return None


def gguf_zip(mv: ModelVersion, gguf_type: str) -> Path:
    """A GGUF file of ``gguf_type`` with its Ollama ``Modelfile``, zipped: made on first request, then cached. The f16
    file is made and checked in llama.cpp each time (logits, greedy tokens, tokenizer: ``verifications["gguf"]``);
    a quantised type records its eval-split perplexity beside f16's (``verifications["gguf_<type>"]``)."""
    import shutil

    note = gguf_support(mv)[gguf_type]
    if not note["available"]:
        raise ServiceError(_("GGUF: %(reason)s") % {"reason": note["note"]}, field="type")
    out = mv.files_dir / f"gguf-{gguf_type}.zip"
    with exclusive_lock(mv.files_dir / ".lock"):
        if out.exists():
            return out
        folder = mv.files_dir / "gguf"
        shutil.rmtree(folder, ignore_errors=True)
        config = _write_json(mv.files_dir / "config.json", mv.config)
        stem = download_name(mv, "gguf", gguf_type).removesuffix(f"_{gguf_type}_gguf.zip")
        args = ["convert", "gguf", mv.pth_path, folder, "--config", config, "--tokenizer", mv.tokenizer.path,
                "--types", gguf_type, "--name", stem]
        job_cfg = mv.job.resolved_config if mv.job_id else {}
        data = _eval_dataset(mv)
        if data is not None:
            args += ["--eval-data", data.path, "--eval-ratio", job_cfg.get("eval_ratio") or 0.01,
                     "--seed", job_cfg.get("seed", 42)]
        report = run_engine(*args)
        files = report["files"]
        _record_verification(mv, "gguf", report, perplexity=files["f16"].get("perplexity"))
        if gguf_type != "f16":
            check = {k: files[gguf_type].get(k) for k in ("perplexity", "tokens", "bytes", "fallback_tensors")}
            _store_check(mv, f"gguf_{gguf_type}", {
                **check, "dataset": data.name if data is not None else None, "ok": True,
                "f16_perplexity": files["f16"].get("perplexity"), "f16_bytes": files["f16"]["bytes"]})
        gguf = Path(files[gguf_type]["path"])
        zip_files(out, [(gguf, gguf.name), (gguf.with_suffix(".Modelfile"), "Modelfile")])
        shutil.rmtree(folder, ignore_errors=True)
        mv.measure_files()
    return out


def lora_zip(mv: ModelVersion) -> Path:
    """A zip of the LoRA outputs: MiniMind's LoRA .pth and the peft adapter folder (built once, kept)."""
    out = mv.files_dir / "lora.zip"
    with exclusive_lock(mv.files_dir / ".lock"):
        if not out.exists():
            adapter = folder_entries(Path(mv.adapter_path), "adapter/") if mv.adapter_path else []
            zip_files(out, [(mv.lora_path, download_name(mv).replace(".pth", "_lora.pth")), *adapter])
            mv.measure_files()
    return out


def format_file(mv: ModelVersion, fmt: str, variant: str = "") -> Path:
    """The file to download for ``fmt`` (pth, hf, gguf or lora; ``variant``: a GGUF type or a Hugging Face layout),
    produced on demand and cached."""
    if fmt not in ("pth", "hf", "gguf", "lora"):
        raise ServiceError(_("format: %(fmt)s is not one of pth, hf, gguf, lora") % {"fmt": repr(fmt)},
                           field="format")
    if fmt in VARIANTS and variant and variant not in VARIANTS[fmt]:
        raise ServiceError(_("%(name)s: %(value)s is not one of %(choices)s") % {
            "name": "type" if fmt == "gguf" else "layout", "value": repr(variant),
            "choices": ", ".join(VARIANTS[fmt])}, field="type" if fmt == "gguf" else "layout")
    if fmt == "lora" and not mv.lora_path:
        raise ServiceError(
            _("format: model %(pk)s has no LoRA adapter (only LoRA jobs make one)") % {"pk": mv.pk}, field="format"
        )
    if not mv.pth_path.exists():
        raise ServiceError(_("the weights file of model %(pk)s is missing on disk") % {"pk": mv.pk}, status=404)
    return {"pth": lambda: mv.pth_path, "hf": lambda: hf_zip(mv, variant or "transformers5"),
            "gguf": lambda: gguf_zip(mv, variant or "q8_0"), "lora": lambda: lora_zip(mv)}[fmt]()
