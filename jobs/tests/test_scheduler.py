"""Placement rules (pure) and the fair drain of a shared queue through the real claim/finish services."""
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.utils import timezone

from jobs import scheduler, services
from jobs.models import Dataset, Job, Node
from jobs.scheduler import GiB, Device

from conftest import TINY


def gpus(node="n", n=2, mem=80):
    return {node: [Device(node, i, "cuda", mem * GiB) for i in range(n)]}


class FakeJob(SimpleNamespace):
    __hash__ = object.__hash__  # decisions and forecasts key by job, as by a model instance


def job(name, gpus=1, mem=10):
    return FakeJob(name=name, gpus=gpus, memory_estimate=int(mem * GiB))


def placed(decisions):
    return {d.job.name: d.devices for d in decisions if d.placed}


def test_small_jobs_pack_onto_one_gpu_up_to_the_limit():
    out = scheduler.plan([job(f"j{i}") for i in range(6)], gpus(), jobs_per_gpu=4)
    assert placed(out) == {"j0": [0], "j1": [0], "j2": [0], "j3": [0], "j4": [1], "j5": [1]}


def test_memory_decides_what_shares_a_gpu():
    out = scheduler.plan([job("big", mem=50), job("medium", mem=40), job("small", mem=20)], gpus(n=1), 4)
    assert placed(out) == {"big": [0], "small": [0]}
    waiting = next(d for d in out if d.job.name == "medium")
    assert (waiting.reason, waiting.params) == ("gpu_memory", {"n": 1, "gib": "40.0"})
    assert services.wait_reason_text(waiting.reason, waiting.params) == "waiting for 1 GPU(s) with 40.0 GiB free"


def test_best_fit_keeps_a_whole_gpu_free_for_a_big_job():
    nodes = gpus()
    nodes["n"][1].jobs.append(30 * GiB)  # GPU 1 already runs something
    out = scheduler.plan([job("small", mem=10), job("big", mem=75)], nodes, 4)
    assert placed(out) == {"small": [1], "big": [0]}


def test_a_multi_gpu_job_is_gang_allocated_and_not_starved():
    nodes = gpus(n=2)
    nodes["n"][0].jobs.append(80 * GiB)  # GPU 0 is full
    out = scheduler.plan([job("pair", gpus=2), job("single")], nodes, 4)
    assert placed(out) == {}  # the free GPU is kept for the pair
    assert [d.reason for d in out] == ["gpu_memory", "held"]
    assert placed(scheduler.plan([job("pair", gpus=2), job("single")], gpus(n=2), 4)) == {"pair": [0, 1],
                                                                                       "single": [0]}


def test_cpu_slots_take_one_job_each_whatever_the_memory():
    nodes = {"c": [Device("c", 0), Device("c", 1)]}
    out = scheduler.plan([job("a", mem=999), job("b"), job("c")], nodes, 4)
    assert placed(out) == {"a": [0], "b": [1]}
    assert out[2].reason == "slots"


def test_placement_picks_the_node_where_the_job_fits():
    nodes = {**gpus("small", n=1, mem=24), **gpus("large", n=1, mem=80)}
    assert scheduler.plan([job("j", mem=40)], nodes, 4)[0].node == "large"


def test_a_job_runs_on_one_node_only():
    """Spanning nodes is Slurm's (the Slurm executor): locally a job that no one node can take never fits."""
    assert not scheduler.plan([job("four", gpus=4)], {**gpus("a", n=2), **gpus("b", n=2)}, 4)[0].placed
    assert scheduler.never_fits({**gpus("a", n=2), **gpus("b", n=2)}, 4, GiB)[0] == "gpus"
    assert scheduler.never_fits({**gpus("a", n=4)}, 4, GiB) is None


def test_a_long_queue_of_alike_jobs_plans_as_if_each_were_planned_alone():
    """plan() explains a waiting (gpus, memory) once while the devices stay as they were; the decisions equal those of
    the same queue where no two jobs look alike to it, multi-device gangs and quotas included."""
    import random

    class Distinct(int):  # the same number of bytes, but equal to no other: plan() cannot reuse an explanation
        __hash__ = object.__hash__

        def __eq__(self, other):
            return self is other

    rng = random.Random(3)
    sizes = [(1, 10), (1, 30), (1, 50), (2, 20), (1, 70), (3, 10)]
    queue = [job(f"j{i}", *rng.choice(sizes)) for i in range(300)]
    unique = [job(j.name, j.gpus) for j in queue]
    for j, u in zip(queue, unique):
        u.memory_estimate = Distinct(j.memory_estimate)
    blocked = lambda j: ("quota_running", {"n": 2, "limit": 2}) if int(j.name[1:]) % 17 == 0 else None  # noqa: E731

    def decisions(jobs):
        nodes = {**gpus("a", 2), **gpus("b", 4, mem=40)}
        return [(d.job.name, d.node, d.devices, d.reason, d.params)
                for d in scheduler.plan(jobs, nodes, jobs_per_gpu=2, blocked=blocked)]

    alike, apart = decisions(queue), decisions(unique)
    assert alike == apart
    assert {r[3] for r in alike} >= {"", "gpu_memory", "held", "quota_running"}


def test_never_fits_names_devices_or_memory():
    assert scheduler.never_fits(gpus(n=2), 3, GiB)[0] == "gpus"
    field, p = scheduler.never_fits(gpus(n=2, mem=24), 1, 30 * GiB)
    assert field == "memory" and services.never_fits_text(field, p) == (
        "needs about 30.0 GiB per GPU; the largest GPU has 24.0 GiB (lower batch_size or max_seq_len)")
    assert scheduler.never_fits(gpus(), 2, 30 * GiB) is None
    assert scheduler.never_fits({}, 8, 10**15) is None  # no node known yet: cannot judge


def test_a_quota_blocks_before_placement():
    out = scheduler.plan([job("a"), job("b")], gpus(), 4,
                         blocked=lambda j: ("quota", {}) if j.name == "a" else None)
    assert placed(out) == {"b": [0]} and out[0].reason == "quota"


# --- through the database --------------------------------------------------------------------------------------

@pytest.fixture
def pretrain(db):
    return Dataset.objects.get(name="demo-pretrain")


def gpu_node(name="gpu-box", mem_gib=80, n=1):
    return Node.objects.create(name=name, heartbeat_at=timezone.now(), devices=[
        {"index": i, "kind": "cuda", "name": "H100", "memory_total": mem_gib * GiB} for i in range(n)])


def test_submission_estimates_memory_and_refuses_a_job_that_never_fits(user, pretrain):
    gpu_node(mem_gib=8)
    ok = services.submit_job(owner=user, name="ok", stage="pretrain", dataset=pretrain.pk, config=TINY)
    assert 0 < ok.memory_estimate < GiB
    with pytest.raises(services.ServiceError) as exc:
        services.submit_job(owner=user, name="huge", stage="pretrain", dataset=pretrain.pk,
                            config={"batch_size": 512, "max_seq_len": 2048})
    assert exc.value.field == "config.batch_size" and "never start" in str(exc.value) and "8.0 GiB" in str(exc.value)
    with pytest.raises(services.ServiceError) as exc:
        services.submit_job(owner=user, name="wide", stage="pretrain", dataset=pretrain.pk, config=TINY, gpus=2)
    assert exc.value.field == "gpus"


def test_claims_pack_jobs_onto_a_registered_gpu(user, pretrain, settings):
    settings.JOBS_PER_GPU = 2
    gpu_node()
    jobs = [services.submit_job(owner=user, name=f"j{i}", stage="pretrain", dataset=pretrain.pk, config=TINY)
            for i in range(3)]
    first, second = services.claim_next_job("gpu-box"), services.claim_next_job("gpu-box")
    assert {first.pk, second.pk} == {jobs[0].pk, jobs[1].pk} and first.devices == second.devices == [0]
    assert services.claim_next_job("gpu-box") is None  # two per GPU
    assert services.queue_plan()[0].reason == "gpu_memory"  # the GPU's job limit is reached


@pytest.mark.django_db(transaction=True)
def test_a_claim_plans_its_queue_without_holding_sqlites_write_lock(user, pretrain, monkeypatch):
    """On SQLite a claim used to plan the whole queue inside BEGIN IMMEDIATE: every submission waited for it. Now
    another connection can write while the plan is made, and the claim still takes the job."""
    import threading

    from django.db import connection, connections

    from jobs.models import Setting
    from jobs.services import queue

    if connection.vendor != "sqlite":
        pytest.skip("PostgreSQL serialises claims on the node's row; writers do not wait for each other there")
    gpu_node()
    job = services.submit_job(owner=user, name="j", stage="pretrain", dataset=pretrain.pk, config=TINY)
    planned, wrote = queue.queue_plan, []

    def plan_while_someone_writes(*args, **kwargs):
        def write():
            try:
                Setting.objects.create(key="written-while-planning", value="1")
                wrote.append(True)
            finally:
                connections.close_all()

        writer = threading.Thread(target=write)
        writer.start()
        writer.join(5)  # the busy timeout is 20 s: under the write lock this write would still be waiting
        return planned(*args, **kwargs)

    monkeypatch.setattr(queue, "queue_plan", plan_while_someone_writes)
    assert services.claim_next_job("gpu-box").pk == job.pk
    assert wrote == [True]


def test_a_silent_node_shows_as_down_and_takes_no_jobs(user, pretrain, settings, client):
    settings.NODE_TIMEOUT_S = 30
    gpu_node("gone")
    alive = gpu_node("alive")
    Node.objects.filter(name="gone").update(heartbeat_at=timezone.now() - timedelta(seconds=60))
    assert [Node.objects.get(name=n).state for n in ("gone", "alive")] == ["down", "up"]
    job = services.submit_job(owner=user, name="j", stage="pretrain", dataset=pretrain.pk, config=TINY)
    assert services.claim_next_job("gone") is None and services.claim_next_job("alive").pk == job.pk
    client.force_login(user)
    assert 'class="status s-failed">down<' in client.get("/devices/").content.decode()
    assert alive.state == "up"


def test_fifty_jobs_from_ten_users_drain_in_fair_order(db, pretrain, django_user_model):
    """Ten users; the first submits all five of its jobs before anyone else. Two CPU slots drain the queue through
    the real claim and finish services, each job running ten (simulated) minutes."""
    users = [django_user_model.objects.create_user(f"u{i}", password="x") for i in range(10)]
    for u in users:
        for k in range(5):
            services.submit_job(owner=u, name=f"{u.username}-{k}", stage="pretrain", dataset=pretrain.pk, config=TINY)
    clock = timezone.now()
    starts = []
    while True:
        while (job := services.claim_next_job("cpu-node", slots=2)) is not None:
            Job.objects.filter(pk=job.pk).update(started_at=clock)
            starts.append(job.owner.username)
        running = list(Job.objects.filter(status=Job.Status.RUNNING).order_by("started_at", "pk"))
        if not running:
            break
        clock += timedelta(minutes=10)
        oldest = running[0]
        Job.objects.filter(pk=oldest.pk).update(status=Job.Status.SUCCEEDED, finished_at=clock)
    assert len(starts) == 50
    assert len(set(starts[:10])) == 10  # everyone's first job before anyone's second
    for rnd in range(5):  # and so on, round after round
        assert sorted(starts[rnd * 10:(rnd + 1) * 10]) == sorted(u.username for u in users)


@pytest.mark.parametrize("where", ["start", "flush", "finish", "taken over", "pausing"])
def test_a_failing_supervisor_stops_its_run_and_leaves_no_job_live(user, pretrain, monkeypatch, settings, where):
    """A supervisor that raises (a defect of ours, a lost database connection) once its run is launched, while
    following it or while recording how it ended: the run is stopped and the job failed (at the start) or
    interrupted (resumed while the crash budget lasts), not left running with nobody behind it (its worker lives
    on: the housekeeping would never take it for orphaned)."""
    import io
    import subprocess

    from jobs.supervisor import Supervisor

    settings.AUTO_RESUME_LIMIT = 1
    job = services.submit_job(owner=user, name="defect", stage="pretrain", dataset=pretrain.pk, config=TINY)
    job = services.claim_next_job("n", 1)
    child = subprocess.Popen(["true"] if where == "finish" else ["sleep", "60"], start_new_session=True)

    def start(self):
        self.job.run_dir.mkdir(parents=True, exist_ok=True)
        self.raw_log, self.proc = io.StringIO(), child
        if where == "start":
            raise KeyError("a defect")

    def defect(self, *args):
        raise KeyError("a defect")

    monkeypatch.setattr(Supervisor, "start", start)
    monkeypatch.setattr(Supervisor, "flush", lambda self: False if where in ("start", "finish") else defect(self))
    if where == "finish":
        monkeypatch.setattr(Supervisor, "finish", defect)
    if where == "taken over":  # another supervisor follows the job (and its run) now: neither is this one's to end
        sup = Supervisor(job)
        Job.objects.filter(pk=job.pk).update(generation=job.generation + 1)
        assert sup.run() == Job.Status.RUNNING and child.poll() is None
        child.kill()
        return
    if where == "pausing":  # a pause asked for: it completes (resumable), saying why in the words of what happened
        job.transition(Job.Status.PAUSING, "system")
        assert Supervisor(job).run() == Job.Status.PAUSED and child.wait(timeout=10) is not None
        assert job.events.latest("pk").text == "the job's supervisor failed while pausing: KeyError: 'a defect'"
        return
    assert Supervisor(job).run() == (Job.Status.FAILED if where == "start" else Job.Status.QUEUED)
    assert child.wait(timeout=10) is not None  # stopped, not left training
    job.refresh_from_db()
    if where == "start":
        assert job.status == Job.Status.FAILED and "a defect" in job.error_text
        return
    assert job.status == Job.Status.QUEUED and job.auto_resumes == 1
    interrupted = job.events.filter(kind="interrupted").latest("pk")
    assert interrupted.text == "the job's supervisor failed: KeyError: 'a defect'"


def test_the_supervisor_records_the_real_peak_memory(user, pretrain):
    import io
    import json as _json

    from jobs.supervisor import Supervisor, engine_command

    job = services.submit_job(owner=user, name="peak", stage="pretrain", dataset=pretrain.pk, config=TINY)
    sup = Supervisor(job)
    sup.raw_log = io.StringIO()
    for gb in (1.5, 2.25, 2.0):
        sup.lines.put(sup.token + " " + _json.dumps({"event": "step", "step": 1, "time": 0, "metrics": {"loss": 1, "peak_mem_gb": gb}}))
    sup.flush()
    job.refresh_from_db()
    assert job.peak_memory == int(2.25 * GiB) and job.memory_error == pytest.approx(job.memory_estimate / job.peak_memory - 1)
    assert engine_command("s.json", 1)[-4:] == ["-m", "training", "run", "s.json"]
    # Under torchrun a failed rank reports first; the others fail after it, for its sake: the first error is the cause.
    sup.lines.put(sup.token + " " + _json.dumps({"event": "error", "time": 0, "rank": 1, "kind": "out_of_memory",
                               "message": "out of memory: CUDA out of memory"}))
    sup.lines.put(sup.token + " " + _json.dumps({"event": "error", "time": 0, "kind": "DistBackendError", "message": "Connection reset"}))
    sup.flush()
    assert sup.error_event["message"] == "out of memory: CUDA out of memory"
    assert "--nproc_per_node=2" in engine_command("s.json", 2)  # a gang job runs under torchrun


def test_an_explained_engine_error_is_shown_in_the_readers_language(user, pretrain):
    from django.utils import translation

    from jobs.models import stored_text
    from jobs.supervisor import engine_error

    job = services.submit_job(owner=user, name="oom", stage="pretrain", dataset=pretrain.pk, config=TINY)
    services.claim_next_job("n", 1)
    template = ("out of memory: %(error)s — try a smaller batch_size or max_seq_len (a larger accumulation_steps "
                "keeps the same effective batch)")
    event = {"event": "error", "kind": "out_of_memory", "message": template % {"error": "CUDA out of memory"},
             "template": template, "params": {"error": "CUDA out of memory"}}
    services.finish_job(job, Job.Status.FAILED, **engine_error(event))
    job.refresh_from_db()
    assert job.error_text == event["message"] and job.can_halve_batch  # the offer reads the stored template
    with translation.override("zh-hans"):
        assert job.error_text.startswith("显存/内存不足：CUDA out of memory — 请减小 batch_size")
        assert job.events.latest("pk").text == job.error_text
    # a problem nested in the template (what is wrong with which dataset line) is translated too, both from the
    # catalogue; parameters are clipped for storage, the nested ones too
    line = {"event": "error", "kind": "lineerror", "message": "dataset line 7: not valid JSON (Expecting value at column 3)",
            "template": "dataset line %(line)s: %(problem)s",
            "params": {"line": 7, "problem": ["not valid JSON (%(msg)s at column %(colno)s)",
                                              {"msg": "Expecting value" + " x" * 2000, "colno": 3}]}}
    bad = services.submit_job(owner=user, name="bad line", stage="pretrain", dataset=pretrain.pk, config=TINY)
    services.claim_next_job("n", 1)
    services.finish_job(bad, Job.Status.FAILED, **engine_error(line))
    bad.refresh_from_db()
    assert bad.status == Job.Status.FAILED and len(bad.error_params["problem"][1]["msg"]) == 2000
    with translation.override("zh-hans"):
        assert bad.error_text.startswith("数据集第 7 行：不是有效的 JSON（Expecting value x x")
        assert bad.error_text.endswith("，第 3 列）")
    # the engine's own one line (an exception's text) is kept as it is; an empty event still says something
    assert engine_error({"message": "ValueError: 50% done"}) == {"error": "ValueError: 50% done"}
    unexplained = engine_error({})
    with translation.override("zh-hans"):
        assert stored_text(unexplained["error"], unexplained["error_params"]) == "训练失败"


def test_estimated_starts_follow_the_running_jobs_and_the_queue():
    decisions = [scheduler.Decision(job("now"), "n", [0]), scheduler.Decision(job("a")),
                 scheduler.Decision(job("b")), scheduler.Decision(job("pair", gpus=2)),
                 scheduler.Decision(job("elsewhere", gpus=3))]
    busy = {("n", 0): 600.0, ("n", 1): 1200.0}
    starts = scheduler.estimated_starts(decisions, busy, lambda j: 1000.0)
    by_name = {j.name: t for j, t in starts.items()}
    assert by_name == {"now": 0.0, "a": 600.0, "b": 1200.0, "pair": 2200.0, "elsewhere": None}
    unknown = scheduler.estimated_starts(decisions[1:3], busy, lambda j: None)
    assert [t for t in unknown.values()] == [600.0, 1200.0]
    assert scheduler.estimated_starts(decisions[1:4], busy, lambda j: None)[decisions[3].job] is None


def test_the_queue_page_and_api_tell_why_and_when(user, pretrain, client, settings):
    settings.JOBS_PER_GPU = 1
    gpu_node()
    running = services.submit_job(owner=user, name="running", stage="pretrain", dataset=pretrain.pk, config=TINY)
    services.claim_next_job("gpu-box")
    Job.objects.filter(pk=running.pk).update(eta_s=300)
    waiting = services.submit_job(owner=user, name="waiting", stage="pretrain", dataset=pretrain.pk, config=TINY)
    info = services.queue_info(waiting)
    assert info["position"] == 1 and info["reason"] == "gpu_memory" and info["expected_start_s"] == 300
    client.force_login(user)
    row = next(j for j in client.get("/queue/").context["jobs"] if j.pk == waiting.pk)
    assert row.expected_start == "in about 5 min" and row.reason.startswith("waiting for 1 GPU(s)")


def test_submissions_leave_one_waiting_claim_token_not_one_each(user, pretrain, settings):
    """With the database as the broker, a claim token no runner has taken yet serves every later submission (its
    claim runs after them): ten submissions, one token; once a runner takes it, the next submission sends another."""
    from django.utils import timezone as tz
    from django_q.models import OrmQ

    from jobs.services.queue import CLAIM_TASK

    if settings.REDIS_URL:
        pytest.skip("with Redis each commit sends its own token (nothing is written to the database for it)")
    gpu_node()
    for i in range(10):
        services.submit_job(owner=user, name=f"j{i}", stage="pretrain", dataset=pretrain.pk, config=TINY)
    tokens = [row for row in OrmQ.objects.all() if row.task.get("func") == CLAIM_TASK]
    assert len(tokens) == 1 and tokens[0].task.get("save") is False
    OrmQ.objects.filter(pk=tokens[0].pk).update(lock=tz.now() + timedelta(minutes=5))  # a runner took it
    services.submit_job(owner=user, name="after", stage="pretrain", dataset=pretrain.pk, config=TINY)
    assert sum(row.task.get("func") == CLAIM_TASK for row in OrmQ.objects.all()) == 2


def test_a_runner_hands_a_claim_token_on_while_jobs_wait(user, pretrain, monkeypatch):
    """One claim token, two jobs queued on a node of two CPU slots (a restart, or a burst whose submissions shared the
    one waiting token): the runner that claims the first job sends another token before it trains it, so that a free
    runner claims the second now; with nothing left waiting, its next claim sends none. Without it the node trained
    one job at a time until the next housekeeping minute sent a token."""
    from django.conf import settings

    from jobs import tasks
    from jobs.services import queue

    for name in ("a", "b"):
        services.submit_job(owner=user, name=name, stage="pretrain", dataset=pretrain.pk, config=TINY)
    kicks, started = [], []
    monkeypatch.setattr(queue, "_kick_nodes", lambda names: kicks.append(list(names)))
    monkeypatch.setattr(services, "_local_devices", lambda: ["cpu-slot", "cpu-slot"])

    class Supervised:  # what had been sent when each claimed job's supervision began; then the job ends
        def __init__(self, job):
            self.job = job

        def run(self):
            started.append((self.job.name, len(kicks)))
            services.finish_job(self.job, Job.Status.SUCCEEDED)

    monkeypatch.setattr(tasks, "Supervisor", Supervised)
    assert len(tasks.run_next_job()) == 2
    assert started == [("a", 1), ("b", 1)] and kicks == [[settings.NODE_NAME]]


@pytest.mark.django_db(transaction=True)  # with Redis the claim token is sent on commit: counted too
def test_a_submission_reads_the_live_nodes_once(user, pretrain):
    """The nodes that could run the job (its memory check) are the nodes its claim token goes to: one read, not
    one for each (each query is a round trip to PostgreSQL, and a burst's submissions wait on them)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    gpu_node()
    with CaptureQueriesContext(connection) as queries:
        services.submit_job(owner=user, name="once", stage="pretrain", dataset=pretrain.pk, config=TINY)
    node_reads = [q["sql"] for q in queries.captured_queries if 'FROM "jobs_node"' in q["sql"]]
    assert len(node_reads) == 1, node_reads


def test_a_class_members_submission_reads_their_jobs_once(user, pretrain, midweek):
    """With a queued-jobs and a device-hours limit (as a teacher sets for a class), the member's queued jobs and the
    hours of their running ones come from one read of their jobs; with no live node, the machine's own Node row is
    read once after the live nodes (it was read again with them)."""
    from django.contrib.auth.models import Group
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from accounts.models import Quota

    course = Group.objects.create(name="course")
    user.groups.add(course)
    Quota.objects.create(group=course, max_queued_jobs=5, device_hours_per_week=10)
    running = services.submit_job(owner=user, name="running", stage="pretrain", dataset=pretrain.pk, config=TINY)
    Job.objects.filter(pk=running.pk).update(status=Job.Status.RUNNING, started_at=timezone.now() - timedelta(hours=2))
    services.submit_job(owner=user, name="queued", stage="pretrain", dataset=pretrain.pk, config=TINY)
    with CaptureQueriesContext(connection) as queries:
        services.submit_job(owner=user, name="third", stage="pretrain", dataset=pretrain.pk, config=TINY)
    job_reads = [q["sql"] for q in queries.captured_queries
                 if q["sql"].startswith("SELECT") and 'FROM "jobs_job" WHERE' in q["sql"]
                 and '"jobs_job"."status"' in q["sql"] and '"jobs_job"."owner_id"' in q["sql"]]
    assert len(job_reads) == 1, job_reads
    assert len([q for q in queries.captured_queries if 'FROM "jobs_node"' in q["sql"]]) == 2
    Quota.objects.filter(group=course).update(max_queued_jobs=2)
    with pytest.raises(services.ServiceError, match="2 queued job"):  # "queued" and "third"; not the running one
        services.submit_job(owner=user, name="fourth", stage="pretrain", dataset=pretrain.pk, config=TINY)
    Quota.objects.filter(group=course).update(max_queued_jobs=None, device_hours_per_week=0.001)
    with pytest.raises(services.ServiceError, match="device-hours"):  # the running job's hours this week count
        services.submit_job(owner=user, name="fourth", stage="pretrain", dataset=pretrain.pk, config=TINY)


def test_a_full_node_claims_nothing_without_planning_the_queue(user, pretrain, settings, monkeypatch):
    from jobs.services import queue

    settings.JOBS_PER_GPU = 1
    gpu_node()
    for i in range(2):
        services.submit_job(owner=user, name=f"j{i}", stage="pretrain", dataset=pretrain.pk, config=TINY)
    assert services.claim_next_job("gpu-box") is not None  # the GPU's one job

    def no_plan(*args, **kwargs):
        raise AssertionError("planned the queue for a node with no room")

    monkeypatch.setattr(queue, "queue_plan", no_plan)
    assert services.claim_next_job("gpu-box") is None


@pytest.mark.django_db(transaction=True)
def test_claim_tokens_reuse_one_redis_connection(user, pretrain, monkeypatch):
    """With Redis as the broker, django-q2 made a broker (a Redis client with a pool of its own) for every task it
    was not given one: every submission's claim token opened a new TCP connection to Redis. One broker per queue and
    process now, its pool reused."""
    from django.conf import settings
    from django_q.brokers import redis_broker

    from jobs.services import queue

    if not settings.REDIS_URL:
        pytest.skip("the Redis broker: the PostgreSQL + Redis pass (.ci/run)")
    gpu_node()
    queue._brokers.clear()
    clients = []
    made = redis_broker.Redis.get_connection
    monkeypatch.setattr(redis_broker.Redis, "get_connection", staticmethod(
        lambda *a, **kw: clients.append(made(*a, **kw)) or clients[-1]))
    for i in range(3):
        services.submit_job(owner=user, name=f"j{i}", stage="pretrain", dataset=pretrain.pk, config=TINY)
    assert len(clients) == 1
    assert clients[0].connection_pool._created_connections == 1
