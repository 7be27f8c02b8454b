"""The Slurm executor: a job the portal releases runs as a Slurm batch job (``MINICLOUD_EXECUTOR=slurm``).

The portal keeps the queue, fair share, quotas and priorities and releases at most ``MINICLOUD_SLURM_MAX_JOBS`` jobs
at once (jobs/devices.py counts them as this node's slots); Slurm places each one. Everything here goes through
Slurm's own commands (``sbatch``, ``scontrol``, ``scancel``, ``sacct``), as a lab's admin would:

- ``submit`` writes the run's batch script into its run folder (resources from the job: ``--gres=gpu:N`` or CPU tasks,
  ``--mem`` from the memory estimate, ``--time`` from the time limit, ``--nodes`` when the job asks for more devices
  than a node has, the owner and job id in ``--job-name``/``--comment``) and submits it with ``sbatch --parsable``.
  One engine process runs as ``srun python -m training run SPEC``; several run as ``srun torchrun`` with one task
  per node and torchrun's c10d rendezvous on the allocation's first node.
- The engine writes its events to the job's output file (``slurm-ID.out``) on the shared storage; ``SlurmRun`` is
  the supervisor's handle on the batch job, shaped like a ``subprocess.Popen`` (``stdout``, ``poll``, ``wait``,
  ``send_signal``): ``stdout`` follows that file, ``poll`` asks ``scontrol`` (then ``sacct``) for the state, SIGTERM
  is ``scancel --signal=TERM`` (the job steps alone: the engine checkpoints and exits, the batch script ends with
  its code) and SIGKILL is ``scancel``.
- How a run ended, when Slurm ended it (``outcome``): "cancelled" (``scancel`` from outside the portal), "timeout"
  (its ``--time``), "preempted" (a job of a higher priority took its nodes: ``PREEMPTED``, or ended within the
  GraceTime after its SIGTERM; it resumes from its checkpoint, every time: that SIGTERM lets the engine write one),
  "lost" (``NODE_FAIL``, ``BOOT_FAIL``: the portal resumes it from its checkpoint, once, as for a crash), "oom" (over
  its ``--mem``), "gone" (Slurm forgot it and there is no accounting), "never"
  (pending for a reason that cannot clear, such as more nodes than the partition has: cancelled, the job fails).

The supervisor (jobs/supervisor.py) does the rest as for a local run: events to the database, pause/cancel, the end.
A portal that restarts finds its Slurm jobs still running and follows them again from where it stopped reading
(``Job.slurm["read"]``).
"""
from __future__ import annotations

import math
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone as dt_timezone
from pathlib import Path

from django.conf import settings

MiB = 2**20
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT", "STOPPED"}
OUTCOMES = {"CANCELLED": "cancelled", "TIMEOUT": "timeout", "DEADLINE": "timeout", "NODE_FAIL": "lost",
            "PREEMPTED": "preempted", "BOOT_FAIL": "lost", "OUT_OF_MEMORY": "oom"}
# Reasons a pending job gives when the cluster as configured can never run it (Slurm accepts such a job unless
# EnforcePartLimits is set, and leaves it pending for ever): the portal cancels it and fails the job, saying why.
NEVER_REASONS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
                 "InvalidQOS", "QOSMaxNodePerJobLimit", "QOSMaxGRESPerJob", "QOSMaxCpuPerJobLimit"}
COMMAND_TIMEOUT_S = 30


class SlurmError(Exception):
    """A Slurm command failed; its message is Slurm's own."""


def _run(*cmd: str, env: dict | None = None) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, env=env,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"{cmd[0]}: {exc}") from None
    if out.returncode:
        said = (out.stderr or out.stdout).strip()
        raise SlurmError(said.splitlines()[-1] if said else f"{cmd[0]} exited with code {out.returncode}")
    return out.stdout


# --- the batch script ---------------------------------------------------------------------------------------------

def layout(devices: int) -> tuple[int, int]:
    """(nodes, devices per node) for a job asking for ``devices``: as few nodes as hold them, the same number on
    each (torchrun's layout)."""
    per_node = max(settings.SLURM_DEVICES_PER_NODE, 1)
    nodes = max(math.ceil(devices / per_node), 1)
    while devices % nodes:
        nodes += 1
    return nodes, devices // nodes


def gpu_shards(job) -> int:
    """K for ``--gres=shard:K``: a one-GPU job whose memory estimate fits in K of a GPU's MINICLOUD_SLURM_SHARDS_PER_GPU
    shares (Slurm's GPU sharing, as the local executor packs small jobs onto one GPU); 0 for a whole GPU."""
    shards, gpu_bytes = settings.SLURM_SHARDS_PER_GPU, settings.SLURM_GPU_MEMORY_GB * 2**30
    if job.gpus != 1 or shards <= 1 or not gpu_bytes or not job.memory_estimate or not settings.SLURM_GRES:
        return 0
    k = max(math.ceil(job.memory_estimate * shards / gpu_bytes), 1)
    return k if k < shards else 0


def host_memory(job) -> str:
    """``--mem`` per node: the estimate for each of its devices (a CPU device's model lives in RAM, a GPU job's host
    copy is smaller), and a GiB for the interpreter, torch and the data."""
    return f"{math.ceil((job.memory_estimate or 0) * layout(job.gpus)[1] * 1.25 / MiB) + 1024}M"


def sbatch_options(job) -> list[str]:
    nodes, per_node = layout(job.gpus)
    opts = [f"--job-name=minicloud-{job.pk}", f"--comment=minicloud job {job.pk} of {job.owner.username}",
            f"--nodes={nodes}", "--ntasks-per-node=1", "--no-requeue", "--open-mode=append",
            f"--chdir={settings.BASE_DIR}", f"--output={job.run_dir}/slurm-%j.out"]
    cpus = per_node * max(settings.SLURM_CPUS_PER_DEVICE, 1)
    shards = gpu_shards(job)
    if shards:
        opts.append(f"--gres=shard:{shards}")
    elif settings.SLURM_GRES:
        opts.append(f"--gres={settings.SLURM_GRES}:{per_node}")
    opts += [f"--cpus-per-task={cpus}", f"--mem={host_memory(job)}"]
    if job.time_limit_s:
        opts.append(f"--time={max(math.ceil(job.time_limit_s / 60), 1)}")
    for flag, value in (("--partition", settings.SLURM_PARTITION), ("--account", settings.SLURM_ACCOUNT),
                        ("--qos", settings.SLURM_QOS)):
        if value:
            opts.append(f"{flag}={value}")
    return opts + shlex.split(settings.SLURM_EXTRA_ARGS)


def batch_script(job, spec_path: Path) -> str:
    """The script ``sbatch`` runs on the allocation's first node: the options as #SBATCH lines (readable in the run
    folder), then the engine under ``srun``, whose exit code becomes the job's."""
    nodes, per_node = layout(job.gpus)
    py = shlex.quote(sys.executable)
    spec = shlex.quote(str(spec_path))
    lines = ["#!/bin/bash", *(f"#SBATCH {shlex.quote(o)}" for o in sbatch_options(job)),
             f"# MiniCloud job {job.pk}: {nodes} node(s) x {per_node} device(s)",
             # each engine process its share of the task's CPUs (torchrun starts one per device)
             f"export OMP_NUM_THREADS={max(settings.SLURM_CPUS_PER_DEVICE, 1)}"]
    if not settings.SLURM_GRES:
        lines.append("export CUDA_VISIBLE_DEVICES=")  # a CPU partition: the engine's "auto" device is the CPU
    if nodes == 1 and per_node == 1:
        lines.append(f"exec srun --kill-on-bad-exit=1 {py} -u -m training run {spec}")
    else:
        lines += [
            'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            # the node's address as Slurm knows it (NodeAddr: the host name unless the admin set another)
            'addr=$(scontrol show node "$head" -o | sed -n "s/.* NodeAddr=\\([^ ]*\\).*/\\1/p")',
            f"exec srun --kill-on-bad-exit=1 {py} -u -m torch.distributed.run --nnodes={nodes} "
            f"--nproc_per_node={per_node} --rdzv_backend=c10d --rdzv_endpoint=\"${{addr:-$head}}:$((20000 + "
            f"SLURM_JOB_ID % 20000))\" --rdzv_id=\"$SLURM_JOB_ID\" -m training run {spec}",
        ]
    return "\n".join(lines) + "\n"


def submit(job, spec_path: Path, env: dict) -> "SlurmRun":
    """Write the batch script into the run folder and ``sbatch`` it with ``env`` (the engine's environment: Slurm
    passes the submitting environment to the job). Raises SlurmError with Slurm's refusal."""
    script = job.run_dir / "job.sbatch"
    script.write_text(batch_script(job, spec_path))
    out = _run("sbatch", "--parsable", str(script), env=env)
    slurm_id = out.strip().split(";")[0]
    if not slurm_id.isdigit():
        raise SlurmError(f"sbatch answered {out.strip()!r}")
    return SlurmRun(slurm_id, job.run_dir / f"slurm-{slurm_id}.out")


# --- what Slurm says of a job -------------------------------------------------------------------------------------

def _time(value: str | None) -> str | None:
    """Slurm's time stamp (the local time of this machine) as an ISO string in UTC, or None ("Unknown", "None")."""
    if not value or not value[0].isdigit():
        return None
    try:
        return datetime.fromisoformat(value).astimezone().astimezone(dt_timezone.utc).isoformat()
    except ValueError:
        return None


def query(slurm_id: str) -> dict | None:
    """{"state", "reason", "nodes", "start", "end", "exit", "preempted"} from ``scontrol show job`` (Slurm keeps an
    ended job there for MinJobAge), else from ``sacct`` (accounting, when the cluster has it); None when Slurm no
    longer knows the job. Raises SlurmError when the controller cannot be asked (the run is not taken for gone then).

    ``preempted``: Slurm chose the job for preemption (its PreemptTime). A job that exits within the partition's
    GraceTime, as the engine does once the SIGTERM has made it checkpoint, ends FAILED (its exit code, 143), not
    PREEMPTED: only PreemptTime tells the two apart. sacct keeps no such field: there such a run reads FAILED, and
    the engine's own "stopped" event says that it checkpointed on a SIGTERM (jobs/supervisor.py resumes it)."""
    return from_scontrol(slurm_id) or from_sacct(slurm_id)


def from_scontrol(slurm_id: str) -> dict | None:
    """``query`` as ``scontrol`` answers it; None once it has forgotten the job."""
    try:
        text = _run("scontrol", "show", "job", "-o", slurm_id)
    except SlurmError as exc:
        if "invalid job id" not in str(exc).lower():
            raise  # slurmctld unreachable or busy: ask again later
        return None
    fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", text))
    if not fields.get("JobState"):
        return None
    return {"state": fields["JobState"], "reason": fields.get("Reason", "None"),
            "nodes": "" if fields.get("NodeList") in (None, "(null)") else fields["NodeList"],
            "start": _time(fields.get("StartTime")), "end": _time(fields.get("EndTime")),
            "exit": fields.get("ExitCode", ""), "preempted": _time(fields.get("PreemptTime")) is not None}


def from_sacct(slurm_id: str) -> dict | None:
    """``query`` as Slurm's accounting (``sacct``) answers it; None without accounting or a record of the job."""
    try:
        line = _run("sacct", "-j", slurm_id, "-X", "-n", "-P", "-o",
                    "State,Reason,NodeList,Start,End,ExitCode,DerivedExitCode")
    except SlurmError:
        return None
    parts = line.strip().splitlines()[0].split("|") if line.strip() else []
    if len(parts) < 7:
        return None
    # the engine's exit code is its step's: sacct's ExitCode of a job whose srun step exited 143 reads "15:0"
    # (Slurm 22.05; scontrol says 143:0), its DerivedExitCode (the highest of its steps') "143:0" when Slurm recorded
    # one (not always: "0:0"); the engine's "stopped" event, not this code, says that a run stopped on a signal
    code = parts[6] if parts[6] and parts[6] != "0:0" else parts[5]
    return {"state": parts[0].split()[0], "reason": parts[1],
            "nodes": "" if parts[2] == "None assigned" else parts[2], "start": _time(parts[3]),
            "end": _time(parts[4]), "exit": code, "preempted": parts[0].startswith("PREEMPTED")}


def exit_code(exit_field: str) -> int:
    """Slurm's ExitCode "CODE:SIGNAL" as subprocess reports it (negative for a signal)."""
    code, _, sig = exit_field.partition(":")
    if sig.isdigit() and int(sig):
        return -int(sig)
    return int(code) if code.isdigit() else 1


# --- the supervisor's handle --------------------------------------------------------------------------------------

class SlurmRun:
    """A Slurm batch job seen like a subprocess.Popen by the supervisor."""

    pid = None  # nothing of it runs here

    def __init__(self, slurm_id: str, out_path: Path, read: int = 0):
        self.slurm_id, self.out_path = slurm_id, out_path
        self.returncode = None
        self.outcome = None  # how Slurm ended it, when Slurm did (module docstring)
        self.info = {"state": "PENDING", "reason": "None", "nodes": "", "start": None}
        self.detached = False  # the portal stops following (its node shuts down); the Slurm job goes on
        self._checked = 0.0
        self._lock = threading.Lock()
        self.stdout = _Follower(self, read)

    def record(self, read: int) -> dict:
        """What Job.slurm keeps of this run (the supervisor adds the token); ``read``: how far its output is
        recorded."""
        return {"id": self.slurm_id, **{k: self.info.get(k) for k in ("state", "reason", "nodes", "start")},
                "read": read}

    def poll(self):
        with self._lock:
            if self.returncode is not None or self.detached:
                return self.returncode
            if time.monotonic() - self._checked < settings.SLURM_POLL_S:
                return None
            self._checked = time.monotonic()
            try:
                info = query(self.slurm_id)
            except SlurmError:
                return None  # Slurm's controller did not answer: the run is as it was, ask again later
            if info is None:  # forgotten, and no accounting: the events alone tell how it went
                self.outcome, self.returncode = "gone", 1
                return self.returncode
            self.info = info
            state = info["state"]
            if state == "PENDING" and info["reason"] in NEVER_REASONS:
                self.send_signal(signal.SIGKILL)  # scancel: nothing of it stays pending in Slurm
                self.outcome, self.returncode = "never", 1
                return self.returncode
            if state in ACTIVE:
                return None
            # preempted: also when it ended within the GraceTime on its own (FAILED, 143), not only when Slurm
            # cancelled it after; a run that finished (COMPLETED) is done whatever was asked of it
            self.outcome = "preempted" if info.get("preempted") and state != "COMPLETED" else OUTCOMES.get(state)
            self.returncode = exit_code(info["exit"]) if state in ("COMPLETED", "FAILED") else (
                -signal.SIGTERM if self.outcome in ("cancelled", "timeout") else 1)
            return self.returncode

    def wait(self):
        while self.poll() is None and not self.detached:
            time.sleep(min(settings.SLURM_POLL_S, 1.0))
        return self.returncode

    def send_signal(self, sig) -> None:
        """SIGTERM: the engine's steps checkpoint and exit (a job still pending is simply cancelled); else
        scancel."""
        try:
            if sig == signal.SIGTERM and self.info.get("state") != "PENDING":
                _run("scancel", "--signal=TERM", self.slurm_id)
            else:
                _run("scancel", self.slurm_id)
        except SlurmError:
            pass  # it has ended already: poll() will say how

    def detach(self) -> None:
        self.detached = True


class _Follower:
    """The job's output file, line by line, as it grows: ``readline`` waits for a whole line and answers "" once
    the job has ended and everything it wrote is read (or the portal detaches). ``position``: the offset after the
    last line returned (what a portal that restarts reads on from)."""

    def __init__(self, run: SlurmRun, position: int):
        self.run, self.position = run, position
        self._file = None
        self._partial = b""

    def readline(self) -> str:
        while True:
            line = self._next()
            if line is not None:
                return line
            if self.run.detached:
                return ""
            if self.run.returncode is not None or self.run.poll() is not None:
                # Ended. Open the file again (on NFS a fresh open sees what another host wrote last), read the rest.
                self.close()
                line = self._next(final=True)
                if line is not None:
                    return line
                self.close()
                return ""
            time.sleep(0.2)

    def _next(self, final: bool = False) -> str | None:
        if self._file is None:
            if not self.run.out_path.exists():
                return None
            self._file = open(self.run.out_path, "rb")
            self._file.seek(self.position + len(self._partial))
        self._partial += self._file.readline()
        if self._partial.endswith(b"\n") or (final and self._partial):
            line, self._partial = self._partial, b""
            self.position += len(line)
            return line.decode("utf-8", errors="replace")
        return None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
