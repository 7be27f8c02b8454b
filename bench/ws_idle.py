"""What open job pages cost a web node while nothing moves, as JSON: a class's tabs, each a job WebSocket on a running
job whose last point and log line were read, held open; the web processes' CPU-seconds per second (daphne's, from
/proc) over a quiet window, then the delay of a new point to reach every socket.

    python bench/ws_idle.py                          # 90 sockets (30 users x 3 tabs), 20 s quiet, this tree
    python bench/ws_idle.py --sockets 90 --label previous   # run from another tree's checkout to compare

A web node of its own (`serve --web`, SQLite unless DATABASE_URL / REDIS_URL are set), on a fresh home.
"""
import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=30)
    p.add_argument("--tabs", type=int, default=3, help="open job pages per user")
    p.add_argument("--quiet", type=float, default=20.0, help="seconds measured with nothing new")
    p.add_argument("--label", default="this tree")
    args = p.parse_args()
    from portal_load import process_cpu, service_cpu, use_node_database
    from tests.live import LiveNode

    home = Path(tempfile.mkdtemp(prefix="minicloud-ws-idle-"))
    node = LiveNode(home)
    node.args = ["--web"]
    node.start()
    try:
        use_node_database(node)
        from django.contrib.auth import get_user_model
        from django.utils import timezone

        from accounts.models import ApiToken
        from jobs.models import Dataset, Job, LogChunk, MetricPoint
        from models_registry.models import Tokenizer

        ds, tok = Dataset.objects.get(name="demo-pretrain"), Tokenizer.objects.get(name="demo-tokenizer")
        tokens, jobs = [], []
        for i in range(args.users):
            user = get_user_model().objects.create_user(f"student{i}")
            tokens.append(ApiToken.issue(user)[1])
            job = Job.objects.create(owner=user, name=f"run-{i}", stage="pretrain", dataset=ds, tokenizer=tok,
                                     status="running", started_at=timezone.now(), total_steps=1000, step=100)
            MetricPoint.objects.bulk_create([MetricPoint(job=job, seq=s, step=s, time=time.time(),
                                                         values={"loss": 5 - s / 100}) for s in range(1, 101)])
            LogChunk.objects.create(job=job, offset=0, text="step 100\n")
            jobs.append(job)
        out = asyncio.run(measure(node, args, tokens, jobs, MetricPoint, process_cpu, service_cpu))
        out.update(bench="ws_idle", label=args.label, users=args.users, tabs=args.tabs, cpus=os.cpu_count(),
                   database=os.environ.get("DATABASE_URL", "sqlite").split(":")[0],
                   redis=bool(os.environ.get("REDIS_URL")))
        print(json.dumps(out))
    finally:
        node.stop()


async def measure(node, args, tokens, jobs, MetricPoint, process_cpu, service_cpu):
    from asgiref.sync import sync_to_async
    from websockets.asyncio.client import connect

    sockets = []
    for tab in range(args.tabs):
        for token, job in zip(tokens, jobs):
            ws = await connect(f"ws://127.0.0.1:{node.port}/ws/jobs/{job.pk}/?after=100&log_after=9",
                               origin=node.url, additional_headers={"Authorization": f"Bearer {token}"})
            await asyncio.wait_for(ws.recv(), 30)  # the first update: the job's status
            sockets.append((ws, job))
    await asyncio.sleep(3)  # settle
    cpu0, svc0, t0 = process_cpu(node.proc.pid), service_cpu(), time.perf_counter()
    await asyncio.sleep(args.quiet)
    cpu1, svc1, t1 = process_cpu(node.proc.pid), service_cpu(), time.perf_counter()
    seconds = t1 - t0
    written = time.time()
    await sync_to_async(lambda: [MetricPoint.objects.create(job=j, seq=101, step=101, time=written,
                                                            values={"loss": 3.9}) for j in jobs])()
    delays = []
    for ws, _job in sockets:
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if any(p["seq"] == 101 for p in msg.get("points", ())):
                delays.append(time.time() - written)
                break
    for ws, _job in sockets:
        await ws.close()
    delays.sort()
    return {"sockets": len(sockets), "quiet_s": round(seconds, 1),
            "web_cpu_per_s": round((cpu1["web"] - cpu0["web"]) / seconds, 3),
            "db_cpu_per_s": round(sum(svc1[k] - svc0[k] for k in svc1) / seconds, 3),
            "new_point_p50_s": round(delays[len(delays) // 2], 3), "new_point_max_s": round(delays[-1], 3)}


if __name__ == "__main__":
    main()
