"""Conversations → token rows with MiniMind's assistant-span labels (SFT, LoRA, DPO, distillation).

A conversation is rendered with the tokenizer's chat template (MiniMind's), tokenized without adding specials,
truncated and right-padded with 0. Labels are -100 everywhere except each assistant span: from right after
``<|im_start|>assistant\\n`` through the closing ``<|im_end|>\\n`` inclusive (think block, tool-call text, end marker).
"""
from __future__ import annotations

import json
import random

import torch

from .tokenizer import PAD_ID

# MiniMind's own identity system prompts (dataset/lm_dataset.py), added to tool-free conversations without one with
# probability system_prompt_ratio.
SYSTEM_PROMPTS = [
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
    "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。",
    "你是minimind，请尽力帮助用户解决问题。",
    "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.",
    "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model.",
]
EMPTY_THINK = "<think>\n\n</think>\n\n"


def load_hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _prepare(msgs: list[dict]) -> tuple[list[dict], list | None]:
    """MiniMind's stored form → template form: JSON-string ``tools``/``tool_calls`` decoded."""
    out, tools = [], None
    for m in msgs:
        m = dict(m)
        if m.get("tools"):
            tools = json.loads(m.pop("tools")) if isinstance(m["tools"], str) else m.pop("tools")
        else:
            m.pop("tools", None)
        if m.get("tool_calls"):
            m["tool_calls"] = json.loads(m["tool_calls"]) if isinstance(m["tool_calls"], str) else m["tool_calls"]
        else:
            m.pop("tool_calls", None)
        if not m.get("reasoning_content"):
            m.pop("reasoning_content", None)
        out.append(m)
    return out, tools


def render(tok, msgs: list[dict], rng: random.Random | None = None, system_prompt_ratio: float = 0.0,
           empty_think_drop_ratio: float = 0.0) -> str:
    msgs, tools = _prepare(msgs)
    msgs = with_system_prompt(msgs, tools, rng, system_prompt_ratio)
    text = tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    if rng is not None and EMPTY_THINK in text and rng.random() < empty_think_drop_ratio:
        text = text.replace(EMPTY_THINK, "")
    return text


def with_system_prompt(msgs: list[dict], tools, rng: random.Random | None, ratio: float) -> list[dict]:
    if rng is not None and not tools and msgs[0]["role"] != "system" and rng.random() < ratio:
        return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + msgs
    return msgs


def prompt_text(tok, msgs: list[dict], rng: random.Random | None = None, system_prompt_ratio: float = 0.0,
                thinking_ratio: float = 0.0) -> str:
    """An RL prompt (the conversation before the placeholder answer) with the generation prompt, thinking opened with
    probability ``thinking_ratio`` (MiniMind's GRPO/PPO)."""
    msgs, tools = _prepare(msgs)
    msgs = with_system_prompt(msgs, tools, rng, system_prompt_ratio)
    think = thinking_ratio >= 1.0 or (rng is not None and rng.random() < thinking_ratio)
    return tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True,
                                   open_thinking=think)


def encode_conversations(tok, conversations: list[list[dict]], max_seq_len: int, seed: int = 42,
                         system_prompt_ratio: float = 0.0, empty_think_drop_ratio: float = 0.0):
    """(input_ids, labels) LongTensors [N, max_seq_len] of a few conversations, as the SFT stages see them (the
    token cache's encoder, in memory)."""
    from .token_cache import Encoder

    opts = {"system_prompt_ratio": system_prompt_ratio, "empty_think_drop_ratio": empty_think_drop_ratio,
            "seed": seed}
    rows = Encoder(tok, "sft", opts).rows([(i, {"conversations": c}) for i, c in enumerate(conversations)])
    x = torch.full((len(conversations), max_seq_len), PAD_ID, dtype=torch.long)
    y = torch.full((len(conversations), max_seq_len), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(zip(rows["x"], rows["x.mask"])):
        ids, mask = torch.from_numpy(ids[:max_seq_len].astype("int64")), torch.from_numpy(mask[:max_seq_len])
        x[i, :len(ids)] = ids
        y[i, :len(ids)] = torch.where(mask.bool(), ids, -100)
    return x, y


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, doc: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence sum of log-probs of the (shifted) labels where labels != -100: one per row, or with ``doc`` (a
    packed batch, training.rows.pack_rows) one per packed sequence, in sequence order."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = torch.gather(logp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if doc is None:
        return (picked * mask).sum(-1)
    seq = doc[:, 1:].reshape(-1)  # a label's sequence is its own column's
    out = torch.zeros(int(doc.max()) + 1, dtype=picked.dtype, device=picked.device)
    return out.index_add_(0, seq, (picked * mask).reshape(-1))[1:]
