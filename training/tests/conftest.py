import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "batch_size": 16, "max_seq_len": 64, "accumulation_steps": 1, "learning_rate": 3e-3, "log_interval": 1,
        "dtype": "float32"}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from training.__main__ import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo-data", str(out)]) == 0
    return out


@pytest.fixture
def make_spec(demo_dir, tmp_path):
    def make(name="run", **config):
        spec = {"stage": "pretrain", "run_dir": str(tmp_path / name), "dataset": str(demo_dir / "demo-pretrain.jsonl"),
                "tokenizer": str(demo_dir / "demo-tokenizer"), "device": "cpu", "config": {**TINY, **config}}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(spec))
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


def run_inprocess(spec: dict, tmp_path, capsys, name="run"):
    """Run the engine's CLI in this process (no interpreter start-up); returns (rc, events)."""
    from training.__main__ import main

    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    capsys.readouterr()
    rc = main(["run", str(path)])
    out = capsys.readouterr().out
    return rc, [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="session")
def trained(demo_dir, tmp_path_factory):
    """A tiny pretrained model and an SFT model on top of it (trained once per session, in a subprocess)."""
    root = tmp_path_factory.mktemp("trained")
    out = {}
    for stage, data, base, steps in (("pretrain", "demo-pretrain", None, 150), ("sft", "demo-sft", "pretrain", 300)):
        spec = {"stage": stage, "run_dir": str(root / stage), "dataset": str(demo_dir / f"{data}.jsonl"),
                "tokenizer": str(demo_dir / "demo-tokenizer"), "device": "cpu",
                "config": {**TINY, "max_steps": steps, "epochs": 3, "log_interval": 50}}
        if base:
            spec["base_model"] = {"path": out[base], "config": ARCH}
        path = root / f"{stage}.json"
        path.write_text(json.dumps(spec))
        rc, events, other = run_engine(path)
        assert rc == 0, other
        out[stage] = events[-1]["model_path"]
    return out
