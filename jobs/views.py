import functools
import json

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _, gettext_lazy
from django.views.decorators.http import require_POST

from accounts.access import check_manage, may_manage, readable
from accounts.services import audit, share_context
from minicloud.errors import id_or_none, int_or_none
from models_registry.models import Tokenizer
from training import spec as tspec

from . import selectors, services
from .forms import (ADVANCED_FIELDS, BASE_STAGES, BASIC_FIELDS, CONFIG_FIELDS, MODEL_FIELDS, PRESETS, QUICK_START,
                    STAGE_FIELDS, IntegrationsForm, JobForm, initial_from_job, stage_defaults)
from .models import Dataset, Integrations, Job, JobTemplate, Node, Notification


@login_required
def dashboard(request):
    queue = selectors.mark_hidden(list(selectors.list_rows(Job.objects.filter(status__in=Job.ACTIVE))
                                       .order_by("-status", "-priority", "created_at")[:20]), request.user)
    return render(request, "jobs/dashboard.html", {
        "my_jobs": selectors.my_jobs(request.user)[:20], "queue": queue,
        "nodes": Node.objects.order_by("name"),
    })


@login_required
def job_new(request):
    templates = JobTemplate.objects.filter(owner=request.user)
    initial = None
    chosen = templates.filter(pk=id_or_none(request.GET.get("template"))).first() if request.method == "GET" else None
    clone = id_or_none(request.GET.get("clone")) if request.method == "GET" else None
    if chosen:
        initial = chosen.fields
    elif clone:  # Clone: the job's settings, to edit
        initial = initial_from_job(_job_or_404(request, clone), "half_batch" in request.GET)
    form = JobForm(request.POST or None, user=request.user, **({"initial": initial} if initial else {}))
    if request.method == "POST" and form.is_valid():
        try:
            if "save_template" in request.POST:  # checked like a submission, stored, nothing queued
                services.estimate_job(**form.job_request(request.user))
                fields = {k: v for k, v in request.POST.items() if k in form.fields}
                template = services.save_template(request.user, form.cleaned_data["name"], fields)
                messages.success(request, _("Template “%(name)s” saved.") % {"name": template.name})
                return redirect(f"{request.path}?template={template.pk}")
            clone_of = id_or_none(request.GET.get("clone"))  # the form posts back to its own address
            job = services.submit_job(**form.job_request(request.user), http_request=request,
                                      audit_detail={"clone_of": clone_of} if clone_of else None)
        except services.ServiceError as exc:
            field = (exc.field or "").removeprefix("config.")
            form.add_error(field if field in form.fields else None, str(exc))
        else:
            messages.success(request, _("Job #%(id)s is queued.") % {"id": job.pk})
            return redirect("job_detail", job_id=job.pk)
    wizard = {"dataset_kinds": {str(d.pk): d.kind for d in form.fields["dataset"].queryset},
              "model_stages": {str(m.pk): m.stage for m in form.fields["base_model"].queryset},
              "stage_kind": tspec.STAGE_DATASET_KIND, "needs_base": [s for s in tspec.NEEDS_BASE if s != "eval"],
              "base_stages": BASE_STAGES, "stage_fields": STAGE_FIELDS, "defaults": stage_defaults(),
              "quick_start": QUICK_START, "config_fields": CONFIG_FIELDS}
    stage_of = {}
    for stage, keys in STAGE_FIELDS.items():
        for key in keys:
            stage_of.setdefault(key, []).append(stage)
    return render(request, "jobs/new.html", {
        "form": form, "presets": PRESETS, "wizard": wizard, "templates": templates, "chosen": chosen,
        "target_fields": [form[k] for k in ("name", "stage", "dataset", "eval_dataset", "base_model",
                                            "teacher_model")],
        "model_fields": [form[k] for k in MODEL_FIELDS], "basic_fields": [form[k] for k in BASIC_FIELDS],
        "advanced_fields": [form[k] for k in ADVANCED_FIELDS + ("time_limit_h", "priority")],
        "stage_fields": [(form[k], " ".join(stages)) for k, stages in stage_of.items()]})


def _duration(seconds) -> str:
    if seconds is None:
        return _("unknown (the dataset size is not known)")
    if seconds < 90:
        return _("about %(n)s s") % {"n": max(int(seconds), 1)}
    if seconds < 5400:
        return _("about %(n)s min") % {"n": round(seconds / 60)}
    return _("about %(n)s h") % {"n": f"{seconds / 3600:.1f}"}


def _queue_info(job):
    info = services.queue_info(job)
    if info:
        info["expected_start"] = _starts_in(info["expected_start_s"])
    return info


def _starts_in(seconds) -> str:
    if seconds is None:
        return "–"
    if seconds == 0:
        return _("now")
    if seconds < 90:
        return _("in about %(n)s s") % {"n": max(int(seconds), 1)}
    if seconds < 5400:
        return _("in about %(n)s min") % {"n": round(seconds / 60)}
    return _("in about %(n)s h") % {"n": f"{seconds / 3600:.1f}"}


@login_required
@require_POST
def job_estimate(request):
    """The new-job page asks this as the form changes: the first problem (with its field), or the parameter count,
    the memory per device and a rough time. Nothing is stored."""
    data = request.POST.copy()
    data["name"] = data.get("name") or "estimate"  # a name is not needed to estimate
    form = JobForm(data, user=request.user)
    if not form.is_valid():
        field, errors = next(iter(form.errors.items()))
        return JsonResponse({"ok": False, "field": field, "error": " ".join(errors)})
    try:
        est = services.estimate_job(**form.job_request(request.user))
    except services.ServiceError as exc:
        field = (exc.field or "").removeprefix("config.")
        return JsonResponse({"ok": False, "field": field, "error": str(exc)})
    params, memory = est["parameters"], est["memory"]
    count = f"{params['total'] / 1e6:.2f}M"
    if params["active"] != params["total"]:
        count += " " + _("(%(n)sM active)") % {"n": f"{params['active'] / 1e6:.2f}"}
    return JsonResponse({
        "ok": True, "parameters": count,
        "memory": _("%(gib)s GiB per device") % {"gib": f"{memory['bytes'] / 2**30:.2f}"},
        "memory_parts": {k: f"{v / 2**30:.2f} GiB" for k, v in memory["parts"].items()},
        "time": _duration(est["seconds"]) + ("" if est["cuda"] else " " + _("on an H100-class GPU")),
    })


def _job_or_404(request, job_id):
    return readable(Job, request.user, job_id, *selectors.SHOWN_WITH)


@login_required
def job_detail(request, job_id):
    job = _job_or_404(request, job_id)
    rows = selectors.point_rows(selectors.history_points(job))
    log_text, log_offset = selectors.log_after(job, 0)
    return render(request, "jobs/detail.html", {
        "job": job, "points_script": selectors.points_script("points", rows), "log_text": log_text,
        "log_offset": log_offset, "after": rows[-1][0] if rows else 0,
        "events": selectors.job_events(job.pk),  # worded as the live updates word it
        "queue": _queue_info(job),
        "status_labels": {value: str(label) for value, label in Job.Status.choices},
        "disk_bytes": Job.folder_bytes(job.pk, job.disk_bytes), "starts": selectors.run_starts(job),
        "memory_error": f"{job.memory_error:+.0%}" if job.memory_error is not None else "",
        **share_context(request.user, job),
        "actions": [(name, label, states, " ".join(states)) for name, label, states in JOB_ACTIONS],
    })


# The buttons of a job page and the states that show them: Job.USER_ACTIONS, the table the services enforce.
JOB_ACTIONS = [
    ("pause", gettext_lazy("Pause"), [s.value for s in Job.USER_ACTIONS["pause"]]),
    ("resume", gettext_lazy("Resume"), [s.value for s in Job.USER_ACTIONS["resume"]]),
    ("retry", gettext_lazy("Retry from checkpoint"), [s.value for s in Job.USER_ACTIONS["retry"]]),
    ("cancel", gettext_lazy("Cancel"), [s.value for s in Job.USER_ACTIONS["cancel"]]),
]


ACTIONS = {"cancel": (services.cancel_job, gettext_lazy("Cancel requested for job #%(id)s.")),
           "pause": (services.pause_job, gettext_lazy("Pause requested for job #%(id)s.")),
           "resume": (services.resume_job, gettext_lazy("Job #%(id)s is back in the queue.")),
           "retry": (services.retry_job, gettext_lazy("Job #%(id)s is back in the queue.")),
           "retry-half-batch": (functools.partial(services.retry_job, half_batch=True),
                                gettext_lazy("Job #%(id)s is back in the queue with half the batch size."))}


@login_required
@require_POST
def job_action(request, job_id, action):
    job = _job_or_404(request, job_id)
    if action not in ACTIONS:
        raise Http404(_("No such action."))
    check_manage(request.user, job)
    service, done = ACTIONS[action]
    try:
        service(job, request.user)
        audit(request.user, action, job, request=request)
        messages.info(request, done % {"id": job.pk})
    except services.ServiceError as exc:
        messages.error(request, str(exc))
    return redirect("job_detail", job_id=job.pk)


@login_required
def job_log(request, job_id):
    job = _job_or_404(request, job_id)
    text, _end = selectors.log_after(job, 0, limit=10**9)
    response = HttpResponse(text, content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="job-{job.pk}.log"'
    return response


def _metrics_export(jobs, fmt: str, stem: str):
    from django.http import StreamingHttpResponse

    if fmt == "csv":
        response = StreamingHttpResponse(services.metrics_csv(jobs), content_type="text/csv; charset=utf-8")
    else:
        response = StreamingHttpResponse(services.metrics_json(jobs), content_type="application/json")
    response["Content-Disposition"] = f'attachment; filename="{stem}-metrics.{fmt}"'
    return response


@login_required
def job_metrics_export(request, job_id, fmt):
    """Every metric point of a job (full resolution, not the chart's thinned history) as CSV or JSON."""
    return _metrics_export([_job_or_404(request, job_id)], fmt, f"job-{job_id}")


@login_required
def job_tensorboard(request, job_id):
    """The job's TensorBoard event files, zipped (``tensorboard --logdir`` on the unzipped folder)."""
    from django.http import FileResponse

    job = _job_or_404(request, job_id)
    path = services.tensorboard_zip(job)
    if path is None:
        messages.error(request, _("This job has no TensorBoard event files yet."))
        return redirect("job_detail", job_id=job.pk)
    f = open(path, "rb")
    path.unlink()  # the open file stays readable; nothing is left behind
    return FileResponse(f, as_attachment=True, filename=f"job-{job.pk}-tensorboard.zip", content_type="application/zip")


# One compare page (and its downloads) shows at most MAX_COMPARED jobs, and its chart at most COMPARE_POINTS points
# in all, shared by the jobs (5,000 each up to 20 jobs; TensorBoard keeps 1,000 per run): a hundred long runs made
# a 51 MB page in 3 s of a web process, a thousand ten times that (docs/performance.md).
MAX_COMPARED = 50
COMPARE_POINTS = 100_000


def compare_points(jobs: int) -> int:
    """The chart's points per job when ``jobs`` are compared."""
    return max(500, min(5000, COMPARE_POINTS // max(1, jobs)))


def _compared_jobs(request):
    """(the ids asked for, at most MAX_COMPARED of them; the jobs among them the user may read; how many were asked)."""
    ids = list(dict.fromkeys(i for i in map(id_or_none, request.GET.get("ids", "").split(",")) if i))
    asked, ids = len(ids), ids[:MAX_COMPARED]
    return ids, list(selectors.jobs_for(request.user).filter(pk__in=ids).order_by("pk")), asked


@login_required
def compare_metrics_export(request, fmt):
    """The compared jobs' metric points in one CSV (a ``job`` column) or JSON file."""
    ids, jobs, _asked = _compared_jobs(request)
    return _metrics_export(jobs, fmt, "jobs-" + "-".join(str(j.pk) for j in jobs))


def metrics(request):
    """``/metrics`` for Prometheus (a scrape token, not a login: minicloud.metrics)."""
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    from minicloud.metrics import refused_scrape

    return refused_scrape(request) or HttpResponse(services.exposition(), content_type=CONTENT_TYPE_LATEST)


def set_language(request):
    """Django's language switch; a logged-in user's notifications then follow it (jobs/services/notifications.py)."""
    from django.views.i18n import set_language as django_set_language

    response = django_set_language(request)
    if request.method == "POST" and request.user.is_authenticated:
        services.remember_language(request.user, request.POST.get("language", ""))
    return response


@login_required
def integrations(request):
    """Notifications (e-mail, signed webhooks) and experiment-tracker keys of the logged-in user."""
    prefs = Integrations.of(request.user)
    if request.method == "POST":
        form = IntegrationsForm(request.POST)
        if form.is_valid():
            services.update_integrations(request.user, **form.update_args(), language=request.LANGUAGE_CODE)
            messages.success(request, _("Saved."))
            return redirect("integrations")
    else:
        form = IntegrationsForm(initial={"email_enabled": prefs.email_enabled, "email": prefs.email,
                                         "webhook_url": prefs.webhook_url, "events": prefs.events,
                                         "wait_minutes": prefs.wait_minutes})
    return render(request, "jobs/integrations.html", {
        "form": form, "prefs": prefs, "webhook_secret": prefs.secret("webhook_secret"),
        "has_wandb": bool(prefs.wandb_key), "has_swanlab": bool(prefs.swanlab_key),
        "deliveries": Notification.objects.filter(job__owner=request.user).select_related("job")
        .order_by("-created_at")[:20]})


@login_required
def compare(request):
    """Overlay the curves of several jobs (same metric, by step or by tokens) with their configuration differences."""
    ids, jobs, asked = _compared_jobs(request)
    if asked > MAX_COMPARED:
        messages.warning(request, _("Comparing the first %(shown)s of the %(asked)s jobs asked for: choose fewer to "
                                    "see the others.") % {"shown": MAX_COMPARED, "asked": asked})
    series = {job.pk: selectors.metric_history(job, max_points=compare_points(len(jobs))) for job in jobs}
    keys = []
    for points in series.values():
        keys += [k for k in selectors.metric_keys(points) if k not in keys]
    config_keys = sorted({k for job in jobs for k in job.resolved_config})
    values = {k: [json.dumps(job.resolved_config.get(k), ensure_ascii=False) for job in jobs] for k in config_keys}
    differing = [(k, v) for k, v in values.items() if len(set(v)) > 1]  # values written as JSON
    return render(request, "jobs/compare.html", {
        "jobs": jobs, "series": {str(k): v for k, v in series.items()}, "metric_keys": keys,
        "differing": [("stage", [j.stage for j in jobs]), ("dataset", [j.dataset.name for j in jobs])]
        + differing if len(jobs) > 1 else differing,
        "candidates": selectors.jobs_for(request.user).exclude(pk__in=ids)[:50], "ids": ",".join(map(str, ids)),
        "chart_names": {str(j.pk): selectors.chart_text(f"#{j.pk} {j.name}") for j in jobs},
    })


QUEUE_PAGE_ROWS = 50


@login_required
def queue(request):
    """Running jobs, then the queue in order (one shared plan, see services.queue_snapshot), page by page; the
    visitor's own queued jobs are listed first."""
    live = list(selectors.list_rows(Job.objects.filter(status__in=Job.LIVE), "priority", "gpus", "slurm")
                .order_by("started_at"))
    snapshot = services.queue_snapshot()
    page = Paginator(live + [(n, e) for n, e in enumerate(snapshot, 1)], QUEUE_PAGE_ROWS).get_page(
        request.GET.get("page"))
    mine = [(n, e) for n, e in enumerate(snapshot, 1) if e["owner_id"] == request.user.pk]
    planned = {e["id"] for _, e in mine}
    mine = [(None, {"id": pk, "reason": "new", "params": {}, "starts_in": None})  # submitted since the plan
            for pk in Job.objects.filter(owner=request.user, status=Job.Status.QUEUED).values_list("pk", flat=True)
            if pk not in planned] + mine
    wanted = [row for row in page.object_list if isinstance(row, tuple)] + mine[:20]
    by_id = selectors.list_rows(Job.objects.filter(pk__in={e["id"] for _, e in wanted}), "priority",
                                "slurm").in_bulk()

    def queued(position, entry):
        job = by_id.get(entry["id"])
        if job is None or job.status != Job.Status.QUEUED:  # started or left the queue since the plan was made
            return None
        job.position = position
        job.reason = services.wait_reason_text(entry["reason"], entry["params"])
        job.expected_start = _starts_in(entry["starts_in"])
        return job

    jobs = [row if isinstance(row, Job) else queued(*row) for row in page.object_list]
    jobs = selectors.mark_hidden([j for j in jobs if j is not None], request.user)
    slots = sum(len(n.devices) for n in Node.objects.all())
    busy = sum(j.gpus for j in live)
    return render(request, "jobs/queue.html", {
        "jobs": jobs, "page": page, "slots": slots, "busy": busy, "queued": len(snapshot),
        "mine": [j for j in (queued(*row) for row in mine[:20]) if j is not None], "mine_count": len(mine)})


@login_required
def devices(request):
    return render(request, "jobs/devices.html", {"nodes": Node.objects.order_by("name"),
                                                 "history": selectors.device_history(hours=1),
                                                 "labels": {"utilization": _("Utilisation (%)"),
                                                            "memory": _("Memory used (GiB)"),
                                                            "device": _("device")}})


@login_required
def datasets(request):
    return _datasets_page(request)


def _datasets_page(request, status=200, **extra):
    """The datasets page: the upload form, the user's uploads being checked or refused, the datasets they see
    (``extra``: a refused upload's report, from the form without JavaScript)."""
    return render(request, "jobs/datasets.html", {
        "datasets": Dataset.objects.visible_to(request.user).select_related("owner", "shared_with"),
        "kinds": Dataset._meta.get_field("kind").choices, "uploads": selectors.open_uploads(request.user),
        **extra}, status=status)


@login_required
@require_POST
def dataset_upload(request):
    """The upload form without JavaScript (the page's script sends chunks to the API instead)."""
    try:
        ds = services.upload_dataset(request, request.user)
    except services.ServiceError as exc:
        validation = (exc.details or {}).get("validation", {})
        messages.error(request, str(exc) if not validation else _("The file was refused: %(n)s error(s).")
                       % {"n": validation["error_count"]})
        return _datasets_page(request, status=exc.status, refused=validation)
    if not isinstance(ds, Dataset):  # a large file, checked in the background
        messages.info(request, _("The file is being checked in the background; this page shows how far."))
        return redirect("datasets")
    return redirect("dataset_detail", dataset_id=ds.pk)


@login_required
@require_POST
def upload_delete(request, upload_id):
    """Drop one of the user's uploads listed on the datasets page (refused, or given up on)."""
    upload = services.find_upload(request.user, upload_id)
    if upload is None:
        raise Http404
    try:
        services.delete_upload(upload)
    except services.ServiceError as exc:
        messages.error(request, str(exc))
    return redirect("datasets")


PREVIEW_PAGE = 10


def _dataset_or_404(request, dataset_id):
    return readable(Dataset, request.user, dataset_id)


@login_required
def dataset_detail(request, dataset_id):
    ds = _dataset_or_404(request, dataset_id)
    pages = max(1, -(-ds.records // PREVIEW_PAGE))
    page = min(max(int_or_none(request.GET.get("page")) or 1, 1), pages)
    records = services.dataset_records(ds, (page - 1) * PREVIEW_PAGE, PREVIEW_PAGE)
    for r in records:  # an RL record's expected answer ('gt' or 'answer': a string or a list of strings), for display
        gt = r.get("gt", r.get("answer"))
        r["expected_answer"] = " · ".join(map(str, gt)) if isinstance(gt, list) else gt
    versions = Dataset.objects.visible_to(request.user).filter(owner=ds.owner, name=ds.name).order_by("-version")
    manageable = may_manage(request.user, ds) and ds.owner_id is not None
    return render(request, "jobs/dataset_detail.html", {
        "dataset": ds, "records": records, "page": page, "pages": pages,
        "next_page": page + 1 if page < pages else None, "first": (page - 1) * PREVIEW_PAGE + 1,
        "last": (page - 1) * PREVIEW_PAGE + len(records), "versions": versions, "manageable": manageable,
        "references": services.dataset_references(ds) if manageable else [],
        "tokenizers": Tokenizer.objects.visible_to(request.user), **share_context(request.user, ds)})


@login_required
@require_POST
def dataset_action(request, dataset_id, action):
    ds = _dataset_or_404(request, dataset_id)
    try:
        if action == "stats":
            msl = int_or_none(request.POST.get("max_seq_len"))
            services.request_dataset_stats(ds, msl if msl and 8 <= msl <= 10**6 else None,
                                           request.POST.get("tokenizer"), actor=request.user)
            messages.info(request, _("Statistics are being computed."))
        elif action == "delete":
            services.delete_dataset(request.user, ds, request=request)
            messages.success(request, _("Dataset deleted."))
            return redirect("datasets")
        else:
            raise Http404(_("No such action."))
    except services.ServiceError as exc:
        messages.error(request, str(exc))
    return redirect("dataset_detail", dataset_id=ds.pk)


@login_required
def dataset_stats(request, dataset_id):
    ds = _dataset_or_404(request, dataset_id)
    return JsonResponse({"status": ds.stats_status, "progress": ds.stats_progress, "stats": ds.stats,
                         "error": ds.stats_error or None})