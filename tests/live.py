"""A real MiniCloud node for end-to-end tests: `manage.py serve` (daphne + qcluster) in a subprocess.

It gets a temporary MINICLOUD_HOME, a free port and two CPU slots. Under DATABASE_URL=postgres… it gets a fresh
database of its own (dropped afterwards); under REDIS_URL, a queue name and channel prefix of its own.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADMIN = ("admin", "e2e-admin-password")
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "batch_size": 16, "max_seq_len": 64, "accumulation_steps": 1, "learning_rate": 3e-3, "log_interval": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_admin(url: str, sql: str) -> None:
    import psycopg
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    with psycopg.connect(urlunsplit(parts._replace(path="/postgres")), autocommit=True) as conn:
        conn.execute(sql)


class LiveNode:
    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, MINICLOUD_HOME=str(home), PORT=str(self.port), MINICLOUD_DEVICES="cpu:2",
                        MINICLOUD_INSTANCE=f"mc-e2e-{uuid.uuid4().hex[:8]}", MINICLOUD_KILL_GRACE="5",
                        DJANGO_SUPERUSER_USERNAME=ADMIN[0], DJANGO_SUPERUSER_PASSWORD=ADMIN[1], PYTHONUNBUFFERED="1",
                        MINICLOUD_METRICS_TOKEN=f"scrape-{uuid.uuid4().hex}",
                        DJANGO_SETTINGS_MODULE="tests.live_settings",  # a fast password hasher
                        # uploads of more than 1 KB are checked in the background (the browser test sends both)
                        MINICLOUD_VALIDATE_INLINE_BYTES="1000")
        self.pg_db = None
        db_url = os.environ.get("DATABASE_URL", "")
        if db_url.startswith(("postgres://", "postgresql://")):
            from urllib.parse import urlsplit, urlunsplit

            self.pg_db = f"minicloud_e2e_{uuid.uuid4().hex[:8]}"
            _pg_admin(db_url, f'CREATE DATABASE "{self.pg_db}"')
            self.env["DATABASE_URL"] = urlunsplit(urlsplit(db_url)._replace(path=f"/{self.pg_db}"))
        self.log_path = home / "serve.log"
        self.proc = None
        self.token = None
        self.args = []  # e.g. ["--web"]
        self.own_group = False  # serve in a process group of its own (a test kills the whole group)

    def start(self, timeout=120):
        self.log_file = open(self.log_path, "ab")
        started_at = self.log_path.stat().st_size  # a restart: only this serve's own lines count below
        self.proc = subprocess.Popen([sys.executable, "manage.py", "serve", *self.args], cwd=ROOT, env=self.env,
                                     stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=self.own_group)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited early:\n{self.log()}")
            try:
                # after a kill -9, the old web processes may still answer while they shut down: wait for this
                # serve's own start (its web processes spawned, the old ones killed) before asking
                ready = b"Press Ctrl-C to stop." in self.log_path.read_bytes()[started_at:]
                if ready and self.request("GET", "/api/v1/health", auth=False)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"serve did not answer in {timeout}s:\n{self.log()}")
        status, body = self.request("POST", "/api/v1/auth/token", {"username": ADMIN[0], "password": ADMIN[1]},
                                    auth=False)
        assert status == 200, body
        self.token = body["token"]
        return self

    def stop(self, timeout=60) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"serve did not stop in {timeout}s:\n{self.log()}")
        self.log_file.close()
        return self.proc.returncode

    def drop_database(self):
        if self.pg_db:
            _pg_admin(os.environ["DATABASE_URL"], f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def manage(self, *args) -> str:
        """Run a management command against this node's database; returns its output."""
        out = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def token_for(self, username, password) -> str:
        status, body = self.request("POST", "/api/v1/auth/token", {"username": username, "password": password},
                                    auth=False)
        assert status == 200, body
        return body["token"]

    def request(self, method, path, data=None, auth=True, raw=False, token=None):
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {token or self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                content = resp.read()
                return resp.status, content if raw else json.loads(content)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def upload(self, path, fields: dict, files: dict, token=None):
        """A multipart POST (``files`` maps a field to (filename, bytes)); returns (status, JSON body)."""
        boundary = uuid.uuid4().hex
        parts = []
        for key, value in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
        for key, (filename, data) in files.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{filename}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        req = urllib.request.Request(self.url + path, data=body, method="POST")
        req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
        req.add_header("Authorization", f"Bearer {token or self.token}")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def submit(self, name, config, stage="pretrain", token=None, **fields):
        status, datasets = self.request("GET", "/api/v1/datasets", token=token)
        ds = next(d for d in datasets["datasets"] if d["name"] == "demo-pretrain")
        status, job = self.request("POST", "/api/v1/jobs", {"name": name, "stage": stage, "dataset": ds["id"],
                                                             "config": config, **fields}, token=token)
        assert status == 201, job
        return job

    def job(self, job_id):
        return self.request("GET", f"/api/v1/jobs/{job_id}")[1]

    def wait_for(self, job_id, predicate, timeout=240, what="condition"):
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if predicate(job):
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id}: {what} not reached in {timeout}s: {self.job(job_id)}\n{self.log()}")


def processes_of(home: Path) -> list[str]:
    """Command lines of live processes started for the node whose MINICLOUD_HOME is ``home``."""
    return list(node_processes(home).values())


def node_processes(home: Path) -> dict[int, str]:
    """The live processes started for the node whose MINICLOUD_HOME is ``home``: their command lines by PID."""
    needle = f"MINICLOUD_HOME={home}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in env and state != "Z":
            found[int(proc.name)] = cmd
    return found


def training_processes(home: Path, job_id: int) -> list[int]:
    """PIDs of live `training run` processes of job ``job_id`` of the node(s) whose MINICLOUD_HOME is ``home``: the
    whole spec path, since parallel test workers each have their own portal and job numbers repeat between them."""
    spec = str(Path(home).resolve() / "runs" / f"job-{job_id}" / "spec.json")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "training run" in cmd and spec in cmd.split() and state != "Z":
            pids.append(int(proc.name))
    return pids
