"""The HTTP API contract: auth, status codes, JSON errors, ownership."""
import json

import pytest

from models_registry.models import Tokenizer
from jobs.models import Dataset, Job, MetricPoint, LogChunk

from conftest import TINY


@pytest.fixture
def demo(db):
    return Dataset.objects.get(name="demo-pretrain")


def test_health_needs_no_auth(client, db):
    r = client.get("/api/v1/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_token_exchange(client, user):
    r = client.post("/api/v1/auth/token", json.dumps({"username": "alice", "password": "alice-pass-123"}),
                    content_type="application/json")
    assert r.status_code == 200
    tok = r.json()["token"]
    assert client.get("/api/v1/me", HTTP_AUTHORIZATION=f"Bearer {tok}").json()["username"] == "alice"
    bad = client.post("/api/v1/auth/token", json.dumps({"username": "alice", "password": "no"}),
                      content_type="application/json")
    assert bad.status_code == 401 and "error" in bad.json()
    assert client.post("/api/v1/auth/token", "{not json", content_type="application/json").status_code == 400


def test_no_or_bad_credentials_are_401(client, db):
    assert client.get("/api/v1/jobs").status_code == 401
    r = client.get("/api/v1/jobs", HTTP_AUTHORIZATION="Bearer nope")
    assert r.status_code == 401 and r.json()["error"]


def test_create_job_201_and_errors_400_with_field(api, demo):
    r = api.post("/api/v1/jobs", {"name": "a", "stage": "pretrain", "dataset": demo.pk, "config": TINY})
    assert r.status_code == 201, r.content
    body = r.json()
    assert body["status"] == "queued" and body["id"] and body["config"] == TINY
    r = api.post("/api/v1/jobs", {"name": "a", "stage": "pretrain", "dataset": demo.pk, "config": {"epochz": 1}})
    assert r.status_code == 400 and r.json()["details"]["field"] == "config.epochz"
    r = api.post("/api/v1/jobs", {"name": "a", "stage": "pretrain", "dataset": 99999})
    assert r.status_code == 400 and r.json()["details"]["field"] == "dataset"
    r = api.post("/api/v1/jobs", {"name": "a", "stage": "pretrain", "dataset": demo.pk, "colour": "red"})
    assert r.status_code == 400 and "colour" in r.json()["error"]
    assert Job.objects.count() == 1


def test_job_detail_metrics_logs_and_cancel(api, user, demo):
    job = Job.objects.create(owner=user, name="x", stage="pretrain", dataset=demo, tokenizer=Tokenizer.objects.get(name="demo-tokenizer"))
    MetricPoint.objects.bulk_create([MetricPoint(job=job, seq=i, step=i * 10, time=float(i),
                                                 values={"loss": 5.0 - i, "lr": 1e-3}) for i in range(1, 4)])
    LogChunk.objects.create(job=job, offset=0, text="hello\n")
    LogChunk.objects.create(job=job, offset=6, text="world\n")
    assert api.get(f"/api/v1/jobs/{job.pk}").json()["queue_position"] == 1
    pts = api.get(f"/api/v1/jobs/{job.pk}/metrics?after=1").json()["points"]
    assert [p["seq"] for p in pts] == [2, 3] and pts[0]["values"]["loss"] == 3.0 and pts[0]["step"] == 20
    assert api.get(f"/api/v1/jobs/{job.pk}/metrics?after=x").status_code == 400
    assert api.get(f"/api/v1/jobs/{job.pk}/logs?after=3").json() == {"text": "lo\nworld\n", "offset": 12}
    r = api.post(f"/api/v1/jobs/{job.pk}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert api.post(f"/api/v1/jobs/{job.pk}/cancel").status_code == 409


def test_clone_copies_the_job_with_the_changes_asked_for(api, demo):
    job = api.post("/api/v1/jobs", {"name": "a", "stage": "pretrain", "dataset": demo.pk, "priority": 3,
                                    "config": {**TINY, "seed": 5}}).json()
    same = api.post(f"/api/v1/jobs/{job['id']}/clone")
    assert same.status_code == 201 and same.json()["name"] == "a (copy)" and same.json()["config"] == job["config"]
    edited = api.post(f"/api/v1/jobs/{job['id']}/clone", {"name": "b", "config": {"batch_size": 4}, "priority": 0})
    body = edited.json()
    assert edited.status_code == 201 and (body["name"], body["priority"]) == ("b", 0)
    assert body["config"] == {**TINY, "seed": 5, "batch_size": 4}  # merged over the job's
    bad = api.post(f"/api/v1/jobs/{job['id']}/clone", {"config": {"batch_size": 0}})
    assert bad.status_code == 400 and bad.json()["details"]["field"] == "config.batch_size"
    assert api.post(f"/api/v1/jobs/{job['id']}/clone", {"config": [1]}).json()["details"]["field"] == "config"
    assert api.post(f"/api/v1/jobs/{job['id']}/clone", {"colour": "red"}).json()["details"]["field"] == "colour"
    assert Job.objects.count() == 3


def test_retry_after_running_out_of_memory_can_halve_the_batch(api, demo, settings, tmp_path):
    settings.HOME = tmp_path
    job = api.post("/api/v1/jobs", {"name": "big", "stage": "pretrain", "dataset": demo.pk,
                                    "config": {**TINY, "batch_size": 16}}).json()
    Job.objects.filter(pk=job["id"]).update(status="failed", error="out of memory: CUDA out of memory")
    assert api.post(f"/api/v1/jobs/{job['id']}/retry", {"half_batch": "yes"}).json()["details"]["field"] == "half_batch"
    assert api.post(f"/api/v1/jobs/{job['id']}/retry", {"halve": True}).json()["details"]["field"] == "halve"
    assert Job.objects.get(pk=job["id"]).status == "failed"  # a refused request changes nothing
    r = api.post(f"/api/v1/jobs/{job['id']}/retry", {"half_batch": True})
    body = r.json()
    assert r.status_code == 202 and body["status"] == "queued"
    assert (body["resolved_config"]["batch_size"], body["resolved_config"]["accumulation_steps"]) == (8, 2)
    Job.objects.filter(pk=job["id"]).update(status="failed")
    assert api.post(f"/api/v1/jobs/{job['id']}/retry").json()["resolved_config"]["batch_size"] == 8  # plain retry


def test_other_users_jobs_are_404(api, other_user, demo):
    job = Job.objects.create(owner=other_user, name="secret", stage="pretrain", dataset=demo, tokenizer=Tokenizer.objects.get(name="demo-tokenizer"))
    for path in (f"/api/v1/jobs/{job.pk}", f"/api/v1/jobs/{job.pk}/metrics", f"/api/v1/jobs/{job.pk}/logs"):
        assert api.get(path).status_code == 404
    assert api.post(f"/api/v1/jobs/{job.pk}/cancel").status_code == 404
    assert api.get("/api/v1/jobs").json()["jobs"] == []


def test_datasets_devices_models_and_openapi(api, demo):
    names = {d["name"] for d in api.get("/api/v1/datasets").json()["datasets"]}
    assert {"demo-pretrain", "demo-sft", "demo-dpo", "demo-rlaif"} <= names
    preview = api.get(f"/api/v1/datasets/{demo.pk}/preview?offset=2&limit=3").json()
    assert len(preview["records"]) == 3 and "text" in preview["records"][0]
    assert api.get("/api/v1/devices").status_code == 200
    assert api.get("/api/v1/models").json() == {"models": [], "next": None}
    assert api.get("/api/v1/models/5/download?format=pth").status_code == 404
    spec = api.get("/api/v1/openapi.json").json()
    assert "/jobs/{id}/metrics" in spec["paths"]


def test_dataset_and_model_listings_page_through_everything(api, user, other_user, demo):
    """The model listing stopped at 500 (and the dataset listing had no bound): both are paged (``limit``,
    ``offset``, ``next``) in their own order, ties broken by id, every row once."""
    from models_registry.models import ModelVersion

    Dataset.objects.bulk_create(Dataset(owner=owner, name="same", kind="pretrain", path="/x", is_public=True)
                                for owner in (user, other_user) * 3)
    ModelVersion.objects.bulk_create(ModelVersion(owner=user, name=f"m{i}", tokenizer=Tokenizer.demo(), path="/x")
                                     for i in range(503))
    for path, key, size, total in [("/api/v1/datasets?limit=3", "datasets", 3, Dataset.objects.count()),
                                   ("/api/v1/models", "models", 500, 503)]:
        seen, url = [], path
        while url:
            page = api.get(url).json()
            assert len(page[key]) <= size
            seen += [row["id"] for row in page[key]]
            url = page["next"]
        assert len(seen) == len(set(seen)) == total, key
    names = [d["name"] for d in api.get("/api/v1/datasets").json()["datasets"]]
    assert names == sorted(names)  # their own order (by name) across pages
    for query in ("limit=0", "limit=501", "offset=-1", "offset=x"):
        assert api.get(f"/api/v1/models?{query}").status_code == 400, query


def test_wrong_method_is_json_405(api, db):
    r = api.post("/api/v1/devices")
    assert r.status_code == 405 and "error" in r.json()


def test_stage_rules_for_base_and_teacher_models(api, user, demo):
    from models_registry.models import ModelVersion

    sft = Dataset.objects.get(name="demo-sft")
    r = api.post("/api/v1/jobs", {"name": "l", "stage": "lora", "dataset": sft.pk})
    assert r.status_code == 400 and r.json()["details"]["field"] == "base_model"
    r = api.post("/api/v1/jobs", {"name": "d", "stage": "distill", "dataset": sft.pk})
    assert r.status_code == 400 and r.json()["details"]["field"] == "teacher_model"
    mv = ModelVersion.objects.create(name="m", owner=user, config={"hidden_size": 64, "num_hidden_layers": 2,
                                                                   "num_attention_heads": 4,
                                                                   "num_key_value_heads": 2}, path="/nowhere")
    r = api.post("/api/v1/jobs", {"name": "p", "stage": "pretrain", "dataset": demo.pk, "teacher_model": mv.pk})
    assert r.status_code == 400 and r.json()["details"]["field"] == "teacher_model"
    r = api.post("/api/v1/jobs", {"name": "d", "stage": "distill", "dataset": sft.pk, "teacher_model": mv.pk,
                                  "config": {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2}})
    assert r.status_code == 201 and r.json()["teacher_model"] == mv.pk
    r = api.post("/api/v1/jobs", {"name": "s", "stage": "sft", "dataset": sft.pk, "base_model": mv.pk,
                                  "config": {"hidden_size": 999}})
    assert r.status_code == 201 and r.json()["resolved_config"]["hidden_size"] == 64  # the base model's size wins
    rlaif = Dataset.objects.get(name="demo-rlaif")
    r = api.post("/api/v1/jobs", {"name": "g", "stage": "grpo", "dataset": rlaif.pk})
    assert r.status_code == 400 and r.json()["details"]["field"] == "base_model"
    r = api.post("/api/v1/jobs", {"name": "g", "stage": "grpo", "dataset": rlaif.pk, "base_model": mv.pk,
                                  "config": {"rewards": {"contains": 1.0}, "num_generations": 4}})
    assert r.status_code == 201 and r.json()["resolved_config"]["loss_type"] == "cispo"
    r = api.post("/api/v1/jobs", {"name": "g", "stage": "ppo", "dataset": rlaif.pk, "base_model": mv.pk,
                                  "config": {"rewards": {"regex": 1.0}}})
    assert r.status_code == 400 and r.json()["details"]["field"] == "config.reward_regex"


def test_estimate_validates_like_a_submission_and_stores_nothing(api, demo):
    from jobs.models import Job

    r = api.post("/api/v1/jobs/estimate", {"stage": "pretrain", "dataset": demo.pk, "config": {"use_moe": True}})
    body = r.json()
    assert r.status_code == 200 and body["parameters"]["total"] > 3 * body["parameters"]["active"] / 2
    assert body["memory"]["bytes"] == sum(body["memory"]["parts"].values()) and body["seconds"] > 0
    r = api.post("/api/v1/jobs/estimate", {"stage": "pretrain", "dataset": demo.pk, "config": {"batch_size": 0}})
    assert r.status_code == 400 and r.json()["details"]["field"] == "config.batch_size"
    assert Job.objects.count() == 0
