"""Roles and visibility: every read endpoint × every role returns the object or 404 (never data), every write
endpoint refuses non-owners; sharing with a group and publishing; instructors manage their groups."""
import pytest
from django.contrib.auth.models import Group

from accounts import services as acc
from accounts.models import ApiToken, AuditEntry, GroupInfo, Profile
from jobs.models import Dataset, Job, LogChunk, MetricPoint
from minicloud.errors import ServiceError
from models_registry.models import ModelVersion, Tokenizer


@pytest.fixture
def world(db, django_user_model, tmp_path):
    users = {name: django_user_model.objects.create_user(name, password=f"{name}-pass-123")
             for name in ("alice", "bob", "carol", "dave")}
    users["root"] = django_user_model.objects.create_superuser("root", password="root-pass-123")
    course = Group.objects.create(name="course")
    users["alice"].groups.add(course)
    users["carol"].groups.add(course)
    Profile.objects.create(user=users["dave"], role="instructor")
    GroupInfo.objects.create(group=course).instructors.add(users["dave"])
    demo = Dataset.objects.get(name="demo-pretrain")
    tok = Tokenizer.objects.get(name="demo-tokenizer")
    jobs = {}
    for vis in ("private", "group", "public"):
        job = Job.objects.create(owner=users["alice"], name=f"job-{vis}", stage="pretrain", dataset=demo,
                                 tokenizer=tok, is_public=vis == "public",
                                 shared_with=course if vis == "group" else None)
        MetricPoint.objects.create(job=job, seq=1, step=1, time=1.0, values={"loss": 1.0})
        LogChunk.objects.create(job=job, offset=0, text=f"secret log of {vis}\n")
        jobs[vis] = job
    weights = tmp_path / "m.pth"
    weights.write_bytes(b"weights")
    model = ModelVersion.objects.create(owner=users["alice"], name="alice-model", stage="sft", path=str(weights))
    data = Dataset.objects.create(owner=users["alice"], name="alice-data", kind="pretrain", path=demo.path,
                                  records=demo.records)
    tokens = {name: ApiToken.issue(u)[1] for name, u in users.items()}
    return {"users": users, "jobs": jobs, "model": model, "data": data, "tokens": tokens, "course": course}


READERS = {  # who may read alice's job of each visibility
    "private": {"alice", "dave", "root"},  # dave instructs alice's group
    "group": {"alice", "carol", "dave", "root"},
    "public": {"alice", "bob", "carol", "dave", "root"},
}


@pytest.mark.parametrize("vis", ["private", "group", "public"])
@pytest.mark.parametrize("who", ["alice", "bob", "carol", "dave", "root"])
def test_job_reads_follow_visibility_on_pages_and_api(world, client, who, vis):
    job = world["jobs"][vis]
    allowed = who in READERS[vis]
    auth = {"HTTP_AUTHORIZATION": f"Bearer {world['tokens'][who]}"}
    client.force_login(world["users"][who])
    for path, kw in ((f"/jobs/{job.pk}/", {}), (f"/jobs/{job.pk}/log.txt", {}), (f"/api/v1/jobs/{job.pk}", auth),
                     (f"/api/v1/jobs/{job.pk}/metrics", auth), (f"/api/v1/jobs/{job.pk}/logs", auth)):
        r = client.get(path, **kw)
        assert r.status_code == (200 if allowed else 404), (who, vis, path)
        if not allowed:
            assert b"secret log" not in r.content and b"job-" not in r.content, path  # never data
    listed = {j["id"] for j in client.get("/api/v1/jobs", **auth).json()["jobs"]}
    assert (job.pk in listed) == allowed


@pytest.mark.parametrize("who", ["bob", "carol", "dave"])
def test_only_the_owner_or_an_admin_acts_on_a_job(world, client, who):
    job = world["jobs"]["group"]
    auth = {"HTTP_AUTHORIZATION": f"Bearer {world['tokens'][who]}"}
    for action in ("cancel", "pause", "resume", "retry"):
        r = client.post(f"/api/v1/jobs/{job.pk}/{action}", **auth)
        assert r.status_code == (404 if who == "bob" else 403), (who, action)
    client.force_login(world["users"][who])
    assert client.post(f"/jobs/{job.pk}/cancel/").status_code == (404 if who == "bob" else 403)
    assert Job.objects.get(pk=job.pk).status == "queued"
    root = {"HTTP_AUTHORIZATION": f"Bearer {world['tokens']['root']}"}
    assert client.post(f"/api/v1/jobs/{job.pk}/cancel", **root).status_code == 202


def test_models_and_datasets_follow_visibility_and_sharing(world, client):
    model, data = world["model"], world["data"]
    tok = world["tokens"]

    def get(who, path):
        return client.get(path, HTTP_AUTHORIZATION=f"Bearer {tok[who]}")

    paths = [f"/api/v1/models/{model.pk}", f"/api/v1/models/{model.pk}/download",
             f"/api/v1/datasets/{data.pk}", f"/api/v1/datasets/{data.pk}/preview"]
    for who in ("bob", "carol"):
        assert [get(who, p).status_code for p in paths] == [404] * 4
    assert [get("alice", p).status_code for p in paths] == [200] * 4
    # Alice shares both with her course: carol (a member) reads and downloads, bob still cannot.
    for kind, obj in (("models", model), ("datasets", data)):
        r = client.post(f"/api/v1/{kind}/{obj.pk}/share", {"visibility": "group", "group": world["course"].pk},
                        content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {tok['alice']}")
        assert r.status_code == 200 and r.json()["visibility"] == "group"
    assert [get("carol", p).status_code for p in paths] == [200] * 4
    assert b"".join(get("carol", paths[1]).streaming_content) == b"weights"
    assert [get("bob", p).status_code for p in paths] == [404] * 4
    # Carol cannot re-share what is not hers; bob cannot even see it.
    r = client.post(f"/api/v1/models/{model.pk}/share", {"visibility": "public"}, content_type="application/json",
                    HTTP_AUTHORIZATION=f"Bearer {tok['carol']}")
    assert r.status_code == 403
    assert AuditEntry.objects.filter(action="share").count() == 2
    assert AuditEntry.objects.filter(action="download", username="carol").exists()


def test_sharing_from_the_page_and_only_with_ones_own_groups(world, client):
    job = world["jobs"]["private"]
    other = Group.objects.create(name="other")
    client.force_login(world["users"]["alice"])
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert 'id="share-form"' in page and "shared with course" in page and "shared with other" not in page
    r = client.post(f"/share/job/{job.pk}/", {"visibility": "public", "next": f"/jobs/{job.pk}/"})
    assert r.status_code == 302 and Job.objects.get(pk=job.pk).is_public
    with pytest.raises(ServiceError):
        acc.set_visibility(world["users"]["alice"], job, "group", other)
    client.force_login(world["users"]["carol"])
    assert 'id="share-form"' not in client.get(f"/jobs/{job.pk}/").content.decode()  # public, but not hers
    # Who sees it, for a reader who may not change it, and on the dataset list: in the page's language.
    zh = client.get(f"/jobs/{job.pk}/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "可见性: 公开" in zh
    assert "可见性: 共享给 course" in client.get(f"/jobs/{world['jobs']['group'].pk}/",
                                               HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    Dataset.objects.filter(pk=world["data"].pk).update(shared_with=world["course"])
    datasets = client.get("/datasets/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "<td>公开</td>" in datasets and "<td>共享给 course</td>" in datasets
    assert "<td>shared with course</td>" in client.get("/datasets/").content.decode()


def test_instructors_create_groups_and_manage_members_and_quotas(world, client):
    dave, bob = world["users"]["dave"], world["users"]["bob"]
    with pytest.raises(ServiceError):
        acc.create_group(bob, "bob's club")  # members do not create groups
    client.force_login(dave)
    r = client.post("/groups/", {"name": "nlp-2026", "description": "spring course"})
    group = Group.objects.get(name="nlp-2026")
    assert r.status_code == 302 and acc.manages_group(dave, group)
    client.post(f"/groups/{group.pk}/", {"action": "add", "username": "bob"})
    assert not bob.groups.filter(pk=group.pk).exists()  # invited: bob joins when he accepts
    client.force_login(bob)
    invitation = bob.group_invitations.get()
    assert "nlp-2026" in client.get("/groups/").content.decode()
    client.post("/groups/", {"action": "accept", "invitation": invitation.pk})
    assert bob.groups.filter(pk=group.pk).exists()
    client.force_login(dave)
    client.post(f"/groups/{group.pk}/", {"action": "quota", "max_running_jobs": 1, "device_hours_per_week": 5})
    assert acc.effective_quota(bob)["max_running_jobs"] == 1
    client.force_login(world["users"]["carol"])
    assert client.get(f"/groups/{group.pk}/").status_code == 404  # not hers
    client.force_login(bob)
    assert client.get(f"/groups/{group.pk}/").status_code == 200
    client.post(f"/groups/{group.pk}/", {"action": "add", "username": "carol"})
    assert not world["users"]["carol"].groups.filter(pk=group.pk).exists()  # members do not manage
    assert {e.action for e in AuditEntry.objects.all()} >= {"group_create", "group_invite", "group_join",
                                                            "quota_change"}


@pytest.mark.parametrize("who,role", [("alice", "member"), ("dave", "instructor"), ("root", "admin")])
def test_me_reports_the_one_role_rule(world, client, who, role):
    """``GET /api/v1/me`` says what the pages say (accounts.access.role_of): an instructor was reported a member."""
    r = client.get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {world['tokens'][who]}")
    assert r.json()["role"] == role == acc.role_of(world["users"][who])


def test_the_access_layer_answers_every_entry_point_alike(world):
    """accounts.access: what a user may not read is NotFound (a 404 page and a JSON 404 alike, never 403), what they
    may read but not manage is Forbidden; the WebSocket consumer and the pages ask the same functions."""
    from django.core.exceptions import PermissionDenied
    from django.http import Http404

    from accounts.access import Forbidden, NotFound, manageable, may_manage, readable

    job, users = world["jobs"]["group"], world["users"]
    with pytest.raises(NotFound) as missing:
        readable(Job, users["bob"], job.pk)
    assert isinstance(missing.value, Http404) and isinstance(missing.value, ServiceError) and missing.value.status == 404
    with pytest.raises(NotFound):
        readable(Job, users["alice"], "abc")  # an id a client made up: not a ValueError
    assert readable(Job, users["carol"], str(job.pk)) == job
    with pytest.raises(Forbidden) as refused:
        manageable(Job, users["carol"], job.pk)
    assert isinstance(refused.value, PermissionDenied) and refused.value.status == 403
    assert manageable(Job, users["alice"], job.pk) == job and may_manage(users["root"], job)
    assert not may_manage(users["dave"], job)  # an instructor reads their members' jobs but does not act on them


@pytest.mark.parametrize("who", ["alice", "bob", "carol", "dave"])
def test_what_a_member_may_read_is_one_query_with_no_distinct(world, who):
    """A member's groups and the members of the groups they instruct are subqueries of the one read, not reads of
    their own: each read is a round trip to PostgreSQL, which a burst of requests waits on (docs/performance.md)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    other = Job.objects.create(owner=world["users"]["bob"], name="bob-job", stage="pretrain",
                               dataset=world["jobs"]["public"].dataset, tokenizer=world["jobs"]["public"].tokenizer,
                               shared_with=world["course"])
    world["users"]["dave"].groups.add(world["course"])  # an instructor who is also a member: no row twice
    with CaptureQueriesContext(connection) as queries:
        names = sorted(Job.objects.visible_to(world["users"][who]).values_list("name", flat=True))
    assert len(queries.captured_queries) == 1 and "DISTINCT" not in queries.captured_queries[0]["sql"]
    expected = {"alice": ["bob-job", "job-group", "job-private", "job-public"], "bob": ["bob-job", "job-public"],
                "carol": ["bob-job", "job-group", "job-public"],
                "dave": ["bob-job", "job-group", "job-private", "job-public"]}[who]
    assert names == expected
