"""MiniMind-3 models through transformers' Qwen3 classes, and MiniMind's ``.pth`` key layout.

A MiniMind dense ``.pth`` has exactly the state_dict keys of ``Qwen3ForCausalLM`` (tied ``lm_head`` included), so
saving is ``state_dict()`` in fp16 and loading is a strict ``load_state_dict`` after a key/shape check that names
what is wrong.
"""
from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


def hf_config(mcfg: dict) -> Qwen3Config:
    """A Qwen3Config from MiniMind config names (``training.spec.model_config`` output)."""
    if mcfg.get("use_moe"):
        raise ValueError("use_moe: MoE models are not available in this version yet")
    h, heads = mcfg["hidden_size"], mcfg["num_attention_heads"]
    return Qwen3Config(
        vocab_size=mcfg["vocab_size"], hidden_size=h, intermediate_size=mcfg["intermediate_size"],
        num_hidden_layers=mcfg["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=mcfg["num_key_value_heads"], head_dim=h // heads,
        max_position_embeddings=mcfg["max_position_embeddings"], rms_norm_eps=mcfg["rms_norm_eps"],
        rope_theta=mcfg["rope_theta"], tie_word_embeddings=True, use_sliding_window=False, hidden_act="silu",
        attention_bias=False, attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def build_model(mcfg: dict) -> Qwen3ForCausalLM:
    torch_dtype = torch.get_default_dtype()
    model = Qwen3ForCausalLM(hf_config(mcfg)).to(torch_dtype)
    return model


def minimind_state_dict(model, dtype=torch.float16) -> dict:
    """The model's weights in MiniMind's ``.pth`` layout (plain dict, CPU tensors, fp16 by default)."""
    sd = model.state_dict()
    if "lm_head.weight" not in sd:  # tied and dropped by a wrapper: MiniMind stores both keys
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v.detach().to("cpu", dtype).clone()
            for k, v in sd.items()}


def save_pth(model, path, dtype=torch.float16) -> None:
    tmp = f"{path}.tmp"
    torch.save(minimind_state_dict(model, dtype), tmp)
    import os
    os.replace(tmp, path)


def check_state_dict(model, sd: dict) -> None:
    """Raise ValueError naming missing/unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:5])}{' …' if len(unexpected) > 5 else ''}")
    if shapes:
        problems.append(f"shape mismatch: {'; '.join(shapes[:5])}")
    if problems:
        raise ValueError("checkpoint does not match the model config: " + " | ".join(problems))


def load_pth(model, path) -> None:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    check_state_dict(model, sd)
    model.load_state_dict(sd, strict=True)
