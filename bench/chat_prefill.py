"""A long conversation arriving while a class chats, as JSON: what the chats already streaming go through while its
prompt is read. The previous worker (a git worktree of the previous commit: a new chat's prompt read in one piece)
beside this tree's (``PREFILL_CHUNK`` prompt tokens read between two decoding steps), alternately, each in a fresh
process. Each run drives the worker's own ``Chats`` as its main loop does (new requests taken, then one step), with
one thread as the worker gets beside three web processes on two cores, a random model of MiniMind-3's shape (768
wide, 8 layers) and its chats sampled at temperature 1 with a seed each; every token's time is taken when the chat
chooses it (a random model's tokens are often pieces of a character, so the text deltas a client sees would not
count them).

    git worktree add /tmp/prev HEAD~1
    python bench/chat_prefill.py --previous /tmp/prev              # 7 chats streaming, a 3,000-token conversation
    python bench/chat_prefill.py --previous /tmp/prev --prompt-tokens 8000

Per run: ``stall_max_s`` (the longest wait of a streaming chat for its next token while the long prompt was read),
``stall_p50_s`` (each streaming chat's longest wait, their median), ``streamed_meanwhile`` (the tokens the streaming
chats got while it was read), ``long_first_s`` (from the long conversation's arrival to its first token),
``long_prompt_tokens``, ``late_first_s`` (a short question that comes ``--late`` seconds after the long
conversation: from then to its first token), ``all_s`` (until every reply is done) and ``tokens_per_s`` (all
replies' tokens over it).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def long_conversation(tok, tokens: int) -> tuple[list[dict], int]:
    """A conversation of several turns, at least ``tokens`` tokens long once templated, as a long chat is; and its
    length in tokens."""
    turns = []
    while True:
        text = " ".join(f"step {len(turns) + i} of the plan, checked against the notes" for i in range(6))
        turns += [{"role": "user", "content": f"What about this part? {text}"},
                  {"role": "assistant", "content": f"It holds, because {text}."}]
        messages = turns + [{"role": "user", "content": "So what is the summary?"}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        length = len(tok(prompt, add_special_tokens=False)["input_ids"])
        if length >= tokens:
            return messages, length


def measure(args):
    """One run in this process: the worker code of the tree this file lies in."""
    from fresh_portal import fresh_portal, minimind3_chat_model

    home = fresh_portal("minicloud-chat-prefill-")
    entry = minimind3_chat_model(home)
    import torch

    try:  # the generation apart from the worker's connections and turns since the node's one worker
        from training import chat_batch as chat_worker
        from training.chat_worker import Conn
    except ImportError:
        from training import chat_worker
        Conn = getattr(chat_worker, "Conn", None)
    from training.chat import load_hf_tokenizer

    torch.set_num_threads(1)
    chat_worker.send = lambda obj: None  # a tree before the worker answered on connections (Conn)
    quiet = (Conn(lambda data: None),) if Conn else ()
    arrivals: dict[str, list[float]] = {}  # each chat's token times
    take = chat_worker.Chat.take

    def timed_take(chat, logits):
        going = take(chat, logits)
        arrivals.setdefault(chat.rid, []).append(time.perf_counter())
        return going

    chat_worker.Chat.take = timed_take

    def request(rid, messages, tokens, seed):
        return {"id": rid, "model": entry, "messages": messages, "max_new_tokens": tokens, "temperature": 1.0,
                "top_p": 1, "seed": seed}

    def busy(chats):
        return bool(chats.batches or chats.waiting or getattr(chats, "reading", None)
                    or getattr(chats, "loading", None))

    chats = chat_worker.Chats()

    def submit(req):
        chats.take(req, threading.Event(), *quiet)

    submit(request("warm", [{"role": "user", "content": "warm up"}], 4, 0))
    while busy(chats):
        chats.step()
    arrivals.clear()
    messages, prompt_len = long_conversation(load_hf_tokenizer(entry["tokenizer"]), args.prompt_tokens)
    long = request("long", messages, 32, 99)
    start = time.perf_counter()
    for n in range(args.users):  # the worker's main loop: the requests that came, then one step for all
        submit(request(f"user{n}", [{"role": "user", "content": f"question {n}: what is {n} + {n}?"}], args.tokens, n))
    t0 = late_at = None
    while busy(chats) or late_at is None:
        now = time.perf_counter()
        if t0 is None and now - start >= args.after:
            t0 = now
            submit(long)
        elif t0 is not None and late_at is None and now - t0 >= args.late:  # taken at the loop's next turn
            late_at = t0 + args.late
            submit(request("late", [{"role": "user", "content": "one more question: what is 2 + 2?"}], 32, 98))
        chats.step()
    total = time.perf_counter() - start
    t1 = arrivals["long"][0]
    stalls, meanwhile = [], 0
    for rid, times in arrivals.items():  # each chat's longest wait between two tokens while the prompt was read
        if rid in ("long", "late"):
            continue
        inside = [t for t in times if t0 <= t <= t1]
        points = [t for t in times if t < t0][-1:] + inside + [t for t in times if t > t1][:1]
        meanwhile += len(inside)
        if len(points) > 1:
            stalls.append(max(b - a for a, b in zip(points, points[1:])))
    print(json.dumps({
        "all_s": round(total, 2), "tokens_per_s": round(sum(map(len, arrivals.values())) / total, 1),
        "long_prompt_tokens": prompt_len, "long_first_s": round(t1 - t0, 2),
        "late_first_s": round(arrivals["late"][0] - late_at, 2), "stall_max_s": round(max(stalls), 2),
        "stall_p50_s": round(statistics.median(stalls), 2), "streamed_meanwhile": meanwhile,
        "threads": torch.get_num_threads()}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--previous", help="a worktree of the previous commit (its worker is the reference)")
    p.add_argument("--users", type=int, default=7, help="chats streaming when the long one arrives")
    p.add_argument("--tokens", type=int, default=256, help="each streaming chat's max_tokens")
    p.add_argument("--prompt-tokens", type=int, default=3000, help="about how long the long conversation is")
    p.add_argument("--after", type=float, default=2.0, help="seconds after the others start that it arrives")
    p.add_argument("--late", type=float, default=1.0, help="seconds after the long one that a short question comes")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one run, in this process
    args = p.parse_args()
    if args.measure:
        return measure(args)
    codes = [("new", HERE)]
    if args.previous:  # the previous tree has no copy of this benchmark: it runs one beside its code
        bench = Path(args.previous).resolve() / "bench"
        for name in ("chat_prefill.py", "fresh_portal.py"):
            shutil.copy(HERE / name, bench / name)
        codes.insert(0, ("previous", bench))
    out = {"bench": "chat_prefill", "users": args.users, "tokens": args.tokens, "cpus": os.cpu_count(), "runs": []}
    for rnd in range(args.rounds):
        for code, bench in (codes if rnd % 2 == 0 else codes[::-1]):
            cmd = [sys.executable, str(bench / "chat_prefill.py"), "--measure", "--users", str(args.users),
                   "--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens), "--after",
                   str(args.after), "--late", str(args.late)]
            line = subprocess.run(cmd, cwd=bench.parent, check=True, capture_output=True, text=True).stdout
            out["runs"].append({"code": code, "round": rnd, **json.loads(line.strip().splitlines()[-1])})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
