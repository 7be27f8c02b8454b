"""Portal load benchmark, as JSON: submission, page and live-update latency with many people using the portal.

    python bench/portal_load.py                                   # 200 users, 50 running + 500 queued jobs, 60 s
    python bench/portal_load.py --users 20 --duration 20          # a quick run
    python bench/portal_load.py --think 0 --users 20              # closed loop: every user fires back to back

It starts a real web node (`manage.py serve --web`, SQLite by default; DATABASE_URL/REDIS_URL and
MINICLOUD_WEB_PROCESSES are honoured) in a temporary MINICLOUD_HOME and fills its database the way a busy lab's looks:
a GPU node (8 × 80 GiB, kept alive by a heartbeat from this script, running nothing real) with ``--running`` jobs on
it and ``--queued`` jobs waiting, from 20 accounts; each account watches one of its running jobs (2,000
metric points each).

Then ``--users`` simulated people use it for ``--duration`` seconds, as load-testing tools model users (Locust's
``wait_time = between(a, b)``): each starts at a random moment of the first think interval, then repeats — one
request, chosen by weight (the dashboard 3, a running job's page 3, the queue page 2, a job submission through
POST /api/v1/jobs 1), then a think time drawn uniformly from ``--think MIN,MAX`` seconds (``0``: none, a closed loop
that measures the server at saturation). Meanwhile one watcher measures the delay from a metric point written to the
database to its arrival on the job's WebSocket. Latencies are wall-clock from the client, on the same machine.
Targets (issue 5): submission p99 < 100 ms, pages p95 < 200 ms, live updates p95 < 1 s.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WEIGHTS = {"dashboard": 3, "job_page": 3, "queue_page": 2, "submission": 1}


def _processes():
    """(pid, parent pid, CPU-seconds used so far, command line, name) of every process on this machine."""
    tick = os.sysconf("SC_CLK_TCK")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            name = (proc / "comm").read_text().strip()
        except OSError:
            continue
        yield int(proc.name), int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmd, name


def process_cpu(root_pid: int) -> dict:
    """CPU-seconds used so far by the process tree under ``root_pid``, by role: the web processes (daphne), the
    worker (qcluster and its supervisors), the training processes (the engine, its warm server), the rest."""
    children: dict[int, list[int]] = {}
    stats = {}
    for pid, parent, cpu, cmd, _name in _processes():
        children.setdefault(parent, []).append(pid)
        stats[pid] = (cpu, cmd)
    out = {"web": 0.0, "worker": 0.0, "training": 0.0, "other": 0.0}
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if pid not in stats:
            continue
        cpu, cmd = stats[pid]
        role = ("web" if "daphne" in cmd else "training" if "-m training" in cmd else
                "worker" if "qcluster" in cmd or "workers" in cmd else "other")
        out[role] += cpu
    return out


def service_cpu() -> dict:
    """CPU-seconds used so far by the database and broker servers on this machine (PostgreSQL's and Redis's
    processes, which are not the node's children): the rest of what a burst costs the box."""
    out = {"postgresql": 0.0, "redis": 0.0}
    for _pid, _parent, cpu, _cmd, name in _processes():
        role = "postgresql" if name.startswith("postgres") else "redis" if name.startswith("redis") else None
        if role:
            out[role] += cpu
    return out


def pct(values, q):
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q / 100 * len(values)))] * 1000, 1) if values else None


def fill(args):
    """The busy lab's database: a live GPU node, running and queued jobs of 20 accounts, a watched job's metrics."""
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from jobs.models import Dataset, Job, MetricPoint, Node
    from models_registry.models import Tokenizer

    User = get_user_model()
    users = [User.objects.create_user(f"bench{i}", password="bench-password") for i in range(20)]
    ds, tok = Dataset.objects.get(name="demo-pretrain"), Tokenizer.objects.get(name="demo-tokenizer")
    gib = 2**30
    Node.objects.create(name="bench-gpu", started_at=timezone.now(), heartbeat_at=timezone.now(),
                        devices=[{"index": i, "kind": "cuda", "name": "bench GPU", "memory_total": 80 * gib}
                                 for i in range(8)])
    config = {"hidden_size": 768, "num_hidden_layers": 8}
    Job.objects.bulk_create(
        [Job(owner=users[i % 20], name=f"run-{i}", stage="pretrain", dataset=ds, tokenizer=tok, status="running",
             node="bench-gpu", devices=[i % 8], started_at=timezone.now(), total_steps=1000, step=i, eta_s=600.0 + i,
             memory_estimate=10 * gib, config=config, resolved_config=config) for i in range(args.running)]
        + [Job(owner=users[i % 20], name=f"queued-{i}", stage="pretrain", dataset=ds, tokenizer=tok, status="queued",
               memory_estimate=10 * gib, config=config, resolved_config=config) for i in range(args.queued)])
    watched = {}  # each account watches its first running job, which has 2,000 metric points
    for job in Job.objects.filter(status="running").order_by("pk"):
        watched.setdefault(job.owner_id, job)
    MetricPoint.objects.bulk_create([MetricPoint(job=job, seq=i, step=i, time=time.time(),
                                                 values={"loss": 5.0 - i / 1000, "lr": 1e-3})
                                     for job in watched.values() for i in range(1, 2001)])
    return users, ds, [watched[u.pk] for u in users]


def use_node_database(node):
    """Django in this process, on the node's database (and Redis, home and instance), to fill it."""
    os.environ.update({k: v for k, v in node.env.items() if k in ("MINICLOUD_HOME", "DATABASE_URL", "REDIS_URL",
                                                                  "MINICLOUD_INSTANCE")})
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "minicloud.settings")
    import django

    django.setup()


def session_cookie(user):
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore

    session = SessionStore()
    session.update({SESSION_KEY: str(user.pk), BACKEND_SESSION_KEY: "django.contrib.auth.backends.ModelBackend",
                    HASH_SESSION_KEY: user.get_session_auth_hash()})
    session.create()
    return f"sessionid={session.session_key}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--running", type=int, default=50)
    p.add_argument("--queued", type=int, default=500)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--think", default="5,15", help="MIN,MAX seconds between one user's requests (0: none)")
    p.add_argument("--live-samples", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", metavar="FILE", help="also write every request as a JSON line: start, kind, seconds, ok")
    p.add_argument("--burst", type=int, metavar="N", help="burst mode: N submissions in all from --submitters "
                   "concurrent submitters (closed loop), each also listing its jobs, while one CPU job trains")
    p.add_argument("--submitters", type=int, default=10)
    p.add_argument("--accounts", choices=("admin", "class"), default="admin",
                   help="burst mode: every submitter as the admin, or each as a member of a class with quotas")
    args = p.parse_args()
    if args.burst:
        return burst(args)
    think = (0.0, 0.0) if args.think.strip() == "0" else tuple(float(x) for x in args.think.split(","))

    sys.path.insert(0, str(ROOT / "tests"))
    from tests.live import LiveNode

    home = Path(tempfile.mkdtemp(prefix="minicloud-bench-"))
    node = LiveNode(home)
    node.args = ["--web"]  # no worker: nothing is claimed or trained; the fake GPU node below "runs" the jobs
    node.start()
    try:
        use_node_database(node)
        from django.conf import settings
        from django.db import close_old_connections
        from django.utils import timezone

        from jobs.models import MetricPoint, Node

        users, ds, watched = fill(args)
        cookies = [session_cookie(u) for u in users]
        stop = threading.Event()

        def heartbeat():  # the fake GPU node stays "up" for the scheduler
            while not stop.wait(5):
                Node.objects.filter(name="bench-gpu").update(heartbeat_at=timezone.now())
            close_old_connections()

        job_config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "max_steps": 1}
        results = {k: [] for k in WEIGHTS}
        errors = {k: 0 for k in WEIGHTS}
        raw = []
        lock = threading.Lock()

        def request(kind, n, account):
            if kind == "submission":
                body = {"name": f"load-{n}", "stage": "pretrain", "dataset": ds.pk, "config": job_config}
                t = time.perf_counter()
                status, _ = node.request("POST", "/api/v1/jobs", body, raw=True)
                return time.perf_counter() - t, status == 201
            path = {"dashboard": "/", "job_page": f"/jobs/{watched[account].pk}/", "queue_page": "/queue/"}[kind]
            req = urllib.request.Request(node.url + path, headers={"Cookie": cookies[account]})
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    resp.read()
                    ok = resp.status == 200 and resp.url.endswith(path)
            except OSError:
                ok = False
            return time.perf_counter() - t, ok

        def user(i, deadline):
            rng = random.Random(args.seed * 100003 + i)
            time.sleep(rng.uniform(0, think[1]))  # ramp-up: users arrive over the first think interval
            n = 0
            while time.time() < deadline:
                kind = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
                began = time.time()
                dt, ok = request(kind, f"{i}-{n}", i % len(users))
                n += 1
                with lock:
                    raw.append({"start": round(began - start, 3), "kind": kind, "s": round(dt, 4), "ok": ok})
                    if ok:
                        results[kind].append(dt)
                    else:
                        errors[kind] += 1
                if think[1]:
                    time.sleep(rng.uniform(*think))

        live = []
        start = time.time()
        deadline = start + args.duration
        # the samples are spread over the load: one every duration / samples seconds (at least 0.1 s apart)
        threads = [threading.Thread(target=heartbeat, daemon=True),
                   threading.Thread(target=live_latency, daemon=True,
                                    args=(node, watched[0], args.live_samples, MetricPoint,
                                          max(args.duration / args.live_samples, 0.1), deadline, live))]
        threads += [threading.Thread(target=user, args=(i, deadline), daemon=True) for i in range(args.users)]
        for t in threads:
            t.start()
        for t in threads[2:]:
            t.join()
        elapsed = time.time() - start
        threads[1].join(timeout=120)
        stop.set()
        done = sum(len(v) for v in results.values())
        out = {"users": args.users, "think_s": list(think), "duration_s": args.duration,
               "running_jobs": args.running, "queued_jobs": args.queued,
               "database": "postgresql" if "DATABASE_URL" in node.env else "sqlite",
               "web_processes": settings.WEB_PROCESSES,  # this process reads the node's environment
               "requests": done, "requests_per_s": round(done / elapsed, 1),
               "submission_ms": {"p50": pct(results["submission"], 50), "p99": pct(results["submission"], 99),
                                 "n": len(results["submission"]), "errors": errors["submission"]},
               **{f"{k}_ms": {"p50": pct(results[k], 50), "p95": pct(results[k], 95), "n": len(results[k]),
                              "errors": errors[k]} for k in ("dashboard", "job_page", "queue_page")},
               "live_update_ms": {"p50": pct(live, 50), "p95": pct(live, 95), "samples": len(live)}}
        print(json.dumps(out))
        if args.raw:
            Path(args.raw).write_text("".join(json.dumps(r) + "\n" for r in sorted(raw, key=lambda r: r["start"])))
    finally:
        node.stop()
        node.drop_database()


def burst(args):
    """Ten people submit at once: a full node (web and worker, one CPU slot) trains one job while ``--submitters``
    closed-loop clients send ``--burst`` submissions in all, each followed by a listing of the jobs (GET
    /api/v1/jobs). The submitted jobs queue behind the running one. Targets (issue 27): submission p50 < 50 ms and
    p99 < 250 ms, listing p95 < 200 ms, on SQLite and on PostgreSQL + Redis. ``cpu_seconds``: what each part of
    the node (and this script's clients, and on PostgreSQL its server and Redis's) used during the burst; MINICLOUD_CPU_JOB_NICE=0 runs the job at the
    portal's priority (the reference before settings.CPU_JOB_NICE)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tests.live import TINY, LiveNode

    home = Path(tempfile.mkdtemp(prefix="minicloud-burst-"))
    node = LiveNode(home)
    node.env["MINICLOUD_DEVICES"] = "cpu:1"
    node.start()
    try:
        status, datasets = node.request("GET", "/api/v1/datasets")
        ds = next(d for d in datasets["datasets"] if d["name"] == "demo-pretrain")
        long = node.submit("running", {**TINY, "max_steps": 100000, "log_interval": 10})
        node.wait_for(long["id"], lambda j: j["status"] == "running" and j["step"] > 0, timeout=120,
                      what="the CPU job to train")
        body = {"stage": "pretrain", "dataset": ds["id"], "config": {**TINY, "max_steps": 1}}
        tokens = class_accounts(node, args.submitters) if args.accounts == "class" else [node.token] * args.submitters
        submit, listing, errors = [], [], []
        lock = threading.Lock()
        count = iter(range(args.burst))

        def submitter(token):
            for n in count:
                t = time.perf_counter()
                status, _ = node.request("POST", "/api/v1/jobs", {**body, "name": f"burst-{n}"}, raw=True, token=token)
                dt = time.perf_counter() - t
                t = time.perf_counter()
                lstatus, _ = node.request("GET", "/api/v1/jobs", raw=True, token=token)
                lt = time.perf_counter() - t
                with lock:
                    (submit if status == 201 else errors).append(dt)
                    if lstatus == 200:
                        listing.append(lt)

        threads = [threading.Thread(target=submitter, args=(token,)) for token in tokens]
        cpu_before, client_before = process_cpu(node.proc.pid), time.process_time()
        services_before = service_cpu()
        start = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - start
        cpu = {role: round(used - cpu_before[role], 1) for role, used in process_cpu(node.proc.pid).items()}
        cpu["client"] = round(time.process_time() - client_before, 1)  # this script's submitters
        if "DATABASE_URL" in node.env:
            cpu.update({role: round(used - services_before[role], 1) for role, used in service_cpu().items()})
        still = node.job(long["id"])["status"]
        print(json.dumps({
            "mode": "burst", "submissions": len(submit), "errors": len(errors), "submitters": args.submitters,
            "accounts": args.accounts,
            "database": "postgresql" if "DATABASE_URL" in node.env else "sqlite",
            "redis": "REDIS_URL" in node.env, "seconds": round(elapsed, 1), "cpu_job": still,
            "cpu_job_nice": int(node.env.get("MINICLOUD_CPU_JOB_NICE", "10")), "cpu_seconds": cpu,
            "submission_ms": {"p50": pct(submit, 50), "p99": pct(submit, 99), "max": pct(submit, 100)},
            "listing_ms": {"p50": pct(listing, 50), "p95": pct(listing, 95), "n": len(listing)}}))
    finally:
        node.stop()
        node.drop_database()


def class_accounts(node, n) -> list[str]:
    """``n`` members of a class (a group whose admin quota limits storage, queued and running jobs, devices per job,
    hours per job and device-hours per week, none of them reached by the burst): their API tokens. Each submission
    then checks the member's quotas and each listing reads what the member may see, as a class's would."""
    use_node_database(node)
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.db import connections

    from accounts.models import ApiToken, Quota

    group = Group.objects.create(name="burst-class")
    Quota.objects.create(group=group, max_running_jobs=2, max_queued_jobs=10000, max_gpus_per_job=1,
                         device_hours_per_week=1000, max_job_hours=24, storage_gb=100)
    tokens = []
    for i in range(n):
        member = get_user_model().objects.create_user(f"student{i}", password="burst-password")
        member.groups.add(group)
        tokens.append(ApiToken.issue(member, "burst")[1])
    connections.close_all()
    return tokens


def live_latency(node, job, samples, MetricPoint, pause, deadline, delays):
    """Seconds from writing a metric point to receiving it on the job's WebSocket (while the users load the node),
    appended to ``delays``; it stops after ``samples`` or at ``deadline``."""
    from django.db import close_old_connections
    from websockets.sync.client import connect

    last = MetricPoint.objects.filter(job=job).order_by("-seq").first().seq
    uri = f"ws://127.0.0.1:{node.port}/ws/jobs/{job.pk}/?after={last}&log_after=999999999"
    with connect(uri, origin=node.url, additional_headers={"Authorization": f"Bearer {node.token}"}) as ws:
        ws.recv(timeout=10)  # the first message (status)
        for i in range(samples):
            if time.time() > deadline:
                break
            seq = last + 1 + i
            written = time.time()
            MetricPoint.objects.create(job=job, seq=seq, step=seq, time=written, values={"loss": 1.0})
            while True:
                msg = json.loads(ws.recv(timeout=30))
                if any(p["seq"] == seq for p in msg.get("points", ())):
                    delays.append(time.time() - written)
                    break
            time.sleep(pause)
    close_old_connections()


if __name__ == "__main__":
    main()
