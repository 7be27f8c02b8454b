"""Upload and validation of a large dataset through a real node, as JSON: time and the web server's peak memory.

    python bench/dataset_upload.py              # a generated 1 GB SFT file (takes a few minutes on 2 cores)
    python bench/dataset_upload.py --mb 50      # a quick run

Starts `manage.py serve` (tests/live.py) with a temporary MINICLOUD_HOME, writes a MiniMind SFT JSONL file of the
given size, streams it as multipart/form-data to POST /api/v1/datasets without holding it in memory on either side,
and reports the request's wall time, the throughput, and the peak resident memory (VmHWM) of the web server process
(daphne) — which must stay far below the file size: Django streams uploads to a temporary file and the validator reads
one line at a time. Also times the validator alone, in this process.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
import uuid
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


class Multipart:
    """A multipart/form-data body read in chunks (urllib sends it without building it in memory)."""

    def __init__(self, fields: dict, file_field: str, path: Path):
        self.boundary = uuid.uuid4().hex
        head = "".join(f'--{self.boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                       for k, v in fields.items())
        head += (f'--{self.boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
                 f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n')
        self.parts = [head.encode(), path, f"\r\n--{self.boundary}--\r\n".encode()]
        self.length = len(self.parts[0]) + path.stat().st_size + len(self.parts[2])
        self._iter = self._chunks()

    def _chunks(self):
        yield self.parts[0]
        with open(self.parts[1], "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                yield block
        yield self.parts[2]

    def read(self, size=-1):
        return next(self._iter, b"")


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
        node = LiveNode(tmp / "home").start()
        try:
            before = daphne_peak_kb(node.proc.pid)
            body = Multipart({"name": "big-sft", "kind": "sft"}, "file", data)
            req = urllib.request.Request(node.url + "/api/v1/datasets", data=body, method="POST")
            req.add_header("Authorization", f"Bearer {node.token}")
            req.add_header("Content-Type", f"multipart/form-data; boundary={body.boundary}")
            req.add_header("Content-Length", str(body.length))
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=3600) as resp:
                answer = json.loads(resp.read())
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
