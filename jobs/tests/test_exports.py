"""A job's metrics as CSV and JSON, at full resolution, from the job and compare pages (readers only)."""
import csv
import io
import json

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
    r = client.get(f"/jobs/{job.pk}/metrics.json")  # streamed, as the CSV: never the whole document in memory
    assert r.streaming and r["Content-Type"] == "application/json"
    data = json.loads(b"".join(r.streaming_content))["jobs"][0]
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
    data = json.loads(b"".join(client.get(f"/jobs/compare/metrics.json?ids={ids}").streaming_content))
    assert [j["name"] for j in data["jobs"]] == ["a", "b"]


def test_a_compare_page_of_many_jobs_is_bounded(client, user, settings):
    """A hundred long runs compared made a 51 MB page in 3 s of a web process (a thousand, ten times that): one page
    compares at most MAX_COMPARED jobs, saying so, and its chart shares COMPARE_POINTS points among them."""
    from jobs.views import COMPARE_POINTS, MAX_COMPARED, compare_points

    jobs = [_job_with_points(user, f"sweep-{i}", 2) for i in range(MAX_COMPARED + 10)]
    client.force_login(user)
    ids = ",".join(str(j.pk) for j in jobs + jobs[:3])  # repeated ids count once
    page = client.get(f"/jobs/compare/?ids={ids}").content.decode()
    shown = ",".join(str(j.pk) for j in jobs[:MAX_COMPARED])
    names = json.loads(page.split('<script id="job-names" type="application/json">')[1].split("</script>")[0])
    assert f'value="{shown}"' in page and list(names) == shown.split(",")
    assert f"Comparing the first {MAX_COMPARED} of the {MAX_COMPARED + 10} jobs asked for" in page
    zh = client.get(f"/jobs/compare/?ids={ids}", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert f"只比较所选 {MAX_COMPARED + 10} 个任务中的前 {MAX_COMPARED} 个" in zh
    rows = list(csv.reader(io.StringIO(b"".join(client.get(f"/jobs/compare/metrics.csv?ids={ids}")
                                               .streaming_content).decode())))
    assert len(rows) == 1 + 2 * MAX_COMPARED
    assert compare_points(1) == compare_points(20) == 5000 and compare_points(MAX_COMPARED) * MAX_COMPARED <= COMPARE_POINTS
