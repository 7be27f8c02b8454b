import json
from pathlib import Path

from training.demo_data import DEMO_KINDS, write_demo_datasets
from training.tokenizer import RESERVED, load_tokenizer

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "minimind-tokenizer"


def test_demo_data_is_deterministic_and_in_minimind_schemas(tmp_path):
    a = write_demo_datasets(tmp_path / "a")
    b = write_demo_datasets(tmp_path / "b")
    for name in DEMO_KINDS:
        assert a[name].read_bytes() == b[name].read_bytes()
    first = {name: json.loads(a[name].read_text().splitlines()[0]) for name in DEMO_KINDS}
    assert isinstance(first["demo-pretrain"]["text"], str)
    assert [m["role"] for m in first["demo-sft"]["conversations"]] == ["user", "assistant"]
    assert first["demo-dpo"]["chosen"][0] == first["demo-dpo"]["rejected"][0]
    assert first["demo-dpo"]["chosen"][1] != first["demo-dpo"]["rejected"][1]
    assert first["demo-rlaif"]["conversations"][-1]["content"] == "n/a" and first["demo-rlaif"]["gt"]


def test_demo_tokenizer_has_minimind_reserved_ids(demo_dir):
    tok = load_tokenizer(demo_dir / "demo-tokenizer")
    for i, name in enumerate(RESERVED):
        assert tok.token_to_id(name) == i
    assert len(RESERVED) == 36
    ids = tok.encode("<|im_start|>assistant\n", add_special_tokens=False).ids
    assert ids[0] == 1
    assert tok.get_vocab_size() <= 6400
    text = "3 加 4 等于 7。 The word apple reversed is elppa."
    assert tok.decode(tok.encode(text).ids) == text


def test_chat_template_renders_like_minimind(demo_dir):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(str(demo_dir / "demo-tokenizer"))
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}]
    expected = ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\nA1<|im_end|>\n")
    assert ours.apply_chat_template(msgs, tokenize=False) == expected
    assert (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id) == (0, 1, 2)
    if REFERENCE.exists():  # MiniMind's own files, for an exact comparison of the template output
        theirs = AutoTokenizer.from_pretrained(str(REFERENCE))
        assert theirs.apply_chat_template(msgs, tokenize=False) == expected
        assert ours.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True) == \
            theirs.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)


def test_train_tokenizer_command_keeps_minimind_layout(demo_dir, tmp_path):
    from training.__main__ import main

    assert main(["train-tokenizer", str(demo_dir / "demo-sft.jsonl"), "--out", str(tmp_path / "tok"),
                 "--vocab-size", "800"]) == 0
    tok = load_tokenizer(tmp_path / "tok")
    assert [tok.token_to_id(t) for t in RESERVED] == list(range(36))
    assert tok.get_vocab_size() <= 800
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>" and config["chat_template"]


def test_lr_schedule_is_minimind_cosine_with_optional_warmup():
    from training.loop import lr_at

    assert lr_at(0, 100, 1e-3, 0) == 1e-3
    assert abs(lr_at(50, 100, 1e-3, 0) - 5.5e-4) < 1e-12
    assert abs(lr_at(100, 100, 1e-3, 0) - 1e-4) < 1e-12
    assert lr_at(0, 100, 1e-3, 10) == 1e-4 and lr_at(9, 100, 1e-3, 10) == 1e-3
