"""Deterministic demo datasets in MiniMind's JSONL schemas (no downloads).

The content is small, regular and verifiable so a tiny model visibly learns it on a CPU in minutes: arithmetic,
unit conversion, copying and reversing words, and templated sentences, in English and Chinese.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

DEMO_KINDS = {"demo-pretrain": "pretrain", "demo-sft": "sft", "demo-dpo": "dpo", "demo-rlaif": "rlaif"}

WORDS = ["apple", "river", "stone", "cloud", "tiger", "green", "paper", "light", "music", "horse", "bread", "ocean",
         "chair", "plant", "robot", "smile", "train", "water", "zebra", "candle"]
ZH_WORDS = ["苹果", "河流", "石头", "白云", "老虎", "绿色", "纸张", "光明", "音乐", "骏马", "面包", "海洋"]
ANIMALS = [("cat", "猫"), ("dog", "狗"), ("bird", "鸟"), ("fish", "鱼"), ("horse", "马")]
PLACES = [("garden", "花园"), ("house", "房子"), ("forest", "森林"), ("river", "河"), ("park", "公园")]
UNITS = [("kilometres", "metres", 1000, "千米", "米"), ("metres", "centimetres", 100, "米", "厘米"),
         ("kilograms", "grams", 1000, "千克", "克"), ("hours", "minutes", 60, "小时", "分钟"),
         ("minutes", "seconds", 60, "分钟", "秒")]


def _task(rng: random.Random) -> tuple[str, str, str]:
    """One verifiable task: (question, short answer, full answer sentence)."""
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return f"What is {a} plus {b}?", str(a + b), f"{a} plus {b} is {a + b}."
    if kind == 1:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return f"{a} 加 {b} 等于多少？", str(a + b), f"{a} 加 {b} 等于 {a + b}。"
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"What is {a} times {b}?", str(a * b), f"{a} times {b} is {a * b}."
    if kind == 3:
        big, small, factor, zbig, zsmall = rng.choice(UNITS)
        n = rng.randint(1, 9)
        if rng.random() < 0.5:
            return (f"How many {small} are in {n} {big}?", str(n * factor), f"{n} {big} is {n * factor} {small}.")
        return f"{n} {zbig}等于多少{zsmall}？", str(n * factor), f"{n} {zbig}等于 {n * factor} {zsmall}。"
    if kind == 4:
        w = rng.choice(WORDS)
        return f"Reverse the word {w}.", w[::-1], f"The word {w} reversed is {w[::-1]}."
    if kind == 5:
        w = rng.choice(WORDS)
        return f"Copy the word {w} twice.", f"{w} {w}", f"{w} {w}"
    w = rng.choice(ZH_WORDS)
    return f"把“{w}”重复两遍。", w + w, f"{w}{w}"


def _wrong(answer: str, rng: random.Random) -> str:
    if answer.isdigit():
        return str(int(answer) + rng.choice([-3, -2, -1, 1, 2, 3]) if int(answer) > 3 else int(answer) + rng.randint(1, 4))
    return answer[::-1] if answer[::-1] != answer else answer + answer[-1]


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        (a, za), (p, zp) = rng.choice(ANIMALS), rng.choice(PLACES)
        return f"The {a} is in the {p}." if rng.random() < 0.5 else f"{za}在{zp}里。"
    if kind == 1:
        _, _, full = _task(rng)
        return full
    if kind == 2:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return f"{a} plus {b} is {a + b}, and {b} plus {a} is {a + b}."
    w = rng.choice(WORDS)
    return f"The word {w} has {len(w)} letters: {' '.join(w)}."


def pretrain_records(n: int, rng: random.Random):
    for _ in range(n):
        yield {"text": " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))}


def sft_records(n: int, rng: random.Random):
    for _ in range(n):
        q, _, full = _task(rng)
        yield {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": full}]}


def dpo_records(n: int, rng: random.Random):
    for _ in range(n):
        q, short, full = _task(rng)
        wrong = full.replace(short, _wrong(short, rng)) if short in full else _wrong(full, rng)
        prompt = [{"role": "user", "content": q}]
        yield {"chosen": prompt + [{"role": "assistant", "content": full}],
               "rejected": prompt + [{"role": "assistant", "content": wrong}]}


def rlaif_records(n: int, rng: random.Random):
    for _ in range(n):
        q, short, _ = _task(rng)
        yield {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": "n/a"}],
               "gt": [short]}


GENERATORS = {"demo-pretrain": (pretrain_records, 6000), "demo-sft": (sft_records, 3000),
              "demo-dpo": (dpo_records, 1000), "demo-rlaif": (rlaif_records, 500)}


def write_demo_datasets(out_dir: str | Path, seed: int = 1234) -> dict[str, Path]:
    """Write the four demo datasets as ``{name}.jsonl`` under ``out_dir``; same seed → same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (name, (gen, n)) in enumerate(GENERATORS.items()):
        rng = random.Random(seed * 100 + i)
        path = out_dir / f"{name}.jsonl"
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for rec in gen(n, rng):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        tmp.replace(path)
        paths[name] = path
    return paths


def iter_texts(path: str | Path):
    """Every text in a JSONL dataset of any kind, ``.jsonl`` or ``.jsonl.gz`` (for tokenizer training)."""
    from .records import iter_records

    for _, rec in iter_records(path):
        if isinstance(rec, dict):
            if "text" in rec:
                yield rec["text"]
            for key in ("conversations", "chosen", "rejected"):
                for msg in rec.get(key, []):
                    if isinstance(msg, dict) and msg.get("content"):
                        yield msg["content"]


def _paragraph(rng: random.Random, chars: int) -> str:
    parts, n = [], 0
    while n < chars:
        s = _sentence(rng)
        parts.append(s)
        n += len(s) + 1
    return " ".join(parts)


def write_sized(path: str | Path, kind: str, size_bytes: int, seed: int = 7, gz: bool = False) -> dict:
    """A MiniMind-format ``pretrain`` or ``sft`` file of about ``size_bytes`` (``.jsonl``, or gzip-compressed),
    with records of MiniMind's sizes: pretraining texts of ~1.3 KB (pretrain_hq.jsonl: 1.6 GB in ~1.2 M records),
    conversations of 1-3 turns with ~150-600 characters per answer (sft_mini_512.jsonl). For benchmarks and the
    memory tests: ``{"records", "bytes"}``."""
    import gzip

    rng = random.Random(seed)
    path = Path(path)
    records = written = 0
    opener = (lambda p: gzip.open(p, "wt", encoding="utf-8", compresslevel=1)) if gz else \
        (lambda p: open(p, "w", encoding="utf-8"))
    with opener(path) as f:
        while written < size_bytes:
            if kind == "pretrain":
                rec = {"text": _paragraph(rng, rng.randint(600, 2000))}
            else:
                msgs = []
                for _ in range(rng.randint(1, 3)):
                    q, _, full = _task(rng)
                    msgs += [{"role": "user", "content": q},
                             {"role": "assistant", "content": full + " " + _paragraph(rng, rng.randint(150, 600))}]
                rec = {"conversations": msgs}
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            records += 1
    return {"records": records, "bytes": path.stat().st_size}
