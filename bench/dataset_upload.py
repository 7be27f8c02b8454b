"""Upload and validation of a large dataset through a real node, as JSON: time and the web server's peak memory.

    python bench/dataset_upload.py              # a generated 1 GB SFT file (takes a few minutes on 2 cores)
    python bench/dataset_upload.py --mb 50      # a quick run

Starts `manage.py serve` (tests/live.py) with a temporary MINICLOUD_HOME, writes a MiniMind SFT JSONL file of the
given size, uploads it as the page does (8 MB chunks to /api/v1/uploads, then POST /api/v1/datasets, which has it
validated in one streaming pass), and reports the wall time, the throughput, and the peak resident memory (VmHWM) of
the web server processes (daphne) — which must stay far below the file size. (A single multipart request is fine for
small files but daphne queues a whole request body in memory, hence the chunks.) Also times the validator alone.

Twice, on a fresh node each: the check inside the finishing request (the previous behaviour, forced with a large
MINICLOUD_VALIDATE_INLINE_BYTES) and on the background cluster (the default for a file of 32 MB or more, the page
following GET /api/v1/uploads/{id}). For each: how long the finishing request took, the time to the dataset, and
the latency of /api/v1/health asked every 100 ms by another client meanwhile.
"""
import argparse
import json
import os
import random
import sys
import statistics
import tempfile
import threading
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


def upload_in_chunks(node, path: Path, chunk: int = 8 * 2**20, started=lambda: None) -> dict:
    """What the page does: POST /uploads, PUT 8 MB chunks, POST /datasets with the upload id (``started()`` just
    before it), then GET /uploads/{id} while it is checked in the background."""
    upload = api(node, "POST", "/api/v1/uploads")
    offset = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            offset = api(node, "PUT", f"/api/v1/uploads/{upload['id']}?offset={offset}", block,
                         "application/octet-stream")["offset"]
    started()
    form = f"name=big-sft&kind=sft&upload={upload['id']}".encode()
    t0 = time.perf_counter()
    answer = api(node, "POST", "/api/v1/datasets", form, "application/x-www-form-urlencoded")
    finish_s = time.perf_counter() - t0
    while answer.get("status") == "checking":  # checked in the background: follow it as the page does
        time.sleep(0.5)
        answer = api(node, "GET", f"/api/v1/uploads/{upload['id']}")
    return {**answer.get("dataset", answer), "finish_request_s": finish_s}


def probe(node, stop: threading.Event, latencies: list) -> None:
    """Another user's requests while the upload is finished and checked: /api/v1/health every 100 ms."""
    while not stop.is_set():
        t0 = time.perf_counter()
        api(node, "GET", "/api/v1/health")
        latencies.append(time.perf_counter() - t0)
        stop.wait(0.1)


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
        out = {"file_mb": round(data.stat().st_size / 2**20, 1), "records": records}
        for mode, inline_bytes in (("in_request", str(2**62)), ("background", None)):
            (tmp / mode).mkdir()
            node = LiveNode(tmp / mode)
            node.env.pop("MINICLOUD_VALIDATE_INLINE_BYTES", None)  # the default, unless forced
            if inline_bytes:
                node.env["MINICLOUD_VALIDATE_INLINE_BYTES"] = inline_bytes
            node.start()
            stop, latencies = threading.Event(), []
            try:
                before = daphne_peak_kb(node.proc.pid)
                t0 = time.perf_counter()
                prober = threading.Thread(target=probe, args=(node, stop, latencies))
                answer = upload_in_chunks(node, data, started=lambda: prober.start())
                upload_s = time.perf_counter() - t0
                stop.set()
                prober.join()
                peak = daphne_peak_kb(node.proc.pid)
            finally:
                stop.set()
                node.stop()
                node.drop_database()
            out[mode] = {
                "stored_records": answer["records"], "upload_and_validate_s": round(upload_s, 2),
                "mb_per_s": round(data.stat().st_size / 2**20 / upload_s, 1),
                "finish_request_s": round(answer["finish_request_s"], 3),
                "other_requests_meanwhile": {"n": len(latencies),
                                             "p50_ms": round(1000 * statistics.median(latencies), 1),
                                             "max_ms": round(1000 * max(latencies), 1)},
                "web_process_peak_mb": round(peak / 1024, 1), "web_process_peak_before_mb": round(before / 1024, 1)}
        import django

        django.setup()
        from jobs.validation import validate_file

        t0 = time.perf_counter()
        report = validate_file(data, "sft")
        out.update(validate_only_s=round(time.perf_counter() - t0, 2), validator_ok=report.ok)
        print(json.dumps(out))


if __name__ == "__main__":
    main()
