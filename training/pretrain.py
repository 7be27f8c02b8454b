"""Pretraining: next-token prediction on ``{"text": ...}`` records (MiniMind's train_pretrain.py).

Packing (default) joins ``[bos] text [eos]`` documents into one stream cut into full ``max_seq_len`` rows, so no
compute is spent on padding; ``packing: false`` is MiniMind's padded mode (truncate to max_seq_len-2, wrap in
bos/eos, right-pad with 0, pad positions masked out of the loss).
"""
from __future__ import annotations

import json

import torch

from .tokenizer import BOS_ID, EOS_ID, PAD_ID


def read_texts(path: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"dataset line {lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f"dataset line {lineno}: a pretrain record needs a string field 'text'")
            texts.append(rec["text"])
    return texts


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


def loss_fn(model, x, y):
    out = model(input_ids=x, labels=y)
    aux = getattr(out, "aux_loss", None)
    aux = aux if aux is not None else out.loss.new_zeros(())
    return out.loss + aux, {"logits_loss": out.loss.item(), "aux_loss": float(aux)}


def run(spec: dict, model, tok):
    cfg = spec["config"]
    x, y = build_rows(read_texts(spec["dataset"]), tok, cfg["max_seq_len"], cfg["packing"])
    from .loop import train

    return train(spec, model, x, y, loss_fn)
