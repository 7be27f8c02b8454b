"""The device inventory of this node, from NVML (never CUDA: Django processes fork) or ``MINICLOUD_DEVICES``.

No Django import here, so settings can size the worker pool from it.
"""
from __future__ import annotations

import os


def machine_memory() -> int:
    """This machine's RAM in bytes: what a CPU slot's job can use at most."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_cores() -> int:
    """The cores this process may run on (its affinity: a container's or a cgroup's cpuset, not the host's count)."""
    return len(os.sched_getaffinity(0))


def core_share(n: int) -> int:
    """The cores each of ``n`` processes gets when they share this machine's cores (at least one)."""
    return max(1, cpu_cores() // max(n, 1))


def cpu_job_threads(slots: int, override: int = 0) -> int:
    """Threads for each training process of a job on a node with ``slots`` CPU slots: the node's cores shared among
    its slots, or ``override`` (settings.CPU_JOB_THREADS) when set. Torch's default is every core for every process:
    two jobs on a 2-core node with two slots then ran 2.2x slower each than with a core each, four 2.9x (their
    OpenMP threads spin while they wait for the cores the other jobs hold; bench/cpu_slots.py, docs/performance.md)."""
    return override if override > 0 else core_share(slots)


def _cpu_slots(n: int) -> list[dict]:
    """N CPU slots, each as large as the machine's RAM (a job on a CPU slot is bounded by it: the scheduler and
    submissions refuse what could never fit, as for a GPU's memory)."""
    ram = machine_memory()
    return [{"index": i, "kind": "cpu", "name": f"CPU slot {i}", "memory_total": ram, "memory_used": None,
             "utilization": None, "temperature": None} for i in range(n)]


def _parse(spec: str) -> list[dict] | None:
    """``cpu:N`` → N CPU slots; ``gpu`` or empty → NVML. Anything else is refused loudly."""
    spec = spec.strip()
    if not spec or spec == "gpu":
        return None
    kind, _, count = spec.partition(":")
    if kind == "cpu" and count.isdigit() and int(count) > 0:
        return _cpu_slots(int(count))
    raise ValueError(f"MINICLOUD_DEVICES={spec!r}: use 'cpu:N' (N CPU slots) or 'gpu' (every GPU NVML sees)")


def nvml_devices() -> list[dict]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
            except pynvml.NVMLError:
                util = None
            try:
                temp = pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
            except pynvml.NVMLError:
                temp = None
            name = pynvml.nvmlDeviceGetName(h)
            out.append({"index": i, "kind": "cuda", "name": name.decode() if isinstance(name, bytes) else name,
                        "memory_total": mem.total, "memory_used": mem.used, "utilization": util,
                        "temperature": temp})
        return out
    finally:
        pynvml.nvmlShutdown()


def slurm_slots(n: int) -> list[dict]:
    """Under the Slurm executor a node's "devices" are the jobs it may have handed to Slurm at once
    (MINICLOUD_SLURM_MAX_JOBS): the portal keeps the order and the quotas, Slurm places each job on its nodes."""
    return [{"index": i, "kind": "slurm", "name": f"Slurm job slot {i}", "memory_total": None, "memory_used": None,
             "utilization": None, "temperature": None} for i in range(n)]


def inventory(spec: str | None = None) -> list[dict]:
    """This node's devices: Slurm's job slots under the Slurm executor, else the override, else every NVML GPU,
    else one CPU slot."""
    if spec is None and os.environ.get("MINICLOUD_EXECUTOR", "").strip().lower() == "slurm":
        return slurm_slots(int(os.environ.get("MINICLOUD_SLURM_MAX_JOBS", "16")))
    parsed = _parse(os.environ.get("MINICLOUD_DEVICES", "") if spec is None else spec)
    if parsed is not None:
        return parsed
    return nvml_devices() or _cpu_slots(1)


def slot_count(spec: str | None = None) -> int:
    return len(inventory(spec))


def worker_count(jobs_per_gpu: int, spec: str | None = None) -> int:
    """Job runners this node needs: one per CPU slot, ``jobs_per_gpu`` per GPU (small jobs share a GPU)."""
    return sum(max(jobs_per_gpu, 1) if d["kind"] == "cuda" else 1 for d in inventory(spec))
