"""``python -m training chat-worker``: a generation process for the playground and the OpenAI-compatible API.

It reads one JSON request per line on stdin and answers with JSON lines on stdout, so the web server never loads
torch or blocks on generation. Models stay loaded (the two most recently used). One request runs at a time; a
``{"cancel": ID}`` line stops it at the next token. The process exits when stdin closes (its web server is gone).

Request: ``{"id", "model": {"path", "config", "tokenizer"}, "messages": [...], "max_new_tokens", "temperature",
"top_p", "thinking", "seed"}``. Answers: ``{"id", "reasoning": "..."}`` / ``{"id", "content": "..."}`` deltas as
tokens arrive, then ``{"id", "done": true, "finish_reason": "stop"|"length"|"cancelled", "usage": {...}}``, or
``{"id", "error": "..."}`` (with ``template`` and ``params`` where the engine explains it: ``spec.Explained``, which
the portal shows in the reader's language).
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading
from collections import OrderedDict

import torch

from .spec import Explained, error_report, gettext_noop
from .tokenizer import EOS_ID, PAD_ID

MAX_NEW_TOKENS = 4096
END_THINK = "</think>"


def send(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


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


class _Streamer:
    """transformers' streamer hook: decode after every token and send what is new."""

    def __init__(self, tok, rid: str, splitter: Splitter, prompt_len: int):
        self.tok, self.rid, self.splitter, self.prompt_len = tok, rid, splitter, prompt_len
        self.ids: list[int] = []
        self.skipped_prompt = False

    def put(self, value):
        if not self.skipped_prompt:  # generate() first hands over the prompt
            self.skipped_prompt = True
            return
        self.ids += [i for i in value.reshape(-1).tolist() if i not in (EOS_ID, PAD_ID)]
        self.flush(final=False)

    def flush(self, final: bool):
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        delta = self.splitter.deltas(text, final)
        if delta:
            send({"id": self.rid, **delta})

    def end(self):
        pass


class _Cancelled:
    """A stopping criterion that ends generation once the request is cancelled."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def generate(models: Models, req: dict, cancel: threading.Event) -> None:
    from transformers import StoppingCriteriaList

    rid = req.get("id", "")
    model, tok = models.get(req["model"])
    thinking = bool(req.get("thinking"))
    prompt = tok.apply_chat_template(req["messages"], tokenize=False, add_generation_prompt=True,
                                     open_thinking=thinking)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    limit = int(req.get("max_position_embeddings") or model.config.max_position_embeddings)
    if ids.shape[1] >= limit:  # positions the model never learned: text out of noise, and a prefill of minutes
        raise Explained(gettext_noop("the conversation is %(tokens)s tokens long and this model reads at most "
                                     "%(limit)s: shorten it or start a new chat"), tokens=int(ids.shape[1]), limit=limit)
    max_new = max(1, min(int(req.get("max_new_tokens") or 512), MAX_NEW_TOKENS, limit - ids.shape[1]))
    temperature = float(req.get("temperature", 0.85))
    sampling = temperature > 0
    if req.get("seed") is not None:
        torch.manual_seed(int(req["seed"]))
    streamer = _Streamer(tok, rid, Splitter(thinking), ids.shape[1])
    kwargs = dict(max_new_tokens=max_new, do_sample=sampling, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                  streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]))
    if sampling:
        kwargs.update(temperature=temperature, top_p=float(req.get("top_p", 0.85)), top_k=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    streamer.flush(final=True)
    new = out[0, ids.shape[1]:].tolist()
    if cancel.is_set():
        reason = "cancelled"
    elif EOS_ID in new:
        reason = "stop"
    else:
        reason = "length"
    completion = new.index(EOS_ID) + 1 if EOS_ID in new else len(new)
    send({"id": rid, "done": True, "finish_reason": reason,
          "usage": {"prompt_tokens": int(ids.shape[1]), "completion_tokens": completion,
                    "total_tokens": int(ids.shape[1]) + completion}})


def main() -> int:
    from . import threads_given

    torch.set_num_threads(threads_given() or max(1, min(4, os.cpu_count() or 1)))
    requests: queue.Queue = queue.Queue()
    current = {"id": None, "cancel": threading.Event()}

    def read_stdin():
        for line in sys.stdin:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                send({"error": "request is not JSON"})
                continue
            if "cancel" in msg:
                if msg["cancel"] == current["id"]:
                    current["cancel"].set()
            else:
                requests.put(msg)
        current["cancel"].set()
        requests.put(None)  # stdin closed: the web server is gone

    threading.Thread(target=read_stdin, daemon=True).start()
    models = Models()
    send({"ready": True, "threads": torch.get_num_threads()})
    while True:
        req = requests.get()
        if req is None:
            return 0
        current["cancel"] = threading.Event()
        current["id"] = req.get("id")
        try:
            generate(models, req, current["cancel"])
        except Exception as exc:  # one request's problem must not end the worker
            sys.stderr.write(f"chat-worker: {type(exc).__name__}: {exc}\n")
            send({"id": req.get("id"), **error_report(exc)})
        current["id"] = None
