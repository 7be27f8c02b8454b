"""The optimizer loop shared by the supervised stages.

MiniMind's cosine schedule (lr → lr/10, optional warm-up), gradient accumulation, clipping, mixed precision
(autocast on CUDA, GradScaler for fp16), fused AdamW on CUDA, optional torch.compile, DDP under torchrun (NCCL on
GPUs, gloo on the CPU), an eval split, events, checkpoints every ``save_interval`` / at the end / on SIGTERM, and
exact resume (model, optimizer, scaler, RNG states and data position).

Data is a ``rows.Rows`` view of the job's token cache (batches read by index, padded per batch);
``loss_fn(model, batch) -> (loss, parts)`` gives the total loss and
a dict of values to log (floats or detached 0-d tensors, read only at log time so the host never waits for the
device between micro-steps). ``batch["y"]`` holds labels (-100 = not trained) and is used to count tokens.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from . import events
from .model import block_mask, save_pth
from .records import no_samples
from .spec import Explained, gettext_noop

EXIT_STOPPED = 143  # stopped on SIGTERM after a checkpoint (128 + SIGTERM)


class Diverged(Explained):
    """The loss is not a number and the trained weights are no longer finite: no later step can recover, so the job
    stops instead of holding its device (fp16's skipped overflow steps leave the weights finite and go on)."""

    def __init__(self, step: int, loss: float, lr: float):
        super().__init__(gettext_noop("training diverged at step %(step)s: the loss is %(loss)s and the weights are "
                                      "no longer finite — lower learning_rate (it was %(lr)s), add warmup_steps, or "
                                      "use bf16 rather than fp16"), step=step, loss=str(loss), lr=f"{lr:g}")


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints at the next optimizer step and exits."""

    def __init__(self):
        self.set = False
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        self.set = True


def world() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") != "" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return (dist.get_rank(), size) if size > 1 else (0, 1)


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


def load_checkpoint(path) -> dict:
    """A resume checkpoint: tensors and plain values only (``weights_only``: a crafted file in a run folder can run
    no code when a job resumes from it)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def row_lengths(data: dict) -> torch.Tensor:
    """Real (non-pad) length of each row: the position after its last non-zero id, over all ``x*`` tensors."""
    lengths = None
    for key, x in data.items():
        if key.startswith("x"):
            pos = torch.arange(1, x.shape[1] + 1)
            n = ((x != 0) * pos).amax(dim=1)
            lengths = n if lengths is None else torch.maximum(lengths, n)
    return lengths


def leave_world(code) -> None:
    """End a process of a multi-process run (after its last output) without tearing the process group down: left to
    interpreter shutdown, gloo's worker threads may abort a finished rank (SIGABRT, "terminate called without an
    active exception"), and after ``destroy_process_group()`` freeing DDP's reducer now and then deadlocks (its gloo
    group joins a run-loop thread that waits for the GIL the main thread holds); either way torchrun reports or
    waits on a finished run. Every rank has passed the run's last barrier by now and all
    files are written, so the process leaves at once with its exit code."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def resume_position(ck: dict, global_bs: int, n_rows: int) -> tuple[int, int]:
    """Where a run resumed from checkpoint ``ck`` continues: (the batch index in this run's global batches, the
    global batch the interrupted epoch's order was drawn with). The position is kept in rows, so a change of GPU count
    or batch size resumes at the same place (MiniMind rescales by GPU count), and the rest of that epoch keeps its
    order (length grouping depends on the global batch), so every row is still seen once in it."""
    saved = ck["config"]["batch_size"] * ck.get("world_size", 1)
    rows = ck["micro"] * saved
    return (math.ceil(n_rows / global_bs) if rows >= n_rows else rows // global_bs), saved


def trim_padding(batch: dict, multiple: int = 8) -> dict:
    """Drop the trailing columns that are right-padding (id 0) in every row of a batch.

    Rows are right-padded and attention is causal, so the real tokens' logits and the loss are unchanged; only the
    compute spent on padding goes. All ``x*``/``y*`` tensors (DPO's chosen and rejected sides) keep one common width,
    rounded up to a ``multiple`` of columns so that few distinct shapes occur (torch.compile recompiles per shape).
    """
    keep = int(row_lengths(batch).max()) if any(k.startswith("x") for k in batch) else 1
    width = max((v.shape[1] for k, v in batch.items() if k[0] in "xy" and v.dim() == 2), default=1)
    keep = min(max(-(-keep // multiple) * multiple, 1), width)
    return {k: v[:, :keep] if k[0] in "xy" and v.dim() == 2 else v for k, v in batch.items()}


def write_checkpoint(ckpt_dir: Path, state: dict, step: int, eval_loss, keep: int) -> Path:
    """Write ``step-N.pt``, point ``resume.pt`` at it, and rotate: keep the last ``keep`` and the best by eval loss.

    ``index.json`` lists the kept checkpoints with their eval loss. Every file is replaced whole (written beside,
    then renamed): a run killed at any moment leaves the previous version, never a partial one that its resume
    would fail to read.
    """
    path = ckpt_dir / f"step-{step:07d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    link = ckpt_dir / "resume.pt"
    tmp_link = ckpt_dir / "resume.pt.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(path.name, tmp_link)
    os.replace(tmp_link, link)
    index_path = ckpt_dir / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else []
    index = [e for e in index if e["step"] != step and (ckpt_dir / e["file"]).exists()]
    # what a run killed between its writes left: a checkpoint renamed into place but not yet listed (rotated like
    # the others from now on, its eval loss unknown), a checkpoint half written (never read: removed)
    listed = {e["file"] for e in index} | {path.name}
    index += [{"step": int(f.stem.removeprefix("step-")), "file": f.name, "eval_loss": None}
              for f in ckpt_dir.glob("step-*.pt") if f.name not in listed and f.stem.removeprefix("step-").isdigit()]
    for stale in ckpt_dir.glob("step-*.tmp"):
        stale.unlink(missing_ok=True)
    index.append({"step": step, "file": path.name, "eval_loss": eval_loss})
    index.sort(key=lambda e: e["step"])
    with_eval = [e for e in index if e["eval_loss"] is not None]
    best = min(with_eval, key=lambda e: e["eval_loss"])["step"] if with_eval else None
    latest = [e["step"] for e in index][-max(keep, 1):]  # the index is in step order
    for e in index:
        if e["step"] not in latest and e["step"] != best:
            (ckpt_dir / e["file"]).unlink(missing_ok=True)
    index = [dict(e, best=e["step"] == best) for e in index if e["step"] in latest or e["step"] == best]
    tmp_index = index_path.with_suffix(".tmp")
    tmp_index.write_text(json.dumps(index, indent=1))
    os.replace(tmp_index, index_path)
    return path


def default_save(model, run_dir: Path) -> dict:
    save_pth(model, run_dir / "model.pth")
    return {"model_path": str(run_dir / "model.pth")}


def use_compile_cache(folder: str | Path | None) -> None:
    """torch's own compile caches in one folder that every job shares (``MINICLOUD_HOME/cache/compile``: on shared
    storage, every node's): inductor's FX graph cache, AOTAutograd's cache of forward+backward graphs, and Triton's
    kernels. A job whose graphs another job compiled before loads them instead of compiling (``compile_stats``)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    folder = Path(folder or Path(os.environ.get("MINICLOUD_HOME", "var")) / "cache" / "compile")
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # read by inductor at each use (importing it set a default)
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True


def compile_stats() -> dict:
    """How this process's compiled graphs were obtained so far: compiled, or loaded from the shared cache."""
    from torch._dynamo.utils import counters

    return {"compile_cache_hits": counters["inductor"]["fxgraph_cache_hit"]
            + counters["aot_autograd"]["autograd_cache_hit"],
            "compile_cache_misses": counters["inductor"]["fxgraph_cache_miss"]
            + counters["aot_autograd"]["autograd_cache_miss"],
            "compiled_graphs": counters["stats"]["unique_graphs"]}


def compile_for_training(model, mode: str = "default", tuning: bool = False):
    """``torch.compile`` for training micro-steps. ``reduce-overhead`` (and ``max-autotune``) replay each micro-step's
    forward and backward as CUDA graphs (one launch instead of hundreds: the host no longer paces a small model).
    A replay overwrites the last replay's outputs, and autograd keeps a micro-step's first gradient as ``.grad``
    itself, so with graphs every trainable parameter gets a gradient buffer of its own here, which the backward adds
    into and the optimizer zeroes (``zero_grad(set_to_none=False)``) instead of dropping.
    ``tuning``: inductor benchmarks block sizes around its heuristic choice for each generated (Triton) kernel
    (coordinate descent, as gpt-fast does): a longer first compile for faster steps. It is a process-wide inductor
    setting; the engine runs one job per process."""
    if tuning:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    if mode != "default":
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    return torch.compile(model, mode=None if mode == "default" else mode)


def train(spec: dict, model, data: dict, loss_fn=None, params=None, save_fn=default_save, stage_extra=None,
          update=None, load_rows=None) -> dict:
    """Train ``model`` on ``data``; returns ``{"steps": n, **files written by save_fn}``.

    ``params``: the trainable parameters, or param groups whose optional ``lr_scale`` multiplies the scheduled lr
    (PPO's critic). ``update(model, batch, opt_step) -> parts`` replaces the loss_fn path for stages that take several
    optimizer steps per batch (PPO): it calls ``opt_step(loss) -> grad_norm`` itself and returns ``loss`` and
    ``grad_norm`` among its parts. ``load_rows(spec) -> data`` reads another file the same way (a spec with an
    ``eval_dataset`` evaluates on that file instead of holding out ``eval_ratio`` of the rows). ``data`` is a
    ``rows.Rows``: batches are read from the token cache by index.
    """
    cfg = spec["config"]
    rank, world_size = world()
    run_dir = Path(spec["run_dir"])
    ckpt_dir = run_dir / "checkpoints"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    resume_path = ckpt_dir / "resume.pt"
    device = pick_device(spec["device"])
    is_cuda = device.startswith("cuda")
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg["dtype"])
    autocast = torch.autocast("cuda", dtype=amp_dtype) if is_cuda and amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=is_cuda and cfg["dtype"] == "float16")
    model.to(device)
    model.train()
    groups = list(params) if params is not None else [{"params": list(model.parameters())}]
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg["learning_rate"], fused=is_cuda)

    if spec.get("eval_dataset") and load_rows is not None:
        eval_data = load_rows({**spec, "dataset": spec["eval_dataset"]})
    else:
        data, eval_data = data.split(cfg["eval_ratio"], cfg["seed"])
    n_rows = len(data)
    if n_rows == 0:
        raise no_samples()
    bs, accum = cfg["batch_size"], cfg["accumulation_steps"]
    global_bs = bs * world_size
    iters = math.ceil(n_rows / global_bs)
    steps_per_epoch = math.ceil(iters / accum)
    total_steps = cfg["epochs"] * steps_per_epoch
    if cfg["max_steps"]:
        total_steps = min(total_steps, cfg["max_steps"])

    step, epoch, micro, tokens_seen = 0, 0, 0, 0
    order_bs = global_bs  # the global batch the current epoch's order is drawn with
    if spec.get("resume") and resume_path.exists():
        ck = load_checkpoint(resume_path)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        step, epoch, tokens_seen = ck["step"], ck["epoch"], ck.get("tokens_seen", 0)
        micro, order_bs = resume_position(ck, global_bs, n_rows)
        data.load_state(ck.get("data_state"))
        _set_rng_state(ck["rng"])
        was = {"GPU count": (ck.get("world_size", 1), world_size),
               "batch size": (ck["config"]["batch_size"], bs)}
        events.log(f"resumed from step {step} (epoch {epoch + 1}, batch {micro})"
                   + "".join(f"; {what} {a} → {b}" for what, (a, b) in was.items() if a != b))
    else:
        torch.manual_seed(cfg["seed"] + rank)

    core = model
    graphs = False
    if cfg["use_compile"]:
        # CUDA graphs only where shapes repeat and nothing outside the graph joins the backward: supervised stages
        # on one GPU (RL generates with its own compiled cache; DDP's gradient hooks stay eager).
        mode = cfg["compile_mode"] if is_cuda and update is None and world_size == 1 else "default"
        graphs = mode != "default"
        tuning = cfg["compile_tuning"] and is_cuda  # tunes Triton kernels: the CPU's C++ kernels have no such step
        use_compile_cache(spec.get("compile_cache"))
        model = compile_for_training(model, mode, tuning)
        events.log("torch.compile enabled" + (" with CUDA graphs" if graphs else "")
                   + (" and tuned kernels" if tuning else ""))
    if world_size > 1 and update is None:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if is_cuda else None)

    def optimizer_step() -> float:
        """One optimizer step on the accumulated gradients: unscale, clip (the norm is returned), step, zero."""
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]).item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=not graphs)
        return norm

    def opt_step(loss) -> float:
        """For update stages (PPO), which step several times per batch: backward, average the gradients across
        ranks (no DDP wrapper does it for them), then ``optimizer_step``."""
        scaler.scale(loss).backward()
        if world_size > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world_size
        return optimizer_step()

    last_eval = {"loss": None}

    def save_checkpoint():
        if rank == 0:
            state = {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "step": step, "epoch": epoch, "micro": micro, "tokens_seen": tokens_seen, "rng": _rng_state(),
                     "world_size": world_size, "config": cfg, "data_state": data.state()}
            path = write_checkpoint(ckpt_dir, state, step, last_eval["loss"], cfg["keep_checkpoints"])
            files = save_fn(core, run_dir)
            events.emit("checkpoint", step=step, path=str(path))
        else:
            files = {}
        if world_size > 1:
            dist.barrier()
        return files

    flex = cfg.get("packed_attention") == "flex" and is_cuda  # FlexAttention has no backward on the CPU

    def on_device(rows: dict) -> dict:
        """A batch on the training device; packed rows with FlexAttention get their block mask, made there."""
        batch = {k: v.to(device, non_blocking=True) for k, v in rows.items()}
        if flex and "doc" in batch:
            batch["block_mask"] = block_mask(batch["doc"])
        return batch

    @torch.no_grad()
    def evaluate():
        """Mean loss of up to 20 held-out batches, without gradients, through the uncompiled model: the compiled one
        would compile (and with CUDA graphs record) an eval graph of its own for these few batches (39 s of an
        H100 job's first eval)."""
        core.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, min(len(eval_data), 20 * bs), bs):
                batch = on_device(eval_data.batch(range(i, min(i + bs, len(eval_data)))))
                with autocast:
                    loss, _ = loss_fn(core, batch)
                total, n = total + loss.item(), n + 1
        core.train()
        return total / max(n, 1)

    stop = StopFlag()
    events.emit("start", stage=spec["stage"], total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                epochs=cfg["epochs"], samples=n_rows, eval_samples=len(eval_data) if eval_data is not None else 0,
                device=device, world_size=world_size, resumed_from_step=step, threads=torch.get_num_threads(),
                **(stage_extra or {}))
    t_log, tok_log = time.time(), tokens_seen
    t_start, step_start = time.time(), step
    acc_loss, acc_parts, acc_n = 0.0, {}, 0
    eval_every = cfg["eval_interval"] or cfg["save_interval"]
    lengths = data.lengths() if cfg["group_by_length"] else None
    multiple = 64 if cfg["use_compile"] else 8  # trimmed widths: few shapes for torch.compile
    while step < total_steps and epoch < cfg["epochs"]:
        order = data.order(order_bs, cfg["seed"], epoch, lengths)
        order_bs = global_bs
        while micro < iters and step < total_steps:
            rows = order[micro * global_bs:(micro + 1) * global_bs]
            idx = rows[rank * bs:(rank + 1) * bs] if world_size > 1 else rows
            rows = data.batch(idx, multiple)
            n_tokens = int((rows["y"] != -100).sum()) if "y" in rows else 0  # counted on the host: no device sync
            batch = on_device(rows)
            lr = lr_at(step, total_steps, cfg["learning_rate"], cfg["warmup_steps"])
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            micro += 1
            if update is not None:
                with autocast:
                    parts = dict(update(model, batch, opt_step))
                loss_value, grad_norm = parts.pop("loss"), parts.pop("grad_norm")
                tokens = parts.pop("tokens")
                last_micro = True
            else:
                last_micro = micro % accum == 0 or micro == iters
                sync = nullcontext() if last_micro or world_size == 1 else model.no_sync()
                with sync:
                    with autocast:
                        loss, parts = loss_fn(model, batch)
                    scaler.scale(loss / accum).backward()
                loss_value = loss.detach()  # read at log time only, so the host never waits on the device here
                tokens = parts.pop("tokens", n_tokens)
            acc_loss += loss_value
            for k, v in parts.items():
                acc_parts[k] = acc_parts.get(k, 0.0) + v
            acc_n += 1
            tokens_seen += tokens * world_size
            if not last_micro:
                continue
            if update is None:
                grad_norm = optimizer_step()
            step += 1
            if step % cfg["log_interval"] == 0 or step == total_steps or step == 1:
                now = time.time()
                rate = (step - step_start) / max(now - t_start, 1e-9)
                loss_mean = float(acc_loss) / acc_n
                if not math.isfinite(loss_mean) and not all(bool(torch.isfinite(p).all()) for p in params):
                    raise Diverged(step, loss_mean, cfg.get("learning_rate", lr))
                metrics = {"loss": loss_mean, **{k: float(v) / acc_n for k, v in acc_parts.items()},
                           "lr": lr,
                           "grad_norm": grad_norm, "tokens_per_s": (tokens_seen - tok_log) / max(now - t_log, 1e-9),
                           "tokens": tokens_seen}
                if is_cuda:
                    metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                if step == step_start + 1:  # the first step of this run: how long the start took (cold or warm)
                    metrics["time_to_first_step_s"] = now - events.STARTED
                    if cfg["use_compile"]:
                        metrics.update(compile_stats())
                events.emit("step", step=step, total_steps=total_steps, epoch=epoch + 1, metrics=metrics,
                            eta_s=round((total_steps - step) / max(rate, 1e-9), 1))
                t_log, tok_log = now, tokens_seen
            acc_loss, acc_parts, acc_n = 0.0, {}, 0
            t_aside = time.time()
            if eval_data is not None and (step % eval_every == 0 or step == total_steps):
                last_eval["loss"] = evaluate()
                events.emit("eval", step=step, metrics={"eval_loss": last_eval["loss"]})
            stopping = stop.set
            if world_size > 1:  # every rank stops at the same step
                flag = torch.tensor([int(stopping)], device=device)
                dist.all_reduce(flag)
                stopping = bool(flag.item())
            if stopping:
                save_checkpoint()
                events.emit("stopped", step=step)  # the checkpoint is written: a resume continues from here
                raise SystemExit(EXIT_STOPPED)
            if step % cfg["save_interval"] == 0 and step < total_steps:
                save_checkpoint()
            t_log += time.time() - t_aside  # tokens/s is the training's own: evals and checkpoints are not in it
        if micro >= iters:
            epoch, micro = epoch + 1, 0
    files = save_checkpoint()
    return {"steps": step, **files}
