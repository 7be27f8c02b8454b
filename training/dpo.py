"""Direct preference optimisation (MiniMind's train_dpo.py).

Policy and a frozen reference (a copy of the base model) score [chosen; rejected]; per-sequence summed log-probs over
the assistant spans; loss = -log σ(β·((π_c - π_r) - (ref_c - ref_r))), mean over the batch, + MoE aux.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import rows
from .chat import sequence_logps
from .loop import pick_device, train
from .model import aux_loss, frozen_copy, packed_inputs


def dpo_loss(policy_c, policy_r, ref_c, ref_r, beta: float):
    logits = (policy_c - policy_r) - (ref_c - ref_r)
    return -F.logsigmoid(beta * logits).mean()


def load_rows(spec: dict, tok):
    return rows.load(spec, tok, processing="dpo")


def make_loss(reference, beta: float):
    def loss_fn(model, batch):
        if "doc" in batch:  # packed: the chosen sides are sequences 1..n, the rejected n+1..2n (rows.pack_rows)
            x, y, doc, extra = batch["x"], batch["y"], batch["doc"], packed_inputs(batch)
        else:
            x, y, doc, extra = torch.cat([batch["x"], batch["xr"]]), torch.cat([batch["y"], batch["yr"]]), None, {}
        with torch.no_grad():
            ref = sequence_logps(reference(input_ids=x, **extra).logits, y, doc)
        logps = sequence_logps(model(input_ids=x, **extra).logits, y, doc)
        aux = aux_loss(model)
        n = len(logps) // 2
        loss = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta)
        margin = ((logps[:n] - ref[:n]) - (logps[n:] - ref[n:])).mean().detach()
        parts = {"dpo_loss": loss.detach(), "aux_loss": aux.detach() if aux is not None else 0.0,
                 "reward_margin": beta * margin}
        return (loss + aux if aux is not None else loss), parts

    return loss_fn


def run(spec: dict, model, tok):
    reference = frozen_copy(model, pick_device(spec["device"]))
    return train(spec, model, load_rows(spec, tok), make_loss(reference, spec["config"]["beta"]),
                 load_rows=lambda s: load_rows(s, tok))
