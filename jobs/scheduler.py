"""Placement: which queued job runs on which devices, and why the others wait. Pure functions over plain data
(no queries here; services.py reads the database and calls these), so they are unit-tested and simulated directly.

A device is a GPU (memory known) or a CPU slot (one job, memory not tracked). A job asks for ``gpus`` devices on one
node, each with ``memory`` bytes free (the estimate from ``training.estimate``). Several jobs share a GPU while their
estimates fit and at most ``jobs_per_gpu`` run on it. Jobs are placed in queue order (priority, fair share, age);
each goes to the node and devices where it fits most tightly (best fit: small jobs fill GPUs that are already in
use, whole GPUs stay free for big jobs). A multi-device job that cannot start yet reserves the devices that could
already take it, so that later single-device jobs cannot starve it (gang allocation). A job runs on one node: a job
that spans nodes is Slurm's to place (the Slurm executor, jobs/slurm.py), where each released job takes one slot.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GiB = 2**30


@dataclass
class Device:
    node: str
    index: int
    kind: str = "cpu"
    memory_total: int | None = None
    jobs: list = field(default_factory=list)  # memory estimates (bytes) of the jobs placed on it
    reserved: bool = False

    @property
    def free_memory(self) -> int | None:
        return None if self.memory_total is None else self.memory_total - sum(self.jobs)

    def capacity(self, jobs_per_gpu: int) -> int:
        return max(jobs_per_gpu, 1) if self.kind == "cuda" else 1

    def fits(self, memory: int, jobs_per_gpu: int, ignore_reservation: bool = False) -> bool:
        if (self.reserved and not ignore_reservation) or len(self.jobs) >= self.capacity(jobs_per_gpu):
            return False
        return self.memory_total is None or self.free_memory >= memory


@dataclass
class Decision:
    job: object
    node: str | None = None  # where rank 0 runs
    devices: list = field(default_factory=list)
    reason: str = ""  # why it waits: a code of REASONS ("" once placed)
    params: dict = field(default_factory=dict)

    @property
    def placed(self) -> bool:
        return self.node is not None


def decayed_seconds(started: float, ended: float, gpus: int, now: float, half_life: float) -> float:
    """Device-seconds of one run, counted half as much for every ``half_life`` seconds since it ended."""
    return max(ended - started, 0.0) * gpus * 0.5 ** (max(now - ended, 0.0) / half_life)


def fair_order(jobs: list, bonus: dict, running: dict, usage: dict, staff=frozenset()) -> list:
    """Queue order: priority first — the owner's quota bonus, plus the job's own priority when an admin (``staff``)
    owns it — then fair share: the owner's running jobs (fewest first), then the owner's decayed recent device use
    (least first); then a user's own job priority, which orders that user's jobs among themselves (as Slurm's
    ``nice``, it cannot push anyone else back); then age."""
    def key(j):
        admin = j.owner_id in staff
        return (-(bonus.get(j.owner_id, 0) + (j.priority if admin else 0)), running.get(j.owner_id, 0),
                usage.get(j.owner_id, 0.0), 0 if admin else -j.priority, j.created_at, j.pk)

    return sorted(jobs, key=key)


def devices_from_inventory(node: str, inventory: list[dict]) -> list[Device]:
    """Devices with their memory: a GPU's, or for a CPU slot the machine's RAM (jobs/devices.py)."""
    return [Device(node, d["index"], d.get("kind", "cpu"), d.get("memory_total")) for d in inventory]


def place(nodes: dict[str, list[Device]], gpus: int, memory: int, jobs_per_gpu: int):
    """The tightest (node, devices) that fits, or None."""
    best = None
    for name, devs in nodes.items():
        ok = [d for d in devs if d.fits(memory, jobs_per_gpu)]
        if len(ok) < gpus:
            continue
        ok.sort(key=lambda d: (d.free_memory if d.free_memory is not None else 0, -len(d.jobs), d.index))
        chosen = ok[:gpus]
        slack = sum(d.free_memory or 0 for d in chosen)
        if best is None or slack < best[0]:
            best = (slack, name, chosen)
    return (best[1], best[2]) if best else None


def never_fits(nodes: dict[str, list[Device]], gpus: int, memory: int) -> tuple[str, dict] | None:
    """Why no node could ever run such a job even when idle, as ("gpus" or "memory", parameters), or None;
    services.never_fits_text() renders it in the user's language."""
    if not nodes:
        return None
    most = max(len(devs) for devs in nodes.values())
    if gpus > most:
        return "gpus", {"gpus": gpus, "most": most}
    big = [sum(d.memory_total is None or d.memory_total >= memory for d in devs) for devs in nodes.values()]
    if any(b >= gpus for b in big):
        return None
    largest = max((d.memory_total or 0) for devs in nodes.values() for d in devs)
    return "memory", {"gib": f"{memory / GiB:.1f}", "largest": f"{largest / GiB:.1f}"}


# Why a job waits; services.wait_reason_text() renders these in the user's language.
REASONS = ("held", "gpu_memory", "slots", "no_nodes", "quota_running", "quota_hours", "slurm_pending")


def _reason(nodes, gpus: int, memory: int, jobs_per_gpu: int) -> tuple[str, dict]:
    if not nodes:
        return "no_nodes", {}
    cuda = any(d.kind == "cuda" for devs in nodes.values() for d in devs)
    unreserved = any(sum(d.fits(memory, jobs_per_gpu, ignore_reservation=True) for d in devs) >= gpus
                     for devs in nodes.values())
    if unreserved:
        return "held", {}
    if cuda:
        return "gpu_memory", {"n": gpus, "gib": f"{memory / GiB:.1f}"}
    return "slots", {"n": gpus}


def plan(queued: list, nodes: dict[str, list[Device]], jobs_per_gpu: int, memory_of=None, gpus_of=None,
         blocked=None, on_place=None) -> list[Decision]:
    """Place ``queued`` (already in queue order) onto ``nodes`` (mutated: placed jobs are added to their devices).

    ``memory_of(job)``/``gpus_of(job)`` read a job's needs (default: ``job.memory_estimate``, ``job.gpus``);
    ``blocked(job)`` returns (code, params) of a reason (a quota) that keeps a job waiting whatever the devices, or
    None;
    ``on_place(job)`` hears of each job placed (so a quota can count it).
    """
    memory_of = memory_of or (lambda j: j.memory_estimate or 0)
    gpus_of = gpus_of or (lambda j: j.gpus)
    out = []
    waits = {}  # (gpus, memory) -> why a job with those needs waits, while the devices stay as they were then
    for job in queued:
        why = blocked(job) if blocked else None
        if why:
            out.append(Decision(job, reason=why[0], params=why[1]))
            continue
        gpus, memory = gpus_of(job), memory_of(job)
        if (gpus, memory) in waits:  # a long queue of alike jobs: placed or explained once, not once per job
            out.append(Decision(job, reason=waits[(gpus, memory)][0], params=waits[(gpus, memory)][1]))
            continue
        spot = place(nodes, gpus, memory, jobs_per_gpu)
        if spot:
            name, chosen = spot
            for d in chosen:
                d.jobs.append(memory)
            out.append(Decision(job, name, [d.index for d in chosen]))
            if on_place:
                on_place(job)
            waits.clear()  # the devices changed
            continue
        code, params = _reason(nodes, gpus, memory, jobs_per_gpu)
        out.append(Decision(job, reason=code, params=params))
        if gpus > 1:  # gang: keep what could already take it for it
            devs = max(nodes.values(), key=lambda ds: sum(d.fits(memory, jobs_per_gpu) for d in ds), default=[])
            for d in devs:
                if d.fits(memory, jobs_per_gpu):
                    d.reserved = True
            waits.clear()
        else:
            waits[(gpus, memory)] = code, params
    return out


def estimated_starts(decisions: list[Decision], busy_until: dict, duration_of) -> dict:
    """Seconds from now until each waiting job may start, or None where it cannot be told.

    ``busy_until``: ``{(node, index): seconds until the device's current jobs end}`` for every device (0 = free);
    ``duration_of(job)``: expected run seconds of a job, or None. Each device is treated as one lane (shared GPUs
    as a whole); the waiting jobs take, in queue order, the ``gpus`` lanes of one node that free up first.
    """
    lanes = dict(busy_until)
    nodes = {}
    for node, index in lanes:
        nodes.setdefault(node, []).append(index)
    out = {}
    for d in decisions:
        if d.placed:
            out[d.job] = 0.0
            continue
        best = None
        for node, indices in nodes.items():
            if len(indices) < d.job.gpus:
                continue
            free = sorted(indices, key=lambda i: (lanes[(node, i)] is None, lanes[(node, i)] or 0))[:d.job.gpus]
            times = [lanes[(node, i)] for i in free]
            start = None if None in times else max(times)
            if start is not None and (best is None or start < best[0]):
                best = (start, node, free)
        if best is None:
            out[d.job] = None
            continue
        start, node, free = best
        out[d.job] = start
        length = duration_of(d.job)
        for i in free:
            lanes[(node, i)] = None if length is None else start + length
    return out
