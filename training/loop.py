"""The optimizer loop shared by the supervised stages: MiniMind's schedule, accumulation, clipping, mixed precision,
events, checkpoints every ``save_interval`` and on SIGTERM, and exact resume (model, optimizer, scaler, RNG, data
position)."""
from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import events
from .model import save_pth

EXIT_STOPPED = 143  # stopped on SIGTERM after a checkpoint (128 + SIGTERM)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints at the next optimizer step and exits."""

    def __init__(self):
        self.set = False
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        self.set = True


def pick_device(requested: str) -> str:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    """MiniMind's cosine from lr to lr/10 over the run, after an optional linear warm-up."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(total, 1))))


def _rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(spec: dict, model, inputs: torch.Tensor, labels: torch.Tensor, loss_fn, stage_extra: dict | None = None):
    """Train ``model`` on rows of ``inputs``/``labels`` (equal-shape LongTensors).

    ``loss_fn(model, x, y) -> (loss, parts)`` returns the total loss and a dict of its parts (floats) to log.
    Returns the number of optimizer steps done.
    """
    cfg = spec["config"]
    run_dir = Path(spec["run_dir"])
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    resume_path = ckpt_dir / "resume.pt"
    device = pick_device(spec["device"])
    is_cuda = device.startswith("cuda")
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg["dtype"])
    autocast = torch.autocast("cuda", dtype=amp_dtype) if is_cuda and amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=is_cuda and cfg["dtype"] == "float16")
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["learning_rate"], fused=is_cuda)

    n_rows, bs, accum = inputs.shape[0], cfg["batch_size"], cfg["accumulation_steps"]
    if n_rows == 0:
        raise ValueError("dataset: no training samples after tokenization")
    iters = math.ceil(n_rows / bs)
    steps_per_epoch = math.ceil(iters / accum)
    total_steps = cfg["epochs"] * steps_per_epoch
    if cfg["max_steps"]:
        total_steps = min(total_steps, cfg["max_steps"])

    step, epoch, micro = 0, 0, 0
    tokens_seen = 0
    if spec.get("resume") and resume_path.exists():
        ck = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        step, epoch, micro, tokens_seen = ck["step"], ck["epoch"], ck["micro"], ck.get("tokens_seen", 0)
        _set_rng_state(ck["rng"])
        events.log(f"resumed from step {step} (epoch {epoch + 1}, batch {micro})")
    else:
        torch.manual_seed(cfg["seed"])

    def save_checkpoint():
        tmp = resume_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "step": step, "epoch": epoch, "micro": micro, "tokens_seen": tokens_seen, "rng": _rng_state(),
                    "world_size": 1, "config": cfg}, tmp)
        os.replace(tmp, resume_path)
        save_pth(model, run_dir / "model.pth")
        events.emit("checkpoint", step=step, path=str(resume_path))

    stop = StopFlag()
    events.emit("start", stage=spec["stage"], total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                epochs=cfg["epochs"], samples=n_rows, device=device, resumed_from_step=step, **(stage_extra or {}))
    t_log, tok_log = time.time(), tokens_seen
    t_start, step_start = time.time(), step
    acc_loss, acc_parts, acc_n = 0.0, {}, 0
    while step < total_steps and epoch < cfg["epochs"]:
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg["seed"] + epoch))
        while micro < iters and step < total_steps:
            idx = order[micro * bs:(micro + 1) * bs]
            x, y = inputs[idx].to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
            lr = lr_at(step, total_steps, cfg["learning_rate"], cfg["warmup_steps"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                loss, parts = loss_fn(model, x, y)
            scaler.scale(loss / accum).backward()
            acc_loss += loss.item()
            for k, v in parts.items():
                acc_parts[k] = acc_parts.get(k, 0.0) + v
            acc_n += 1
            tokens_seen += int((y != -100).sum())
            micro += 1
            if micro % accum and micro < iters:
                continue
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]).item()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % cfg["log_interval"] == 0 or step == total_steps or step == 1:
                now = time.time()
                rate = (step - step_start) / max(now - t_start, 1e-9)
                metrics = {"loss": acc_loss / acc_n, **{k: v / acc_n for k, v in acc_parts.items()}, "lr": lr,
                           "grad_norm": grad_norm, "tokens_per_s": (tokens_seen - tok_log) / max(now - t_log, 1e-9),
                           "tokens": tokens_seen}
                if is_cuda:
                    metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                events.emit("step", step=step, total_steps=total_steps, epoch=epoch + 1, metrics=metrics,
                            eta_s=round((total_steps - step) / max(rate, 1e-9), 1))
                t_log, tok_log = now, tokens_seen
            acc_loss, acc_parts, acc_n = 0.0, {}, 0
            if stop.set:
                save_checkpoint()
                events.log(f"stopped by signal at step {step}; resume continues from here")
                raise SystemExit(EXIT_STOPPED)
            if step % cfg["save_interval"] == 0 and step < total_steps:
                save_checkpoint()
        if micro >= iters:
            epoch, micro = epoch + 1, 0
    save_checkpoint()
    return step
