"""Memory and time estimates for a job, from its resolved config alone (no torch: the portal imports this).

Memory is an upper bound per device for one training process: fp32 weights, and for trainable ones gradients and
AdamW's two moments (16 bytes per parameter); frozen copies (LoRA's base, DPO/RL references, a teacher) at 4 bytes;
activations of a full micro-batch of ``max_seq_len`` rows under bf16 autocast (fp32 doubles them); the logits and
their loss; RL's KV cache for rollouts of prompts at ``max_seq_len`` plus ``max_gen_len`` new tokens; CUDA's own
context and workspaces. The activation constants were fitted to peak memory measured on an H100 with MiniMind-3
shapes (docs/performance.md); the job page records each run's real peak next to its estimate.

Time is a rough guide for CUDA, from the model FLOPs of the tokens to process at the throughput measured on an H100
(eager or compiled), and for RL from its measured rollout rate.
"""
from __future__ import annotations

import math

from .spec import model_config, parameter_count

GiB = 2**30
CUDA_RUNTIME = int(0.6 * GiB)  # context, cuBLAS/cuDNN workspaces, allocator slack
# achieved 6 x parameters x tokens per second, dense MiniMind-3 pretraining on an H100 (docs/performance.md): eager,
# compiled, compiled with CUDA graphs; compile_tuning adds 2 %
H100_TFLOPS = {"eager": 112e12, "default": 266e12, "reduce-overhead": 276e12}
TUNING_GAIN = 1.02
H100_ROLLOUT_TOKENS_S = 5200.0


def _activations_per_token(mcfg: dict, fp32: bool) -> int:
    h, layers = mcfg["hidden_size"], mcfg["num_hidden_layers"]
    if mcfg["use_moe"]:
        k = mcfg["num_experts_per_tok"]
        per_layer = 44 * h + 9 * mcfg["moe_intermediate_size"] * k + 8 * h * k
    else:
        per_layer = 44 * h + 9 * mcfg["intermediate_size"]
    return layers * per_layer * (2 if fp32 else 1)


def lora_parameters(mcfg: dict, rank: int, targets) -> int:
    h = mcfg["hidden_size"]
    kv = mcfg["num_key_value_heads"] * (h // mcfg["num_attention_heads"])
    shapes = {"q_proj": (h, h), "o_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv),
              "gate_proj": (h, mcfg["intermediate_size"]), "up_proj": (h, mcfg["intermediate_size"]),
              "down_proj": (mcfg["intermediate_size"], h)}
    if targets is None:  # MiniMind's rule: the square ones
        targets = [t for t, (a, b) in shapes.items() if a == b]
    return mcfg["num_hidden_layers"] * sum(rank * sum(shapes.get(t, (h, h))) for t in targets)


def _rows_and_length(stage: str, cfg: dict) -> tuple[int, int]:
    """Rows per micro-batch as computed, and their worst-case length."""
    if stage == "grpo":
        return cfg["batch_size"] * cfg["num_generations"], cfg["max_seq_len"] + cfg["max_gen_len"]
    if stage == "ppo":
        return cfg["batch_size"], cfg["max_seq_len"] + cfg["max_gen_len"]
    if stage == "dpo":
        return 2 * cfg["batch_size"], cfg["max_seq_len"]  # chosen and rejected in one pass
    return cfg["batch_size"], cfg["max_seq_len"]


def estimate_memory(stage: str, cfg: dict, teacher: dict | None = None, cuda: bool = True) -> dict:
    """``{"bytes": total, "parts": {name: bytes}}`` for one device. ``teacher``: the distillation teacher's config."""
    mcfg = model_config(cfg)
    params = parameter_count(mcfg)["total"]
    fp32 = cfg["dtype"] == "float32" or not cuda
    rows, length = _rows_and_length(stage, cfg)
    tokens = rows * length
    parts = {}
    if stage == "eval":
        parts["weights"] = 4 * params
    elif stage == "lora":
        parts["weights"] = 4 * params
        parts["trainable (weights, gradients, AdamW)"] = 16 * lora_parameters(mcfg, cfg["lora_rank"],
                                                                               cfg["lora_targets"])
    else:
        parts["weights, gradients, AdamW"] = 16 * params
    if stage in ("dpo", "grpo", "ppo"):
        parts["frozen reference"] = 4 * params
    if stage == "ppo":
        parts["critic (weights, gradients, AdamW)"] = 16 * params
    if stage in ("grpo", "ppo"):
        head_dim = mcfg["hidden_size"] // mcfg["num_attention_heads"]
        kv_bytes = 2 * mcfg["num_key_value_heads"] * head_dim * (4 if fp32 else 2)
        parts["rollout KV cache"] = tokens * mcfg["num_hidden_layers"] * kv_bytes
    activations = tokens * _activations_per_token(mcfg, fp32)
    if stage == "ppo":
        activations *= 2  # the critic's own forward and backward
    if stage == "eval":
        activations /= mcfg["num_hidden_layers"]  # no backward: one layer's activations live at a time
    parts["activations"] = activations
    parts["logits and loss"] = tokens * mcfg["vocab_size"] * (12 if fp32 else 10)
    if stage == "distill" and teacher:
        tcfg = model_config({**cfg, **teacher})
        parts["teacher"] = 4 * parameter_count(tcfg)["total"] + tokens * tcfg["vocab_size"] * 4
    if cuda:
        parts["CUDA runtime"] = CUDA_RUNTIME
    return {"bytes": int(sum(parts.values())), "parts": {k: int(v) for k, v in parts.items()}}


def estimate_seconds(stage: str, cfg: dict, rows: int | None, gpus: int = 1) -> float | None:
    """Rough wall-clock seconds on H100-class GPUs; None when the dataset size is unknown."""
    mcfg = model_config(cfg)
    if stage == "eval" and rows:
        rows = min(rows, cfg["eval_records"])
    steps_per_epoch = math.ceil((rows or 0) / max(cfg["batch_size"] * gpus, 1) / max(cfg["accumulation_steps"], 1))
    steps = cfg["epochs"] * steps_per_epoch
    if cfg.get("max_steps"):
        steps = min(steps, cfg["max_steps"]) if steps else cfg["max_steps"]
    if not steps:
        return None
    active = parameter_count(mcfg)["active"]
    micro_rows, length = _rows_and_length(stage, cfg)
    tokens = steps * cfg["accumulation_steps"] * micro_rows * length * gpus
    flops = (2 if stage == "eval" else 6) * active * tokens  # eval: forward passes only
    if stage in ("dpo", "distill", "grpo", "ppo"):
        flops *= 4 / 3  # a frozen reference's or teacher's forward pass
    seconds = flops / (_achieved_flops(stage, cfg, gpus) * gpus)
    if stage in ("grpo", "ppo"):
        seconds += steps * micro_rows * cfg["max_gen_len"] / H100_ROLLOUT_TOKENS_S
    return seconds


def _achieved_flops(stage: str, cfg: dict, gpus: int) -> float:
    """What one GPU achieves for this job's compile settings (as the engine applies them: CUDA graphs only for the
    supervised stages on one GPU)."""
    if not cfg.get("use_compile"):
        return H100_TFLOPS["eager"]
    graphs = cfg.get("compile_mode") == "reduce-overhead" and gpus == 1 and stage not in ("ppo", "grpo")
    return H100_TFLOPS["reduce-overhead" if graphs else "default"] * (TUNING_GAIN if cfg.get("compile_tuning") else 1)
