from django.conf import settings
from django.utils.translation import gettext as _

from accounts.access import manageable, readable
from accounts.services import audit
from minicloud.api import ApiError, endpoint, int_param, json_body, next_page, offset_page, page_limit

from . import selectors, services
from .models import Dataset, Job, Node, Upload


def _job(request, job_id) -> Job:
    return readable(Job, request.user, job_id, *selectors.SHOWN_WITH)


@endpoint("GET", auth=False)
def health(request):
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("SELECT 1")
    return {"status": "ok", "node": settings.NODE_NAME, "database": connection.vendor,
            "broker": "redis" if settings.REDIS_URL else "orm"}


@endpoint("GET")
def devices(request):
    running = {}
    for job in Job.objects.filter(status=Job.Status.RUNNING):
        for d in job.devices or []:
            running.setdefault((job.node, d), []).append(job.pk)
    out = []
    for node in Node.objects.order_by("name"):
        for d in node.devices:
            out.append({**d, "node": node.name, "node_state": node.state,
                        "running_jobs": running.get((node.name, d["index"]), []),
                        "heartbeat_at": node.heartbeat_at.isoformat() if node.heartbeat_at else None})
    return {"devices": out}


JOB_FIELDS = ("name", "stage", "dataset", "eval_dataset", "base_model", "teacher_model", "tokenizer", "config",
              "priority", "gpus", "time_limit_s", "notify", "trackers")


def _job_fields(request) -> dict:
    """The request's JSON body, refused (400) when it names a field a job does not have."""
    data = json_body(request)
    for key in data:
        if key not in JOB_FIELDS:
            raise ApiError(400, _("%(field)s: unknown field") % {"field": key}, {"field": key})
    return data


def _job_request(request) -> dict:
    data = _job_fields(request)
    return dict(owner=request.user, name=data.get("name", ""), stage=data.get("stage", ""),
                dataset=data.get("dataset"), eval_dataset=data.get("eval_dataset"), config=data.get("config"),
                base_model=data.get("base_model"),
                teacher_model=data.get("teacher_model"), tokenizer=data.get("tokenizer"),
                priority=data.get("priority", 0), gpus=data.get("gpus", 1), time_limit_s=data.get("time_limit_s"),
                notify=data.get("notify"), trackers=data.get("trackers"))


def _choices(request, name: str, allowed) -> list[str]:
    """A comma-separated filter of the listing (``?status=queued,running``), each value one of ``allowed``."""
    values = [v.strip() for v in request.GET.get(name, "").split(",") if v.strip()]
    for value in values:
        if value not in allowed:
            raise ApiError(400, _("%(name)s: unknown value %(value)s; choose among %(allowed)s")
                           % {"name": name, "value": repr(value), "allowed": ", ".join(allowed)}, {"field": name})
    return values


def _listing(request) -> dict:
    """The jobs the caller may read, newest first, a page of ``limit`` (at most 500) at a time: ``next`` is the
    address of the page after this one (``before`` the last id listed), null on the last page. Filters:
    ``status`` and ``stage`` (comma-separated), ``owner`` (a username)."""
    from training.spec import STAGES

    limit, before = page_limit(request), int_param(request, "before", None)
    filters = dict(statuses=_choices(request, "status", Job.Status.values), stages=_choices(request, "stage", STAGES),
                   owner=request.GET.get("owner", "").strip() or None)
    page = selectors.jobs_listed(request.user, limit + 1, before, **filters)
    more = len(page) > limit
    page = page[:limit]
    return {"jobs": [j.to_dict() for j in page], "next": next_page(request, before=page[-1].pk) if more else None}


@endpoint("GET", "POST")
def jobs(request):
    if request.method == "GET":
        return _listing(request)
    job = services.submit_job(**_job_request(request), http_request=request)
    return job.to_dict(), 201


@endpoint("POST")
def job_estimate(request):
    """The same body as a submission; nothing is stored. Parameters, memory per device, rough time, or the
    first bad field (400)."""
    return services.estimate_job(**_job_request(request))


@endpoint("GET")
def job_detail(request, job_id):
    job = _job(request, job_id)
    info = services.queue_info(job)
    events = [{"time": e.time.isoformat(), "kind": e.kind, "actor": e.actor, "message": e.text}
              for e in job.events.order_by("-time", "-pk")[:100]][::-1]
    return {**job.to_dict(), "queue_position": info["position"] if info else None, "queue": info, "events": events}


@endpoint("GET")
def job_metrics(request, job_id):
    job = _job(request, job_id)
    return {"points": selectors.metrics_after(job, int_param(request, "after"))}


@endpoint("GET")
def job_logs(request, job_id):
    job = _job(request, job_id)
    text, end = selectors.log_after(job, int_param(request, "after"))
    return {"text": text, "offset": end}


def _owned_job(request, job_id) -> Job:
    """A job the user may change: 404 when they cannot see it, 403 when it is only shared with them."""
    return manageable(Job, request.user, job_id, *selectors.SHOWN_WITH)


def _action(service, verb):
    @endpoint("POST")
    def view(request, job_id):
        job = service(_owned_job(request, job_id), request.user)
        audit(request.user, verb, job, request=request)
        return job.to_dict(), 202

    view.__name__ = service.__name__
    return view


job_cancel = _action(services.cancel_job, "cancel")
job_pause = _action(services.pause_job, "pause")
job_resume = _action(services.resume_job, "resume")


@endpoint("POST")
def job_retry(request, job_id):
    """Requeue from the last checkpoint; ``{"half_batch": true}`` halves the batch and doubles the accumulation."""
    job = _owned_job(request, job_id)
    body = {} if request.content_type.startswith("multipart/") else json_body(request)  # no body: a plain retry
    unknown = set(body) - {"half_batch"}
    if unknown:
        raise ApiError(400, _("%(field)s: unknown field") % {"field": min(unknown)}, {"field": min(unknown)})
    if not isinstance(body.get("half_batch", False), bool):
        raise ApiError(400, _("half_batch: must be true or false"), {"field": "half_batch"})
    job = services.retry_job(job, request.user, half_batch=body.get("half_batch", False))
    audit(request.user, "retry", job, request=request)
    return job.to_dict(), 202


@endpoint("POST")
def job_clone(request, job_id):
    """A copy of the job, queued; the body may change any submission field first (``config`` is merged)."""
    job = services.clone_job(_job(request, job_id), request.user, **_job_fields(request))
    audit(request.user, "submit", job, request=request, clone_of=job_id)
    return job.to_dict(), 201


@endpoint("GET", "POST")
def datasets(request):
    if request.method == "GET":
        page, next_url = offset_page(request, Dataset.objects.visible_to(request.user))
        return {"datasets": [d.to_dict() for d in page], "next": next_url}
    ds = services.upload_dataset(request, request.user)
    if isinstance(ds, Upload):  # a large upload, checked in the background: poll GET /api/v1/uploads/{id}
        return ds.to_dict(), 202
    return {**ds.to_dict(), "validation": ds.validation_report()}, 201


def _dataset(request, dataset_id) -> Dataset:
    return readable(Dataset, request.user, dataset_id)


@endpoint("GET", "DELETE")
def dataset_detail(request, dataset_id):
    ds = _dataset(request, dataset_id)
    if request.method == "DELETE":
        services.delete_dataset(request.user, ds, request=request)
        return {"deleted": dataset_id}
    return {**ds.to_dict(), "validation": ds.validation_report(), "stats": ds.stats,
            "stats_progress": ds.stats_progress, "stats_error": ds.stats_error or None}


@endpoint("GET")
def dataset_preview(request, dataset_id):
    ds = _dataset(request, dataset_id)
    offset, limit = int_param(request, "offset"), min(int_param(request, "limit", 20), 200)
    return {"offset": offset, "records": services.dataset_records(ds, offset, limit), "total": ds.records}


@endpoint("POST")
def uploads(request):
    """Start a chunked, resumable upload; then PUT its chunks and POST /datasets with ``upload``."""
    upload = services.start_upload(request.user)
    return {"id": str(upload.id), "offset": 0, "max_bytes": settings.UPLOAD_MAX_BYTES}, 201


@endpoint("GET", "PUT", "DELETE")
def upload_detail(request, upload_id):
    """GET: bytes received so far (resume from there), and once finished the check's status and progress, then its
    dataset or its refusal. PUT ?offset=N with the raw chunk as the body. DELETE: drop it (not while checked)."""
    upload = services.find_upload(request.user, upload_id)
    if upload is None:
        raise ApiError(404, _("no upload %(id)s") % {"id": upload_id})
    if request.method == "GET":
        return upload.to_dict()
    if request.method == "DELETE":
        services.delete_upload(upload)
        return {"deleted": str(upload.id)}
    length = int(request.META.get("CONTENT_LENGTH") or 0)
    offset = int_param(request, "offset", -1)
    return {"id": str(upload.id), "offset": services.append_upload(upload, offset, request, length)}
