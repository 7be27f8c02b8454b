"""A job's metrics out of the portal: CSV and JSON at full resolution (job and compare pages), read in chunks."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..models import MetricPoint

CHUNK = 2000


def _raw_points(job):
    """(seq, step, time, values) of every point of ``job``, in order, ``CHUNK`` rows per query."""
    from ..selectors import point_rows

    after = -1
    while True:
        rows = point_rows(MetricPoint.objects.filter(job=job, seq__gt=after).order_by("seq")[:CHUNK])
        if not rows:
            return
        values = json.loads("[" + ",".join(r[3] for r in rows) + "]")
        yield from ((seq, step, t, v) for (seq, step, t, _), v in zip(rows, values))
        after = rows[-1][0]


def metric_names(jobs) -> list[str]:
    """Every metric name any point of ``jobs`` has, in first-seen order (loss first)."""
    names: dict[str, None] = {}
    for job in jobs:
        for _, _, _, values in _raw_points(job):
            names.update(dict.fromkeys(values))
    return sorted(names, key=lambda k: (k != "loss", list(names).index(k)))


def metrics_csv(jobs):
    """CSV text, a line at a time: ``job, name, seq, step, time`` and one column per metric (empty where a point has
    none), every point of every job in ``jobs``."""
    names = metric_names(jobs)
    buf = io.StringIO()
    writer = csv.writer(buf)

    def flush():
        text = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        return text

    writer.writerow(["job", "name", "seq", "step", "time", *names])
    yield flush()
    for job in jobs:
        for seq, step, t, values in _raw_points(job):
            writer.writerow([job.pk, job.name, seq, step, t, *(values.get(k, "") for k in names)])
            if buf.tell() > 64 * 1024:
                yield flush()
        yield flush()


def metrics_json(jobs):
    """``{"jobs": [{id, name, stage, status, config, points: [{seq, step, time, values}]}]}`` as JSON text, a piece at
    a time (as the CSV): the whole document of a long run's points, or of many runs', is never in memory at once."""
    def dumps(value) -> str:
        return json.dumps(value, ensure_ascii=False)

    yield '{"jobs": ['
    for i, job in enumerate(jobs):
        head = {"id": job.pk, "name": job.name, "stage": job.stage, "status": job.status, "config": job.resolved_config}
        yield ("," if i else "") + dumps(head)[:-1] + ', "points": ['
        piece = []
        for n, (seq, step, t, values) in enumerate(_raw_points(job)):
            piece.append(("," if n else "") + dumps({"seq": seq, "step": step, "time": t, "values": values}))
            if len(piece) >= CHUNK:
                yield "".join(piece)
                piece = []
        yield "".join(piece) + "]}"
    yield "]}"


def tensorboard_zip(job) -> Path | None:
    """The job's TensorBoard event files as a zip (``job-N/tensorboard/...`` inside, so that several unzipped side by
    side are separate runs under one ``tensorboard --logdir``); None when it has none. Made at each request: a
    running job's files grow."""
    import tempfile

    from minicloud.files import folder_entries, zip_files

    folder = job.run_dir / "tensorboard"
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    out = Path(tempfile.mkstemp(suffix=".zip", dir=job.run_dir)[1])
    return zip_files(out, folder_entries(folder, f"job-{job.pk}/tensorboard/"))
