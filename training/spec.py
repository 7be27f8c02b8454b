"""The job spec: MiniMind's argument names, per-stage defaults and validation.

Pure Python (no torch) so the portal can validate a job before queueing it with exactly the rules the engine uses.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

STAGES = ("pretrain", "sft", "lora", "dpo", "distill", "ppo", "grpo", "eval")
TRAINING_STAGES = STAGES[:-1]  # "eval" measures a model and trains nothing

# Model architecture keys (MiniMind's config names) and their MiniMind-3 defaults.
MODEL_DEFAULTS = {
    "hidden_size": 768,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": None,  # None: MiniMind's ceil(hidden*pi/64)*64
    "vocab_size": 6400,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-6,
    "use_moe": False,
    "num_experts": 4,
    "num_experts_per_tok": 1,
    "moe_intermediate_size": None,
    "router_aux_loss_coef": 5e-4,
}

# Training keys shared by the supervised stages (MiniMind's trainer argument names plus ours).
TRAIN_DEFAULTS = {
    "epochs": 2,
    "batch_size": 32,
    "learning_rate": 5e-4,
    "accumulation_steps": 8,
    "grad_clip": 1.0,
    "log_interval": 100,
    "save_interval": 1000,
    "max_seq_len": 340,
    "dtype": "bfloat16",
    "max_steps": None,
    "seed": 42,
    "warmup_steps": 0,
    "eval_ratio": 0.01,  # share of rows held out for eval_loss (0 = none)
    "eval_interval": None,  # None: evaluate at every save_interval and at the end
    "use_compile": False,
    "compile_mode": "default",  # with use_compile: default, or reduce-overhead (CUDA graphs; one GPU, supervised)
    "compile_tuning": False,  # with use_compile on CUDA: inductor's coordinate-descent tuning of its kernels
    "group_by_length": False,  # batches of rows of similar length: less padding, but less varied batches
    "keep_checkpoints": 2,  # resume checkpoints kept: the last N plus the best by eval loss
}

# Keys only some stages take, with MiniMind's defaults (reference §3).
# RL: rollouts (max_gen_len new tokens at temperature 0.8), thinking opened with p = thinking_ratio, rewards mixed by
# weight from: rule (MiniMind's), exact / contains / numeric (against the record's gt/answer), regex, model.
RL_EXTRA = {"max_gen_len": 1024, "temperature": 0.8, "top_p": 1.0, "thinking_ratio": 0.9, "system_prompt_ratio": 0.2,
            "debug_interval": 20, "rewards": {"rule": 1.0}, "reward_regex": "", "reward_model_path": "",
            "eval_ratio": 0.0}
SFT_EXTRA = {"system_prompt_ratio": 0.2, "empty_think_drop_ratio": 0.8}
# several conversations per row, attending only to their own (training/rows.py): through a dense mask in SDPA
# ("mask"), or FlexAttention's block mask ("flex", CUDA only; the CPU uses the mask)
PACKED = {"packing": True, "packed_attention": "mask"}
PACKED_ATTENTION = ("mask", "flex")
STAGE_EXTRA = {
    "pretrain": {"packing": True},
    "sft": {**SFT_EXTRA, **PACKED},
    # lora_targets null: MiniMind's rule, every square nn.Linear (q/o_proj; k/v_proj too without GQA)
    "lora": {**SFT_EXTRA, **PACKED, "lora_rank": 16, "lora_alpha": 16, "lora_targets": None},
    "dpo": {"beta": 0.15, "empty_think_drop_ratio": 0.8, **PACKED},
    "distill": {**SFT_EXTRA, **PACKED, "alpha": 0.5, "temperature": 1.5},
    "ppo": {**RL_EXTRA, "critic_learning_rate": 5e-7, "clip_epsilon": 0.2, "vf_coef": 0.5, "kl_coef": 0.02,
            "gamma": 1.0, "lam": 0.95, "cliprange_value": 0.2, "ppo_update_iters": 2, "early_stop_kl": 0.25,
            "mini_batch_size": 2},
    "grpo": {**RL_EXTRA, "num_generations": 6, "beta": 0.1, "loss_type": "cispo", "epsilon": 0.2,
             "epsilon_high": 5.0},
    # eval: at most eval_records records of the dataset, plus accuracy_tasks held-out demo questions (0 = none).
    "eval": {"eval_records": 1000, "accuracy_tasks": 100, "max_gen_len": 64, "eval_ratio": 0.0},
}

# MiniMind's per-stage trainer defaults (reference §3, "Per-stage defaults").
STAGE_DEFAULTS = {
    "pretrain": {"epochs": 2, "batch_size": 32, "learning_rate": 5e-4, "accumulation_steps": 8,
                 "log_interval": 100, "save_interval": 1000, "max_seq_len": 340},
    "sft": {"epochs": 2, "batch_size": 16, "learning_rate": 1e-5, "accumulation_steps": 1,
            "log_interval": 100, "save_interval": 1000, "max_seq_len": 768},
    "lora": {"epochs": 10, "batch_size": 32, "learning_rate": 1e-4, "accumulation_steps": 1,
             "log_interval": 10, "save_interval": 1000, "max_seq_len": 340},
    "dpo": {"epochs": 1, "batch_size": 4, "learning_rate": 4e-8, "accumulation_steps": 1,
            "log_interval": 100, "save_interval": 100, "max_seq_len": 1024},
    "distill": {"epochs": 6, "batch_size": 32, "learning_rate": 5e-6, "accumulation_steps": 1,
                "log_interval": 100, "save_interval": 100, "max_seq_len": 340},
    "ppo": {"epochs": 1, "batch_size": 2, "learning_rate": 3e-7, "accumulation_steps": 1,
            "log_interval": 1, "save_interval": 10, "max_seq_len": 768},
    "grpo": {"epochs": 1, "batch_size": 2, "learning_rate": 3e-7, "accumulation_steps": 1,
             "log_interval": 1, "save_interval": 10, "max_seq_len": 768},
    "eval": {"epochs": 1, "batch_size": 16, "accumulation_steps": 1, "log_interval": 1, "max_seq_len": 512},
}

# The dataset kind each stage reads (docs/datasets.md: pretrain, sft, dpo, rlaif).
STAGE_DATASET_KIND = {"pretrain": "pretrain", "sft": "sft", "lora": "sft", "dpo": "dpo", "distill": "sft",
                      "ppo": "rlaif", "grpo": "rlaif", "eval": None}  # None: any kind

DTYPES = ("bfloat16", "float16", "float32")
NEEDS_BASE = ("lora", "dpo", "ppo", "grpo", "eval")  # stages that start from a trained model

COMPILE_MODES = ("default", "reduce-overhead")
_CHOICE_KEYS = {"dtype": DTYPES, "compile_mode": COMPILE_MODES, "packed_attention": PACKED_ATTENTION}
_INT_KEYS = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "vocab_size", "max_position_embeddings", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
             "epochs", "batch_size", "accumulation_steps", "log_interval", "save_interval", "max_seq_len",
             "max_steps", "seed", "warmup_steps", "eval_interval", "lora_rank", "keep_checkpoints", "max_gen_len",
             "debug_interval", "num_generations", "ppo_update_iters", "mini_batch_size", "eval_records",
             "accuracy_tasks"}
_FLOAT_KEYS = {"rope_theta", "rms_norm_eps", "router_aux_loss_coef", "learning_rate", "grad_clip", "eval_ratio",
               "system_prompt_ratio", "empty_think_drop_ratio", "lora_alpha", "beta", "alpha", "temperature",
               "top_p", "thinking_ratio", "epsilon", "epsilon_high", "critic_learning_rate", "clip_epsilon", "vf_coef",
               "kl_coef", "gamma", "lam", "cliprange_value", "early_stop_kl"}
_BOOL_KEYS = {"use_moe", "packing", "use_compile", "compile_tuning", "group_by_length"}
_RATIO_KEYS = {"eval_ratio", "system_prompt_ratio", "empty_think_drop_ratio", "alpha", "top_p", "thinking_ratio",
               "gamma", "lam"}
# Keys that must be > 0 when set; the rest of the integers must be >= 0.
_POSITIVE = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "vocab_size", "max_position_embeddings", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
             "epochs", "batch_size", "accumulation_steps", "log_interval", "save_interval", "max_steps",
             "learning_rate", "rope_theta", "rms_norm_eps", "eval_interval", "lora_rank", "lora_alpha",
             "temperature", "max_gen_len", "debug_interval", "num_generations", "ppo_update_iters", "mini_batch_size",
             "epsilon", "epsilon_high", "critic_learning_rate", "clip_epsilon", "early_stop_kl", "keep_checkpoints",
             "eval_records"}


def gettext_noop(message: str) -> str:
    """Marks a message for the portal's translation catalogue (Django's makemessages finds it); training/ itself stays
    free of Django and speaks English."""
    return message


def is_problem(value) -> bool:
    """A (template, params) pair (a list once it has been through JSON)."""
    return isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str) and isinstance(
        value[1], dict)


def render(template: str, params: dict | None, translate=gettext_noop) -> str:
    """``template % params`` with the template passed through ``translate`` (the portal's gettext), and so is every
    parameter that is itself a (template, params) pair ("dataset line 7: " and what is wrong with it, each from the
    catalogue). No params: the template as it is (no ``%`` formatting)."""
    if not params:
        return translate(template)
    return translate(template) % {k: render(*v, translate) if is_problem(v) else v for k, v in params.items()}


class Explained(ValueError):
    """An error the engine explains to the user: an English ``%(name)s`` template marked for the portal's catalogue
    and its parameters, sent as they are in the error event so that the job page shows it in the reader's language
    (training/__main__.py). ``str()`` is the English text (the engine's log)."""

    def __init__(self, template: str, **params):
        self.template, self.params = template, params
        super().__init__(render(template, params))


class SpecError(ValueError):
    """A spec or config problem. ``field`` names the offending key; ``str()`` is a one-line message. A message with
    ``params`` is a ``%(name)s`` template, so that the portal can show it in the user's language."""

    def __init__(self, field: str, message: str, **params):
        self.field, self.template, self.params = field, message, params
        super().__init__(f"{field}: {self.text()}")

    def text(self, translate=gettext_noop) -> str:
        """The message without its field, its template passed through ``translate`` (the portal's gettext)."""
        return render(self.template, self.params, translate)

    def explained(self) -> tuple[str, dict]:
        """(template, params) of the whole message, field first (the engine's error event)."""
        return gettext_noop("%(field)s: %(problem)s"), {"field": self.field, "problem": (self.template, self.params)}


def explanation(exc: BaseException) -> tuple[str, dict] | None:
    """The (template, params) of an error the engine explains (the portal shows it in the reader's language), or
    None for any other exception (its one English line is shown as it is)."""
    if isinstance(exc, SpecError):
        return exc.explained()
    template, params = getattr(exc, "template", None), getattr(exc, "params", None)
    return (template, params) if isinstance(template, str) and isinstance(params, dict) else None


def error_report(exc: BaseException) -> dict:
    """An error as the engine's JSON answers carry it (a conversion's report, a chat worker's answer): its one line,
    and where the engine explains it, ``template`` and ``params`` for the portal to translate."""
    report = {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    if explained := explanation(exc):
        report["template"], report["params"] = explained
    return report


def defaults_for(stage: str) -> dict:
    """All config keys with MiniMind's default for ``stage``."""
    if stage not in STAGES:
        raise SpecError(
            "stage",
            gettext_noop("unknown stage %(stage)s; choose one of %(stages)s"),
            stage=repr(stage),
            stages=", ".join(STAGES),
        )
    return {**MODEL_DEFAULTS, **TRAIN_DEFAULTS, **STAGE_DEFAULTS[stage], **STAGE_EXTRA[stage]}


def _coerce(key: str, value):
    if key == "rewards":
        if not isinstance(value, dict) or not value:
            raise SpecError(key, gettext_noop("must be an object of reward kind → weight"))
        for kind, weight in value.items():
            if kind not in ("rule", "exact", "contains", "numeric", "regex", "model"):
                raise SpecError(
                    key,
                    gettext_noop("unknown reward %(kind)s; use rule, exact, contains, numeric, regex or model"),
                    kind=repr(kind),
                )
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise SpecError(key, gettext_noop("the weight of %(kind)s must be a number"), kind=repr(kind))
        if not any(w for w in value.values()):
            raise SpecError(key, gettext_noop("at least one reward needs a non-zero weight"))
        return {k: float(v) for k, v in value.items()}
    if key == "loss_type":
        if value not in ("grpo", "cispo"):
            raise SpecError(key, gettext_noop("must be grpo or cispo, got %(value)s"), value=repr(value))
        return value
    if key in ("reward_regex", "reward_model_path"):
        if not isinstance(value, str):
            raise SpecError(key, gettext_noop("must be a string"))
        if key == "reward_regex" and value:
            import re

            try:
                re.compile(value)
            except re.error as exc:
                raise SpecError(
                    key, gettext_noop("not a valid regular expression (%(error)s)"), error=str(exc)
                ) from None
        return value
    if key == "lora_targets":
        if value is None:
            return None
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise SpecError(
                key, gettext_noop("must be a non-empty list of module names, got %(value)s"), value=repr(value)
            )
        return value
    if value is None:
        if key in ("max_steps", "intermediate_size", "moe_intermediate_size", "eval_interval"):
            return None
        raise SpecError(key, gettext_noop("must not be null"))
    if key in _BOOL_KEYS:
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
        raise SpecError(key, gettext_noop("must be true or false, got %(value)s"), value=repr(value))
    if key in _INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise SpecError(key, gettext_noop("must be an integer, got %(value)s"), value=repr(value))
        value = int(value)
    elif key in _FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpecError(key, gettext_noop("must be a number, got %(value)s"), value=repr(value))
        value = float(value)
    elif key in _CHOICE_KEYS:
        if value not in _CHOICE_KEYS[key]:
            raise SpecError(
                key,
                gettext_noop("must be one of %(choices)s, got %(value)s"),
                choices=", ".join(_CHOICE_KEYS[key]),
                value=repr(value),
            )
        return value
    if key in _RATIO_KEYS and not 0 <= value <= 1:
        raise SpecError(key, gettext_noop("must be between 0 and 1, got %(value)s"), value=repr(value))
    if key in _POSITIVE and value <= 0:
        raise SpecError(key, gettext_noop("must be greater than 0, got %(value)s"), value=repr(value))
    if value < 0:
        raise SpecError(key, gettext_noop("must not be negative, got %(value)s"), value=repr(value))
    return value


def resolve_config(stage: str, config: dict | None) -> dict:
    """Merge ``config`` over the stage defaults, checking names, types and cross-field rules."""
    merged = defaults_for(stage)
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise SpecError("config", gettext_noop("must be a JSON object"))
    for key, value in config.items():
        if key not in merged:
            raise SpecError(key, gettext_noop("unknown config key"))
        merged[key] = _coerce(key, value)
    if merged["hidden_size"] % merged["num_attention_heads"]:
        raise SpecError("num_attention_heads", gettext_noop("must divide hidden_size"))
    if merged["num_attention_heads"] % merged["num_key_value_heads"]:
        raise SpecError("num_key_value_heads", gettext_noop("must divide num_attention_heads"))
    if merged["num_experts_per_tok"] > merged["num_experts"]:
        raise SpecError("num_experts_per_tok", gettext_noop("must not exceed num_experts"))
    rewards = merged.get("rewards") or {}
    if rewards.get("regex") and not merged.get("reward_regex"):
        raise SpecError("reward_regex", gettext_noop("the regex reward needs a reward_regex"))
    if rewards.get("model") and not merged.get("reward_model_path"):
        raise SpecError("reward_model_path", gettext_noop("the model reward needs a local reward_model_path"))
    if stage == "ppo" and merged["accumulation_steps"] != 1:
        raise SpecError(
            "accumulation_steps", gettext_noop("PPO steps its optimizer on every mini-batch (mini_batch_size); use 1")
        )
    if merged["max_seq_len"] < 8:
        raise SpecError("max_seq_len", gettext_noop("must be at least 8"))
    if merged["max_seq_len"] > merged["max_position_embeddings"]:
        raise SpecError("max_seq_len", gettext_noop("must not exceed max_position_embeddings"))
    return merged


def halved_batch(stage: str, config: dict) -> dict:
    """The changes that halve a resolved config's batch size to fit in less memory: twice the accumulation steps keep
    the effective batch (PPO, which steps on every mini-batch, takes fewer rollouts per step instead)."""
    return {"batch_size": max(config["batch_size"] // 2, 1),
            "accumulation_steps": 1 if stage == "ppo" else config["accumulation_steps"] * 2}


def model_config(config: dict) -> dict:
    """The architecture part of a resolved config, with MiniMind's derived sizes filled in."""
    out = {k: config[k] for k in MODEL_DEFAULTS}
    if out["intermediate_size"] is None:
        out["intermediate_size"] = math.ceil(out["hidden_size"] * math.pi / 64) * 64
    if out["moe_intermediate_size"] is None:
        out["moe_intermediate_size"] = out["intermediate_size"]
    return out


def parameter_count(mcfg: dict) -> dict:
    """Total and active parameter counts of a MiniMind-3 model (tied embeddings counted once)."""
    h, layers, v = mcfg["hidden_size"], mcfg["num_hidden_layers"], mcfg["vocab_size"]
    head_dim = h // mcfg["num_attention_heads"]
    kv = mcfg["num_key_value_heads"] * head_dim
    attn = h * h * 2 + h * kv * 2 + head_dim * 2
    norms = 2 * h
    if mcfg["use_moe"]:
        expert = 3 * h * mcfg["moe_intermediate_size"]
        mlp_total = mcfg["num_experts"] * expert + h * mcfg["num_experts"]
        mlp_active = mcfg["num_experts_per_tok"] * expert + h * mcfg["num_experts"]
    else:
        mlp_total = mlp_active = 3 * h * mcfg["intermediate_size"]
    base = v * h + h
    return {"total": base + layers * (attn + norms + mlp_total), "active": base + layers * (attn + norms + mlp_active)}


def load_spec(path: str | Path) -> dict:
    """Read and validate a spec file; returns it with ``config`` fully resolved."""
    try:
        spec = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SpecError("spec", f"file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise SpecError("spec", f"not valid JSON ({exc})") from None
    return validate_spec(spec)


def validate_spec(spec: dict) -> dict:
    if not isinstance(spec, dict):
        raise SpecError("spec", "must be a JSON object")
    stage = spec.get("stage")
    if stage not in STAGES:
        raise SpecError("stage", f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    for key in ("run_dir", "dataset", "tokenizer"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise SpecError(key, "is required (a path)")
    for key in ("dataset", "tokenizer"):
        if not Path(spec[key]).exists():
            raise SpecError(key, f"path does not exist: {spec[key]}")
    if spec.get("eval_dataset") is not None:
        if not isinstance(spec["eval_dataset"], str) or not Path(spec["eval_dataset"]).exists():
            raise SpecError("eval_dataset", f"path does not exist: {spec['eval_dataset']}")
    base = spec.get("base_model")
    if base is not None:
        if not isinstance(base, dict) or not isinstance(base.get("path"), str):
            raise SpecError("base_model", "must be an object with a 'path'")
        if not Path(base["path"]).exists():
            raise SpecError("base_model", f"path does not exist: {base['path']}")
    teacher = spec.get("teacher_model")
    if stage == "distill":
        if not isinstance(teacher, dict) or not isinstance(teacher.get("path"), str):
            raise SpecError("teacher_model", "distillation needs a teacher model (an object with 'path' and 'config')")
        if not Path(teacher["path"]).exists():
            raise SpecError("teacher_model", f"path does not exist: {teacher['path']}")
    elif teacher is not None:
        raise SpecError("teacher_model", "only the distill stage takes a teacher model")
    if stage in NEEDS_BASE and base is None:
        raise SpecError("base_model", f"the {stage} stage starts from a trained model; give base_model")
    device = spec.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise SpecError("device", f"must be auto, cpu or cuda, got {device!r}")
    out = dict(spec)
    out["device"] = device
    config = spec.get("config") or {}
    if not isinstance(config, dict):
        raise SpecError("config", gettext_noop("must be a JSON object"))
    if base is not None and base.get("config"):
        # A base model fixes the architecture: its config wins over any architecture keys in the job's config.
        config = {**config, **{k: v for k, v in base["config"].items() if k in MODEL_DEFAULTS}}
    out["config"] = resolve_config(stage, config)
    out["resume"] = bool(spec.get("resume", False))
    return out


# The Hugging Face model types whose folders convert to MiniMind's .pth (training/convert.py; the portal checks an
# import's config.json against them without importing torch).
SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")
