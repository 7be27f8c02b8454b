"""LoRA fine-tuning through peft on a frozen base (MiniMind's train_lora.py).

MiniMind's adapter: rank 16 on every square Linear (q_proj and o_proj; k/v_proj without GQA), no scaling (alpha = rank), A ~ N(0, 0.02), B = 0. Writes the
peft adapter folder, MiniMind's LoRA ``.pth`` layout (``model.layers.{i}.self_attn.{q,o}_proj.lora.{A,B}.weight``,
fp16) and the merged full model (``model.pth``).
"""
from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import torch

from . import events
from .loop import train
from .model import save_pth, save_state_dict
from .pretrain import lm_loss
from .sft import load_rows

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])\.default\.weight$")


def minimind_targets(model) -> list[str]:
    """MiniMind's ``apply_lora`` rule: every ``nn.Linear`` whose in and out features are equal (q_proj and o_proj;
    k_proj and v_proj too when num_key_value_heads == num_attention_heads), so that MiniMind's ``load_lora`` finds
    exactly the adapters it expects in our ``lora.pth``."""
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m.in_features == m.out_features]


def attach(model, cfg):
    from peft import LoraConfig, get_peft_model

    targets = cfg["lora_targets"] or minimind_targets(model)
    lcfg = LoraConfig(r=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"], target_modules=targets,
                      lora_dropout=0.0, bias="none", init_lora_weights=True)
    with warnings.catch_warnings():  # peft reads transformers' renamed is_gradient_checkpointing: noise in a job's log
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lcfg)
    gen = torch.Generator().manual_seed(cfg["seed"])
    for name, p in model.named_parameters():
        if "lora_A" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def minimind_lora_state_dict(peft_model) -> dict:
    """MiniMind's LoRA file: A [r, in], B [out, r] with the peft scaling folded into B, fp16."""
    scale = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict) and "default" in module.scaling:
            scale[name.removeprefix("base_model.model.")] = module.scaling["default"]
    out = {}
    for key, value in peft_model.state_dict().items():
        m = _PEFT_KEY.match(key)
        if not m:
            continue
        base, which = m.group(1), m.group(2)
        value = value.detach().float() * (scale.get(base, 1.0) if which == "B" else 1.0)
        out[f"{base}.lora.{which}.weight"] = value.to("cpu", torch.float16)
    return out


def save(peft_model, run_dir: Path) -> dict:
    adapter_dir = run_dir / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    save_state_dict(minimind_lora_state_dict(peft_model), run_dir / "lora.pth")
    # Merge on a copy (training goes on with the adapter): W + B·A·scale for every adapted Linear, LoRA keys
    # dropped → a normal full model.
    full = copy.deepcopy(peft_model).merge_and_unload()
    save_pth(full, run_dir / "model.pth")
    return {"model_path": str(run_dir / "model.pth"), "lora_path": str(run_dir / "lora.pth"),
            "adapter_path": str(adapter_dir)}


def run(spec: dict, model, tok):
    cfg = spec["config"]
    for p in model.parameters():
        p.requires_grad_(False)
    model = attach(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    events.log(f"Trainable Params: {trainable / 1e6:.3f}M")
    return train(spec, model, load_rows(spec, tok), lm_loss, save_fn=save, stage_extra={"trainable": trainable},
                 load_rows=lambda s: load_rows(s, tok))
