"""Experiment trackers, fed by a job's supervisor (never by the training loop): TensorBoard event files for every job
(``<run_dir>/tensorboard``: ``tensorboard --logdir $MINICLOUD_HOME/runs`` shows every run), and W&B or SwanLab when
the job asks (``Job.trackers``), with the owner's own key, online when a key and the network are there and offline
(synced later with ``wandb sync`` / ``swanlab sync``) otherwise.

The supervisor only puts points on a queue; one thread per run does the logging, so a slow or failing tracker never
slows the supervisor's reading of the training output, and a tracker that fails is switched off with a note in the job
log: it never fails a job."""
from __future__ import annotations

import math
import queue
import socket
import threading

HOSTS = {"wandb": "api.wandb.ai", "swanlab": "api.swanlab.cn"}
QUEUE_POINTS = 100_000  # beyond this many unlogged points (a tracker stuck for hours), new ones are dropped


def _numbers(values: dict) -> dict:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _online(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


class TensorBoard:
    name = "TensorBoard"

    def __init__(self, job, run_dir):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(run_dir / "tensorboard"), flush_secs=10)
        self.note = f"tracker: TensorBoard event files in {run_dir / 'tensorboard'}"

    def log(self, step, values):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self):
        self.writer.close()


class _Hosted:
    """A tracker with a server (W&B, SwanLab): online when asked, or when ``auto`` finds a key and the network;
    offline into the run folder otherwise."""

    name = host = ""

    def __init__(self, job, run_dir, project, mode, key):
        online = mode == "online" or (mode == "auto" and bool(key) and _online(self.host))
        self.run, where = self._init(job, run_dir, project, online, key)
        self.note = (f"tracker: {self.name} run {where}" if online else
                     f"tracker: {self.name} offline run in {where[0]}; sync it later with `{where[1]}`")

    def log(self, step, values):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


class WandB(_Hosted):
    name, host = "W&B", HOSTS["wandb"]

    def _init(self, job, run_dir, project, online, key):
        import wandb

        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, api_key=key or None)
        run = wandb.init(project=project, name=f"job-{job.pk} {job.name}", id=f"minicloud-job-{job.pk}",
                         dir=str(run_dir), mode="online" if online else "offline", resume="allow",
                         config=job.resolved_config, settings=settings, reinit="create_new")
        return run, (run.url if online else (run_dir / "wandb", f"wandb sync {run_dir / 'wandb'}/offline-run-*"))


class SwanLab(_Hosted):
    name, host = "SwanLab", HOSTS["swanlab"]

    def _init(self, job, run_dir, project, online, key):
        import swanlab

        if online:
            swanlab.login(api_key=key, relogin=True, save=False)
        run = swanlab.init(project=project, name=f"job-{job.pk} {job.name}", config=job.resolved_config,
                           mode="online" if online else "offline", log_dir=str(run_dir / "swanlab"), reinit=True)
        return run, (f"(project {project})" if online else
                     (run_dir / "swanlab", f"swanlab sync {run_dir / 'swanlab'}/run-*"))


class RunTrackers:
    """The trackers of one supervised run. ``log`` never blocks; ``close`` waits (bounded) for what is queued."""

    def __init__(self, job, run_dir):
        self.job, self.run_dir = job, run_dir
        self.points: queue.Queue = queue.Queue(maxsize=QUEUE_POINTS)
        self.notes: list[str] = []
        self.dropped = 0
        self.thread = threading.Thread(target=self._work, name=f"trackers-job-{job.pk}", daemon=True)
        self.closed = False

    def start(self) -> "RunTrackers":
        self.thread.start()
        return self

    def log(self, step: int, values: dict) -> None:
        try:
            self.points.put_nowait((int(step), _numbers(values)))
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 60) -> None:
        if self.closed or not self.thread.is_alive():
            self.closed = True
            return
        self.closed = True
        self.points.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.notes.append("tracker: still logging after the run ended; left to finish in the background")

    def drain_notes(self) -> list[str]:
        out, self.notes[:] = list(self.notes), []
        return out

    def _open(self) -> list:
        from .models import Integrations

        backends = []
        wanted = [("tensorboard", {})] + list((self.job.trackers or {}).items())
        prefs = Integrations.objects.filter(user_id=self.job.owner_id).first() if self.job.trackers else None
        for name, opts in wanted:
            try:
                if name == "tensorboard":
                    backend = TensorBoard(self.job, self.run_dir)
                else:
                    key = prefs.secret(f"{name}_key") if prefs else ""
                    cls = {"wandb": WandB, "swanlab": SwanLab}[name]
                    try:
                        backend = cls(self.job, self.run_dir, opts.get("project", "minicloud"),
                                      opts.get("mode", "auto"), key)
                    except Exception as exc:  # noqa: BLE001 -- online failed: log offline instead
                        if opts.get("mode", "auto") == "offline":
                            raise
                        self.notes.append(f"tracker: {cls.name} online failed ({_first_line(exc)}); offline instead")
                        backend = cls(self.job, self.run_dir, opts.get("project", "minicloud"), "offline", key)
                backends.append(backend)
                self.notes.append(backend.note)
            except Exception as exc:  # noqa: BLE001 -- a tracker never fails a job
                self.notes.append(f"tracker: {name} is off for this run: {_first_line(exc)}")
        return backends

    def _work(self):
        from django.db import connection

        try:
            backends = self._open()
        finally:
            connection.close()  # this thread's own database connection (the key lookup)
        while True:
            item = self.points.get()
            if item is None:
                break
            step, values = item
            for b in list(backends):
                try:
                    b.log(step, values)
                except Exception as exc:  # noqa: BLE001
                    backends.remove(b)
                    self.notes.append(f"tracker: {b.name} stopped: {_first_line(exc)}")
        for b in backends:
            try:
                b.close()
            except Exception as exc:  # noqa: BLE001
                self.notes.append(f"tracker: {b.name} did not close cleanly: {_first_line(exc)}")
        if self.dropped:
            self.notes.append(f"tracker: {self.dropped} points were not logged (the trackers fell behind)")


def _first_line(exc) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]
