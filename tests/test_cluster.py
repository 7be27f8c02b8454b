"""Several nodes on one PostgreSQL + Redis: a web process and two worker nodes started as separate processes.

Jobs spread over both nodes, a node whose serve is killed with SIGKILL takes its whole process tree with it and has
its running job resumed on the other from the last checkpoint (one training process for the job at any time), a node on the wrong storage refuses to
start, live metrics from a worker reach a WebSocket client of the web process through the Redis channel layer, and
a 2-process DDP job (gloo) that neither node can take alone runs over both through torchrun.
Runs where DATABASE_URL is PostgreSQL and REDIS_URL is set (the second pass of .ci/run).
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
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
        self.env = dict(web.env, MINICLOUD_NODE=name, MINICLOUD_DEVICES="cpu:1", MINICLOUD_HEARTBEAT_S="1",
                        MINICLOUD_NODE_TIMEOUT_S="6", MINICLOUD_NODE_ADDRESS="127.0.0.1", **env)
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


def test_two_worker_nodes_share_jobs_take_over_a_dead_node_and_stream_through_redis(tmp_path):
    home = tmp_path / "shared-home"
    home.mkdir()
    web = LiveNode(home)
    web.env["MINICLOUD_NODE"] = "web-1"
    web.args = ["--web"]
    web.start()
    workers = [WorkerNode(web, "node-a"), WorkerNode(web, "node-b")]
    try:
        for w in workers:
            w.start()
        deadline = time.time() + 120
        while {d["node"] for d in web.request("GET", "/api/v1/devices")[1]["devices"]} != {"node-a", "node-b"}:
            assert time.time() < deadline, [w.log() for w in workers]
            time.sleep(0.5)

        # A node whose MINICLOUD_HOME is not the shared one refuses to start, saying why.
        other = tmp_path / "local-disk"
        other.mkdir()
        stray = WorkerNode(web, "node-x", MINICLOUD_HOME=str(other))
        out = subprocess.run([sys.executable, "manage.py", "serve", "--worker"], cwd=ROOT, env=stray.env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "is not the storage the other nodes use" in out.stderr

        jobs = [web.submit(f"spread-{i}", {**TINY, "max_steps": 400, "log_interval": 1, "save_interval": 10})
                for i in range(2)]
        running = [web.wait_for(j["id"], lambda j: j["status"] == "running" and j["step"] >= 1, what="running")
                   for j in jobs]
        assert {j["node"] for j in running} == {"node-a", "node-b"}, running

        # Live metrics of a job on a worker node reach the web process's WebSocket (Redis channel layer).
        uri = f"ws://127.0.0.1:{web.port}/ws/jobs/{jobs[0]['id']}/?after=0&log_after=0"
        seqs = []
        with connect(uri, origin=web.url, additional_headers={"Authorization": f"Bearer {web.token}"},
                     open_timeout=10) as ws:
            while len(seqs) < 5:
                seqs += [p["seq"] for p in json.loads(ws.recv(timeout=60))["points"]]
        assert seqs == sorted(seqs)

        victim = next(j for j in running if j["node"] == "node-a")
        survivor = next(j for j in running if j["node"] == "node-b")
        web.wait_for(victim["id"], lambda j: j["step"] >= 15, what="past a checkpoint")
        # kill -9 of node-a's serve alone: its runners and training process must end with it (a parent-death signal
        # down the whole tree), so that the job, moved to node-b, never runs in two places at once
        spec = (home, victim["id"])
        most, watching = [0], threading.Event()

        def watch():
            while not watching.is_set():
                most[0] = max(most[0], len(training_processes(*spec)))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        workers[0].proc.kill()
        workers[0].proc.wait()
        web.request("POST", f"/api/v1/jobs/{survivor['id']}/cancel")  # frees node-b's only slot
        moved = web.wait_for(victim["id"], lambda j: j["status"] == "running" and j["node"] == "node-b",
                             timeout=120, what="resumed on node-b")
        done = web.wait_for(moved["id"], lambda j: j["status"] in ("succeeded", "failed"), timeout=300,
                            what="finished on node-b")
        assert done["status"] == "succeeded", (done, workers[1].log())
        watching.set()
        watcher.join()
        assert most[0] == 1, "one training process for the job at any time"
        events = web.request("GET", f"/api/v1/jobs/{victim['id']}")[1]["events"]
        assert any("node node-a stopped answering" in e["message"] for e in events), events
        log = web.request("GET", f"/api/v1/jobs/{victim['id']}/logs?after=0")[1]["text"]
        assert int(log.split("resumed from step ")[1].split()[0]) >= 10
        assert not workers[0].pids()

        # node-a is back; a job asking for 2 devices, which neither node has alone, runs over both (torchrun with
        # node ranks, gloo), rank 0's node recording its events.
        restarted = time.time()
        workers[0] = WorkerNode(web, "node-a").start()

        def beat_again():  # a heartbeat of the restarted node-a (its old one is still in the table, stale)
            return any(d["node"] == "node-a" and d["heartbeat_at"] and
                       datetime.fromisoformat(d["heartbeat_at"]).timestamp() > restarted
                       for d in web.request("GET", "/api/v1/devices")[1]["devices"])

        deadline = time.time() + 120
        while not beat_again() or web.request("GET", f"/api/v1/jobs/{survivor['id']}")[1]["status"] != "cancelled":
            assert time.time() < deadline, workers[0].log()
            time.sleep(0.5)
        pair = web.submit("two-nodes", {**TINY, "max_steps": 12, "log_interval": 2, "save_interval": 6}, gpus=2)
        done = web.wait_for(pair["id"], lambda j: j["status"] in ("succeeded", "failed"), timeout=300,
                            what="finished over two nodes")
        assert done["status"] == "succeeded", (done, [w.log() for w in workers])
        assert sorted(n for n, _ in done["placement"]) == ["node-a", "node-b"]
        other = done["placement"][1][0]
        assert (home / "runs" / f"job-{pair['id']}" / f"engine-{other}.log").exists()
        points = web.request("GET", f"/api/v1/jobs/{pair['id']}/metrics?after=0")[1]["points"]
        assert max(p["step"] for p in points) == 12
    finally:
        rcs = [w.stop() for w in workers if w.proc.poll() is None]
        rc = web.stop()
        web.drop_database()
    assert rc == 0 and all(r == 0 for r in rcs), web.log()
    deadline = time.time() + 10
    while processes_of(home) and time.time() < deadline:
        time.sleep(0.3)
    assert processes_of(home) == []
