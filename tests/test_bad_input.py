"""Bad input is refused with a clear 400 (JSON on the API, a page in the reader's language), never a 500: values of
the wrong type, NUL characters (PostgreSQL cannot store them), ids that are not ids ("abc", "²", 1.5, true), numbers
out of range. The first test sends every API route a set of malformed bodies and query strings."""
import json

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from jobs.models import Dataset

from conftest import TINY

WEIRD = [None, True, -1, 2**70, 1.5, "", "abc", "²", "x" * 3000, [], [1, "a"], {}, {"a": {"b": 1}}, "a\x00b"]
FIELDS = ["name", "stage", "dataset", "eval_dataset", "config", "priority", "gpus", "time_limit_s", "model",
          "messages", "max_tokens", "temperature", "top_p", "seed", "stream", "tokenizer", "username", "password",
          "visibility", "group", "half_batch", "vocab_size", "text", "enable_thinking"]


def _routes(resolver=None, prefix=""):
    for p in (resolver or get_resolver()).url_patterns:
        if isinstance(p, URLResolver):
            yield from _routes(p, prefix + str(p.pattern))
        elif isinstance(p, URLPattern):
            yield prefix + str(p.pattern)


def _paths(route: str) -> set[str]:
    import re

    return {"/" + re.sub(r"<(\w+):\w+>", lambda m: {"int": ids, "str": word}.get(m.group(1), "1"), route)
            for ids, word in (("1", "x"), ("99999999999999999999999", "%C2%B2"))}


@pytest.mark.django_db(transaction=True)
def test_no_api_route_answers_a_500_to_malformed_input(client, token):
    client.raise_request_exception = False
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    bodies = ["{", "[]", '"x"', "1", "[" * 5000, json.dumps({"a": "b\x00"})] + [
        json.dumps({f: w for f in FIELDS}) for w in WEIRD]
    query = "?after=abc&offset=%C2%B2&limit=-1&page=x&q=%00"
    failures = []
    for route in _routes():
        if not route.startswith(("api/", "v1/")):
            continue
        for path in _paths(route):
            sent = [("get", path + query, None), ("delete", path, None)]
            sent += [(m, path, b) for m in ("post", "put") for b in bodies]
            for method, url, body in sent:
                r = getattr(client, method)(url, body, content_type="application/json", **auth) if body else \
                    getattr(client, method)(url, **auth)
                if r.status_code >= 500 or (r.status_code >= 400 and "json" not in r.get("Content-Type", "")):
                    failures.append((method, url, (body or "")[:60], r.status_code))
    assert not failures, failures[:10]


def test_each_bad_job_field_is_named(api, db):
    demo = Dataset.objects.get(name="demo-pretrain")
    base = {"name": "f", "stage": "pretrain", "dataset": demo.pk, "config": dict(TINY, max_steps=3)}
    cases = [("name", True), ("name", ["a"]), ("name", " "), ("config", "batch_size=4"), ("priority", 2**70),
             ("priority", "high"), ("gpus", 1.5), ("gpus", 0), ("time_limit_s", 2**40), ("time_limit_s", True),
             ("dataset", "²"), ("dataset", True), ("dataset", 1.0), ("eval_dataset", "abc"), ("tokenizer", [1])]
    for field, value in cases:
        for path in ("/api/v1/jobs/estimate", "/api/v1/jobs"):
            r = api.post(path, {**base, field: value})
            assert r.status_code == 400 and r.json()["details"]["field"] == field, (path, field, value, r.content)
    assert api.post("/api/v1/jobs", {**base, "priority": "3", "gpus": 1.0}).status_code == 201  # form-like values


def test_other_endpoints_refuse_wrong_types(api, client, token, db):
    demo = Dataset.objects.get(name="demo-pretrain")
    r = api.post("/api/v1/tokenizers/train", {"name": 5, "dataset": demo.pk, "vocab_size": 300})
    assert r.status_code == 400 and r.json()["details"]["field"] == "name"
    r = api.post("/api/v1/tokenizers/train", {"name": "t", "dataset": "x\x00", "vocab_size": 300})
    assert r.status_code == 400 and "NUL" in r.json()["error"]
    r = client.post("/api/v1/auth/token", json.dumps({"username": "alice\x00", "password": "p"}),
                    content_type="application/json")
    assert r.status_code == 400
    r = api.post(f"/api/v1/datasets/{demo.pk}/share", {"visibility": "group", "group": True})
    assert r.status_code in (400, 404)
    r = api.post("/api/v1/jobs", {"name": "n", "stage": "pretrain", "dataset": demo.pk,
                                  "config": {"learning_rate": float("nan")}})  # json.dumps writes NaN, JSON has none
    assert r.status_code == 400 and "NaN" in r.json()["error"]
    from django.core.files.uploadedfile import SimpleUploadedFile

    r = client.post("/api/v1/models/import", {"name": "m", "config": '{"hidden_size": 1e400}',
                                              "file": SimpleUploadedFile("m.pth", b"x")},
                    HTTP_AUTHORIZATION=f"Bearer {token}")
    assert r.status_code == 400 and r.json()["details"]["field"] == "config"
    zh = client.get("/api/v1/jobs/999999", HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_ACCEPT_LANGUAGE="zh-hans")
    assert zh.status_code == 404 and "999999" in zh.json()["error"] and "job" not in zh.json()["error"]


def test_pages_refuse_nul_characters_and_ignore_ids_that_are_not_ids(client, user):
    client.force_login(user)
    r = client.post("/accounts/tokens/", {"name": "a\x00b"}, HTTP_ACCEPT_LANGUAGE="zh-hans")
    assert r.status_code == 400 and "NUL" in r.content.decode() and "错误请求" in r.content.decode()
    assert not user.api_tokens.exists()  # nothing was stored
    assert client.post("/accounts/tokens/", {"action": "revoke", "token": "²"}).status_code == 302
    for url in ("/models/evaluations/?dataset=²", "/jobs/compare/?ids=a,²,1", "/jobs/new/?template=x&clone=²",
                "/playground/?model=1.5", "/datasets/1/?page=²"):
        assert client.get(url).status_code == 200, url
    assert client.get("/?q=%00").status_code == 400
    r = client.post("/datasets/1/stats/", {"max_seq_len": "²", "tokenizer": "abc"})
    assert r.status_code == 302
    from jobs.services import submit_job

    job = submit_job(owner=user, name="j", stage="pretrain", dataset=Dataset.objects.get(name="demo-pretrain").pk,
                     config=dict(TINY, max_steps=2))
    for target, landed in (("abc", "/"), ("//evil.example/", "/"), (f"/jobs/{job.pk}/", f"/jobs/{job.pk}/")):
        r = client.post(f"/share/job/{job.pk}/", {"visibility": "private", "next": target})
        assert r.status_code == 302 and r["Location"] == landed, target  # "abc" is not taken for a view's name
