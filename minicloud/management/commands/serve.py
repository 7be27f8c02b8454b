"""``manage.py serve``: everything of one node under one parent.

Sets up (migrate, static files, demo data, first admin), reconciles jobs a previous run left behind, then starts
daphne (HTTP + WebSocket), the node's chat worker and the django-q2 cluster as children in their own sessions, so a
terminal's Ctrl-C reaches only this parent. On SIGINT/SIGTERM it stops running training processes (they checkpoint;
their jobs resume on the next start), then the children: SIGTERM, then SIGKILL after a grace period. Nothing is left
running.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand

from jobs.devices import worker_count
from minicloud.processes import die_with_parent, kill_group
from models_registry.inference import node_socket


class Command(BaseCommand):
    help = "Start the MiniCloud node: web server (daphne) and job workers (django-q2 cluster)."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=settings.PORT)
        parser.add_argument("--no-setup", action="store_true", help="skip migrate/collectstatic/demo data")
        role = parser.add_mutually_exclusive_group()
        role.add_argument("--web", action="store_true", help="only the web server (daphne): pages, API, WebSockets")
        role.add_argument("--worker", action="store_true",
                          help="only this node's job runner: its django-q2 cluster, device sampling, training")

    def handle(self, *args, host, port, no_setup, web, worker, **options):
        from accounts.services import ensure_first_admin
        from jobs import services
        from minicloud.errors import ServiceError

        # Ctrl-C or SIGTERM during the setup below (migrations, the first admin, reconciling this node's jobs) is
        # kept and honoured once the setup is done, so a migration is never cut in half and the signal is not lost.
        self.stopping = False
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        self.web, self.worker = not worker, not web
        if not no_setup and self.web:
            call_command("migrate", interactive=False, verbosity=0)
            call_command("collectstatic", interactive=False, verbosity=0)
        admin = ensure_first_admin() if self.web else None
        role = "web" if not self.worker else "worker" if not self.web else "all"
        self.pidfile = settings.HOME / "run" / f"serve-{settings.NODE_NAME}-{role}.json"
        _kill_leftovers(self.pidfile)
        if self.worker:
            try:
                services.check_shared_storage()
            except ServiceError as exc:
                self.stderr.write(str(exc))
                sys.exit(2)
            if settings.EXECUTOR == "slurm" and not all(map(shutil.which, ("sbatch", "scontrol", "scancel"))):
                self.stderr.write("MINICLOUD_EXECUTOR=slurm, but Slurm's commands (sbatch, scontrol, scancel) are not "
                                  "on PATH: run the worker on a Slurm login node (docs/deploy.md).")
                sys.exit(2)
            services.register_node(settings.NODE_NAME)
            requeued = services.reconcile_node(settings.NODE_NAME, starting=True)
            services.reconcile_background(settings.NODE_NAME, starting=True)
            self._ensure_schedule()
            if requeued:
                self.stdout.write(f"Requeued interrupted jobs to resume: {requeued}")

        if self.stopping:
            self.stdout.write("Stopped before starting.")
            return
        py = sys.executable
        # Own sessions, so a terminal's Ctrl-C reaches only this parent; killed with it if it dies (PDEATHSIG), and
        # recorded in a pidfile so a later start can clear what a `kill -9` of this parent left behind.
        self.children = {}
        if self.web:
            # Several daphne processes accept on one listening socket (the kernel spreads the connections), so pages
            # render on several cores; each is a plain daphne given the socket's file descriptor.
            listener = socket.create_server((host, port), backlog=1024, reuse_port=False)
            # Accepted connections inherit TCP_NODELAY (Linux), as uvicorn and gunicorn set it: twisted writes a
            # response's headers and body separately, which Nagle's algorithm may hold for the peer's delayed ACK.
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The web processes' request metrics, summed by whichever answers a scrape (minicloud/metrics.py).
            metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR")
                               or settings.HOME / "run" / f"prometheus-{settings.NODE_NAME}")
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir(parents=True)
            # One generation worker for the node's chats, which every web process speaks to (its socket's name in
            # their environment): one batch for a class whichever process accepted each chat.
            self.chat_socket = node_socket()
            self.children["chat"] = self._chat_worker()
            for n in range(settings.WEB_PROCESSES):
                self.children[f"web{n or ''}"] = subprocess.Popen(
                    [py, "-m", "daphne", "--fd", str(listener.fileno()), "minicloud.asgi:application"],
                    cwd=settings.BASE_DIR, start_new_session=True, pass_fds=(listener.fileno(),),
                    env={**os.environ, "MINICLOUD_WEB_PROCESS": "1",  # keeps its database connections
                         "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "MINICLOUD_CHAT_SOCKET": self.chat_socket},
                    preexec_fn=die_with_parent(signal.SIGTERM))
            listener.close()  # the children hold it
        if self.worker:
            runners = worker_count(settings.JOBS_PER_GPU)  # one per CPU slot, JOBS_PER_GPU per GPU
            # The job runners' cluster, one of their own for tokenizer training and dataset statistics
            # (settings.BACKGROUND_QUEUE), and one for the checks that make a dataset usable (settings.CHECKS_QUEUE).
            for name, env in (("workers", {"MINICLOUD_JOB_RUNNERS": str(runners)}),
                              ("background", {"Q_CLUSTER_NAME": settings.BACKGROUND_QUEUE}),
                              ("checks", {"Q_CLUSTER_NAME": settings.CHECKS_QUEUE})):
                self.children[name] = subprocess.Popen(
                    [py, "manage.py", "workers"], cwd=settings.BASE_DIR, start_new_session=True,
                    env={**os.environ, **env}, preexec_fn=die_with_parent(signal.SIGKILL))
        self._write_pidfile()
        where = f"at http://{host}:{port}" if self.web else "as a worker"
        self.stdout.write(self.style.SUCCESS(f"MiniCloud is starting {where}  (node {settings.NODE_NAME}, "
                                             f"role {role}, data in {settings.HOME})"))
        if admin and admin[1]:
            self.stdout.write(self.style.WARNING(f"Log in as '{admin[0]}' with password: {admin[1]}  "
                                                 "(shown once; change it in /admin/)"))
        elif admin:
            self.stdout.write(f"Log in as '{admin[0]}' with the password from DJANGO_SUPERUSER_PASSWORD.")
        elif self.web:
            self.stdout.write("Log in with your account; `python manage.py changepassword admin` resets a password.")
        self.stdout.write("Press Ctrl-C to stop.")
        if self.worker:
            services.kick_queue()  # queued jobs from before this start
        sys.stdout.flush()
        code = 0
        next_beat = 0.0
        chat_started = time.monotonic()
        while not self.stopping:
            for name, proc in self.children.items():
                if proc.poll() is None or self.stopping:
                    continue
                if name == "chat":  # the chat worker died (the OOM killer, say): its chats failed, a new one serves
                    if time.monotonic() - chat_started > 5:  # the next (not more often than every 5 s)
                        self.stderr.write(f"the chat worker exited with code {proc.returncode}; starting it again")
                        self.children["chat"], chat_started = self._chat_worker(), time.monotonic()
                        self._write_pidfile()
                else:
                    self.stderr.write(f"{name} exited with code {proc.returncode}; stopping")
                    code = 1
                    self.stopping = True
            if self.worker and time.monotonic() >= next_beat:
                next_beat = time.monotonic() + settings.NODE_HEARTBEAT_S
                self._beat()
            time.sleep(0.3)
        self._shutdown()
        sys.exit(code)

    def _write_pidfile(self):
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.pidfile.write_text(json.dumps({name: p.pid for name, p in self.children.items()}))

    def _chat_worker(self):
        """The node's generation worker: it serves the web processes on ``self.chat_socket`` and exits when this
        parent goes (its stdin closes)."""
        from models_registry.inference import worker_args, worker_env

        return subprocess.Popen(
            [sys.executable, "-m", "training", "chat-worker", "--listen", self.chat_socket, *worker_args()],
            cwd=settings.BASE_DIR, start_new_session=True, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            env=worker_env(), preexec_fn=die_with_parent(signal.SIGTERM))

    def _beat(self):
        """This node's heartbeat, which the devices page shows (a database hiccup is not fatal)."""
        from django.db import DatabaseError, close_old_connections

        from jobs import services

        try:
            services.beat(settings.NODE_NAME)
        except DatabaseError as exc:
            self.stderr.write(f"heartbeat failed: {exc}")
            close_old_connections()

    def _on_signal(self, signum, frame):
        self.stopping = True

    def _ensure_schedule(self):
        """This node's housekeeping, run by its own cluster (each node samples and reconciles itself)."""
        from django_q.models import Schedule

        Schedule.objects.filter(name="minicloud-housekeeping").delete()  # the single-node schedule of old
        Schedule.objects.update_or_create(
            name=f"minicloud-housekeeping-{settings.NODE_NAME}"[:100],
            defaults={"func": "jobs.tasks.housekeeping", "schedule_type": Schedule.MINUTES, "minutes": 1,
                      "repeats": -1, "cluster": settings.NODE_QUEUE})

    def _shutdown(self):
        from jobs.models import Job, Node

        if not self.worker:
            self._stop_children()
            return
        self.stdout.write("Stopping: checkpointing running jobs …")
        Node.objects.filter(name=settings.NODE_NAME).update(stopping=True)
        grace = settings.JOB_KILL_GRACE_S + 5
        deadline = time.monotonic() + grace
        # The supervisors see `stopping`, SIGTERM their training groups and mark the jobs interrupted.
        # (Slurm runs go on: their supervisors only stop following them, and the next start follows them again.)
        while time.monotonic() < deadline and Job.objects.filter(
                node=settings.NODE_NAME, status__in=Job.LIVE).exclude(executor="slurm").exists():
            if self.children["workers"].poll() is not None:
                break
            time.sleep(0.3)
        for pid in Job.objects.filter(node=settings.NODE_NAME, status__in=Job.LIVE).exclude(
                pid=None).values_list("pid", flat=True):
            kill_group(pid, signal.SIGKILL)  # the supervisor is gone; reconcile requeues these on the next start
        self._stop_children()

    def _stop_children(self):
        # SIGTERM to each child itself, which stops its own processes in order; the group gets SIGKILL afterwards.
        # (django-q2's cluster stops in about a second this way; with SIGTERM to its whole group at once its sentinel
        # waited out the whole grace period for children that had already died.)
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.children.values():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.children.values():
            kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
        self.pidfile.unlink(missing_ok=True)
        self.stdout.write("Stopped.")


def _kill_leftovers(pidfile):
    """Kill the process groups a previous `serve` of this node left running (it was killed without cleaning up)."""
    try:
        old = json.loads(pidfile.read_text())
    except (OSError, ValueError):
        return
    pgids = set(old.values())
    for proc in os.listdir("/proc"):
        if not proc.isdigit():
            continue
        try:
            pgrp = int(open(f"/proc/{proc}/stat").read().rsplit(")", 1)[1].split()[2])
            cmd = open(f"/proc/{proc}/cmdline", "rb").read().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if pgrp in pgids and any(name in cmd for name in ("qcluster", "workers", "daphne", "chat-worker")):  # ours
            kill_group(pgrp, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)

