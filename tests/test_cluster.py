"""The web and worker roles on one PostgreSQL + Redis: `serve --web` and `serve --worker` as separate processes (the
web processes on their own box beside the machine that trains, or beside a Slurm login node running the worker).

A job runs on the worker node, its live metrics reach a WebSocket client of the web process through the Redis channel
layer, a worker on the wrong storage refuses to start, and a worker whose serve is killed with SIGKILL takes its
whole process tree with it (one training process for the job at any time, none after the kill); started again, it
resumes the job from its last checkpoint. Jobs over several machines, and moving a job off a failed machine, are
Slurm's (tests/test_slurm.py). Runs where DATABASE_URL is PostgreSQL and REDIS_URL is set (the second pass of
.ci/run).
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.sync.client import connect

from .live import ROOT, TINY, LiveNode, processes_of, training_processes

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith("postgres") or not os.environ.get("REDIS_URL"),
    reason="needs DATABASE_URL=postgres://… and REDIS_URL (several nodes share them)")]


class WorkerNode:
    """``manage.py serve --worker`` with its own node name and one CPU slot, sharing the web node's database,
    Redis and MINICLOUD_HOME."""

    def __init__(self, web: LiveNode, name: str, **env):
        self.name = name
        self.env = dict(web.env, MINICLOUD_NODE=name, MINICLOUD_DEVICES="cpu:1", MINICLOUD_HEARTBEAT_S="1", **env)
        self.log_path = Path(self.env["MINICLOUD_HOME"]) / f"{name}.log"

    def start(self):
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "manage.py", "serve", "--worker"], cwd=ROOT, env=self.env,
                                     stdout=self.log_file, stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def pids(self) -> list[int]:
        needle = f"MINICLOUD_NODE={self.name}".encode()
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if needle in (proc / "environ").read_bytes().split(b"\0"):
                        found.append(int(proc.name))
                except OSError:
                    pass
        return found

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout=60)
        self.log_file.close()
        return rc


def test_a_web_node_and_a_worker_node_share_jobs_metrics_and_storage(tmp_path):
    home = tmp_path / "shared-home"
    home.mkdir()
    web = LiveNode(home)
    web.env["MINICLOUD_NODE"] = "web-1"
    web.args = ["--web"]
    web.start()
    worker = WorkerNode(web, "node-a").start()
    try:
        deadline = time.time() + 120
        while {d["node"] for d in web.request("GET", "/api/v1/devices")[1]["devices"]} != {"node-a"}:
            assert time.time() < deadline, worker.log()
            time.sleep(0.5)

        # A worker whose MINICLOUD_HOME is not the shared one refuses to start, saying why.
        other = tmp_path / "local-disk"
        other.mkdir()
        stray = WorkerNode(web, "node-x", MINICLOUD_HOME=str(other))
        out = subprocess.run([sys.executable, "manage.py", "serve", "--worker"], cwd=ROOT, env=stray.env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "is not the storage the other nodes use" in out.stderr

        job = web.submit("on-the-worker", {**TINY, "max_steps": 80, "log_interval": 1, "save_interval": 10})
        running = web.wait_for(job["id"], lambda j: j["status"] == "running" and j["step"] >= 1, what="running")
        assert running["node"] == "node-a"

        # Live metrics of a job on the worker node reach the web process's WebSocket (Redis channel layer).
        uri = f"ws://127.0.0.1:{web.port}/ws/jobs/{job['id']}/?after=0&log_after=0"
        seqs = []
        with connect(uri, origin=web.url, additional_headers={"Authorization": f"Bearer {web.token}"},
                     open_timeout=10) as ws:
            while len(seqs) < 5:
                seqs += [p["seq"] for p in json.loads(ws.recv(timeout=60))["points"]]
        assert seqs == sorted(seqs)

        web.wait_for(job["id"], lambda j: j["step"] >= 15, what="past a checkpoint")
        # kill -9 of the worker's serve: its runners and training process end with it (a parent-death signal down
        # the whole tree), so that no orphan goes on writing the run folder
        most, watching = [0], threading.Event()

        def watch():
            while not watching.is_set():
                most[0] = max(most[0], len(training_processes(home, job["id"])))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        worker.proc.kill()
        worker.proc.wait()
        deadline = time.time() + 10
        while worker.pids() and time.time() < deadline:
            time.sleep(0.2)
        assert not worker.pids(), "the killed worker left processes behind"
        worker = WorkerNode(web, "node-a").start()
        done = web.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed"), timeout=300,
                            what="finished after the worker restarted")
        assert done["status"] == "succeeded", (done, worker.log())
        watching.set()
        watcher.join()
        assert most[0] == 1, "one training process for the job at any time"
        events = web.request("GET", f"/api/v1/jobs/{job['id']}")[1]["events"]
        assert any("the node restarted" in e["message"] for e in events), events
        log = web.request("GET", f"/api/v1/jobs/{job['id']}/logs?after=0")[1]["text"]
        assert int(log.split("resumed from step ")[1].split()[0]) >= 10
    finally:
        rcs = [worker.stop()] if worker.proc.poll() is None else []
        rc = web.stop()
        web.drop_database()
    assert rc == 0 and all(r == 0 for r in rcs), web.log()
    deadline = time.time() + 10
    while processes_of(home) and time.time() < deadline:
        time.sleep(0.3)
    assert processes_of(home) == []
