"""A dataset's token statistics at real sizes, as JSON: the previous way (the worker tokenises the messages' text,
estimating the chat template's framing; the first job then tokenises the whole file again for its token cache) beside
this tree's (``jobs.services.statistics``: the engine builds the token cache that a job with the default options
reads, and the statistics take its exact lengths; the first job finds the cache). Each part in a fresh interpreter,
alternately, with the same tokenizer; the file is in the page cache for all.

    git worktree add /tmp/previous 86ec35a        # the code before (never committed anywhere else)
    python bench/dataset_stats.py --previous /tmp/previous                 # a 500 MB SFT file, the demo tokenizer
    python bench/dataset_stats.py --previous /tmp/previous --mb 200 --tokenizer /tmp/minimind/model

The file: MiniMind-sized conversations (``training.demo_data.write_sized``, no download). ``stats_s``: the statistics'
wall time; ``first_job_s``: the first SFT job's data preparation with the default options (``token_cache.prepare``:
the whole tokenising before, a reuse now). Both ways must count the same records.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PREVIOUS = """
import json, sys, time
from jobs import dataset_stats
t = time.perf_counter()
s = dataset_stats.compute(sys.argv[1], "sft", sys.argv[2] + "/tokenizer.json", 768)
print(json.dumps({"stats_s": round(time.perf_counter() - t, 2), "records": s["records"],
                  "mean_tokens": s["mean_tokens"], "exact": False}))
"""

NEW = """
import json, sys, time
from types import SimpleNamespace
import django
django.setup()
from jobs import dataset_stats
from jobs.services import statistics
from training import token_cache
path, tok, sha = sys.argv[1:4]
t = time.perf_counter()
cache = statistics._build_token_cache(SimpleNamespace(pk=0, path=path, sha256=sha), SimpleNamespace(path=tok), "sft",
                                      lambda p: None)
built = time.perf_counter() - t
s = dataset_stats.compute(path, "sft", tok + "/tokenizer.json", 768, known_lengths=token_cache.record_lengths(cache))
print(json.dumps({"stats_s": round(time.perf_counter() - t, 2), "build_s": round(built, 2), "records": s["records"],
                  "mean_tokens": s["mean_tokens"], "exact": True}))
"""

FIRST_JOB = """
import json, sys, time
from pathlib import Path
from training import spec as tspec, token_cache
from training.chat import load_hf_tokenizer
path, tok, sha, root = sys.argv[1:5]
options = token_cache.processing_options("sft", tspec.defaults_for("sft"))
t = time.perf_counter()
token_cache.prepare(path, load_hf_tokenizer(tok), tok, "sft", options, Path(root), data_sha=sha)
print(json.dumps({"first_job_s": round(time.perf_counter() - t, 2)}))
"""


def run(tree: Path, code: str, home: Path, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "MINICLOUD_HOME": str(home),
           "DJANGO_SETTINGS_MODULE": "minicloud.settings"}
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=tree, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    from training.demo_data import write_sized
    from training.token_cache import file_sha256

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--previous", required=True, help="a checkout of the code before (git worktree)")
    p.add_argument("--mb", type=float, default=500)
    p.add_argument("--tokenizer", default=str(ROOT / "var" / "demo" / "demo-tokenizer"))
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    home = Path(tempfile.mkdtemp(prefix="minicloud-stats-"))
    path = home / "sft.jsonl"
    made = write_sized(path, "sft", int(args.mb * 1e6))
    sha = file_sha256(path)
    out = {"bench": "dataset_stats", "mb": round(made["bytes"] / 1e6, 1), "records": made["records"],
           "cpus": len(os.sched_getaffinity(0)), "tokenizer": Path(args.tokenizer).name}
    trees = [("previous", Path(args.previous).resolve()), ("new", ROOT)]
    runs = []
    for rnd in range(args.rounds):
        for name, tree in (trees if rnd % 2 == 0 else trees[::-1]):
            shutil.rmtree(home / "cache", ignore_errors=True)
            path.read_bytes()
            row = run(tree, PREVIOUS if name == "previous" else NEW, home, path, args.tokenizer, sha)
            row.update(run(ROOT, FIRST_JOB, home, path, args.tokenizer, sha, home / "cache" / "data"))
            row["total_s"] = round(row["stats_s"] + row["first_job_s"], 2)
            runs.append({"code": name, "round": rnd, **row})
    assert len({r["records"] for r in runs}) == 1, "the two disagree"
    out["runs"] = runs
    print(json.dumps(out))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
