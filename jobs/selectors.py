"""Reads used by views, the API and consumers."""
import json

from django.db import close_old_connections

from .models import DeviceSample, Job, JobEvent, LogChunk, MetricPoint, Upload

SHOWN_WITH = ("owner", "dataset", "output_model")  # what a job's page and the API show beside the job


def jobs_for(user):
    """The jobs ``user`` may read (their own, shared with their groups, public; their members' for an instructor)."""
    return Job.objects.visible_to(user).select_related(*SHOWN_WITH)


class ListedJob:
    """One job of the API's listing, read from a ``values()`` row: ``Job.to_dict`` and the properties it reads, taken
    from Job, run on it unchanged. Its JSON columns stay the text the database stored: ``to_dict`` writes those it
    copies (``Job.STORED_JSON``) as ``orjson.Fragment``, and a property that reads one (``slurm_info``, ``phase_text``)
    parses it then. A 200-job listing thus builds no model instances and decodes no configs (docs/performance.md)."""

    Status, LIVE, FINAL, STORED_JSON = Job.Status, Job.LIVE, Job.FINAL, Job.STORED_JSON
    to_dict, sharing_dict = Job.to_dict, Job.sharing_dict
    visibility, progress, error_text, phase_text = Job.visibility, Job.progress, Job.error_text, Job.phase_text
    slurm_info, slurm_text, can_halve_batch, batch_can_shrink = (Job.slurm_info, Job.slurm_text, Job.can_halve_batch,
                                                                 Job.batch_can_shrink)

    def __init__(self, row: dict, raw: dict):
        self.__dict__.update(row)
        self.pk = row["id"]
        self.owner = _Named(row["owner_name"])
        self.shared_with = _Named(row["shared_with_name"])
        self._raw = raw

    def __getattr__(self, name):  # a JSON column a property reads: parsed once, when first read
        raw = self.__dict__.get("_raw", {})
        if name not in raw:
            raise AttributeError(name)
        value = None if raw[name] is None else json.loads(raw[name])
        setattr(self, name, value)
        return value

    def stored_json(self) -> dict:
        import orjson

        return {name: None if self._raw[name] is None else orjson.Fragment(self._raw[name])
                for name in self.STORED_JSON}


class _Named:
    def __init__(self, name):
        self.name = self.username = name


def jobs_listed(user, limit: int = 500, before: int | None = None, statuses=(), stages=(),
                owner: str | None = None) -> list[ListedJob]:
    """The API's job list: the newest ``limit`` jobs ``user`` may read (newest first: by id, which grows with
    creation), as ``ListedJob`` rows of one query (the owner's and the sharing group's names joined in, every JSON
    column as its stored text). ``before``: only jobs with a smaller id (the next page's cursor); ``statuses``,
    ``stages``, ``owner`` (a username): only such jobs."""
    from django.db.models import F, JSONField, TextField
    from django.db.models.functions import Cast

    fields = Job._meta.concrete_fields
    stored = [f.name for f in fields if isinstance(f, JSONField)]
    jobs = Job.objects.visible_to(user).order_by("-pk")
    if before is not None:
        jobs = jobs.filter(pk__lt=before)
    if statuses:
        jobs = jobs.filter(status__in=statuses)
    if stages:
        jobs = jobs.filter(stage__in=stages)
    if owner:
        jobs = jobs.filter(owner__username=owner)
    rows = jobs.values(
        *(f.attname for f in fields if not isinstance(f, JSONField)), owner_name=F("owner__username"),
        shared_with_name=F("shared_with__name"), **{f"raw_{name}": Cast(name, TextField()) for name in stored})
    return [ListedJob(row, {name: row.pop(f"raw_{name}") for name in stored}) for row in rows[:limit]]


def mark_hidden(jobs, user):
    """Set ``job.hidden`` on each of ``jobs`` that ``user`` may not read: lists of everyone's jobs (the queue page, the
    dashboard) keep such a job's place but not its name."""
    visible = set(Job.objects.visible_to(user).filter(pk__in=[j.pk for j in jobs]).values_list("pk", flat=True))
    for job in jobs:
        job.hidden = job.pk not in visible
    return jobs


def list_rows(jobs, *extra):
    """``jobs`` with only what a list of jobs shows (jobs/_job_rows.html, and ``extra`` fields): a row costs a third
    of a full job."""
    return jobs.select_related("owner").only("name", "owner__username", "stage", "status", "step", "total_steps",
                                             "created_at", *extra)


def open_uploads(user) -> list:
    """The user's finished uploads that are not datasets: being checked (with their progress), or refused (saying
    why) -- what the datasets page shows above the list, the page that finished them perhaps long closed."""
    return list(Upload.objects.filter(owner=user, status__in=("checking", "refused")).order_by("-created_at")[:20])


def my_jobs(user):
    """The dashboard's list: the user's own jobs."""
    return list_rows(Job.objects.filter(owner=user))


def _points(qs) -> list[dict]:
    """Metric points as {"seq", "step", "time", "values"}. The values' JSON of all rows is parsed by one ``json.loads``
    (not one per row through the ORM's JSONField converter, where a 2,000-point job page spent half its time)."""
    rows = point_rows(qs)
    values = json.loads("[" + ",".join(r[3] for r in rows) + "]") if rows else []
    return [{"seq": seq, "step": step, "time": t, "values": v} for (seq, step, t, _), v in zip(rows, values)]


def point_rows(qs):
    """(seq, step, time, the values' JSON text) of each metric point of ``qs``."""
    from django.db.models import TextField
    from django.db.models.functions import Cast

    return list(qs.annotate(raw=Cast("values", TextField())).values_list("seq", "step", "time", "raw"))


# What json_script escapes, so that the text cannot close its <script> element.
_SCRIPT_ESCAPES = {ord(">"): "\\u003E", ord("<"): "\\u003C", ord("&"): "\\u0026"}


def points_script(element_id, rows):
    """A ``<script type="application/json">`` element of metric points, as json_script would write ``_points(qs)``,
    built from the rows' stored JSON text: a 2,000-point job page spent a third of its time decoding the values and
    encoding them again."""
    from django.utils.html import format_html
    from django.utils.safestring import mark_safe

    text = "[" + ",".join(f'{{"seq":{seq},"step":{step},"time":{t!r},"values":{raw}}}'
                          for seq, step, t, raw in rows) + "]"
    return format_html('<script id="{}" type="application/json">{}</script>', element_id,
                       mark_safe(text.translate(_SCRIPT_ESCAPES)))


def metrics_after(job, after=0, limit=5000):
    return _points(MetricPoint.objects.filter(job=job, seq__gt=after).order_by("seq")[:limit])


def run_starts(job) -> list[dict]:
    """Each run's start as its first logged step reported it: time to the first step, and for a compiled run how
    many of its graphs came from the shared compile cache (a job resumed twice has three)."""
    qs = MetricPoint.objects.filter(job=job, values__has_key="time_to_first_step_s").order_by("seq")
    return [{"seconds": v["time_to_first_step_s"], "hits": v.get("compile_cache_hits"),
             "misses": v.get("compile_cache_misses")} for v in qs.values_list("values", flat=True)[:20]]


def metric_history(job, max_points=10_000):
    """A chart's points of ``job`` (see ``history_points``) as dicts."""
    return _points(history_points(job, max_points))


def history_points(job, max_points=10_000):
    """The points for a chart, a query: every one, or beyond ``max_points`` every k-th (chosen by the database, so a
    100,000-point history costs one indexed read of ~max_points rows) plus the first, the last and every eval point;
    the full resolution stays in the database and the API."""
    from django.db.models import Q
    from django.db.models.functions import Mod

    qs = MetricPoint.objects.filter(job=job)
    last = qs.order_by("-seq").values_list("seq", flat=True).first() or 0
    if last > max_points:
        stride = -(-last // max_points)
        qs = qs.annotate(phase=Mod("seq", stride)).filter(
            Q(phase=1 % stride) | Q(seq=last) | Q(values__has_key="eval_loss"))
    return qs.order_by("seq")


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


def job_fingerprints(job_ids) -> dict:
    """What the live views' next updates depend on, for many jobs in one light query: each job's status and step,
    its last metric point and its last log chunk (both only ever appended), by job id. A web process looks at the
    jobs of all its open streams with it twice a second (jobs/consumers.py ``Watch``); a stream's full read
    (``job_update``, four queries) follows only a change."""
    from django.db.models import OuterRef, Subquery

    def last(model, field):
        return Subquery(model.objects.filter(job=OuterRef("pk")).order_by("-" + field).values(field)[:1])

    rows = Job.objects.filter(pk__in=job_ids).values_list(
        "pk", "status", "step", last(MetricPoint, "seq"), last(LogChunk, "offset"))
    return {pk: rest for pk, *rest in rows}


def job_update(job_id, after, log_offset):
    """Everything new for a live view since (after, log_offset)."""
    close_old_connections()
    job = Job.objects.select_related("owner").get(pk=job_id)
    text, end = log_after(job, log_offset)
    return {"job": job.to_dict(), "points": metrics_after(job, after), "log": text, "log_offset": end}


def job_events(job_id) -> list[dict]:
    """A job's history as its page lists it, in the active language (the live view sends it when the status moves)."""
    from django.utils import timezone
    from django.utils.dateformat import format as date_format

    return [{"time": date_format(timezone.localtime(e.time), "Y-m-d H:i:s"), "label": e.label, "actor": e.actor,
             "message": e.text} for e in JobEvent.objects.filter(job_id=job_id)]


def chart_text(text: str) -> str:
    """A user's text (a job's name) as a chart label: plotly reads labels as HTML of its own (links, styles), so
    the text's markup characters are escaped and shown as they are."""
    import html

    return html.escape(text, quote=False)


def device_history(hours: float = 1.0) -> dict:
    """Per node, the last ``hours`` of device samples as chart series: times, and per device index its utilisation
    (%), memory used (bytes) and running jobs."""
    from datetime import timedelta

    from django.utils import timezone


    out = {}
    for sample in DeviceSample.objects.filter(time__gte=timezone.now() - timedelta(hours=hours)).order_by("time"):
        node = out.setdefault(sample.node, {"times": [], "devices": {}})
        n = len(node["times"])
        node["times"].append(sample.time.isoformat())
        for index, util, mem, jobs in sample.readings:
            series = node["devices"].setdefault(str(index), {"utilization": [None] * n, "memory_used": [None] * n,
                                                             "jobs": [None] * n})
            for key, value in (("utilization", util), ("memory_used", mem), ("jobs", jobs)):
                series[key] += [None] * (n - len(series[key])) + [value]
    return out
