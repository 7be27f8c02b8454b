"""Quotas as the queue and submissions apply them: device-hours used this week, what a user's jobs may take now."""
from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext as _

from accounts.models import UsageRecord
from accounts.services import check_storage, effective_quota, effective_quotas, storage_used, week_start
from minicloud.errors import ServiceError

from .. import scheduler
from ..models import Job


def device_hours(user, since, now=None, live=None) -> float:
    """Device-hours ``user`` used since ``since``: finished run segments (the part after ``since``) and the jobs
    running now (``live``: their (started_at, gpus), when the caller has read them)."""
    now = now or timezone.now()
    seconds = 0.0
    for r in UsageRecord.objects.filter(user=user, ended_at__gt=since):
        length = (r.ended_at - r.started_at).total_seconds()
        inside = (r.ended_at - max(r.started_at, since)).total_seconds()
        seconds += r.device_seconds * (inside / length if length > 0 else 1.0)
    if live is None:
        live = Job.objects.filter(owner=user, status__in=Job.LIVE, started_at__isnull=False).order_by().values_list(
            "started_at", "gpus")
    for started, gpus in live:
        seconds += max((now - max(started, since)).total_seconds(), 0.0) * gpus
    return seconds / 3600


def settle_run_segment(job: Job, started, ended) -> None:
    """The job's last run segment as its executor accounted it (a Slurm batch job's start and end, from scontrol or
    sacct), in place of the times the portal saw."""
    rec = UsageRecord.objects.filter(job=job).order_by("-ended_at", "-pk").first()
    if rec is not None and started and ended and ended >= started:
        UsageRecord.objects.filter(pk=rec.pk).update(started_at=started, ended_at=ended,
                                                     device_seconds=(ended - started).total_seconds() * rec.devices)


def hours_left(user) -> tuple[float, float | None]:
    """(device-hours ``user`` used this week, their weekly limit or None): what a running job's supervisor checks."""
    limit = effective_quota(user)["device_hours_per_week"]
    return (device_hours(user, week_start()) if limit is not None else 0.0), limit


def usage_summary(user) -> dict:
    """The quota and this week's use of ``user`` (the usage page and ``GET /api/v1/me``)."""
    return {"quota": effective_quota(user),
            "usage": {"device_hours_this_week": round(device_hours(user, week_start()), 4),
                      "storage_bytes": storage_used(user),
                      "week_start": week_start().isoformat(),
                      "running_jobs": Job.objects.filter(owner=user, status__in=Job.LIVE).count(),
                      "queued_jobs": Job.objects.filter(owner=user, status=Job.Status.QUEUED).count(),
                      "jobs": Job.objects.filter(owner=user).count()}}


def check_submission_quota(owner, gpus: int, time_limit_s, requeue: bool = False):
    """Refuse (403, naming the quota) what the owner's quota forbids at submission; returns the job's time limit,
    capped by the quota's wall-clock limit."""

    quota = effective_quota(owner)
    if not requeue:
        check_storage(owner, quota=quota)
    if not requeue and quota["max_gpus_per_job"] is not None and gpus > quota["max_gpus_per_job"]:
        raise ServiceError(
            _("gpus: over your quota: at most %(max_gpus_per_job)s device(s) per job")
            % {"max_gpus_per_job": quota["max_gpus_per_job"]},
            status=403,
            field="gpus",
        )
    queued, live = 0, None
    if quota["max_queued_jobs"] is not None or quota["device_hours_per_week"] is not None:
        # the owner's queued and live jobs in one read (a round trip to PostgreSQL fewer when a class has both limits)
        live = []
        for status, started, gpus in Job.objects.filter(
                owner=owner, status__in=(Job.Status.QUEUED, *Job.LIVE)).order_by().values_list(
                "status", "started_at", "gpus"):
            if status == Job.Status.QUEUED:
                queued += 1
            elif started is not None:
                live.append((started, gpus))
    if quota["max_queued_jobs"] is not None:
        if queued >= quota["max_queued_jobs"]:
            raise ServiceError(
                _("quota: you already have %(queued)s queued job(s), your limit is %(max_queued_jobs)s")
                % {"queued": queued, "max_queued_jobs": quota["max_queued_jobs"]},
                status=403,
                field="quota",
            )
    limit = quota["device_hours_per_week"]
    if limit is not None:
        used = device_hours(owner, week_start(), live=live)
        if used >= limit:
            raise ServiceError(
                _("quota: you have used %(used)s of your %(limit)s device-hours this week")
                % {"used": format(used, ".1f"), "limit": format(limit, "g")},
                status=403,
                field="quota",
            )
    if quota["max_job_hours"] is not None:
        cap = max(int(quota["max_job_hours"] * 3600), 1)
        time_limit_s = cap if time_limit_s is None else min(time_limit_s, cap)
    return time_limit_s


def recent_usage(owner_ids, now=None) -> dict:
    """Device-seconds each owner used, each job's share halved every FAIR_SHARE_HALF_LIFE_H since it ended."""
    now = now or timezone.now()
    half_life = settings.FAIR_SHARE_HALF_LIFE_H * 3600
    since = now - timedelta(seconds=half_life * 8)
    usage = {pk: 0.0 for pk in owner_ids}
    jobs = Job.objects.filter(owner_id__in=owner_ids, started_at__isnull=False).filter(
        Q(finished_at__isnull=True) | Q(finished_at__gte=since)).values("owner_id", "gpus", "started_at", "finished_at")
    for j in jobs:
        end = j["finished_at"] or now
        usage[j["owner_id"]] += scheduler.decayed_seconds(j["started_at"].timestamp(), end.timestamp(), j["gpus"],
                                                          now.timestamp(), half_life)
    return usage


def _owner_quotas(jobs) -> tuple[dict, dict]:
    """The owners of ``jobs`` ({id: user}) and their effective quotas ({id: quotas}), one read for all of them."""

    owners = get_user_model().objects.in_bulk({job.owner_id for job in jobs})
    return owners, effective_quotas(owners.values())


def _quota_gate(owners: dict, quotas: dict):
    """The scheduler's quota check for one planning pass over the jobs of ``owners`` (with their ``quotas``):
    (blocked(job) -> reason or None, placed(job)), counting the jobs the pass places as running."""

    running, hours = {}, {}
    for owner_id in Job.objects.filter(status__in=Job.LIVE).values_list("owner_id", flat=True):
        running[owner_id] = running.get(owner_id, 0) + 1
    since = week_start()

    def blocked(job):
        owner = owners[job.owner_id]
        q = quotas[owner.pk]
        if q["max_running_jobs"] is not None and running.get(owner.pk, 0) >= q["max_running_jobs"]:
            return "quota_running", {"n": running.get(owner.pk, 0), "limit": q["max_running_jobs"]}
        if q["device_hours_per_week"] is not None:
            if owner.pk not in hours:
                hours[owner.pk] = device_hours(owner, since)
            if hours[owner.pk] >= q["device_hours_per_week"]:
                return "quota_hours", {"used": f"{hours[owner.pk]:.1f}", "limit": f"{q['device_hours_per_week']:g}"}
        return None

    def placed(job):
        running[job.owner_id] = running.get(job.owner_id, 0) + 1

    return blocked, placed
