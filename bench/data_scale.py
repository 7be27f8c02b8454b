"""Real-size datasets through the engine: time to the first step (cold and warm token cache), tokenisation MB/s and
peak memory, beside MiniMind's own scripts on the same files and machine.

    python bench/data_scale.py [--pretrain-mb 200 1000] [--sft-mb 500] [--minimind PATH] [--out var/bench-data]

Generates MiniMind-format files of the chosen sizes (training.demo_data.write_sized: ~1.3 KB pretraining texts,
1-3 turn conversations), then for each runs a few steps of a tiny model (hidden 64, 2 layers, max_seq_len 340,
batch 16) through ``python -m training run`` with an empty cache (cold) and again with the cache it left (warm).
With ``--minimind`` (a checkout of jingyaogong/minimind, run from a copy) the same files go through its
``trainer/train_pretrain.py`` / ``train_full_sft.py`` with the same model size, both with MiniMind's tokenizer
(``model/``); its DataLoader keeps MiniMind's default of 8 workers. MiniMind needs the ``datasets`` package: give
its location with ``--minimind-pythonpath`` if it is not installed.

``ours_warm_forked``: the warm cache with the job forked from a warm engine (training/warm.py), as the portal
starts jobs on CPU slots: no interpreter start, no torch import.

Peak memory: ``peak_rss_mb`` is the engine process's own high-water mark (VmHWM); ``peak_pss_mb`` samples the
proportional set size of the whole process tree every 0.2 s (tokenising workers, DataLoader workers; shared pages
counted once). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
        "batch_size": 16, "max_seq_len": 340, "accumulation_steps": 1, "dtype": "float32", "log_interval": 1,
        "eval_ratio": 0.0}


def _tree(pid: int) -> list[int]:
    kids = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _kb(pid: int, path: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Watch:
    """Samples a process tree's PSS and its root's VmHWM until stopped."""

    def __init__(self, pid: int):
        self.pid, self.pss, self.hwm, self.done = pid, 0, 0, False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.done:
            self.pss = max(self.pss, sum(_kb(p, "smaps_rollup", "Pss:") for p in _tree(self.pid)))
            self.hwm = max(self.hwm, _kb(self.pid, "status", "VmHWM:"))
            time.sleep(0.2)


def run_until(cmd, cwd, env, first_step, timeout=7200):
    """Run ``cmd``; stop it at its first training step (``first_step(line)``); (seconds to it, memory, lines)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = Watch(proc.pid)
    lines, at = [], None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if at is None and first_step(line):
            at = time.time() - t0
            time.sleep(1.0)  # a moment of steady training in the memory figures
            proc.terminate()
        if time.time() - t0 > timeout:
            proc.kill()
    proc.wait()
    watch.done = True
    return at, {"peak_rss_mb": round(watch.hwm / 1024, 1), "peak_pss_mb": round(watch.pss / 1024, 1),
                "launched": t0}, lines


def _options(stage: str) -> dict:
    """The token cache options of the stage's defaults (what a job with MiniMind's defaults uses)."""
    from training import spec as tspec, token_cache

    cfg = tspec.resolve_config(stage, {})
    return token_cache.processing_options(token_cache.PROCESSING[stage], cfg)


def ours(path: Path, stage: str, tokenizer: Path, cache: Path, run_dir: Path, warm: bool = False) -> dict:
    spec = {"stage": stage, "run_dir": str(run_dir), "dataset": str(path), "tokenizer": str(tokenizer),
            "device": "cpu", "data_cache": str(cache), "config": {**TINY, "max_steps": 1000}}
    spec_path = run_dir.with_suffix(".json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    at, mem, lines = run_until([sys.executable, "-u", "-m", "training", "run", str(spec_path)], ROOT, env,
                               lambda line: '"event": "step"' in line)
    events = [json.loads(line) for line in lines if line.startswith("{")]
    if at is None:
        raise SystemExit(f"our engine gave no step on {path}: {lines[-5:]}")
    model_t = next(e["time"] for e in events if e["event"] == "log" and e["message"].startswith("Model Params"))
    start_t = next(e["time"] for e in events if e["event"] == "start")
    launched = mem.pop("launched")
    # startup_s: the interpreter, torch and transformers imports and the model (what the portal's warm engine saves)
    out = {"first_step_s": round(at, 1), "startup_s": round(model_t - launched, 1), "data_s": round(start_t - model_t, 2),
           **mem, "warm": warm}
    if any(e["event"] == "log" and "read as they are needed" in e["message"] for e in events):
        out["lazy"] = True  # trained at once; the run was stopped before its background build ended: finish it
        t = time.time()
        subprocess.run([sys.executable, "-m", "training", "prepare", str(path), "--tokenizer", str(tokenizer),
                        "--processing", "pretrain" if stage == "pretrain" else stage, "--options", json.dumps(
                            _options(stage)), "--cache", str(cache)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        out["background_build_s"] = round(time.time() - t, 1)
    built = [c for c in (cache.iterdir() if cache.exists() else []) if (c / "meta.json").exists()]
    meta = json.loads((built[0] / "meta.json").read_text()) if built else {}
    if meta and not out.pop("warm"):
        out.update(tokenise_s=meta["seconds"], tokenise_mb_s=round(meta["source_bytes"] / 1e6 / meta["seconds"], 2),
                   workers=meta["workers"], tokens=meta["tokens"])
    return out


def ours_forked(path: Path, stage: str, tokenizer: Path, cache: Path, run_dir: Path) -> dict:
    """The portal's warm start: the job forked from a warm engine (training/warm.py, as jobs/engine_process.py asks
    it) that imported torch and transformers once; an earlier fork has warmed it. Seconds from the request to the
    first step."""
    import socket

    ours_sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = subprocess.Popen([sys.executable, "-u", "-m", "training", "warm", str(theirs.fileno()), " " * 4096],
                              cwd=ROOT, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                              env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    theirs.close()
    times = []
    try:
        for n in range(2):  # the first fork waits for the server's imports; the second is what a later job sees
            spec = {"stage": stage, "run_dir": str(run_dir) + f"-{n}", "dataset": str(path),
                    "tokenizer": str(tokenizer), "device": "cpu", "data_cache": str(cache),
                    "config": {**TINY, "max_steps": 1}}
            spec_path = Path(str(run_dir) + f"-{n}.json")
            spec_path.write_text(json.dumps(spec))
            out_r, out_w = os.pipe()
            t0 = time.time()
            socket.send_fds(ours_sock, [json.dumps({"argv": ["run", str(spec_path)], "env": dict(
                os.environ, CUDA_VISIBLE_DEVICES=""), "cwd": str(ROOT)}).encode()], [out_w])
            os.close(out_w)
            with open(out_r, encoding="utf-8") as out:
                at = next((time.time() - t0 for line in out if '"event": "step"' in line), None)
                for _ in out:  # to the end of the run (one step)
                    pass
            times.append(round(at, 2) if at is not None else None)
    finally:
        ours_sock.close()
        server.wait(timeout=30)
    return {"first_step_s": times[1], "first_fork_s": times[0]}


def minimind(checkout: Path, path: Path, stage: str, pythonpath: str | None) -> dict:
    script = {"pretrain": "train_pretrain.py", "sft": "train_full_sft.py"}[stage]
    work = Path(tempfile.mkdtemp(prefix="minimind-"))
    try:
        for part in ("model", "dataset", "trainer"):
            shutil.copytree(checkout / part, work / part)
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_DATASETS_CACHE=str(work / "hf-cache"),
                   HF_DATASETS_OFFLINE="1", PYTHONPATH=":".join(p for p in (pythonpath, str(work)) if p))
        cmd = [sys.executable, "-u", script, "--data_path", str(path), "--hidden_size", "64", "--num_hidden_layers",
               "2", "--batch_size", "16", "--max_seq_len", "340", "--epochs", "1", "--device", "cpu", "--dtype",
               "float32", "--log_interval", "1", "--accumulation_steps", "1", "--save_dir", str(work / "out")]
        if stage == "sft":
            cmd += ["--from_weight", "none"]
        at, mem, lines = run_until(cmd, work / "trainer", env, lambda line: "Epoch:[1/1](1/" in line)
        mem.pop("launched")
        if at is None:
            return {"error": " | ".join(lines[-4:])[-600:]}
        return {"first_step_s": round(at, 1), **mem}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-mb", type=float, nargs="*", default=[200, 1000])
    parser.add_argument("--sft-mb", type=float, nargs="*", default=[500])
    parser.add_argument("--out", default=str(ROOT / "var" / "bench-data"))
    parser.add_argument("--minimind", default=None, help="a checkout of jingyaogong/minimind")
    parser.add_argument("--minimind-pythonpath", default=None, help="where MiniMind's extra packages (datasets) are")
    parser.add_argument("--tokenizer", default=None, help="default: MiniMind's model/ with --minimind, else demo")
    args = parser.parse_args(argv)
    from training.demo_data import write_sized

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer:
        tokenizer = Path(args.tokenizer)
    elif args.minimind:
        tokenizer = Path(args.minimind) / "model"
    else:
        tokenizer = out / "demo" / "demo-tokenizer"
        if not tokenizer.exists():
            subprocess.run([sys.executable, "-m", "training", "demo-data", str(out / "demo")], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
    results = {"machine": {"cpus": os.cpu_count()}, "model": TINY, "tokenizer": str(tokenizer), "runs": []}
    for stage, sizes in (("pretrain", args.pretrain_mb), ("sft", args.sft_mb)):
        for mb in sizes:
            path = out / f"{stage}-{mb:g}mb.jsonl"
            if not path.exists():
                t = time.time()
                info = write_sized(path.with_suffix(".part"), stage, int(mb * 1e6))
                path.with_suffix(".part").rename(path)
                print(f"generated {path} ({info['records']} records) in {time.time() - t:.0f} s", file=sys.stderr)
            records = sum(1 for _ in open(path, "rb"))
            row = {"stage": stage, "mb": mb, "records": records}
            with tempfile.TemporaryDirectory(dir=out) as tmp:
                tmp = Path(tmp)
                row["ours_cold"] = ours(path, stage, tokenizer, tmp / "cache", tmp / "cold")
                row["ours_warm"] = ours(path, stage, tokenizer, tmp / "cache", tmp / "warm", warm=True)
                row["ours_warm_forked"] = ours_forked(path, stage, tokenizer, tmp / "cache", tmp / "forked")
            if args.minimind:
                row["minimind"] = minimind(Path(args.minimind), path, stage, args.minimind_pythonpath)
            print(json.dumps(row), file=sys.stderr)
            results["runs"].append(row)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
