"""A day of a 60-user lab on 3 nodes × 8 GPUs, through the real scheduler with a fake clock; prints JSON.

    python bench/cluster_sim.py                 # the default lab and day
    python bench/cluster_sim.py --seed 7 --users 60 --nodes 3 --gpus 8
    python bench/cluster_sim.py --placement slurm --max-released 32   # the Slurm executor

The trace (generated, seeded): 40 students (small SFT/LoRA/eval jobs of a tiny or 64M model: 1 GPU, 3–15 GiB,
10–60 min), 15 researchers (MiniMind-3 pretraining/SFT/DPO/GRPO: 1–2 GPUs, 15–60 GiB, 1–5 h) and 5 heavy users
(MoE pretraining or distillation: 4–8 GPUs on one node, 50–75 GiB per GPU, 3–10 h); arrivals follow a working day
(most between 9:00 and 18:00). Every simulated minute the jobs that ended free their GPUs, then the queue is ordered
by ``jobs.scheduler.fair_order`` (priority, running jobs, decayed device use, age) and placed by
``jobs.scheduler.plan`` (memory-aware packing, up to ``--jobs-per-gpu`` jobs per GPU, gang allocation) — the code the
portal runs, without the database. A user may run at most ``--max-running`` jobs (the default quota).

``--placement slurm`` models the Slurm executor: the portal orders and gates the queue the same way but only
releases jobs, at most ``--max-released`` at once (MINICLOUD_SLURM_MAX_JOBS), and Slurm places what it was given in
release order with ``select/cons_tres`` and ``--gres=gpu:N``: whole GPUs (no sharing unless the admin configures
``gres/shard``), best-fit over nodes, and backfill that keeps, for the first released job that does not fit, the node
closest to taking it.

Reported: GPU utilisation (share of GPUs with at least one job) while the queue is not empty, the mean and p95
queue wait per user class, and fairness: Jain's index of each user's device-hours divided by a max-min fair share
of the day's device-hours (water-filling over what each user asked for, quota shares equal). Targets (issue 9):
utilisation > 85 % while the queue is non-empty, Jain's index > 0.9.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.scheduler import GiB, Device, decayed_seconds, fair_order, plan  # noqa: E402  (no Django needed)

CLASSES = {  # users, jobs per user per day, GPUs, GiB per GPU, hours
    "student": (40, (2, 6), (1, 1), (3, 15), (1 / 6, 1)),
    "researcher": (15, (2, 5), (1, 2), (15, 60), (1, 5)),
    "heavy": (5, (1, 2), (4, 8), (50, 75), (3, 10)),
}


@dataclass
class SimJob:
    pk: int
    owner_id: int
    cls: str
    gpus: int
    memory_estimate: int
    hours: float
    created_at: float  # seconds since midnight
    priority: int = 0
    released: float | None = None
    started: float | None = None
    ended: float | None = None
    node: str | None = None
    devices: tuple = ()


def trace(seed: int, scale: float) -> list[SimJob]:
    rng = random.Random(seed)
    jobs, uid = [], 0
    for cls, (users, per_day, gpus, gib, hours) in CLASSES.items():
        for _ in range(round(users * scale)):
            uid += 1
            for _ in range(rng.randint(*per_day)):
                t = rng.gauss(13.5, 3.0) if rng.random() < 0.85 else rng.uniform(0, 24)
                g = rng.choice([n for n in (1, 2, 4, 8) if gpus[0] <= n <= gpus[1]])
                jobs.append(SimJob(0, uid, cls, g, int(rng.uniform(*gib) * GiB),
                                   rng.uniform(*hours), min(max(t, 0.0), 23.9) * 3600))
    jobs.sort(key=lambda j: j.created_at)
    for i, j in enumerate(jobs, 1):
        j.pk = i
    return jobs


def max_min_fair(demand: dict, capacity: float) -> dict:
    """Water-filling: each user gets min(demand, level), the level set so that the shares add up to capacity."""
    share, left, users = {}, capacity, sorted(demand, key=demand.get)
    while users:
        level = left / len(users)
        u = users[0]
        if demand[u] <= level:
            share[u] = demand[u]
            left -= demand[u]
            users.pop(0)
        else:
            for u in users:
                share[u] = level
            break
    return share


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if xs and any(xs) else 1.0


def pct(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q / 100 * len(values)))], 1) if values else None


def shards_of(job, gpu_bytes: int, shards: int) -> int:
    """``--gres=shard:K`` for a one-GPU job whose estimate fits in K of the GPU's ``shards`` shares; a whole GPU
    (all its shards) otherwise."""
    if job.gpus > 1 or shards <= 1:
        return shards
    return min(shards, max(1, -(-job.memory_estimate * shards // gpu_bytes)))


def slurm_place(released: list, nodes: dict, t: float, shards: int, gpu_bytes: int, rank=None) -> list:
    """Slurm's placement of the released jobs (release order = Slurm priority by age): ``select/cons_tres`` with
    ``--gres=gpu:N`` (whole GPUs) or, for a one-GPU job that fits a share, ``--gres=shard:K`` (Slurm's GPU sharding,
    ``shards`` per GPU); best fit over nodes; the first job that does not fit keeps the node closest to taking it
    (backfill's reservation). Returns the jobs it started."""
    used = {(d.node, d.index): sum(u for u in getattr(d, "units", [])) for devs in nodes.values() for d in devs}
    reserved, started = None, []
    for j in sorted(released, key=rank or (lambda j: (j.released, j.pk))):
        k = shards_of(j, gpu_bytes, shards)
        options = []
        for name, devs in nodes.items():
            if name == reserved:
                continue
            ok = [d for d in devs if used[(d.node, d.index)] + k <= shards]
            if len(ok) >= j.gpus:
                ok.sort(key=lambda d: -used[(d.node, d.index)])  # fill shared GPUs first
                options.append((sum(shards - used[(d.node, d.index)] for d in ok), name, ok[:j.gpus]))
        if not options:
            if reserved is None:
                reserved = max(nodes, key=lambda n: sum(shards - used[(d.node, d.index)] for d in nodes[n]))
            continue
        _, node, chosen = min(options, key=lambda o: (o[0], o[1]))
        for d in chosen:
            used[(d.node, d.index)] += k
            d.jobs.append(j.memory_estimate)
            d.units = getattr(d, "units", []) + [k]
        j.node, j.devices, j.started, j.ended = node, tuple(d.index for d in chosen), t, t + j.hours * 3600
        j.units = k
        started.append(j)
    return started


def simulate(args) -> dict:
    jobs = trace(args.seed, args.users / 60)
    nodes = {f"node-{n}": [Device(f"node-{n}", i, "cuda", args.gpu_gib * GiB) for i in range(args.gpus)]
             for n in range(args.nodes)}
    total_gpus = args.nodes * args.gpus
    pending, running, done = list(jobs), [], []
    queued: list[SimJob] = []
    busy_minutes = queue_minutes = 0
    half_life = args.half_life_h * 3600
    t, step, end_of_day = 0.0, 60.0, 24 * 3600.0
    while t < end_of_day or queued or running:
        if t > end_of_day + 7 * 86400:
            break
        for j in [j for j in running if j.ended <= t]:
            running.remove(j)
            done.append(j)
            for i in j.devices:
                nodes[j.node][i].jobs.remove(j.memory_estimate)
                if getattr(j, "units", None):
                    nodes[j.node][i].units.remove(j.units)
        while pending and pending[0].created_at <= t:
            queued.append(pending.pop(0))
        if queued:
            live = {}
            for j in running:
                live[j.owner_id] = live.get(j.owner_id, 0) + 1
            usage = {}
            for j in running + done:
                usage[j.owner_id] = usage.get(j.owner_id, 0.0) + decayed_seconds(
                    j.started, min(j.ended, t), j.gpus, t, half_life)
            order = fair_order(queued, {}, live, usage)
            counts = dict(live)

            def blocked(job):
                if counts.get(job.owner_id, 0) >= args.max_running:
                    return "quota_running", {}
                return None

            def placed(job):
                counts[job.owner_id] = counts.get(job.owner_id, 0) + 1

            if args.placement == "slurm":
                released = [j for j in queued if j.released is not None]
                # the portal's job slots: every released job holds one, and at most --max-pending may wait in Slurm
                # at once (so that the portal's order, not Slurm's age order, decides who goes next)
                room = min(args.max_released - len(released) - len(running), args.max_pending - len(released))
                live_slots = [Device("slurm", i) for i in range(max(room, 0))]
                for decision in plan([j for j in order if j.released is None], {"slurm": live_slots}, 1,
                                     memory_of=lambda j: 0, gpus_of=lambda j: 1, blocked=blocked, on_place=placed):
                    if decision.placed:
                        decision.job.released = t
                        released.append(decision.job)
                rank = {j.pk: n for n, j in enumerate(order)}
                by_portal = (lambda j: rank[j.pk]) if args.slurm_order == "portal" else None
                for j in slurm_place(released, nodes, t, args.shards, args.gpu_gib * GiB, by_portal):
                    queued.remove(j)
                    running.append(j)
                decisions = []
            else:
                decisions = plan(order, nodes, args.jobs_per_gpu, blocked=blocked, on_place=placed)
            for d in (d for devs in nodes.values() for d in devs):
                d.reserved = False
            for decision in decisions:
                if decision.placed:
                    j = decision.job
                    j.node, j.devices, j.started = decision.node, tuple(decision.devices), t
                    j.ended = t + j.hours * 3600
                    queued.remove(j)
                    running.append(j)
        if t < end_of_day and queued:
            queue_minutes += 1
            busy_minutes += sum(1 for devs in nodes.values() for d in devs if d.jobs) / total_gpus
        t += step
    waits = {cls: [(j.started - j.created_at) / 60 for j in done if j.cls == cls] for cls in CLASSES}
    used, asked = {}, {}
    for j in jobs:
        asked[j.owner_id] = asked.get(j.owner_id, 0.0) + j.gpus * j.hours
    for j in done:  # device-hours within the day
        used[j.owner_id] = used.get(j.owner_id, 0.0) + j.gpus * max(min(j.ended, end_of_day) - j.started, 0) / 3600
    fair = max_min_fair({u: asked[u] for u in asked}, sum(used.values()))
    ratios = [used.get(u, 0.0) / fair[u] if fair[u] else 1.0 for u in asked]
    return {
        "bench": "cluster_sim", "placement": args.placement,
        **({"max_released": args.max_released, "max_pending": args.max_pending, "shards_per_gpu": args.shards,
            "slurm_order": args.slurm_order}
           if args.placement == "slurm" else {}), "seed": args.seed, "nodes": args.nodes, "gpus_per_node": args.gpus,
        "users": len(asked), "jobs": len(jobs), "jobs_finished": len(done),
        "gpu_utilisation_while_queued": round(busy_minutes / queue_minutes, 4) if queue_minutes else None,
        "minutes_with_a_queue": queue_minutes,
        "queue_wait_minutes": {cls: {"mean": round(sum(w) / len(w), 1) if w else None, "p95": pct(w, 95),
                                     "jobs": len(w)} for cls, w in waits.items()},
        "device_hours": round(sum(used.values()), 1),
        "jain_fairness": round(jain(ratios), 4),
        "targets": {"gpu_utilisation_while_queued": "> 0.85", "jain_fairness": "> 0.9"},
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--users", type=int, default=60)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-gib", type=int, default=80)
    p.add_argument("--jobs-per-gpu", type=int, default=4)
    p.add_argument("--max-running", type=int, default=4)
    p.add_argument("--half-life-h", type=float, default=24.0)
    p.add_argument("--placement", choices=("portal", "slurm"), default="portal")
    p.add_argument("--max-released", type=int, default=16, help="Slurm: jobs released at once")
    p.add_argument("--max-pending", type=int, default=16, help="Slurm: released jobs that may wait in Slurm at once")
    p.add_argument("--shards", type=int, default=1, help="Slurm: gres/shard shares per GPU (1: whole GPUs)")
    p.add_argument("--slurm-order", choices=("age", "portal"), default="age",
                   help="Slurm's order of the pending released jobs: by release (age) or the portal's (nice)")
    print(json.dumps(simulate(p.parse_args())))


if __name__ == "__main__":
    main()
