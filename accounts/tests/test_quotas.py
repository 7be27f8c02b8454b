"""Quotas (per user, group defaults), their enforcement at submission and in the scheduler, usage accounting,
the usage page and report, and the audit log."""
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import Group
from django.utils import timezone

from accounts.models import AuditEntry, Quota, UsageRecord
from accounts.services import effective_quota, week_start
from conftest import TINY
from jobs import services
from jobs.models import Dataset, Job
from jobs.services import device_hours


@pytest.fixture
def demo(db):
    return Dataset.objects.get(name="demo-pretrain")


def submit(user, demo, **kw):
    return services.submit_job(owner=user, name=kw.pop("name", "j"), stage="pretrain", dataset=demo.pk,
                               config=TINY, **kw)


def finished_run(user, hours, ended=None, gpus=1):
    ended = ended or timezone.now()
    return UsageRecord.objects.create(user=user, devices=gpus, started_at=ended - timedelta(hours=hours),
                                      ended_at=ended, device_seconds=hours * 3600 * gpus)


def test_a_users_own_quota_wins_then_the_most_generous_group(user, django_user_model):
    course, project = Group.objects.create(name="course"), Group.objects.create(name="project")
    user.groups.add(course, project)
    Quota.objects.create(group=course, max_running_jobs=1, device_hours_per_week=10, max_queued_jobs=5)
    Quota.objects.create(group=project, max_running_jobs=3, device_hours_per_week=None, max_queued_jobs=2)
    q = effective_quota(user)
    assert q["max_running_jobs"] == 3 and q["max_queued_jobs"] == 5
    assert q["device_hours_per_week"] is None  # a group without that limit lifts it
    Quota.objects.create(user=user, max_running_jobs=1)
    assert effective_quota(user)["max_running_jobs"] == 1
    admin = django_user_model.objects.create_superuser("root", password="x")
    admin.groups.add(course)
    assert effective_quota(admin)["max_running_jobs"] is None  # admins are not limited



def test_one_users_quota_is_two_queries_and_many_users_three(user, other_user, django_user_model):
    """A submission checks its owner's quota: their groups are a subquery of the quota and limit reads, not a read of
    its own (a round trip to PostgreSQL each); the scheduler's pass over many owners reads their groups once."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from accounts.models import GroupLimit
    from accounts.services import effective_quotas

    course, project, elsewhere = (Group.objects.create(name=n) for n in ("course", "project", "elsewhere"))
    user.groups.add(course, project)
    other_user.groups.add(elsewhere)
    Quota.objects.create(group=course, max_running_jobs=1, storage_gb=5)
    Quota.objects.create(group=project, max_running_jobs=3, storage_gb=None)
    Quota.objects.create(group=elsewhere, max_running_jobs=9)
    GroupLimit.objects.create(group=course, max_queued_jobs=4)
    GroupLimit.objects.create(group=elsewhere, max_queued_jobs=1)
    Quota.objects.create(user=other_user, max_running_jobs=2)
    with CaptureQueriesContext(connection) as queries:
        mine = effective_quota(user)
    assert len(queries.captured_queries) == 2
    assert (mine["max_running_jobs"], mine["storage_gb"], mine["max_queued_jobs"]) == (3, None, 4)
    with CaptureQueriesContext(connection) as queries:
        both = effective_quotas([user, other_user])
    assert len(queries.captured_queries) == 3 and both[user.pk] == mine
    assert (both[other_user.pk]["max_running_jobs"], both[other_user.pk]["max_queued_jobs"]) == (2, 1)

def test_submission_refuses_what_the_quota_forbids(user, demo):
    Quota.objects.create(user=user, max_gpus_per_job=1, max_queued_jobs=2, max_job_hours=0.5)
    first = submit(user, demo)
    assert first.time_limit_s == 1800  # capped by the quota's wall-clock limit
    assert submit(user, demo, time_limit_s=60).time_limit_s == 60
    with pytest.raises(services.ServiceError) as exc:
        submit(user, demo)
    assert exc.value.status == 403 and "2 queued" in str(exc.value)
    with pytest.raises(services.ServiceError) as exc:
        submit(user, demo, gpus=2)
    assert exc.value.status == 403 and exc.value.field == "gpus"


def test_weekly_device_hours_are_enforced_with_a_clear_reason(user, demo, midweek):
    Quota.objects.create(user=user, device_hours_per_week=10)
    finished_run(user, 9.5)
    job = submit(user, demo)  # 9.5 of 10 used: still allowed to queue and to start
    assert services.claim_next_job("n", slots=1).pk == job.pk
    Job.objects.filter(pk=job.pk).update(started_at=timezone.now() - timedelta(hours=1))
    with pytest.raises(services.ServiceError, match=r"you have used 10\.5 of your 10 device-hours this week"):
        submit(user, demo)


def test_the_scheduler_holds_jobs_over_the_running_quota(user, other_user, demo):
    Quota.objects.create(user=user, max_running_jobs=1)
    a, b = submit(user, demo, name="a"), submit(user, demo, name="b")
    c = submit(other_user, demo, name="c")
    started = [services.claim_next_job("n", slots=3) for _ in range(3)]
    assert {j.pk for j in started if j} == {a.pk, c.pk} and started[2] is None
    info = services.queue_info(b)
    assert info["reason"] == "quota_running" and info["reason_text"] == \
        "over your concurrent-job quota (1 of 1 running)"


def test_the_scheduler_stops_starting_jobs_once_the_week_is_used_up(user, demo, midweek):
    Quota.objects.create(user=user, device_hours_per_week=2)
    job = submit(user, demo)
    finished_run(user, 2.5)
    assert services.claim_next_job("n", slots=1) is None
    assert services.queue_info(job)["reason_text"] == "you have used 2.5 of your 2 device-hours this week"


def test_resume_retry_and_clone_cannot_bypass_the_queued_quota(user, demo):
    Quota.objects.create(user=user, max_queued_jobs=1)
    job = submit(user, demo)
    services.claim_next_job("n", slots=1)
    services.pause_job(job, user)
    job.transition(Job.Status.PAUSED, "test")
    submit(user, demo, name="fills the queue")
    for action in (lambda: services.resume_job(job, user), lambda: services.clone_job(job, user)):
        with pytest.raises(services.ServiceError) as exc:
            action()
        assert exc.value.status == 403
    assert Job.objects.get(pk=job.pk).status == "paused"


def test_quota_priority_moves_a_users_jobs_forward(user, other_user, demo):
    first = submit(other_user, demo, name="first")
    later = submit(user, demo, name="later")
    assert services.queue_order([first, later])[0].pk == first.pk
    Quota.objects.create(user=user, priority=5)
    assert services.queue_order([first, later])[0].pk == later.pk


def test_each_run_segment_is_accounted(user, demo, midweek):
    job = submit(user, demo)
    services.claim_next_job("n", slots=1)
    Job.objects.filter(pk=job.pk).update(started_at=timezone.now() - timedelta(minutes=30))
    assert device_hours(user, week_start()) == pytest.approx(0.5, abs=0.01)  # running counts too
    services.pause_job(job, user)
    job.transition(Job.Status.PAUSED, "test")  # the run ends here
    record = UsageRecord.objects.get(job=job)
    assert record.device_seconds == pytest.approx(1800, abs=5)
    services.resume_job(job, user)
    services.claim_next_job("n", slots=1)
    services.finish_job(job, Job.Status.SUCCEEDED)
    assert UsageRecord.objects.filter(job=job).count() == 2


def test_usage_straddling_the_week_start_counts_only_its_part(user):
    start = week_start()
    finished_run(user, 4, ended=start + timedelta(hours=1))
    assert device_hours(user, start) == pytest.approx(1.0)


def test_usage_page_me_api_and_the_admin_report(client, user, other_user, api, django_user_model, midweek):
    Quota.objects.create(user=user, device_hours_per_week=10)
    finished_run(user, 1.5)
    client.force_login(user)
    page = client.get("/usage/")
    assert page.status_code == 200 and page.context["usage"]["device_hours_this_week"] == pytest.approx(1.5)
    assert page.context["by_day"][-1][1] == pytest.approx(1.5)
    assert "本周设备时数" in client.get("/usage/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    me = api.get("/api/v1/me").json()
    assert me["quota"]["device_hours_per_week"] == 10 and me["usage"]["device_hours_this_week"] == pytest.approx(1.5)
    assert client.get("/usage/report.csv").status_code == 302  # members are sent to the admin login
    admin = django_user_model.objects.create_superuser("root", password="x")
    client.force_login(admin)
    csv = client.get("/usage/report.csv").content.decode().splitlines()
    assert csv[0].startswith("username,groups,jobs,device_hours") and csv[1].startswith("alice,,0,1.5")


def test_audited_actions(client, user, api, demo):
    r = api.post("/api/v1/jobs", {"name": "a", "stage": "pretrain", "dataset": demo.pk, "config": TINY})
    job_id = r.json()["id"]
    api.post(f"/api/v1/jobs/{job_id}/cancel")
    client.post("/accounts/login/", {"username": "alice", "password": "wrong"}, REMOTE_ADDR="10.1.2.3")
    entries = list(AuditEntry.objects.order_by("time").values_list("action", "object_type", "object_id", "username"))
    assert entries[:2] == [("submit", "job", str(job_id), "alice"), ("cancel", "job", str(job_id), "alice")]
    failed = AuditEntry.objects.get(action="login_failed")
    assert failed.username == "alice" and failed.ip == "10.1.2.3" and failed.actor is None


def test_quota_changes_in_the_admin_are_audited(client, user, django_user_model):
    admin = django_user_model.objects.create_superuser("root", password="x")
    client.force_login(admin)
    r = client.post("/admin/accounts/quota/add/", {"user": user.pk, "max_running_jobs": 2, "priority": ""})
    assert r.status_code == 302, r.content.decode()[:2000]
    entry = AuditEntry.objects.get(action="quota_change")
    assert entry.username == "root" and entry.detail["fields"]["max_running_jobs"] == 2


def test_storage_quota_counts_datasets_runs_and_imported_models(user, demo):
    from accounts.services import storage_used
    from models_registry.models import ModelVersion

    Dataset.objects.create(owner=user, name="mine", kind="pretrain", path=demo.path, size_bytes=600_000_000)
    ModelVersion.objects.create(owner=user, name="imported", path="/nonexistent", size_bytes=300_000_000)
    job = submit(user, demo)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    (job.run_dir / "model.pth").write_bytes(b"x" * 1000)
    assert storage_used(user) == 900_001_000
    Quota.objects.create(user=user, storage_gb=0.9)
    with pytest.raises(services.ServiceError, match=r"you store 0\.90 GB of your 0\.9 GB"):
        submit(user, demo)



def test_a_models_files_are_measured_when_written_not_at_each_storage_check(user, monkeypatch):
    """Imported weights and cached conversions (the model's own folder) are measured after each write there; the
    storage check reads the sum instead of walking every model's folder. A version never measured is walked."""
    import models_registry.models
    from accounts.services import storage_used
    from models_registry.models import ModelVersion

    measured = ModelVersion.objects.create(owner=user, name="imported", path="", size_bytes=100)
    measured.files_dir.mkdir(parents=True)
    (measured.files_dir / "model.pth").write_bytes(b"x" * 3000)
    assert measured.measure_files() == 3000 and ModelVersion.objects.get(pk=measured.pk).files_bytes == 3000
    older = ModelVersion.objects.create(owner=user, name="before", path="", size_bytes=100)  # not measured yet
    older.files_dir.mkdir(parents=True)
    (older.files_dir / "model.pth").write_bytes(b"x" * 500)
    walked = []
    real = models_registry.models.disk_usage
    monkeypatch.setattr(models_registry.models, "disk_usage", lambda path: walked.append(path) or real(path))
    assert storage_used(user) == 3500 and walked == [older.files_dir]


def test_a_finished_jobs_folder_is_measured_once_not_at_each_storage_check(client, user, demo, monkeypatch):
    """The storage check of every submission walked the run folder of every job the user ever ran (a stat per file,
    over the network on shared storage): a finished job's size is measured when it ends and read from then on."""
    import jobs.models
    from accounts.services import storage_used

    jobs_ = [submit(user, demo, name=f"j{i}") for i in range(3)]
    for i, job in enumerate(jobs_):
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / "model.pth").write_bytes(b"x" * (1000 * (i + 1)))
    Job.objects.filter(pk__in=[jobs_[0].pk, jobs_[1].pk]).update(status="running")
    jobs_[0].refresh_from_db()
    jobs_[1].refresh_from_db()
    assert jobs_[0].transition(Job.Status.SUCCEEDED) and jobs_[1].transition(Job.Status.FAILED)
    assert [j.disk_bytes for j in jobs_[:2]] == [1000, 2000]
    walked = []
    real = jobs.models.disk_usage
    monkeypatch.setattr(jobs.models, "disk_usage", lambda path: walked.append(path) or real(path))
    assert storage_used(user) == 6000
    assert walked == [jobs_[2].run_dir]  # only the queued job's folder, which may still change
    client.force_login(user)
    page = client.get(f"/jobs/{jobs_[1].pk}/")
    assert page.status_code == 200 and page.context["disk_bytes"] == 2000 and len(walked) == 1  # its page too
    assert jobs_[1].transition(Job.Status.QUEUED)  # a retry: its folder will change again
    assert jobs_[1].disk_bytes is None

def test_storage_quota_refuses_uploads_imports_and_merges_that_would_pass_it(user, demo, tmp_path):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from accounts.services import storage_used
    from models_registry.services import import_model

    source = tmp_path / "more.jsonl"
    source.write_bytes(Path(demo.path).read_bytes())
    size = source.stat().st_size
    Quota.objects.create(user=user, storage_gb=(storage_used(user) + size - 1) / 1e9)
    with pytest.raises(services.ServiceError, match=r"this adds 0\.\d\d GB") as exc:
        services.create_dataset(owner=user, name="more", kind="pretrain", source=source, copy_source=True)
    assert exc.value.status == 403 and exc.value.field == "quota"
    assert not Dataset.objects.filter(owner=user).exists() and source.exists()  # nothing stored, nothing lost
    Quota.objects.filter(user=user).update(storage_gb=(storage_used(user) + size) / 1e9)
    services.create_dataset(owner=user, name="more", kind="pretrain", source=source, copy_source=True)
    with pytest.raises(services.ServiceError, match="quota"):  # full now: no new upload starts
        services.start_upload(user)
    with pytest.raises(services.ServiceError, match="quota") as exc:
        import_model(owner=user, name="big", upload=SimpleUploadedFile("m.pth", b"x" * 10))
    assert exc.value.status == 403


def test_admin_edits_many_quotas_at_once_and_each_change_is_audited(client, user, other_user, django_user_model):
    a, b = Quota.objects.create(user=user, max_running_jobs=1), Quota.objects.create(user=other_user)
    admin = django_user_model.objects.create_superuser("root", password="x")
    client.force_login(admin)
    data = {"form-TOTAL_FORMS": 2, "form-INITIAL_FORMS": 2, "form-MIN_NUM_FORMS": 0, "form-MAX_NUM_FORMS": 1000,
            "_save": "Save"}
    for i, q in enumerate(Quota.objects.order_by("-pk")):  # the change list's order
        data.update({f"form-{i}-id": q.pk, f"form-{i}-max_running_jobs": 4, f"form-{i}-device_hours_per_week": 20})
    r = client.post("/admin/accounts/quota/", data)
    assert r.status_code == 302
    a.refresh_from_db()
    b.refresh_from_db()
    assert (a.max_running_jobs, b.max_running_jobs, b.device_hours_per_week) == (4, 4, 20)
    assert AuditEntry.objects.filter(action="quota_change").count() == 2
