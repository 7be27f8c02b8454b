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

import json
import math

import torch

from . import events
from .chat import check_dpo, check_sft, encode_conversations, read_jsonl, sequence_logps
from .generate import chat_replies, heldout_tasks
from .rl import check_rlaif, expected_answers, match_rewards


def _first_record(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return json.loads(line)
    raise ValueError("dataset: no records")


def kind_of(rec: dict) -> str:
    if "text" in rec:
        return "pretrain"
    if "chosen" in rec:
        return "dpo"
    if "gt" in rec or "answer" in rec:
        return "rlaif"
    if "conversations" in rec:
        return "sft"
    raise ValueError("dataset: records need text, conversations, chosen/rejected, or conversations with gt")


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
    from .pretrain import build_rows, check

    cfg = spec["config"]
    device = "cuda" if torch.cuda.is_available() and spec.get("device") != "cpu" else "cpu"
    model = model.to(device).eval()
    limit, bs, msl = cfg["eval_records"], cfg["batch_size"], cfg["max_seq_len"]
    kind = kind_of(_first_record(spec["dataset"]))
    events.emit("start", stage="eval", total_steps=1, steps_per_epoch=1, epochs=1, samples=limit, device=device,
                dataset_kind=kind)
    metrics: dict = {"records": 0}
    if kind == "pretrain":
        texts = [r["text"] for r in read_jsonl(spec["dataset"], check)[:limit]]
        x, y = build_rows(texts, tok.backend_tokenizer, msl, False)
        metrics.update(_loss_metrics(*mean_loss(model, x, y, bs, device)), records=len(texts))
    elif kind == "sft":
        convs = [r["conversations"] for r in read_jsonl(spec["dataset"], check_sft)[:limit]]
        x, y = encode_conversations(tok, convs, msl, cfg["seed"])
        metrics.update(_loss_metrics(*mean_loss(model, x, y, bs, device)), records=len(convs))
    elif kind == "dpo":
        recs = read_jsonl(spec["dataset"], check_dpo)[:limit]
        cx, cy = encode_conversations(tok, [r["chosen"] for r in recs], msl, cfg["seed"])
        rx, ry = encode_conversations(tok, [r["rejected"] for r in recs], msl, cfg["seed"])
        metrics.update(_loss_metrics(*mean_loss(model, cx, cy, bs, device)), records=len(recs))
        wins = 0
        with torch.no_grad():
            for i in range(0, len(recs), bs):
                lc = sequence_logps(model(input_ids=cx[i:i + bs].to(device)).logits, cy[i:i + bs].to(device))
                lr = sequence_logps(model(input_ids=rx[i:i + bs].to(device)).logits, ry[i:i + bs].to(device))
                wins += int((lc > lr).sum())
        metrics["preference_accuracy"] = wins / max(len(recs), 1)
    else:
        recs = [r for r in read_jsonl(spec["dataset"], check_rlaif) if expected_answers(r)][:limit]
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

