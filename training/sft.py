"""Full supervised fine-tuning on conversations (MiniMind's train_full_sft.py).

Loss only on assistant spans (think blocks and tool-call text included); optional random identity system prompts
and empty-think dropping as in MiniMind (``system_prompt_ratio``, ``empty_think_drop_ratio``).
"""
from __future__ import annotations

from .chat import check_sft, encode_conversations, read_jsonl
from .loop import train
from .pretrain import lm_loss


def load_rows(spec: dict, tok):
    cfg = spec["config"]
    convs = [r["conversations"] for r in read_jsonl(spec["dataset"], check_sft)]
    x, y = encode_conversations(tok, convs, cfg["max_seq_len"], cfg["seed"], cfg["system_prompt_ratio"],
                                cfg["empty_think_drop_ratio"])
    return {"x": x, "y": y}


def run(spec: dict, model, tok):
    return train(spec, model, load_rows(spec, tok), lm_loss, load_rows=lambda s: load_rows(s, tok))
