"""MiniMind ``.pth`` ↔ Hugging Face folder (MiniMind's scripts/convert_model.py, transformers-5 layout).

``pth_to_hf`` builds the Qwen3 / Qwen3Moe model from MiniMind config names, loads the ``.pth`` strictly, casts to
fp16 and ``save_pretrained``s it (safetensors) with a generation config that stops at eos 2 and the tokenizer files.
Dense folders get MiniMind's fix-ups so transformers 4.57 reads them too (top-level ``rope_theta``,
``rope_scaling: null``, no ``rope_parameters``; ``PreTrainedTokenizerFast`` as tokenizer class). MoE folders keep
transformers 5's fused experts. ``hf_to_pth`` goes back (experts unfused).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .model import load_model, save_pth

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def pth_to_hf(pth: str | Path, config: dict, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    from transformers import GenerationConfig

    model, mcfg = load_model({"path": str(pth), "config": config})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float16)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True,
                                               temperature=0.85, top_p=0.85, top_k=50)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if not mcfg["use_moe"]:
        cfg_path = out_dir / "config.json"
        cfg = json.loads(cfg_path.read_text())
        params = cfg.pop("rope_parameters", None) or {}
        cfg["rope_theta"] = params.get("rope_theta", mcfg["rope_theta"])
        cfg["rope_scaling"] = None
        cfg_path.write_text(json.dumps(cfg, indent=2))
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists():
                shutil.copy(src, out_dir / name)
        tc = out_dir / "tokenizer_config.json"
        if tc.exists():
            data = json.loads(tc.read_text(encoding="utf-8"))
            data.update(tokenizer_class="PreTrainedTokenizerFast", extra_special_tokens={})
            tc.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
            template = data.get("chat_template")
            if template:
                (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    return out_dir


def hf_to_pth(folder: str | Path, out_path: str | Path) -> dict:
    """Write a MiniMind ``.pth`` (fp16) from a Hugging Face folder; returns the MiniMind config."""
    model, mcfg = load_model({"path": str(folder)})
    save_pth(model, out_path)
    return mcfg


