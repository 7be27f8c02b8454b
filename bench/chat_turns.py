"""A classmate's chat behind one member's many, as JSON: how long a member's one question waits for its first token
while another member's script has several long chats at the node's generation worker (one turn at a time,
``CHAT_BATCH=1``; ``Turns``: the user whose last turn began longest ago goes next), with the real worker
(``python -m training chat-worker``) and a random model of MiniMind-3's shape (768 wide, 8 layers; greedy, so every
chat runs to its ``max_tokens``). The first-come-first-served reference was measured beside it while the turns were
the web process's (bench/results/, docs/performance.md); the turns are the worker's now, with no such order to
switch to.

    python bench/chat_turns.py                          # 6 chats of 128 tokens by one member, then one by another
    python bench/chat_turns.py --chats 8 --tokens 256 --rounds 2

``wait_s``: from the second member's request to its first token; ``all_s``: until every chat is done.
"""
import argparse
import asyncio
import json
import os
import time

from fresh_portal import fresh_portal, minimind3_chat_model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chats", type=int, default=6, help="the first member's chats, sent at once")
    p.add_argument("--tokens", type=int, default=128, help="each chat's max_tokens")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    home = fresh_portal("minicloud-chat-turns-")
    from django.conf import settings

    from models_registry.inference import ChatWorker, worker_env

    settings.CHAT_REQUESTS_PER_USER, settings.CHAT_BATCH = args.chats, 1
    entry = minimind3_chat_model(home)

    def request(text):
        return {"model": entry, "messages": [{"role": "user", "content": text}], "max_new_tokens": args.tokens,
                "temperature": 0, "top_p": 1, "thinking": False, "seed": None}

    async def chat(worker, who, text, first):
        asked = time.perf_counter()
        async for msg in worker.stream(request(text), who):
            if ("content" in msg or msg.get("done")) and who not in first:
                first[who] = time.perf_counter() - asked

    async def one_round(worker):
        first = {}
        start = time.perf_counter()
        many = [asyncio.create_task(chat(worker, "member1", f"question {n}", {})) for n in range(args.chats)]
        await asyncio.sleep(0.5)  # the first member's first chat is generating
        await asyncio.gather(chat(worker, "member2", "a classmate's question", first), *many)
        return first["member2"], time.perf_counter() - start

    async def run():
        out = {"bench": "chat_turns", "chats": args.chats, "tokens": args.tokens, "cpus": os.cpu_count(),
               "worker_threads": int(worker_env()["OMP_NUM_THREADS"]), "runs": []}
        worker = ChatWorker()
        try:
            async for _ in worker.stream(request("warm up: load the model"), "warm"):
                pass
            for rnd in range(args.rounds):
                wait, total = await one_round(worker)
                out["runs"].append({"round": rnd, "wait_s": round(wait, 2), "all_s": round(total, 2)})
        finally:
            await worker.aclose()
        out["wait_s"] = round(sum(r["wait_s"] for r in out["runs"]) / len(out["runs"]), 2)
        return out

    print(json.dumps(asyncio.run(run())))


if __name__ == "__main__":
    main()
