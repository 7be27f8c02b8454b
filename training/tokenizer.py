"""Byte-level BPE tokenizer training with MiniMind's reserved-token layout and chat template.

ids 0/1/2 = <|endoftext|> (pad, unk) / <|im_start|> (bos) / <|im_end|> (eos), then MiniMind's other reserved tokens
(36 in all), so models trained on it stay interchangeable with MiniMind's files.
"""
from __future__ import annotations

import json
from pathlib import Path

RESERVED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
            "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>", "<tool_call>", "</tool_call>",
            "<tool_response>", "</tool_response>", "<think>", "</think>"] + [f"<|buffer{i}|>" for i in range(1, 10)]
N_SPECIAL = 21  # ids 0..20 are flagged special (skipped when decoding); 21..35 are not
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAT_TEMPLATE = (Path(__file__).with_name("chat_template.jinja")).read_text(encoding="utf-8")


def train_tokenizer(texts, out_dir: str | Path, vocab_size: int = 6400) -> Path:
    """Train on an iterable of strings and write tokenizer.json + tokenizer_config.json to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=RESERVED, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    for i, name in enumerate(RESERVED):
        assert tok.token_to_id(name) == i, f"reserved token {name} must have id {i}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    # Mark ids 21..35 as non-special, as MiniMind's tokenizer.json does.
    data = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for entry in data["added_tokens"]:
        entry["special"] = entry["id"] < N_SPECIAL
    (out_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), ensure_ascii=False, indent=2),
                                                   encoding="utf-8")
    return out_dir


def tokenizer_config() -> dict:
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": i < N_SPECIAL} for i, t in enumerate(RESERVED)}
    return {
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": added, "additional_special_tokens": RESERVED[1:N_SPECIAL],
        "bos_token": RESERVED[BOS_ID], "eos_token": RESERVED[EOS_ID], "pad_token": RESERVED[PAD_ID],
        "unk_token": RESERVED[PAD_ID], "clean_up_tokenization_spaces": False, "legacy": True,
        "model_max_length": 131072, "spaces_between_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast", "extra_special_tokens": {}, "chat_template": CHAT_TEMPLATE,
    }


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a folder holding tokenizer.json (or the file itself)."""
    from tokenizers import Tokenizer

    path = Path(path)
    return Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
