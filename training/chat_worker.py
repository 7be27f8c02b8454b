"""``python -m training chat-worker``: the generation process of a node, for the playground and the OpenAI API.

It reads one JSON request per line on stdin, and with ``--listen NAME`` on every connection to the abstract Unix
socket ``NAME`` (the node's web processes: ``serve`` starts one worker for them all), and answers each on its own
line, so the web server never loads torch or blocks on generation. Models are loaded beside the generation (a chat
whose model loads waits, the others go on) and stay loaded while they fit in ``--models-gb`` (``chat_batch.Models``).
At most ``--slots`` requests generate at once, in fair turns between users (``Turns``); they are generated together,
one batch per model (``Batch``: one forward pass per token for all of them; a new chat's prompt is read
``PREFILL_CHUNK`` tokens between two decoding steps of the others); a ``{"cancel": ID}`` line stops one at its next
token, and a connection that closes stops all of its. The process exits when stdin closes (its parent is gone).

Request: ``{"id", "who", "model": {"path", "config", "tokenizer"}, "messages": [...], "max_new_tokens",
"temperature", "top_p", "thinking", "seed"}``. Answers: ``{"id", "queued": n}`` at once and whenever its place
changes (n chats end before it starts; 0: it has started), ``{"id", "reasoning": "..."}`` / ``{"id", "content":
"..."}`` deltas as tokens arrive, then ``{"id", "done": true, "finish_reason": "stop"|"length"|"cancelled",
"usage": {...}}``, or ``{"id", "error": "..."}`` (with ``template`` and ``params`` where the engine explains it:
``spec.Explained``, which the portal shows in the reader's language; ``"status": 429`` when ``who`` holds
``--per-user`` requests already). ``{"stats": true}`` answers ``{"stats": {"running", "waiting", "held",
"generating", "models", "model_loads"}}``; ``{"warm": MODEL}`` begins loading a model, answering nothing. Each
connection first hears ``{"ready": true, "threads", "pid"}``.
"""
from __future__ import annotations

import itertools
import json
import os
import queue
import socket
import struct
import sys
import threading
from collections import Counter

from .spec import Explained, error_report, gettext_noop

# A web process that does not read its answers for this long is taken for gone: its connection is closed (its chats
# end) rather than every other chat waiting on it.
SEND_TIMEOUT_S = 30


class Conn:
    """One web process's connection (or the parent's stdin/stdout): each answer a whole JSON line. Written by the
    generating loop and the thread that accepted it (its "ready"), so one line at a time; a connection that cannot
    take a line (gone, or not read for ``SEND_TIMEOUT_S``) is closed, which cancels its chats."""

    def __init__(self, write, close=lambda: None):
        self._write, self._close, self.lock, self.open = write, close, threading.Lock(), True

    def send(self, obj) -> None:
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode()
        with self.lock:
            if not self.open:
                return
            try:
                self._write(data)
            except OSError:
                self.close()

    def close(self) -> None:
        self.open = False
        try:
            self._close()
        except OSError:
            pass


def fail(conn: Conn, rid, exc: Exception) -> None:
    """Answer request ``rid`` with its error (and log it); the worker goes on."""
    sys.stderr.write(f"chat-worker: {type(exc).__name__}: {exc}\n")
    conn.send({"id": rid, **error_report(exc)})


def done(rid, reason: str, prompt: int = 0, completion: int = 0) -> dict:
    return {"id": rid, "done": True, "finish_reason": reason,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


class Ticket:
    """A request at the worker: who sent it, on which connection, its cancel event and its place in the turns."""

    def __init__(self, req: dict, conn: Conn):
        self.req, self.conn, self.seq = req, conn, None  # seq: its arrival, in the turns' numbering
        self.rid, self.who = req.get("id", ""), str(req.get("who", ""))
        self.cancel, self.granted, self.shown = threading.Event(), False, None


class Turns:
    """At most ``slots`` chats at a time on the node, in fair turns between users: when one ends, the next turn goes
    to the waiting request of the user whose last turn began longest ago (a user not served yet first), first come,
    first served among one user's requests. Each user holds at most ``per_user`` requests (running or waiting, over
    every web process of the node); one more is refused (429), so a script cannot fill the worker with waiting
    requests. The same policy as the upload checks' turns (``jobs.models.Upload.next_to_check``), in memory."""

    def __init__(self, per_user: int, slots: int):
        self.per_user, self.slots = per_user, slots
        self.running: list[Ticket] = []
        self.waiting: list[Ticket] = []
        self.held: Counter = Counter()
        self.last: dict = {}  # user -> the sequence number of their latest turn
        self._seq = itertools.count()

    def enter(self, ticket: Ticket) -> None:
        if self.held[ticket.who] >= self.per_user:
            raise Explained(gettext_noop("you already have %(n)s chats running or waiting for the generation worker; "
                                         "wait for one to finish"), n=self.held[ticket.who])
        self.held[ticket.who] += 1
        ticket.seq = next(self._seq)
        self.waiting.append(ticket)

    def leave(self, ticket: Ticket) -> None:
        """The request is done (or gone before its turn): free its place."""
        self.held[ticket.who] -= 1
        if not self.held[ticket.who]:
            del self.held[ticket.who]
        if ticket in self.running:
            self.running.remove(ticket)
        elif ticket in self.waiting:
            self.waiting.remove(ticket)

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

    def hand(self) -> list[Ticket]:
        """Give the free slots their next turns; the tickets granted."""
        granted = []
        while len(self.running) < self.slots and self.waiting:
            ticket = self.order()[0]
            self.waiting.remove(ticket)
            self.running.append(ticket)
            ticket.granted = True
            self.last[ticket.who] = next(self._seq)
            granted.append(ticket)
        return granted


class Worker:
    """The requests of every connection: their turns (``Turns``), then their generation (``Chats``). Each request is
    answered at once with its place, ``{"id", "queued": n}`` (n chats end before it starts; 0: it has started), again
    whenever n changes, or with a refusal (``"status": 429``)."""

    def __init__(self, slots: int, per_user: int, models_bytes: int | None = None, wake=lambda: None):
        self.turns, self.tickets, self._chats = Turns(per_user, slots), {}, None  # tickets by request id
        self.moved = False  # the waiting requests' places may have changed
        self.models_bytes, self.wake = models_bytes, wake  # the loaded models' budget; called when a load ends

    def request(self, conn: Conn, req: dict) -> None:
        if req.get("id", "") in self.tickets:
            conn.send({"id": req.get("id"), "error": "a request with this id is running"})
            return
        ticket = Ticket(req, conn)
        try:
            self.turns.enter(ticket)
        except Explained as exc:
            conn.send({"id": ticket.rid, **error_report(exc), "status": 429})
            return
        self.tickets[ticket.rid] = ticket
        self.moved = True

    def cancel(self, conn: Conn, rid) -> None:
        ticket = self.tickets.get(rid)
        if ticket is None or ticket.conn is not conn:
            return
        ticket.cancel.set()  # a chat ends at its next token; one waiting for its turn leaves now
        if not ticket.granted:
            self._end(ticket)
            conn.send(done(rid, "cancelled"))

    def closed(self, conn: Conn) -> None:
        """A web process went away: its chats end."""
        conn.close()
        for ticket in [t for t in self.tickets.values() if t.conn is conn]:
            ticket.cancel.set()
            if not ticket.granted:
                self._end(ticket)

    @property
    def chats(self):
        """The generation (torch, the models): loaded with the first request, so a node where nobody chats never
        loads it and ``serve`` starts in a moment."""
        if self._chats is None:
            import torch

            from .chat_batch import Chats, Models

            torch.set_num_threads(threads())
            self._chats = Chats(Models(self.models_bytes, self.wake))
        return self._chats

    def warm(self, entry) -> None:
        """Begin loading a model someone is about to chat with (the playground, opened), so that their first question
        does not wait for it; nothing is answered, and a model that cannot load is told to whoever asks with it."""
        try:
            self.chats.models.get(entry)
        except Exception:
            pass

    def stats(self, conn: Conn) -> None:
        chats = self._chats
        conn.send({"stats": {"running": len(self.turns.running), "waiting": len(self.turns.waiting),
                             "held": dict(self.turns.held), "generating": len(chats.ids()) if chats else 0,
                             "models": len(chats.models.cache) if chats else 0,
                             "model_loads": chats.models.loads if chats else 0}})

    def _end(self, ticket: Ticket) -> None:
        self.turns.leave(ticket)
        del self.tickets[ticket.rid]
        self.moved = True

    def step(self) -> None:
        """Turns handed out, places told, one step of generation; the chats that ended give their turns on."""
        self._hand()
        if self._chats is None:
            return
        self.chats.step()
        generating = self.chats.ids()
        for ticket in [t for t in self.turns.running if t.rid not in generating]:
            self._end(ticket)
        self._hand()

    def _hand(self) -> None:
        if not self.moved:
            return
        self.moved = False
        for ticket in self.turns.hand():
            self._tell(ticket, 0)
            try:
                self.chats.take(ticket.req, ticket.cancel, ticket.conn)
            except Exception as exc:  # one request's problem (its model, its prompt) must not end the worker
                self._end(ticket)
                fail(ticket.conn, ticket.rid, exc)
        for n, ticket in enumerate(self.turns.order(), 1):
            self._tell(ticket, n)

    def _tell(self, ticket: Ticket, n: int) -> None:
        if ticket.shown != n:
            ticket.shown = n
            ticket.conn.send({"id": ticket.rid, "queued": n})

    def busy(self) -> bool:
        return self._chats is not None and self._chats.busy()


def threads() -> int:
    """The generation's threads: what the parent gave (OMP_NUM_THREADS), else the cores, at most 4."""
    from . import threads_given

    return threads_given() or max(1, min(4, os.cpu_count() or 1))


def _read_lines(conn: Conn, lines, inbox: queue.Queue) -> None:
    """One connection's requests into the inbox, then its end."""
    try:
        for line in lines:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                conn.send({"error": "request is not JSON"})
                continue
            if isinstance(msg, dict):
                inbox.put((conn, msg))
    except (OSError, ValueError):
        pass
    inbox.put((conn, None))


def _hang_up(sock: socket.socket) -> None:
    """Close a connection for both sides at once: its reader thread (blocked in a read through its ``makefile``,
    which keeps the socket open past ``close``) sees its end, and the chats of that connection end with it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # the peer is gone already
        pass
    sock.close()


def _listen(name: str, inbox: queue.Queue, ready: dict) -> None:
    """Accept the node's web processes on the abstract Unix socket ``name`` (no file to leave behind or to protect;
    bound by one worker at a time): a connection from another user of the machine is closed unread (SO_PEERCRED)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + name)  # raises when another worker serves this node
    server.listen(128)

    def accept():
        while True:
            sock, _ = server.accept()
            _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                   struct.calcsize("3i")))
            if uid != os.getuid():
                sock.close()
                continue
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT_S, 0))
            conn = Conn(sock.sendall, lambda sock=sock: _hang_up(sock))
            conn.send(ready)
            threading.Thread(target=_read_lines, args=(conn, sock.makefile("rb"), inbox), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def main(listen: str = "", slots: int = 32, per_user: int = 4, models_gb: float = 0) -> int:
    """Serve the parent on stdin/stdout, and with ``listen`` every web process of the node on that socket; exit
    when stdin closes (the parent is gone). ``models_gb``: the weights kept loaded (0: a quarter of the memory)."""
    ready = {"ready": True, "threads": threads(), "pid": os.getpid()}
    inbox: queue.Queue = queue.Queue()
    parent = Conn(lambda data: (sys.stdout.buffer.write(data), sys.stdout.buffer.flush()))
    if listen:
        try:
            _listen(listen, inbox, ready)
        except OSError as exc:  # EADDRINUSE: another worker serves this node
            sys.stderr.write(f"chat-worker: cannot listen on @{listen}: {exc}\n")
            return 3
    threading.Thread(target=_read_lines, args=(parent, sys.stdin.buffer, inbox), daemon=True).start()
    worker = Worker(slots, per_user, int(models_gb * 2**30) or None, wake=lambda: inbox.put((None, {"loaded": True})))
    parent.send(ready)
    while True:
        try:  # wait for work only when nothing is being generated
            taken = [inbox.get(block=not worker.busy())]
        except queue.Empty:
            taken = []
        while not inbox.empty():
            taken.append(inbox.get_nowait())
        for conn, msg in taken:
            if msg is None:
                if conn is parent:
                    return 0
                worker.closed(conn)
            elif "cancel" in msg:
                worker.cancel(conn, msg["cancel"])
            elif "stats" in msg:
                worker.stats(conn)
            elif "warm" in msg:
                worker.warm(msg["warm"])
            elif "loaded" in msg:
                pass  # a model's load ended: the step below takes the chats that waited for it
            else:
                worker.request(conn, msg)
        worker.step()
