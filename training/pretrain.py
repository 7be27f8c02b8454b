"""Pretraining: next-token prediction on ``{"text": ...}`` records (MiniMind's train_pretrain.py).

Packing (default) joins ``[bos] text [eos]`` documents into one stream cut into full ``max_seq_len`` rows, so no
compute is spent on padding; ``packing: false`` is MiniMind's padded mode (truncate to max_seq_len-2, wrap in
bos/eos, right-pad with 0, pad positions masked out of the loss). Both read the same token cache (training/rows.py).
Loss = CE (+ MoE aux).
"""
from __future__ import annotations

from . import rows
from .loop import train
from .model import aux_loss, packed_inputs


def lm_loss(model, batch):
    """CE on the labels plus MiniMind's MoE aux loss; shared by pretrain and SFT."""
    out = model(input_ids=batch["x"], labels=batch["y"], **packed_inputs(batch))
    aux = aux_loss(model)
    if aux is None:
        return out.loss, {"logits_loss": out.loss.detach(), "aux_loss": 0.0}
    return out.loss + aux, {"logits_loss": out.loss.detach(), "aux_loss": aux.detach()}


def load_rows(spec: dict, tok):
    return rows.load(spec, tok, processing="pretrain")


def run(spec: dict, model, tok):
    return train(spec, model, load_rows(spec, tok), lm_loss, load_rows=lambda s: load_rows(s, tok))
