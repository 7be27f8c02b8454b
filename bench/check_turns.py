"""A classmate's upload behind one member's many, as JSON: how long a member's one large upload waits for its
check while another member's ten are queued on the node's one checks worker. The previous order (each finish's
task checks its own upload: first come, first served) beside this tree's (``jobs.services.check_next_upload``: each
task checks the next upload in fair order, ``Upload.next_to_check``), alternately, in one process on a fresh
database, with real files and real checks (``create_dataset``, ~60 MB/s).

    python bench/check_turns.py                   # 10 uploads of 20 MB by one member, then one by another
    python bench/check_turns.py --uploads 10 --mb 100 --rounds 2

The worker takes the first member's first upload; the second member finishes theirs once it is checked (the
queue then holds the first member's nine others and theirs). ``wait_s``: from that finish to the second member's
dataset; ``all_s``: the whole queue.
"""
import argparse
import json
import os
import time
from pathlib import Path

from fresh_portal import fresh_portal


def write_corpus(path: Path, size: int, tag: str) -> None:
    line = 0
    with open(path, "w") as f:
        while f.tell() < size:
            f.write(json.dumps({"text": f"{tag} record {line}: " + "the quick brown fox jumps over the lazy dog " * 8})
                    + "\n")
            line += 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--uploads", type=int, default=10, help="the first member's uploads")
    p.add_argument("--mb", type=float, default=20.0, help="each upload's size")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    home = fresh_portal("minicloud-turns-")
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from jobs import services, tasks
    from jobs.models import Upload
    from jobs.services import datasets

    settings.VALIDATE_INLINE_BYTES = 1  # every finish is a background check
    queue = []  # the checks cluster's queue: one task per finish, first in first out
    datasets.background_task = lambda func, upload_id, **kw: queue.append(upload_id)
    run_task = {"previous": services.check_upload, "new": tasks.check_upload}
    users = iter(get_user_model().objects.create_user(f"member{n}") for n in range(10**6))
    files = iter(range(10**6))

    def finish(owner):
        n = next(files)
        source = home / f"corpus-{n}.jsonl"
        write_corpus(source, int(args.mb * 1e6), f"file {n}")
        upload = services.start_upload(owner)
        with open(source, "rb") as f:
            services.append_upload(upload, 0, f, source.stat().st_size)
        source.unlink()
        services.finish_upload(upload, name=f"corpus-{n}", kind="pretrain")
        return upload

    out = {"bench": "check_turns", "uploads": args.uploads, "mb": args.mb, "cpus": os.cpu_count(), "runs": []}
    for rnd in range(args.rounds):
        for code in (("previous", "new") if rnd % 2 == 0 else ("new", "previous")):
            many, one = next(users), next(users)
            for _ in range(args.uploads):
                finish(many)
            start = time.perf_counter()
            run_task[code](queue.pop(0))  # the first member's first upload
            theirs = finish(one)
            asked = time.perf_counter()
            wait = None
            while queue:
                run_task[code](queue.pop(0))
                if wait is None and Upload.objects.get(pk=theirs.pk).status == "done":
                    wait = time.perf_counter() - asked
            assert not Upload.objects.filter(status="checking").exists()
            out["runs"].append({"code": code, "round": rnd, "wait_s": round(wait, 2),
                                "all_s": round(time.perf_counter() - start, 2)})
    for code in ("previous", "new"):
        waits = [r["wait_s"] for r in out["runs"] if r["code"] == code]
        out[f"{code}_wait_s"] = round(sum(waits) / len(waits), 2)
    out["wait_ratio"] = round(out["previous_wait_s"] / out["new_wait_s"], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
