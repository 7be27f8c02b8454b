"""Jobs on CPU slots side by side: one job per slot, all at once, each a ``python -m training run`` of its own, with
torch's default threads (every core for every job: the reference, what each job had before) and with the share the
supervisor now gives (the node's cores over its slots, jobs/devices.py ``cpu_job_threads``).

    python bench/cpu_slots.py [--slots 2] [--hidden 256 --layers 4] [--steps 20]

Prints one JSON object: for each setting the threads per job, the wall time until every job is done and each job's
optimizer steps per second after its first step (the engine's own step events).
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


def main():
    ap = argparse.ArgumentParser()
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
