"""How a supervisor starts its training child: forked from this worker's warm engine when it can, else a fresh
interpreter. Both give the supervisor one handle: ``pid``, ``stdout`` (text lines: the engine's events and any other
output), ``poll()``, ``wait()``, ``returncode``.

The warm engine (``python -m training warm``, training/warm.py) is a fork server started at this worker's first job:
it has imported torch, transformers and the stages once, so a later job's process starts with them imported instead
of spending ~6 CPU-seconds on it (docs/decisions.md, "Warm engine"). It serves single-process runs on CPU slots; runs
under torchrun, and runs on GPUs (whose CUDA_VISIBLE_DEVICES must be set before CUDA starts, which a fork of a
process that imported torch has not been verified to honour on every driver), start a fresh interpreter as before.
``MINICLOUD_WARM_START=0`` turns it off. Anything wrong with the server (it died, it did not answer) falls back to a
fresh interpreter for that job and a new server for the next.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys

from django.conf import settings

from minicloud.processes import die_with_parent

ENGINE = [sys.executable, "-u", "-m", "training"]
FIRST_FORK_TIMEOUT_S = 180  # the first job waits for the server's imports (seconds on a busy small machine)


def launch(cmd: list[str], env: dict, cwd: str):
    """Start ``cmd`` (from supervisor.engine_command) with ``env`` in ``cwd``: forked when it is a single engine
    process on no GPU and warm starts are on, else through subprocess.Popen."""
    if settings.WARM_START and cmd[:len(ENGINE)] == ENGINE and env.get("CUDA_VISIBLE_DEVICES") == "":
        child = WarmEngine.fork(cmd[len(ENGINE):], env, cwd)
        if child is not None:
            return child
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        encoding="utf-8", errors="replace", bufsize=1, start_new_session=True,
        # The child dies with its supervisor (PDEATHSIG): a job whose node is lost must not go on writing its run
        # folder while another node resumes it.
        preexec_fn=die_with_parent(signal.SIGKILL))


def _same(env: dict) -> dict:
    """What must be equal for a server to fork a run: its environment but the run's own event token."""
    return {k: v for k, v in env.items() if k != "MINICLOUD_EVENT_TOKEN"}


class ForkedChild:
    """A run forked by the warm engine, seen like a subprocess.Popen."""

    def __init__(self, server: "WarmEngine", pid: int, stdout):
        self.server, self.pid, self.stdout = server, pid, stdout
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid, block=False)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid, block=True)
        return self.returncode


class WarmEngine:
    """This worker process's fork server, started on first use (one supervisor per worker runs one job at a time)."""

    current: "WarmEngine | None" = None

    def __init__(self, env: dict, cwd: str):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            # its own session (a Ctrl-C of `serve` reaches the jobs through the supervisor, not through the
            # terminal), and it dies with this worker, its children with it
            # (the blank argument is room for the children's command lines: training/warm.py)
            self.proc = subprocess.Popen([*ENGINE, "warm", str(theirs.fileno()), " " * 4096], cwd=cwd, env=env,
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=die_with_parent(signal.SIGKILL))
        self.sock = ours
        self.exits: dict[int, int] = {}
        self.env = env

    @classmethod
    def fork(cls, argv: list[str], env: dict, cwd: str) -> ForkedChild | None:
        server = cls.current
        if server is None or server.proc.poll() is not None or _same(server.env) != _same(env):
            if server is not None:
                server.close()
            server = cls.current = cls(_same(env), cwd)
        try:
            return server._fork(argv, env, cwd)
        except (OSError, ValueError, KeyError) as exc:  # ConnectionError, a timeout: a fresh interpreter this time
            sys.stderr.write(f"warm engine unavailable ({exc!r}); starting a fresh interpreter\n")
            server.close()
            cls.current = None
            return None

    def _fork(self, argv, env, cwd) -> ForkedChild:
        out_r, out_w = os.pipe()
        try:
            try:
                socket.send_fds(self.sock, [json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()], [out_w])
            finally:
                os.close(out_w)
            self.sock.settimeout(FIRST_FORK_TIMEOUT_S)
            try:
                reply = self._receive()
                while "exit" in reply:  # an earlier child's end, read before this answer
                    reply = self._receive()
            finally:
                self.sock.settimeout(None)
        except BaseException:
            os.close(out_r)
            raise
        stdout = open(out_r, "r", encoding="utf-8", errors="replace", buffering=1)
        return ForkedChild(self, int(reply["pid"]), stdout)

    def _receive(self) -> dict:
        raw = self.sock.recv(1 << 16)
        if not raw:
            raise ConnectionError("the warm engine has exited")
        message = json.loads(raw)
        if "exit" in message:
            self.exits[int(message["pid"])] = int(message["exit"])
        return message

    def exit_code(self, pid: int, block: bool) -> int | None:
        while pid not in self.exits:
            if not block and not select.select([self.sock], [], [], 0)[0]:
                return None
            try:
                self._receive()
            except (OSError, ValueError):  # the server is gone: its children died with it (PDEATHSIG)
                self.exits[pid] = -signal.SIGKILL
        return self.exits.pop(pid)

    def close(self) -> None:
        self.sock.close()  # the server sees the end of its socket and exits
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
