"""The tokenised, memory-mapped data path (training/token_cache.py, training/rows.py): one cache per dataset and
processing, built once and atomically, shared by jobs, cut per max_seq_len, and memory that does not grow with the
file."""
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from training import token_cache
from training.chat import SYSTEM_PROMPTS, encode_conversations, load_hf_tokenizer
from training.demo_data import write_sized

from .conftest import ROOT, TINY, losses, run_engine, run_in_process


def minimind_generate_labels(ids, start, end):
    """MiniMind's SFTDataset.generate_labels (dataset/lm_dataset.py), as the reference for our array version."""
    labels = [-100] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i:i + len(start)] == start:
            s = i + len(start)
            e = s
            while e < len(ids):
                if ids[e:e + len(end)] == end:
                    break
                e += 1
            for j in range(s, min(e + len(end), len(ids))):
                labels[j] = ids[j]
            i = e + len(end) if e < len(ids) else len(ids)
        else:
            i += 1
    return labels


def test_assistant_mask_is_minimind_generate_labels():
    rng = random.Random(0)
    start, end = [1, 77, 5], [2, 5]
    for _ in range(3000):
        ids = [rng.choice([1, 2, 5, 77, 9, 10]) for _ in range(rng.randint(0, 40))]
        mask = token_cache.assistant_mask(np.array(ids), start, end)
        ref = minimind_generate_labels(ids, start, end)
        assert [int(m) for m in mask] == [int(r != -100) for r in ref], ids


def _spec(demo_dir, tmp_path, name, stage="pretrain", data=None, **config):
    return {"stage": stage, "run_dir": str(tmp_path / name), "device": "cpu",
            "dataset": str(data or demo_dir / f"demo-{'pretrain' if stage == 'pretrain' else 'sft'}.jsonl"),
            "tokenizer": str(demo_dir / "demo-tokenizer"), "data_cache": str(tmp_path / "cache"),
            "config": {**TINY, "max_steps": 2, **config}}


def _write(tmp_path, spec, name):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def _logs(events):
    return [e["message"] for e in events if e["event"] == "log"]


def test_one_cache_serves_every_length_and_mode_and_other_options_get_their_own(demo_dir, tmp_path):
    runs = [("a", {}), ("b", {"max_seq_len": 32}), ("c", {"packing": False})]
    for name, cfg in runs:
        rc, events, other = run_in_process(_write(tmp_path, _spec(demo_dir, tmp_path, name, **cfg), name))
        assert rc == 0, other
        assert any(("tokenised" if name == "a" else "reusing") in m for m in _logs(events)), _logs(events)
    caches = token_cache.list_caches(tmp_path / "cache")
    assert len(caches) == 1 and caches[0]["processing"] == "pretrain" and caches[0]["records"] == 6000
    for name, cfg in (("s1", {}), ("s2", {"system_prompt_ratio": 0.0}), ("s3", {"max_seq_len": 48})):
        rc, events, other = run_in_process(_write(tmp_path, _spec(demo_dir, tmp_path, name, "sft", **cfg), name))
        assert rc == 0, other
    sft = [c for c in token_cache.list_caches(tmp_path / "cache") if c["processing"] == "sft"]
    assert sorted(c["options"]["system_prompt_ratio"] for c in sft) == [0.0, 0.2]


def test_rows_cut_to_max_seq_len_are_the_padded_rows_of_the_old_encoder(demo_dir, tmp_path):
    """Rows stored whole and cut when read equal MiniMind's truncate-then-label rows (labels of a cut span run to
    the end of the row)."""
    from training import rows

    tok = load_hf_tokenizer(demo_dir / "demo-tokenizer")
    convs = [json.loads(line)["conversations"] for line in open(demo_dir / "demo-sft.jsonl")][:300]
    for msl in (24, 40, 128):
        x, y = encode_conversations(tok, convs, msl)
        data = rows.from_records(tok, "sft", [{"conversations": c} for c in convs],
                                 {"max_seq_len": msl, "system_prompt_ratio": 0.0, "empty_think_drop_ratio": 0.0})
        batch = data.batch(range(len(convs)), 1)
        width = batch["x"].shape[1]
        assert torch.equal(batch["x"], x[:, :width]) and torch.equal(batch["y"], y[:, :width])
        assert (x[:, width:] == 0).all()
        ids = [tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"][:msl]
               for c in convs]
        assert batch["x"].shape[1] == max(len(i) for i in ids)


def test_a_gzipped_file_trains_and_shares_the_cache_of_its_plain_twin(demo_dir, tmp_path):
    import gzip

    gz = tmp_path / "demo-sft.jsonl.gz"
    gz.write_bytes(gzip.compress((demo_dir / "demo-sft.jsonl").read_bytes()))
    rc, events, other = run_in_process(_write(tmp_path, _spec(demo_dir, tmp_path, "gz", "sft", data=gz), "gz"))
    assert rc == 0, other
    start = next(e for e in events if e["event"] == "start")
    assert start["samples"] + start["eval_samples"] == 3000


def _popen(spec_path, env=None):
    return subprocess.Popen([sys.executable, "-u", "-m", "training", "run", str(spec_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def _killed_at_first_checkpoint(spec_path, env=None) -> list[dict]:
    """Run the engine and kill -9 it once it has written its first checkpoint; the events up to there."""
    proc = _popen(spec_path, env)
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "checkpoint":
            proc.kill()
            break
    proc.wait(timeout=30)
    return events


@pytest.fixture(scope="module")
def six_mb(tmp_path_factory):
    """A 6 MB pretraining file: above the size tokenised inline, so worker processes prepare it."""
    path = tmp_path_factory.mktemp("six") / "six.jsonl"
    write_sized(path, "pretrain", 6_000_000)
    return path


def test_a_job_on_a_share_of_the_cores_tokenises_within_its_share(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    big = token_cache.INLINE_BYTES
    assert token_cache.workers_for(big) == 8 and token_cache.workers_for(big - 1) == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # a job on 4 of the node's CPU slots' cores
    assert token_cache.workers_for(big) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one core: inline (a pool would only add a process to share it)
    assert token_cache.workers_for(big) == 0


def test_a_job_killed_while_preparing_leaves_no_cache_and_the_next_prepares_again(demo_dir, tmp_path, six_mb,
                                                                                monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # two cores' share (the suite's workers have one): two tokenisers
    spec_path = _write(tmp_path, _spec(demo_dir, tmp_path, "killed", data=six_mb), "killed")
    proc = _popen(spec_path)
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and 0 < event["fraction"] < 1:
            workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            proc.kill()
            break
    else:
        pytest.fail("no progress event before the preparation ended")
    proc.wait(timeout=30)
    assert len(workers) == token_cache.workers_for(six_mb.stat().st_size), workers
    time.sleep(1)
    assert [w for w in workers if _running(w)] == [], "the tokenising workers must die with their job"
    root = tmp_path / "cache"
    assert token_cache.list_caches(root) == []
    leftovers = [p.name for p in root.iterdir() if ".part" in p.name]
    rc, events, other = run_engine(_write(tmp_path, _spec(demo_dir, tmp_path, "next", data=six_mb), "next"))
    assert rc == 0, other
    assert any(m.startswith("data: tokenised") for m in _logs(events)), _logs(events)
    assert not any(".part" in p.name for p in root.iterdir()), leftovers  # the next job cleared the leftovers
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["fraction"] == 1.0 and progress[-1]["records"] > 4000


def _running(pid) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except OSError:
        return False


def test_two_jobs_on_one_dataset_tokenise_once(demo_dir, tmp_path, six_mb):
    procs = [_popen(_write(tmp_path, _spec(demo_dir, tmp_path, f"twin{n}", data=six_mb), f"twin{n}"))
             for n in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    logs = [_logs([json.loads(line) for line in out.splitlines()]) for out in outputs]
    tokenised = [m for log in logs for m in log if m.startswith("data: tokenised")]
    assert len(tokenised) == 1, logs
    assert len(token_cache.list_caches(tmp_path / "cache")) == 1


def test_a_killed_run_resumes_at_the_same_data_position(demo_dir, tmp_path):
    """kill -9 after the checkpoint of step 6, resume from it: steps 7-12 have the losses of a run never stopped."""
    cfg = {"max_steps": 12, "save_interval": 6, "log_interval": 1, "group_by_length": True, "batch_size": 8}
    rc, straight, other = run_in_process(_write(tmp_path, _spec(demo_dir, tmp_path, "straight", "sft", **cfg), "s"))
    assert rc == 0, other
    spec = _spec(demo_dir, tmp_path, "killed", "sft", **cfg)
    _killed_at_first_checkpoint(_write(tmp_path, spec, "k"))
    rc, second, other = run_in_process(_write(tmp_path, {**spec, "resume": True}, "k"))
    assert rc == 0, other
    assert next(e for e in second if e["event"] == "start")["resumed_from_step"] == 6
    expected = losses(straight)
    assert losses(second) == {s: v for s, v in expected.items() if s > 6}


def _peak_rss_kb(spec_path) -> int:
    code = ("import resource, subprocess, sys\n"
            f"rc = subprocess.run([sys.executable, '-m', 'training', 'run', {str(spec_path)!r}],"
            " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode\n"
            "assert rc == 0, rc\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    return int(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=600).stdout)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_dataset(demo_dir, tmp_path):
    """A run on a 40 MB file peaks within 15 % of the same run on a 4 MB file (the largest process of the job:
    the engine or one of its tokenising workers; the old path held every token as Python ints: ~20x)."""
    peaks = {}
    for mb in (4, 40):
        data = tmp_path / f"p{mb}.jsonl"
        write_sized(data, "pretrain", mb * 1_000_000)
        spec = _spec(demo_dir, tmp_path, f"rss{mb}", data=data, max_seq_len=128, eval_ratio=0.01)
        peaks[mb] = _peak_rss_kb(_write(tmp_path, spec, f"rss{mb}"))
    assert peaks[40] <= 1.15 * peaks[4], peaks


def test_caches_beyond_the_cap_are_evicted_least_recently_used_first(tmp_path):
    root = tmp_path / "cache"
    for i, name in enumerate(("old", "mid", "new")):
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "x.ids").write_bytes(b"\0" * 1000)
        meta = {"name": name, "processing": "pretrain", "dataset_sha256": name, "records": 1, "tokens": 500}
        (folder / "meta.json").write_text(json.dumps(meta))
        os.utime(folder / "meta.json", (time.time() - 100 + i, time.time() - 100 + i))
    assert [c["name"] for c in token_cache.list_caches(root)] == ["new", "mid", "old"]
    assert token_cache.evict(root, 2500, keep={"old"}) == ["mid"]
    assert sorted(c["name"] for c in token_cache.list_caches(root)) == ["new", "old"]
    assert not token_cache.remove(root, "../cache/new") and token_cache.remove(root, "new")


def test_identity_system_prompts_are_minimind_own():
    """dataset/lm_dataset.py pre_processing_chat's SYSTEM_PROMPTS, in its order."""
    assert SYSTEM_PROMPTS[1] == "你是minimind，一个小巧但有用的语言模型。" and len(SYSTEM_PROMPTS) == 10
    assert SYSTEM_PROMPTS[5:] == ["You are a helpful AI assistant.",
                                  "You are minimind, a lightweight intelligent assistant.",
                                  "You are a friendly chatbot. Please answer the user's questions carefully.",
                                  "You are a knowledgeable AI. Try your best to provide accurate information.",
                                  "You are minimind, a small but useful language model."]


def test_numeric_expected_answers_are_read_as_minimind_reads_them(demo_dir, tmp_path):
    """Agent-RL records give ``gt`` as numbers (``[59]``): MiniMind applies str(), so do the checks and rewards."""
    from training import rows
    from training.records import check_record

    rec = {"conversations": [{"role": "user", "content": "What is 50 plus 9?"}, {"role": "assistant", "content": ""}],
           "gt": [59]}
    assert check_record("rlaif", rec) is None and check_record("rlaif", {**rec, "gt": 59}) is None
    assert check_record("rlaif", {**rec, "gt": [True]}) is not None
    data = tmp_path / "agent.jsonl"
    data.write_text(json.dumps(rec) + "\n")
    tok = load_hf_tokenizer(demo_dir / "demo-tokenizer")
    spec = {"stage": "grpo", "dataset": str(data), "tokenizer": str(demo_dir / "demo-tokenizer"),
            "data_cache": str(tmp_path / "c"), "config": {"max_seq_len": 64, "seed": 1}}
    prompts = rows.load(spec, tok)
    assert prompts.record(0) == {"gt": ["59"], "question": "What is 50 plus 9?"}


class _MiniMindLoRA(torch.nn.Module):
    """MiniMind's model/model_lora.py LoRA module (A: in -> rank, B: rank -> out)."""

    def __init__(self, n, rank):
        super().__init__()
        self.A = torch.nn.Linear(n, rank, bias=False)
        self.B = torch.nn.Linear(rank, n, bias=False)


@pytest.mark.parametrize("kv_heads,expected", [(2, {"q_proj", "o_proj"}),
                                               (4, {"q_proj", "k_proj", "v_proj", "o_proj"})])
def test_lora_default_targets_are_minimind_rule_and_its_load_lora_takes_our_file(kv_heads, expected):
    """MiniMind's apply_lora puts an adapter on every square nn.Linear and load_lora loads each one's keys
    strictly: our default targets and lora.pth must match that for every shape we allow."""
    from training.lora import attach, minimind_lora_state_dict
    from training.model import build_model
    from training.spec import model_config, resolve_config

    cfg = resolve_config("lora", {**TINY, "num_key_value_heads": kv_heads})
    model = attach(build_model(model_config(cfg)), cfg)
    ours = minimind_lora_state_dict(model)
    assert {k.split(".")[-4] for k in ours} == expected
    theirs = build_model(model_config(cfg))  # MiniMind's apply_lora, then load_lora, on a fresh model
    for name, module in theirs.named_modules():
        if isinstance(module, torch.nn.Linear) and module.in_features == module.out_features:
            module.lora = _MiniMindLoRA(module.in_features, 16)
    for name, module in theirs.named_modules():
        if hasattr(module, "lora"):
            state = {k.replace(f"{name}.lora.", ""): v for k, v in ours.items() if f"{name}.lora." in k}
            module.lora.load_state_dict(state)  # strict: raises on a missing or extra adapter


def test_a_large_file_trains_at_once_while_its_cache_is_built_and_the_rows_are_the_same(demo_dir, tmp_path,
                                                                                     monkeypatch):
    """Above rows.LAZY_BYTES a record-row stage does not wait for the cache: it reads and encodes the records it
    needs (as the cache will) while ``python -m training prepare`` builds the cache in the background, then moves to
    the cache. The rows on demand are the cache's, every one of them, for SFT and DPO."""
    from training import rows

    monkeypatch.setattr(rows, "LAZY_BYTES", 0)
    tok = load_hf_tokenizer(demo_dir / "demo-tokenizer")
    for stage, data in (("sft", "demo-sft"), ("dpo", "demo-dpo")):
        spec = {**_spec(demo_dir, tmp_path, f"lazy-{stage}", stage, data=demo_dir / f"{data}.jsonl"),
                "data_cache": str(tmp_path / f"lazy-{stage}")}
        lazy = rows.load(spec, tok)
        assert lazy.shared["pending"] is not None and isinstance(lazy.cache, token_cache.LazySource)
        every = range(len(lazy))
        on_demand = lazy.batch(every, 1)
        deadline = time.time() + 120
        while lazy.shared["pending"] is not None and time.time() < deadline:
            time.sleep(0.5)
            lazy.cache  # noqa: B018 -- looks for the finished cache
        assert isinstance(lazy.cache, token_cache.Cache), "the background build did not finish"
        cached = lazy.batch(every, 1)
        assert on_demand.keys() == cached.keys()
        assert all(torch.equal(on_demand[k], cached[k]) for k in cached)


def test_the_line_index_finds_every_record_and_skips_blank_lines(tmp_path):
    path = tmp_path / "lines.jsonl"
    lines = [b'{"text": "a"}\n', b"\n", b"   \n", b'{"text": "b"}\r\n', b" \t \n", b'  {"text": "c"}\n',
             b'{"text": "d"}']
    path.write_bytes(b"".join(lines))
    data = path.read_bytes()
    for block in (7, 64 << 20):  # lines across the scan's blocks too
        starts, ends = token_cache.line_index(path, tmp_path / "scratch", block=block)
        assert [data[a:b] for a, b in zip(starts, ends)] == [lines[0], lines[3], lines[5], lines[6]]
    assert [token_cache.line_number(path, int(a)) for a in starts] == [1, 4, 6, 7]
    assert list((tmp_path / "scratch").iterdir()) == []


def test_a_long_line_is_not_read_whole(tmp_path, demo_dir, monkeypatch):
    """The blank-line check reads a line a block at a time (a record after a long indent is kept, a long run of
    spaces is not), and the lazy reader refuses a line over the reader's bound as the cache's build does, naming it,
    without reading it into memory."""
    from training import records

    path = tmp_path / "long.jsonl"
    lines = [b'{"text": "a"}\n', b" " * 200_000 + b'{"text": "b"}\n', b" " * 200_000 + b"\n",
             b'{"text": "' + b"c" * 300_000 + b'"}\n']
    path.write_bytes(b"".join(lines))
    data = path.read_bytes()
    for block in (7, 4096, 64 << 20):
        starts, ends = token_cache.line_index(path, tmp_path / "scratch", block=block)
        assert [data[a:b] for a, b in zip(starts, ends)] == [lines[0], lines[1], lines[3]]
    monkeypatch.setattr(token_cache, "MAX_LINE_BYTES", 250_000)
    tok = load_hf_tokenizer(demo_dir / "demo-tokenizer")
    lazy = token_cache.LazySource(path, token_cache.Encoder(tok, "pretrain", {}), tmp_path / "scratch")
    assert len(lazy.rows([0, 1])["x"]) == 2
    reads, pread = [], os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: reads.append(n) or pread(fd, n, at))
    with pytest.raises(records.DataTooLarge) as exc:
        lazy.rows([2])
    assert exc.value.lineno == 4 and "longer than" in str(exc.value) and reads == []


def _epoch(view, epoch, bs=32):
    order = view.order(bs, 3, epoch)
    return torch.cat([view.batch(order[i:i + bs])["x"] for i in range(0, len(order), bs)])


def test_packed_pretraining_on_a_large_file_starts_at_once_with_the_windows_and_order_of_its_cache(
        demo_dir, tmp_path, monkeypatch):
    """Above rows.LAZY_BYTES packed pretraining reads its file shard by shard (training/shards.py): it trains while
    the cache is built, and every position of two epochs, and the eval windows, hold the windows read from the
    finished cache. An epoch sees distinct windows of its training shards only (as many as the estimate says)."""
    from training import rows, shards

    monkeypatch.setattr(rows, "LAZY_BYTES", 0)
    data = tmp_path / "large.jsonl"
    write_sized(data, "pretrain", 1_500_000)
    tok = load_hf_tokenizer(demo_dir / "demo-tokenizer")
    spec = _spec(demo_dir, tmp_path, "sharded", data=data, packing=True)
    lazy = rows.load(spec, tok)
    assert isinstance(lazy, shards.ShardedRows) and isinstance(lazy.shards.source, token_cache.LazySource)
    train, held = lazy.split(0.01, 3)
    seen = {e: _epoch(train, e) for e in (0, 1)}
    held_rows = held.all()["x"]
    deadline = time.time() + 120
    while lazy.shards.shared["pending"] is not None and time.time() < deadline:
        time.sleep(0.5)
        lazy.shards.source  # noqa: B018 -- looks for the finished cache
    cached = rows.load(spec, tok)
    assert isinstance(cached.shards.source, token_cache.Cache), "the background build did not finish"
    train2, held2 = cached.split(0.01, 3)
    assert (len(train2), len(held2)) == (len(train), len(held)) and 0 < len(held) <= 1000
    for e in (0, 1):
        assert torch.equal(seen[e], _epoch(train2, e))
    assert torch.equal(held_rows, held2.all()["x"])
    assert not torch.equal(seen[0], seen[1])

    def windows(view):
        return {tuple(view.shards.window(int(k), j).tolist()) for k in view.members
                for j in range(view.shards.n_windows(int(k)))}

    every = windows(train2)
    epoch0 = [tuple(r.tolist()) for r in seen[0]]
    assert len(set(epoch0)) == min(len(train2), len(every)) and set(epoch0) <= every
    assert not {tuple(r.tolist()) for r in held_rows} & every  # eval windows come from shards not trained on
    assert abs(len(train2) - len(every)) / len(every) < 0.05  # the estimate from the first group's shards


def test_sharded_packed_pretraining_resumes_at_the_same_window_whether_its_cache_was_ready_or_not(
        demo_dir, tmp_path, monkeypatch):
    """A run on a complete cache, and a run started while its cache was still being built, killed after the
    checkpoint of step 6 and resumed: the same 12 losses."""
    from training import rows

    monkeypatch.setattr(rows, "LAZY_BYTES", 0)
    data = tmp_path / "large.jsonl"
    write_sized(data, "pretrain", 1_500_000)
    cfg = {"max_steps": 12, "save_interval": 6, "batch_size": 8, "eval_ratio": 0.01, "eval_interval": 6}
    tok = load_hf_tokenizer(demo_dir / "demo-tokenizer")
    token_cache.prepare(data, tok, demo_dir / "demo-tokenizer", "pretrain", {}, tmp_path / "ready")
    ready = {**_spec(demo_dir, tmp_path, "ready", data=data, **cfg), "data_cache": str(tmp_path / "ready")}
    rc, straight, other = run_in_process(_write(tmp_path, ready, "ready"))
    assert rc == 0, other
    assert any("shard by shard" in m for m in _logs(straight))
    spec = {**_spec(demo_dir, tmp_path, "killed", data=data, **cfg), "data_cache": str(tmp_path / "building")}
    first = _killed_at_first_checkpoint(_write(tmp_path, spec, "k"), dict(os.environ, MINICLOUD_LAZY_DATA_MB="0"))
    assert any("read as they are needed" in m for m in _logs(first)), _logs(first)
    rc, second, other = run_in_process(_write(tmp_path, {**spec, "resume": True}, "k"))
    assert rc == 0, other
    expected = losses(straight)
    assert losses(first) == {s: v for s, v in expected.items() if s <= 6}
    assert losses(second) == {s: v for s, v in expected.items() if s > 6}
