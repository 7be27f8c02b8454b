"""``python -m training chat-worker``: the generation process of a node, for the playground and the OpenAI API.

It reads one JSON request per line on stdin, and with ``--listen NAME`` on every connection to the abstract Unix
socket ``NAME`` (the node's web processes: ``serve`` starts one worker for them all), and answers each on its own
line, so the web server never loads torch or blocks on generation. Models stay loaded (the two most recently used).
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
"generating"}}``. Each connection first hears ``{"ready": true, "threads", "pid"}``.
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
from collections import Counter, OrderedDict, deque

import torch

from .spec import Explained, error_report, gettext_noop
from .tokenizer import EOS_ID, PAD_ID

MAX_NEW_TOKENS = 4096
# The tokens (prompt and max_new_tokens) the chats generating at once may reserve together: one MiniMind-3 context
# and a half, ~1.2 GB of fp32 KV cache for its 64M model. A chat beyond it waits in the worker until others end; a chat
# alone always runs. Padding at most doubles it: a chat joins a batch only where the padded cache stays within twice
# its real tokens, else it starts another batch of the same model.
KV_TOKENS = 49152
# The prompt tokens read between two decoding steps: a new chat's prompt is read a piece at a time, so a long
# conversation that arrives does not stop the other chats' streams for the whole of its reading (chunked prefill; on
# one thread, MiniMind-3's size: a wait of ~1.1 s per token beside an 8,000-token prompt instead of 20 s for all of
# it; smaller pieces delay the long conversation's own first token more, docs/decisions.md).
PREFILL_CHUNK = 256
END_THINK = "</think>"
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


def fail(conn: Conn, rid, exc: Exception, **extra) -> None:
    """Answer request ``rid`` with its error (and log it); the worker goes on."""
    sys.stderr.write(f"chat-worker: {type(exc).__name__}: {exc}\n")
    conn.send({"id": rid, **error_report(exc), **extra})


class Models:
    """The most recently used models and their tokenizers, loaded on the CPU in fp32."""

    def __init__(self, keep: int = 2):
        self.keep, self.cache = keep, OrderedDict()

    def get(self, entry: dict):
        from .chat import load_hf_tokenizer
        from .model import load_model

        key = (entry["path"], os.path.getmtime(entry["path"]), entry.get("tokenizer"))
        if key not in self.cache:
            model, _ = load_model({"path": entry["path"], "config": entry.get("config") or {}})
            self.cache[key] = (model.eval(), load_hf_tokenizer(entry["tokenizer"]))
            while len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        return self.cache[key]


class Splitter:
    """Turns the growing decoded text into reasoning/content deltas (thinking: reasoning until ``</think>``)."""

    def __init__(self, thinking: bool):
        self.thinking, self.sent_reasoning, self.sent_content = thinking, 0, 0

    def parts(self, text: str, final: bool) -> tuple[str, str]:
        if not final and text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
            text = text.rstrip("\ufffd")
        if self.thinking:
            if END_THINK in text:
                reasoning, content = text.split(END_THINK, 1)
                content = content.lstrip("\n")
            else:
                reasoning, content = text, ""
                if not final:  # keep back what may be the start of </think>
                    for n in range(len(END_THINK) - 1, 0, -1):
                        if reasoning.endswith(END_THINK[:n]):
                            reasoning = reasoning[:-n]
                            break
            reasoning = reasoning.lstrip("\n")
        else:
            reasoning, content = "", text
        return reasoning, content

    def deltas(self, text: str, final: bool = False) -> dict:
        reasoning, content = self.parts(text, final)
        out = {}
        if len(reasoning) > self.sent_reasoning:
            out["reasoning"] = reasoning[self.sent_reasoning:]
            self.sent_reasoning = len(reasoning)
        if len(content) > self.sent_content:
            out["content"] = content[self.sent_content:]
            self.sent_content = len(content)
        return out


class Chat:
    """One request being generated: its sampling (its own random generator: a seed repeats a reply; beside other
    chats up to the batch's float rounding), its tokens so far and its stream of deltas."""

    def __init__(self, req: dict, model, tok, ids: torch.Tensor, limit: int, cancel: threading.Event, conn: Conn):
        from transformers import DynamicCache
        from transformers.generation.logits_process import TopPLogitsWarper

        self.rid, self.model, self.tok, self.cancel, self.conn = req.get("id", ""), model, tok, cancel, conn
        self.ids, self.prompt_len, self.read, self.cache = ids, int(ids.shape[1]), 0, DynamicCache()
        self.max_new = max(1, min(int(req.get("max_new_tokens") or 512), MAX_NEW_TOKENS, limit - self.prompt_len))
        self.temperature = float(req.get("temperature", 0.85))
        top_p = float(req.get("top_p", 0.85))
        self.sampling = self.temperature > 0
        self.top_p = TopPLogitsWarper(top_p) if self.sampling and top_p < 1 else None  # as generate skips it at 1
        self.generator = torch.Generator()
        if req.get("seed") is not None:
            self.generator.manual_seed(int(req["seed"]))
        else:
            self.generator.seed()
        self.splitter = Splitter(bool(req.get("thinking")))
        self.new: list[int] = []  # the generated ids, the closing eos included
        self.reserved = self.prompt_len + self.max_new

    def read_prompt(self, tokens: int):
        """Read up to ``tokens`` more of the prompt into the chat's own KV cache; the next token's logits once the
        whole prompt is read, else None. Read in pieces, it is the same as in one (the later pieces attend to the
        cache of the earlier ones through the causal mask)."""
        piece = self.ids[:, self.read:self.read + tokens]
        out = self.model(input_ids=piece, use_cache=True, cache=self.cache, logits_to_keep=1)
        self.read += piece.shape[1]
        return out.logits[0, -1] if self.read == self.prompt_len else None

    def take(self, logits: torch.Tensor) -> bool:
        """Choose the next token from its logits (greedy at temperature 0, else temperature and top-p sampling as
        transformers' ``generate`` does them), stream what it adds, and say whether the chat goes on."""
        if not self.sampling:
            token = int(logits.argmax())
        else:
            scores = logits.float()[None] / self.temperature
            if self.top_p is not None:
                scores = self.top_p(None, scores)
            token = int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))
        self.new.append(token)
        going = token != EOS_ID and len(self.new) < self.max_new and not self.cancel.is_set()
        self.flush(final=not going)
        return going

    def flush(self, final: bool):
        ids = [i for i in self.new if i not in (EOS_ID, PAD_ID)]
        delta = self.splitter.deltas(self.tok.decode(ids, skip_special_tokens=False), final)
        if delta:
            self.conn.send({"id": self.rid, **delta})

    def finish(self):
        reason = "cancelled" if self.cancel.is_set() else "stop" if self.new[-1:] == [EOS_ID] else "length"
        self.conn.send(done(self.rid, reason, self.prompt_len, len(self.new)))


def done(rid, reason: str, prompt: int = 0, completion: int = 0) -> dict:
    return {"id": rid, "done": True, "finish_reason": reason,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``x`` padded with zeros at the start of dimension ``dim`` to ``width``."""
    if x.shape[dim] == width:
        return x
    shape = list(x.shape)
    shape[dim] = width - x.shape[dim]
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A ``DynamicCache``'s (keys, values) per layer, as ``DynamicCache(ddp_cache_data=...)`` takes them back."""
    return [(layer.keys, layer.values) for layer in cache.layers]


class Batch:
    """The chats of one model, generated together: one forward pass gives every chat its next token, so a class's
    chats share the reading of the weights that bounds a decoding step on the CPU (docs/decisions.md). A new chat's
    prompt is read alone (``Chat.read_prompt``), then its KV cache joins the batch's, left-padded to a common length
    (the attention mask hides the padding, the position ids are each chat's own); a chat that ends leaves the batch at
    once, and the padding no chat needs any more is cut away."""

    def __init__(self, model):
        self.model, self.chats = model, []
        self.cache = self.mask = self.last = self.pos = None  # KV cache, [B, T] mask, [B] next input, [B] positions

    def fits(self, model, prompt_len: int) -> bool:
        """Whether a chat with this prompt may join: the same model, and the padded cache within twice its real
        tokens (a long conversation beside short ones would pad every one of them to its length)."""
        if model is not self.model or self.mask is None:
            return model is self.model
        rows, width = self.mask.shape
        return (rows + 1) * max(width, prompt_len) <= 2 * (int(self.mask.sum()) + prompt_len)

    def join(self, chat: Chat) -> None:
        """Take in a chat whose prompt is read (and its first token chosen): its KV cache joins the batch's."""
        from transformers import DynamicCache

        width = chat.prompt_len if self.cache is None else max(chat.prompt_len, self.mask.shape[1])
        layers = _kv(chat.cache)
        mask = torch.ones(1, chat.prompt_len, dtype=torch.long)
        last, pos = torch.tensor([chat.new[-1]]), torch.tensor([chat.prompt_len])
        if self.cache is not None:
            layers = [(torch.cat([_left_pad(k0, width, 2), _left_pad(k, width, 2)]),
                       torch.cat([_left_pad(v0, width, 2), _left_pad(v, width, 2)]))
                      for (k0, v0), (k, v) in zip(_kv(self.cache), layers)]
            mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
            last, pos = torch.cat([self.last, last]), torch.cat([self.pos, pos])
        self.cache, self.mask, self.last, self.pos = DynamicCache(ddp_cache_data=layers), mask, last, pos
        chat.ids = chat.cache = None  # the batch holds its cache now
        self.chats.append(chat)

    def step(self) -> None:
        """One token for every chat; the chats that end leave."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits = self.model(input_ids=self.last[:, None], attention_mask=self.mask, position_ids=self.pos[:, None],
                            cache=self.cache, use_cache=True).logits[:, -1]
        going = []
        for i, chat in enumerate(self.chats):
            if chat.take(logits[i]):
                going.append(i)
            else:
                chat.finish()
        self.last = torch.tensor([chat.new[-1] for chat in self.chats])
        self.pos += 1
        if len(going) < len(self.chats):
            self._keep(going)

    def _keep(self, rows: list[int]) -> None:
        from transformers import DynamicCache

        self.chats = [self.chats[i] for i in rows]
        if not rows:
            self.cache = self.mask = self.last = self.pos = None
            return
        index = torch.tensor(rows)
        mask = self.mask[index]
        start = int(mask.any(0).long().argmax())  # the columns before it are padding for every chat left
        self.mask, self.last, self.pos = mask[:, start:], self.last[index], self.pos[index]
        self.cache = DynamicCache(ddp_cache_data=[(k[index, :, start:], v[index, :, start:])
                                                  for k, v in _kv(self.cache)])

    def fail(self, exc: Exception) -> None:
        for chat in self.chats:
            fail(chat.conn, chat.rid, exc)
        self.chats, self.cache = [], None


class Chats:
    """Every chat the worker holds: the batches generating, the chats whose prompt is being read (``PREFILL_CHUNK``
    tokens between two decoding steps), and the chats waiting for room (``KV_TOKENS``)."""

    def __init__(self):
        self.models, self.batches, self.reading, self.waiting = Models(), [], [], deque()

    def busy(self) -> bool:
        return bool(self.batches or self.reading)

    def take(self, req: dict, cancel: threading.Event, conn: Conn) -> None:
        """Tokenize a new request's prompt (or refuse it, explained) and queue it; it starts when there is room."""
        model, tok = self.models.get(req["model"])
        thinking = bool(req.get("thinking"))
        prompt = tok.apply_chat_template(req["messages"], tokenize=False, add_generation_prompt=True,
                                         open_thinking=thinking)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        limit = int(req.get("max_position_embeddings") or model.config.max_position_embeddings)
        if ids.shape[1] >= limit:  # positions the model never learned: text out of noise, and a prefill of minutes
            raise Explained(gettext_noop("the conversation is %(tokens)s tokens long and this model reads at most "
                                         "%(limit)s: shorten it or start a new chat"), tokens=int(ids.shape[1]),
                            limit=limit)
        self.waiting.append(Chat(req, model, tok, ids, limit, cancel, conn))
        self.admit()

    def admit(self) -> None:
        """Let the waiting chats in, first come first served, while they fit in ``KV_TOKENS`` (one always may)."""
        for chat in [chat for chat in self.waiting if chat.cancel.is_set()]:  # gone before they started
            self.waiting.remove(chat)
            chat.finish()
        while self.waiting:
            reserved = sum(c.reserved for c in self._holding())
            if reserved and reserved + self.waiting[0].reserved > KV_TOKENS:
                return
            self.reading.append(self.waiting.popleft())

    def _holding(self):
        yield from self.reading
        for batch in self.batches:
            yield from batch.chats

    def read(self) -> None:
        """Read up to ``PREFILL_CHUNK`` prompt tokens of the chats let in, the shortest rest first (a question that
        comes while a long conversation is read starts at the next step instead of waiting for all of it); a chat
        whose prompt is read takes its first token and joins a batch of its model (one where the padding at most
        doubles its cache, else a new one)."""
        for chat in [chat for chat in self.reading if chat.cancel.is_set()]:  # gone while its prompt was read
            self.reading.remove(chat)
            chat.finish()
        budget = PREFILL_CHUNK
        while self.reading and budget > 0:
            chat = min(self.reading, key=lambda c: c.prompt_len - c.read)
            before = chat.read
            try:
                with torch.no_grad():
                    logits = chat.read_prompt(budget)
            except Exception as exc:  # its prompt could not be read (memory): this chat ends, the others go on
                self.reading.remove(chat)
                fail(chat.conn, chat.rid, exc)
                continue
            budget -= chat.read - before
            if logits is None:
                return  # the budget is spent on this prompt; the rest at the next step
            self.reading.remove(chat)
            if not chat.take(logits):
                chat.finish()
                continue
            batch = next((b for b in self.batches if b.fits(chat.model, chat.prompt_len)), None)
            if batch is None:
                batch = Batch(chat.model)
                self.batches.append(batch)
            batch.join(chat)

    def step(self) -> None:
        """One token for every generating chat, then a piece of the prompts being read; the ended chats make room
        for the waiting."""
        for batch in self.batches:
            try:
                if batch.chats:
                    with torch.no_grad():
                        batch.step()
            except Exception as exc:  # the whole batch's step failed: its chats end, the worker goes on
                batch.fail(exc)
        self.batches = [batch for batch in self.batches if batch.chats]
        self.read()
        self.admit()

    def ids(self) -> set:
        return {c.rid for c in self._holding()} | {c.rid for c in self.waiting}


class Ticket:
    """A request at the worker: who sent it, on which connection, its cancel event and its place in the turns."""

    def __init__(self, req: dict, conn: Conn, seq: int):
        self.req, self.conn, self.seq = req, conn, seq
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

    def __init__(self, slots: int, per_user: int):
        self.turns, self.chats, self.tickets = Turns(per_user, slots), Chats(), {}  # tickets by request id
        self._seq, self.moved = itertools.count(), False  # moved: the waiting requests' places may have changed

    def request(self, conn: Conn, req: dict) -> None:
        if req.get("id", "") in self.tickets:
            conn.send({"id": req.get("id"), "error": "a request with this id is running"})
            return
        ticket = Ticket(req, conn, next(self._seq))
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

    def stats(self, conn: Conn) -> None:
        conn.send({"stats": {"running": len(self.turns.running), "waiting": len(self.turns.waiting),
                             "held": dict(self.turns.held), "generating": len(self.chats.ids())}})

    def _end(self, ticket: Ticket) -> None:
        self.turns.leave(ticket)
        del self.tickets[ticket.rid]
        self.moved = True

    def step(self) -> None:
        """Turns handed out, places told, one step of generation; the chats that ended give their turns on."""
        self._hand()
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
        return self.chats.busy()


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
            conn = Conn(sock.sendall, sock.close)
            conn.send(ready)
            threading.Thread(target=_read_lines, args=(conn, sock.makefile("rb"), inbox), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def main(listen: str = "", slots: int = 32, per_user: int = 4) -> int:
    """Serve the parent on stdin/stdout, and with ``listen`` every web process of the node on that socket; exit
    when stdin closes (the parent is gone)."""
    from . import threads_given

    torch.set_num_threads(threads_given() or max(1, min(4, os.cpu_count() or 1)))
    ready = {"ready": True, "threads": torch.get_num_threads(), "pid": os.getpid()}
    inbox: queue.Queue = queue.Queue()
    parent = Conn(lambda data: (sys.stdout.buffer.write(data), sys.stdout.buffer.flush()))
    if listen:
        _listen(listen, inbox, ready)
    threading.Thread(target=_read_lines, args=(parent, sys.stdin.buffer, inbox), daemon=True).start()
    worker = Worker(slots, per_user)
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
            else:
                worker.request(conn, msg)
        worker.step()
