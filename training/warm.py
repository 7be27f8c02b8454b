"""``python -m training warm FD``: a fork server for training runs.

A fresh interpreter spends about 6 CPU-seconds importing torch, transformers' Qwen3 classes and the stages before a
tiny model's first step (docs/performance.md); a class of students running small jobs on CPU slots pays that for
every job. The server imports all of it once and forks a child per run, which starts at ``cli(["run", SPEC])`` with
everything already imported.

The protocol, on the Unix socket (SOCK_SEQPACKET: one message per send) whose descriptor the supervisor passed:

- supervisor -> server: ``{"argv": [...], "env": {...}, "cwd": "..."}`` with one descriptor (the child's stdout and
  stderr, usually a pipe's write end);
- server -> supervisor: ``{"pid": N}`` once the child is forked, ``{"pid": N, "exit": CODE}`` when it ends (CODE as
  ``subprocess`` reports it: negative for a signal).

A child is what a fresh ``python -m training`` would be to its supervisor: its own session and process group (the
supervisor stops it with killpg), the same command line in ``ps`` (setproctitle), stdin from /dev/null, the environment and working directory of the request, fresh
seeds for ``random``; it dies with the server (PR_SET_PDEATHSIG), which dies with its supervisor, so a lost worker
leaves no training behind. Only the server ever imports; it never computes, so no thread pool and no device exists
yet when it forks (importing torch starts one idle native thread; torch's own DataLoader forks after far more). The
server ends when its supervisor closes the socket.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time

from setproctitle import setproctitle

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies; exit now if the parent is already gone."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except OSError:
        pass
    if os.getppid() != parent:
        os._exit(128 + sig)


def background_child() -> None:
    """The ``preexec_fn`` of a token-cache builder started beside other work (a job's, or a dataset's statistics'): it
    dies with the process that started it and yields the CPUs at the lowest priority, using what the training leaves
    (most of a GPU box's cores; on a small CPU box a job's first steps are not slowed by it)."""
    die_with_parent()
    os.nice(19)


# What every run imports (training.__main__.cmd_run); importing touches no device.
PRELOAD = ("torch", "training.model", "training.chat", "training.loop", "training.distill", "training.dpo",
           "training.evaluate", "training.grpo", "training.lora", "training.ppo", "training.pretrain", "training.sft")


def preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)


def serve(fd: int) -> int:
    # setproctitle sets itself up on its first call, from this process's own command line, which the supervisor
    # padded with room for a child's (SPT_NOENV: /proc/PID/environ stays readable, as for a fresh process)
    os.environ["SPT_NOENV"] = "1"
    setproctitle(" ".join([sys.executable, "-u", "-m", "training", "warm", str(fd)]))
    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for `serve`, which stops its jobs in order
    die_with_parent()
    preload()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select() through the wake-up pipe
    children: set[int] = set()
    while True:
        try:
            ready, _, _ = select.select([sock, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
        for pid in list(children):  # reap on every wake-up: one SIGCHLD may stand for several children
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                _send(sock, {"pid": pid, "exit": os.waitstatus_to_exitcode(status)})
        if sock in ready:
            try:
                msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 1)
            except ConnectionResetError:  # closed with our replies unread: gone as well
                msg = b""
            if not msg:  # the supervisor is gone; the children follow us by PDEATHSIG
                return 0
            request = json.loads(msg)
            started_r, started_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(started_r)
                _child(request, fds[0], started_w, (sock.fileno(), wake_r, wake_w))
            os.close(started_w)
            os.read(started_r, 1)  # the child has its own process group: the supervisor may signal it from now on
            os.close(started_r)
            for f in fds:
                os.close(f)
            children.add(pid)
            _send(sock, {"pid": pid})


def _send(sock, message: dict) -> None:
    try:
        sock.send(json.dumps(message).encode())
    except OSError:  # the supervisor is gone: nobody to tell
        pass


def _child(request: dict, out_fd: int, started_w: int, server_fds) -> None:
    """In the forked child: become the run the request describes, then exit with its code (never returns)."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        from . import events

        events.STARTED = time.time()  # this run started now, not when the server imported the engine
        for sig in (signal.SIGCHLD, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for f in server_fds:
            os.close(f)
        os.setsid()
        os.write(started_w, b"1")
        os.close(started_w)
        die_with_parent()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(out_fd)
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["python -m training", *request["argv"]]
        # `ps`, `top` and whoever looks for a job's process by its command line see what a fresh one would show
        setproctitle(" ".join([sys.executable, "-u", "-m", "training", *request["argv"]]))
        import random

        import numpy

        random.seed()  # a fresh interpreter's draws, not the server's (every child would share them)
        numpy.random.seed()
        from .__main__ import cli

        code = cli(request["argv"])
        code = 0 if code is None else code
    except BaseException:  # noqa: BLE001 - whatever happens, the child must not return into the server's loop
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)
