"""MiniMind-3 models through transformers' Qwen3 classes, and MiniMind's ``.pth`` key layout.

Dense: a MiniMind ``.pth`` has exactly the state_dict keys of ``Qwen3ForCausalLM`` (tied ``lm_head`` included).
MoE: ``Qwen3MoeForCausalLM`` (transformers 5) stores each layer's experts fused (``mlp.experts.gate_up_proj``
[E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]); MiniMind stores them per expert
(``mlp.experts.{e}.{gate,up,down}_proj.weight``). ``to_minimind``/``from_minimind`` convert between the two, and
``MoeAuxLoss`` adds MiniMind's own load-balancing loss (per layer, summed) instead of transformers' pooled one.
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3MLP, apply_rotary_pos_emb, eager_attention_forward
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention
from transformers.utils import logging as hf_logging

from .spec import Explained, gettext_noop

hf_logging.disable_progress_bar()


class _ExpertsInDtype:
    """An experts module seen with its fused weights cast to ``dtype`` (everything else is the module's own)."""

    def __init__(self, module, dtype):
        self._module = module
        self.gate_up_proj = module.gate_up_proj.to(dtype)
        self.down_proj = module.down_proj.to(dtype)

    def __getattr__(self, name):
        return getattr(self._module, name)


def grouped_mm_autocast(module, hidden_states, top_k_index, top_k_weights):
    """transformers' grouped-mm experts, made autocast-aware.

    ``grouped_mm`` is not covered by autocast, so with fp32 master weights transformers runs the experts in fp32 (and
    under torch.compile falls back to a loop). Here the weights are cast to the autocast dtype first, as autocast
    does for every ``nn.Linear``: the experts run in bf16 like the rest of the model; gradients reach the fp32 weights.
    """
    device = hidden_states.device.type
    if torch.is_autocast_enabled(device):
        module = _ExpertsInDtype(module, torch.get_autocast_dtype(device))
    return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register("grouped_mm_autocast", grouped_mm_autocast)
GPU_EXPERTS = "grouped_mm_autocast"  # the experts implementation used on CUDA


def sdpa_repeat_kv(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Causal self-attention as MiniMind calls it: k/v repeated per query head, then SDPA with ``is_causal``.

    transformers' ``sdpa`` passes ``enable_gqa`` instead, which on an H100 (torch 2.11) dispatches to cuDNN's attention;
    at MiniMind's shapes (head dim 96, 340 columns) the repeated k/v go to the flash kernel and dense pretraining ran
    20-27 % faster (docs/performance.md). Only for the mask-free, cache-free case (training, a prefill of the whole
    row); a FlexAttention block mask (packed rows, ``packed_attention: flex``) goes to transformers' FlexAttention;
    everything else is transformers' own SDPA path.
    """
    if isinstance(attention_mask, BlockMask):
        return flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if attention_mask is not None or query.shape[2] == 1 or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    groups = module.num_key_value_groups
    out = F.scaled_dot_product_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), dropout_p=dropout,
                                         scale=scaling, is_causal=True)
    return out.transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register("sdpa_repeat_kv", sdpa_repeat_kv)
# Its masks are SDPA's: without this, transformers treats an attention implementation it does not know as one that
# needs no mask (vLLM's, TGI's) and drops a 2D padding mask, so a left-padded row (a batch of rollouts, a chat beside
# longer ones) attended to its padding.
ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa_repeat_kv", sdpa_mask)
ATTENTION = "sdpa_repeat_kv"  # the engine's attention implementation


def _plain(*linears) -> bool:
    """Plain bias-free ``nn.Linear`` layers (not peft LoRA wrappers), whose weights may be read directly."""
    return all(type(m) is torch.nn.Linear and m.bias is None for m in linears)


def _fused_attention_forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
    """Qwen3 attention with q/k/v computed by one matmul (training and cache-free forward passes).

    The same arithmetic as transformers' forward, but one GEMM of width q+2kv instead of three narrow ones (and one
    input-gradient GEMM in backward); the weights keep their own parameters and state-dict keys, concatenated per call
    (under autocast the concatenation fuses with the cast to bf16 that autocast does anyway). q and k are cast to v's
    dtype after norm and RoPE, where autocast would cast them for attention anyway, so fp32 copies are not kept for
    backward. With a KV cache or LoRA-wrapped projections it is transformers' own forward.
    """
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    if cache is not None or not _plain(self.q_proj, self.k_proj, self.v_proj):
        return self._unfused_forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
    input_shape = hidden_states.shape[:-1]
    shape = (*input_shape, -1, self.head_dim)
    weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
    q, k, v = F.linear(hidden_states, weight).split(
        [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1)
    q = self.q_norm(q.view(shape)).transpose(1, 2)
    k = self.k_norm(k.view(shape)).transpose(1, 2)
    v = v.view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q, k = q.to(v.dtype), k.to(v.dtype)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, weights = attention(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _fused_mlp_forward(self, x):
    """SwiGLU with gate and up projections in one matmul (same parameters and keys as transformers' Qwen3MLP)."""
    if not _plain(self.gate_proj, self.up_proj):
        return self._unfused_forward(x)
    gate, up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight])).chunk(2, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


_FUSED_CLASSES = {cls: type(f"Fused{cls.__name__}", (cls,), {"forward": forward, "_unfused_forward": cls.forward})
                  for cls, forward in ((Qwen3Attention, _fused_attention_forward),
                                       (Qwen3MoeAttention, _fused_attention_forward),
                                       (Qwen3MLP, _fused_mlp_forward))}


def fuse_projections(model):
    """Switch every Qwen3 attention and dense MLP block of ``model`` to the fused-projection forward (in place;
    parameters, state-dict keys and results are unchanged; peft may still wrap the projections later)."""
    for module in model.modules():
        fused = _FUSED_CLASSES.get(type(module))
        if fused is not None:
            module.__class__ = fused
    return model


def hf_config(mcfg: dict, experts_implementation: str | None = None):
    """A Qwen3Config / Qwen3MoeConfig from MiniMind config names (``training.spec.model_config`` output)."""
    h, heads = mcfg["hidden_size"], mcfg["num_attention_heads"]
    common = dict(
        vocab_size=mcfg["vocab_size"], hidden_size=h, intermediate_size=mcfg["intermediate_size"],
        num_hidden_layers=mcfg["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=mcfg["num_key_value_heads"], head_dim=h // heads,
        max_position_embeddings=mcfg["max_position_embeddings"], rms_norm_eps=mcfg["rms_norm_eps"],
        rope_theta=mcfg["rope_theta"], tie_word_embeddings=True, use_sliding_window=False, hidden_act="silu",
        attention_bias=False, attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if not mcfg.get("use_moe"):
        return Qwen3Config(**common)
    extra = {"experts_implementation": experts_implementation} if experts_implementation else {}
    return Qwen3MoeConfig(
        **common, num_experts=mcfg["num_experts"], num_experts_per_tok=mcfg["num_experts_per_tok"],
        moe_intermediate_size=mcfg["moe_intermediate_size"], norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], output_router_logits=False, router_aux_loss_coef=mcfg["router_aux_loss_coef"], **extra)


def mcfg_from_hf(config) -> dict:
    """MiniMind config names from a transformers Qwen3/Qwen3Moe config (for models imported as HF folders)."""
    moe = getattr(config, "num_experts", None) is not None and config.model_type == "qwen3_moe"
    rope = getattr(config, "rope_theta", None)
    if rope is None:
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 1e6)
    out = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
           "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
           "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
           "max_position_embeddings": config.max_position_embeddings, "rope_theta": float(rope),
           "rms_norm_eps": config.rms_norm_eps, "use_moe": moe, "num_experts": 4, "num_experts_per_tok": 1,
           "moe_intermediate_size": config.intermediate_size, "router_aux_loss_coef": 5e-4}
    if moe:
        out.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                   moe_intermediate_size=config.moe_intermediate_size,
                   router_aux_loss_coef=getattr(config, "router_aux_loss_coef", 5e-4))
    return out


class MoeAuxLoss:
    """MiniMind's router load-balancing loss, collected by forward hooks on every router.

    Per layer: ``E · coef · Σ_k Σ_e (fraction of tokens whose k-th choice is e) · (mean router prob of e)``, summed
    over layers; only in training mode. Read ``.value`` after a forward pass.
    """

    def __init__(self, model, num_experts: int, coef: float):
        self.num_experts, self.coef, self.terms = num_experts, coef, []
        self.routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
        # Bound methods, not closures: a deepcopy of the model (DPO/RL reference, PPO critic) gets its own collector.
        model.register_forward_pre_hook(self._clear)
        for router in self.routers:
            router.register_forward_hook(self._hook)

    def _clear(self, module, args):
        self.terms.clear()

    def _hook(self, module, inputs, output):
        if not module.training or self.coef <= 0:
            return
        router_logits, _, top_k_index = output
        scores = torch.softmax(router_logits.float(), dim=-1)
        load = torch.nn.functional.one_hot(top_k_index, self.num_experts).float().mean(0)
        self.terms.append((load * scores.mean(0)).sum() * self.num_experts * self.coef)

    @property
    def value(self):
        return torch.stack(self.terms).sum() if self.terms else None


def freeze(model):
    """Eval mode and no gradients: a DPO/RL reference or a distillation teacher."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_copy(model, device):
    """A frozen copy of the starting model on ``device`` (the DPO and RL reference)."""
    import copy

    return freeze(copy.deepcopy(model).to(device))


def build_model(mcfg: dict, experts_implementation: str | None = None, fused: bool = True, attention: str = ATTENTION,
                init: bool = True):
    """A transformers Qwen3/Qwen3Moe model for MiniMind config names, with the engine's faster attention call and
    fused projections (``attention="sdpa"``, ``fused=False``: transformers' own; the results are the same).
    ``init=False``: the weights are left as allocated, for a caller that loads every one of them next (``load_model``:
    the random initialisation is ~80 % of a load's time on a CPU and draws from the seeded generator for nothing);
    the embedding and the head are tied as usual."""
    config = hf_config(mcfg, experts_implementation)
    cls = Qwen3MoeForCausalLM if mcfg.get("use_moe") else Qwen3ForCausalLM
    if init:
        model = cls(config)
    else:
        from transformers.initialization import no_init_weights

        with no_init_weights():  # what from_pretrained does before it loads (it skips the ties too: tied below)
            model = cls(config)
        model.tie_weights()
    model = model.to(torch.get_default_dtype())
    if attention != "sdpa":
        model.set_attn_implementation(attention)
    if fused:
        fuse_projections(model)
    if mcfg.get("use_moe"):
        model.minimind_aux = MoeAuxLoss(model, mcfg["num_experts"], mcfg["router_aux_loss_coef"])
    return model


def packed_inputs(batch: dict) -> dict:
    """The model arguments of a packed batch (training.rows.pack_rows): positions restarting at each sequence and a
    boolean attention mask [rows, 1, L, L] letting a column see only earlier columns of its own sequence (padding sees
    padding, so no row of the mask is empty), or the same mask as FlexAttention's blocks where the loop made one
    (``block_mask``). ``{}`` for an unpacked batch."""
    if "doc" not in batch:
        return {}
    if "block_mask" in batch:
        return {"position_ids": batch["pos"], "attention_mask": batch["block_mask"]}
    doc = batch["doc"]
    width = doc.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=doc.device).tril()
    return {"position_ids": batch["pos"], "attention_mask": ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]}


def block_mask(doc: torch.Tensor) -> BlockMask:
    """``packed_inputs``' mask for FlexAttention (``packed_attention: flex``, CUDA: FlexAttention has no backward on
    the CPU): the same rule, kept as blocks of 128 × 128 of which only those on the diagonal's sequences are
    computed, instead of a dense [rows, 1, L, L] mask that SDPA's flash kernel cannot take."""
    def same_sequence(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (q >= kv)

    return create_block_mask(same_sequence, doc.shape[0], None, doc.shape[1], doc.shape[1], device=doc.device)


def aux_loss(model):
    """MiniMind's MoE aux loss of the last forward pass (None for dense models or in eval mode)."""
    core = getattr(model, "module", model)
    core = getattr(core, "_orig_mod", core)
    for m in (core, getattr(getattr(core, "base_model", None), "model", None)):
        if m is not None and hasattr(m, "minimind_aux"):
            return m.minimind_aux.value
    return None


_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_SPLIT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def to_minimind(sd: dict) -> dict:
    """transformers-5 keys → MiniMind keys (unfuse experts; dense state dicts pass through)."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("module.").removeprefix("_orig_mod.")
        m = _FUSED.match(key)
        if not m:
            out[key] = value
        elif m.group(2) == "gate_up_proj":
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{m.group(1)}.{e}.gate_proj.weight"] = value[e, :inter]
                out[f"{m.group(1)}.{e}.up_proj.weight"] = value[e, inter:]
        else:
            for e in range(value.shape[0]):
                out[f"{m.group(1)}.{e}.down_proj.weight"] = value[e]
    return out


def from_minimind(sd: dict) -> dict:
    """MiniMind keys → transformers-5 keys (fuse per-expert weights; dense state dicts pass through)."""
    out, experts = {}, {}
    for key, value in sd.items():
        key = key.removeprefix("module.").removeprefix("_orig_mod.")
        m = _SPLIT.match(key)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = value
        else:
            out[key] = value
    for prefix, parts in experts.items():
        try:
            gate = [parts["gate_proj"][e] for e in sorted(parts["gate_proj"])]
            up = [parts["up_proj"][e] for e in sorted(parts["up_proj"])]
            down = [parts["down_proj"][e] for e in sorted(parts["down_proj"])]
        except KeyError as exc:
            raise Explained(gettext_noop("checkpoint does not match the model config: %(problems)s"),
                            problems=f"{prefix} lacks {exc.args[0]}") from None
        out[f"{prefix}.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
        out[f"{prefix}.down_proj"] = torch.stack(down)
    return out


def minimind_state_dict(model, dtype=torch.float16) -> dict:
    """The model's weights in MiniMind's ``.pth`` layout (plain dict, CPU tensors, fp16 by default)."""
    core = getattr(model, "module", model)
    sd = getattr(core, "_orig_mod", core).state_dict()
    if "lm_head.weight" not in sd:  # MiniMind stores the tied head under both keys
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return {k: v.detach().to("cpu", dtype).clone() for k, v in to_minimind(sd).items()}


def save_state_dict(sd: dict, path) -> None:
    tmp = f"{path}.tmp"
    torch.save(sd, tmp)
    os.replace(tmp, path)


def save_pth(model, path, dtype=torch.float16) -> None:
    save_state_dict(minimind_state_dict(model, dtype), path)


def check_state_dict(model, sd: dict) -> None:
    """Raise an Explained ValueError naming missing/unexpected keys and shape mismatches."""
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
        raise Explained(gettext_noop("checkpoint does not match the model config: %(problems)s"),
                        problems=" | ".join(problems))


def load_pth(model, path) -> None:
    """Load a MiniMind ``.pth`` strictly (dense or MoE), after a check that names what does not fit."""
    sd = from_minimind(torch.load(path, map_location="cpu", weights_only=True))
    check_state_dict(model, sd)
    model.load_state_dict(sd, strict=True)


def load_model(entry: dict, experts_implementation: str | None = None):
    """(model, mcfg) from a spec's ``base_model``/``teacher_model`` entry: a MiniMind ``.pth`` with its ``config``
    (MiniMind names), or a Hugging Face folder (Qwen3 / Qwen3Moe ``config.json`` + weights)."""
    from pathlib import Path

    from .spec import model_config, resolve_config

    path = Path(entry["path"])
    if path.is_dir():
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        mcfg = mcfg_from_hf(hf.config)
        model = build_model(mcfg, experts_implementation, init=False)
        sd = hf.state_dict()
        if "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        check_state_dict(model, sd)
        model.load_state_dict(sd, strict=True)
        return model, mcfg
    arch = {k: v for k, v in (entry.get("config") or {}).items() if k in _ARCH_KEYS}
    mcfg = model_config(resolve_config("pretrain", arch))
    model = build_model(mcfg, experts_implementation, init=False)
    load_pth(model, path)
    return model, mcfg


_ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps", "use_moe", "num_experts",
              "num_experts_per_tok", "moe_intermediate_size", "router_aux_loss_coef")
