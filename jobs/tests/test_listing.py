"""The API's job listing (GET /api/v1/jobs): read as values() rows with the JSON columns as stored text, it must
say of every job exactly what the job's own ``to_dict`` says (a job page, GET /api/v1/jobs/{id})."""
import json

from django.contrib.auth.models import Group
from django.utils import translation

from jobs.models import Dataset, Job
from jobs.selectors import jobs_listed
from models_registry.models import Tokenizer


def _jobs(owner, group):
    ds, tok = Dataset.objects.get(name="demo-pretrain"), Tokenizer.objects.get(name="demo-tokenizer")
    base = dict(owner=owner, stage="sft", dataset=ds, tokenizer=tok)
    return [
        Job.objects.create(**base, name="plain"),
        Job.objects.create(**base, name="oom 中文", status="failed", config={"batch_size": 8},
                           resolved_config={"batch_size": 8, "learning_rate": 1e-4, "note": "ünïcode ✓"},
                           error="out of memory: lower batch_size", devices=[0, 1], peak_memory=2**40),
        Job.objects.create(**base, name="oom at batch 1", status="failed", config={"batch_size": 1},
                           resolved_config={"batch_size": 1}, error="out of memory: lower batch_size"),
        Job.objects.create(**base, name="portal error", status="failed", error="dataset %(name)s vanished",
                           error_params={"name": "d1"}),
        Job.objects.create(**base, name="preparing", status="running", step=3, total_steps=7, eta_s=12.5,
                           phase={"name": "prepare", "fraction": 0.41, "records": 2_100_000}, node="n1",
                           executor="slurm", slurm={"id": "13", "state": "RUNNING", "nodes": "node[1-2]"},
                           notify={"email": True}, trackers={"wandb": {"project": "p"}}, time_limit_s=3600),
        Job.objects.create(**base, name="shared", shared_with=group, status="succeeded", memory_estimate=10**9),
        Job.objects.create(**base, name="public", is_public=True, status="queued", priority=5, gpus=2),
    ]


def test_listing_says_what_each_job_says_of_itself(user, admin_user):
    group = Group.objects.create(name="lab 实验室")
    user.groups.add(group)
    jobs = _jobs(user, group)
    for lang in ("en", "zh-hans"):  # the texts (error, phase, Slurm) in the active language
        with translation.override(lang):
            for reader in (user, admin_user):
                listed = jobs_listed(reader)
                assert [j.pk for j in listed] == [j.pk for j in reversed(jobs)]  # newest first
                for row in listed:
                    job = Job.objects.select_related("owner", "shared_with").get(pk=row.pk)
                    assert _encoded(row.to_dict()) == _encoded(job.to_dict()), job.name
    by_name = {j.name: j.to_dict() for j in jobs_listed(user)}
    assert by_name["oom 中文"]["can_halve_batch"] and not by_name["oom at batch 1"]["can_halve_batch"]
    assert by_name["shared"]["shared_with"] == "lab 实验室" and by_name["preparing"]["slurm"]["nodes"] == "node[1-2]"


def test_api_listing_body_is_plain_utf8_json(client, user, token):
    _jobs(user, Group.objects.create(name="g"))
    r = client.get("/api/v1/jobs", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert r.status_code == 200 and r["Content-Type"] == "application/json"
    assert "oom 中文".encode() in r.content  # UTF-8 as it is, not \\u-escaped
    data = json.loads(r.content)["jobs"]
    assert {j["name"] for j in data} >= {"plain", "preparing"}
    oom = next(j for j in data if j["name"] == "oom 中文")
    assert oom["resolved_config"] == {"batch_size": 8, "learning_rate": 1e-4, "note": "ünïcode ✓"}
    assert oom["devices"] == [0, 1] and oom["notify"] is None


def _encoded(data):
    from minicloud.api import json_response

    return json.loads(json_response(data).content)


def test_listing_pages_reach_every_job(api, user, other_user):
    """The listing stopped at the newest 500 jobs with no way to the older ones: it is paged (``limit``, and
    ``next`` naming the page after, by ``before``), newest first, every job once."""
    ds, tok = Dataset.objects.get(name="demo-pretrain"), Tokenizer.objects.get(name="demo-tokenizer")
    Job.objects.bulk_create(Job(owner=user, stage="pretrain", dataset=ds, tokenizer=tok, name=f"j{i}")
                            for i in range(503))
    Job.objects.create(owner=other_user, stage="pretrain", dataset=ds, tokenizer=tok, name="not mine")
    mine = list(Job.objects.filter(owner=user).order_by("-pk").values_list("pk", flat=True))

    first = api.get("/api/v1/jobs").json()  # the default page: 500
    assert [j["id"] for j in first["jobs"]] == mine[:500]
    rest = api.get(first["next"]).json()
    assert [j["id"] for j in rest["jobs"]] == mine[500:] and rest["next"] is None

    seen, url = [], "/api/v1/jobs?limit=200&stage=pretrain"
    while url:
        page = api.get(url).json()
        assert len(page["jobs"]) <= 200 and "stage=pretrain" in (page["next"] or "stage=pretrain")
        seen += [j["id"] for j in page["jobs"]]
        url = page["next"]
    assert seen == mine


def test_listing_filters(api, user, other_user):
    group = Group.objects.create(name="g")
    user.groups.add(group)
    other_user.groups.add(group)
    jobs = _jobs(user, group)
    ds, tok = Dataset.objects.get(name="demo-pretrain"), Tokenizer.objects.get(name="demo-tokenizer")
    Job.objects.create(owner=other_user, stage="pretrain", dataset=ds, tokenizer=tok, name="theirs",
                       shared_with=group, status="failed")

    def names(query):
        r = api.get("/api/v1/jobs?" + query)
        assert r.status_code == 200, r.content
        return {j["name"] for j in r.json()["jobs"]}

    assert names("status=failed") == {"oom 中文", "oom at batch 1", "portal error", "theirs"}
    assert names("status=queued,running") == {"plain", "preparing", "public"}
    assert names("stage=pretrain") == {"theirs"}
    assert names(f"owner={other_user.username}") == {"theirs"}
    assert names(f"owner={user.username}&status=succeeded") == {"shared"}
    assert names("owner=nobody") == set()
    assert len(names("")) == len(jobs) + 1


def test_listing_refuses_bad_parameters_by_name(api, user):
    for query, field in [("limit=0", "limit"), ("limit=501", "limit"), ("status=done", "status"),
                         ("stage=rlhf", "stage")]:
        r = api.get("/api/v1/jobs?" + query)
        assert r.status_code == 400 and r.json()["details"] == {"field": field}, (query, r.content)
    for query in ("limit=ten", "before=x", "before=-1"):
        r = api.get("/api/v1/jobs?" + query)
        assert r.status_code == 400 and r.json()["error"].startswith(query.split("=")[0]), (query, r.content)
    r = api.get("/api/v1/jobs?status=done", HTTP_ACCEPT_LANGUAGE="zh-hans")
    assert r.status_code == 400 and "未知的值" in r.json()["error"]
