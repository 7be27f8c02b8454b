"""The job WebSocket consumer, in-process: auth, ownership, and new points and log arriving as they are written."""
import asyncio

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from models_registry.models import Tokenizer
from jobs.consumers import POLL_S
from jobs.models import Dataset, Job, JobEvent, LogChunk, MetricPoint
from jobs.routing import websocket_urlpatterns
from minicloud.wsauth import TokenAuthMiddleware

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


@database_sync_to_async
def make_job(owner):
    return Job.objects.create(owner=owner, name="ws", stage="pretrain", status="running",
                              dataset=Dataset.objects.get(name="demo-pretrain"), tokenizer=Tokenizer.objects.get(name="demo-tokenizer"))


@database_sync_to_async
def write_step(job, seq, loss):
    MetricPoint.objects.create(job=job, seq=seq, step=seq * 5, time=float(seq), values={"loss": loss, "lr": 1e-3})
    LogChunk.objects.create(job=job, offset=(seq - 1) * 7, text=f"step {seq:02d}\n")


@database_sync_to_async
def make_user(name):
    from django.contrib.auth import get_user_model

    from accounts.models import ApiToken

    user = get_user_model().objects.create_user(name, password="x-password-1")
    return user, ApiToken.issue(user)[1]


def communicator(path, token=None):
    app = TokenAuthMiddleware(URLRouter(websocket_urlpatterns))
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return WebsocketCommunicator(app, path, headers=headers)


async def test_points_and_log_stream_live():
    user, token = await make_user("carol")
    job = await make_job(user)
    await write_step(job, 1, 7.5)
    # offsets that are not numbers (and a language that is none) start from the beginning, in English
    comm = communicator(f"/ws/jobs/{job.pk}/?after=abc&log_after=%C2%B2&lang=%00", token)
    connected, _ = await comm.connect()
    assert connected
    first = await comm.receive_json_from(timeout=5)
    assert [p["seq"] for p in first["points"]] == [1] and first["log"] == "step 01\n"
    assert first["job"]["status"] == "running"
    await write_step(job, 2, 6.0)
    await write_step(job, 3, 5.5)
    got = []
    while len(got) < 2:
        msg = await comm.receive_json_from(timeout=5)
        got += [p["values"]["loss"] for p in msg["points"]]
    assert got == [6.0, 5.5]
    await comm.disconnect()


async def test_anonymous_and_foreign_users_are_refused():
    owner, _ = await make_user("dave")
    _, other_token = await make_user("erin")
    job = await make_job(owner)
    comm = communicator(f"/ws/jobs/{job.pk}/")
    connected, code = await comm.connect()
    assert not connected and code == 4401
    comm = communicator(f"/ws/jobs/{job.pk}/", other_token)
    connected, code = await comm.connect()
    assert not connected and code == 4404


async def test_a_job_shared_with_a_group_streams_to_its_members_only():
    from django.contrib.auth.models import Group

    owner, _ = await make_user("frank")
    member, member_token = await make_user("gina")
    _, outsider_token = await make_user("hank")
    job = await make_job(owner)

    @database_sync_to_async
    def share():
        group = Group.objects.create(name="lab")
        owner.groups.add(group)
        member.groups.add(group)
        Job.objects.filter(pk=job.pk).update(shared_with=group)

    await share()
    comm = communicator(f"/ws/jobs/{job.pk}/", member_token)
    connected, _ = await comm.connect()
    assert connected
    await comm.disconnect()
    comm = communicator(f"/ws/jobs/{job.pk}/", outsider_token)
    connected, code = await comm.connect()
    assert not connected and code == 4404


async def test_updates_carry_the_job_error_in_the_pages_language():
    user, token = await make_user("ivy")
    job = await make_job(user)

    @database_sync_to_async
    def fail():
        Job.objects.filter(pk=job.pk).update(status="failed", error="could not register the model: %(error)s",
                                             error_params={"error": "disk full"})

    await fail()
    for lang, text in (("zh-hans", "无法登记模型：disk full"), ("", "could not register the model: disk full"),
                       ("xx", "could not register the model: disk full")):
        comm = communicator(f"/ws/jobs/{job.pk}/?lang={lang}", token)
        assert (await comm.connect())[0]
        assert (await comm.receive_json_from(timeout=5))["job"]["error"] == text
        await comm.disconnect()


async def test_the_history_arrives_when_the_status_moves_in_the_pages_language():
    user, token = await make_user("jack")
    job = await make_job(user)
    await database_sync_to_async(JobEvent.objects.create)(job=job, kind="submitted", actor="jack")
    comm = communicator(f"/ws/jobs/{job.pk}/?lang=zh-hans", token)
    assert (await comm.connect())[0]
    first = await comm.receive_json_from(timeout=5)
    assert [(e["label"], e["actor"]) for e in first["events"]] == [("已提交", "jack")]
    await write_step(job, 1, 7.5)
    assert "events" not in await comm.receive_json_from(timeout=5)  # a new point: the history is as it was

    @database_sync_to_async
    def interrupt():
        job.refresh_from_db()
        job.transition(Job.Status.INTERRUPTED, "system", "the training process was killed by signal %(signal)s",
                       {"signal": 9})

    await interrupt()
    moved = await comm.receive_json_from(timeout=5)
    assert moved["job"]["status"] == "interrupted"
    assert (moved["events"][-1]["label"], moved["events"][-1]["message"]) == ("已中断", "训练进程被信号 9 终止")
    await comm.disconnect()


async def test_idle_streams_cost_one_light_query_per_look_for_all_of_them(monkeypatch):
    """An open job page polled on its own twice a second: with nothing new it read the job, its log and its points
    each time (~3-4 ms of a web process's CPU per look: a class's idle tabs took a core while nothing moved), and
    checked its access every 2 s. Now one look serves every stream of the process (the watched jobs' fingerprints in
    one query), a stream reads its job in full only after a new point, log chunk, status or step, and the access
    checks are made once per connection's credentials."""
    from jobs import selectors

    from jobs import consumers

    reads, looks, checks = [], [], []
    full_read, fingerprints, credentials = selectors.job_update, selectors.job_fingerprints, consumers.connection_user
    monkeypatch.setattr(selectors, "job_update", lambda *a: reads.append(a[0]) or full_read(*a))
    monkeypatch.setattr(selectors, "job_fingerprints", lambda ids: looks.append(sorted(ids)) or fingerprints(ids))
    monkeypatch.setattr(consumers, "connection_user", lambda *a: checks.append(a[0]) or credentials(*a))
    monkeypatch.setattr(consumers, "RECHECK_S", 2 * POLL_S)
    user, token = await make_user("kim")
    job, other = await make_job(user), await make_job(user)
    await write_step(job, 1, 7.5)
    comms = [communicator(f"/ws/jobs/{j.pk}/", token) for j in (job, job, other)]  # two tabs on one job
    for comm in comms:
        assert (await comm.connect())[0]
        await comm.receive_json_from(timeout=5)
    assert sorted(reads) == sorted([job.pk, job.pk, other.pk])
    looks.clear()
    await asyncio.sleep(4 * POLL_S)  # about four looks, nothing new
    assert 3 <= len(looks) <= 5 and all(ids == sorted([job.pk, other.pk]) for ids in looks), looks
    assert len(reads) == 3 and all([await comm.receive_nothing(timeout=0.05) for comm in comms])
    # the access of all three streams (one user, one token) checked at once, every RECHECK_S: once per check
    assert 1 <= len(checks) <= 3, checks
    comm = comms[0]
    await write_step(job, 2, 6.0)  # a point and a log chunk: both tabs of the job read it, the other job's does not
    msg = await comm.receive_json_from(timeout=5)
    assert [p["seq"] for p in msg["points"]] == [2] and msg["log"].endswith("02\n")
    assert [p["seq"] for p in (await comms[1].receive_json_from(timeout=5))["points"]] == [2]
    assert reads.count(job.pk) == 4 and reads.count(other.pk) == 1

    @database_sync_to_async
    def log_only():
        LogChunk.objects.create(job=job, offset=15, text="saving\n")

    await log_only()
    assert (await comm.receive_json_from(timeout=5))["log"] == "saving\n"
    await database_sync_to_async(Job.objects.filter(pk=job.pk).update)(step=99)  # the step alone moves the bar
    assert (await comm.receive_json_from(timeout=5))["job"]["step"] == 99
    await database_sync_to_async(Job.objects.filter(pk=other.pk).delete)()  # a job gone ends its stream
    assert (await comms[2].receive_output(timeout=5))["type"] == "websocket.close"
    for comm in comms[:2]:
        await comm.disconnect()


async def test_a_failed_look_at_the_database_loses_no_stream(monkeypatch, caplog):
    """The one look serves every stream of a web process: a failed query (PostgreSQL restarting) must not end it, or
    every open page of the process would stop updating. A stream whose own read fails closes (1011) so that its page
    connects again, rather than staying open and silent."""
    from jobs import selectors

    fingerprints, full_read, failing = selectors.job_fingerprints, selectors.job_update, {"looks": 0, "reads": 0}

    def flaky_look(ids):
        if failing["looks"]:
            failing["looks"] -= 1
            raise RuntimeError("the database is restarting")
        return fingerprints(ids)

    def flaky_read(*args):
        if failing["reads"]:
            raise RuntimeError("the database is restarting")
        return full_read(*args)

    monkeypatch.setattr(selectors, "job_fingerprints", flaky_look)
    monkeypatch.setattr(selectors, "job_update", flaky_read)
    user, token = await make_user("lee")
    job = await make_job(user)
    comm = communicator(f"/ws/jobs/{job.pk}/", token)
    assert (await comm.connect())[0]
    await comm.receive_json_from(timeout=5)
    failing["looks"] = 3
    await asyncio.sleep(2 * POLL_S)
    await write_step(job, 1, 7.0)
    assert [p["seq"] for p in (await comm.receive_json_from(timeout=5))["points"]] == [1]
    assert failing["looks"] == 0 and "look at the database failed" in caplog.text
    failing["reads"] = 1
    await write_step(job, 2, 6.0)
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 1011}
