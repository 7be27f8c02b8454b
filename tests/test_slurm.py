"""The Slurm executor against a real Slurm (deploy/slurm/start.sh: munged, slurmctld, two slurmd on this machine).

A portal with MINICLOUD_EXECUTOR=slurm submits every job it releases with sbatch; these tests drive it through its
HTTP API and look at Slurm with Slurm's own commands. They run where Slurm answers; `.ci/run` starts it and runs them
in its PostgreSQL pass (MINICLOUD_SLURM_TESTS=1: a missing Slurm fails; =0 in the SQLite pass: skipped).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from .live import TINY, LiveNode, processes_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20)
    return out.returncode == 0 and sum(s.split()[-1].rstrip("*") in ("idle", "mixed", "allocated")
                                       for s in out.stdout.splitlines()) >= 2


if os.environ.get("MINICLOUD_SLURM_TESTS") == "0":
    pytest.skip("MINICLOUD_SLURM_TESTS=0 (.ci/run runs the Slurm tests in its PostgreSQL pass)",
                allow_module_level=True)
if not _slurm_up():
    if os.environ.get("MINICLOUD_SLURM_TESTS") == "1":
        raise RuntimeError("MINICLOUD_SLURM_TESTS=1 but Slurm does not answer with two nodes: deploy/slurm/start.sh")
    pytest.skip("no Slurm here (deploy/slurm/start.sh starts one; .ci/run does)", allow_module_level=True)


def slurm(*args) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout


def slurm_field(slurm_id, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(slurm_id)], capture_output=True, text=True)
    return next((f.split("=", 1)[1] for f in out.stdout.split() if f.startswith(f"{name}=")), "")


def slurm_state(slurm_id) -> str:
    return slurm_field(slurm_id, "JobState")


def accounted_as_scontrol_says(slurm_id) -> dict:
    """Slurm's accounting (slurmdbd, deploy/slurm) reads an ended run as scontrol does: the portal asks sacct once
    scontrol has forgotten the run (MinJobAge; a portal down longer than that). sacct's view, read by the portal's
    own reader (jobs/slurm.py)."""
    from jobs import slurm as executor

    live = executor.from_scontrol(str(slurm_id))
    for _ in range(40):  # slurmctld hands the record to slurmdbd a moment after the job ends
        kept = executor.from_sacct(str(slurm_id))
        if kept is not None and kept["state"] == live["state"] and kept["end"]:
            break
        time.sleep(0.5)
    assert kept is not None, f"sacct has no record of {slurm_id}"
    same = ("state", "nodes", "start", "end") + (("exit",) if live["state"] == "COMPLETED" else ())
    assert {k: kept[k] for k in same} == {k: live[k] for k in same}  # (the portal reads no exit code otherwise)
    if live["state"] == "FAILED" and kept["exit"] != live["exit"]:
        # Slurm 22.05's accounting sometimes records no DerivedExitCode (0:0: seen for one of two preempted runs
        # whose steps exited alike), and its ExitCode folds an exit of 128 + N into N ("15:0" for the engine's 143):
        # the same failure, its code told apart only by scontrol. The engine's "stopped" event, not this code,
        # tells the supervisor that a run stopped on a signal (jobs/tests/test_slurm_executor.py).
        assert executor.exit_code(kept["exit"]) + 128 == executor.exit_code(live["exit"]), (kept, live)
    return kept


def slurm_portal(home, **env):
    """A portal node whose executor is Slurm (``env``: its settings); stopped at the end with nothing of its own left
    in Slurm or on this machine."""
    node = LiveNode(home)
    node.env.update(MINICLOUD_EXECUTOR="slurm", MINICLOUD_SLURM_POLL_S="1", MINICLOUD_NODE="login", **env)
    node.env.pop("MINICLOUD_DEVICES", None)
    node.start()
    try:
        yield node
    finally:
        rc = node.stop()
        node.drop_database()
        for line in slurm("squeue", "-h", "-o", "%i %j").splitlines():  # nothing of ours left in Slurm
            if line.split()[1].startswith("minicloud-") and str(home) in slurm("scontrol", "show", "job",
                                                                                 line.split()[0]):
                subprocess.run(["scancel", line.split()[0]])
        deadline = time.time() + 60  # a cancelled run's processes end a moment later (SIGTERM, its checkpoint)
        while processes_of(node.home) and time.time() < deadline:
            time.sleep(0.5)
        assert rc == 0, node.log()
        assert processes_of(node.home) == []


@pytest.fixture(scope="module")
def portal(tmp_path_factory):
    """A portal node whose executor is Slurm: CPU tasks (no GRES), two per node, at most 4 jobs released at once."""
    yield from slurm_portal(tmp_path_factory.mktemp("slurm-home"), MINICLOUD_SLURM_GRES="",
                            MINICLOUD_SLURM_DEVICES_PER_NODE="2", MINICLOUD_SLURM_MAX_JOBS="4")


@pytest.fixture(scope="module")
def gpu_portal(tmp_path_factory):
    """A portal whose executor asks Slurm for GPUs (the test cluster's two per node are stand-ins, deploy/slurm:
    the engine finds no CUDA and trains on the CPU), a one-GPU job that needs little of a GPU's 80 GB for one of its
    8 shards."""
    yield from slurm_portal(tmp_path_factory.mktemp("slurm-gpu-home"), MINICLOUD_SLURM_GRES="gpu",
                            MINICLOUD_SLURM_DEVICES_PER_NODE="2", MINICLOUD_SLURM_SHARDS_PER_GPU="8",
                            MINICLOUD_SLURM_GPU_MEMORY_GB="80")


def slurm_id(portal, job_id, timeout=60):
    return portal.wait_for(job_id, lambda j: (j.get("slurm") or {}).get("id"), timeout=timeout,
                           what="submitted to Slurm")["slurm"]["id"]


def test_a_cpu_job_runs_in_slurm_end_to_end(portal):
    job = portal.submit("slurm-e2e", {**TINY, "max_steps": 30, "log_interval": 2})
    sid = slurm_id(portal, job["id"])
    script = (portal.home / "runs" / f"job-{job['id']}" / "job.sbatch").read_text()
    assert f"--job-name=minicloud-{job['id']}" in script and "--comment=minicloud job" in script
    assert "--mem=" in script and "srun" in script
    done = portal.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed"), what="finished")
    assert done["status"] == "succeeded", done
    assert done["executor"] == "slurm" and done["slurm"]["nodes"].startswith("node")
    assert done["step"] == 30 and done["output_model"]
    assert slurm_state(sid) == "COMPLETED"
    assert accounted_as_scontrol_says(sid)["exit"] == "0:0"
    points = portal.request("GET", f"/api/v1/jobs/{job['id']}/metrics")[1]
    assert len(points["points"]) >= 10  # the live metrics came through the output file on the shared storage
    # the run's device-hours are what Slurm accounted: from its start of the batch job to its end
    start, end = portal.manage("shell", "-c", "from accounts.models import UsageRecord as U; "
                               f"r = U.objects.get(job_id={job['id']}); print(r.started_at.isoformat(), "
                               "r.ended_at.isoformat())").strip().splitlines()[-1].split()
    assert start == done["slurm"]["start"] and end > start


def test_a_job_the_cluster_can_never_run_fails_with_slurms_reason(portal):
    job = portal.submit("slurm-too-wide", {**TINY, "max_steps": 5}, gpus=6)  # 3 nodes x 2: the cluster has 2
    done = portal.wait_for(job["id"], lambda j: j["status"] not in ("queued", "running"), timeout=60, what="ended")
    assert done["status"] == "failed" and "Slurm can never start this job" in done["error"], done
    assert "PartitionConfig" in done["error"] or "PartitionNodeLimit" in done["error"]
    assert slurm_state(done["slurm"]["id"]) == "CANCELLED"  # nothing of it is left pending in Slurm


def test_pause_resume_and_cancel_through_slurm(portal):
    job = portal.submit("slurm-pause", {**TINY, "max_steps": 400, "log_interval": 1, "save_interval": 1000})
    sid = slurm_id(portal, job["id"])
    portal.wait_for(job["id"], lambda j: j["step"] >= 5, what="running")
    assert portal.request("POST", f"/api/v1/jobs/{job['id']}/pause")[0] == 202
    paused = portal.wait_for(job["id"], lambda j: j["status"] == "paused", timeout=60, what="paused")
    assert not slurm("squeue", "-h", "-j", sid).strip()  # scancel --signal=TERM: the engine checkpointed, exited
    assert portal.request("POST", f"/api/v1/jobs/{job['id']}/resume")[0] == 202
    portal.wait_for(job["id"], lambda j: j["status"] == "running" and (j["slurm"] or {}).get("id") != sid
                    and j["step"] > paused["step"], what="running again as a new Slurm job")
    sid2 = portal.job(job["id"])["slurm"]["id"]
    assert portal.request("POST", f"/api/v1/jobs/{job['id']}/cancel")[0] == 202
    portal.wait_for(job["id"], lambda j: j["status"] == "cancelled", timeout=60, what="cancelled")
    text = portal.request("GET", f"/api/v1/jobs/{job['id']}/logs?after=0")[1]["text"]
    assert "resumed from step " in text
    assert not slurm("squeue", "-h", "-j", sid2).strip()


def test_scancel_outside_the_portal_shows_as_cancelled_by_slurm(portal):
    job = portal.submit("slurm-scancel", {**TINY, "max_steps": 100000, "log_interval": 1})
    sid = slurm_id(portal, job["id"])
    portal.wait_for(job["id"], lambda j: j["step"] >= 2, what="running")
    slurm("scancel", sid)
    done = portal.wait_for(job["id"], lambda j: j["status"] not in ("running", "queued"), timeout=60, what="ended")
    assert done["status"] == "cancelled", done
    assert "Slurm" in done["error"] and sid in done["error"]
    assert accounted_as_scontrol_says(sid)["state"] == "CANCELLED"


def test_a_job_over_its_time_limit_is_stopped_by_slurm(portal):
    job = portal.submit("slurm-timeout", {**TINY, "max_steps": 100000, "epochs": 10000, "log_interval": 5,
                                          "save_interval": 20}, time_limit_s=60)
    sid = slurm_id(portal, job["id"])
    assert "--time=1" in (portal.home / "runs" / f"job-{job['id']}" / "job.sbatch").read_text()
    done = portal.wait_for(job["id"], lambda j: j["status"] not in ("running", "queued"), timeout=200, what="ended")
    assert done["status"] == "failed" and "time limit" in done["error"], done
    assert slurm_state(sid) == "TIMEOUT"


def test_a_slurmd_restart_mid_job_does_not_stop_it(portal):
    job = portal.submit("slurm-slurmd", {**TINY, "max_steps": 120, "log_interval": 1})
    slurm_id(portal, job["id"])
    running = portal.wait_for(job["id"], lambda j: j["step"] >= 3 and (j["slurm"] or {}).get("nodes"),
                              what="running")
    node = running["slurm"]["nodes"]
    pid = int(subprocess.run(["pgrep", "-f", f"slurmd -N {node}"], capture_output=True, text=True).stdout.split()[0])
    os.kill(pid, signal.SIGTERM)  # slurmd stops; the job's slurmstepd goes on (proctrack/linuxproc)
    for _ in range(50):
        if subprocess.run(["pgrep", "-f", f"^slurmd -N {node}"], capture_output=True).returncode:
            break
        time.sleep(0.2)
    subprocess.run(["slurmd", "-N", node], check=True)
    done = portal.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed", "interrupted"),
                           what="finished")
    assert done["status"] == "succeeded" and done["step"] == 120, done


def test_a_node_failure_in_slurm_resumes_the_job_from_its_checkpoint_once(portal):
    job = portal.submit("slurm-node-fail", {**TINY, "max_steps": 150, "log_interval": 1, "save_interval": 10})
    sid = slurm_id(portal, job["id"])
    running = portal.wait_for(job["id"], lambda j: j["step"] >= 15 and (j["slurm"] or {}).get("nodes"),
                              what="past a checkpoint")
    node = running["slurm"]["nodes"]
    slurm("scontrol", "update", f"nodename={node}", "state=down", "reason=minicloud-test")  # Slurm: NODE_FAIL
    try:
        moved = portal.wait_for(job["id"], lambda j: (j["slurm"] or {}).get("id") not in (None, sid),
                                timeout=90, what="submitted again")
    finally:  # (ReturnToService=2 may have brought it back already when its slurmd registered again)
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
    assert slurm_state(sid) == "NODE_FAIL"
    done = portal.wait_for(moved["id"], lambda j: j["status"] in ("succeeded", "failed", "interrupted"),
                           what="finished")
    assert done["status"] == "succeeded" and done["step"] == 150 and done["auto_resumes"] == 1, done
    assert any("Slurm ended the run (NODE_FAIL" in e["message"] for e in done["events"]), done["events"]
    log = portal.request("GET", f"/api/v1/jobs/{job['id']}/logs?after=0")[1]["text"]
    assert int(log.split("resumed from step ")[1].split()[0]) >= 10


def test_a_job_preempted_by_slurm_resumes_from_its_checkpoint_every_time(portal):
    """A job of a higher-priority partition takes both nodes (Slurm's partition_prio preemption; GraceTime's SIGTERM
    lets the engine checkpoint and exit: Slurm then says FAILED, not PREEMPTED): the job resumes from the step it
    had reached, every time: not the job's doing, so it does not spend the automatic-resume budget for crashes
    (MINICLOUD_AUTO_RESUME, 1)."""
    job = portal.submit("slurm-preempted", {**TINY, "max_steps": 100000, "epochs": 10000, "log_interval": 1,
                                            "save_interval": 100000})
    try:
        preempted_twice(portal, job)
    finally:  # a failure here must not leave the run holding a node for the module's other tests
        portal.request("POST", f"/api/v1/jobs/{job['id']}/cancel")
    portal.wait_for(job["id"], lambda j: j["status"] == "cancelled", timeout=60, what="cancelled")


def preempted_twice(portal, job):
    preempted, reached = [], 0

    def training(j):  # its current Slurm run is training: past the step where the last one stopped
        return (j["slurm"] or {}).get("state") == "RUNNING" and j["slurm"]["id"] not in preempted and (
            j["step"] >= reached + 3)

    for _ in range(2):
        running = portal.wait_for(job["id"], training, what="training (again)")
        sid = running["slurm"]["id"]
        urgent = slurm("sbatch", "--parsable", "--partition=urgent", "--nodes=2", "--exclusive",
                       "--job-name=minicloud-test-urgent", "--output=/dev/null", "--wrap=sleep 1").strip()
        portal.wait_for(job["id"], lambda j: (j["slurm"] or {}).get("id") != sid, timeout=120,
                        what="submitted again")
        # chosen for preemption; it checkpointed and exited within the GraceTime (FAILED, 143) or was killed after it
        assert slurm_field(sid, "PreemptTime")[:1].isdigit() and slurm_state(sid) in ("FAILED", "PREEMPTED")
        for _ in range(120):  # the urgent job gets the nodes (the resubmitted run waits behind it)
            if slurm_state(urgent) not in ("PENDING", ""):
                break
            time.sleep(0.5)
        assert slurm_state(urgent) in ("RUNNING", "COMPLETING", "COMPLETED")
        preempted.append(sid)
        reached = portal.job(job["id"])["step"]
        # sacct keeps no PreemptTime: a run that exited within the GraceTime reads FAILED there, 143 (the engine's
        # "stopped" event resumes it then: jobs/tests/test_slurm_executor.py)
        accounted = accounted_as_scontrol_says(sid)
        assert accounted["preempted"] == (accounted["state"] == "PREEMPTED")
    again = portal.wait_for(job["id"], training, what="training after the second preemption")
    assert again["auto_resumes"] == 0
    assert sum("Slurm preempted the run" in e["message"] for e in again["events"]) == 2, again["events"]
    log = portal.request("GET", f"/api/v1/jobs/{job['id']}/logs?after=0")[1]["text"]
    steps = [int(part.split()[0]) for part in log.split("resumed from step ")[1:]]
    assert len(steps) == 2 and 3 <= steps[0] < steps[1], steps  # each from the checkpoint its SIGTERM wrote


def test_a_two_process_gloo_ddp_job_under_srun_torchrun(portal):
    job = portal.submit("slurm-ddp", {**TINY, "max_steps": 20, "log_interval": 2}, gpus=2)
    slurm_id(portal, job["id"])
    script = (portal.home / "runs" / f"job-{job['id']}" / "job.sbatch").read_text()
    assert "--nodes=1" in script and "--nproc_per_node=2" in script and "torch.distributed.run" in script
    done = portal.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed"), what="finished")
    assert done["status"] == "succeeded", done
    log = portal.request("GET", f"/api/v1/jobs/{job['id']}/logs?after=0")[1]["text"]
    assert "world size 2" in log or "2 processes" in log or done["step"] == 20


def test_a_two_node_job_spans_both_slurmd(portal):
    job = portal.submit("slurm-2n", {**TINY, "max_steps": 16, "log_interval": 2}, gpus=4)
    slurm_id(portal, job["id"])
    script = (portal.home / "runs" / f"job-{job['id']}" / "job.sbatch").read_text()
    assert "--nodes=2" in script and "--nnodes=2" in script and "--rdzv_backend=c10d" in script
    done = portal.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed"), timeout=300, what="finished")
    assert done["status"] == "succeeded", done
    assert done["slurm"]["nodes"] == "node[1-2]"


def test_a_portal_restart_follows_its_running_slurm_job_again(portal):
    job = portal.submit("slurm-restart", {**TINY, "max_steps": 150, "log_interval": 1})
    sid = slurm_id(portal, job["id"])
    portal.wait_for(job["id"], lambda j: j["step"] >= 3, what="running")
    assert portal.stop() == 0  # the portal stops; its Slurm job does not
    assert slurm_state(sid) == "RUNNING"
    portal.start()
    done = portal.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed", "interrupted"),
                           what="finished")
    assert done["status"] == "succeeded" and done["step"] == 150, done
    assert done["slurm"]["id"] == sid  # the same Slurm job, followed again: nothing was run twice
    points = portal.request("GET", f"/api/v1/jobs/{job['id']}/metrics")[1]["points"]
    steps = [p["step"] for p in points if "loss" in p["values"]]
    assert steps == sorted(set(steps)) and steps[-1] == 150  # every point once, in order, across the restart


def test_the_queue_page_shows_slurms_state_and_reason(portal):
    from .test_browser import CHROMIUM, login

    if not shutil.which(CHROMIUM):
        pytest.fail("chromium is missing: .ci/run installs it with apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    big = portal.submit("slurm-whole-cluster", {**TINY, "max_steps": 100000, "log_interval": 5}, gpus=4)
    portal.wait_for(big["id"], lambda j: (j["slurm"] or {}).get("state") == "RUNNING", what="running in Slurm")
    waiting = portal.submit("slurm-waits", {**TINY, "max_steps": 10})
    job = portal.wait_for(waiting["id"], lambda j: (j["slurm"] or {}).get("state") == "PENDING"
                          and j["slurm"]["reason"] not in ("None", ""), what="pending in Slurm with a reason")
    reason = job["slurm"]["reason"]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = login(portal, browser)
            for lang, running_word in (("en", "running"), ("zh-hans", "运行中")):
                page.context.add_cookies([{"name": "django_language", "value": lang, "url": portal.url}])
                page.goto(portal.url + "/queue/")
                row = page.locator("#queue-table tr", has_text="slurm-waits")
                assert f"PENDING ({reason})" in row.inner_text()
                assert running_word in page.locator("#queue-table tr", has_text="slurm-whole-cluster").inner_text()
            browser.close()
    finally:
        for j in (big, waiting):
            portal.request("POST", f"/api/v1/jobs/{j['id']}/cancel")
        for j in (big, waiting):
            portal.wait_for(j["id"], lambda x: x["status"] in ("cancelled", "paused", "failed", "succeeded"),
                            timeout=60, what="stopped")


def slurm_gres(slurm_id) -> str:
    """The GRES Slurm allocated to a job (kept once it has ended)."""
    out = slurm("scontrol", "show", "job", "-d", "-o", str(slurm_id))
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith("JOB_GRES=")), "")


def test_gpu_jobs_get_slurms_gpus_and_a_small_one_a_shard_of_one(gpu_portal):
    """What a GPU cluster's Slurm is asked for and allocates: --gres=gpu:N per node, and --gres=shard:K for a
    one-GPU job whose memory estimate fits in K of a GPU's shares (two such jobs can share one GPU)."""
    small = [gpu_portal.submit(f"slurm-shard-{i}", {**TINY, "max_steps": 30, "log_interval": 2}) for i in range(2)]
    pair = gpu_portal.submit("slurm-gpus", {**TINY, "max_steps": 10, "log_interval": 2}, gpus=2)
    for job, gres, allocated in [*((j, "--gres=shard:1", "shard:1") for j in small), (pair, "--gres=gpu:2", "gpu:2")]:
        sid = slurm_id(gpu_portal, job["id"])
        script = (gpu_portal.home / "runs" / f"job-{job['id']}" / "job.sbatch").read_text()
        assert gres in script and "CUDA_VISIBLE_DEVICES=" not in script, script
        done = gpu_portal.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed"), what="finished")
        assert done["status"] == "succeeded", done
        assert slurm_gres(sid) == allocated
