"""The ``eval`` stage: measure a trained model, change nothing.

What it measures depends on the dataset's records (the first ``eval_records`` of them):
- ``text`` (pretrain) or ``conversations`` (SFT): held-out loss and perplexity on every real token (pretrain) or on
  the assistant spans (SFT), as the training stages compute them;
- ``chosen``/``rejected`` (DPO): loss on the chosen replies and the preference accuracy (the share of pairs whose
  chosen reply has the higher summed log-probability);
- rlaif prompts with an expected answer (``gt``/``answer``): greedy replies scored by exact, contains and numeric
  match (the verifiable rewards of the RL stages).
With ``accuracy_tasks`` > 0 it also asks that many held-out demo questions (drawn like the demo SFT data with a seed
it never used) and reports the share answered correctly. One ``eval`` event carries the metrics; ``done`` repeats
them as ``evaluation``.
"""
from __future__ import annotations

import math

import torch

from . import events, rows
from .chat import sequence_logps
from .generate import chat_replies, heldout_tasks
from .records import expected_answers, first_record, iter_records, kind_of
from .rl import match_rewards


@torch.no_grad()
def mean_loss(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over the labelled tokens, and their count."""
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        logits = model(input_ids=xb).logits[:, :-1].float()
        labels = yb[:, 1:]
        n = int((labels != -100).sum())
        if n:
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total, count = total + float(loss), count + n
    return total / max(count, 1), count


def _loss_metrics(loss: float, tokens: int) -> dict:
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def run(spec: dict, model, tok) -> dict:
    cfg = spec["config"]
    device = "cuda" if torch.cuda.is_available() and spec.get("device") != "cpu" else "cpu"
    model = model.to(device).eval()
    limit, bs = cfg["eval_records"], cfg["batch_size"]
    kind = kind_of(first_record(spec["dataset"]))
    events.emit("start", stage="eval", total_steps=1, steps_per_epoch=1, epochs=1, samples=limit, device=device,
                dataset_kind=kind)
    metrics: dict = {"records": 0}
    # the first eval_records records only, read and encoded here as the training stages' token cache would
    plain = {**cfg, "packing": False, "system_prompt_ratio": 0.0, "empty_think_drop_ratio": 0.0}
    if kind in ("pretrain", "sft"):
        recs = [r for _, r in iter_records(spec["dataset"], kind, limit)]
        data = rows.from_records(tok, kind, recs, plain).all()
        metrics.update(_loss_metrics(*mean_loss(model, data["x"], data["y"], bs, device)), records=len(recs))
    elif kind == "dpo":
        recs = [r for _, r in iter_records(spec["dataset"], kind, limit)]
        data = rows.from_records(tok, "dpo", recs, plain).all()
        cx, cy, rx, ry = data["x"], data["y"], data["xr"], data["yr"]
        metrics.update(_loss_metrics(*mean_loss(model, cx, cy, bs, device)), records=len(recs))
        wins = 0
        with torch.no_grad():
            for i in range(0, len(recs), bs):
                lc = sequence_logps(model(input_ids=cx[i:i + bs].to(device)).logits, cy[i:i + bs].to(device))
                lr = sequence_logps(model(input_ids=rx[i:i + bs].to(device)).logits, ry[i:i + bs].to(device))
                wins += int((lc > lr).sum())
        metrics["preference_accuracy"] = wins / max(len(recs), 1)
    else:
        recs = []
        for _, r in iter_records(spec["dataset"], kind):
            if expected_answers(r):
                recs.append(r)
                if len(recs) >= limit:
                    break
        questions = [r["conversations"][:-1] for r in recs]
        replies = chat_replies(model, tok, questions, max_new_tokens=cfg["max_gen_len"])
        scores = [match_rewards(text, expected_answers(r)) for text, r in zip(replies, recs)]
        for key in ("exact", "contains", "numeric"):
            metrics[f"{key}_accuracy"] = sum(s[key] for s in scores) / max(len(scores), 1)
        metrics["records"] = len(recs)
        for q, reply, score in list(zip(questions, replies, scores))[:3]:
            events.emit("sample", step=0, prompt=q[-1]["content"], response=reply, reward=score["exact"])
    if cfg["accuracy_tasks"]:
        tasks = heldout_tasks(cfg["accuracy_tasks"])
        replies = chat_replies(model, tok, [q for q, _ in tasks], max_new_tokens=cfg["max_gen_len"])
        metrics["demo_accuracy"] = sum(a in r for (_, a), r in zip(tasks, replies)) / len(tasks)
    events.emit("eval", step=0, metrics=metrics)
    return {"steps": 0, "evaluation": metrics}

