"""Model files on demand: the engine run as a subprocess (no torch in a Django process), the Hugging Face and LoRA zips
(verified, cached), download names."""
from __future__ import annotations

import json
from pathlib import Path

from django.conf import settings
from django.utils import timezone
from django.utils.translation import gettext as _

from minicloud.errors import ServiceError
from minicloud.files import folder_entries, zip_files
from minicloud.processes import die_with_parent, engine_env

from ..models import ModelVersion


def download_name(mv: ModelVersion, fmt: str = "pth") -> str:
    hidden = mv.config.get("hidden_size", "")
    moe = "_moe" if mv.config.get("use_moe") else ""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in mv.name)
    base = f"{safe}_v{mv.version}_{hidden}{moe}"
    return {"pth": f"{base}.pth", "hf": f"{base}_hf.zip", "lora": f"{base}_lora.zip"}[fmt]


ENGINE_TIMEOUT_S = 1800


def run_engine(*args, timeout: int = ENGINE_TIMEOUT_S) -> dict:
    """``python -m training ARGS`` → its JSON report; its one-line error becomes a ServiceError (400)."""
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


def _record_verification(mv: ModelVersion, fmt: str, report: dict) -> None:
    mv.verifications = {**ModelVersion.objects.get(pk=mv.pk).verifications,
                        fmt: {**report["verification"], "checked_at": timezone.now().isoformat()}}
    ModelVersion.objects.filter(pk=mv.pk).update(verifications=mv.verifications)


def hf_zip(mv: ModelVersion) -> Path:
    """The Hugging Face folder of a model, zipped: converted on first request (verified by logits), then cached."""
    import shutil


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
        zip_files(out, folder_entries(folder))
        shutil.rmtree(folder, ignore_errors=True)
    return out


def lora_zip(mv: ModelVersion) -> Path:
    """A zip of the LoRA outputs: MiniMind's LoRA .pth and the peft adapter folder (built once, kept)."""
    out = mv.files_dir / "lora.zip"
    with _Lock(mv.files_dir / ".lock"):
        if not out.exists():
            adapter = folder_entries(Path(mv.adapter_path), "adapter/") if mv.adapter_path else []
            zip_files(out, [(mv.lora_path, download_name(mv).replace(".pth", "_lora.pth")), *adapter])
    return out


def format_file(mv: ModelVersion, fmt: str) -> Path:
    """The file to download for ``fmt`` (pth, hf or lora), produced on demand and cached."""
    if fmt not in ("pth", "hf", "lora"):
        raise ServiceError(_("format: %(fmt)s is not one of pth, hf, lora") % {"fmt": repr(fmt)}, field="format")
    if fmt == "lora" and not mv.lora_path:
        raise ServiceError(
            _("format: model %(pk)s has no LoRA adapter (only LoRA jobs make one)") % {"pk": mv.pk}, field="format"
        )
    if not mv.pth_path.exists():
        raise ServiceError(_("the weights file of model %(pk)s is missing on disk") % {"pk": mv.pk}, status=404)
    return {"pth": lambda: mv.pth_path, "hf": lambda: hf_zip(mv), "lora": lambda: lora_zip(mv)}[fmt]()
