"""GGUF exports run in llama.cpp (llama-cpp-python): same logits and greedy tokens as ours, quantised files measured by
perplexity; the Ollama Modelfile's Go template renders our chat format; the transformers-4.57 layout of MoE exports
loads in a real transformers 4.57."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from .conftest import ARCH, ROOT
from .test_registry_tools import _cli, _random_model


def _check_report(report, types):
    v = report["verification"]
    assert v["ok"] and v["max_abs_diff"] <= v["tolerance"], v
    assert v["greedy_match"] and v["tokenizer_match"] and v["greedy_tokens"] == 16
    assert set(report["files"]) == set(types)
    for t, info in report["files"].items():
        assert os.path.getsize(info["path"]) == info["bytes"] > 0
        assert info["tokens"] > 0 and info["perplexity"] > 1
    return {t: info["perplexity"] for t, info in report["files"].items()}


def test_dense_gguf_matches_ours_in_llama_cpp_and_quantised_files_keep_the_perplexity(trained, demo_dir, tmp_path):
    from training.gguf_export import export_gguf

    types = ("f16", "bf16", "q8_0", "q4_k_m")
    report = export_gguf(trained["pretrain"], ARCH, tmp_path / "g", demo_dir / "demo-tokenizer", types=types,
                         eval_data=demo_dir / "demo-pretrain.jsonl")
    ppl = _check_report(report, types)
    # a trained model: its eval perplexity is far below the vocabulary's 6400, and the lossy types stay near f16
    assert ppl["f16"] < 1000
    assert abs(ppl["bf16"] / ppl["f16"] - 1) < 0.02 and abs(ppl["q8_0"] / ppl["f16"] - 1) < 0.02
    assert abs(ppl["q4_k_m"] / ppl["f16"] - 1) < 0.25
    sizes = {t: info["bytes"] for t, info in report["files"].items()}
    assert sizes["q8_0"] < 0.7 * sizes["f16"] and sizes["q4_k_m"] < sizes["q8_0"]
    modelfile = (tmp_path / "g" / "minimind-q8_0.Modelfile").read_text()
    assert modelfile.startswith("FROM ./minimind-q8_0.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_moe_gguf_matches_ours_in_llama_cpp(tmp_path, demo_dir, capsys):
    pth, cfg = _random_model(tmp_path, moe=True)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    rc, report = _cli(capsys, "convert", "gguf", pth, tmp_path / "g", "--config", tmp_path / "cfg.json",
                      "--tokenizer", demo_dir / "demo-tokenizer", "--types", "f16,q8_0",
                      "--eval-data", demo_dir / "demo-pretrain.jsonl", "--name", "tiny-moe")
    assert rc == 0, report
    _check_report(report, ("f16", "q8_0"))
    assert report["config"]["use_moe"] and (tmp_path / "g" / "tiny-moe-f16.gguf").exists()


def test_gguf_refuses_what_llama_cpp_cannot_take_before_converting(tmp_path, capsys):
    from training.gguf_export import support

    assert not support(ARCH, has_tokenizer=False)["f16"]["available"]
    odd = support({**ARCH, "hidden_size": 72, "num_attention_heads": 8}, True)  # head size 9
    assert not odd["q8_0"]["available"] and "even head size" in odd["q8_0"]["note"]
    notes = support(ARCH, True)
    assert all(v["available"] for v in notes.values())
    assert notes["q8_0"]["note"] == "" and notes["q4_k_m"]["params"] == {"sizes": "hidden_size 64", "block": 256}
    assert "rows of hidden_size 64 are not a multiple of 256" in notes["q4_k_m"]["note"]
    pth, cfg = _random_model(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    rc, out = _cli(capsys, "convert", "gguf", pth, tmp_path / "g", "--config", tmp_path / "cfg.json",
                   "--types", "q3_k")
    assert rc == 2 and "'q3_k' is not one of f16, bf16, q8_0, q4_k_m" in out["error"]


GO_RENDER = """package main

import (
\t"encoding/json"
\t"os"
\t"text/template"
)

type Message struct {
\tRole     string
\tContent  string
\tThinking string
}

func main() {
\tvar data struct{ Messages []Message }
\tjson.NewDecoder(os.Stdin).Decode(&data)
\tsrc, _ := os.ReadFile(os.Args[1])
\ttemplate.Must(template.New("m").Parse(string(src))).Execute(os.Stdout, data)
}
"""


def test_ollama_modelfile_template_renders_our_chat_format_for_two_turns(demo_dir, tmp_path):
    """Ollama's TEMPLATE is a Go text/template over .Messages: rendered by Go's own text/template (what Ollama
    runs), it must give what our Jinja chat template gives with the generation prompt."""
    import re

    from training.chat import load_hf_tokenizer
    from training.gguf_export import modelfile

    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI"):
            pytest.fail("Go is needed to render the Modelfile's template (.ci/run installs golang-go)")
        pytest.skip("no Go toolchain (apt-get install golang-go)")
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile("m.gguf"), re.S).group(1)
    (tmp_path / "t.tmpl").write_text(template)
    (tmp_path / "render.go").write_text(GO_RENDER)
    messages = [{"role": "system", "content": "You are MiniMind."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello. How can I help?"},
                {"role": "user", "content": "你好，讲个笑话"}]
    go_data = {"Messages": [{"Role": m["role"], "Content": m["content"], "Thinking": ""} for m in messages]}
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"),
           "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    out = subprocess.run([go, "run", str(tmp_path / "render.go"), str(tmp_path / "t.tmpl")], input=json.dumps(go_data),
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    ours = load_hf_tokenizer(str(demo_dir / "demo-tokenizer")).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert out.stdout == ours


def test_moe_hf_export_in_the_transformers_4_layout_loads_in_transformers_4_57(tmp_path, demo_dir):
    from training.convert import export_hf
    from training.model import load_model

    old = ROOT / ".venv" / "transformers4"
    if not (old / ".installed").exists():
        pytest.fail("transformers 4.57 is missing: `make test` installs it into .venv/transformers4")
    pth, cfg = _random_model(tmp_path, moe=True)
    report = export_hf(pth, cfg, tmp_path / "hf4", demo_dir / "demo-tokenizer", layout="transformers4")
    assert report["verification"]["ok"]  # transformers 5 loads this layout too (it fuses the experts on load)
    code = ("import json, sys, torch, transformers\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
            "AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "x = torch.tensor(json.loads(sys.argv[2]))\n"
            "print(json.dumps({'version': transformers.__version__, 'experts': m.config.num_experts,\n"
            "                  'logits': m(input_ids=x).logits[0].tolist()}))\n")
    from training.convert import verify_prompt

    x = verify_prompt(cfg.get("vocab_size", 6400))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hf4"), json.dumps(x.tolist())],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(old), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["version"] == "4.57.6" and got["experts"] == 4
    ours, _ = load_model({"path": str(pth), "config": cfg})
    with torch.no_grad():
        expected = ours.float().eval()(input_ids=x).logits[0]
    assert float((torch.tensor(got["logits"]) - expected).abs().max()) < 1e-4
