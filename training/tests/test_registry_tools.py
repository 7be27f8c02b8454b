"""Verified conversions, imports, LoRA merges and the chat worker (the engine side of the model registry)."""
import json
import os
import math
import subprocess
import sys

import pytest
import torch

from .conftest import ARCH, ROOT


def _random_model(tmp_path, moe=False, name="a.pth"):
    from training.model import build_model, save_pth
    from training.spec import model_config, resolve_config

    cfg = {**ARCH, "use_moe": moe}
    torch.manual_seed(0)
    save_pth(build_model(model_config(resolve_config("pretrain", cfg))), tmp_path / name)
    return tmp_path / name, cfg


def _cli(capsys, *args):
    """``python -m training ARGS`` through its main() in this process (the portal's subprocess calls of the same
    commands are covered by models_registry's tests); returns (exit code, the JSON line it printed last)."""
    from training.__main__ import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("moe", [False, True])
def test_export_and_import_report_equal_logits(moe, demo_dir, tmp_path):
    from training.convert import export_hf, import_hf

    pth, cfg = _random_model(tmp_path, moe)
    report = export_hf(pth, cfg, tmp_path / "hf", demo_dir / "demo-tokenizer")
    v = report["verification"]
    assert v["ok"] and v["max_abs_diff"] <= v["tolerance"] and v["prompt_tokens"] > 0
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "hf" / "tokenizer.json").exists()
    back = import_hf(tmp_path / "hf", tmp_path / "b.pth")
    assert back["verification"]["ok"] and back["config"]["use_moe"] == moe
    a, b = torch.load(pth, weights_only=True), torch.load(tmp_path / "b.pth", weights_only=True)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("moe", [False, True])
def test_a_loaded_model_skips_the_random_init_and_equals_one_built_then_loaded(moe, tmp_path):
    """Loading weights draws no random numbers (the init they replace is skipped: most of a load's time) and gives
    the model an initialised one gets from the same file: tied head, every weight and buffer, the same logits."""
    from training.model import build_model, load_model, load_pth
    from training.spec import model_config, resolve_config

    pth, cfg = _random_model(tmp_path, moe)
    torch.manual_seed(1)
    reference = build_model(model_config(resolve_config("pretrain", cfg)))
    load_pth(reference, pth)
    state = torch.get_rng_state()
    model, _ = load_model({"path": str(pth), "config": cfg})
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn: no weight was initialised only to be replaced
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ours, theirs = model.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    buffers = dict(reference.named_buffers())
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    ids = torch.randint(0, cfg.get("vocab_size", 6400), (2, 12))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, reference.eval()(ids).logits)


def test_cli_refuses_other_architectures_and_mismatched_pth_in_one_line(tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rc, out = _cli(capsys, "convert", "pth", tmp_path / "llama", tmp_path / "x.pth")
    assert rc == 2 and "model_type 'llama' is not a MiniMind/Qwen3 architecture" in out["error"]
    pth, cfg = _random_model(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "hidden_size": 128}))
    rc, out = _cli(capsys, "inspect", pth, "--config", tmp_path / "cfg.json")
    assert rc == 2 and "shape mismatch" in out["error"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    rc, out = _cli(capsys, "inspect", pth, "--config", tmp_path / "cfg.json")
    assert rc == 0 and out["config"]["hidden_size"] == 64


def test_lora_merge_is_w_plus_ba_and_matches_the_unmerged_forward(tmp_path):
    from training.convert import merge_lora
    from training.model import save_state_dict

    pth, cfg = _random_model(tmp_path)
    gen = torch.Generator().manual_seed(1)
    lora = {}
    for i in range(ARCH["num_hidden_layers"]):
        for proj, out_dim in (("q_proj", 64), ("o_proj", 64)):
            lora[f"model.layers.{i}.self_attn.{proj}.lora.A.weight"] = (torch.randn(4, 64, generator=gen) * .1).half()
            lora[f"model.layers.{i}.self_attn.{proj}.lora.B.weight"] = (torch.randn(out_dim, 4, generator=gen) * .1
                                                                         ).half()
    save_state_dict(lora, tmp_path / "lora.pth")
    report = merge_lora(pth, cfg, tmp_path / "lora.pth", tmp_path / "merged.pth")
    assert report["verification"]["ok"] and report["adapted_modules"] == 4 and report["rank"] == 4
    base, merged = torch.load(pth, weights_only=True), torch.load(tmp_path / "merged.pth", weights_only=True)
    key = "model.layers.1.self_attn.o_proj.weight"
    want = base[key].float() + lora["model.layers.1.self_attn.o_proj.lora.B.weight"].float() @ lora[
        "model.layers.1.self_attn.o_proj.lora.A.weight"].float()
    assert torch.allclose(merged[key].float(), want, atol=2e-3)
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    bad = {"model.layers.0.self_attn.q_proj.lora.A.weight": torch.zeros(4, 64)}
    save_state_dict(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="has only lora.A"):
        merge_lora(pth, cfg, tmp_path / "bad.pth", tmp_path / "m2.pth")


def test_splitter_streams_reasoning_then_content():
    from training.chat_batch import Splitter

    s = Splitter(thinking=True)
    assert s.deltas("Let me think</") == {"reasoning": "Let me think"}
    assert s.deltas("Let me think</think>\n\nAnswer") == {"content": "Answer"}
    assert s.deltas("Let me think</think>\n\nAnswer!", final=True) == {"content": "!"}
    assert Splitter(thinking=False).deltas("plain") == {"content": "plain"}


def _chat_worker(*args):
    """A ``python -m training chat-worker`` with one thread, spoken to on its stdin and stdout."""
    return subprocess.Popen([sys.executable, "-m", "training", "chat-worker", *args], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def _answer(proc):
    """The worker's next answer that is not a request's place in the turns (``{"id", "queued": n}``)."""
    while "queued" in (msg := json.loads(proc.stdout.readline())):
        pass
    return msg


def test_chat_worker_streams_a_reply_and_stops_when_cancelled(demo_dir, tmp_path):
    from training.chat import load_hf_tokenizer

    pth, cfg = _random_model(tmp_path)
    model = {"path": str(pth), "config": cfg, "tokenizer": str(demo_dir / "demo-tokenizer")}
    proc = _chat_worker()
    try:  # its share of the cores, from the web process (models_registry/inference.py worker_env)
        ready = json.loads(proc.stdout.readline())
        assert ready == {"ready": True, "threads": 1, "pid": proc.pid}

        def ask(**req):
            proc.stdin.write(json.dumps({"model": model, "messages": [{"role": "user", "content": "1+1="}],
                                         **req}) + "\n")
            proc.stdin.flush()

        def answers(rid):
            got = []
            while True:
                msg = _answer(proc)
                assert msg["id"] == rid and "error" not in msg, msg
                got.append(msg)
                if msg.get("done"):
                    return got

        ask(id="a", max_new_tokens=6, temperature=0)
        got = answers("a")
        assert got[-1]["finish_reason"] in ("length", "stop") and got[-1]["usage"]["completion_tokens"] <= 6
        assert "".join(m.get("content", "") for m in got)  # a random model: any text
        ask(id="b", max_new_tokens=4000, temperature=1.0, seed=1)
        first = _answer(proc)
        assert first["id"] == "b" and not first.get("done")
        proc.stdin.write(json.dumps({"cancel": "b"}) + "\n")
        proc.stdin.flush()
        rest = answers("b")
        assert rest[-1]["finish_reason"] == "cancelled" and rest[-1]["usage"]["completion_tokens"] < 4000
        # a conversation longer than the model's positions is refused, explained, before any prefill
        ask(id="d", max_position_embeddings=32, messages=[{"role": "user", "content": "hello " * 40}])
        refused = _answer(proc)
        assert refused["id"] == "d" and refused["params"]["limit"] == 32 and refused["params"]["tokens"] > 32
        assert refused["template"].startswith("the conversation is %(tokens)s tokens long"), refused
        ask(id="e", max_new_tokens=3, temperature=0, max_position_embeddings=32)  # a short one still fits
        assert answers("e")[-1]["usage"]["completion_tokens"] <= 3
        # OpenAI's logit_bias: +100 makes a token the choice, -100 bans one (here the end: the reply runs to its length)
        ask(id="f", max_new_tokens=5, temperature=1.0, top_p=0.9, logit_bias={"300": 100})
        forced = answers("f")
        assert "".join(m.get("content", "") for m in forced) == load_hf_tokenizer(model["tokenizer"]).decode([300] * 5)
        ask(id="g", max_new_tokens=40, temperature=2.0, top_p=1, logit_bias={"2": -100})
        assert answers("g")[-1]["finish_reason"] == "length"
        ask(id="h", logit_bias={"7000": 1})
        assert "not in the model's vocabulary" in _answer(proc)["error"]
        proc.stdin.write(json.dumps({"id": "c", "model": {**model, "path": str(tmp_path / "none.pth")},
                                     "messages": [{"role": "user", "content": "x"}]}) + "\n")
        proc.stdin.flush()
        assert "error" in _answer(proc)
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0


def test_chat_worker_generates_chats_together_each_as_it_would_alone(demo_dir, tmp_path):
    """Chats sent at once share one forward pass per token (their deltas interleave), and each greedy reply is the one
    it gets alone, token for token as transformers' generate gives it. A seed repeats a sampled reply (its chat's own
    generator); beside other chats only up to the batch's float rounding, as OpenAI's seed is best effort."""
    from training.chat import load_hf_tokenizer
    from training.model import load_model
    from training.tokenizer import EOS_ID, PAD_ID

    pth, cfg = _random_model(tmp_path)
    model = {"path": str(pth), "config": cfg, "tokenizer": str(demo_dir / "demo-tokenizer")}
    asks = {"short": dict(content="1+1=", temperature=0),
            "long": dict(content="a longer question, asked with many more words than the others " * 3, temperature=0,
                         max_new_tokens=8),  # leaves first: the padding it needed is cut from the batch's cache
            "seeded": dict(content="tell me a story", temperature=1.0, top_p=0.9, seed=7)}
    proc = _chat_worker()

    def ask(prefix, *names):
        for name in names:
            a = dict(asks[name])
            proc.stdin.write(json.dumps({"id": prefix + name, "model": model, "max_new_tokens": 24,
                                         "messages": [{"role": "user", "content": a.pop("content")}], **a}) + "\n")
        proc.stdin.flush()

    def replies(prefix, names):
        text, done, order = dict.fromkeys(names, ""), {}, []
        while len(done) < len(names):
            msg = _answer(proc)
            name = msg["id"][len(prefix):]
            assert msg["id"].startswith(prefix) and "error" not in msg, msg
            order.append((name, bool(msg.get("done"))))
            text[name] += msg.get("content", "")
            if msg.get("done"):
                done[name] = msg
        return text, done, order

    try:
        assert json.loads(proc.stdout.readline())["ready"]
        alone = {}
        for name in asks:  # one at a time: each waits for the previous reply
            ask("alone-", name)
            text, done, _ = replies("alone-", [name])
            alone[name] = (text[name], done[name]["usage"])
        ask("again-", "seeded")
        text, _, _ = replies("again-", ["seeded"])
        assert text["seeded"] == alone["seeded"][0]
        ask("together-", *asks)
        text, done, order = replies("together-", list(asks))
        assert {name: (text[name], done[name]["usage"]) for name in ("short", "long")} == {
            name: alone[name] for name in ("short", "long")}
        assert done["seeded"]["usage"]["completion_tokens"] <= 24 and text["seeded"]
        before_first_done = {name for name, is_done in order[:order.index(next(o for o in order if o[1]))]}
        assert len(before_first_done) > 1, order  # generated side by side, not one after the other
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    m, _ = load_model({"path": str(pth), "config": cfg})
    tok = load_hf_tokenizer(demo_dir / "demo-tokenizer")
    for name in ("short", "long"):
        prompt = tok.apply_chat_template([{"role": "user", "content": asks[name]["content"]}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = m.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=asks[name].get("max_new_tokens", 24),
                                eos_token_id=EOS_ID, pad_token_id=PAD_ID)[0, ids.shape[1]:].tolist()
        assert tok.decode([i for i in out if i not in (EOS_ID, PAD_ID)]) == alone[name][0]


def test_a_connection_the_worker_gives_up_on_ends_its_chats():
    """The worker closes a web process's connection that does not take its answers (``SEND_TIMEOUT_S``): its reader
    thread, blocked in a read through the socket's file, must see the end, so that the connection's chats end and
    give their turns on. ``socket.close`` alone left the socket open under that file: the reader never woke."""
    import queue
    import socket
    import threading

    from training.chat_worker import Conn, _hang_up, _read_lines

    mine, peer = socket.socketpair()
    inbox = queue.Queue()
    conn = Conn(mine.sendall, lambda: _hang_up(mine))
    threading.Thread(target=_read_lines, args=(conn, mine.makefile("rb"), inbox), daemon=True).start()
    peer.sendall(b'{"stats": true}\n')
    assert inbox.get(timeout=5) == (conn, {"stats": True})
    conn.close()
    assert inbox.get(timeout=5) == (conn, None) and not conn.open
    conn.send({"id": "x"})  # a closed connection takes nothing, quietly
    assert peer.recv(10) == b""
    peer.close()


class _Recorded:
    """A chat worker's ``Chats`` driven in this process: what each chat streamed (``replies``), and the logits each
    chat chose its tokens from (``seen``)."""

    def __init__(self, monkeypatch, model):
        from training import chat_batch
        from training.chat_worker import Conn

        self.model, self.sent, self.seen = model, [], {}
        self.conn = Conn(lambda data: self.sent.append(json.loads(data)))
        take = chat_batch.Chat.take

        def recording_take(chat, logits):
            self.seen.setdefault(chat.rid, []).append(logits.clone())
            return take(chat, logits)

        monkeypatch.setattr(chat_batch.Chat, "take", recording_take)

    def request(self, rid, words, tokens):
        return {"id": rid, "model": self.model, "messages": [{"role": "user", "content": "word " * words}],
                "max_new_tokens": tokens, "temperature": 0}

    def run(self, chats, *reqs):
        """Hand ``reqs`` to ``chats`` as the worker does, then wait until their model is loaded (by the models' own
        thread) and they are queued."""
        import threading
        import time

        events = {}
        for req in reqs:
            events[req["id"]] = threading.Event()
            chats.take(req, events[req["id"]], self.conn)
        while chats.loading:
            time.sleep(0.005)
            chats.loaded()
        return events

    def alone(self, asks):
        """Each of ``asks`` (id, words, tokens) generated alone: the replies, and the logits each chose from."""
        from training import chat_batch

        replies = {}
        for rid, words, tokens in asks:
            chats = chat_batch.Chats()
            self.run(chats, self.request(rid, words, tokens))
            while chats.busy():
                chats.step()
            replies.update(self.replies())
        return replies, self.take_logits()

    def replies(self):
        out = {}
        for msg in self.sent:
            out.setdefault(msg["id"], []).append(msg)
        self.sent.clear()
        return {rid: ("".join(m.get("content", "") for m in msgs), msgs[-1]["finish_reason"])
                for rid, msgs in out.items()}

    def take_logits(self):
        seen, self.seen = self.seen, {}
        return seen

    def same_logits(self, before):
        assert before.keys() == self.seen.keys()
        for rid in self.seen:  # every step of every chat: the batch (its padding, its cut cache) changes nothing
            assert len(self.seen[rid]) == len(before[rid])
            assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(self.seen[rid], before[rid])), rid
        self.seen.clear()


def test_a_model_being_loaded_holds_up_no_other_chat(demo_dir, tmp_path, monkeypatch):
    """A chat with a model not loaded yet waits for its load, which a thread of its own does: the chats generating
    meanwhile go on (before, every load stopped them all: ~0.8 s for a MiniMind-3 model on a CPU, each time one of a
    class's own models was asked for). A model in use is loaded once however many chats use it; a load that fails is
    told to every chat that waited for it; a chat whose client goes away while its model loads ends there."""
    import threading
    import time

    from training import chat_batch, model as engine_model

    pth, cfg = _random_model(tmp_path)
    other, _ = _random_model(tmp_path, name="b.pth")  # the same weights in another file: another model to load
    tokenizer = str(demo_dir / "demo-tokenizer")
    rec = _Recorded(monkeypatch, {"path": str(pth), "config": cfg, "tokenizer": tokenizer})
    gate, load = threading.Event(), engine_model.load_model

    def slow_load(entry, *args):  # b.pth loads when the test opens the gate
        if entry["path"] == str(other):
            gate.wait(timeout=5)
        return load(entry, *args)

    monkeypatch.setattr(engine_model, "load_model", slow_load)
    chats = chat_batch.Chats()
    rec.run(chats, {**rec.request("a", 2, 200), "logit_bias": {"2": -100}})  # no end token: it streams on
    chats.step()
    b = dict(rec.request("b", 2, 6), model={"path": str(other), "config": cfg, "tokenizer": tokenizer},
             logit_bias={"2": -100})
    began = time.monotonic()
    cancel = {rid: threading.Event() for rid in ("b", "b2", "gone")}
    chats.take(b, cancel["b"], rec.conn)
    chats.take({**b, "id": "gone"}, cancel["gone"], rec.conn)
    assert time.monotonic() - began < 1  # before: the worker loaded it there and then, every chat waiting
    assert [req["id"] for req, _, _ in chats.loading] == ["b", "gone"] and {"b", "gone"} <= chats.ids()
    rec.sent.clear()
    for _ in range(10):
        chats.step()
    assert sum(m["id"] == "a" for m in rec.sent) >= 9  # "a" streams while b.pth loads
    cancel["gone"].set()  # its client went away meanwhile
    chats.step()
    assert [req["id"] for req, _, _ in chats.loading] == ["b"]
    gate.set()
    chats.take({**b, "id": "b2"}, cancel["b2"], rec.conn)  # asks for the same model while it loads
    while chats.busy() or chats.loading:
        chats.step()
    replies = rec.replies()
    assert replies["gone"] == ("", "cancelled") and replies["b"][1] in ("length", "stop") and replies["b"][0]
    assert replies["b2"] == replies["b"]  # the same model and question, greedy
    assert chats.models.loads == 2  # a.pth and b.pth, once each
    rec.take_logits()

    broken = {"path": str(pth), "config": cfg, "tokenizer": str(tmp_path / "no-tokenizer")}
    rec.run(chats, *({**rec.request(rid, 2, 4), "model": broken} for rid in ("x1", "x2")), rec.request("c", 2, 4))
    while chats.busy():
        chats.step()
    errors = [m for m in rec.sent if "error" in m]
    assert sorted(m["id"] for m in errors) == ["x1", "x2"] and not chats.models.failed()
    rec.sent[:] = [m for m in rec.sent if "error" not in m]
    assert rec.replies()["c"][1] in ("length", "stop")  # the others went on


def test_the_worker_keeps_the_models_that_fit_and_never_drops_one_in_use(demo_dir, tmp_path):
    """Loaded models stay while they fit in the budget (a class's own models are not loaded again at each
    question, as with the two most recent before), the least recently used leaving first; one in use always stays."""
    import time

    from training.chat_batch import Models

    def loaded(models, entry):
        deadline = time.monotonic() + 60
        while (got := models.get(entry)) is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        return got[0]

    entries = []
    for name in ("a.pth", "b.pth", "c.pth"):
        pth, cfg = _random_model(tmp_path, name=name)
        entries.append({"path": str(pth), "config": cfg, "tokenizer": str(demo_dir / "demo-tokenizer")})
    models = Models(budget=0)
    a = loaded(models, entries[0])
    size = models.cache[Models.key(entries[0])][2]
    assert size > sum(p.numel() * 4 for p in a.parameters()) * 0.99
    loaded(models, entries[1])
    models.trim({id(a)})  # over the budget: only the model in use stays
    assert list(models.cache) == [Models.key(entries[0])]

    models = Models(budget=2 * size)
    a, b = loaded(models, entries[0]), loaded(models, entries[1])
    assert loaded(models, entries[0]) is a and models.loads == 2  # kept: not loaded again
    loaded(models, entries[2])
    models.trim(set())  # three over a budget of two: the least recently used (b) leaves
    assert list(models.cache) == [Models.key(entries[0]), Models.key(entries[2])]
    assert loaded(models, entries[1]) is not b and models.loads == 4


def test_chat_worker_bounds_what_its_chats_hold_together(demo_dir, tmp_path, monkeypatch):
    """A long conversation does not pad short ones to its length (it starts a batch of its own), the chats generating
    at once reserve at most KV_TOKENS (a chat beyond waits in the worker until one ends), and a waiting chat whose
    client went away ends without its prompt being read. Every greedy reply is still the one it gets alone."""
    from training import chat_batch

    pth, cfg = _random_model(tmp_path)
    rec = _Recorded(monkeypatch, {"path": str(pth), "config": cfg, "tokenizer": str(demo_dir / "demo-tokenizer")})
    monkeypatch.setattr(chat_batch, "PREFILL_CHUNK", 10**6)  # every prompt read at the step after it came

    alone, alone_logits = rec.alone([("short1", 2, 12), ("short2", 3, 5), ("long", 300, 12)])

    chats = chat_batch.Chats()
    rec.run(chats, rec.request("short1", 2, 12), rec.request("short2", 3, 5), rec.request("long", 300, 12))
    chats.step()
    assert [[c.rid for c in b.chats] for b in chats.batches] == [["short1", "short2"], ["long"]]
    assert chats.batches[0].mask.shape[1] < 40  # not padded to the long prompt's 300-odd tokens
    while chats.busy():
        chats.step()
    assert rec.replies() == alone
    rec.same_logits(alone_logits)

    monkeypatch.setattr(chat_batch, "KV_TOKENS", 320)
    chats = chat_batch.Chats()
    gone = rec.run(chats, rec.request("long", 300, 12), rec.request("short1", 2, 12), rec.request("gone", 2, 12))
    assert [c.rid for c in chats.reading] == ["long"]
    assert [c.rid for c in chats.waiting] == ["short1", "gone"]
    gone["gone"].set()  # its client went away while it waited
    steps = 0
    while chats.busy() or chats.waiting:
        chats.step()
        steps += 1
        if chats.batches and chats.batches[0].chats[0].rid == "short1":
            assert not chats.waiting and not chats.reading and len(chats.batches) == 1
    assert rec.replies() == {"long": alone["long"], "short1": alone["short1"], "gone": ("", "cancelled")}
    assert steps >= 20  # one after the other
    rec.same_logits({rid: alone_logits[rid] for rid in ("long", "short1")})


def test_chat_worker_reads_a_long_prompt_a_piece_at_a_time_beside_the_others(demo_dir, tmp_path, monkeypatch):
    """A long conversation that arrives while another chat streams is read PREFILL_CHUNK tokens between two of the
    other's tokens (chunked prefill), instead of in one piece that stops the other's stream for the whole of its
    reading; read in pieces, every logit either chat chooses from is the one it gets with the prompt read in one
    piece. A question that comes while the long prompt is read is read first (the shortest rest first), and a chat
    whose client goes away while its prompt is read ends there."""
    from training import chat_batch

    pth, cfg = _random_model(tmp_path)
    rec = _Recorded(monkeypatch, {"path": str(pth), "config": cfg, "tokenizer": str(demo_dir / "demo-tokenizer")})

    def streamed(chunk):
        """The replies, and how many tokens the streaming chat got while the long prompt was read."""
        monkeypatch.setattr(chat_batch, "PREFILL_CHUNK", chunk)
        chats = chat_batch.Chats()
        rec.run(chats, rec.request("streaming", 2, 40))
        for _ in range(3):
            chats.step()
        rec.sent.clear()
        rec.run(chats, rec.request("long", 300, 6))
        while not any(m["id"] == "long" for m in rec.sent):
            chats.step()
        meanwhile = sum(m["id"] == "streaming" for m in rec.sent)
        prompt_len = next(c.prompt_len for b in chats.batches for c in b.chats if c.rid == "long")
        while chats.busy():
            chats.step()
        return rec.replies(), meanwhile, prompt_len

    whole, whole_meanwhile, prompt_len = streamed(10**6)
    whole_logits = rec.take_logits()
    pieces, meanwhile, _ = streamed(16)
    assert whole_meanwhile <= 1  # read in one piece: the other chat waited for all of it
    assert meanwhile >= prompt_len // 16 - 1 and prompt_len > 300, (meanwhile, prompt_len)
    assert pieces["long"] == whole["long"]
    rec.same_logits(whole_logits)

    chats = chat_batch.Chats()  # a question that comes while it is read starts at once, not after all of it
    rec.run(chats, rec.request("long", 300, 6))
    chats.step()
    rec.run(chats, rec.request("late", 2, 6))
    for _ in range(3):
        chats.step()
        if chats.batches:
            break
    assert [c.rid for b in chats.batches for c in b.chats] == ["late"] and [c.rid for c in chats.reading] == ["long"]
    while chats.busy():
        chats.step()
    assert rec.replies()["long"] == whole["long"]
    rec.take_logits()

    chats = chat_batch.Chats()
    gone = rec.run(chats, rec.request("long", 300, 6))
    chats.step()
    assert [c.rid for c in chats.reading] == ["long"] and chats.reading[0].read == 16
    gone["long"].set()
    chats.step()
    assert not chats.busy() and rec.replies() == {"long": ("", "cancelled")}


def test_chat_worker_reads_the_questions_that_come_together_in_one_pass(demo_dir, tmp_path, monkeypatch):
    """A class's questions arrive together: their prompts, short enough to fit in one PREFILL_CHUNK together, are
    read in one forward pass of the model (left-padded to the longest) instead of one pass each, and every logit each
    chat chooses from is the one it gets read alone. A long prompt is still read a piece at a time by itself."""
    from training import chat_batch

    pth, cfg = _random_model(tmp_path)
    rec = _Recorded(monkeypatch, {"path": str(pth), "config": cfg, "tokenizer": str(demo_dir / "demo-tokenizer")})
    asks = [("q1", 2, 6), ("q2", 9, 6), ("q3", 5, 6), ("q4", 1, 6)]

    alone, alone_logits = rec.alone(asks)

    chats = chat_batch.Chats()
    rec.run(chats, *(rec.request(rid, words, tokens) for rid, words, tokens in asks), rec.request("long", 300, 6))
    model = chats.reading[0].model
    passes = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: passes.append(k["input_ids"].shape) or
                        forward(self, *a, **k))
    chats.step()
    assert len(passes) == 2 and passes[0][0] == 4, passes  # the four questions in one pass, then a piece of the long
    assert sorted(c.rid for b in chats.batches for c in b.chats) == ["q1", "q2", "q3", "q4"]
    assert [c.rid for c in chats.reading] == ["long"] and 0 < chats.reading[0].read < chats.reading[0].prompt_len
    while chats.busy():
        chats.step()
    replies = rec.replies()
    assert {rid: replies[rid] for rid in alone} == alone
    seen = rec.take_logits()
    for rid in alone:  # the first token's logits from the pass read together, the rest from the batch
        assert len(seen[rid]) == len(alone_logits[rid])
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(seen[rid], alone_logits[rid])), rid


def test_eval_stage_measures_loss_preferences_and_answers_and_sft_beats_pretrain(trained, demo_dir, tmp_path,
                                                                                    capsys):
    from .conftest import run_inprocess

    def evaluate(model, data, **config):
        spec = {"stage": "eval", "run_dir": str(tmp_path / f"{model}-{data}"), "device": "cpu",
                "dataset": str(demo_dir / f"{data}.jsonl"), "tokenizer": str(demo_dir / "demo-tokenizer"),
                "base_model": {"path": trained[model], "config": ARCH},
                "config": {"eval_records": 40, "accuracy_tasks": 0, "max_gen_len": 24, **config}}
        rc, events = run_inprocess(spec, tmp_path, capsys, name=f"{model}-{data}")
        assert rc == 0, events
        done = events[-1]
        assert done["event"] == "done" and "model_path" not in done
        assert [e for e in events if e["event"] == "eval"][0]["metrics"] == done["evaluation"]
        return done["evaluation"]

    text = evaluate("pretrain", "demo-pretrain")
    assert text["records"] == 40 and text["tokens"] > 0 and abs(text["perplexity"] - math.exp(text["eval_loss"])) < 1e-6
    pairs = evaluate("sft", "demo-dpo")
    assert 0 <= pairs["preference_accuracy"] <= 1 and pairs["eval_loss"] > 0
    sft_answers = evaluate("sft", "demo-rlaif", accuracy_tasks=30)
    pre_answers = evaluate("pretrain", "demo-rlaif", accuracy_tasks=30)
    assert {"exact_accuracy", "contains_accuracy", "numeric_accuracy", "demo_accuracy"} <= set(sft_answers)
    assert sft_answers["demo_accuracy"] > pre_answers["demo_accuracy"]
    assert sft_answers["contains_accuracy"] > pre_answers["contains_accuracy"]
    assert evaluate("sft", "demo-sft")["eval_loss"] < evaluate("pretrain", "demo-sft")["eval_loss"]
