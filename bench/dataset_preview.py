"""A dataset's preview pages at real sizes, as JSON: the previous reader (every line up to the page) beside the sparse
record index (training.records.INDEX_STRIDE), in the same run.

    python bench/dataset_preview.py                    # a 9 GB SFT file, MiniMind-sized conversations
    python bench/dataset_preview.py --gb 1 --keep /tmp/sft-1g.jsonl
    python bench/dataset_preview.py --gb 2 --gzip      # the file gzipped: its seek points (indexed_gzip)

The file is generated (no download): conversations of Chinese and Latin text, 1.5 KB on average (lognormal lengths,
as MiniMind's SFT files), a blank line now and then. Measured: the whole file's validation (the upload's pass, which
now also writes the index: ``jobs.validation.validate_file``), the index of a file stored before indexes
(``token_cache.line_index``'s newline scan, the background build; gzipped, the seek points and a line-by-line
pass), and a page of 10 records at the first page, 10 %,
50 % and the last page, read the previous way (``read_records`` without an index: the previous selector's code) and
from the index -- with the page cache warm (the file just read), and cold where this process may drop it (root).
"""
import argparse
import gzip
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ["模型", "训练", "数据", "语言", "问题", "回答", "学习", "the", "model", "learns", "from", "data", "一个", "我们"]


def generate(path: Path, size: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    vocab = [" ".join(rng.choice(WORDS) for _ in range(64)) for _ in range(256)]  # 64-word pieces, joined below
    written = records = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            chunk = []
            for _ in range(1000):
                n = max(1, int(rng.lognormvariate(1.2, 0.8)))  # pieces of ~300 bytes: ~1.5 KB per record on average
                text = "".join(rng.choice(vocab) for _ in range(n))
                rec = {"conversations": [{"role": "user", "content": text[: len(text) // 3]},
                                         {"role": "assistant", "content": text[len(text) // 3:]}]}
                chunk.append(json.dumps(rec, ensure_ascii=False))
                if rng.random() < 0.001:
                    chunk.append("")
                records += 1
            data = "\n".join(chunk) + "\n"
            f.write(data)
            written += len(data.encode())
    return records


def drop_cache(path) -> bool:
    """Evict the file from the page cache (POSIX_FADV_DONTNEED after a sync); True when it worked."""
    try:
        os.sync()
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return True
    except OSError:
        return False


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=9.0)
    p.add_argument("--keep", help="the generated file's path (reused when it exists)")
    p.add_argument("--repeat", type=int, default=3, help="timings of each indexed page (the median)")
    p.add_argument("--gzip", action="store_true", help="the file gzipped (level 1), read through its seek points")
    args = p.parse_args()
    home = Path(tempfile.mkdtemp(prefix="minicloud-preview-"))
    os.environ.update(MINICLOUD_HOME=str(home), DJANGO_SETTINGS_MODULE="minicloud.settings")
    import django

    django.setup()
    from jobs.validation import validate_file
    from training import records, token_cache

    path = Path(args.keep) if args.keep else home / "sft.jsonl"
    out = {"bench": "dataset_preview", "gb": args.gb, "stride": records.INDEX_STRIDE}
    if not path.exists():
        t = time.perf_counter()
        generate(path, int(args.gb * 1e9))
        out["generate_s"] = round(time.perf_counter() - t, 1)
    if args.gzip:
        packed = home / "sft.jsonl.gz"
        t = time.perf_counter()
        with open(path, "rb") as src, gzip.open(packed, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        out["gzip_s"] = round(time.perf_counter() - t, 1)
        path = packed
    out["file_bytes"] = path.stat().st_size

    t = time.perf_counter()
    report = validate_file(path, "sft")
    out["validate_s"] = round(time.perf_counter() - t, 1)
    assert report.ok, report.summary()
    n = out["records"] = report.records
    index = report.record_index
    t = time.perf_counter()
    if args.gzip:  # a gzip file's seek points (built in the background once it is stored), then its record index
        gzip_index = home / "sft.jsonl.gz.gzidx"
        records.save_gzip_index(path, gzip_index)
        out["gzip_index_build_s"] = round(time.perf_counter() - t, 2)
        out["gzip_index_bytes"] = gzip_index.stat().st_size
        t = time.perf_counter()
        rebuilt = records.record_offsets(path)
    else:
        gzip_index = None
        starts, _ends = token_cache.line_index(path, home / "scratch")
        rebuilt = list(starts[::records.INDEX_STRIDE])
    out["legacy_index_build_s"] = round(time.perf_counter() - t, 2)
    assert list(rebuilt) == index, "the background build and the validation disagree"
    index_file = home / "sft.jsonl.idx.npy"
    records.save_record_index(index_file, index)
    out["index_bytes"] = index_file.stat().st_size

    pages = {"first": 0, "10%": n // 10, "50%": n // 2, "last": max(0, n - 10)}
    out["pages"] = {}
    for cache in ("warm", "cold"):
        for name, offset in pages.items():
            row = out["pages"].setdefault(name, {"offset": offset})
            if cache == "cold" and not drop_cache(path):
                continue
            # the previous reader once (seconds at depth), then the new: loading the index file and reading the page
            t = time.perf_counter()
            before = records.read_records(path, offset, 10)
            row[f"previous_{cache}_s"] = round(time.perf_counter() - t, 4)
            if cache == "cold":
                drop_cache(path)
            repeat = 1 if cache == "cold" else args.repeat
            s, after = timed(lambda: records.read_records(path, offset, 10, records.load_record_index(index_file),
                                                          gzip_index), repeat)
            row[f"indexed_{cache}_s"] = round(s, 5)
            assert before == after and len(after) == min(10, n - offset)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
