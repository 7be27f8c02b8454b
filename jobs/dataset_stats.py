"""Token statistics of a dataset with a chosen tokenizer, in one streaming pass (run as a background task).

Record length in tokens as the engine sees it, exact where a token cache gives it (``known_lengths``), else counted
here: pretrain text + bos/eos (exact); a conversation as the chat template renders it, estimated (each message's
content plus its frame ``<|im_start|>role\\n … <|im_end|>\\n`` and an answer's think block in this tokenizer's
tokens; empty think blocks and drawn system prompts not counted); a DPO row is its longer side; an RL record is its
prompt (the messages before the last, and the generation prompt), as the RL stages encode it. Uses the
``tokenizers`` library only (no torch in the portal).
"""
from __future__ import annotations

import functools
from array import array

import numpy as np

from training.records import loads

from .validation import open_text

# The language shares' scripts as ranges of code points, [start, end): Chinese (CJK ideographs: extension A, the
# unified block, the compatibility block) and Latin (ASCII letters, Latin-1 to Latin Extended-B).
_CHINESE = ((0x3400, 0x4DC0), (0x4E00, 0xA000), (0xF900, 0xFB00))
_LATIN = ((0x41, 0x5B), (0x61, 0x7B), (0xC0, 0x250))
_BOUNDS = np.array(sorted(b for r in _CHINESE + _LATIN for b in r), dtype=np.uint32)
# the class of each interval between bounds (searchsorted's index): 0 other, 1 Chinese, 2 Latin
_CLASS = np.zeros(len(_BOUNDS) + 1, dtype=np.intp)
for _class, _ranges in ((1, _CHINESE), (2, _LATIN)):
    for _start, _end in _ranges:
        _CLASS[int(np.searchsorted(_BOUNDS, _start, side="right"))] = _class


def _framing(tok):
    """``(frame, generation, think)``: the tokens of the chat template's frame around a message of a role
    (``<|im_start|>role\\n`` … ``<|im_end|>\\n``, ChatML as MiniMind's template writes it), of an RL prompt's
    generation prompt (``<|im_start|>assistant\\n<think>\\n``: thinking opened, the RL stages' default) and of the think
    block around an answer's reasoning, counted with ``tok`` (a small vocabulary spells ``assistant`` in several
    tokens). An answer without reasoning is counted without its empty think block, which SFT drops by default."""
    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    end = count("<|im_end|>\n")
    frame = functools.cache(lambda role: count(f"<|im_start|>{role}\n") + end)
    return frame, count("<|im_start|>assistant\n<think>\n"), count("<think>\n") + count("\n</think>\n\n")


def _pieces(kind: str, rec, framing) -> list[tuple[list[str], int]]:
    """The rows a record becomes: (texts to encode, framing tokens)."""
    if kind == "pretrain":
        return [([rec.get("text", "")], 2)]
    if kind == "dpo":
        sides = [rec.get("chosen", []), rec.get("rejected", [])]
    elif kind == "rlaif":  # the prompt the model answers: the conversation before its placeholder answer
        sides = [rec.get("conversations", [])[:-1]]
    else:
        sides = [rec.get("conversations", [])]
    frame, generation, think = framing
    rows = []
    for msgs in sides:
        texts, tokens = [], generation if kind == "rlaif" else 0
        for m in msgs:
            reasoning = str(m.get("reasoning_content") or "")
            tools = str(m.get("tool_calls") or "") + str(m.get("tools") or "")
            texts += [reasoning, str(m.get("content") or ""), tools]
            tokens += frame(str(m.get("role"))) + (think if reasoning and m.get("role") == "assistant" else 0)
        rows.append((texts, tokens))
    return rows


def letters(text: str) -> tuple[int, int, int]:
    """(Chinese, Latin, other) characters of ``text``, spaces not counted: its code points classed by ``_BOUNDS`` at
    once (a regular expression's scan, character by character, took two thirds of the statistics' pass). JSON may
    spell a lone surrogate, which is "other"."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    _, chinese, latin = np.bincount(_CLASS[np.searchsorted(_BOUNDS, codes, side="right")], minlength=3)
    return int(chinese), int(latin), len(codes) - int(chinese) - int(latin) - text.count(" ")


def compute(path, kind: str, tokenizer_file: str, max_seq_len: int, total_records: int = 0, progress=None,
            batch: int = 512, known_lengths=None) -> dict:
    """``known_lengths``: each record's token count from a job's token cache of this dataset and tokenizer (exact, as
    the engine trains it); the file is then read for the language shares only, nothing is tokenised."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_truncation()  # a saved tokenizer may carry a truncation or padding setting; lengths must be real
    tok.no_padding()
    lengths = array("I")
    shares = {"chinese": 0, "latin": 0, "other": 0}
    pending: list[tuple[int, list[tuple[list[str], int]]]] = []
    first_rows: list[str] = []  # the pending records' text of their first row, for the language shares
    framing = _framing(tok)
    long_lines: list[int] = []  # the first 100 records longer than max_seq_len, by line

    def flush():
        if known_lengths is not None:
            found = [int(known_lengths[len(lengths) + i]) for i in range(len(pending))]
        else:
            flat = [t for _, rows in pending for texts, _ in rows for t in texts]
            counts = iter(len(e.ids) for e in tok.encode_batch(flat, add_special_tokens=False)) if flat else iter(())
            found = [max(frame + sum(next(counts) for _ in texts) for texts, frame in rows) for _, rows in pending]
        for key, n in zip(shares, letters("".join(first_rows))):
            shares[key] += n
        first_rows.clear()
        for (lineno, _), length in zip(pending, found):
            lengths.append(length)
            if length > max_seq_len and len(long_lines) < 100:
                long_lines.append(lineno)
        pending.clear()
        if progress and total_records:
            progress(min(len(lengths) / total_records, 1.0))

    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = loads(line)
            pieces = _pieces(kind, rec, framing)
            pending.append((lineno, pieces))
            first_rows.extend(pieces[0][0])
            if len(pending) >= batch:
                flush()
    flush()
    n = len(lengths)
    ordered = sorted(lengths)
    top = max(ordered[-1] if ordered else 0, max_seq_len)
    width = max(-(-top // 40), 1)
    counts = [0] * (-(-top // width) + 1)
    for value in lengths:
        counts[value // width] += 1
    chars = sum(shares.values()) or 1
    return {
        "records": n, "max_seq_len": max_seq_len, "total_tokens": int(sum(lengths)),
        "mean_tokens": round(sum(lengths) / n, 1) if n else 0,
        "p50_tokens": ordered[n // 2] if n else 0, "p95_tokens": ordered[min(int(n * 0.95), n - 1)] if n else 0,
        "max_tokens": ordered[-1] if n else 0,
        "truncated_share": round(sum(1 for v in lengths if v > max_seq_len) / n, 4) if n else 0.0,
        "truncated_records": sum(1 for v in lengths if v > max_seq_len), "truncated_lines": long_lines,
        "histogram": {"bin_width": width, "starts": [i * width for i in range(len(counts))], "counts": counts},
        "language": {k: round(v / chars, 4) for k, v in shares.items()},
    }
