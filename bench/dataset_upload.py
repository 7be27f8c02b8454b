"""Upload and validation of a large dataset through a real node, as JSON: time and the web server's peak memory.

    python bench/dataset_upload.py              # a generated 1 GB SFT file (takes a few minutes on 2 cores)
    python bench/dataset_upload.py --mb 50      # a quick run

Starts `manage.py serve` (tests/live.py) with a temporary MINICLOUD_HOME, writes a MiniMind SFT JSONL file of the
given size, uploads it as the page does (8 MB chunks to /api/v1/uploads, then POST /api/v1/datasets, which validates
it in one streaming pass), and reports the wall time, the throughput, and the peak resident memory (VmHWM) of the web
server process (daphne) — which must stay far below the file size. (A single multipart request is fine for small
files but daphne queues a whole request body in memory, hence the chunks.) Also times the validator alone.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "minicloud.settings")


def write_sft(path: Path, size: int) -> int:
    rng = random.Random(0)
    words = "the model learns to answer questions about rivers stars colours numbers and cities".split()
    zh = "模型学习回答关于河流星星颜色数字和城市的问题"
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < size:
            q = " ".join(rng.choices(words, k=rng.randint(5, 30))) + f" #{n}"
            a = "".join(rng.choices(zh, k=rng.randint(20, 200)))
            f.write(json.dumps({"conversations": [{"role": "user", "content": q},
                                                  {"role": "assistant", "content": a}]}, ensure_ascii=False) + "\n")
            n += 1
    return n


def api(node, method, path, body=None, content_type="application/json"):
    req = urllib.request.Request(node.url + path, data=body, method=method)
    req.add_header("Authorization", f"Bearer {node.token}")
    req.add_header("Content-Type", content_type)
    with urllib.request.urlopen(req, timeout=3600) as resp:
        return json.loads(resp.read())


def upload_in_chunks(node, path: Path, chunk: int = 8 * 2**20) -> dict:
    """What the page does: POST /uploads, PUT 8 MB chunks, POST /datasets with the upload id."""
    upload = api(node, "POST", "/api/v1/uploads")
    offset = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            offset = api(node, "PUT", f"/api/v1/uploads/{upload['id']}?offset={offset}", block,
                         "application/octet-stream")["offset"]
    form = f"name=big-sft&kind=sft&upload={upload['id']}".encode()
    return api(node, "POST", "/api/v1/datasets", form, "application/x-www-form-urlencoded")


def daphne_peak_kb(serve_pid: int) -> int:
    """VmHWM of the daphne child of `serve` (the process that receives the upload)."""
    best = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text()
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid == serve_pid and b"daphne" in cmd:
            best = max(best, int(next(line.split()[1] for line in status.splitlines()
                                      if line.startswith("VmHWM:"))))
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=1024, help="file size in MB (default 1024)")
    args = p.parse_args()
    from tests.live import LiveNode

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "big-sft.jsonl"
        records = write_sft(data, args.mb * 2**20)
        (tmp / "home").mkdir()
        node = LiveNode(tmp / "home").start()
        try:
            before = daphne_peak_kb(node.proc.pid)
            t0 = time.perf_counter()
            answer = upload_in_chunks(node, data)
            upload_s = time.perf_counter() - t0
            peak = daphne_peak_kb(node.proc.pid)
        finally:
            node.stop()
            node.drop_database()
        import django

        django.setup()
        from jobs.validation import validate_file

        t0 = time.perf_counter()
        report = validate_file(data, "sft")
        validate_s = time.perf_counter() - t0
        print(json.dumps({
            "file_mb": round(data.stat().st_size / 2**20, 1), "records": records, "stored_records": answer["records"],
            "upload_and_validate_s": round(upload_s, 2), "mb_per_s": round(data.stat().st_size / 2**20 / upload_s, 1),
            "validate_only_s": round(validate_s, 2), "validator_ok": report.ok,
            "web_process_peak_mb": round(peak / 1024, 1), "web_process_peak_before_mb": round(before / 1024, 1)}))


if __name__ == "__main__":
    main()
