"""The same file uploaded again, as JSON: a class whose thirty members each upload the course's corpus, checked on
the node's one checks worker. The previous check (``jobs.validation.validate_file``: the whole file read and checked,
~60 MB/s) beside this tree's (``jobs.services.datasets._checked``: bytes already checked as a dataset of that kind
take that check, their sha256 read instead), alternately, in one process on a fresh database, the file in the page
cache (it was just uploaded). Also the worst case of the new check: other bytes of the same size (the sha256 read,
then the whole check).

    python bench/dataset_recheck.py                 # a 1 GB SFT file of MiniMind-sized conversations
    python bench/dataset_recheck.py --gb 2 --rounds 3

Each upload is ``services.create_dataset`` by another member, as the checks worker runs it (``check_upload``).
"""
import argparse
import json
import os
import shutil
import time
from pathlib import Path

from dataset_preview import generate
from fresh_portal import fresh_portal


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--keep", help="the generated file's path (reused when it exists)")
    args = p.parse_args()
    home = fresh_portal("minicloud-recheck-")
    from django.contrib.auth import get_user_model

    from jobs.services import datasets

    path = Path(args.keep) if args.keep else home / "sft.jsonl"
    if not path.exists():
        generate(path, int(args.gb * 1e9))
    same_size = home / "other.jsonl"  # the same size, other bytes: the file's last " the " spelt " thy "
    data = bytearray(path.read_bytes())
    at = data.rindex(b" the ")
    data[at:at + 5] = b" thy "
    same_size.write_bytes(data)
    del data
    users = iter(get_user_model().objects.create_user(f"member{n}") for n in range(10**6))

    def upload(source, code):
        check = datasets._checked if code == "new" else datasets.validate_file
        real, datasets._checked = datasets._checked, check
        try:
            t = time.perf_counter()
            ds = datasets.create_dataset(owner=next(users), name="corpus", kind="sft", source=source)
            return round(time.perf_counter() - t, 2), ds
        finally:
            datasets._checked = real

    first_s, first = upload(path, "previous")  # the teacher's upload: checked whole either way
    out = {"bench": "dataset_recheck", "gb": args.gb, "file_bytes": path.stat().st_size, "records": first.records,
           "cpus": os.cpu_count(), "first_check_s": first_s, "runs": []}
    for rnd in range(args.rounds):
        for code in (("previous", "new") if rnd % 2 == 0 else ("new", "previous")):
            again_s, ds = upload(path, code)
            assert (ds.records, ds.sha256, ds.validation["warning_count"]) == (
                first.records, first.sha256, first.validation["warning_count"])
            other_s, other = upload(same_size, code)
            assert other.records == first.records and other.sha256 != first.sha256
            other.delete()  # the next round's "other bytes" are new again
            out["runs"].append({"code": code, "round": rnd, "same_bytes_s": again_s, "same_size_other_bytes_s": other_s})
    for code in ("previous", "new"):
        same = [r["same_bytes_s"] for r in out["runs"] if r["code"] == code]
        out[f"{code}_thirty_uploads_min"] = round(30 * sum(same) / len(same) / 60, 1)
    print(json.dumps(out))
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
