"""Nodes: registration, heartbeats, device samples, reconciling a restarted node (its Slurm runs followed again), the
shared-storage check. Moving jobs between machines when one fails is Slurm's (the Slurm executor, jobs/slurm.py)."""
from __future__ import annotations

import os
from datetime import timedelta

from django.apps import apps
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from django.utils.translation import gettext_noop

from minicloud.errors import ServiceError
from minicloud.processes import kill_group, pid_alive

from ..models import DeviceSample, Job, Node, Setting
from .lifecycle import finish_job, interrupt_job
from .queue import _local_devices, background_task, enqueue, node_queue


def check_shared_storage() -> None:
    """Every node must see the same MINICLOUD_HOME (datasets, checkpoints and models live there): the first node
    writes a marker with a random id and records the id in the database; a node that cannot read the same id
    refuses to start."""
    import uuid

    marker = settings.HOME / ".minicloud-storage"
    with transaction.atomic():
        row, created = Setting.objects.get_or_create(key="storage_id", defaults={"value": uuid.uuid4().hex})
    if created:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(row.value)
    found = marker.read_text().strip() if marker.exists() else None
    if found != row.value:
        raise ServiceError(
            f"MINICLOUD_HOME={settings.HOME} is not the storage the other nodes use: "
            + ("it has no marker file .minicloud-storage" if found is None else "its marker file names another one")
            + ". Mount the shared filesystem (NFS) there on every node (docs/deploy.md).", status=500)


def reconcile_node(node_name: str, *, starting: bool) -> list[int]:
    """Jobs of this node whose supervisor is gone: stop any orphan training process, then interrupt (and maybe
    requeue) them. At start every live job is orphaned; later (housekeeping) only those whose worker died."""
    done = []
    for job in Job.objects.filter(node=node_name, status__in=Job.LIVE):
        if not starting and pid_alive(job.worker_pid):
            continue
        if job.executor == "slurm" and job.slurm.get("id"):
            follow_slurm_job(job)  # the Slurm run goes on without the portal: follow it again
            continue
        kill_group(job.pid)  # nobody reads its events any more
        if starting:
            end_orphaned(job, gettext_noop("the node restarted"), gettext_noop("the node stopped while pausing"))
        else:
            end_orphaned(job, gettext_noop("the job's supervisor died"),
                         gettext_noop("the job's supervisor died while pausing"))
        done.append(job.pk)
    return done


def reconcile_background(node_name: str, *, starting: bool) -> int:
    """Background work of this node whose worker is gone (a tokenizer's training, a dataset's statistics; killed, out
    of memory, the node restarted): the record says it failed and why, instead of showing the work in progress
    forever (django-q2 never runs a task again whose worker died: ``max_attempts`` 1). At start every one of this
    node's is gone, later those whose process died. Each model with such work says which rows are in progress, the
    field that names their worker (``<node>:<pid>``, ``queue.this_worker``) and what a lost one becomes (a
    ``background_work`` classmethod), so this knows no kind of record. The number of records ended."""
    ended = 0
    for model in apps.get_models():
        if not callable(getattr(model, "background_work", None)):
            continue
        rows, field, lost = model.background_work()
        for pk, worker in rows.filter(**{f"{field}__startswith": f"{node_name}:"}).values_list("pk", field):
            node, _, pid = worker.rpartition(":")
            if node == node_name and (starting or not pid_alive(int(pid))):
                ended += rows.filter(pk=pk, **{field: worker}).update(**lost, **{field: ""})
    return ended


RESEND_AFTER_S = 600


def resend_background(after_s: float = RESEND_AFTER_S) -> int:
    """Send again the task of background work that no worker took within ``after_s`` of its sending (an upload's
    check, a dataset's statistics): its token may be lost (its node gone before the node's background cluster took
    it, a Redis that keeps nothing restarted), and the work would say "queued" or "checking" for good. A duplicate
    does nothing (each task claims its record), and the sender stamps the ask first, so one node's housekeeping sends
    it per interval. Each model with such work says which rows wait, the field keeping their ask (``at``: when it was
    sent) and their task (a ``queued_work`` classmethod). The number sent."""
    now = timezone.now()
    cutoff = (now - timedelta(seconds=after_s)).isoformat()
    sent = 0
    for model in apps.get_models():
        if not callable(getattr(model, "queued_work", None)):
            continue
        rows, field, task = model.queued_work()
        for row in rows:
            ask = getattr(row, field)
            if ask.get("at", "") > cutoff:
                continue
            if rows.filter(pk=row.pk, **{field: ask}).update(**{field: {**ask, "at": now.isoformat()}}):
                func, *args = task(row)
                # named as at its first sending: check-upload-<id>, dataset-stats-<id>
                background_task(func, *args, task_name=f"{func.rsplit('.', 1)[-1].replace('_', '-')}-{row.pk}")
                sent += 1
    return sent


def follow_slurm_job(job: Job) -> None:
    """Have one of this node's runners follow ``job``'s Slurm run from where the last supervisor stopped reading."""
    enqueue("jobs.tasks.follow_slurm_job", job.pk, job.generation, queue=node_queue(job.node),
            task_name="follow_slurm_job")


def take_over_slurm_job(job_id: int, generation: int) -> Job | None:
    """The job, now this worker's to follow (a new generation fences out any supervisor still following it), or
    None when its run ended, moved on, or another token took it first."""
    if not Job.objects.filter(pk=job_id, generation=generation, status__in=Job.LIVE, executor="slurm").update(
            generation=F("generation") + 1, worker_pid=os.getpid()):
        return None
    return Job.objects.get(pk=job_id)


def end_orphaned(job: Job, reason: str, pausing_reason: str, params: dict | None = None) -> bool:
    """A live job whose supervisor is gone: a cancel completes, a pause completes (resumable from its checkpoint),
    a running job is interrupted with ``reason`` (and maybe requeued). True for the interrupted case."""
    if job.status == Job.Status.CANCELLING:
        finish_job(job, Job.Status.CANCELLED, actor="system")
    elif job.status == Job.Status.PAUSING:
        job.transition(Job.Status.PAUSED, "system", pausing_reason, params or {}, pid=None, worker_pid=None,
                       resume=job.checkpoint_path.exists())
    else:
        interrupt_job(job, reason, params)
        return True
    return False


def register_node(node_name: str) -> Node:
    devices = _local_devices()
    node, _created = Node.objects.update_or_create(
        name=node_name, defaults={"devices": devices, "started_at": timezone.now(),
                                  "heartbeat_at": timezone.now(), "stopping": False})
    sample_devices(node_name, devices)
    return node


def beat(node_name: str) -> None:
    """This node's heartbeat (the serve loop of a worker node, every MINICLOUD_HEARTBEAT_S)."""
    Node.objects.filter(name=node_name).update(heartbeat_at=timezone.now(), stopping=False)


def refresh_node(node_name: str) -> None:
    devices = _local_devices()
    Node.objects.filter(name=node_name).update(devices=devices, heartbeat_at=timezone.now())
    sample_devices(node_name, devices)


SAMPLES_KEPT = timedelta(hours=24)


def sample_devices(node_name: str, devices: list[dict]) -> None:
    """Store one compact reading of the node's devices (the devices page charts the last hour); prune old ones."""
    running = {}
    for devs in Job.objects.filter(node=node_name, status__in=Job.LIVE).values_list("devices", flat=True):
        for i in devs or []:
            running[i] = running.get(i, 0) + 1
    readings = []
    for d in devices:
        i = d["index"]
        util = d.get("utilization") if d.get("kind") == "cuda" else (100 if running.get(i) else 0)
        readings.append([i, util, d.get("memory_used"), running.get(i, 0)])
    DeviceSample.objects.create(node=node_name, readings=readings)
    DeviceSample.objects.filter(time__lt=timezone.now() - SAMPLES_KEPT).delete()
