"""Pretraining: next-token prediction on ``{"text": ...}`` records (MiniMind's train_pretrain.py).

Packing (default) joins ``[bos] text [eos]`` documents into one stream cut into full ``max_seq_len`` rows, so no
compute is spent on padding; ``packing: false`` is MiniMind's padded mode (truncate to max_seq_len-2, wrap in
bos/eos, right-pad with 0, pad positions masked out of the loss). Loss = CE (+ MoE aux).
"""
from __future__ import annotations

import torch

from .chat import read_jsonl
from .loop import train
from .model import aux_loss
from .tokenizer import BOS_ID, EOS_ID, PAD_ID


def check(rec) -> str | None:
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        return "a pretrain record needs a string field 'text'"
    return None


def build_rows(texts: list[str], tok, max_seq_len: int, packing: bool) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    if packing:
        stream = []
        for ids in encoded:
            stream += [BOS_ID, *ids, EOS_ID]
        n = len(stream) // max_seq_len
        x = torch.tensor(stream[: n * max_seq_len], dtype=torch.long).view(n, max_seq_len)
        return x, x.clone()
    x = torch.full((len(encoded), max_seq_len), PAD_ID, dtype=torch.long)
    for i, ids in enumerate(encoded):
        row = [BOS_ID, *ids[: max_seq_len - 2], EOS_ID]
        x[i, : len(row)] = torch.tensor(row)
    y = x.clone()
    y[x == PAD_ID] = -100
    return x, y


def lm_loss(model, batch):
    """CE on the labels plus MiniMind's MoE aux loss; shared by pretrain and SFT."""
    out = model(input_ids=batch["x"], labels=batch["y"])
    aux = aux_loss(model)
    if aux is None:
        return out.loss, {"logits_loss": out.loss.detach(), "aux_loss": 0.0}
    return out.loss + aux, {"logits_loss": out.loss.detach(), "aux_loss": aux.detach()}


def load_rows(spec: dict, tok) -> dict:
    cfg = spec["config"]
    texts = [r["text"] for r in read_jsonl(spec["dataset"], check)]
    x, y = build_rows(texts, tok.backend_tokenizer, cfg["max_seq_len"], cfg["packing"])
    return {"x": x, "y": y}


def run(spec: dict, model, tok):
    return train(spec, model, load_rows(spec, tok), lm_loss, load_rows=lambda s: load_rows(s, tok))
