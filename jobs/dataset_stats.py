"""Token statistics of a dataset with a chosen tokenizer, in one streaming pass (run as a background task).

Record length in tokens as the engine sees it: pretrain text + bos/eos; conversations as rendered by the chat
template (each message's content plus its 5 framing tokens ``<|im_start|>role\\n … <|im_end|>\\n``); a DPO row is its
longer side. Uses the ``tokenizers`` library only (no torch in the portal).
"""
from __future__ import annotations

import re
from array import array

from training.records import loads

from .validation import open_text

FRAME = 5  # <|im_start|> role \n … <|im_end|> \n
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")


def _pieces(kind: str, rec) -> list[tuple[list[str], int]]:
    """The rows a record becomes: (texts to encode, framing tokens)."""
    if kind == "pretrain":
        return [([rec.get("text", "")], 2)]
    sides = [rec.get("chosen", []), rec.get("rejected", [])] if kind == "dpo" else [rec.get("conversations", [])]
    rows = []
    for msgs in sides:
        texts = []
        for m in msgs:
            texts.append(str(m.get("reasoning_content") or "") + str(m.get("content") or ""))
            texts.append(str(m.get("tool_calls") or "") + str(m.get("tools") or ""))
        rows.append((texts, FRAME * len(msgs)))
    return rows


def compute(path, kind: str, tokenizer_file: str, max_seq_len: int, total_records: int = 0, progress=None,
            batch: int = 512, known_lengths=None) -> dict:
    """``known_lengths``: each record's token count from a job's token cache of this dataset and tokenizer (exact, as
    the engine trains it); the file is then read for the language shares only, nothing is tokenised."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_truncation()  # a saved tokenizer may carry a truncation or padding setting; lengths must be real
    tok.no_padding()
    lengths = array("I")
    letters = {"chinese": 0, "latin": 0, "other": 0}
    pending: list[tuple[int, list[tuple[list[str], int]]]] = []
    long_lines: list[int] = []  # the first 100 records longer than max_seq_len, by line

    def flush():
        if known_lengths is not None:
            found = [int(known_lengths[len(lengths) + i]) for i in range(len(pending))]
        else:
            flat = [t for _, rows in pending for texts, _ in rows for t in texts]
            counts = iter(len(e.ids) for e in tok.encode_batch(flat, add_special_tokens=False)) if flat else iter(())
            found = [max(frame + sum(next(counts) for _ in texts) for texts, frame in rows) for _, rows in pending]
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
            pieces = _pieces(kind, rec)
            pending.append((lineno, pieces))
            text = "".join(t for texts, _ in pieces[:1] for t in texts)
            cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
            letters["chinese"] += cjk
            letters["latin"] += latin
            letters["other"] += max(len(text) - cjk - latin - text.count(" "), 0)
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
    chars = sum(letters.values()) or 1
    return {
        "records": n, "max_seq_len": max_seq_len, "total_tokens": int(sum(lengths)),
        "mean_tokens": round(sum(lengths) / n, 1) if n else 0,
        "p50_tokens": ordered[n // 2] if n else 0, "p95_tokens": ordered[min(int(n * 0.95), n - 1)] if n else 0,
        "max_tokens": ordered[-1] if n else 0,
        "truncated_share": round(sum(1 for v in lengths if v > max_seq_len) / n, 4) if n else 0.0,
        "truncated_records": sum(1 for v in lengths if v > max_seq_len), "truncated_lines": long_lines,
        "histogram": {"bin_width": width, "starts": [i * width for i in range(len(counts))], "counts": counts},
        "language": {k: round(v / chars, 4) for k, v in letters.items()},
    }
