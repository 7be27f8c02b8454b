"""Every supervised stage on tiny models: it learns, its losses match hand-computed values, files interoperate."""
import json
import math
import subprocess
import sys

import pytest
import torch

from training import distill, dpo
from training.chat import encode_conversations, load_hf_tokenizer, sequence_logps
from training.generate import heldout_tasks, task_accuracy
from training.model import load_model

from .conftest import ARCH, ROOT, TINY, losses, run_inprocess, run_torchrun


def spec_for(stage, demo_dir, tmp_path, data, **extra):
    config = extra.pop("config", {})
    return {"stage": stage, "run_dir": str(tmp_path / stage), "dataset": str(demo_dir / f"{data}.jsonl"),
            "tokenizer": str(demo_dir / "demo-tokenizer"), "device": "cpu", "config": {**TINY, **config}, **extra}


def test_sft_answers_heldout_questions_more_often(trained, demo_dir):
    tok = load_hf_tokenizer(demo_dir / "demo-tokenizer")
    tasks = heldout_tasks(100)
    before = task_accuracy(load_model({"path": trained["pretrain"], "config": ARCH})[0], tok, tasks)
    after = task_accuracy(load_model({"path": trained["sft"], "config": ARCH})[0], tok, tasks)
    assert after > before + 0.05, (before, after)


def test_sft_labels_cover_exactly_the_assistant_spans(demo_dir):
    tok = load_hf_tokenizer(demo_dir / "demo-tokenizer")
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A1", "reasoning_content": "R"}, {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "", "tool_calls": '[{"name": "f", "arguments": {"x": 1}}]'}]
    x, y = encode_conversations(tok, [conv], 128)
    trained_text = tok.decode([t for t in y[0].tolist() if t != -100])
    assert trained_text == ('<think>\nR\n</think>\n\nA1<|im_end|>\n'
                            '<think>\n\n</think>\n\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
                            '<|im_end|>\n')
    assert "Q" not in trained_text and "S" not in trained_text


def test_lora_learns_and_exports_minimind_layout_and_merges(trained, demo_dir, tmp_path, capsys):
    spec = spec_for("lora", demo_dir, tmp_path, "demo-sft", base_model={"path": trained["pretrain"], "config": ARCH},
                    config={"max_steps": 60, "log_interval": 5})
    rc, events = run_inprocess(spec, tmp_path, capsys)
    assert rc == 0, events[-1]
    start = next(e for e in events if e["event"] == "start")
    # MiniMind's default: rank 16 on q_proj and o_proj of each layer (hidden 64 → 16·(64+64) per adapter).
    assert start["trainable"] == 2 * 2 * 16 * (64 + 64)
    curve = losses(events)
    assert curve[max(curve)] < 0.8 * curve[1]
    done = events[-1]
    lora = torch.load(done["lora_path"], weights_only=True)
    assert sorted(lora) == sorted(f"model.layers.{i}.self_attn.{p}_proj.lora.{ab}.weight"
                                  for i in range(2) for p in ("q", "o") for ab in ("A", "B"))
    assert lora["model.layers.0.self_attn.q_proj.lora.A.weight"].shape == (16, 64)
    assert lora["model.layers.0.self_attn.q_proj.lora.B.weight"].shape == (64, 16)
    base = torch.load(trained["pretrain"], weights_only=True)
    merged = torch.load(done["model_path"], weights_only=True)
    assert sorted(merged) == sorted(base)
    key = "model.layers.1.self_attn.o_proj"
    expected = base[f"{key}.weight"].float() + lora[f"{key}.lora.B.weight"].float() @ lora[f"{key}.lora.A.weight"].float()
    assert torch.allclose(merged[f"{key}.weight"].float(), expected, atol=2e-3)
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    from peft import PeftModel

    PeftModel.from_pretrained(load_model({"path": trained["pretrain"], "config": ARCH})[0], done["adapter_path"])


def _margin(model_path, tok, recs):
    model = load_model({"path": model_path, "config": ARCH})[0].eval()
    xc, yc = encode_conversations(tok, [r["chosen"] for r in recs], 64)
    xr, yr = encode_conversations(tok, [r["rejected"] for r in recs], 64)
    with torch.no_grad():
        return (sequence_logps(model(input_ids=xc).logits, yc) - sequence_logps(model(input_ids=xr).logits, yr)).mean()


def test_dpo_raises_chosen_minus_rejected_margin(trained, demo_dir, tmp_path, capsys):
    spec = spec_for("dpo", demo_dir, tmp_path, "demo-dpo", base_model={"path": trained["sft"], "config": ARCH},
                    config={"max_steps": 40, "batch_size": 8, "learning_rate": 1e-3, "log_interval": 10})
    rc, events = run_inprocess(spec, tmp_path, capsys)
    assert rc == 0, events[-1]
    tok = load_hf_tokenizer(demo_dir / "demo-tokenizer")
    recs = [json.loads(line) for line in (demo_dir / "demo-dpo.jsonl").read_text().splitlines()[-50:]]
    assert _margin(events[-1]["model_path"], tok, recs) > _margin(trained["sft"], tok, recs) + 1.0
    steps = [e for e in events if e["event"] == "step"]
    assert steps[-1]["metrics"]["dpo_loss"] < steps[0]["metrics"]["dpo_loss"] < 0.7


def test_dpo_loss_equals_hand_computed_value():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -2.0])
    beta = 0.15
    by_hand = [-math.log(1 / (1 + math.exp(-beta * ((a - b) - (c - d)))))
               for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    assert dpo.dpo_loss(pc, pr, rc, rr, beta).item() == pytest.approx(sum(by_hand) / 2, rel=1e-6)


def test_sequence_logps_sum_only_labelled_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]]))
    labels = torch.tensor([[-100, 1, 2]])  # position 0's prediction targets label 1, position 1's targets 2
    assert sequence_logps(logits, labels).item() == pytest.approx(math.log(0.25) + math.log(0.1), rel=1e-6)


def test_distill_kl_equals_hand_computed_value():
    s = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]])
    t = torch.tensor([[[2.0, 1.0, 0.0], [1.0, 1.0, 5.0]]])
    mask = torch.tensor([[True, False]])
    temp = 1.5

    def softmax(v):
        e = [math.exp(a / temp) for a in v]
        return [a / sum(e) for a in e]

    ps, pt = softmax([1.0, 2.0, 0.5]), softmax([2.0, 1.0, 0.0])
    by_hand = sum(q * math.log(q / p) for p, q in zip(ps, pt)) * temp**2
    assert distill.distill_kl(s, t, mask, temp).item() == pytest.approx(by_hand, rel=1e-5)


def test_distill_student_of_another_size_learns_from_a_moe_teacher(demo_dir, tmp_path, capsys):
    teacher_cfg = {**ARCH, "use_moe": True}
    from training.model import build_model, save_pth
    from training.spec import model_config, resolve_config

    teacher = build_model(model_config(resolve_config("pretrain", teacher_cfg)))
    save_pth(teacher, tmp_path / "teacher.pth")
    spec = spec_for("distill", demo_dir, tmp_path, "demo-sft",
                    teacher_model={"path": str(tmp_path / "teacher.pth"), "config": teacher_cfg},
                    config={"hidden_size": 32, "max_steps": 40, "log_interval": 5})
    rc, events = run_inprocess(spec, tmp_path, capsys)
    assert rc == 0, events[-1]
    steps = [e["metrics"] for e in events if e["event"] == "step"]
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"] and steps[0]["distill"] > 0
    assert events[-1]["model_config"]["hidden_size"] == 32


def test_moe_pretrain_learns_with_minimind_aux_loss(demo_dir, tmp_path, capsys):
    spec = spec_for("pretrain", demo_dir, tmp_path, "demo-pretrain", config={"use_moe": True, "max_steps": 60,
                                                                             "log_interval": 5})
    rc, events = run_inprocess(spec, tmp_path, capsys)
    assert rc == 0, events[-1]
    steps = [e["metrics"] for e in events if e["event"] == "step"]
    assert steps[-1]["logits_loss"] < 0.6 * steps[0]["logits_loss"]
    # MiniMind's coefficient 5e-4 summed over 2 layers, E·Σ f·P ≈ 1 when balanced → about 1e-3.
    assert 5e-4 < steps[0]["aux_loss"] < 5e-3
    assert steps[0]["loss"] == pytest.approx(steps[0]["logits_loss"] + steps[0]["aux_loss"], rel=1e-5)
    sd = torch.load(events[-1]["model_path"], weights_only=True)
    assert len(sd) == 3 + 2 * (8 + 1 + 4 * 3)  # MiniMind's MoE layout: per-expert keys
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in sd and "model.layers.0.mlp.gate.weight" in sd


def test_minimind3_parameter_counts():
    from training.spec import model_config, parameter_count, resolve_config

    assert parameter_count(model_config(resolve_config("pretrain", {}))) == {"total": 63_912_192,
                                                                           "active": 63_912_192}
    assert parameter_count(model_config(resolve_config("pretrain", {"use_moe": True}))) == {
        "total": 198_416_640, "active": 63_936_768}


@pytest.mark.parametrize("moe", [False, True])
def test_pth_to_hf_folder_to_pth_round_trip_keeps_logits(moe, demo_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from training.convert import hf_to_pth, pth_to_hf
    from training.model import build_model, save_pth
    from training.spec import model_config, resolve_config

    cfg = {**ARCH, "use_moe": moe}
    torch.manual_seed(0)
    model = build_model(model_config(resolve_config("pretrain", cfg)))
    save_pth(model, tmp_path / "a.pth")
    folder = pth_to_hf(tmp_path / "a.pth", cfg, tmp_path / "hf", demo_dir / "demo-tokenizer")
    mcfg = hf_to_pth(folder, tmp_path / "b.pth")
    a, b = torch.load(tmp_path / "a.pth", weights_only=True), torch.load(tmp_path / "b.pth", weights_only=True)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(3, 300, (2, 12))
    ours = load_model({"path": str(tmp_path / "a.pth"), "config": cfg})[0].eval()
    back = load_model({"path": str(tmp_path / "b.pth"), "config": mcfg})[0].eval()
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        la, lb, lh = ours(input_ids=x).logits, back(input_ids=x).logits, hf(input_ids=x).logits
    assert torch.equal(la, lb)
    assert torch.allclose(la, lh, atol=1e-5)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2


def test_checkpoint_mismatch_names_the_keys(tmp_path):
    from training.model import build_model, load_pth, save_pth
    from training.spec import model_config, resolve_config

    model = build_model(model_config(resolve_config("pretrain", ARCH)))
    save_pth(model, tmp_path / "m.pth")
    bigger = build_model(model_config(resolve_config("pretrain", {**ARCH, "num_hidden_layers": 3})))
    with pytest.raises(ValueError, match=r"missing keys: model\.layers\.2\."):
        load_pth(bigger, tmp_path / "m.pth")
    wider = build_model(model_config(resolve_config("pretrain", {**ARCH, "hidden_size": 128})))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_pth(wider, tmp_path / "m.pth")


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(demo_dir, tmp_path):
    results = {}
    for n in (1, 2):
        spec = spec_for("pretrain", demo_dir, tmp_path / f"w{n}", "demo-pretrain",
                        config={"batch_size": 8 // n, "max_steps": 8, "eval_ratio": 0, "log_interval": 4})
        (tmp_path / f"w{n}").mkdir()
        path = tmp_path / f"w{n}.json"
        path.write_text(json.dumps(spec))
        proc = run_torchrun(path) if n == 2 else subprocess.run(
            [sys.executable, "-m", "training", "run", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert sum(e["event"] == "done" for e in events) == 1  # only rank 0 writes events
        results[n] = torch.load(tmp_path / f"w{n}" / "pretrain" / "checkpoints" / "resume.pt",
                                weights_only=False)["model"]
    assert max((results[1][k] - results[2][k]).abs().max().item() for k in results[1]) < 1e-4


def test_only_rank_0_reports_but_any_rank_reports_its_failure(monkeypatch, capsys):
    from training import events

    monkeypatch.setenv("RANK", "1")
    events.log("rank 1 speaks")
    events.emit("step", step=1)
    events.emit("error", kind="out_of_memory", message="out of memory: CUDA out of memory")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["event"], e["rank"], e["kind"]) for e in lines] == [("error", 1, "out_of_memory")]


def test_a_bad_spec_is_reported_once_not_by_every_rank(monkeypatch, capsys, tmp_path):
    from training.__main__ import main

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"stage": "pretrain", "config": {"batch_sise": 3}}))
    monkeypatch.setenv("RANK", "1")
    assert main(["run", str(path)]) == 2 and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["run", str(path)]) == 2
    assert json.loads(capsys.readouterr().out)["kind"] == "spec"


def test_trimming_right_padding_leaves_the_loss_unchanged(demo_dir):
    from training.loop import trim_padding
    from training.pretrain import lm_loss
    from training.model import build_model
    from training.spec import model_config, resolve_config

    tok = load_hf_tokenizer(demo_dir / "demo-tokenizer")
    convs = [json.loads(line)["conversations"] for line in (demo_dir / "demo-sft.jsonl").read_text().splitlines()[:8]]
    x, y = encode_conversations(tok, convs, 96)
    trimmed = trim_padding({"x": x, "y": y})
    assert trimmed["x"].shape[1] < 96 and trimmed["x"].shape == trimmed["y"].shape
    torch.manual_seed(0)
    model = build_model(model_config(resolve_config("pretrain", ARCH))).eval()
    with torch.no_grad():
        full, _ = lm_loss(model, {"x": x, "y": y})
        short, _ = lm_loss(model, trimmed)
    assert short.item() == pytest.approx(full.item(), abs=1e-5)


def test_resume_on_another_process_count_keeps_the_data_position(demo_dir, tmp_path):
    spec = spec_for("pretrain", demo_dir, tmp_path, "demo-pretrain",
                    config={"batch_size": 4, "max_steps": 6, "eval_ratio": 0, "log_interval": 1})
    path = tmp_path / "s.json"
    path.write_text(json.dumps(spec))
    two = run_torchrun(path)
    assert two.returncode == 0, two.stderr[-2000:]
    ck = torch.load(tmp_path / "pretrain" / "checkpoints" / "resume.pt", weights_only=False)
    assert (ck["step"], ck["micro"], ck["world_size"]) == (6, 6, 2)
    spec["resume"], spec["config"]["max_steps"] = True, 9
    path.write_text(json.dumps(spec))
    one = subprocess.run([sys.executable, "-m", "training", "run", str(path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    events = [json.loads(line) for line in one.stdout.splitlines() if line.startswith("{")]
    assert any("GPU count 2 → 1" in e.get("message", "") for e in events)
    assert next(e for e in events if e["event"] == "start")["resumed_from_step"] == 6
    ck = torch.load(tmp_path / "pretrain" / "checkpoints" / "resume.pt", weights_only=False)
    assert (ck["step"], ck["micro"], ck["world_size"]) == (9, 12 + 3, 1)  # 6 global batches of 8 rows = 12 of 4
