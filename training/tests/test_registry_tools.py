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
    from training.chat_worker import Splitter

    s = Splitter(thinking=True)
    assert s.deltas("Let me think</") == {"reasoning": "Let me think"}
    assert s.deltas("Let me think</think>\n\nAnswer") == {"content": "Answer"}
    assert s.deltas("Let me think</think>\n\nAnswer!", final=True) == {"content": "!"}
    assert Splitter(thinking=False).deltas("plain") == {"content": "plain"}


def test_chat_worker_streams_a_reply_and_stops_when_cancelled(demo_dir, tmp_path):
    pth, cfg = _random_model(tmp_path)
    model = {"path": str(pth), "config": cfg, "tokenizer": str(demo_dir / "demo-tokenizer")}
    proc = subprocess.Popen([sys.executable, "-m", "training", "chat-worker"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:  # its share of the cores, from the web process (models_registry/inference.py worker_env)
        assert json.loads(proc.stdout.readline()) == {"ready": True, "threads": 1}

        def ask(**req):
            proc.stdin.write(json.dumps({"model": model, "messages": [{"role": "user", "content": "1+1="}],
                                         **req}) + "\n")
            proc.stdin.flush()

        def answers(rid):
            got = []
            while True:
                msg = json.loads(proc.stdout.readline())
                assert msg["id"] == rid and "error" not in msg, msg
                got.append(msg)
                if msg.get("done"):
                    return got

        ask(id="a", max_new_tokens=6, temperature=0)
        got = answers("a")
        assert got[-1]["finish_reason"] in ("length", "stop") and got[-1]["usage"]["completion_tokens"] <= 6
        assert "".join(m.get("content", "") for m in got)  # a random model: any text
        ask(id="b", max_new_tokens=4000, temperature=1.0, seed=1)
        first = json.loads(proc.stdout.readline())
        assert first["id"] == "b" and not first.get("done")
        proc.stdin.write(json.dumps({"cancel": "b"}) + "\n")
        proc.stdin.flush()
        rest = answers("b")
        assert rest[-1]["finish_reason"] == "cancelled" and rest[-1]["usage"]["completion_tokens"] < 4000
        # a conversation longer than the model's positions is refused, explained, before any prefill
        ask(id="d", max_position_embeddings=32, messages=[{"role": "user", "content": "hello " * 40}])
        refused = json.loads(proc.stdout.readline())
        assert refused["id"] == "d" and refused["params"]["limit"] == 32 and refused["params"]["tokens"] > 32
        assert refused["template"].startswith("the conversation is %(tokens)s tokens long"), refused
        ask(id="e", max_new_tokens=3, temperature=0, max_position_embeddings=32)  # a short one still fits
        assert answers("e")[-1]["usage"]["completion_tokens"] <= 3
        proc.stdin.write(json.dumps({"id": "c", "model": {**model, "path": str(tmp_path / "none.pth")},
                                     "messages": [{"role": "user", "content": "x"}]}) + "\n")
        proc.stdin.flush()
        assert "error" in json.loads(proc.stdout.readline())
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0


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
