"""An upload's check at real sizes, as JSON: the previous validation (a read of the whole file for its sha256, then a
read of its lines, each record's near-duplicate text made by two regular expressions) beside this tree's
``jobs.validation.validate_file`` (one read; the word characters picked by a table), alternately, each in a fresh
interpreter, with the page cache cold (the file dropped from it first) and warm. ``read_mb``: what the process read
from the disk.

    git worktree add /tmp/previous e6a1355        # the code before (never committed anywhere else)
    python bench/dataset_validate.py --previous /tmp/previous                  # a 1 GB SFT file
    python bench/dataset_validate.py --previous /tmp/previous --gb 2 --gzip    # gzipped (level 1)

The file is generated as in bench/dataset_preview.py (MiniMind-sized conversations, no download). Both must report the
same records, sha256 and size.
"""
import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from dataset_preview import drop_cache, generate  # noqa: E402

RUN = """
import json, os, resource, sys, time
import django
django.setup()
from jobs.validation import validate_file
t = time.perf_counter()
r = validate_file(sys.argv[1], "sft")
print(json.dumps({"s": round(time.perf_counter() - t, 2), "records": r.records, "sha256": r.sha256,
                  "size_bytes": r.size_bytes, "ok": r.ok,
                  "read_mb": round(int(open("/proc/self/io").read().split("read_bytes: ")[1].split()[0]) / 1e6)}))
"""


def check(tree: Path, path: Path, home: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "MINICLOUD_HOME": str(home),
           "DJANGO_SETTINGS_MODULE": "minicloud.settings"}
    out = subprocess.run([sys.executable, "-c", RUN, str(path)], cwd=tree, env=env, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--previous", required=True, help="a checkout of the code before (git worktree)")
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--keep", help="the generated file's path (reused when it exists)")
    p.add_argument("--gzip", action="store_true")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    home = Path(tempfile.mkdtemp(prefix="minicloud-validate-"))
    path = Path(args.keep) if args.keep else home / "sft.jsonl"
    out = {"bench": "dataset_validate", "gb": args.gb, "gzip": args.gzip, "cpus": os.cpu_count()}
    if not path.exists():
        generate(path, int(args.gb * 1e9))
    if args.gzip:
        packed = home / "sft.jsonl.gz"
        with open(path, "rb") as src, gzip.open(packed, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        path = packed
    out["file_bytes"] = path.stat().st_size
    trees = {"previous": Path(args.previous).resolve(), "new": ROOT}
    runs = []
    for rnd in range(args.rounds):
        for cache in ("cold", "warm"):
            for name, tree in (trees.items() if rnd % 2 == 0 else reversed(trees.items())):
                if cache == "cold" and not drop_cache(path):
                    continue
                if cache == "warm":
                    path.read_bytes() if path.stat().st_size < 4e9 else None
                t = time.perf_counter()
                row = check(tree, path, home)
                runs.append({"code": name, "cache": cache, "round": rnd, **row,
                             "wall_s": round(time.perf_counter() - t, 2)})
    assert len({(r["records"], r["sha256"], r["size_bytes"]) for r in runs}) == 1, "the two disagree"
    out["records"] = runs[0]["records"]
    out["runs"] = [{k: v for k, v in r.items() if k not in ("sha256", "records", "size_bytes")} for r in runs]
    print(json.dumps(out))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
