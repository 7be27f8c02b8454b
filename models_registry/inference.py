"""The web side of generation: one ``python -m training chat-worker`` child per web process, spoken to over pipes.

The web server never imports torch and never blocks on a model: it writes a request line and relays the worker's
token deltas as they arrive (asyncio). Requests take turns (one generation at a time per web process); a client
that goes away cancels its generation at the next token. The worker runs on the CPU (``CUDA_VISIBLE_DEVICES=""``):
the GPUs belong to the scheduler's jobs.
"""
from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid

from django.conf import settings
from django.utils.translation import gettext as _

from minicloud.errors import ServiceError
from minicloud.processes import die_with_parent, engine_env

from .models import Tokenizer


START_TIMEOUT_S = 180
_worker = None


class ChatWorker:
    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.lock = asyncio.Lock()
        self.proc = None

    async def _start(self):
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "training", "chat-worker", cwd=settings.BASE_DIR, env=worker_env(),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 24,
            preexec_fn=die_with_parent(signal.SIGTERM))
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            line = b""
        if not line.startswith(b'{"ready"'):
            self.stop()
            raise ServiceError(_("the generation worker did not start; the server log says why"), status=503)

    def stop(self):
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except (ProcessLookupError, RuntimeError):  # gone already, or its event loop is
                pass
        self.proc = None

    async def _send(self, msg: dict):
        self.proc.stdin.write((json.dumps(msg, ensure_ascii=False) + "\n").encode())
        await self.proc.stdin.drain()

    async def stream(self, request: dict):
        """Yield the worker's messages for one request (deltas, then ``done``); errors raise ServiceError."""
        async with self.lock:
            if self.proc is None or self.proc.returncode is not None:
                await self._start()
            rid = uuid.uuid4().hex
            await self._send({**request, "id": rid})
            finished = False
            try:
                while True:
                    line = await self.proc.stdout.readline()
                    if not line:
                        self.proc = None
                        raise ServiceError(_("the generation worker stopped; try again"), status=503)
                    msg = json.loads(line)
                    if msg.get("id") != rid:
                        continue  # the tail of an earlier, cancelled request
                    if "error" in msg:
                        finished = True
                        raise ServiceError(msg["error"], status=400)
                    finished = bool(msg.get("done"))
                    yield msg
                    if finished:
                        return
            finally:
                if not finished and self.proc is not None:
                    await self._cancel(rid)

    async def _cancel(self, rid: str):
        """Stop the worker's generation for ``rid`` and read up to its end (or restart a worker that hangs)."""
        try:
            await self._send({"cancel": rid})
            async with asyncio.timeout(30):
                while True:
                    line = await self.proc.stdout.readline()
                    if not line:
                        break
                    msg = json.loads(line)
                    if msg.get("id") == rid and (msg.get("done") or "error" in msg):
                        break
        except (TimeoutError, OSError, ValueError):
            self.stop()


def worker_env() -> dict:
    """The chat worker's environment: no secrets, no GPU, and its share of the cores as OMP_NUM_THREADS (every web
    process has a worker: the cores over the web processes, at most 4). A chat generates one token at a time, which
    one thread does as fast as two; three workers generating at once with a thread per core each ran 4.3-4.5x slower
    than with one thread each on two cores (docs/performance.md)."""
    from jobs.devices import core_share

    threads = min(4, core_share(settings.WEB_PROCESSES))
    return dict(engine_env(), CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                OMP_NUM_THREADS=str(threads))


def worker() -> ChatWorker:
    """This event loop's worker (a test client runs each request in a fresh loop: it gets a fresh worker)."""
    global _worker
    loop = asyncio.get_running_loop()
    if _worker is None or _worker.loop is not loop:
        if _worker is not None:
            _worker.stop()
        _worker = ChatWorker()
    return _worker


def model_entry(mv) -> dict:
    """What the worker needs to load a model version."""
    tok = mv.tokenizer if mv.tokenizer_id and mv.tokenizer.status == "ready" else Tokenizer.demo()
    if tok is None:
        raise ServiceError(_("model %(pk)s has no tokenizer") % {"pk": mv.pk}, status=409)
    if not mv.pth_path.exists():
        raise ServiceError(_("the weights file of model %(pk)s is missing on disk") % {"pk": mv.pk}, status=404)
    return {"path": str(mv.pth_path), "config": mv.config, "tokenizer": tok.path}
