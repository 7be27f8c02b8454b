"""A class of thirty asking at once through the OpenAI-compatible API, as JSON: a real web node (`serve --web`, its
web processes and their generation workers, the SQLite default) holds a model of MiniMind-3's shape (768 wide, 8
layers, random weights, imported through the API and made public); thirty members of a class each stream one chat of
``--tokens`` tokens from POST /v1/chat/completions at the same moment (temperature 1, a seed each). Each member's
first token and last token are timed at the client; the tokens come from each stream's closing usage. The node runs
with ``MINICLOUD_CHAT_BATCH`` 1 (one chat at a time, the reference: every worker before the batching), or with
``--previous WORKTREE`` the previous commit's node (at ``--previous-batch``), and with this tree's ``--batch``,
alternately, each on a fresh node.

    python bench/chat_class.py                        # 30 users x 128 tokens, 2 rounds
    python bench/chat_class.py --users 30 --tokens 64 --rounds 1
    python bench/chat_class.py --previous /tmp/prev --batch 32
    python bench/chat_class.py --previous /tmp/prev --models 10   # each member chats with one of ten models

With ``--models N`` the node holds N such models (each its own file, as a class's own fine-tuned models are) and
member n chats with model n mod N; the class asks twice (``again``: the same chats a second time), nothing loaded
before the first, so the figures include the models' loads: ``model_loads`` (the worker's count, where it keeps one).

Per run: ``all_s`` until every reply is done, ``tokens_per_s`` (all replies' tokens over ``all_s``), ``first_p50_s`` /
``first_p95_s`` / ``first_max_s`` (from the request to its first token), ``done_p50_s`` / ``done_max_s``, ``errors``
(answers other than 200), the node's ``web_processes`` and ``worker_cpu_s`` (the CPU-seconds each generation worker
used: one per web process that had a chat before the node's one worker, a sign of how evenly the chats fell).
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def stream_chat(node, token, model, n, tokens, start, out):
    """One member's streamed chat: (first token s, last token s, completion tokens) or the error status."""
    body = json.dumps({"model": model, "stream": True, "max_tokens": tokens, "temperature": 1.0, "top_p": 1,
                       "seed": n, "messages": [{"role": "user", "content": f"question {n}: what is {n} + {n}?"}]})
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=600)
    first = usage = None
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {token}",
                                                            "Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            out[n] = {"error": resp.status}
            return
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            usage = chunk.get("usage") or usage
        out[n] = {"first": first, "done": time.perf_counter() - start, "tokens": (usage or {}).get(
            "completion_tokens", 0)}
    finally:
        conn.close()


def measure(args, batch: int) -> dict:
    if args.tree:  # another tree's node (the previous commit's), driven by this script
        sys.path[:0] = [args.tree, str(Path(args.tree) / "bench")]
    from fresh_portal import minimind3_pth
    from portal_load import class_accounts
    from tests.live import LiveNode

    home = Path(tempfile.mkdtemp(prefix="minicloud-chat-class-"))
    node = LiveNode(home)
    node.args = ["--web"]
    node.env["MINICLOUD_CHAT_BATCH"] = str(batch)
    node.start()
    try:
        node.token = node.token_for("admin", "e2e-admin-password")
        pth = home / "minimind3.pth"
        mcfg = minimind3_pth(pth)
        _, toks = node.request("GET", "/api/v1/tokenizers")
        demo = next(t for t in toks["tokenizers"] if t["name"] == "demo-tokenizer")
        models = []
        for m in range(args.models or 1):
            status, mv = node.upload("/api/v1/models/import", {"name": f"class-model-{m}", "config": json.dumps(mcfg),
                                                               "tokenizer": demo["id"]},
                                     {"file": ("minimind3.pth", pth.read_bytes())})
            assert status == 201, mv
            status, shared = node.request("POST", f"/api/v1/models/{mv['id']}/share", {"visibility": "public"})
            assert status == 200, shared
            models.append(f"{mv['name']}:v{mv['version']}")
        tokens = class_accounts(node, args.users)  # Django is set up on the node's database from here on
        from django.conf import settings

        processes = settings.WEB_PROCESSES  # read from the same environment as the node's
        if not args.models:  # each web process's worker loads the model on its first chat: not the class's wait
            warm = {}
            for i in range(3 * processes):
                stream_chat(node, tokens[i % len(tokens)], models[0], 1000 + i, 2, time.perf_counter(), warm)
        runs = {}
        for name in ("first", "again") if args.models else ("first",):
            out: dict = {}
            cpu_before = chat_worker_cpu()
            start = time.perf_counter()
            threads = [threading.Thread(target=stream_chat, args=(node, tokens[n], models[n % len(models)], n,
                                                                  args.tokens, start, out))
                       for n in range(args.users)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            total = time.perf_counter() - start
            workers = chat_worker_cpu()
            workers = sorted(round(cpu - cpu_before.get(pid, 0.0), 1) for pid, cpu in workers.items())
            runs[name] = summary(out, total, workers)
            if args.models:
                runs[name]["model_loads"] = worker_stats().get("model_loads")
    finally:
        node.stop()
        node.drop_database()
    return {"chat_batch": batch, "web_processes": processes, "models": args.models or 1,
            **(runs["first"] if not args.models else runs)}


def summary(out: dict, total: float, workers: list) -> dict:
    ok = [r for r in out.values() if "error" not in r]
    firsts = sorted(r["first"] for r in ok if r["first"] is not None)
    done = sorted(r["done"] for r in ok)
    return {"errors": len(out) - len(ok), "all_s": round(total, 2), "tokens": sum(r["tokens"] for r in ok),
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / total, 1),
            "first_p50_s": round(statistics.median(firsts), 2),
            "first_p95_s": round(firsts[int(0.95 * (len(firsts) - 1))], 2), "first_max_s": round(firsts[-1], 2),
            "done_p50_s": round(statistics.median(done), 2), "done_max_s": round(done[-1], 2),
            "worker_cpu_s": workers}


def worker_stats() -> dict:
    """The node's generation worker's ``stats`` (its socket, named on its command line), {} when unknown. Not
    ``minicloud.metrics.chat_worker_stats``: this process is not the node's, and it may drive an older tree's."""
    import socket

    for _cpu, cmd in chat_workers().values():
        try:
            name = cmd.split("--listen ", 1)[1].split()[0]
        except IndexError:
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect("\0" + name)
            stream = sock.makefile("rb")
            stream.readline()
            sock.sendall(b'{"stats": true}\n')
            return json.loads(stream.readline()).get("stats", {})
    return {}


def chat_workers() -> dict:
    """Each generation worker on this machine (one per web process that had a chat, before the node's one worker):
    the CPU-seconds it used so far and its command line, by process id."""
    from portal_load import _processes

    return {pid: (cpu, cmd) for pid, _parent, cpu, cmd, _name in _processes() if "training chat-worker" in cmd}


def chat_worker_cpu() -> dict:
    return {pid: cpu for pid, (cpu, _cmd) in chat_workers().items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=30)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="this tree's CHAT_BATCH (its default)")
    p.add_argument("--previous", help="a worktree of the previous commit: its node is the reference")
    p.add_argument("--previous-batch", type=int, default=8, help="the previous node's CHAT_BATCH (its default)")
    p.add_argument("--models", type=int, default=0, help="N models, member n chatting with model n mod N; asked "
                   "twice, nothing loaded before")
    p.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # one run with this CHAT_BATCH, in this process
    p.add_argument("--tree", help=argparse.SUPPRESS)  # the tree whose node --measure runs
    args = p.parse_args()
    if args.measure:  # a process of its own: Django here is set up on one node's database
        return print(json.dumps(measure(args, args.measure)))
    out = {"bench": "chat_class", "users": args.users, "tokens": args.tokens, "models": args.models or 1,
           "cpus": os.cpu_count(), "runs": []}
    reference = (("previous", Path(args.previous).resolve(), args.previous_batch) if args.previous
                 else ("batch 1", ROOT, 1))
    new = ("new", ROOT, args.batch)
    for rnd in range(args.rounds):
        for code, tree, batch in ((reference, new) if rnd % 2 == 0 else (new, reference)):
            cmd = [sys.executable, str(ROOT / "bench" / "chat_class.py"), "--measure", str(batch), "--users",
                   str(args.users), "--tokens", str(args.tokens), "--models", str(args.models), "--tree", str(tree)]
            line = subprocess.run(cmd, cwd=tree, check=True, capture_output=True, text=True).stdout
            out["runs"].append({"round": rnd, "code": code, **json.loads(line.strip().splitlines()[-1])})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
