import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "var" / "test-cache"
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "batch_size": 16, "max_seq_len": 64, "accumulation_steps": 1, "learning_rate": 3e-3, "log_interval": 1,
        "dtype": "float32"}


def code_key(*extra) -> str:
    """What a cached fixture depends on: the engine's code (training/, not its tests), the versions of torch,
    transformers and tokenizers, and the fixture's own parameters."""
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256(f"{torch.__version__} {transformers.__version__} {tokenizers.__version__} {extra!r}".encode())
    for path in sorted((ROOT / "training").glob("*")):
        if path.is_file() and path.suffix in (".py", ".jinja"):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def built_once(name: str, build, *params) -> Path:
    """The folder ``var/test-cache/NAME-KEY``, made by ``build(folder)`` once for every pytest-xdist worker and every
    later session until the engine's code (or ``params``) changes: a file lock makes the other workers wait for the
    first, and only a finished folder is renamed into place (a killed build leaves nothing that is trusted)."""
    from filelock import FileLock

    done = CACHE / f"{name}-{code_key(name, *params)}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE / f"{name}.lock")):
        if not done.exists():
            for old in CACHE.glob(f"{name}-*"):  # older code's fixtures, a killed build's leftovers
                shutil.rmtree(old, ignore_errors=True)
            part = done.with_name(done.name + ".part")
            part.mkdir()
            build(part)
            part.rename(done)
    return done


@pytest.fixture(scope="session")
def demo_dir():
    """The demo datasets and tokenizer, as `python -m training demo-data` writes them (the tokenizer the cached
    ``trained`` models were trained with)."""
    from training.__main__ import main

    return built_once("demo", lambda out: main(["demo-data", str(out)]) == 0 or pytest.fail("demo-data failed"))


def pretrain_spec(demo_dir, run_dir, **config) -> dict:
    """A tiny pretraining run on the demo data, on the CPU: ``TINY`` with ``config`` over it."""
    return {"stage": "pretrain", "run_dir": str(run_dir), "dataset": str(demo_dir / "demo-pretrain.jsonl"),
            "tokenizer": str(demo_dir / "demo-tokenizer"), "device": "cpu", "config": {**TINY, **config}}


@pytest.fixture
def make_spec(demo_dir, tmp_path):
    def make(name="run", **config):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(pretrain_spec(demo_dir, tmp_path / name, **config)))
        return path

    return make


def run_engine(spec_path, **popen):
    """Run ``python -m training run`` in a subprocess; returns (returncode, events, other output lines)."""
    proc = subprocess.run([sys.executable, "-m", "training", "run", str(spec_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, **popen)
    events, other = [], []
    for line in proc.stdout.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            other.append(line)
    return proc.returncode, events, other + proc.stderr.splitlines()


def run_in_process(spec_path):
    """``run_engine`` in this process: the same CLI (``training.__main__.main``), without the ~7 s of imports that a
    fresh interpreter pays. For the tests about what the engine computes; the ones about the process (signals, exit
    codes, a fresh interpreter, a real allocation failure) keep ``run_engine``."""
    import contextlib
    import io
    import signal

    from training.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["run", str(spec_path)])
    finally:  # the engine's stop flag catches SIGTERM/SIGINT: pytest's own handlers come back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    events, other = [], []
    for line in out.getvalue().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            other.append(line)
    return rc, events, other + err.getvalue().splitlines()


@pytest.fixture
def engine():
    """``run_in_process`` as a fixture: ``engine(spec_path)`` -> (rc, events, other output lines)."""
    return run_in_process


def run_torchrun(spec_path, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m training run SPEC``. If it outlives ``timeout``, every worker
    prints its threads' stacks (the engine's SIGUSR1 handler) before the whole group is killed, and the test fails
    with them: a hang says where it hangs."""
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(nproc), "-m", "training", "run", str(spec_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == proc.pid]
        for pid in workers:
            os.kill(pid, signal.SIGUSR1)
        time.sleep(3)
        for pid in workers:  # torchrun starts each worker in a session of its own
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun still running after {timeout} s; workers {workers}; stdout tail:\n{out[-1500:]}\n"
                    f"stderr tail (stacks):\n{err[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def losses(events):
    return {e["step"]: e["metrics"]["loss"] for e in events if e["event"] == "step"}


ARCH = {k: TINY[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")}


def run_inprocess(spec: dict, tmp_path, capsys=None, name="run"):
    """``run_in_process`` for a spec given as a dict; returns (rc, events). (``capsys`` is no longer needed: the
    output is captured here.)"""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    rc, events, _ = run_in_process(path)
    return rc, [e for e in events if isinstance(e, dict)]


TRAINED = (("pretrain", "demo-pretrain", None, 150), ("sft", "demo-sft", "pretrain", 300))
# MiniMind's identity system prompts take 21-68 demo-tokenizer tokens: 64-token rows would lose most answers behind them
SFT_ROWS = {"max_seq_len": 128}


@pytest.fixture(scope="session")
def trained(demo_dir):
    """A tiny pretrained model and an SFT model on top of it, trained by the engine once for all workers and sessions
    until the engine changes (``built_once``); the paths of their MiniMind ``.pth`` files."""

    def build(root):
        out = {}
        for stage, data, base, steps in TRAINED:
            spec = {"stage": stage, "run_dir": str(root / stage), "dataset": str(demo_dir / f"{data}.jsonl"),
                    "tokenizer": str(demo_dir / "demo-tokenizer"), "device": "cpu",
                    "config": {**TINY, "max_steps": steps, "epochs": 3, "log_interval": 50,
                               **(SFT_ROWS if stage == "sft" else {})}}
            if base:
                spec["base_model"] = {"path": str(root / out[base]), "config": ARCH}
            path = root / f"{stage}.json"
            path.write_text(json.dumps(spec))
            rc, events, other = run_in_process(path)
            assert rc == 0, other
            out[stage] = str(Path(events[-1]["model_path"]).relative_to(root))
        (root / "trained.json").write_text(json.dumps(out))

    root = built_once("trained", build, TRAINED, TINY, SFT_ROWS)
    return {stage: str(root / rel) for stage, rel in json.loads((root / "trained.json").read_text()).items()}
