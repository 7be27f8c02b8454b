"""Knowledge distillation (MiniMind's train_distillation.py): a student learns from a teacher of another size.

loss = α · CE(student, assistant labels) [+ aux if the student is MoE] + (1 - α) · T² · KL(teacher_T ‖ student_T),
the KL a batch mean over assistant-label tokens; teacher logits are cut to the student's vocabulary. Packed rows
(``packing``, the default as for SFT) reach student and teacher alike, each conversation attending only to its own
tokens: every label's CE and KL term is the unpacked batch's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .loop import pick_device, train
from .model import aux_loss, freeze, packed_inputs
from .sft import load_rows


def distill_kl(student_logits, teacher_logits, mask, temperature: float):
    """T² · KL(teacher_T ‖ student_T) summed over classes, averaged over the masked positions."""
    s = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    t = F.softmax(teacher_logits[mask].float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean") * temperature**2


def make_loss(teacher, alpha: float, temperature: float):
    freeze(teacher)

    def loss_fn(model, batch):
        packed = packed_inputs(batch)
        out = model(input_ids=batch["x"], labels=batch["y"], **packed)
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["x"], **packed).logits
        vocab = out.logits.shape[-1]
        logits, t_logits = out.logits[:, :-1], t_logits[:, :-1, :vocab]
        mask = batch["y"][:, 1:] != -100
        kl = distill_kl(logits, t_logits, mask, temperature) if mask.any() else out.loss * 0
        aux = aux_loss(model)
        ce = out.loss + aux if aux is not None else out.loss
        loss = alpha * ce + (1 - alpha) * kl
        return loss, {"ce": out.loss.detach(), "distill": kl.detach(), "aux_loss": aux.detach() if aux is not None else 0.0}

    return loss_fn


def run(spec: dict, model, tok, teacher):
    cfg = spec["config"]
    teacher.to(pick_device(spec["device"]))
    return train(spec, model, load_rows(spec, tok), make_loss(teacher, cfg["alpha"], cfg["temperature"]),
                 stage_extra={"teacher_params": sum(p.numel() for p in teacher.parameters())},
                 load_rows=lambda s: load_rows(s, tok))
