"""CPU work side by side, with torch's default threads and with a share of the cores, as JSON.

    python bench/cpu_slots.py [--slots 2] [--hidden 256 --layers 4] [--steps 20]
    python bench/cpu_slots.py --chat 3 [--hidden 768 --layers 8]

Jobs on CPU slots: one job per slot, all at once, each a ``python -m training run`` of its own, with torch's default
threads (every core for every job: the reference, what each job had before) and with the share the supervisor now
gives (the node's cores over its slots, jobs/devices.py ``cpu_job_threads``). For each setting: the threads per job,
the wall time until every job is done and each job's optimizer steps per second after its first step.

``--chat N``: N playground chat workers (``python -m training chat-worker``, one per web process) generating at once
with a random model of the given shape, with the threads each had before (min(4, cores)) and with the share the web
process now gives (models_registry/inference.py ``worker_env``), then one worker alone with each: tokens/s per
worker (64 new tokens, greedy).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_all(specs: list[dict], threads: int | None, name: str) -> dict:
    """Every job of ``specs`` at once (each in a run folder of its own for ``name``), with ``threads`` each."""
    paths = []
    for i, spec in enumerate(specs):
        path = Path(spec["run_dir"]).parent / f"{name}-{i}.json"
        path.write_text(json.dumps({**spec, "run_dir": f"{spec['run_dir']}-{name}"}))
        paths.append(path)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "training", "run", str(p)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for p in paths]
    rates = []
    for p in procs:
        steps = [json.loads(line) for line in p.stdout if line.startswith("{") and '"step"' in line]
        steps = [e for e in steps if e.get("event") == "step"]
        assert p.wait() == 0 and len(steps) >= 2, "a job failed"
        rates.append(round((steps[-1]["step"] - steps[0]["step"]) / (steps[-1]["time"] - steps[0]["time"]), 2))
    return {"threads_per_job": threads or "torch default", "wall_s": round(time.perf_counter() - t0, 1),
            "steps_per_s_each": rates}


def chat_all(n: int, threads: int, model: dict) -> list[float]:
    """``n`` chat workers with ``threads`` each answer one request at once: each one's tokens/s."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen([sys.executable, "-m", "training", "chat-worker"], cwd=ROOT, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
             for _ in range(n)]
    for p in procs:
        assert json.loads(p.stdout.readline())["threads"] == threads

    def ask(p, rid, tokens):
        p.stdin.write(json.dumps({"id": rid, "model": model, "messages": [{"role": "user", "content": "1+1="}],
                                  "max_new_tokens": tokens, "temperature": 0}) + "\n")
        p.stdin.flush()

    def answer(p):
        while not (msg := json.loads(p.stdout.readline())).get("done"):
            pass
        return msg["usage"]["completion_tokens"]

    for p in procs:  # the model loaded and a first generation done in each, untimed
        ask(p, "warm", 4)
    for p in procs:
        answer(p)
    t0 = time.perf_counter()
    for p in procs:
        ask(p, "timed", 64)
    rates = []
    for p in procs:
        tokens = answer(p)
        rates.append(round(tokens / (time.perf_counter() - t0), 1))
        p.stdin.close()
    for p in procs:
        p.wait()
    return rates


def chat(args, work: Path) -> dict:
    import torch

    from jobs.devices import core_share, cpu_cores
    from training.model import build_model, save_pth
    from training.spec import model_config, resolve_config

    cfg = {"hidden_size": args.hidden, "num_hidden_layers": args.layers}
    torch.manual_seed(0)
    save_pth(build_model(model_config(resolve_config("sft", cfg))), work / "model.pth")
    model = {"path": str(work / "model.pth"), "config": cfg, "tokenizer": str(work / "demo" / "demo-tokenizer")}
    before, share = min(4, core_share(1)), min(4, core_share(args.chat))  # as models_registry/inference.py
    return {"cores": cpu_cores(), "workers": args.chat, "hidden_size": args.hidden, "layers": args.layers,
            "torch": torch.__version__, "threads_before": before, "threads_share": share,
            "at_once_before": chat_all(args.chat, before, model), "at_once_share": chat_all(args.chat, share, model),
            "alone_before": chat_all(1, before, model), "alone_share": chat_all(1, share, model)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chat", type=int, default=0, help="N chat workers generating at once, instead of jobs")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    import torch

    from jobs.devices import cpu_cores, cpu_job_threads

    work = Path(tempfile.mkdtemp(prefix="cpu-slots-"))
    subprocess.run([sys.executable, "-m", "training", "demo-data", str(work / "demo")], cwd=ROOT, check=True,
                   capture_output=True)
    if args.chat:
        return print(json.dumps(chat(args, work)))
    specs = [{"stage": "pretrain", "run_dir": str(work / f"run{i}"), "device": "cpu",
              "dataset": str(work / "demo" / "demo-pretrain.jsonl"), "tokenizer": str(work / "demo" / "demo-tokenizer"),
              "config": {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "batch_size": args.batch,
                         "max_seq_len": args.seq, "accumulation_steps": 1, "max_steps": args.steps,
                         "log_interval": 1, "save_interval": 10**6, "eval_ratio": 0.0}} for i in range(args.slots)]
    share = cpu_job_threads(args.slots)
    out = {"cores": cpu_cores(), "slots": args.slots, "torch": torch.__version__, "hidden_size": args.hidden,
           "layers": args.layers, "batch": args.batch, "seq": args.seq, "steps": args.steps}
    out["default"] = run_all(specs, None, "default")  # the reference: every job a thread per core
    out["share"] = run_all(specs, share, "share")
    out["default_again"] = run_all(specs, None, "default-again")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
