"""The web side of generation: one ``python -m training chat-worker`` per node, which every web process speaks to.

``serve`` starts the node's worker beside its web processes; each connects to it on an abstract Unix socket
(``node_socket``). The web server never imports torch and never blocks on a model: it writes request lines and
relays the worker's token deltas as they arrive (asyncio; one reader hands each line to its request). Up to
``CHAT_BATCH`` generations run at once on the node, generated together by the worker (one forward pass per token for
all of them), the rest wait in fair turns between users (training/chat_worker.py ``Turns``: one member's many
requests never hold a classmate's behind all of them); a client that goes away cancels its generation at the next
token, or leaves the queue. A process not started by ``serve`` (runserver, the tests) starts a worker of its own. The
worker runs on the CPU (``CUDA_VISIBLE_DEVICES=""``): the GPUs belong to the scheduler's jobs.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sys
import uuid

from django.conf import settings
from django.utils.translation import gettext as _

from minicloud.errors import ServiceError, explained, stored_text
from minicloud.processes import die_with_parent, engine_env

from .models import Tokenizer


START_TIMEOUT_S = 180
_worker = None


class ChatWorker:
    """This web process's line to the node's generation worker: the one ``serve`` started for the node
    (``settings.CHAT_SOCKET``: every web process connects to it, so a class's chats are generated in one batch
    whichever web process accepted them), or else a worker of its own (``runserver``, the tests), started on its first
    chat. The turns (``CHAT_BATCH`` chats at once, fair between users, ``CHAT_REQUESTS_PER_USER`` each) are the
    worker's (training/chat_worker.py ``Turns``)."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.proc = None  # the worker this process started (none where it connects to the node's)
        self.pid = None  # the worker's process id (it says so when it is ready)
        self.writer = None  # the line to it while it answers
        self.inboxes: dict[str, asyncio.Queue] = {}  # the running requests' messages, by request id
        self._starting = asyncio.Lock()
        self._reader = None

    def alive(self) -> bool:
        return self.writer is not None

    async def _start(self):
        async with self._starting:  # the requests that come at once start (or connect to) one worker
            if self.alive():
                return
            self.inboxes = {}  # this worker's requests (a dead worker's reader may still empty its own)
            deadline = self.loop.time() + START_TIMEOUT_S
            try:
                if settings.CHAT_SOCKET:
                    reader, writer = await self._connect(settings.CHAT_SOCKET, deadline)
                else:
                    self.proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "training", "chat-worker", *worker_args(), cwd=settings.BASE_DIR,
                        env=worker_env(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                        limit=1 << 24, preexec_fn=die_with_parent(signal.SIGTERM))
                    reader, writer = self.proc.stdout, self.proc.stdin
                line = await asyncio.wait_for(reader.readline(), max(deadline - self.loop.time(), 0.1))
                ready = json.loads(line) if line.startswith(b'{"ready"') else None
            except (OSError, TimeoutError, ValueError):
                ready = None
            if ready is None:
                self.stop()
                raise ServiceError(_("the generation worker did not start; the server log says why"), status=503)
            self.writer, self.pid = writer, ready.get("pid")
            self._reader = asyncio.create_task(self._read(reader, writer, self.inboxes))

    async def _connect(self, name: str, deadline: float):
        """Connect to the node's worker (while ``serve`` starts it again after a crash, it does not answer yet)."""
        while True:
            try:
                return await asyncio.open_unix_connection("\0" + name, limit=1 << 24)
            except (ConnectionRefusedError, FileNotFoundError):
                if self.loop.time() > deadline:
                    raise TimeoutError from None
                await asyncio.sleep(0.2)

    async def _read(self, reader, writer, inboxes: dict):
        """Hand each of the worker's lines to its request; when the worker ends, each of its requests hears None."""
        try:
            while line := await reader.readline():
                msg = json.loads(line)
                inbox = inboxes.get(msg.get("id"))
                if inbox is not None:  # else the tail of a request that went away
                    inbox.put_nowait(msg)
        except (OSError, ValueError):
            pass
        finally:
            if self.writer is writer:
                self.stop()
            for inbox in inboxes.values():
                inbox.put_nowait(None)

    def stop(self):
        """Let go of the worker: kill the one this process started, or close the line to the node's (which ends this
        process's chats there)."""
        writer, self.writer = self.writer, None
        if self.proc is not None:
            if self.proc.returncode is None:
                try:
                    self.proc.kill()
                except (ProcessLookupError, RuntimeError):  # gone already, or its event loop is
                    pass
            self.proc = None
        elif writer is not None:
            writer.close()

    async def aclose(self):
        """Stop the worker (or close the line to it) and wait until its lines close on this event loop."""
        proc, reader = self.proc, self._reader
        self.stop()
        if proc is not None:
            await proc.wait()
        if reader is not None:
            await reader

    async def _send(self, msg: dict):
        try:
            self.writer.write((json.dumps(msg, ensure_ascii=False) + "\n").encode())
            await self.writer.drain()
        except (AttributeError, OSError):  # the worker ended meanwhile (no line, or a closed one)
            raise _stopped() from None

    async def stream(self, request: dict, who):
        """Yield ``{"queued": n}`` as soon as the worker has the request and whenever its place changes (n generations
        end before it starts; 0: it has started), then the worker's messages (deltas, then ``done``). Errors raise
        ServiceError, the first (429: the user holds ``CHAT_REQUESTS_PER_USER`` requests at the worker) before
        anything is yielded. A request the worker had not begun to answer when it died is sent to a new one."""
        for attempt in (1, 2):
            if not self.alive():
                await self._start()
            rid, inboxes = uuid.uuid4().hex, self.inboxes
            inbox = inboxes[rid] = asyncio.Queue()
            finished = begun = False
            try:
                await self._send({**request, "id": rid, "who": str(who)})
                while True:
                    msg = await inbox.get()
                    if msg is None:
                        if begun or attempt == 2:
                            raise _stopped()
                        break  # not begun: again, at a new worker
                    if "error" in msg:
                        finished = True
                        pair = explained(msg)
                        raise ServiceError(stored_text(*pair) if pair else msg["error"], status=msg.get("status", 400))
                    begun = begun or "queued" not in msg
                    finished = bool(msg.get("done"))
                    yield {"queued": msg["queued"]} if "queued" in msg else msg
                    if finished:
                        return
            finally:
                if not finished and self.alive() and inboxes is self.inboxes:
                    await self._cancel(rid, inbox)
                inboxes.pop(rid, None)

    async def _cancel(self, rid: str, inbox: asyncio.Queue):
        """Stop the worker's generation for ``rid`` and wait for its end (or let go of a worker that hangs)."""
        try:
            await self._send({"cancel": rid})
            async with asyncio.timeout(30):
                while (msg := await inbox.get()) is not None and not (msg.get("done") or "error" in msg):
                    pass
        except (TimeoutError, ServiceError):
            self.stop()

    async def stats(self) -> dict:
        """The worker's turns: ``{"running", "waiting", "held": {user: n}, "generating"}``."""
        if not self.alive():
            await self._start()
        inbox = self.inboxes[None] = asyncio.Queue()  # the answer has no request id
        try:
            await self._send({"stats": True})
            while (msg := await inbox.get()) is not None and "stats" not in msg:
                pass
            if msg is None:
                raise _stopped()
            return msg["stats"]
        finally:
            self.inboxes.pop(None, None)


def _stopped() -> ServiceError:
    return ServiceError(_("the generation worker stopped; try again"), status=503)


def worker_env() -> dict:
    """The chat worker's environment: no secrets, no GPU, and the node's cores (at most 4) as OMP_NUM_THREADS: one
    worker generates every chat of the node, a batch to which more threads give more tokens per second (beside it,
    the web processes only pass tokens on). Before, each web process had a worker with its share of the cores;
    three of them on two cores ran 4.3-4.5x slower with a thread per core each than with one (docs/performance.md)."""
    from jobs.devices import cpu_cores

    return dict(engine_env(), CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                OMP_NUM_THREADS=str(min(4, cpu_cores())))


def worker_args() -> list[str]:
    """The worker's turns: ``CHAT_BATCH`` chats at once, ``CHAT_REQUESTS_PER_USER`` requests per user; the models it
    keeps loaded: ``CHAT_MODELS_GB``."""
    return ["--slots", str(settings.CHAT_BATCH), "--per-user", str(settings.CHAT_REQUESTS_PER_USER),
            "--models-gb", str(settings.CHAT_MODELS_GB)]


def warm(mv) -> None:
    """Ask the node's worker to begin loading ``mv`` (its playground was opened), so that the first question does not
    wait for the load (the worker's first, also for torch's import). Nothing waits for the load, and where the worker
    does not answer the first question starts it as before. Only with the node's worker (``serve``): a process alone
    starts its worker at its first chat."""
    from minicloud.metrics import tell_chat_worker

    if not settings.CHAT_SOCKET:
        return
    try:
        entry = model_entry(mv)
    except ServiceError:  # no tokenizer, no weights: the question will say so
        return
    tell_chat_worker({"warm": entry}, "ready", timeout=1)


def node_socket() -> str:
    """The abstract Unix socket of this node's worker: named from its data folder and node name, so that two portals
    on one machine (two instances, the tests' parallel runs) each have their own."""
    where = f"{settings.HOME.resolve()}|{settings.NODE_NAME}"
    return "minicloud-chat-" + hashlib.sha256(where.encode()).hexdigest()[:24]


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
