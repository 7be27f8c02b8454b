"""Greedy chat generation and a held-out accuracy check on verifiable demo tasks."""
from __future__ import annotations

import random

import torch

from .tokenizer import EOS_ID, PAD_ID


@torch.no_grad()
def chat_replies(model, tok, prompts: list, max_new_tokens: int = 32, batch_size: int = 32) -> list[str]:
    """Greedy replies to user prompts (strings) or whole conversations (lists of messages), rendered with the chat
    template (no thinking)."""
    model.eval()
    device = next(model.parameters()).device
    replies = []
    for i in range(0, len(prompts), batch_size):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}] if isinstance(p, str) else p,
                                         tokenize=False, add_generation_prompt=True)
                 for p in prompts[i:i + batch_size]]
        tok.padding_side = "left"
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOS_ID,
                             pad_token_id=PAD_ID)
        replies += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return replies


def heldout_tasks(n: int, seed: int = 99_991) -> list[tuple[str, str]]:
    """(question, expected answer) pairs drawn like the demo SFT data but with a seed it never used."""
    from .demo_data import _task

    rng = random.Random(seed)
    return [(q, a) for q, a, _ in (_task(rng) for _ in range(n))]


def task_accuracy(model, tok, tasks) -> float:
    replies = chat_replies(model, tok, [q for q, _ in tasks])
    return sum(a in r for (_, a), r in zip(tasks, replies)) / len(tasks)
