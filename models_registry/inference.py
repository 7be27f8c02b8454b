"""The web side of generation: one ``python -m training chat-worker`` child per web process, spoken to over pipes.

The web server never imports torch and never blocks on a model: it writes request lines and relays the worker's
token deltas as they arrive (asyncio; one reader hands each line to its request). Up to ``CHAT_BATCH`` generations run
at once per web process, generated together by the worker (one forward pass per token for all of them), the rest
wait in fair turns between users (``Turns``: one member's many requests never hold a classmate's behind all of
them); a client that goes away cancels its generation at the next token, or leaves the queue. The worker runs on the
CPU (``CUDA_VISIBLE_DEVICES=""``): the GPUs belong to the scheduler's jobs.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
import uuid
from collections import Counter

from django.conf import settings
from django.utils.translation import gettext as _

from minicloud.errors import ServiceError, explained, stored_text
from minicloud.processes import die_with_parent, engine_env

from .models import Tokenizer


START_TIMEOUT_S = 180
_worker = None


class Ticket:
    """One request's place at the worker: ``granted`` once its turn has come."""

    def __init__(self, who, seq: int):
        self.who, self.seq, self.granted = who, seq, False


class Turns:
    """At most ``slots`` generations at a time, in fair turns between users: when one ends, the next turn goes to the
    waiting request of the user whose last turn began longest ago (a user not served yet first), first come, first
    served among one user's requests. Each user holds at most ``per_user`` requests here (running or waiting); one
    more is refused (429), so a script cannot fill a web process's memory with waiting requests. The same policy as
    the upload checks' turns (``jobs.models.Upload.next_to_check``), in memory: a web process's queue lives as long
    as the process."""

    def __init__(self, per_user: int, slots: int = 1):
        self.per_user, self.slots = per_user, slots
        self.running: list[Ticket] = []
        self.waiting: list[Ticket] = []
        self.held: Counter = Counter()
        self.last: dict = {}  # user -> the sequence number of their latest turn
        self._seq = itertools.count()
        self._changed = asyncio.get_running_loop().create_future()

    def check(self, who) -> None:
        """Refuse (429) a user who holds ``per_user`` requests here already: before a streamed answer starts, so
        that the refusal is its status, not an event of a 200."""
        if self.held[who] >= self.per_user:
            raise ServiceError(
                _("you already have %(n)s chats running or waiting for the generation worker; wait for one to "
                  "finish") % {"n": self.held[who]}, status=429)

    def enter(self, who) -> Ticket:
        self.check(who)
        self.held[who] += 1
        ticket = Ticket(who, next(self._seq))
        self.waiting.append(ticket)
        self._hand()
        return ticket

    def leave(self, ticket: Ticket) -> None:
        """The request is done (or gone before its turn): free its place and hand the turn on."""
        self.held[ticket.who] -= 1
        if not self.held[ticket.who]:
            del self.held[ticket.who]
        if ticket in self.running:
            self.running.remove(ticket)
        elif ticket in self.waiting:
            self.waiting.remove(ticket)
        self._hand()

    def order(self) -> list[Ticket]:
        """The waiting requests in the order they will be served if nobody else comes."""
        last, queue, out = dict(self.last), list(self.waiting), []
        turn = itertools.count(next(self._seq))  # the turns to come: later than every turn given so far
        while queue:
            nxt = min(queue, key=lambda t: (last.get(t.who, -1), t.seq))
            queue.remove(nxt)
            out.append(nxt)
            last[nxt.who] = next(turn)
        return out

    def ahead(self, ticket: Ticket) -> int:
        """How many generations must end before this waiting request's starts (every slot is taken while it waits)."""
        return self.order().index(ticket) + 1

    async def changed(self) -> None:
        await asyncio.wait([self._changed])

    def _hand(self) -> None:
        while len(self.running) < self.slots and self.waiting:
            ticket = self.order()[0]
            self.waiting.remove(ticket)
            self.running.append(ticket)
            ticket.granted = True
            self.last[ticket.who] = next(self._seq)
        self._changed.set_result(None)
        self._changed = asyncio.get_running_loop().create_future()


class ChatWorker:
    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.turns = Turns(settings.CHAT_REQUESTS_PER_USER, settings.CHAT_BATCH)
        self.proc = None
        self.inboxes: dict[str, asyncio.Queue] = {}  # the running requests' messages, by request id
        self._starting = asyncio.Lock()
        self._reader = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def _start(self):
        async with self._starting:  # the turns granted at once start one worker
            if self.alive():
                return
            self.inboxes = {}  # this worker's requests (a dead worker's reader may still empty its own)
            self.proc = proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "training", "chat-worker", cwd=settings.BASE_DIR, env=worker_env(),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 24,
                preexec_fn=die_with_parent(signal.SIGTERM))
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
            except asyncio.TimeoutError:
                line = b""
            if not line.startswith(b'{"ready"'):
                self.stop()
                raise ServiceError(_("the generation worker did not start; the server log says why"), status=503)
            self._reader = asyncio.create_task(self._read(proc, self.inboxes))

    async def _read(self, proc, inboxes: dict):
        """Hand each of the worker's lines to its request; when the worker ends, each of its requests hears None."""
        try:
            while line := await proc.stdout.readline():
                msg = json.loads(line)
                inbox = inboxes.get(msg.get("id"))
                if inbox is not None:  # else the tail of a request that went away
                    inbox.put_nowait(msg)
        except (OSError, ValueError):
            pass
        finally:
            if self.proc is proc:
                self.stop()
            for inbox in inboxes.values():
                inbox.put_nowait(None)

    def stop(self):
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except (ProcessLookupError, RuntimeError):  # gone already, or its event loop is
                pass
        self.proc = None

    async def aclose(self):
        """Stop the worker and wait for it (its pipes close on this event loop)."""
        proc, reader = self.proc, self._reader
        self.stop()
        if proc is not None:
            await proc.wait()
        if reader is not None:
            await reader

    async def _send(self, msg: dict):
        try:
            self.proc.stdin.write((json.dumps(msg, ensure_ascii=False) + "\n").encode())
            await self.proc.stdin.drain()
        except (AttributeError, OSError):  # the worker ended meanwhile (no process, or a closed pipe)
            raise _stopped() from None

    async def stream(self, request: dict, who):
        """Yield ``{"queued": n}`` while ``who``'s request waits for its turn (n generations end before it starts;
        again whenever n changes), then the worker's messages (deltas, then ``done``); errors raise ServiceError (429:
        the user has ``CHAT_REQUESTS_PER_USER`` requests here already)."""
        ticket = self.turns.enter(who)
        try:
            shown = None
            while not ticket.granted:
                ahead = self.turns.ahead(ticket)
                if ahead != shown:
                    shown = ahead
                    yield {"queued": ahead}
                await self.turns.changed()
            if not self.alive():
                await self._start()
            rid, inboxes = uuid.uuid4().hex, self.inboxes
            inbox = inboxes[rid] = asyncio.Queue()
            finished = False
            try:
                await self._send({**request, "id": rid})
                while True:
                    msg = await inbox.get()
                    if msg is None:
                        raise _stopped()
                    if "error" in msg:
                        finished = True
                        pair = explained(msg)
                        raise ServiceError(stored_text(*pair) if pair else msg["error"], status=400)
                    finished = bool(msg.get("done"))
                    yield msg
                    if finished:
                        return
            finally:
                if not finished and self.alive() and inboxes is self.inboxes:
                    await self._cancel(rid, inbox)
                inboxes.pop(rid, None)
        finally:
            self.turns.leave(ticket)

    async def _cancel(self, rid: str, inbox: asyncio.Queue):
        """Stop the worker's generation for ``rid`` and wait for its end (or restart a worker that hangs)."""
        try:
            await self._send({"cancel": rid})
            async with asyncio.timeout(30):
                while (msg := await inbox.get()) is not None and not (msg.get("done") or "error" in msg):
                    pass
        except (TimeoutError, ServiceError):
            self.stop()


def _stopped() -> ServiceError:
    return ServiceError(_("the generation worker stopped; try again"), status=503)


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
