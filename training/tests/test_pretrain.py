"""The engine on a tiny model: it learns the demo data, writes MiniMind-layout weights, stops and resumes exactly."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen3ForCausalLM

from training.model import hf_config
from training.spec import model_config, resolve_config

from .conftest import ROOT, built_once, losses, pretrain_spec, run_engine, run_inprocess


def test_pretrain_loss_falls_well_below_start(make_spec, engine):
    rc, events, other = engine(make_spec(max_steps=120))
    assert rc == 0, other
    kinds = [e["event"] for e in events]
    assert kinds[0] == "log" and "start" in kinds and kinds[-1] == "done"
    curve = losses(events)
    first, last = curve[1], curve[max(curve)]
    assert first > 8.0  # ~ln(6400) for a fresh model
    assert last < 0.45 * first, (first, last)
    step = [e for e in events if e["event"] == "step"][-1]
    assert step["step"] == 120 and step["metrics"]["tokens"] > 0 and step["metrics"]["lr"] > 0


def test_pth_is_minimind_layout_and_loads_strictly_into_qwen3(make_spec, engine):
    rc, events, other = engine(make_spec(max_steps=3))
    assert rc == 0, other
    done = events[-1]
    sd = torch.load(done["model_path"], weights_only=True)
    assert all(v.dtype == torch.float16 for v in sd.values())
    # MiniMind's key layout: embed, final norm, lm_head (tied, both keys present) and 11 keys per dense layer.
    assert len(sd) == 3 + 11 * 2
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # 2 kv heads x head_dim 16
    assert sd["model.layers.1.mlp.gate_proj.weight"].shape == (256, 64)  # ceil(64*pi/64)*64
    model = Qwen3ForCausalLM(hf_config(done["model_config"]))
    model.load_state_dict(sd, strict=True)


def test_sigterm_checkpoints_and_resume_is_exact(make_spec, engine):
    """Stop at step k with SIGTERM, resume, and get the same losses as a run that never stopped (CPU, fp32). The
    stopped run is a process of its own (the signal); the straight and the resumed ones run in this one."""
    cfg = dict(max_steps=30, save_interval=1000)
    rc, straight, other = engine(make_spec("straight", **cfg))
    assert rc == 0, other
    spec_path = make_spec("stopped", **cfg)
    proc = subprocess.Popen([sys.executable, "-u", "-m", "training", "run", str(spec_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first_part = []
    for line in proc.stdout:
        event = json.loads(line)
        first_part.append(event)
        if event["event"] == "step" and event["step"] == 8:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    stopped_at = [e for e in first_part if e["event"] == "checkpoint"][-1]["step"]
    assert 8 <= stopped_at < 30
    assert first_part[-1]["event"] == "stopped" and first_part[-1]["step"] == stopped_at  # the portal reads it
    spec = json.loads(spec_path.read_text())
    spec["resume"] = True
    spec_path.write_text(json.dumps(spec))
    rc, second_part, other = engine(spec_path)
    assert rc == 0, other
    start = [e for e in second_part if e["event"] == "start"][0]
    assert start["resumed_from_step"] == stopped_at
    resumed = {**losses(first_part), **losses(second_part)}
    expected = losses(straight)
    assert sorted(resumed) == sorted(expected)
    for step, loss in expected.items():
        assert resumed[step] == loss, (step, resumed[step], loss)


def compiled_spec(demo_dir, run_dir, cache, **config) -> dict:
    """A compiled one-layer pretraining run (one layer: less to compile) whose compile cache is ``cache``."""
    return {**pretrain_spec(demo_dir, run_dir, use_compile=True, num_hidden_layers=1, **config),
            "compile_cache": str(cache)}


def run_compiled(spec: dict, folder: Path):
    """``spec`` run by a fresh interpreter, without the inductor settings of the caller's environment."""
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    return run_engine(path, env={k: v for k, v in os.environ.items()
                                 if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))})


@pytest.fixture(scope="session")
def compiled_run(demo_dir):
    """One compiled run (8 steps, a checkpoint at step 4) on an empty compile cache of its own: its folder (``run``,
    ``compile-cache``) and its events, with paths relative to the folder. Made once for every pytest-xdist worker
    (``built_once``): the two tests below share its cold compilation, most of a minute on 2 cores."""
    def build(out):
        rc, events, other = run_compiled(compiled_spec(demo_dir, out / "run", out / "compile-cache", max_steps=8,
                                                       save_interval=4, keep_checkpoints=3), out)
        assert rc == 0, other
        text = json.dumps(events).replace(json.dumps(str(out))[1:-1] + "/", "")
        (out / "events.json").write_text(text)

    # inductor's graphs (and so the cache's keys) depend on the threads a process has: a suite run under
    # pytest-xdist (one thread each) and one without it need a cache each
    folder = built_once("compiled-run", build, os.environ.get("OMP_NUM_THREADS"))
    return folder, json.loads((folder / "events.json").read_text())


@pytest.mark.slow
def test_a_second_compiled_job_with_the_same_shapes_loads_its_graphs_from_the_shared_cache(compiled_run, demo_dir,
                                                                                           tmp_path):
    """Warm starts: the first compiled job fills the shared compile cache (inductor's FX graphs, AOTAutograd's
    forward+backward graphs), the second, a fresh process with the same shapes, loads them instead of compiling;
    both report their time to the first step."""
    folder, events = compiled_run
    cache = tmp_path / "compile-cache"
    shutil.copytree(folder / "compile-cache", cache)  # the shared one stays as the first job left it
    assert any(cache.rglob("*"))  # the cache is the folder the spec named
    rc, warm_events, other = run_compiled(compiled_spec(demo_dir, tmp_path / "warm", cache, max_steps=2), tmp_path)
    assert rc == 0, other
    cold, warm = (next(e for e in ev if e.get("event") == "step")["metrics"] for ev in (events, warm_events))
    assert cold["compile_cache_misses"] > 0 and cold["compile_cache_hits"] == 0, cold
    assert warm["compile_cache_hits"] > 0 and warm["compile_cache_misses"] < cold["compile_cache_misses"], warm
    assert cold["time_to_first_step_s"] > 0 and warm["time_to_first_step_s"] > 0


@pytest.mark.slow
def test_a_compiled_run_writes_plain_files_and_resumes_without_compiling(compiled_run, make_spec, tmp_path, engine):
    """MiniMind's trainers cannot resume a --use_compile 1 run (minimind#701: the compiled wrapper's `_orig_mod.`
    keys). The engine saves the model itself, so a compiled run's checkpoint resumes with or without compiling and
    its .pth loads strictly into Qwen3ForCausalLM."""
    folder, compiled = compiled_run
    assert any("torch.compile enabled" in e.get("message", "") for e in compiled)
    checkpoint = folder / "run" / "checkpoints" / "step-0000004.pt"
    assert not any("_orig_mod" in k for k in torch.load(checkpoint, weights_only=False)["model"])
    done = compiled[-1]
    Qwen3ForCausalLM(hf_config(done["model_config"])).load_state_dict(
        torch.load(folder / done["model_path"], weights_only=True), strict=True)
    spec_path = make_spec("eager", max_steps=8, save_interval=4, num_hidden_layers=1)
    (tmp_path / "eager" / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, tmp_path / "eager" / "checkpoints" / "resume.pt")
    spec_path.write_text(json.dumps({**json.loads(spec_path.read_text()), "resume": True}))
    rc, resumed, other = engine(spec_path)
    assert rc == 0, other
    assert next(e for e in resumed if e["event"] == "start")["resumed_from_step"] == 4
    after = losses(resumed)
    assert sorted(after) == [5, 6, 7, 8]
    for step, loss in after.items():  # the same run: compiled and eager kernels differ only in rounding
        assert loss == pytest.approx(losses(compiled)[step], rel=1e-3), step


def test_resumed_with_half_the_batch_and_twice_the_accumulation_the_run_goes_on_as_before(make_spec, tmp_path,
                                                                                            engine):
    """The out-of-memory retry: the checkpoint of step 6 resumed with batch 8 × accumulation 2 instead of 16 × 1
    continues at the same row with the same optimizer batches, so the losses are those of the run that went on."""
    rc, straight, other = engine(make_spec("straight", max_steps=12, save_interval=6, keep_checkpoints=3))
    assert rc == 0, other
    start = next(e for e in straight if e["event"] == "start")
    assert start["samples"] > 12 * 16 and start["steps_per_epoch"] > 12  # one epoch: no short last step
    spec_path = make_spec("halved", max_steps=12, save_interval=6, batch_size=8, accumulation_steps=2)
    (tmp_path / "halved" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "straight" / "checkpoints" / "step-0000006.pt",
                tmp_path / "halved" / "checkpoints" / "resume.pt")
    spec = json.loads(spec_path.read_text())
    spec_path.write_text(json.dumps({**spec, "resume": True}))
    rc, resumed, other = engine(spec_path)
    assert rc == 0, other
    assert any("batch size 16 → 8" in e.get("message", "") for e in resumed)
    assert next(e for e in resumed if e["event"] == "start")["resumed_from_step"] == 6
    after = losses(resumed)
    assert sorted(after) == list(range(7, 13))
    for step, loss in after.items():
        assert loss == pytest.approx(losses(straight)[step], rel=1e-4), step
    ck = torch.load(tmp_path / "halved" / "checkpoints" / "resume.pt", weights_only=False)
    assert (ck["step"], ck["micro"], ck["config"]["batch_size"]) == (12, 24, 8)


def test_bad_spec_gives_one_line_error_naming_the_field(make_spec):
    rc, events, _ = run_engine(make_spec(batch_sise=3))
    assert rc == 2
    assert events[-1]["event"] == "error" and events[-1]["field"] == "batch_sise"
    # explained as a template and its parameters, the field's problem nested (the portal translates both)
    assert events[-1]["template"] == "%(field)s: %(problem)s"
    assert events[-1]["params"] == {"field": "batch_sise", "problem": ["unknown config key", {}]}


def test_unknown_compile_mode_is_refused_naming_the_field(make_spec):
    rc, events, _ = run_engine(make_spec(use_compile=True, compile_mode="fastest"))
    assert rc == 2
    assert events[-1]["field"] == "compile_mode" and "reduce-overhead" in events[-1]["message"]


def test_bad_dataset_line_is_named(make_spec, tmp_path, engine):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    spec_path = make_spec(max_steps=2)
    spec = json.loads(spec_path.read_text())
    spec["dataset"] = str(bad)
    spec_path.write_text(json.dumps(spec))
    rc, events, _ = engine(spec_path)
    assert rc == 1
    assert events[-1]["event"] == "error" and "line 2" in events[-1]["message"]
    assert events[-1]["template"] == "dataset line %(line)s: %(problem)s"
    assert events[-1]["params"] == {"line": 2, "problem": ["missing field 'text'", {}]}


def test_out_of_memory_while_training_fails_with_a_hint_for_a_smaller_batch(make_spec, tmp_path, capsys,
                                                                             monkeypatch):
    """What CUDA raises when a batch does not fit (torch.OutOfMemoryError), raised here from the first loss."""
    # Every stage first, as the engine imports them: those that take pretrain's loss keep the real one.
    from training import distill, dpo, evaluate, grpo, lora, ppo, pretrain, sft  # noqa: F401

    def no_room(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "79.19 GiB of which 1.06 GiB is free.")

    monkeypatch.setattr(pretrain, "lm_loss", no_room)
    rc, events = run_inprocess(json.loads(make_spec(max_steps=2).read_text()), tmp_path, capsys)
    assert rc == 1 and events[-1]["event"] == "error" and events[-1]["kind"] == "out_of_memory"
    assert events[-1]["message"].startswith("out of memory: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "smaller batch_size" in events[-1]["message"]
    # the same, as an English template and its parameters, for the portal to show in the reader's language
    assert events[-1]["template"] % events[-1]["params"] == events[-1]["message"]
    assert events[-1]["params"] == {"error": "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                             "capacity of 79.19 GiB of which 1.06 GiB is free."}


def test_a_diverging_run_stops_with_an_explained_error_and_valid_json(make_spec, tmp_path, capsys):
    """A learning rate no model survives: the weights overflow, the loss turns NaN, and the job stops saying what to
    change instead of holding its device; every line it wrote is JSON (NaN is not: it is sent as null)."""
    spec = json.loads(make_spec(learning_rate=1e30, grad_clip=1e30, max_steps=20, log_interval=1).read_text())
    path = tmp_path / "diverge.json"
    path.write_text(json.dumps(spec))
    from training.__main__ import main

    capsys.readouterr()
    rc = main(["run", str(path)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]

    def refuse(name):
        raise AssertionError(f"{name} in an event line")

    events = [json.loads(line, parse_constant=refuse) for line in lines]
    error = events[-1]
    assert rc == 1 and error["event"] == "error" and error["kind"] == "diverged", events[-3:]
    assert error["params"]["loss"] == "nan" and error["params"]["lr"] == "1e+30" and error["params"]["step"] < 20
    assert error["template"] % error["params"] == error["message"] and "lower learning_rate" in error["message"]
    assert any(e["event"] == "step" and e["metrics"]["grad_norm"] is None for e in events)  # NaN sent as null


def test_a_model_too_large_for_memory_fails_with_one_line(make_spec):
    """A real allocation failure: a 2 TiB embedding (refused at once unless the kernel overcommits everything)."""
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("this kernel grants any allocation (vm.overcommit_memory=1)")
    rc, events, other = run_engine(make_spec(vocab_size=2**33, max_steps=1))
    assert rc == 1 and events[-1]["kind"] == "out_of_memory", other[-5:]
    assert "can't allocate memory" in events[-1]["message"] and "choose a smaller model" in events[-1]["message"]
    assert "\n" not in events[-1]["message"]


def test_engine_runs_alone_in_a_fresh_interpreter_without_django():
    code = ("import sys, training.__main__, training.loop, training.pretrain, training.model; "
            "assert not any(m == 'django' or m.startswith('django.') for m in sys.modules), 'django imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_config_defaults_and_derived_sizes():
    cfg = resolve_config("pretrain", {})
    assert (cfg["batch_size"], cfg["learning_rate"], cfg["accumulation_steps"], cfg["max_seq_len"]) == (32, 5e-4, 8, 340)
    mcfg = model_config(cfg)
    assert mcfg["intermediate_size"] == 2432
    from training.spec import parameter_count

    assert parameter_count(mcfg)["total"] == 63_912_192  # MiniMind-3 dense, as the reference counts it



def test_bad_sft_record_is_named_by_line(demo_dir, tmp_path, engine):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"conversations": [{"role": "user", "content": "no answer"}]}\n')
    spec = {"stage": "sft", "run_dir": str(tmp_path / "r"), "dataset": str(bad),
            "tokenizer": str(demo_dir / "demo-tokenizer"), "device": "cpu", "config": {"max_steps": 1}}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(spec))
    rc, events, _ = engine(path)
    assert rc == 1 and "line 2" in events[-1]["message"] and "assistant" in events[-1]["message"]


def test_checkpoints_rotate_keeping_the_last_and_the_best(tmp_path):
    from training.loop import write_checkpoint

    for step, loss in ((10, 3.0), (20, 1.0), (30, 2.0), (40, 2.5), (50, None)):
        write_checkpoint(tmp_path, {"step": step}, step, loss, keep=2)
    kept = sorted(p.name for p in tmp_path.glob("step-*.pt"))
    assert kept == ["step-0000020.pt", "step-0000040.pt", "step-0000050.pt"]  # best (20) + last two
    assert (tmp_path / "resume.pt").resolve().name == "step-0000050.pt"
    index = json.loads((tmp_path / "index.json").read_text())
    assert [(e["step"], e["best"]) for e in index] == [(20, True), (40, False), (50, False)]


def test_a_run_killed_while_writing_the_checkpoint_index_resumes(tmp_path, monkeypatch):
    """A kill in the middle of writing index.json (a process SIGKILLed at the worst moment; seen in CI: the resumed
    run failed on an empty index) leaves the previous index whole, and the next checkpoint is written."""
    from pathlib import Path

    from training.loop import write_checkpoint

    write_checkpoint(tmp_path, {"step": 10}, 10, 3.0, keep=2)
    write_text = Path.write_text

    def killed(self, text, *args, **kwargs):
        write_text(self, text[:len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, {"step": 20}, 20, 2.0, keep=2)
    monkeypatch.setattr(Path, "write_text", write_text)
    assert [e["step"] for e in json.loads((tmp_path / "index.json").read_text())] == [10]
    (tmp_path / "step-0000025.tmp").write_bytes(b"half a checkpoint")  # a kill inside torch.save
    write_checkpoint(tmp_path, {"step": 30}, 30, 1.0, keep=2)  # the resumed run's next checkpoint
    # step 20's checkpoint was whole (renamed into place), only unlisted: it is listed and rotated like the others,
    # never left on disk for ever; the half-written one is removed
    assert [e["step"] for e in json.loads((tmp_path / "index.json").read_text())] == [20, 30]
    write_checkpoint(tmp_path, {"step": 40}, 40, 2.0, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000030.pt", "step-0000040.pt"]


def test_a_second_file_is_the_eval_split(make_spec, demo_dir, tmp_path, engine):
    """With eval_dataset the whole dataset trains and the eval loss comes from the other file."""
    held_out = tmp_path / "held-out.jsonl"
    lines = (demo_dir / "demo-pretrain.jsonl").read_text().splitlines()
    held_out.write_text("\n".join(lines[:40]) + "\n")
    path = make_spec(max_steps=4, eval_interval=2)
    spec = json.loads(path.read_text())
    spec["eval_dataset"] = str(held_out)
    path.write_text(json.dumps(spec))
    rc, events, other = engine(path)
    assert rc == 0, other
    start = next(e for e in events if e["event"] == "start")
    _, split_events, _ = engine(make_spec("split", max_steps=1))
    split_start = next(e for e in split_events if e["event"] == "start")
    assert start["samples"] > split_start["samples"]  # nothing held out of the training data
    assert start["eval_samples"] > 0 and [e["step"] for e in events if e["event"] == "eval"] == [2, 4]
    spec["eval_dataset"] = str(tmp_path / "missing.jsonl")
    path.write_text(json.dumps(spec))
    rc, events, other = engine(path)
    assert rc == 2 and "eval_dataset" in (other[-1] if other else json.dumps(events[-1]))


def _pretrain_in_process(spec_path, capsys, **train_args) -> list[dict]:
    """``training.loop.train`` on a tiny pretraining spec in this process (so that a test can hand it its own loss_fn
    or save_fn); returns the events it printed."""
    from training import pretrain
    from training.chat import load_hf_tokenizer
    from training.loop import train
    from training.model import build_model
    from training.spec import load_spec, model_config

    spec = load_spec(spec_path)
    torch.manual_seed(0)
    tok = load_hf_tokenizer(spec["tokenizer"])
    train_args.setdefault("loss_fn", pretrain.lm_loss)
    train(spec, build_model(model_config(spec["config"])), pretrain.load_rows(spec, tok), **train_args)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_eval_loss_is_computed_without_gradients_in_eval_mode(make_spec, capsys):
    """Training batches build a graph in train mode; the eval batches (up to 20 per eval) neither build one nor run
    in train mode, so a compiled job compiles nothing for them and they cost no activation memory."""
    from training.pretrain import lm_loss

    seen = []

    def loss_fn(m, batch):
        seen.append((m.training, torch.is_grad_enabled()))
        return lm_loss(m, batch)

    events = _pretrain_in_process(make_spec(max_steps=3, eval_ratio=0.2, save_interval=2), capsys, loss_fn=loss_fn)
    assert [e["step"] for e in events if e["event"] == "eval"] == [2, 3]
    assert set(seen) == {(True, True), (False, False)}  # training: train mode with grad; eval: neither
    assert seen.count((True, True)) == 3  # one micro-batch per step


def test_tokens_per_s_leaves_out_the_time_of_evals_and_checkpoints(make_spec, capsys):
    """A slow checkpoint (a busy disk) is not a dip in the throughput chart: each interval's tokens/s counts the
    training's own time."""
    import time

    from training.loop import default_save

    def slow_save(model, run_dir):
        time.sleep(1.5)
        return default_save(model, run_dir)

    events = _pretrain_in_process(make_spec(max_steps=8, save_interval=4, eval_ratio=0.1), capsys, save_fn=slow_save)
    rates = {e["step"]: e["metrics"]["tokens_per_s"] for e in events if e["event"] == "step"}
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [4, 8]
    # step 5's interval began with step 4's 1.5 s save; a tiny model's step takes milliseconds
    assert rates[5] > 0.3 * min(rates[3], rates[6]), rates
