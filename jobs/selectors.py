"""Reads used by views, the API and consumers."""
from django.db import close_old_connections

from .models import Job, LogChunk, MetricPoint


def jobs_for(user):
    qs = Job.objects.select_related("owner", "dataset", "output_model")
    return qs if user.is_staff else qs.filter(owner=user)


def job_for_user(job_id, user):
    return jobs_for(user).filter(pk=job_id).first()


POINT_FIELDS = ("seq", "step", "time", "values")


def metrics_after(job, after=0, limit=5000):
    return list(MetricPoint.objects.filter(job=job, seq__gt=after).order_by("seq").values(*POINT_FIELDS)[:limit])


def metric_history(job, max_points=10_000):
    """Every point for a chart, downsampled by stride to at most ``max_points`` (the first and last always kept);
    the full resolution stays in the database and the API."""
    qs = MetricPoint.objects.filter(job=job).order_by("seq").values(*POINT_FIELDS)
    n = qs.count()
    if n <= max_points:
        return list(qs)
    stride = -(-n // max_points)
    return [p for i, p in enumerate(qs.iterator()) if i % stride == 0 or i == n - 1]


def metric_keys(points) -> list[str]:
    keys = []
    for p in points:
        for k in p["values"]:
            if k not in keys:
                keys.append(k)
    return keys


def log_after(job, offset=0, limit=1_000_000):
    """Log text from character ``offset``; returns (text, next_offset)."""
    chunks = LogChunk.objects.filter(job=job).order_by("offset")
    last_before = chunks.filter(offset__lte=offset).order_by("-offset").values_list("offset", flat=True).first()
    if last_before is not None:
        chunks = chunks.filter(offset__gte=last_before)
    text, end = [], offset
    for chunk in chunks:
        start = max(offset - chunk.offset, 0)
        if start < len(chunk.text):
            text.append(chunk.text[start:])
        end = max(end, chunk.offset + len(chunk.text))
        if sum(map(len, text)) >= limit:
            break
    return "".join(text)[:limit], end


def job_update(job_id, after, log_offset):
    """Everything new for a live view since (after, log_offset)."""
    close_old_connections()
    job = Job.objects.select_related("owner").get(pk=job_id)
    text, end = log_after(job, log_offset)
    return {"job": job.to_dict(), "points": metrics_after(job, after), "log": text, "log_offset": end}


def dataset_records(ds, offset=0, limit=20):
    import itertools
    import json

    with open(ds.path, encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, offset, offset + limit)]


def disk_usage(path) -> int:
    """Bytes under ``path`` (a job's run folder: checkpoints, weights, logs)."""
    from pathlib import Path

    root = Path(path)
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink()) if root.exists() else 0
