"""Full supervised fine-tuning on conversations (MiniMind's train_full_sft.py).

Loss only on assistant spans (think blocks and tool-call text included); optional random identity system prompts
and empty-think dropping as in MiniMind (``system_prompt_ratio``, ``empty_think_drop_ratio``).
"""
from __future__ import annotations

from . import rows
from .loop import train
from .pretrain import lm_loss


def load_rows(spec: dict, tok):
    return rows.load(spec, tok, processing="sft")


def run(spec: dict, model, tok):
    return train(spec, model, load_rows(spec, tok), lm_loss, load_rows=lambda s: load_rows(s, tok))
