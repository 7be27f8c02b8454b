"""The generation of a node's chats (``python -m training chat-worker``, training/chat_worker.py): the models it
keeps loaded, each chat's sampling and stream of deltas, and the batches that generate them together, one forward
pass per token for all (continuous batching; a new chat's prompt is read ``PREFILL_CHUNK`` tokens between two
decoding steps of the others, and short prompts that come together in one pass). Answers go to each chat's
connection (anything with ``send(obj)``).
"""
from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict, deque

import torch

from .chat_worker import done, fail
from .spec import Explained, gettext_noop
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


def models_budget() -> int:
    """The bytes of weights the worker keeps loaded by default: a quarter of the machine's memory (a MiniMind-3 model
    is 256 MB in fp32: a class's thirty own models fit in 8 GB)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


class Models:
    """The models the chats use and their tokenizers, on the CPU in fp32. Each is loaded once, by a thread of its own
    (a MiniMind-3 model takes ~0.13 s, a MoE ~0.27 s on two CPU cores; the chats generating meanwhile go on instead
    of waiting for every load), and kept while the loaded ones fit in ``budget`` bytes, the least recently used leaving
    first, except a model a chat still uses (never loaded twice, however many use it). ``wake()`` is called when a
    load ends, so that the worker looks again at the chats that waited for it."""

    def __init__(self, budget: int | None = None, wake=lambda: None):
        self.budget, self.wake = models_budget() if budget is None else budget, wake
        self.cache: OrderedDict = OrderedDict()  # key -> (model, tokenizer, bytes), the most recently used last
        self.errors: dict = {}  # key -> what its load raised, until the chats that waited for it have been told
        self.loading: set = set()
        self.lock = threading.Lock()
        self.todo: queue.Queue = queue.Queue()
        self.loads = self.ended = 0  # loads begun (a test counts them), loads ended
        self._thread = None

    @staticmethod
    def key(entry: dict) -> tuple:
        return entry["path"], os.path.getmtime(entry["path"]), entry.get("tokenizer")

    def get(self, entry: dict):
        """(model, tokenizer) of ``entry`` when loaded; None while it loads (begun here if it was not); what its load
        raised, when it failed."""
        key = self.key(entry)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key][:2]
            if key in self.errors:
                raise self.errors[key]
            if key not in self.loading:
                self.loading.add(key)
                self.loads += 1
                self.todo.put((key, entry))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._load, name="models", daemon=True)
                    self._thread.start()
        return None

    def _load(self) -> None:
        from .chat import load_hf_tokenizer
        from .model import load_model

        while True:
            key, entry = self.todo.get()
            try:
                model, _ = load_model({"path": entry["path"], "config": entry.get("config") or {}})
                tok = load_hf_tokenizer(entry["tokenizer"])
                size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
                with self.lock:
                    self.cache[key] = (model.eval(), tok, size)
            except Exception as exc:  # a bad file, a missing tokenizer: told to the chats that asked for it
                with self.lock:
                    self.errors[key] = exc
            with self.lock:
                self.loading.discard(key)
                self.ended += 1
            self.wake()

    def failed(self) -> set:
        with self.lock:
            return set(self.errors)

    def told(self, keys) -> None:
        """The failed loads of ``keys`` have been told to everyone who waited for them: a later request tries again."""
        with self.lock:
            for key in keys:
                self.errors.pop(key, None)

    def trim(self, used) -> None:
        """Drop the least recently used models, but none in ``used`` (ids of the models chats hold), while the loaded
        ones are over the budget."""
        with self.lock:
            total = sum(size for _, _, size in self.cache.values())
            for key, (model, _, size) in list(self.cache.items()):
                if total <= self.budget:
                    return
                if id(model) not in used:
                    del self.cache[key]
                    total -= size


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

    def __init__(self, req: dict, model, tok, ids: torch.Tensor, limit: int, cancel: threading.Event, conn):
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
        self.bias = None  # OpenAI's logit_bias: (token ids, amounts) added to the logits before each choice
        if req.get("logit_bias"):
            ids = [int(t) for t in req["logit_bias"]]
            if max(ids) >= model.config.vocab_size or min(ids) < 0:
                raise Explained(gettext_noop("logit_bias: token %(id)s is not in the model's vocabulary (0 to "
                                             "%(last)s)"), id=max(ids), last=model.config.vocab_size - 1)
            amounts = [float("-inf") if v <= -100 else float(v) for v in req["logit_bias"].values()]  # -100 bans
            self.bias = torch.tensor(ids), torch.tensor(amounts)
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

    @staticmethod
    def read_together(chats: list["Chat"]) -> list[torch.Tensor]:
        """Read the whole prompts of several chats of one model in one forward pass (left-padded to the longest: the
        attention mask hides the padding, the position ids are each chat's own), each into its own KV cache; their
        next token's logits. The same as reading each alone (to float rounding), at the cost of one pass: a class's
        questions that arrive together are read in a few passes instead of one each."""
        from transformers import DynamicCache

        width = max(chat.prompt_len for chat in chats)
        ids = torch.cat([_left_pad(chat.ids, width, 1) for chat in chats])
        mask = torch.cat([_left_pad(torch.ones_like(chat.ids), width, 1) for chat in chats])
        cache = DynamicCache()
        out = chats[0].model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                             cache=cache, use_cache=True, logits_to_keep=1)
        layers = _kv(cache)
        for i, chat in enumerate(chats):
            start = width - chat.prompt_len
            chat.cache = DynamicCache(ddp_cache_data=[(k[i:i + 1, :, start:], v[i:i + 1, :, start:])
                                                      for k, v in layers])
            chat.read = chat.prompt_len
        return list(out.logits[:, -1])

    def take(self, logits: torch.Tensor) -> bool:
        """Choose the next token from its logits (greedy at temperature 0, else temperature and top-p sampling as
        transformers' ``generate`` does them), stream what it adds, and say whether the chat goes on."""
        if self.bias is not None:
            logits = logits.float().index_add(0, *self.bias)
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

    def __init__(self, models: Models | None = None):
        self.models = Models() if models is None else models
        self.batches, self.reading, self.waiting = [], [], deque()
        self.loading: list[tuple] = []  # (request, cancel, connection) of the chats whose model is being loaded
        self.looked = 0  # the models' loads ended when ``loaded`` last looked

    def busy(self) -> bool:
        return bool(self.batches or self.reading)

    def take(self, req: dict, cancel: threading.Event, conn) -> None:
        """Tokenize a new request's prompt (or refuse it, explained) and queue it; it starts when there is room. A
        request whose model is not loaded waits for it (``loaded``) while the others go on."""
        got = self.models.get(req["model"])
        if got is None:
            self.loading.append((req, cancel, conn))
            return
        model, tok = got
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

    def loaded(self) -> None:
        """The chats whose model has loaded since the last look are queued (or told why it could not be); the models
        no chat uses leave while the loaded ones are over the budget."""
        waited, self.loading, self.looked = self.loading, [], self.models.ended
        failed = self.models.failed()  # each of these loads' error reaches every chat that waited for it
        for req, cancel, conn in waited:
            rid = req.get("id", "")
            if cancel.is_set():  # gone while its model was loaded
                conn.send(done(rid, "cancelled"))
                continue
            try:
                self.take(req, cancel, conn)
            except Exception as exc:
                fail(conn, rid, exc)
        self.models.told(failed)
        self.models.trim({id(chat.model) for chat in self._holding()} | {id(chat.model) for chat in self.waiting})

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
        comes while a long conversation is read starts at the next step instead of waiting for all of it); short
        prompts that fit in it together are read in one forward pass (``Chat.read_together``). A chat whose prompt is
        read takes its first token and joins a batch of its model (one where the padding at most doubles its cache,
        else a new one)."""
        for chat in [chat for chat in self.reading if chat.cancel.is_set()]:  # gone while its prompt was read
            self.reading.remove(chat)
            chat.finish()
        budget = PREFILL_CHUNK
        while self.reading and budget > 0:
            group = self._together(budget)
            try:
                with torch.no_grad():
                    if len(group) > 1:
                        budget -= len(group) * max(chat.prompt_len for chat in group)
                        read = list(zip(group, Chat.read_together(group)))
                    else:
                        chat, before = group[0], group[0].read
                        read = [(chat, chat.read_prompt(budget))]
                        budget -= chat.read - before
            except Exception as exc:  # their prompts could not be read (memory): these chats end, the others go on
                for chat in group:
                    self.reading.remove(chat)
                    fail(chat.conn, chat.rid, exc)
                continue
            for chat, logits in read:
                if logits is None:
                    return  # the budget is spent on this prompt; the rest at the next step
                self.reading.remove(chat)
                self._start(chat, logits)

    def _together(self, budget: int) -> list[Chat]:
        """The chats to read next: the one with the shortest rest, and the next shortest that are new, of its model,
        and fit in ``budget`` together, padded to the longest of them."""
        ranked = sorted(self.reading, key=lambda c: c.prompt_len - c.read)
        group = ranked[:1]
        if group[0].read:
            return group
        for chat in ranked[1:]:
            if chat.read or chat.model is not group[0].model or (len(group) + 1) * chat.prompt_len > budget:
                break
            group.append(chat)
        return group

    def _start(self, chat: Chat, logits: torch.Tensor) -> None:
        """A chat whose prompt is read: its first token, then its place in a batch."""
        if not chat.take(logits):
            chat.finish()
            return
        batch = next((b for b in self.batches if b.fits(chat.model, chat.prompt_len)), None)
        if batch is None:
            batch = Batch(chat.model)
            self.batches.append(batch)
        batch.join(chat)

    def step(self) -> None:
        """The chats whose model has loaded join, one token for every generating chat, then a piece of the prompts
        being read; the ended chats make room for the waiting."""
        if self.loading or self.looked != self.models.ended:
            self.loaded()
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
        return ({c.rid for c in self._holding()} | {c.rid for c in self.waiting}
                | {req.get("id", "") for req, _, _ in self.loading})
