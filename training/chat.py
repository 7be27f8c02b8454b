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

# Identity system prompts MiniMind-style SFT adds to tool-free conversations that have none (p = system_prompt_ratio).
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are MiniMind, a small and helpful language model.",
    "You are a concise assistant. Answer briefly and correctly.",
    "You are a friendly AI assistant.",
    "You are an assistant that answers questions accurately.",
    "你是一个乐于助人的助手。",
    "你是 MiniMind，一个小巧而有用的语言模型。",
    "你是一个简洁的助手，请简短而准确地回答。",
    "你是一个友好的人工智能助手。",
    "你是一个知识丰富的 AI 助手。",
]
EMPTY_THINK = "<think>\n\n</think>\n\n"


def load_hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def read_jsonl(path: str, check) -> list[dict]:
    """Records of a JSONL file, each checked by ``check(record) -> error or None``; errors name the line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"dataset line {lineno}: not valid JSON ({exc.msg})") from None
            problem = check(rec)
            if problem:
                raise ValueError(f"dataset line {lineno}: {problem}")
            records.append(rec)
    return records


def check_messages(msgs) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return "needs a non-empty list of messages"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            return f"message {i + 1} needs a role of system, user, assistant or tool"
        if not isinstance(m.get("content", ""), str):
            return f"message {i + 1}: content must be a string"
    if not any(m["role"] == "assistant" for m in msgs):
        return "has no assistant message to learn from"
    return None


def check_sft(rec) -> str | None:
    if not isinstance(rec, dict) or "conversations" not in rec:
        return "an SFT record needs a 'conversations' list"
    return check_messages(rec["conversations"])


def check_dpo(rec) -> str | None:
    if not isinstance(rec, dict) or "chosen" not in rec or "rejected" not in rec:
        return "a DPO record needs 'chosen' and 'rejected' conversations"
    return check_messages(rec["chosen"]) or check_messages(rec["rejected"])


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
    if rng is not None and not tools and msgs[0]["role"] != "system" and rng.random() < system_prompt_ratio:
        msgs = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + msgs
    text = tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    if rng is not None and EMPTY_THINK in text and rng.random() < empty_think_drop_ratio:
        text = text.replace(EMPTY_THINK, "")
    return text


class SpanMasker:
    """Finds assistant spans in token ids by MiniMind's markers."""

    def __init__(self, tok):
        self.start = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.end = tok.encode("<|im_end|>\n", add_special_tokens=False)

    def labels(self, ids: list[int]) -> list[int]:
        labels = [-100] * len(ids)
        i, n, s, e = 0, len(ids), len(self.start), len(self.end)
        while i < n:
            if ids[i:i + s] == self.start:
                j = i + s
                while j < n and ids[j:j + e] != self.end:
                    j += 1
                stop = min(j + e, n)
                labels[i + s:stop] = ids[i + s:stop]
                i = stop
            else:
                i += 1
        return labels


def encode_conversations(tok, conversations: list[list[dict]], max_seq_len: int, seed: int = 42,
                         system_prompt_ratio: float = 0.0, empty_think_drop_ratio: float = 0.0):
    """(input_ids, labels) LongTensors [N, max_seq_len] for SFT-style training."""
    rng = random.Random(seed)
    masker = SpanMasker(tok)
    texts = [render(tok, msgs, rng, system_prompt_ratio, empty_think_drop_ratio) for msgs in conversations]
    x = torch.full((len(texts), max_seq_len), PAD_ID, dtype=torch.long)
    y = torch.full((len(texts), max_seq_len), -100, dtype=torch.long)
    for i, enc in enumerate(tok(texts, add_special_tokens=False)["input_ids"]):
        ids = enc[:max_seq_len]
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(ids)] = torch.tensor(masker.labels(ids))
    return x, y


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum of log-probs of the (shifted) labels where labels != -100."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = torch.gather(logp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)
