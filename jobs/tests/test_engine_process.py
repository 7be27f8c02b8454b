"""The supervisor's training child, forked from the warm engine (training/warm.py) or started fresh: the same
process to the supervisor (its own process group, output, exit codes, stop on SIGTERM), the same run (identical
losses), nothing left behind when the server or its worker dies."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from django.conf import settings

from jobs import engine_process
from jobs.engine_process import ENGINE, ForkedChild, WarmEngine

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "batch_size": 8, "max_seq_len": 32, "accumulation_steps": 1, "learning_rate": 3e-3, "log_interval": 1,
        "dtype": "float32", "eval_ratio": 0.0}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    subprocess.run([*ENGINE, "demo-data", str(out)], cwd=settings.BASE_DIR, check=True, capture_output=True)
    return out


@pytest.fixture
def spec(demo, tmp_path):
    def make(name, **config):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"stage": "pretrain", "run_dir": str(tmp_path / name), "device": "cpu",
                                    "dataset": str(demo / "demo-pretrain.jsonl"),
                                    "tokenizer": str(demo / "demo-tokenizer"), "config": {**TINY, **config}}))
        return path
    return make


def cpu_env():
    return dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")


def start(spec_path, env=None):
    return engine_process.launch([*ENGINE, "run", str(spec_path)], env or cpu_env(), str(settings.BASE_DIR))


def events(child):
    lines = list(iter(child.stdout.readline, ""))
    return [json.loads(line) for line in lines if line.startswith("{")], lines


def gone(pid, timeout=10):
    """True once ``pid`` has exited (reaped, or a zombie waiting for whoever adopted it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def losses(evs):
    return [e["metrics"]["loss"] for e in evs if e["event"] == "step"]


def test_a_forked_run_is_the_run_a_fresh_interpreter_makes(spec, settings):
    child = start(spec("warm", max_steps=4))
    assert isinstance(child, ForkedChild)
    assert os.getpgid(child.pid) == child.pid  # its own process group: the supervisor stops it with killpg
    warm, _ = events(child)
    assert child.wait() == 0 and warm[-1]["event"] == "done"
    settings.WARM_START = False
    fresh = start(spec("fresh", max_steps=4))
    assert isinstance(fresh, subprocess.Popen)
    cold, _ = events(fresh)
    assert fresh.wait() == 0
    assert losses(warm) == losses(cold) and len(losses(warm)) == 4  # nothing of the server's state leaks in


def test_sigterm_stops_a_forked_run_at_a_checkpoint_and_errors_keep_their_exit_code(spec, tmp_path):
    child = start(spec("long", max_steps=100000, save_interval=100000))
    for line in iter(child.stdout.readline, ""):
        if '"event": "step"' in line:
            os.killpg(child.pid, signal.SIGTERM)
            break
    evs, _ = events(child)
    assert child.wait() == 143 and any(e["event"] == "checkpoint" for e in evs)  # EXIT_STOPPED, as when fresh
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stage": "pretrain", "run_dir": str(tmp_path / "b"), "config": {"batch_sise": 1}}))
    child = start(bad)
    evs, _ = events(child)
    assert child.wait() == 2 and evs[-1]["event"] == "error"
    child = start(spec("killed", max_steps=100000))
    child.stdout.readline()
    os.killpg(child.pid, signal.SIGKILL)
    events(child)
    assert child.wait() == -signal.SIGKILL


def test_a_dead_server_takes_its_run_with_it_and_the_next_job_gets_a_new_one(spec):
    child = start(spec("orphan", max_steps=100000))
    child.stdout.readline()
    server = WarmEngine.current
    server.proc.kill()  # a worker's fork server lost mid-run
    server.proc.wait()
    assert gone(child.pid), "the run must die with its fork server (PDEATHSIG)"
    assert child.wait() == -signal.SIGKILL
    again = start(spec("after", max_steps=1))
    assert isinstance(again, ForkedChild) and WarmEngine.current is not server
    assert events(again)[0][-1]["event"] == "done" and again.wait() == 0


def test_gpu_and_torchrun_runs_start_a_fresh_interpreter(spec):
    path = str(spec("gpu", max_steps=1))
    torchrun = [ENGINE[0], "-u", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "training", "run", path]
    for cmd, env in (([*ENGINE, "run", path], dict(cpu_env(), CUDA_VISIBLE_DEVICES="0")), (torchrun, cpu_env())):
        proc = engine_process.launch(cmd, env, str(settings.BASE_DIR))
        assert isinstance(proc, subprocess.Popen)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_forked_run_shows_the_command_line_of_a_fresh_one(spec):
    path = spec("title", max_steps=100000)
    child = start(path)
    child.stdout.readline()
    cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    os.killpg(child.pid, signal.SIGKILL)
    events(child)
    child.wait()
    assert cmdline == " ".join([*ENGINE, "run", str(path)])


def test_a_run_on_cpu_slots_trains_with_its_share_of_the_cores(spec, settings):
    """OMP_NUM_THREADS (the supervisor's share of the cores for a job on CPU slots) is the run's thread count, in a
    fresh interpreter and forked from a warm engine alike; the log says it."""
    from jobs.supervisor import _format

    for warm, threads in ((False, "2"), (True, "1"), (True, "2")):
        settings.WARM_START = warm
        child = start(spec(f"threads-{warm}-{threads}", max_steps=1), dict(cpu_env(), OMP_NUM_THREADS=threads))
        assert isinstance(child, ForkedChild) == warm
        evs, lines = events(child)
        assert child.wait() == 0, lines
        begin = next(e for e in evs if e["event"] == "start")
        assert begin["threads"] == int(threads), (warm, threads)
        assert f"on cpu ({threads} threads)" in _format(begin)
    WarmEngine.current and WarmEngine.current.close()


@pytest.mark.django_db
def test_jobs_on_cpu_slots_share_the_cores(monkeypatch, settings):
    """Each process of a job on CPU slots gets the node's cores over its CPU slots (torch's default, every core for
    every job, made two jobs on two slots of two cores 3.7x slower each); a GPU job's environment is left alone."""
    from jobs import devices
    from jobs.models import Node
    from jobs.supervisor import _device_env

    cpu = [{"index": i, "kind": "cpu"} for i in range(4)]
    Node.objects.create(name="cpus", devices=cpu)
    Node.objects.create(name="gpus", devices=[{"index": 0, "kind": "cuda"}, {"index": 1, "kind": "cuda"}])
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    for cores, share in [(16, "4"), (6, "1"), (2, "1")]:
        monkeypatch.setattr(devices, "cpu_cores", lambda: cores)
        env = _device_env("cpus", [0])
        assert env["OMP_NUM_THREADS"] == share and env["CUDA_VISIBLE_DEVICES"] == ""
        assert _device_env("cpus", [1, 2])["OMP_NUM_THREADS"] == share  # each of its processes: one slot's share
    settings.CPU_JOB_THREADS = 3
    assert _device_env("cpus", [0])["OMP_NUM_THREADS"] == "3"
    gpu = _device_env("gpus", [0, 1])
    assert gpu["CUDA_VISIBLE_DEVICES"] == "0,1" and gpu.get("OMP_NUM_THREADS") == "7"
