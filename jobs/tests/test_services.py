import os

import pytest
from django.contrib.auth import get_user_model

from conftest import TINY
from jobs import services
from jobs.models import Dataset, Job, JobEvent
from models_registry.models import Tokenizer


@pytest.fixture
def demo(db):
    return Dataset.objects.get(name="demo-pretrain")


def submit(user, dataset, **kw):
    return services.submit_job(owner=user, name=kw.pop("name", "j"), stage=kw.pop("stage", "pretrain"),
                               dataset=dataset.pk, config=kw.pop("config", TINY), **kw)


def test_demo_data_is_installed_after_migrate(db):
    assert set(Dataset.objects.filter(is_public=True).values_list("name", flat=True)) == {
        "demo-pretrain", "demo-sft", "demo-dpo", "demo-rlaif"}
    tok = Tokenizer.objects.get(name="demo-tokenizer", is_public=True)
    assert 300 < tok.vocab_size <= 6400
    assert Dataset.objects.get(name="demo-sft").records == 3000


def test_submit_queues_with_defaults_and_demo_tokenizer(user, demo):
    job = submit(user, demo, config={"max_steps": 5})
    assert job.status == "queued" and job.tokenizer.name == "demo-tokenizer"
    assert job.resolved_config["batch_size"] == 32 and job.resolved_config["max_steps"] == 5
    assert JobEvent.objects.filter(job=job, kind="submitted").exists()


@pytest.mark.parametrize("kwargs, field", [
    ({"name": ""}, "name"),
    ({"stage": "nope"}, "stage"),
    ({"stage": "ppo"}, "dataset"),  # PPO reads RL prompts, not pretrain text
    ({"config": {"batch_sise": 4}}, "config.batch_sise"),
    ({"config": {"learning_rate": -1}}, "config.learning_rate"),
    ({"config": {"hidden_size": 64, "num_attention_heads": 5}}, "config.num_attention_heads"),
    ({"gpus": 9}, "gpus"),
])
def test_submit_refuses_bad_input_naming_the_field(user, demo, kwargs, field):
    with pytest.raises(services.ServiceError) as exc:
        submit(user, demo, **kwargs)
    assert exc.value.field == field
    assert Job.objects.count() == 0


def test_submit_refuses_wrong_dataset_kind_and_foreign_dataset(user, other_user, demo):
    with pytest.raises(services.ServiceError, match="needs a pretrain dataset"):
        submit(user, Dataset.objects.get(name="demo-sft"))
    private = Dataset.objects.create(name="bobs", kind="pretrain", owner=other_user, path=demo.path)
    with pytest.raises(services.ServiceError, match="dataset"):
        submit(user, private)


def test_claim_is_conditional_and_ordered_by_priority(user, demo):
    low = submit(user, demo, name="low")
    high = submit(user, demo, name="high", priority=5)
    first = services.claim_next_job("node-a", slots=1)
    assert first.pk == high.pk and first.status == "running" and first.devices == [0]
    assert services.claim_next_job("node-a", slots=1) is None  # the only slot is busy
    second = services.claim_next_job("node-a", slots=2)
    assert second.pk == low.pk and second.devices == [1]
    assert services.claim_next_job("node-a", slots=2) is None


def test_cancel_queued_and_running_and_final(user, demo):
    queued = submit(user, demo)
    services.cancel_job(queued, user)
    assert Job.objects.get(pk=queued.pk).status == "cancelled"
    assert services.claim_next_job("n", 1) is None  # a cancelled job is never claimed
    running = submit(user, demo)
    services.claim_next_job("n", 1)
    job = services.cancel_job(running, user)
    assert job.status == "cancelling"  # the supervisor stops the process, then records cancelled
    services.finish_job(job, Job.Status.CANCELLED)
    with pytest.raises(services.ServiceError) as exc:
        services.cancel_job(job, user)
    assert exc.value.status == 409
    assert list(job.events.values_list("kind", flat=True)) == ["submitted", "running", "cancelling", "cancelled"]


def test_pause_resume_retry_and_clone(user, demo, settings, tmp_path):
    settings.HOME = tmp_path
    job = submit(user, demo, time_limit_s=60)
    assert services.pause_job(job, user).status == "paused"  # queued → paused keeps it out of the queue
    assert services.claim_next_job("n", 1) is None
    assert services.resume_job(job, user).status == "queued" and not job.resume  # no checkpoint yet
    services.claim_next_job("n", 1)
    assert services.pause_job(job, user).status == "pausing"
    with pytest.raises(services.ServiceError):
        services.resume_job(job, user)  # still pausing
    job.checkpoint_path.parent.mkdir(parents=True)
    job.checkpoint_path.write_bytes(b"x")
    job.transition(Job.Status.PAUSED, "n")
    job = services.resume_job(job, user)
    assert job.status == "queued" and job.resume and job.node == ""
    services.claim_next_job("n", 1)
    services.finish_job(job, Job.Status.FAILED, error="boom")
    job = services.retry_job(job, user)
    assert job.status == "queued" and job.resume
    with pytest.raises(services.ServiceError) as exc:
        services.retry_job(job, user)
    assert exc.value.status == 409
    copy = services.clone_job(job, user)
    assert copy.pk != job.pk and copy.status == "queued" and copy.config == job.config
    assert copy.time_limit_s == 60 and copy.name == "j (copy)"


def test_retry_with_half_the_batch_keeps_the_effective_batch_in_less_memory(user, demo, settings, tmp_path):
    settings.HOME = tmp_path
    job = submit(user, demo, config={**TINY, "batch_size": 16, "accumulation_steps": 2})
    services.claim_next_job("n", 1)
    job.checkpoint_path.parent.mkdir(parents=True)
    job.checkpoint_path.write_bytes(b"x")
    services.finish_job(job, Job.Status.FAILED, error="out of memory: CUDA out of memory — try a smaller batch_size")
    before = job.memory_estimate
    job = services.retry_job(job, user, half_batch=True)
    assert job.status == "queued" and job.resume
    assert (job.config["batch_size"], job.config["accumulation_steps"]) == (8, 4)
    assert (job.resolved_config["batch_size"], job.resolved_config["accumulation_steps"]) == (8, 4)
    assert job.memory_estimate < before  # the scheduler places it by the smaller need
    assert job.events.latest("pk").text == ("retry with batch size 16 → 8 and accumulation steps 2 → 4 (continues "
                                            "from its last checkpoint)")
    assert all(v == k + " (continues from its last checkpoint)" for k, v in services._RESUMING.items())
    assert services.build_spec(job)["config"]["batch_size"] == 8  # what the engine resumes with

    services.claim_next_job("n", 1)
    with pytest.raises(services.ServiceError) as exc:
        services.retry_job(job, user, half_batch=True)  # running: refused, and nothing was halved
    assert exc.value.status == 409 and Job.objects.get(pk=job.pk).resolved_config["batch_size"] == 8
    Job.objects.filter(pk=job.pk).update(resolved_config={**job.resolved_config, "batch_size": 1})
    services.finish_job(job, Job.Status.FAILED, error="out of memory")
    with pytest.raises(services.ServiceError) as exc:
        services.retry_job(job, user, half_batch=True)
    assert exc.value.field == "config.batch_size" and Job.objects.get(pk=job.pk).status == "failed"


def test_transitions_are_enforced_in_one_place(user, demo):
    job = submit(user, demo)
    assert not job.transition(Job.Status.SUCCEEDED)  # queued cannot succeed without running
    assert job.status == "queued"
    assert job.transition(Job.Status.RUNNING) and job.transition(Job.Status.SUCCEEDED)
    assert job.finished_at is not None
    for target in Job.Status:
        assert not job.transition(target)  # a final state has no way out


def test_crashed_job_is_resumed_automatically_once(user, demo, settings, tmp_path):
    settings.HOME, settings.AUTO_RESUME_LIMIT = tmp_path, 1
    job = submit(user, demo)
    services.claim_next_job("n", 1)
    services.interrupt_job(job, "killed")
    job.refresh_from_db()
    assert job.status == "queued" and job.auto_resumes == 1
    services.claim_next_job("n", 1)
    services.interrupt_job(job, "killed again")
    job.refresh_from_db()
    assert job.status == "interrupted"  # the budget is spent: a person decides (retry or cancel)


def test_an_interrupted_job_is_requeued_in_the_same_transaction(user, demo, settings, tmp_path, monkeypatch):
    """A page or API poll never sees a job that resumes on its own as interrupted in between (its history still
    holds both events): if the requeue fails, the interruption is not committed either."""
    settings.HOME, settings.AUTO_RESUME_LIMIT = tmp_path, 1
    job = submit(user, demo)
    services.claim_next_job("n", 1)

    def broken(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(services.lifecycle, "_requeue", broken)
    with pytest.raises(RuntimeError):
        services.interrupt_job(job, "killed")
    assert Job.objects.get(pk=job.pk).status == "running" and not job.events.filter(kind="interrupted").exists()
    monkeypatch.undo()
    services.interrupt_job(job, "killed")
    assert Job.objects.get(pk=job.pk).status == "queued"
    assert list(job.events.values_list("kind", flat=True))[-2:] == ["interrupted", "queued"]


def test_reconcile_requeues_jobs_of_a_dead_node(user, demo, settings, tmp_path):
    settings.HOME = tmp_path
    job = submit(user, demo)
    services.claim_next_job("node-x", 1)
    Job.objects.filter(pk=job.pk).update(pid=2**22 + 12345, worker_pid=os.getpid())  # the child is gone
    assert services.reconcile_node("node-x", starting=False) == []  # its supervisor (this process) still lives
    job.checkpoint_path.parent.mkdir(parents=True)
    job.checkpoint_path.write_bytes(b"x")
    assert services.reconcile_node("node-x", starting=True) == [job.pk]
    job.refresh_from_db()
    assert job.status == "queued" and job.resume and job.node == ""
    assert list(job.events.values_list("kind", flat=True))[-2:] == ["interrupted", "queued"]


def test_reconcile_completes_the_pause_of_a_job_whose_supervisor_died(user, demo, settings, tmp_path):
    settings.HOME = tmp_path
    job = submit(user, demo)
    services.claim_next_job("node-x", 1)
    job.refresh_from_db()
    job.transition(Job.Status.PAUSING, "system")
    Job.objects.filter(pk=job.pk).update(pid=2**22 + 12345, worker_pid=2**22 + 12346)  # both gone; the node lives
    assert services.reconcile_node("node-x", starting=False) == [job.pk]
    job.refresh_from_db()
    assert job.status == "paused" and job.events.latest("pk").text == "the job's supervisor died while pausing"


def dead_pid() -> int:
    """The pid of a process of this machine that has ended."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_background_work_whose_worker_is_gone_fails_saying_why(user, demo, settings):
    """A tokenizer's training or a dataset's statistics whose worker died (killed, out of memory, its node restarted)
    showed "training" / "Computing…" forever: django-q2 never runs such a task again. The node's housekeeping (and
    its start) end them, saying why; a live worker's and another node's are left alone."""
    from django.utils import translation

    from jobs.tasks import housekeeping

    settings.NODE_NAME = "node-x"
    dead = f"node-x:{dead_pid()}"
    tok = Tokenizer.objects.create(name="t", owner=user, status="training", worker=dead)
    alive = Tokenizer.objects.create(name="u", owner=user, status="training", worker=f"node-x:{os.getpid()}")
    other = Tokenizer.objects.create(name="v", owner=user, status="training", worker=f"node-xy:{dead_pid()}")
    Dataset.objects.filter(pk=demo.pk).update(stats_status="running", stats_worker=dead)
    housekeeping()
    tok.refresh_from_db()
    demo.refresh_from_db()
    assert tok.status == "failed" and tok.worker == "" and tok.error_text.endswith("train it again")
    assert demo.stats_status == "failed" and demo.stats_error.endswith("compute them again")
    with translation.override("zh-hans"):
        assert tok.error_text.endswith("请重新训练") and demo.stats_error.endswith("请重新计算")
    assert Tokenizer.objects.get(pk=alive.pk).status == "training"  # its worker lives
    assert Tokenizer.objects.get(pk=other.pk).status == "training"  # another node's: that node's housekeeping
    assert services.reconcile_background("node-x", starting=True) == 1  # at start, nothing of the last run lives
    assert Tokenizer.objects.get(pk=alive.pk).status == "failed"


def test_queue_position(user, demo):
    a, b = submit(user, demo), submit(user, demo)
    c = submit(user, demo, priority=1)
    assert [services.queue_position(j) for j in (c, a, b)] == [1, 2, 3]


def test_fair_share_puts_the_user_who_used_less_first(user, other_user, demo):
    from datetime import timedelta

    from django.utils import timezone

    heavy = submit(user, demo, name="yesterday")
    heavy.transition(Job.Status.RUNNING)
    Job.objects.filter(pk=heavy.pk).update(started_at=timezone.now() - timedelta(hours=5))
    heavy.transition(Job.Status.SUCCEEDED)
    first = submit(user, demo, name="alice waits")  # older
    second = submit(other_user, demo, name="bob goes first")
    urgent = submit(user, demo, name="urgent", priority=3)  # orders alice's own jobs: it pushes no one else back
    usage = services.recent_usage({user.pk, other_user.pk})
    assert usage[other_user.pk] == 0 and 4.9 * 3600 < usage[user.pk] < 5.1 * 3600
    assert [j.name for j in services.queue_order([first, second, urgent])] == ["bob goes first", "urgent",
                                                                               "alice waits"]
    assert services.queue_position(second) == 1 and services.queue_position(urgent) == 2
    assert services.claim_next_job("n", 1).pk == second.pk
    admin = get_user_model().objects.create_user("root", password="x", is_staff=True)
    rush = submit(admin, demo, name="an admin's rush job", priority=3)  # an admin's priority counts for everyone
    assert [j.name for j in services.queue_order([first, urgent, rush])] == ["an admin's rush job", "urgent",
                                                                             "alice waits"]


def test_queue_position_of_a_job_claimed_meanwhile_is_none(user, demo):
    job = submit(user, demo)
    stale = Job.objects.get(pk=job.pk)  # read while queued
    services.claim_next_job("n", 1)
    assert stale.status == "queued" and services.queue_position(stale) is None


def test_every_user_action_is_a_legal_transition():
    for action, moves in Job.USER_ACTIONS.items():
        for source, target in moves.items():
            assert target in Job.TRANSITIONS[source], (action, source, target)
