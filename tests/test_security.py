"""The portal as an attacker sees it (docs/security.md, "Threat model"): each test names the class of defect it
closes, and goes through the real HTTP or WebSocket surface where the defect is reachable there."""
import asyncio
import gzip
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group

from jobs import services
from jobs.models import Dataset, Job
from models_registry.models import Tokenizer

from conftest import TINY

User = get_user_model()


def _bearer(user):
    from accounts.models import ApiToken

    return {"HTTP_AUTHORIZATION": f"Bearer {ApiToken.issue(user)[1]}"}


def _post_json(client, path, data, user):
    return client.post(path, json.dumps(data), content_type="application/json", **_bearer(user))


# --- 4. job output is not trusted as events ---------------------------------------------------------------------------

FORGED = '{"event": "error", "time": 0, "message": "FORGED: your job was deleted"}'


def test_text_a_user_controls_cannot_forge_a_jobs_events(user, settings):
    """A tokenizer's chat template that raises with a crafted message: its traceback reaches the engine's stderr with
    the message on a line of its own. Only lines that carry the run's token are events."""
    from jobs.supervisor import Supervisor

    demo = Tokenizer.demo()
    folder = Path(settings.HOME) / "evil-tokenizer"
    shutil.copytree(demo.path, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{{ raise_exception('bad\\n" + FORGED.replace('"', '\\"') + "\\n') }}"
    config_path.write_text(json.dumps(config))
    tok = Tokenizer.objects.create(name="evil", owner=user, path=str(folder), vocab_size=demo.vocab_size)
    job = services.submit_job(owner=user, name="forge", stage="sft", dataset=Dataset.objects.get(name="demo-sft").pk,
                              tokenizer=tok.pk, config={**TINY, "max_steps": 2})
    job = services.claim_next_job(settings.NODE_NAME, 1)
    assert job is not None
    Supervisor(job).run()
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED
    assert "FORGED" not in job.error and "bad" in job.error
    from jobs.models import LogChunk

    assert FORGED in "".join(LogChunk.objects.filter(job=job).values_list("text", flat=True))  # as log text


def test_lines_without_the_runs_token_are_log_text(user):
    import io

    from jobs.supervisor import Supervisor

    job = services.submit_job(owner=user, name="t", stage="pretrain",
                              dataset=Dataset.objects.get(name="demo-pretrain").pk, config=TINY)
    sup = Supervisor(job)
    sup.raw_log = io.StringIO()
    sup.lines.put(json.dumps({"event": "step", "step": 7, "time": 0, "metrics": {"loss": 0.1}}))
    sup.lines.put("0" * 32 + " " + json.dumps({"event": "step", "step": 8, "time": 0, "metrics": {}}))
    sup.lines.put("模型输出： 你好")  # a first word beyond ASCII (a rollout, a warning in Chinese) is text too
    sup.lines.put(sup.token + " " + json.dumps({"event": "step", "step": 3, "time": 0, "metrics": {"loss": 2.0}}))
    sup.flush()
    job.refresh_from_db()
    assert job.step == 3 and list(job.metrics.values_list("step", flat=True)) == [3]
    assert '"step": 7' in sup.raw_log.getvalue() and sup.token not in sup.raw_log.getvalue()
    assert "模型输出： 你好" in sup.raw_log.getvalue()


# --- 5. hardening -----------------------------------------------------------------------------------------------------

def test_training_processes_get_no_secrets_from_the_portals_environment(monkeypatch):
    from minicloud.processes import engine_env

    monkeypatch.setenv("DATABASE_URL", "postgres://admin:secret@db/minicloud")
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "hunter2")
    monkeypatch.setenv("SECRET_KEY", "k")
    monkeypatch.setenv("REDIS_URL", "redis://x")
    monkeypatch.setenv("CUDA_HOME", "/usr/local/cuda")
    env = engine_env()
    assert not {"DATABASE_URL", "DJANGO_SUPERUSER_PASSWORD", "SECRET_KEY", "REDIS_URL"} & set(env)
    assert env["CUDA_HOME"] == "/usr/local/cuda" and env["PATH"] == os.environ["PATH"]


def test_what_the_portal_writes_is_readable_by_its_own_account_only(settings, tmp_path, client, user):
    from minicloud.apps import ensure_home

    settings.HOME = tmp_path / "fresh-home"
    ensure_home()
    assert stat.S_IMODE(os.stat(settings.HOME).st_mode) == 0o700
    client.force_login(user)
    body = b'{"text": "hello"}\n' * 10
    from django.core.files.uploadedfile import SimpleUploadedFile

    r = client.post("/datasets/upload/", {"name": "mine", "kind": "pretrain",
                                          "file": SimpleUploadedFile("a.jsonl", body)})
    assert r.status_code in (200, 302)
    ds = Dataset.objects.get(name="mine")
    assert stat.S_IMODE(os.stat(ds.path).st_mode) & 0o077 == 0
    assert settings.FILE_UPLOAD_PERMISSIONS == 0o600


@pytest.mark.parametrize("line", [b"[" * 100_000 + b"]" * 100_000, b'{"text": ' + b"9" * 5000 + b"}"])
def test_malformed_dataset_lines_are_named_not_a_500(client, user, line):
    from django.core.files.uploadedfile import SimpleUploadedFile

    client.force_login(user)
    r = client.post("/api/v1/datasets", {"name": "bad", "kind": "pretrain",
                                         "file": SimpleUploadedFile("bad.jsonl", b'{"text": "ok"}\n' + line + b"\n")},
                    **_bearer(user))
    assert r.status_code == 400, r.content[:300]
    assert "line 2" in r.json()["error"] + json.dumps(r.json().get("details"))


def test_a_gzip_bomb_is_refused_without_unpacking_it(client, user, tmp_path):
    """One line of 64 MB of spaces packs into 64 KB: the reader stops at its line bound."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    raw = gzip.compress(b'{"text": "' + b" " * (64 << 20) + b'"}\n', compresslevel=9)
    assert len(raw) < 200_000
    r = client.post("/api/v1/datasets", {"name": "bomb", "kind": "pretrain",
                                         "file": SimpleUploadedFile("bomb.jsonl.gz", raw)}, **_bearer(user))
    assert r.status_code == 400
    assert "longer than" in json.dumps(r.json())



def test_a_line_over_the_bound_is_refused_in_the_callers_language(client, user, monkeypatch):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from training import records

    monkeypatch.setattr(records, "MAX_LINE_BYTES", 1000)
    body = b'{"text": "ok"}\n{"text": "' + b"x" * 2000 + b'"}\n'
    r = client.post("/api/v1/datasets", {"name": "long", "kind": "pretrain",
                                         "file": SimpleUploadedFile("long.jsonl", body)},
                    HTTP_ACCEPT_LANGUAGE="zh-hans", **_bearer(user))
    assert r.status_code == 400
    assert "超过 0 MB" in json.dumps(r.json(), ensure_ascii=False), r.json()

def test_the_one_reader_bounds_lines_and_unpacking(tmp_path, monkeypatch):
    from training import records

    monkeypatch.setattr(records, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "a"}\n' + b'{"text": "' + b"x" * 2000 + b'"}\n')
    with pytest.raises(records.DataTooLarge, match="line 2: longer than"):
        list(records.iter_records(path))
    monkeypatch.setattr(records, "GZIP_FLOOR_BYTES", 10_000)
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "aaaaaaaa"}\n' * 5000))
    with pytest.raises(records.DataTooLarge, match="unpacks to more than"):
        list(records.iter_records(gz))


class _Payload:
    """What a crafted checkpoint would smuggle in: unpickling it runs code (here: it writes a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_resume_checkpoint_runs_no_code_when_loaded(tmp_path):
    import pickle

    import torch

    from training.loop import load_checkpoint

    marker = tmp_path / "ran"
    path = tmp_path / "resume.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3, "evil": _Payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
    assert not marker.exists()
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3, "rng": {"torch": torch.get_rng_state()}}, path)
    assert load_checkpoint(path)["step"] == 3


# --- 1. instructors reach no further than their consenting members ------------------------------------------------------

@pytest.fixture
def course(db, client):
    from accounts.models import Profile
    from accounts.services import create_group

    teacher = User.objects.create_user("teacher", password="pw-teacher-1")
    Profile.objects.update_or_create(user=teacher, defaults={"role": "instructor"})
    root = User.objects.create_superuser("root", password="pw-root-1")
    student = User.objects.create_user("student", password="pw-student-1")
    return {"teacher": teacher, "root": root, "student": student, "group": create_group(teacher, "course")}


def test_an_instructor_cannot_make_anyone_a_member_without_their_consent(course, client):
    teacher, root, student, group = course["teacher"], course["root"], course["student"], course["group"]
    secret = Dataset.objects.create(name="root-private", owner=root, kind="pretrain", path="/nonexistent")
    client.force_login(teacher)
    for who in ("root", "student"):
        r = client.post(f"/groups/{group.pk}/", {"action": "add", "username": who})
        assert r.status_code == 302
    assert not root.groups.exists() and not student.groups.exists()
    assert client.get(f"/datasets/{secret.pk}/").status_code == 404
    assert client.get(f"/api/v1/datasets/{secret.pk}", **_bearer(teacher)).status_code == 404
    # the student accepts, the admin declines: only the student's objects are the teacher's to read
    client.force_login(student)
    invitation = student.group_invitations.get()
    assert client.post("/groups/", {"action": "accept", "invitation": invitation.pk}).status_code == 302
    client.force_login(root)
    client.post("/groups/", {"action": "decline", "invitation": root.group_invitations.get().pk})
    assert list(student.groups.all()) == [group] and not root.groups.exists()
    # nobody answers another user's invitation
    from accounts.models import GroupInvitation

    client.force_login(teacher)
    other = GroupInvitation.objects.create(group=group, user=root, invited_by=teacher)
    client.post("/groups/", {"action": "accept", "invitation": other.pk})
    assert not root.groups.exists()


def test_an_instructor_can_only_tighten_an_admins_limits_and_never_give_priority(course, client):
    from accounts.models import Quota
    from accounts.services import effective_quota

    teacher, student, group = course["teacher"], course["student"], course["group"]
    student.groups.add(group)
    Quota.objects.create(user=student, device_hours_per_week=2, storage_gb=1, max_running_jobs=1)
    client.force_login(teacher)
    r = client.post(f"/groups/{group.pk}/", {"action": "quota", "device_hours_per_week": 500, "storage_gb": 1000,
                                             "max_running_jobs": "", "max_job_hours": 3})
    assert r.status_code == 302
    limits = effective_quota(student)
    assert (limits["device_hours_per_week"], limits["storage_gb"], limits["max_running_jobs"]) == (2, 1, 1)
    assert limits["max_job_hours"] == 3  # tighter than the admin's (none): it applies
    # a group of the instructor's with no admin quota does not lift a user without one either
    other = User.objects.create_user("other", password="pw-other-1")
    Quota.objects.create(group=Group.objects.create(name="admins-course"), device_hours_per_week=4)
    other.groups.add(Group.objects.get(name="admins-course"), group)
    assert effective_quota(other)["device_hours_per_week"] == 4
    # no priority from an instructor: the form has no such field, the service refuses it
    r = client.post(f"/groups/{group.pk}/", {"action": "quota", "priority": 1000})
    assert not Quota.objects.filter(group=group, priority__isnull=False).exists()
    from accounts.services import set_group_quota
    from minicloud.errors import ServiceError

    with pytest.raises(ServiceError, match="priority"):
        set_group_quota(teacher, group, {"priority": 1000})
    assert effective_quota(student)["priority"] is None
    # the admin sets the group's quota, priority included
    set_group_quota(course["root"], group, {"priority": 5, "device_hours_per_week": 10})
    assert Quota.objects.get(group=group).priority == 5


# --- 2. limits that cannot be talked around ---------------------------------------------------------------------------

async def _asgi(path, body_chunks, headers=()):
    """One HTTP request through the ASGI application as daphne delivers it (the body in chunks)."""
    from minicloud.asgi import application

    messages = [{"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1}
                for i, c in enumerate(body_chunks)] or [{"type": "http.request", "body": b""}]
    received, sent = iter(messages), []

    async def receive():
        message = next(received, None)
        if message is None:  # as a server does: the client is still there, waiting for the answer
            await asyncio.Event().wait()
        return message

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "scheme": "http", "asgi": {"version": "3.0"}}
    await application(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), \
        sum(1 for _ in received)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_request_bodies_are_bounded_before_authentication(settings):
    settings.MAX_BODY_BYTES = 1 << 20
    # declared too large: refused before a byte is read
    status, body, unread = await _asgi("/api/v1/auth/token", [b"x" * 1000] * 3,
                                       [(b"content-length", str(400 << 20).encode())])
    assert status == 413 and json.loads(body)["details"]["limit_bytes"] == 1 << 20 and unread == 3
    # no length, and more than allowed: reading stops at the allowance
    status, body, unread = await _asgi("/api/v1/auth/token", [b"x" * (256 << 10)] * 40)
    assert status == 413 and unread > 30
    # a small body still reaches the view
    status, body, _ = await _asgi("/api/v1/auth/token", [json.dumps({"username": "x", "password": "y"}).encode()])
    assert status == 401
    # an upload route allows files
    from minicloud.bodylimit import allowance

    assert allowance("/api/v1/uploads/abc") == allowance("/api/v1/datasets") == settings.UPLOAD_MAX_BYTES
    assert allowance("/api/v1/jobs") == settings.MAX_BODY_BYTES


def test_too_large_a_body_read_by_django_is_a_413_not_a_500(client, user, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    r = _post_json(client, "/api/v1/jobs", {"name": "x" * 5000}, user)
    assert r.status_code == 413 and "larger than" in r.json()["error"]


def test_every_upload_chunk_spends_the_storage_quota(client, user):
    from accounts.models import Quota

    Quota.objects.create(user=user, storage_gb=1e-6)  # 1000 bytes
    auth = _bearer(user)
    up = client.post("/api/v1/uploads", **auth).json()
    put = lambda offset, data: client.put(f"/api/v1/uploads/{up['id']}?offset={offset}", data,  # noqa: E731
                                          content_type="application/octet-stream", **auth)
    assert put(0, b"a" * 600).status_code == 200
    r = put(600, b"b" * 600)
    assert r.status_code == 403 and "quota" in r.json()["error"]
    assert client.get(f"/api/v1/uploads/{up['id']}", **auth).json()["offset"] == 600  # nothing of it kept
    # a second upload cannot start beside a first that holds the quota either
    assert put(600, b"c" * 300).status_code == 200
    r = client.post("/api/v1/uploads", **auth)
    assert r.status_code in (201, 403)
    if r.status_code == 201:
        other = r.json()["id"]
        assert client.put(f"/api/v1/uploads/{other}?offset=0", b"d" * 200, content_type="application/octet-stream",
                          **auth).status_code == 403
    from accounts.services import storage_used

    assert storage_used(user) == 900


def test_a_running_job_is_paused_when_the_weekly_hours_run_out(user, settings):
    from accounts.models import Quota
    from jobs.supervisor import Supervisor

    settings.QUOTA_CHECK_S = 0.2
    Quota.objects.create(user=user, device_hours_per_week=3 / 3600)  # three device-seconds
    services.update_integrations(user, email_enabled=True, email="me@lab.example", webhook_url="",
                                 events=["paused_quota"], wait_minutes=60)
    ds = Dataset.objects.get(name="demo-pretrain")
    services.submit_job(owner=user, name="long", stage="pretrain", dataset=ds.pk,
                        config={**TINY, "epochs": 50, "save_interval": 5})
    job = services.claim_next_job(settings.NODE_NAME, 1)
    assert Supervisor(job).run() == Job.Status.PAUSED
    job.refresh_from_db()
    assert "paused at step" in job.events.last().text
    # the owner hears of it (the supervisor's own path, not only job_event called directly)
    assert list(job.notifications.values_list("event", "channel")) == [("paused_quota", "email")]
    assert "the weekly quota of 0.000833333 device-hours is used up" in job.events.last().text
    from minicloud.errors import ServiceError

    with pytest.raises(ServiceError, match="device-hours"):
        services.resume_job(job, user)


def test_a_model_no_device_here_could_hold_is_refused_before_anything_is_built(client, user):
    from django.core.files.uploadedfile import SimpleUploadedFile

    huge = {"hidden_size": 65536, "num_hidden_layers": 512, "num_attention_heads": 64, "num_key_value_heads": 8,
            "intermediate_size": 262144}
    r = _post_json(client, "/api/v1/jobs", {"name": "huge", "stage": "pretrain", "config": huge,
                                            "dataset": Dataset.objects.get(name="demo-pretrain").pk}, user)
    assert r.status_code == 400 and "can never start" in r.json()["error"]
    r = client.post("/api/v1/models/import", {"name": "huge", "config": json.dumps(huge),
                                              "file": SimpleUploadedFile("m.pth", b"\0" * 1000)}, **_bearer(user))
    assert r.status_code == 400 and "parameters needs" in r.json()["error"]
    small = {"hidden_size": 512, "num_hidden_layers": 8}
    r = client.post("/api/v1/models/import", {"name": "liar", "config": json.dumps(small),
                                              "file": SimpleUploadedFile("m.pth", b"\0" * 1000)}, **_bearer(user))
    assert r.status_code == 400 and "more than a file of 1,000 bytes holds" in r.json()["error"]


def test_the_login_throttle_is_per_user_behind_the_proxy_and_backs_off(client, user, other_user, settings):
    settings.TRUSTED_PROXIES = ["127.0.0.1"]
    settings.LOGIN_MAX_FAILURES = 3
    proxy = {"REMOTE_ADDR": "127.0.0.1"}
    mallory = {**proxy, "HTTP_X_FORWARDED_FOR": "1.2.3.4, 203.0.113.9"}  # the left part is the client's own word
    for _ in range(4):
        client.post("/accounts/login/", {"username": "alice", "password": "wrong"}, **mallory)
    from accounts.models import AuditEntry

    assert set(AuditEntry.objects.filter(action="login_failed").values_list("ip", flat=True)) == {"203.0.113.9"}
    r = client.post("/accounts/login/", {"username": "alice", "password": "alice-pass-123"}, **mallory)
    assert "Too many failed logins: try again in" in r.content.decode()
    # alice herself, from her own address behind the same proxy, logs in; so does bob
    alice = {**proxy, "HTTP_X_FORWARDED_FOR": "198.51.100.7"}
    assert client.post("/accounts/login/", {"username": "alice", "password": "alice-pass-123"}, **alice).status_code == 302
    client.logout()
    assert client.post("/accounts/login/", {"username": "bob", "password": "bob-pass-123"}, **mallory).status_code == 302
    # the wait doubles with each failure, and passes
    from datetime import timedelta

    from accounts.services import login_wait

    first = login_wait("alice", "203.0.113.9")
    AuditEntry.objects.create(action="login_failed", username="alice", ip="203.0.113.9")
    assert login_wait("alice", "203.0.113.9") > first
    AuditEntry.objects.filter(action="login_failed").update(time=AuditEntry.objects.first().time - timedelta(hours=1))
    assert login_wait("alice", "203.0.113.9") == 0
    # without a trusted proxy, the header is not believed
    settings.TRUSTED_PROXIES = []
    from django.test import RequestFactory

    from accounts.services import client_ip

    assert client_ip(RequestFactory().get("/", REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR="9.9.9.9")) == "10.0.0.5"


# --- 3. side doors ----------------------------------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("revoke", ["made_private", "token_revoked"])
async def test_an_open_websocket_ends_when_access_is_taken_away(revoke, monkeypatch):
    from channels.db import database_sync_to_async
    from channels.testing import WebsocketCommunicator

    from accounts.models import ApiToken
    from jobs import consumers
    from minicloud.asgi import application

    monkeypatch.setattr(consumers, "RECHECK_S", 0.2)

    @database_sync_to_async
    def setup():
        owner = User.objects.create_user("owner", password="pw-owner-1")
        reader = User.objects.create_user("reader", password="pw-reader-1")
        job = Job.objects.create(owner=owner, name="ws", stage="pretrain", status="running", is_public=True,
                                 dataset=Dataset.objects.get(name="demo-pretrain"), tokenizer=Tokenizer.demo())
        return job, reader, ApiToken.issue(reader)[1]

    job, reader, raw = await setup()
    comm = WebsocketCommunicator(application, f"/ws/jobs/{job.pk}/",
                                 headers=[(b"authorization", f"Bearer {raw}".encode()), (b"host", b"127.0.0.1"),
                                          (b"origin", b"http://127.0.0.1")])
    connected, _ = await comm.connect()
    assert connected
    assert (await comm.receive_json_from(timeout=5))["type"] == "update"

    @database_sync_to_async
    def take_away():
        if revoke == "made_private":
            Job.objects.filter(pk=job.pk).update(is_public=False)
        else:
            ApiToken.objects.filter(user=reader).delete()

    await take_away()
    closed = await comm.receive_output(timeout=5)
    while closed["type"] != "websocket.close":
        closed = await comm.receive_output(timeout=5)
    assert closed["code"] == 4403


def test_statistics_are_the_owners_to_recompute_with_a_tokenizer_they_may_use(client, user, other_user):
    from django.core.files.uploadedfile import SimpleUploadedFile

    client.force_login(user)
    client.post("/datasets/upload/", {"name": "pub", "kind": "pretrain",
                                      "file": SimpleUploadedFile("a.jsonl", b'{"text": "hello there"}\n' * 20)})
    ds = Dataset.objects.get(name="pub")
    Dataset.objects.filter(pk=ds.pk).update(is_public=True, stats={"total_tokens": 42}, stats_status="done")
    private_tok = Tokenizer.objects.create(name="bobs", owner=other_user, path="/secret/tok", vocab_size=10)
    client.force_login(other_user)  # a reader of the public dataset
    page = client.get(f"/datasets/{ds.pk}/").content.decode()
    assert 'id="stats-form"' not in page
    client.post(f"/datasets/{ds.pk}/stats/", {"tokenizer": private_tok.pk, "max_seq_len": 64})
    assert Dataset.objects.get(pk=ds.pk).stats == {"total_tokens": 42}
    client.force_login(user)  # the owner, with someone else's private tokenizer
    client.post(f"/datasets/{ds.pk}/stats/", {"tokenizer": private_tok.pk, "max_seq_len": 64})
    assert Dataset.objects.get(pk=ds.pk).stats == {"total_tokens": 42}


def test_a_reward_model_is_never_a_path_a_member_names(client, user):
    from models_registry.models import ModelVersion

    base = ModelVersion.objects.create(name="base", owner=user, tokenizer=Tokenizer.demo(), path="/x",
                                       config={k: TINY[k] for k in ("hidden_size", "num_hidden_layers")})
    ds = Dataset.objects.filter(kind="rlaif").first()
    r = _post_json(client, "/api/v1/jobs", {"name": "rm", "stage": "grpo", "dataset": ds.pk, "base_model": base.pk,
                                            "config": {**TINY, "rewards": {"model": 1.0},
                                                       "reward_model_path": "/home/bob/secret-model"}}, user)
    assert r.status_code == 403 and "reward_model_path" in r.json()["error"]


def test_evaluations_never_show_a_private_dataset_to_readers_of_a_public_model(client, user, other_user):
    from models_registry.models import Evaluation, ModelVersion

    mv = ModelVersion.objects.create(name="pub-model", owner=user, is_public=True, tokenizer=Tokenizer.demo(),
                                     config={}, path="/x")
    secret = Dataset.objects.create(name="alices-private-exam", owner=user, kind="sft", path="/x")
    shown = Dataset.objects.get(name="demo-sft")
    Evaluation.objects.create(model=mv, dataset=secret, metrics={"eval_loss": 1.234567})
    Evaluation.objects.create(model=mv, dataset=shown, metrics={"eval_loss": 7.654321})
    client.force_login(other_user)
    for url in (f"/models/{mv.pk}/", "/models/evaluations/"):
        page = client.get(url).content.decode()
        assert "alices-private-exam" not in page and "1.23" not in page and "7.65" in page, url
    for url in (f"/api/v1/models/{mv.pk}", f"/api/v1/models/{mv.pk}/evaluations"):
        body = json.dumps(client.get(url, **_bearer(other_user)).json())
        assert "alices-private-exam" not in body and "1.234567" not in body and "7.654321" in body, url


def test_job_names_are_text_in_the_compare_chart(client, user):
    job = services.submit_job(owner=user, name='<a href="https://evil.example">click</a>', stage="pretrain",
                              dataset=Dataset.objects.get(name="demo-pretrain").pk, config=TINY)
    client.force_login(user)
    page = client.get(f"/jobs/compare/?ids={job.pk}").content.decode()
    names = page.split('id="job-names" type="application/json">')[1].split("</script>")[0]
    assert json.loads(names)[str(job.pk)] == f'#{job.pk} &lt;a href="https://evil.example"&gt;click&lt;/a&gt;'


# --- 6. a job runs in one place only ----------------------------------------------------------------------------------

def _running(user, settings, name):
    from jobs.supervisor import Supervisor

    services.submit_job(owner=user, name=name, stage="pretrain", dataset=Dataset.objects.get(name="demo-pretrain").pk,
                        config={**TINY, "epochs": 50, "save_interval": 5, "log_interval": 1})
    job = services.claim_next_job(settings.NODE_NAME, 1)
    sup = Supervisor(job)
    sup.start()
    import time

    deadline = time.time() + 120
    while Job.objects.get(pk=job.pk).step < 2 and time.time() < deadline:
        sup.flush()
        sup.check_stop()
        time.sleep(0.2)
    assert Job.objects.get(pk=job.pk).step >= 2
    return job, sup


def test_a_run_whose_job_was_started_elsewhere_stops_and_writes_nothing_more(user, settings):
    from django.db.models import F

    from jobs.models import MetricPoint

    job, sup = _running(user, settings, "fenced")
    Job.objects.filter(pk=job.pk).update(generation=F("generation") + 1)  # another node's run of the job now
    points = MetricPoint.objects.filter(job=job).count()
    sup.flush()
    sup.check_stop()
    assert sup.reason == "lost" and sup.proc.wait() != 0
    while sup.flush():
        pass
    sup.raw_log.close()
    assert MetricPoint.objects.filter(job=job).count() == points
    assert sup.finish(sup.proc.returncode) == Job.Status.RUNNING  # the other run's job, untouched


def test_a_reward_model_is_named_by_its_registry_id_under_the_visibility_rule(client, user, other_user, tmp_path):
    """A sequence-classification folder imported into the registry; a GRPO job names it by id (its path is the
    portal's business); someone else's private reward model is not found."""
    import io
    import shutil
    import zipfile

    import torch
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    from models_registry.models import ModelVersion

    cfg = Qwen3Config(vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    Qwen3ForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(Tokenizer.demo().path) / name, tmp_path / "rm" / name)
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w") as zf:
        for f in (tmp_path / "rm").iterdir():
            zf.write(f, f"rm/{f.name}")
    from django.core.files.uploadedfile import SimpleUploadedFile

    r = client.post("/api/v1/models/import", {"name": "judge", "file": SimpleUploadedFile("rm.zip", raw.getvalue())},
                    **_bearer(other_user))
    assert r.status_code == 201, r.json()
    reward = ModelVersion.objects.get(pk=r.json()["id"])
    assert reward.source == "reward" and Path(reward.path, "config.json").exists() and r.json()["formats"] == []
    base = ModelVersion.objects.create(name="base", owner=user, tokenizer=Tokenizer.demo(), path="/x",
                                       config={k: TINY[k] for k in ("hidden_size", "num_hidden_layers")})
    job = {"name": "rm", "stage": "grpo", "dataset": Dataset.objects.filter(kind="rlaif").first().pk,
           "base_model": base.pk, "config": {**TINY, "rewards": {"model": 1.0}, "reward_model": reward.pk}}
    r = _post_json(client, "/api/v1/jobs", job, user)
    assert r.status_code == 400 and "config.reward_model: no" in r.json()["error"]  # bob's, private
    assert str(reward.path) not in json.dumps(r.json())
    ModelVersion.objects.filter(pk=reward.pk).update(is_public=True)
    r = _post_json(client, "/api/v1/jobs", job, user)
    assert r.status_code == 201, r.json()
    created = Job.objects.get(pk=r.json()["id"])
    assert created.resolved_config["reward_model_path"] == reward.path and created.config["reward_model"] == reward.pk
    # a reward model is not a language model to train from
    r = _post_json(client, "/api/v1/jobs", {**job, "base_model": reward.pk}, user)
    assert r.status_code == 400 and "is a reward model" in r.json()["error"]
