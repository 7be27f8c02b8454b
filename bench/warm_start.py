"""Time to the first step of a compiled job, cold (an empty compile cache: what every job paid before) and warm (a
second job with the same shapes, reading the shared cache), each a fresh ``python -m training run`` process.

    python bench/warm_start.py [--hidden 768 --layers 8] [--steps 3] [--device cpu]

The shapes default to MiniMind-3's (768 wide, 8 layers; batch 4 × 256 on the CPU). Prints one JSON object: for each
run the engine's own ``time_to_first_step_s`` (process start to the first optimizer step), the compile cache's hits
and misses, and the wall time of the whole process.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import torch

    from training.__main__ import main as engine

    work = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    with contextlib.redirect_stdout(io.StringIO()):
        engine(["demo-data", str(work / "demo")])
    cache = work / "compile-cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
    runs = {}
    for name in ("cold", "warm"):
        spec = {"stage": "pretrain", "run_dir": str(work / name), "dataset": str(work / "demo" / "demo-pretrain.jsonl"),
                "tokenizer": str(work / "demo" / "demo-tokenizer"), "device": args.device,
                "compile_cache": str(cache), "data_cache": str(work / "data-cache"),
                "config": {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "batch_size": args.batch,
                           "max_seq_len": args.seq, "accumulation_steps": 1, "max_steps": args.steps,
                           "log_interval": 1, "use_compile": True, "eval_ratio": 0.0, "dtype": "bfloat16"}}
        path = work / f"{name}.json"
        path.write_text(json.dumps(spec))
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "training", "run", str(path)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t
        events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        first = next(e for e in events if e.get("event") == "step")["metrics"]
        runs[name] = {"time_to_first_step_s": round(first["time_to_first_step_s"], 2),
                      "compile_cache_hits": first.get("compile_cache_hits"),
                      "compile_cache_misses": first.get("compile_cache_misses"), "process_wall_s": round(wall, 2),
                      "rc": out.returncode}
    print(json.dumps({"bench": "warm_start", "device": args.device, "cpu": platform.machine(),
                      "torch": torch.__version__, "shape": {"hidden": args.hidden, "layers": args.layers,
                                                            "batch": args.batch, "seq": args.seq},
                      "cold_reference": runs["cold"], "warm": runs["warm"],
                      "speedup_first_step": round(runs["cold"]["time_to_first_step_s"]
                                                  / max(runs["warm"]["time_to_first_step_s"], 1e-9), 2)}))


if __name__ == "__main__":
    main()
