"""Runs one claimed job as a child process (or, under the Slurm executor, as a Slurm batch job: jobs/slurm.py) and
mirrors its events into the database.

The child is ``python -u -m training run SPEC.json`` in a new process group (forked from this worker's warm engine
when it runs on a CPU slot: jobs/engine_process.py), with only the environment a training run needs (``engine_env``:
never the database URL, the secret key or an admin's password). Its stdout and stderr are read by a thread: a line
that starts with the run's event token (drawn for each run, training/events.py) is an event, anything else log
text; every ``JOB_POLL_S`` the supervisor writes the new metric points and log text in one short transaction (while
the job still has this run's generation), checks for cancellation, node shutdown and its owner's weekly hours, and
signals the group: SIGTERM (the engine checkpoints and exits), then SIGKILL after ``JOB_KILL_GRACE_S``. A Slurm run is followed through its output file on the shared storage and signalled with
``scancel``; Slurm enforces its time limit, and the supervisor of a node that stops detaches from it (the run goes
on, and the node follows it again when it starts: ``Supervisor(job, attach=True)``).
"""
from __future__ import annotations

import json
import logging
import queue
import secrets
import signal
import sys
import threading
import time
from datetime import datetime, timezone as dt_tz

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext_noop

from minicloud.errors import explained
from minicloud.processes import engine_env, kill_group
from models_registry.services import record_evaluation, register_job_output
from training import events

from . import engine_process, services, slurm
from .devices import cpu_job_threads, inventory
from .models import Job, LogChunk, MetricPoint, Node
from .trackers import RunTrackers

log = logging.getLogger("jobs")


def _format(event: dict) -> str:
    """One human-readable log line for an engine event."""
    stamp = datetime.fromtimestamp(event.get("time", time.time()), dt_tz.utc).strftime("%H:%M:%S")
    kind = event.get("event")
    if kind == "step":
        m = event.get("metrics", {})
        parts = ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in m.items())
        return f"[{stamp}] step {event['step']}/{event.get('total_steps', '?')} (epoch {event.get('epoch')}) {parts}"
    if kind == "log":
        return f"[{stamp}] {event.get('message', '')}"
    if kind == "start":
        where = event.get("device")
        if where == "cpu" and event.get("threads"):
            where = f"cpu ({event['threads']} threads)"
        return (f"[{stamp}] started {event.get('stage')} on {where}: {event.get('total_steps')} steps, "
                f"{event.get('samples')} samples")
    if kind == "sample":
        prompt = event.get("prompt", "").replace("\n", "⏎")[-200:]
        response = event.get("response", "").replace("\n", "⏎")[:400]
        return f"[{stamp}] sample {event.get('step')} (reward {event.get('reward', 0):.3g}): {prompt} → {response}"
    if kind == "eval":
        return f"[{stamp}] eval at step {event.get('step')}: " + ", ".join(
            f"{k}: {v:.4g}" for k, v in event.get("metrics", {}).items())
    if kind == "checkpoint":
        return f"[{stamp}] checkpoint at step {event.get('step')}"
    if kind == "progress":
        return f"[{stamp}] preparing data: {100 * _number(event, 'fraction'):.0f} %, {int(_number(event, 'records'))} records"
    if kind == "done":
        return f"[{stamp}] done after {event.get('step')} steps"
    if kind == "stopped":
        return f"[{stamp}] stopped by signal at step {event.get('step')}; resume continues from here"
    if kind == "error":
        return f"[{stamp}] ERROR {event.get('message', '')}"
    return f"[{stamp}] {json.dumps(event, ensure_ascii=False)}"


def _number(event: dict, key: str) -> float:
    value = event.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def notify(job_id: int) -> None:
    """Wake the job's WebSocket consumers at once (only a cross-process layer can reach them)."""
    if not settings.REDIS_URL:
        return
    try:
        from asgiref.sync import async_to_sync
        from channels.layers import get_channel_layer

        async_to_sync(get_channel_layer().group_send)(f"job.{job_id}", {"type": "job.update"})
    except Exception:  # the database stays the source of truth; consumers also poll it
        log.warning("channel layer push failed for job %s", job_id, exc_info=True)


def engine_command(spec_path, n_devices: int) -> list[str]:
    """The training child on this node: the engine itself, or torchrun with one process per allocated device (DDP;
    NCCL on GPUs, gloo on CPU slots), whose rank 0 alone writes events. (A run over several nodes is the Slurm
    executor's: jobs/slurm.py.)"""
    run = ["-m", "training", "run", str(spec_path)]
    if n_devices <= 1:
        return [sys.executable, "-u", *run]
    return [sys.executable, "-u", "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_devices}", *run]


def _device_env(node_name: str, devices: list[int]) -> dict:
    """``engine_env`` with CUDA_VISIBLE_DEVICES for a child on ``node_name``'s ``devices`` (empty for CPU slots).
    A child on CPU slots also gets MINICLOUD_NICE (settings.CPU_JOB_NICE): it trains on the cores that serve the
    portal, and a burst of requests must not wait behind its matmuls (training/__main__.py lowers its priority); and
    OMP_NUM_THREADS, its share of the node's cores (``devices.cpu_job_threads``; each process of a multi-slot job
    has one slot's share), so that the jobs of several slots do not each start a thread per core."""
    node = Node.objects.filter(name=node_name).first()
    node_devices = node.devices if node else inventory()
    kinds = {d["index"]: d["kind"] for d in node_devices}
    cuda = devices and all(kinds.get(i) == "cuda" for i in devices)
    env = dict(engine_env(), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES=",".join(map(str, devices)) if cuda else "")
    if not cuda:
        if settings.CPU_JOB_NICE:
            env["MINICLOUD_NICE"] = str(settings.CPU_JOB_NICE)
        slots = sum(d["kind"] == "cpu" for d in node_devices)
        env["OMP_NUM_THREADS"] = str(cpu_job_threads(slots, settings.CPU_JOB_THREADS))
    return env


class FileLine(str):
    """A line of a followed file (a Slurm run's output), with the offset after it: one queue item, so the offset the
    supervisor records is always that of the last line it recorded."""

    def __new__(cls, text: str, position: int):
        line = super().__new__(cls, text)
        line.position = position
        return line


class Supervisor:
    def __init__(self, job: Job, attach: bool = False):
        self.job = job
        self.proc = None  # the run's handle once started (engine_process.launch or slurm.submit / SlurmRun)
        self.attach = attach  # follow the job's Slurm run that another supervisor started (jobs/services/nodes.py)
        self.slurm = job.executor == "slurm" if attach else settings.EXECUTOR == "slurm"
        self.read_pos = None  # Slurm: how far the output file is recorded
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seq = (MetricPoint.objects.filter(job=job).order_by("-seq").values_list("seq", flat=True).first() or 0)
        last = LogChunk.objects.filter(job=job).order_by("-offset").first()
        self.log_offset = last.offset + len(last.text) if last else 0
        self.done_event = None
        self.error_event = None
        self.stopped_event = None  # the engine checkpointed and stopped on a SIGTERM
        self.trackers = None  # RunTrackers once the child runs (jobs/trackers.py)
        self.tail: list[str] = []
        self.term_sent_at = None
        self.killed = False
        # "cancel", "pause", "quota", "shutdown", "timeout" or "lost" once the child must stop; "detach"
        # once a Slurm run is left to run on unfollowed
        self.reason = None
        self.quota_checked_at = time.monotonic()
        self.hours = None  # the message parameters of the weekly device-hours once they ran out
        self.peak_memory = job.peak_memory
        self.steps_started = False  # the engine's start event came: its data is ready
        # only lines that start with it are events (training/events.py); a followed Slurm run keeps its own
        self.token = job.slurm["token"] if attach else secrets.token_hex(16)
        self.slurm_saved = dict(job.slurm) if attach else {}
        self.generation = job.generation  # the run's fencing token: writes only while the job still has it

    def _reader(self, stream):
        try:
            for raw in iter(stream.readline, ""):
                line = raw.rstrip("\n")
                self.lines.put(FileLine(line, stream.position) if hasattr(stream, "position") else line)
        finally:
            self.lines.put(None)  # always: the supervisor waits for this to finish the job

    def start(self) -> None:
        self.job.run_dir.mkdir(parents=True, exist_ok=True)
        self.raw_log = open(self.job.run_dir / "engine.log", "a", encoding="utf-8")
        if self.attach:
            rec = self.job.slurm
            self.proc = slurm.SlurmRun(rec["id"], self.job.run_dir / f"slurm-{rec['id']}.out", read=rec.get("read") or 0)
        else:
            spec_path = services.write_spec(self.job)
            devices = self.job.devices
            if self.slurm:
                env = dict(engine_env(), PYTHONUNBUFFERED="1", MINICLOUD_EVENT_TOKEN=self.token)
                self.proc = slurm.submit(self.job, spec_path, env)
            else:
                env = dict(_device_env(self.job.node, devices), MINICLOUD_EVENT_TOKEN=self.token)
                self.proc = engine_process.launch(engine_command(spec_path, len(devices)), env=env,
                                                  cwd=str(settings.BASE_DIR))
        self.started = time.monotonic()
        if self.slurm:
            self.slurm_saved = self._slurm_record()
            Job.objects.filter(pk=self.job.pk, generation=self.generation).update(
                executor="slurm", slurm=self.slurm_saved, pid=None)
        else:
            Job.objects.filter(pk=self.job.pk).update(pid=self.proc.pid, executor="local", slurm={})
        threading.Thread(target=self._reader, args=(self.proc.stdout,), daemon=True).start()

    def flush(self) -> bool:
        """Write what the child printed since the last flush. Returns False once its output has ended."""
        points, text, updates, ended = [], [], {}, False
        while True:
            try:
                item = self.lines.get_nowait()
            except queue.Empty:
                break
            if item is None:
                ended = True
                break
            if isinstance(item, FileLine):
                self.read_pos = item.position
            line = str(item)
            if self.reason == "lost":
                continue  # the job is another node's now: its output is not ours to record
            event, line = self._event(line)
            self.raw_log.write(line + "\n")
            if not isinstance(event, dict) or "event" not in event:
                text.append(line)
                self.tail = (self.tail + [line])[-20:]
                continue
            kind = event["event"]
            text.append(_format(event))
            if kind in ("step", "eval"):
                self.seq += 1
                points.append(MetricPoint(job=self.job, seq=self.seq, step=event["step"], time=event["time"],
                                          values=event.get("metrics", {})))
                if self.trackers is not None:
                    self.trackers.log(event["step"], event.get("metrics", {}))
                if kind == "step":
                    updates.update(step=event["step"], total_steps=event.get("total_steps", 0),
                                   eta_s=event.get("eta_s"))
                    peak = (event.get("metrics") or {}).get("peak_mem_gb")
                    if isinstance(peak, (int, float)) and peak * 2**30 > (self.peak_memory or 0):
                        self.peak_memory = int(peak * 2**30)
                        updates["peak_memory"] = self.peak_memory
            elif kind == "start":
                self.steps_started = True
                updates.update(total_steps=event.get("total_steps", 0), step=event.get("resumed_from_step", 0),
                               phase={})
            elif kind == "progress" and not self.steps_started:  # later: a background build, shown in the log
                updates["phase"] = {"name": str(event.get("phase", ""))[:20], "fraction": _number(event, "fraction"),
                                    "records": int(_number(event, "records"))}
            elif kind == "stopped":
                self.stopped_event = event
            elif kind == "done":
                self.done_event = event
                updates.update(step=event.get("step", 0))
            elif kind == "error" and self.error_event is None:
                self.error_event = event  # the first error is the cause (a failed rank stops the others with theirs)
        if self.trackers is not None:
            text += self.trackers.drain_notes()  # where the trackers log, or why one stopped
        self.raw_log.flush()
        if self.slurm and self.reason != "lost":  # (detached: what it recorded, and how far it read, still count)
            updates.update(self._slurm_updates())
        if points or text or updates:
            chunk = "".join(t + "\n" for t in text)
            with transaction.atomic():
                if not self._still_ours():
                    self._lose()
                    return not ended
                if points:
                    MetricPoint.objects.bulk_create(points)
                if chunk:
                    LogChunk.objects.create(job=self.job, offset=self.log_offset, text=chunk)
                if updates:
                    Job.objects.filter(pk=self.job.pk).update(**updates)
            self.log_offset += len(chunk)
            notify(self.job.pk)
            if "started_at" in updates:  # one fewer of ours waits in Slurm: the next may be released (_slurm_gate)
                services.kick_queue()
        return not ended

    def _slurm_updates(self) -> dict:
        """Job fields to write for a Slurm run: its state, reason, nodes and how far its output is read, when they
        changed; its start once it runs (the run's device-hours count from Slurm's start, not from the release)."""
        rec = self._slurm_record()
        starts = not rec["ran"] and rec.get("start") and rec.get("state") == "RUNNING"
        if starts:
            rec["ran"] = True
        if rec == self.slurm_saved:
            return {}
        self.slurm_saved = rec
        return {"slurm": rec, **({"started_at": datetime.fromisoformat(rec["start"])} if starts else {})}

    def _slurm_record(self) -> dict:
        """Job.slurm of this run as it stands: Slurm's word on it, how far its output is recorded, its token, and
        whether it has run (kept from what was saved last)."""
        read = self.read_pos if self.read_pos is not None else self.slurm_saved.get("read") or 0
        return {**self.proc.record(read), "token": self.token, "ran": bool(self.slurm_saved.get("ran"))}

    def _still_ours(self) -> bool:
        """Whether the job still has this run's generation (locked until the transaction ends, on PostgreSQL)."""
        return Job.objects.select_for_update().filter(pk=self.job.pk, generation=self.generation).exists()

    def _lose(self) -> None:
        """The job is another run's now: stop the child at once and write nothing more (a Slurm run is another
        supervisor's to follow now: this one only stops following it)."""
        self.reason = "lost"
        if self.slurm:
            self.proc.detach()
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGKILL)
        self.killed = True

    def _event(self, line: str) -> tuple[dict | None, str]:
        """(the event, the line without the token) for a line the engine wrote as an event; (None, line) for anything
        else (``training.events.parse``)."""
        return events.parse(line, self.token)

    def check_stop(self) -> None:
        """Stop the child when the job is cancelled or paused, the node shuts down or the time limit passes:
        SIGTERM first (the engine checkpoints and exits), SIGKILL after JOB_KILL_GRACE_S."""
        if self.proc.poll() is not None:
            return
        if self.reason is None:
            status, node, generation = Job.objects.filter(pk=self.job.pk).values_list(
                "status", "node", "generation").first() or (None, None, None)
            limit = None if self.slurm else self.job.time_limit_s  # Slurm's --time enforces it there
            if status not in Job.LIVE or node != self.job.node or generation != self.generation:
                # Another node took the job over (this node was declared down): stop at once, write nothing more.
                self._lose()
                return
            stopping = Node.objects.filter(name=self.job.node).values_list("stopping", flat=True).first()
            if status == Job.Status.CANCELLING:
                self.reason = "cancel"
            elif status == Job.Status.PAUSING:
                self.reason = "pause"
            elif stopping and self.slurm:
                self.reason = "detach"  # the Slurm run goes on; this node follows it again when it starts
                self.proc.detach()
                return
            elif stopping:
                self.reason = "shutdown"
            elif limit and time.monotonic() - self.started > limit:
                self.reason = "timeout"
            elif time.monotonic() - self.quota_checked_at > settings.QUOTA_CHECK_S and self._hours_used_up():
                self.reason = "quota"
                self.job.transition(Job.Status.PAUSING, "quota", gettext_noop(
                    "the weekly quota of %(limit)s device-hours is used up (%(used)s): pausing at a checkpoint"),
                    self.hours)
            if self.reason:
                self._signal(signal.SIGTERM)
                self.term_sent_at = time.monotonic()
        elif not self.killed and time.monotonic() - self.term_sent_at > settings.JOB_KILL_GRACE_S:
            self._signal(signal.SIGKILL)
            self.killed = True

    def _hours_used_up(self) -> bool:
        """Whether the owner's weekly device-hours ran out while the job runs (this job's own hours counted): the
        one quota a running job can pass, so it is paused with the reason rather than let run on."""
        self.quota_checked_at = time.monotonic()
        used, limit = services.hours_left(self.job.owner)
        if limit is None or used < limit:
            return False
        self.hours = {"limit": format(limit, "g"), "used": format(used, ".2f")}
        return True

    def _signal(self, sig) -> None:
        if self.slurm:
            self.proc.send_signal(sig)
        else:
            kill_group(self.proc.pid, sig)

    def run(self) -> str:
        """Start the child, mirror it until it exits, record the outcome. Returns the final status."""
        try:
            self.start()
        except Exception as exc:
            self._stop_run()  # launched, then a failure (recording its pid): no engine left training unfollowed
            services.finish_job(self.job, Job.Status.FAILED,
                                error=gettext_noop("could not start the training process: %(error)s"),
                                error_params={"error": str(exc)})
            return Job.Status.FAILED
        try:
            self.trackers = RunTrackers(self.job, self.job.run_dir).start()
            try:
                while self.flush():
                    self.check_stop()
                    time.sleep(settings.JOB_POLL_S)
                self.proc.wait()
                self.trackers.close()
                self.flush()
            finally:
                self.trackers.close()
                self.raw_log.close()
            return self.finish(self.proc.returncode)
        except Exception as exc:
            return self.failed(exc)

    def _stop_run(self) -> None:
        """Kill the run this supervisor started, if it did and it still runs (its failure paths)."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self._signal(signal.SIGKILL)
        except Exception:
            log.exception("job %s: could not stop its run", self.job.pk)

    def failed(self, exc: Exception) -> str:
        """The supervisor itself failed (a defect of ours, a lost database connection): the job must not stay live
        with nobody following it (its worker lives on, so the housekeeping would not take it for orphaned) and the
        worker's next jobs must still start. Its run is stopped, and the job ends as an orphaned one does: a cancel
        or a pause completes, a running job is interrupted (and resumes from its checkpoint while the automatic-resume
        budget lasts)."""
        log.exception("job %s: the supervisor failed", self.job.pk)
        try:
            job = Job.objects.get(pk=self.job.pk)
        except Exception:  # the database is gone too: at least no run goes on unrecorded
            self._stop_run()
            raise
        if job.generation != self.generation or self.reason in ("lost", "detach"):
            return job.status  # another supervisor has the job, and its run, now: neither is this one's to end
        self._stop_run()
        if job.status in Job.LIVE:
            services.end_orphaned(job, gettext_noop("the job's supervisor failed: %(error)s"),
                                  gettext_noop("the job's supervisor failed while pausing: %(error)s"),
                                  {"error": f"{type(exc).__name__}: {exc}"[:500]})
        return Job.objects.get(pk=self.job.pk).status

    def finish(self, rc: int) -> str:
        job = Job.objects.get(pk=self.job.pk)
        S = Job.Status
        if self.reason in ("lost", "detach") or job.generation != self.generation:
            return job.status
        outcome = getattr(self.proc, "outcome", None)  # how Slurm ended a Slurm run, when Slurm did
        if outcome == "gone" and self.done_event is not None:
            outcome, rc = None, 0  # Slurm forgot it, but the engine said it finished
        if self.slurm and not self.slurm_saved.get("ran"):
            Job.objects.filter(pk=job.pk).update(started_at=timezone.now())  # it never ran: no device-hours
            job.started_at = timezone.now()
        if self.done_event is not None and rc == 0 and "evaluation" in self.done_event:
            record_evaluation(job, self.done_event["evaluation"])
            services.finish_job(job, S.SUCCEEDED)
        elif self.done_event is not None and rc == 0:
            try:
                mv = register_job_output(job, model_path=self.done_event["model_path"],
                                         model_config=self.done_event["model_config"],
                                         parameters=self.done_event.get("params", 0),
                                         lora_path=self.done_event.get("lora_path", ""),
                                         adapter_path=self.done_event.get("adapter_path", ""))
            except (OSError, KeyError) as exc:
                services.finish_job(job, S.FAILED, error=gettext_noop("could not register the model: %(error)s"),
                                    error_params={"error": str(exc)})
            else:
                services.finish_job(job, S.SUCCEEDED, output_model=mv)
        elif self.reason == "cancel" or job.status == S.CANCELLING:
            services.finish_job(job, S.CANCELLED)
        elif self.reason in ("quota", "pause") or job.status == S.PAUSING:
            if self.reason == "quota":
                why = gettext_noop("paused at step %(step)s: the weekly quota of %(limit)s device-hours is used up "
                                   "(%(used)s); resume it next week or ask an admin for more")
            else:
                why = gettext_noop("checkpoint at step %(step)s")
            paused = job.transition(S.PAUSED, job.node, why, {"step": job.step, **(self.hours or {})},
                                    pid=None, worker_pid=None, resume=job.checkpoint_path.exists())
            if paused and self.reason == "quota":
                services.job_event(job, "paused_quota")
        elif outcome == "cancelled":
            services.finish_job(job, S.CANCELLED, actor="slurm", error=gettext_noop(
                "cancelled in Slurm (scancel outside the portal) as Slurm job %(id)s"), error_params={
                "id": self.proc.slurm_id})
        elif self.reason == "timeout" or outcome == "timeout":
            limit = gettext_noop("time limit of %(limit)s s reached at step %(step)s; retry continues from the last "
                                 "checkpoint")
            services.finish_job(job, S.FAILED, error=limit, error_params={"limit": job.time_limit_s, "step": job.step})
        elif outcome == "preempted":  # not the job's doing: every time, as when a node shuts down
            services.interrupt_job(job, gettext_noop("Slurm preempted the run on %(nodes)s for a job of a higher "
                                                     "priority: it resumes from its last checkpoint"),
                                   {"nodes": self.proc.info.get("nodes")}, counts=False,
                                   requeued=gettext_noop("requeued after Slurm preempted it"))
        elif outcome == "lost":
            services.interrupt_job(job, gettext_noop("Slurm ended the run (%(state)s on %(nodes)s): it resumes from "
                                                     "its last checkpoint"),
                                   {"state": self.proc.info.get("state"), "nodes": self.proc.info.get("nodes")})
        elif outcome == "never":
            services.finish_job(job, S.FAILED, error=gettext_noop(
                "Slurm can never start this job as its cluster is configured (%(reason)s): ask for fewer devices or "
                "less time, or ask the admin"), error_params={"reason": self.proc.info.get("reason")})
        elif outcome == "oom":
            services.finish_job(job, S.FAILED, error=gettext_noop(
                "Slurm stopped the run: it used more host memory than its --mem (%(mem)s)"),
                error_params={"mem": slurm.host_memory(job)})
        elif self.reason == "shutdown":
            services.interrupt_job(job, gettext_noop("the node is shutting down"), counts=False)
        elif self.error_event is not None:
            services.finish_job(job, S.FAILED, **engine_error(self.error_event))
        elif self.stopped_event is not None:
            # a SIGTERM the portal did not send (an admin's kill; Slurm preempting a run that ended within the
            # GraceTime, where only sacct could be asked and it keeps no PreemptTime): the engine checkpointed first
            services.interrupt_job(job, gettext_noop("stopped at step %(step)s by a signal from outside the portal "
                                                     "(an admin, or Slurm preempting it): it resumes from the "
                                                     "checkpoint it wrote"), {"step": self.stopped_event.get("step")})
        elif outcome == "gone":
            services.interrupt_job(job, gettext_noop("Slurm no longer knows job %(id)s and keeps no accounting to "
                                                     "ask: it resumes from its last checkpoint"),
                                   {"id": self.proc.slurm_id})
        elif rc and rc < 0:
            services.interrupt_job(job, gettext_noop("the training process was killed by signal %(signal)s"),
                                   {"signal": -rc})
        else:
            services.finish_job(job, S.FAILED,
                                error=gettext_noop("training process exited with code %(code)s: %(tail)s"),
                                error_params={"code": rc, "tail": " | ".join(self.tail[-3:])})
        if self.slurm and self.slurm_saved.get("ran"):
            info = self.proc.info
            services.settle_run_segment(job, *(datetime.fromisoformat(info[k]) if info.get(k) else None
                                               for k in ("start", "end")))
        notify(job.pk)
        return Job.objects.filter(pk=job.pk).values_list("status", flat=True).first()


def engine_error(event: dict) -> dict:
    """finish_job's error arguments for the engine's error event: its English template and parameters where it sends
    them (the errors it explains, such as running out of memory), else its one line as it is."""
    if (pair := explained(event)) is not None:
        return {"error": pair[0], "error_params": pair[1]}
    if event.get("message"):
        return {"error": event["message"]}
    return {"error": gettext_noop("training failed"), "error_params": {}}
