"""The queue page of a long queue: one shared plan (services.queue_snapshot), pages of rows, the visitor's own jobs
first (those submitted since the plan too), others' private jobs without their names — also on the dashboard."""
import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from jobs import services
from jobs.models import Dataset, Job, Node
from jobs.scheduler import GiB
from jobs.views import QUEUE_PAGE_ROWS
from models_registry.models import Tokenizer


@pytest.fixture
def lab(db, user):
    """A GPU node running one job of bob's, and QUEUE_PAGE_ROWS + 10 queued jobs of bob's (private) then 2 of alice's."""
    bob = get_user_model().objects.create_user("bob", password="bob-pass-123")
    ds = Dataset.objects.get(name="demo-pretrain")
    Node.objects.create(name="gpu", heartbeat_at=timezone.now(),
                        devices=[{"index": 0, "kind": "cuda", "name": "H100", "memory_total": 80 * GiB}])
    common = dict(stage="pretrain", dataset=ds, tokenizer=Tokenizer.objects.get(name="demo-tokenizer"),
                  memory_estimate=70 * GiB)
    Job.objects.create(owner=bob, name="bob-running", status="running", node="gpu", devices=[0],
                       started_at=timezone.now(), eta_s=120, **common)
    Job.objects.bulk_create([Job(owner=bob, name=f"bob-secret-{i}", status="queued", **common)
                             for i in range(QUEUE_PAGE_ROWS + 10)])
    Job.objects.bulk_create([Job(owner=user, name=f"alice-{i}", status="queued", **common) for i in range(2)])
    return bob, ds


def test_a_long_queue_is_paged_with_the_visitors_own_jobs_first(client, user, lab):
    client.force_login(user)
    first = client.get("/queue/")
    assert first.status_code == 200 and first.context["queued"] == QUEUE_PAGE_ROWS + 12
    rows = first.context["jobs"]
    assert len(rows) == QUEUE_PAGE_ROWS and rows[0].name == "bob-running"
    # fair share: alice has used nothing, bob is running a job, so alice's jobs come first
    assert [(r.position, r.name) for r in rows[1:3]] == [(1, "alice-0"), (2, "alice-1")]
    assert all(r.hidden for r in rows[3:]) and not rows[1].hidden  # bob's jobs are private: place, no name
    assert b"bob-secret" not in first.content and b"(private job)" in first.content
    mine = first.context["mine"]
    assert [(j.position, j.name) for j in mine] == [(1, "alice-0"), (2, "alice-1")]
    assert mine[0].reason == "waiting for 1 GPU(s) with 70.0 GiB free" and mine[0].expected_start != "–"
    last = client.get("/queue/?page=2")
    assert [r.position for r in last.context["jobs"]][-1] == QUEUE_PAGE_ROWS + 12
    assert b"Page 2 of 2" in last.content and len(last.context["jobs"]) == 13


def test_one_plan_serves_every_visitor_until_a_job_starts_or_ends(client, user, lab, django_assert_max_num_queries):
    bob, ds = lab
    first = services.queue_snapshot()
    client.force_login(user)
    with django_assert_max_num_queries(15):  # no planning: the shared plan is read, only the page's rows are loaded
        client.get("/queue/")
    new = services.submit_job(owner=user, name="alice-new", stage="pretrain", dataset=ds.pk,
                              config={"hidden_size": 64, "num_hidden_layers": 2})
    assert services.queue_snapshot() == first  # a submission joins at the next plan...
    page = client.get("/queue/")
    assert page.context["mine"][0].name == "alice-new" and page.context["mine"][0].position is None
    assert page.context["mine"][0].reason == "just queued: its place is being planned"  # ...but its owner sees it
    info = services.queue_info(new)  # a job's own page plans again when the job is not in the plan yet
    assert info["position"] == 3 and len(services.queue_snapshot()) == QUEUE_PAGE_ROWS + 13
    Job.objects.filter(name="bob-running").update(status="succeeded", finished_at=timezone.now())
    assert services.queue_snapshot()[0]["reason"] == ""  # the GPU is free: the first job starts (a new plan)


def test_the_dashboard_hides_the_names_of_others_private_jobs(client, user, lab):
    client.force_login(user)
    page = client.get("/")
    assert page.status_code == 200 and b"bob-secret" not in page.content and b"bob-running" not in page.content
    assert b"alice-0" in page.content and b"(private job)" in page.content
    Job.objects.filter(name="bob-running").update(is_public=True)
    assert b"bob-running" in client.get("/").content


def test_status_and_stage_labels_follow_the_language(client, user, lab):
    from django.utils import translation

    job = Job.objects.get(name="alice-0")
    assert (job.get_status_display(), job.get_stage_display()) == ("queued", "Pretrain")
    with translation.override("zh-hans"):
        assert str(job.get_status_display()) != "queued" and str(job.get_stage_display()) != "Pretrain"
