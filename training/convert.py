"""MiniMind ``.pth`` ↔ Hugging Face folder (MiniMind's scripts/convert_model.py, transformers-5 layout).

``pth_to_hf`` builds the Qwen3 / Qwen3Moe model from MiniMind config names, loads the ``.pth`` strictly, casts to
fp16 and ``save_pretrained``s it (safetensors) with a generation config that stops at eos 2 and the tokenizer files.
Dense folders get MiniMind's fix-ups so transformers 4.57 reads them too (top-level ``rope_theta``,
``rope_scaling: null``, no ``rope_parameters``; ``PreTrainedTokenizerFast`` as tokenizer class). MoE folders keep
transformers 5's fused experts by default; ``layout="transformers4"`` writes them as 4.57 does (one module per expert,
``mlp.experts.E.{gate,up,down}_proj``, MiniMind's own keys, with the same config fix-ups), a layout transformers 5
also loads (it fuses on load). ``hf_to_pth`` goes back (experts unfused).

Every conversion the portal offers is verified (``compare_logits``): the converted model and its source run on one
fixed prompt and the largest logit difference is reported with the tolerance it must meet. Imports of Hugging Face
folders, strict checks of imported ``.pth`` files and LoRA merges (MiniMind's ``W + B·A``) live here too.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from .model import load_model, save_pth

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


LAYOUTS = ("transformers5", "transformers4")


def pth_to_hf(pth: str | Path, config: dict, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
              layout: str = "transformers5") -> Path:
    from transformers import GenerationConfig

    model, mcfg = load_model({"path": str(pth), "config": config})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float16)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True,
                                               temperature=0.85, top_p=0.85, top_k=50)
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if not mcfg["use_moe"] or layout == "transformers4":
        cfg_path = out_dir / "config.json"
        cfg = json.loads(cfg_path.read_text())
        params = cfg.pop("rope_parameters", None) or {}
        cfg["rope_theta"] = params.get("rope_theta", mcfg["rope_theta"])
        cfg["rope_scaling"] = None
        cfg.pop("experts_implementation", None)
        if "num_local_experts" in cfg:  # 4.57's name for it (5 renamed it); 4.57 reads torch_dtype
            cfg["num_experts"] = cfg["num_local_experts"]
        cfg.setdefault("torch_dtype", cfg.get("dtype", "float16"))
        cfg_path.write_text(json.dumps(cfg, indent=2))
    if mcfg["use_moe"] and layout == "transformers4":
        from safetensors.torch import load_file, save_file

        from .model import to_minimind

        weights = out_dir / "model.safetensors"
        save_file({k: v.contiguous() for k, v in to_minimind(load_file(str(weights))).items()}, str(weights),
                  metadata={"format": "pt"})
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




# --- verification: the converted model must compute what the source computes --------------------------------------

VERIFY_TOLERANCE = 1e-4  # max |Δlogit| allowed between a model and its conversion (same fp16 weights, fp32 maths)
MERGE_TOLERANCE = 2e-2  # a LoRA merge rounds W + B·A to fp16 once: allowed |Δlogit| against the unmerged model


def verify_prompt(vocab_size: int, length: int = 24) -> torch.Tensor:
    """The fixed prompt every verification uses: ``length`` token ids drawn with a fixed seed (no special ids)."""
    gen = torch.Generator().manual_seed(20_240_917)
    return torch.randint(3, max(vocab_size, 4), (1, length), generator=gen)


@torch.no_grad()
def compare_logits(reference, candidate, vocab_size: int, tolerance: float = VERIFY_TOLERANCE) -> dict:
    """Run both models (fp32, eval) on the fixed prompt; the largest logit difference decides."""
    x = verify_prompt(vocab_size)
    a = reference.float().eval()(input_ids=x).logits
    b = candidate.float().eval()(input_ids=x).logits
    diff = float((a - b).abs().max())
    return {"max_abs_diff": diff, "tolerance": tolerance, "ok": bool(diff <= tolerance),
            "prompt_tokens": int(x.shape[1]), "max_abs_logit": float(a.abs().max())}


def export_hf(pth: str | Path, config: dict, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
              layout: str = "transformers5") -> dict:
    """``.pth`` → Hugging Face folder, verified: the folder loaded by ``AutoModelForCausalLM`` gives the ``.pth``'s
    logits."""
    from transformers import AutoModelForCausalLM

    out_dir = pth_to_hf(pth, config, out_dir, tokenizer_dir, layout)
    source, mcfg = load_model({"path": str(pth), "config": config})
    loaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    return {"out": str(out_dir), "config": mcfg, "verification": compare_logits(source, loaded, mcfg["vocab_size"])}


from .spec import SUPPORTED_MODEL_TYPES, Explained, gettext_noop  # noqa: E402 -- the portal reads it without torch


def import_hf(folder: str | Path, out_path: str | Path) -> dict:
    """A Hugging Face folder of a MiniMind/Qwen3-architecture model → MiniMind ``.pth``, verified against the folder
    as ``AutoModelForCausalLM`` loads it. Other architectures are refused with the reason."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    try:
        hf_cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise Explained(gettext_noop("config.json: missing or not JSON (%(error)s)"), error=str(exc)) from None
    if hf_cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise Explained(gettext_noop("config.json: model_type %(type)s is not a MiniMind/Qwen3 architecture "
                                     "(%(supported)s)"), type=repr(hf_cfg.get("model_type")),
                        supported=" or ".join(SUPPORTED_MODEL_TYPES))
    mcfg = hf_to_pth(folder, out_path)
    source = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ours, _ = load_model({"path": str(out_path), "config": mcfg})
    return {"out": str(out_path), "config": mcfg, "verification": compare_logits(source, ours, mcfg["vocab_size"])}


def inspect_pth(pth: str | Path, config: dict) -> dict:
    """Load a MiniMind ``.pth`` strictly against ``config`` (raises naming what does not fit); its resolved config."""
    _, mcfg = load_model({"path": str(pth), "config": config})
    return {"config": mcfg}


_LORA_KEY = re.compile(r"^(.+)\.lora\.([AB])\.weight$")


def lora_pairs(lora_sd: dict) -> dict:
    """MiniMind LoRA state dict → {base Linear name: (A [r, in], B [out, r])}; raises on a half pair."""
    parts: dict[str, dict] = {}
    for key, value in lora_sd.items():
        m = _LORA_KEY.match(key.removeprefix("module."))
        if not m:
            raise Explained(gettext_noop("LoRA file: unexpected key %(key)s (MiniMind's layout is "
                                         "<module>.lora.A/B.weight)"), key=key)
        parts.setdefault(m.group(1), {})[m.group(2)] = value.float()
    pairs = {}
    for name, p in parts.items():
        if set(p) != {"A", "B"}:
            raise Explained(gettext_noop("LoRA file: %(name)s has only lora.%(part)s"), name=name, part="".join(p))
        pairs[name] = (p["A"], p["B"])
    if not pairs:
        raise Explained(gettext_noop("LoRA file: no LoRA weights in it"))
    return pairs


class _LoraForward(torch.nn.Module):
    """A Linear plus an unmerged low-rank path: y = W·x + B·(A·x) — MiniMind's LoRA forward, for the check."""

    def __init__(self, base, a, b):
        super().__init__()
        self.base, self.a, self.b = base, a, b

    def forward(self, x):
        return self.base(x) + (x @ self.a.T.to(x.dtype)) @ self.b.T.to(x.dtype)


def merge_lora(base_pth: str | Path, config: dict, lora_pth: str | Path, out_path: str | Path) -> dict:
    """Merge MiniMind's LoRA ``.pth`` into its base (W + B·A, MiniMind's merge_lora) and save a full fp16 ``.pth``.
    Verified: the merged model's logits equal those of the base running the LoRA path unmerged."""
    import copy

    base, mcfg = load_model({"path": str(base_pth), "config": config})
    pairs = lora_pairs(torch.load(lora_pth, map_location="cpu", weights_only=True))
    modules = dict(base.named_modules())
    unmerged = copy.deepcopy(base)
    unmerged_modules = dict(unmerged.named_modules())
    for name, (a, b) in pairs.items():
        lin = modules.get(name)
        if not isinstance(lin, torch.nn.Linear) or tuple(b.shape[:1]) + tuple(a.shape[1:]) != tuple(lin.weight.shape):
            raise Explained(gettext_noop("LoRA file: %(name)s does not fit the base model (A %(a)s, B %(b)s)"),
                            name=name, a=str(tuple(a.shape)), b=str(tuple(b.shape)))
        with torch.no_grad():
            lin.weight += (b @ a).to(lin.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(unmerged_modules[parent_name], child, _LoraForward(unmerged_modules[name], a, b))
    save_pth(base, out_path)
    merged, _ = load_model({"path": str(out_path), "config": mcfg})
    return {"out": str(out_path), "config": mcfg, "adapted_modules": len(pairs),
            "rank": int(next(iter(pairs.values()))[0].shape[0]),
            "verification": compare_logits(unmerged, merged, mcfg["vocab_size"], MERGE_TOLERANCE)}
