"""Registering models and tokenizers. No torch here: the engine writes the files, the portal records them."""
from __future__ import annotations

import json
from pathlib import Path

from .models import ModelVersion, Tokenizer


def register_tokenizer(*, name: str, path: Path, owner=None, is_public=False) -> Tokenizer:
    data = json.loads((Path(path) / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = len(data["model"]["vocab"]) + sum(1 for t in data.get("added_tokens", [])
                                               if t["content"] not in data["model"]["vocab"])
    tok, _ = Tokenizer.objects.update_or_create(
        name=name, owner=owner, defaults={"path": str(path), "is_public": is_public, "vocab_size": vocab})
    return tok


def demo_tokenizer() -> Tokenizer | None:
    return Tokenizer.objects.filter(name="demo-tokenizer", is_public=True).first()


def register_job_output(job, *, model_path: str, model_config: dict, parameters: int, lora_path: str = "",
                        adapter_path: str = "") -> ModelVersion:
    """Record a finished job's final weights as a model version, with its lineage."""
    path = Path(model_path)
    return ModelVersion.objects.create(
        name=f"{job.name}-{job.stage}", owner=job.owner, stage=job.stage, job=job, parent=job.base_model,
        dataset=job.dataset, tokenizer=job.tokenizer, config=model_config, parameters=parameters, path=str(path),
        lora_path=lora_path, adapter_path=adapter_path, size_bytes=path.stat().st_size)


def lora_zip(mv: ModelVersion) -> Path:
    """A zip of the LoRA outputs: MiniMind's LoRA .pth and the peft adapter folder (built once, kept beside them)."""
    import zipfile

    out = Path(mv.lora_path).with_name("lora.zip")
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.write(mv.lora_path, download_name(mv).replace(".pth", "_lora.pth"))
            for f in sorted(Path(mv.adapter_path).rglob("*")) if mv.adapter_path else []:
                if f.is_file():
                    zf.write(f, f"adapter/{f.relative_to(mv.adapter_path)}")
        tmp.replace(out)
    return out


def download_name(mv: ModelVersion) -> str:
    hidden = mv.config.get("hidden_size", "")
    moe = "_moe" if mv.config.get("use_moe") else ""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in mv.name)
    return f"{safe}_{hidden}{moe}.pth"
