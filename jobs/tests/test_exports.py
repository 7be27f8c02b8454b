"""A job's metrics as CSV and JSON, at full resolution, from the job and compare pages (readers only)."""
import csv
import io

from jobs.models import MetricPoint
from tests.test_pages import _job_with_points


def test_job_metrics_download_as_csv_and_json_at_full_resolution(client, user, other_user):
    job = _job_with_points(user, "exported", 4500)  # more than one read chunk and than the chart's 5,000 cap... nearly
    MetricPoint.objects.create(job=job, seq=4501, step=4501, time=4501.0, values={"loss": 0.5, "eval_loss": 0.7})
    client.force_login(user)
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert f'href="/jobs/{job.pk}/metrics.csv"' in page and f'href="/jobs/{job.pk}/metrics.json"' in page
    r = client.get(f"/jobs/{job.pk}/metrics.csv")
    assert r.status_code == 200 and r["Content-Disposition"] == f'attachment; filename="job-{job.pk}-metrics.csv"'
    rows = list(csv.DictReader(io.StringIO(b"".join(r.streaming_content).decode())))
    assert len(rows) == 4501 and list(rows[0])[:6] == ["job", "name", "seq", "step", "time", "loss"]
    assert float(rows[1]["loss"]) == 5.0 and rows[1]["eval_loss"] == "" and rows[-1]["eval_loss"] == "0.7"
    data = client.get(f"/jobs/{job.pk}/metrics.json").json()["jobs"][0]
    assert data["id"] == job.pk and len(data["points"]) == 4501 and data["config"]["batch_size"] == 16
    assert data["points"][-1] == {"seq": 4501, "step": 4501, "time": 4501.0, "values": {"loss": 0.5, "eval_loss": 0.7}}
    client.force_login(other_user)
    assert client.get(f"/jobs/{job.pk}/metrics.csv").status_code == 404


def test_compare_page_exports_every_compared_job(client, user, other_user):
    a, b = _job_with_points(user, "a", 3), _job_with_points(user, "b", 2)
    hidden = _job_with_points(other_user, "theirs", 2)
    client.force_login(user)
    ids = f"{a.pk},{b.pk},{hidden.pk}"
    page = client.get(f"/jobs/compare/?ids={ids}").content.decode()
    assert f"/jobs/compare/metrics.csv?ids={a.pk},{b.pk}" in page
    rows = list(csv.reader(io.StringIO(b"".join(client.get(f"/jobs/compare/metrics.csv?ids={ids}")
                                               .streaming_content).decode())))
    assert [r[0] for r in rows[1:]] == [str(a.pk)] * 3 + [str(b.pk)] * 2  # someone else's job stays out
    data = client.get(f"/jobs/compare/metrics.json?ids={ids}").json()
    assert [j["name"] for j in data["jobs"]] == ["a", "b"]
