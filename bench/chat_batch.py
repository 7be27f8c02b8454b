"""A class asking at once, as JSON: several users each send one chat to the same web process's generation worker.
The previous worker (one chat at a time, transformers' ``generate``; from a git worktree of the previous commit) beside
this tree's with ``CHAT_BATCH`` 1 (one at a time, its own decoding loop) and with the default 8 (the chats generated
together, one forward pass per token for all), alternately, each in a fresh process, with the real worker
(``python -m training chat-worker``) and a random model of MiniMind-3's shape (768 wide, 8 layers), sampled at
temperature 1 with a seed per user (its text is visible from the first tokens, and an end token is rare: a chat runs
to its ``max_tokens`` nearly always).

    git worktree add /tmp/prev HEAD~1
    python bench/chat_batch.py --previous /tmp/prev                 # 8 users, 128 tokens each, 2 rounds
    python bench/chat_batch.py --previous /tmp/prev --users 16 --tokens 256

Per run: ``all_s`` until every reply is done, ``tokens_per_s`` (all replies' tokens over ``all_s``), ``first_p50_s`` /
``first_max_s`` (from the request to its first token), ``done_p50_s`` / ``done_max_s`` (to its last).
"""
import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(args):
    """One run in this process: the tree this file lies in."""
    from fresh_portal import fresh_portal, minimind3_chat_model

    home = fresh_portal("minicloud-chat-batch-")
    from django.conf import settings

    from models_registry.inference import ChatWorker, worker_env

    settings.CHAT_BATCH = args.batch
    entry = minimind3_chat_model(home)

    def request(text, tokens, seed=0):
        return {"model": entry, "messages": [{"role": "user", "content": text}], "max_new_tokens": tokens,
                "temperature": 1.0, "top_p": 1, "thinking": False, "seed": seed}

    async def chat(worker, n, start):
        first = tokens = None
        async for msg in worker.stream(request(f"question {n}: what is {n} + {n}?", args.tokens, n), f"user{n}"):
            if first is None and ("content" in msg or msg.get("done")):
                first = time.perf_counter() - start
            if msg.get("done"):
                tokens = msg["usage"]["completion_tokens"]
        return first, time.perf_counter() - start, tokens

    async def run():
        worker = ChatWorker()
        try:
            async for _ in worker.stream(request("warm up: load the model", 4), "warm"):
                pass
            start = time.perf_counter()
            got = await asyncio.gather(*(chat(worker, n, start) for n in range(args.users)))
            total = time.perf_counter() - start
        finally:
            await worker.aclose()
        first, done, tokens = zip(*got)
        return {"all_s": round(total, 2), "tokens": sum(tokens), "tokens_per_s": round(sum(tokens) / total, 1),
                "first_p50_s": round(statistics.median(first), 2), "first_max_s": round(max(first), 2),
                "done_p50_s": round(statistics.median(done), 2), "done_max_s": round(max(done), 2),
                "worker_threads": int(worker_env()["OMP_NUM_THREADS"])}

    print(json.dumps(asyncio.run(run())))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--previous", help="a worktree of the previous commit (its worker is the reference)")
    p.add_argument("--users", type=int, default=8, help="users, one chat each, sent at once")
    p.add_argument("--tokens", type=int, default=128, help="each chat's max_tokens")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="this tree's CHAT_BATCH for the batched runs")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one run, in this process
    args = p.parse_args()
    if args.measure:
        return measure(args)
    codes = [("new, one at a time", HERE, 1), (f"new, {args.batch} together", HERE, args.batch)]
    if args.previous:  # the previous tree has no copy of this benchmark: it runs one beside its code
        bench = Path(args.previous).resolve() / "bench"
        for name in ("chat_batch.py", "fresh_portal.py"):
            shutil.copy(HERE / name, bench / name)
        codes.insert(0, ("previous", bench, 1))
    out = {"bench": "chat_batch", "users": args.users, "tokens": args.tokens, "cpus": os.cpu_count(), "runs": []}
    for rnd in range(args.rounds):
        for code, bench, batch in (codes if rnd % 2 == 0 else codes[::-1]):
            cmd = [sys.executable, str(bench / "chat_batch.py"), "--measure", "--users", str(args.users),
                   "--tokens", str(args.tokens), "--batch", str(batch)]
            line = subprocess.run(cmd, cwd=bench.parent, check=True, capture_output=True, text=True).stdout
            out["runs"].append({"code": code, "round": rnd, **json.loads(line.strip().splitlines()[-1])})
    for code, _, _ in codes:
        rates = [r["tokens_per_s"] for r in out["runs"] if r["code"] == code]
        out[f"{code}: tokens_per_s"] = round(sum(rates) / len(rates), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
