"""Portal load benchmark, as JSON: submission latency, page latency and live-update latency under load.

    python bench/portal_load.py                      # 200 users, 50 running + 500 queued jobs in the database
    python bench/portal_load.py --users 20 --running 5 --queued 50 --requests 200    # a quick run

It starts a real node (`manage.py serve`, SQLite by default; DATABASE_URL/REDIS_URL are honoured) in a temporary
MINICLOUD_HOME, fills the database with jobs that belong to a node that is not running (so nothing trains), then
measures with ``--users`` concurrent clients: POST /api/v1/jobs (p50/p99), the dashboard, a job page and the queue
page (p50/p95), and the delay from a metric point written to the database to its arrival on a WebSocket (p50/p95).
Targets (issue 5): submission p99 < 100 ms, pages p95 < 200 ms, live updates p95 < 1 s.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(values, q):
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q / 100 * len(values)))] * 1000, 1) if values else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--running", type=int, default=50)
    p.add_argument("--queued", type=int, default=500)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--live-samples", type=int, default=30)
    args = p.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from tests.live import LiveNode

    home = Path(tempfile.mkdtemp(prefix="minicloud-bench-"))
    node = LiveNode(home)
    node.env["MINICLOUD_DEVICES"] = "cpu:1"
    node.start()
    try:
        os.environ.update({k: v for k, v in node.env.items() if k in ("MINICLOUD_HOME", "DATABASE_URL", "REDIS_URL",
                                                                      "MINICLOUD_INSTANCE")})
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "minicloud.settings")
        import django

        django.setup()
        from django.contrib.auth import get_user_model
        from django.utils import timezone

        from jobs.models import Dataset, Job, MetricPoint
        from models_registry.models import Tokenizer

        admin = get_user_model().objects.get(username="admin")
        ds, tok = Dataset.objects.get(name="demo-pretrain"), Tokenizer.objects.get(name="demo-tokenizer")
        # A node that is not running owns the "running" jobs, so this node's reconcile leaves them alone.
        Job.objects.bulk_create(
            [Job(owner=admin, name=f"run-{i}", stage="pretrain", dataset=ds, tokenizer=tok, status="running",
                 node="bench-elsewhere", devices=[0], started_at=timezone.now(), total_steps=1000, step=i)
             for i in range(args.running)]
            + [Job(owner=admin, name=f"queued-{i}", stage="pretrain", dataset=ds, tokenizer=tok, status="paused")
               for i in range(args.queued)])  # paused: in the database and listed, but never claimed
        hot = Job.objects.filter(status="running").first()
        MetricPoint.objects.bulk_create([MetricPoint(job=hot, seq=i, step=i, time=time.time(),
                                                     values={"loss": 5.0, "lr": 1e-3}) for i in range(1, 2001)])

        def timed(method, path, body=None):
            t = time.perf_counter()
            status, _ = node.request(method, path, body, raw=True)
            return time.perf_counter() - t, status

        config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "max_steps": 1}
        with ThreadPoolExecutor(args.users) as pool:
            subs = list(pool.map(lambda i: timed("POST", "/api/v1/jobs", {"name": f"b{i}", "stage": "pretrain",
                                                                          "dataset": ds.pk, "config": config}),
                                 range(args.requests)))
        Job.objects.filter(name__startswith="b", status="queued").update(status="paused")
        from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
        from django.contrib.sessions.backends.db import SessionStore

        session = SessionStore()
        session.update({SESSION_KEY: str(admin.pk), BACKEND_SESSION_KEY: "django.contrib.auth.backends.ModelBackend",
                        HASH_SESSION_KEY: admin.get_session_auth_hash()})
        session.create()

        def page(path):
            import urllib.request

            req = urllib.request.Request(node.url + path, headers={"Cookie": f"sessionid={session.session_key}"})
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=60) as resp:
                resp.read()
                return time.perf_counter() - t, resp.status if resp.url.endswith(path) else 302

        pages = {}
        for name, path in (("dashboard", "/"), ("job_page", f"/jobs/{hot.pk}/"), ("queue_page", "/queue/")):
            with ThreadPoolExecutor(args.users) as pool:
                pages[name] = list(pool.map(lambda i: page(path), range(args.requests // 5)))
        live = live_latency(node, hot, args.live_samples, MetricPoint)
        out = {"users": args.users, "running_jobs": args.running, "queued_jobs": args.queued,
               "database": "postgresql" if "DATABASE_URL" in node.env else "sqlite",
               "submission_ms": {"p50": pct([t for t, s in subs if s == 201], 50),
                                 "p99": pct([t for t, s in subs if s == 201], 99),
                                 "errors": sum(s != 201 for _, s in subs)},
               **{f"{k}_ms": {"p50": pct([t for t, s in v if s == 200], 50),
                              "p95": pct([t for t, s in v if s == 200], 95)} for k, v in pages.items()},
               "live_update_ms": {"p50": pct(live, 50), "p95": pct(live, 95), "samples": len(live)}}
        print(json.dumps(out))
    finally:
        node.stop()
        node.drop_database()


def live_latency(node, job, samples, MetricPoint):
    """Seconds from writing a metric point to receiving it on the job's WebSocket."""
    from websockets.sync.client import connect

    last = MetricPoint.objects.filter(job=job).order_by("-seq").first().seq
    delays = []
    uri = f"ws://127.0.0.1:{node.port}/ws/jobs/{job.pk}/?after={last}&log_after=999999999"
    with connect(uri, origin=node.url, additional_headers={"Authorization": f"Bearer {node.token}"}) as ws:
        ws.recv(timeout=10)  # the first message (status)
        for i in range(samples):
            seq = last + 1 + i
            written = time.time()
            MetricPoint.objects.create(job=job, seq=seq, step=seq, time=written, values={"loss": 1.0})
            while True:
                msg = json.loads(ws.recv(timeout=10))
                if any(p["seq"] == seq for p in msg["points"]):
                    delays.append(time.time() - written)
                    break
            time.sleep(0.05)
    return delays


if __name__ == "__main__":
    main()
