"""The Slurm executor's own decisions, in-process: the batch script a job becomes, Slurm's answers read, a restarted
portal following its Slurm runs again. The runs themselves go through a real Slurm in tests/test_slurm.py."""
import signal

import pytest
from django.test import override_settings

from conftest import TINY
from jobs import services, slurm
from jobs.models import Dataset, Job
from jobs.supervisor import Supervisor


@pytest.fixture
def job(user, db):
    ds = Dataset.objects.get(name="demo-pretrain")
    return services.submit_job(owner=user, name="s", stage="pretrain", dataset=ds.pk, config=TINY)


@pytest.mark.parametrize("devices, per_node, expected", [
    (1, 8, (1, 1)), (8, 8, (1, 8)), (16, 8, (2, 8)), (4, 2, (2, 2)), (6, 4, (2, 3)), (5, 4, (5, 1))])
def test_a_job_spans_as_few_nodes_as_hold_its_devices_with_the_same_number_on_each(devices, per_node, expected):
    with override_settings(SLURM_DEVICES_PER_NODE=per_node):
        assert slurm.layout(devices) == expected


@override_settings(SLURM_PARTITION="gpu", SLURM_ACCOUNT="lab", SLURM_QOS="normal", SLURM_GRES="gpu",
                   SLURM_DEVICES_PER_NODE=8, SLURM_EXTRA_ARGS="--exclusive --constraint='a100|h100'")
def test_the_batch_script_asks_slurm_for_what_the_job_needs(job):
    job.time_limit_s, job.memory_estimate = 3601, 10 * 2**30
    script = slurm.batch_script(job, job.run_dir / "spec.json")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for opt in (f"--job-name=minicloud-{job.pk}", "--nodes=1", "--ntasks-per-node=1", "--gres=gpu:1",
                "--time=61", "--partition=gpu", "--account=lab", "--qos=normal", "--no-requeue", "--exclusive",
                "--constraint=a100|h100", f"--output={job.run_dir}/slurm-%j.out", "--mem=13824M"):
        assert any(line.startswith("#SBATCH ") and opt in line for line in lines), opt
    assert f"#SBATCH '--comment=minicloud job {job.pk} of {job.owner.username}'" in script
    assert lines[-1].startswith("exec srun --kill-on-bad-exit=1 ") and lines[-1].endswith(
        f"-u -m training run {job.run_dir}/spec.json")
    assert "CUDA_VISIBLE_DEVICES=" not in script  # Slurm sets it for the allocated GPUs


@override_settings(SLURM_GRES="", SLURM_DEVICES_PER_NODE=2, SLURM_CPUS_PER_DEVICE=3)
def test_a_multi_node_cpu_job_runs_srun_torchrun_with_a_c10d_rendezvous(job):
    job.gpus = 4
    script = slurm.batch_script(job, job.run_dir / "spec.json")
    assert "#SBATCH --nodes=2" in script and "#SBATCH --cpus-per-task=6" in script and "--gres" not in script
    assert "export CUDA_VISIBLE_DEVICES=" in script  # a CPU partition: the engine runs on the CPU
    run = script.splitlines()[-1]
    assert run.startswith("exec srun --kill-on-bad-exit=1 ") and "-m torch.distributed.run --nnodes=2" in run
    assert "--nproc_per_node=2 --rdzv_backend=c10d" in run and '--rdzv_id="$SLURM_JOB_ID"' in run


def test_slurms_exit_codes_and_times_read_as_subprocess_would_report_them():
    assert slurm.exit_code("0:0") == 0 and slurm.exit_code("143:0") == 143 and slurm.exit_code("0:9") == -9
    assert slurm.exit_code("") == 1
    assert slurm._time("Unknown") is None and slurm._time("None") is None
    assert slurm._time("2026-12-02T19:15:53").endswith("+00:00")


PREEMPTED_IN_GRACE = ("JobId=79 JobName=minicloud-1 JobState=FAILED Reason=NonZeroExitCode ExitCode=143:0 "
                      "StartTime=2026-12-06T06:39:46 EndTime=2026-12-06T06:39:53 NodeList=node1 "
                      "PreemptEligibleTime=2026-12-06T06:39:46 PreemptTime=2026-12-06T06:39:51")


@pytest.mark.parametrize("text, outcome", [
    (PREEMPTED_IN_GRACE, "preempted"),  # exited (143) within the GraceTime after Slurm's SIGTERM
    (PREEMPTED_IN_GRACE.replace("JobState=FAILED", "JobState=PREEMPTED"), "preempted"),  # killed after it
    (PREEMPTED_IN_GRACE.replace("JobState=FAILED", "JobState=COMPLETED"), None),  # it finished first
    (PREEMPTED_IN_GRACE.replace("PreemptTime=2026-12-06T06:39:51", "PreemptTime=None"), None)])  # failed
def test_a_run_slurm_preempted_is_told_from_a_failed_one(tmp_path, monkeypatch, settings, text, outcome):
    settings.SLURM_POLL_S = 0
    monkeypatch.setattr(slurm, "_run", lambda *args, **kw: text)
    run = slurm.SlurmRun("79", tmp_path / "slurm-79.out")
    assert run.poll() is not None and run.outcome == outcome


def test_a_preempted_job_resumes_every_time_without_spending_its_crash_budget(job, settings):
    settings.AUTO_RESUME_LIMIT = 1
    job.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    job.checkpoint_path.write_bytes(b"the checkpoint its SIGTERM wrote")
    for n in range(3):
        services.claim_next_job("n", 1)
        job.refresh_from_db()
        assert job.status == Job.Status.RUNNING, n
        sup = Supervisor(job)
        sup.proc = type("Run", (), {"outcome": "preempted", "info": {"nodes": "node1"}})()
        sup.finish(1)
        job.refresh_from_db()
        assert job.status == Job.Status.QUEUED and job.auto_resumes == 0 and job.resume
    assert [e.kind for e in job.events.order_by("pk")][-2:] == ["interrupted", "queued"]
    assert job.events.latest("pk").text == "requeued after Slurm preempted it (continues from its last checkpoint)"


def test_a_run_preempted_within_its_grace_time_that_only_sacct_remembers_resumes(job, tmp_path, monkeypatch,
                                                                                 settings):
    """Once scontrol has forgotten a run (the portal was down longer than MinJobAge), only sacct answers, and it keeps
    no PreemptTime: a run that checkpointed and exited within the GraceTime reads FAILED, 143. The engine's "stopped"
    event says it stopped on a SIGTERM the portal did not send, after writing a checkpoint: the job resumes from it
    (while the automatic-resume budget lasts: sacct cannot tell Slurm's preemption from an admin's signal)."""
    settings.SLURM_POLL_S, settings.AUTO_RESUME_LIMIT = 0, 1

    def answer(*cmd, **kw):
        if cmd[0] == "scontrol":
            raise slurm.SlurmError("slurm_load_jobs error: Invalid job id specified")
        assert cmd[0] == "sacct"
        return "FAILED|None|node1|2026-12-06T06:39:46|2026-12-06T06:39:53|15:0|143:0\n"  # as Slurm 22.05 has it

    monkeypatch.setattr(slurm, "_run", answer)
    run = slurm.SlurmRun("79", tmp_path / "slurm-79.out")
    assert run.poll() == 143 and run.outcome is None and run.info["nodes"] == "node1"
    services.claim_next_job("n", 1)
    job.refresh_from_db()
    sup = Supervisor(job)
    sup.proc, sup.stopped_event = run, {"event": "stopped", "step": 12}
    sup.finish(143)
    job.refresh_from_db()
    assert job.status == Job.Status.QUEUED and job.auto_resumes == 1
    assert job.events.get(kind="interrupted").text == (
        "stopped at step 12 by a signal from outside the portal (an admin, or Slurm preempting it): it resumes from "
        "the checkpoint it wrote")
    sup.stopped_event = None  # without the engine's word, exit code 143 is a failure like any other
    services.claim_next_job("n", 1)
    job.refresh_from_db()
    sup = Supervisor(job)
    sup.proc = run
    sup.finish(143)
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED and "exited with code 143" in job.error_text


def test_a_restarted_portal_follows_its_slurm_runs_instead_of_interrupting_them(job, settings, monkeypatch):
    queued = []
    monkeypatch.setattr("jobs.services.nodes.enqueue", lambda *a, **kw: queued.append((a, kw)))
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING, node=settings.NODE_NAME, executor="slurm",
                                         slurm={"id": "77", "token": "t" * 32, "read": 120}, generation=3)
    assert services.reconcile_node(settings.NODE_NAME, starting=True) == []
    job.refresh_from_db()
    assert job.status == Job.Status.RUNNING
    assert queued == [(("jobs.tasks.follow_slurm_job", job.pk, 3), {
        "task_name": "follow_slurm_job", "queue": services.node_queue(settings.NODE_NAME)})]
    taken = services.take_over_slurm_job(job.pk, 3)
    assert taken.generation == 4  # any supervisor still following it is fenced out
    assert services.take_over_slurm_job(job.pk, 3) is None  # a duplicate token finds nothing
    follower = Supervisor(taken, attach=True)
    assert follower.slurm and follower.token == "t" * 32
    assert follower.slurm_saved["read"] == 120


def test_a_slurm_run_that_lost_its_job_to_another_follower_only_stops_following(job, tmp_path):
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING, executor="slurm",
                                         slurm={"id": "78", "token": "u" * 32})
    job.refresh_from_db()
    sup = Supervisor(job, attach=True)
    sup.proc = slurm.SlurmRun("78", tmp_path / "slurm-78.out")
    signals = []
    sup.proc.send_signal = signals.append
    sup._lose()
    assert sup.proc.detached and signals == [] and sup.reason == "lost"
    assert sup.proc.stdout.readline() == ""  # its reader ends: nothing more is recorded
    assert signal.SIGKILL not in signals


@override_settings(SLURM_SHARDS_PER_GPU=4, SLURM_GPU_MEMORY_GB=80, SLURM_GRES="gpu")
def test_a_small_one_gpu_job_asks_for_gpu_shards_and_a_large_one_for_whole_gpus(job):
    job.memory_estimate = 15 * 2**30
    assert slurm.gpu_shards(job) == 1 and "--gres=shard:1" in slurm.sbatch_options(job)
    job.memory_estimate = 45 * 2**30
    assert slurm.gpu_shards(job) == 3
    job.memory_estimate = 70 * 2**30
    assert slurm.gpu_shards(job) == 0 and "--gres=gpu:1" in slurm.sbatch_options(job)
    job.memory_estimate, job.gpus = 15 * 2**30, 2
    assert slurm.gpu_shards(job) == 0 and "--gres=gpu:2" in slurm.sbatch_options(job)


def test_the_portal_releases_jobs_to_slurm_only_while_few_of_its_own_wait_there(user, settings, monkeypatch):
    """At most SLURM_MAX_PENDING released jobs wait in Slurm's queue (age-ordered); the rest wait in the portal's fair
    order, saying why."""
    monkeypatch.setenv("MINICLOUD_EXECUTOR", "slurm")
    monkeypatch.setenv("MINICLOUD_SLURM_MAX_JOBS", "16")
    settings.EXECUTOR, settings.SLURM_MAX_PENDING = "slurm", 2
    ds = Dataset.objects.get(name="demo-pretrain")
    jobs = [services.submit_job(owner=user, name=f"r{i}", stage="pretrain", dataset=ds.pk, config=TINY, gpus=4)
            for i in range(4)]  # four devices each: the portal's slots do not count devices, Slurm places them
    first = services.claim_next_job(settings.NODE_NAME)
    second = services.claim_next_job(settings.NODE_NAME)
    assert [first.pk, second.pk] == [jobs[0].pk, jobs[1].pk]
    Job.objects.filter(pk__in=[first.pk, second.pk]).update(executor="slurm", slurm={"id": "1", "state": "PENDING"})
    assert services.claim_next_job(settings.NODE_NAME) is None
    decision = services.queue_plan()[0]
    assert decision.reason == "slurm_pending" and "2 job(s) already handed to Slurm" in services.wait_reason_text(
        decision.reason, decision.params)
    Job.objects.filter(pk=first.pk).update(slurm={"id": "1", "state": "RUNNING"})  # one started in Slurm
    assert services.claim_next_job(settings.NODE_NAME).pk == jobs[2].pk
