"""Job lifecycle on the real `serve`: pause/resume from the checkpoint, cancel of a hung child, crash recovery."""
import os
import re
import signal
import time
from datetime import datetime

import pytest

from .live import TINY, LiveNode, processes_of, training_processes

pytestmark = pytest.mark.e2e
LONG = {**TINY, "max_steps": 100000, "log_interval": 1, "save_interval": 10}


def log_text(live, job_id):
    return live.request("GET", f"/api/v1/jobs/{job_id}/logs?after=0")[1]["text"]


@pytest.mark.slow
def test_pause_then_resume_continues_from_the_checkpoint(live):
    # 150 steps: the pause lands within a few steps of step 5, the rest runs after the resume
    job = live.submit("pause-me", {**TINY, "max_steps": 150, "log_interval": 1, "save_interval": 1000,
                                   "epochs": 5})
    live.wait_for(job["id"], lambda j: j["status"] == "running" and j["step"] >= 5, what="running")
    status, body = live.request("POST", f"/api/v1/jobs/{job['id']}/pause")
    assert status == 202 and body["status"] == "pausing"
    paused = live.wait_for(job["id"], lambda j: j["status"] == "paused", timeout=30, what="paused")
    assert not training_processes(live.home, job["id"])  # the device is free
    step = paused["step"]
    assert live.request("POST", f"/api/v1/jobs/{job['id']}/pause")[0] == 409
    status, body = live.request("POST", f"/api/v1/jobs/{job['id']}/resume")
    assert status == 202 and body["status"] == "queued"
    done = live.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed"), what="finished")
    assert done["status"] == "succeeded" and done["step"] == 150
    text = log_text(live, job["id"])
    resumed_at = int(text.split("resumed from step ")[1].split()[0])
    assert resumed_at >= step > 0  # continued from the pause checkpoint, not from step 0


def test_cancel_of_a_hung_training_process_kills_it(live):
    job = live.submit("hang", LONG)
    live.wait_for(job["id"], lambda j: j["status"] == "running" and j["step"] > 0, what="running")
    spec = (live.home, job["id"])
    for pid in training_processes(*spec):
        os.kill(pid, signal.SIGSTOP)  # a training loop that no longer answers SIGTERM
    t0 = time.time()
    assert live.request("POST", f"/api/v1/jobs/{job['id']}/cancel")[0] == 202
    live.wait_for(job["id"], lambda j: j["status"] == "cancelled", timeout=15, what="cancelled")
    while training_processes(*spec) and time.time() - t0 < 10:
        time.sleep(0.2)
    assert not training_processes(*spec) and time.time() - t0 < 10


def test_killed_training_process_is_resumed_automatically(live):
    job = live.submit("kill-9", {**TINY, "max_steps": 60, "log_interval": 1, "save_interval": 10})
    live.wait_for(job["id"], lambda j: j["status"] == "running" and j["step"] >= 25, what="past a checkpoint")
    pids = training_processes(live.home, job["id"])
    # on CPU slots it trains at a lower priority than the portal's processes (settings.CPU_JOB_NICE, default 10)
    assert pids and {os.getpriority(os.PRIO_PROCESS, pid) for pid in pids} == {
        min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)}
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    done = live.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed", "interrupted"),
                         what="recovered")
    assert done["status"] == "succeeded" and done["auto_resumes"] == 1, done
    assert int(log_text(live, job["id"]).split("resumed from step ")[1].split()[0]) >= 20


def test_a_training_process_stopped_from_outside_resumes_from_the_checkpoint_it_wrote(live):
    """A SIGTERM the portal did not send (an admin's kill; Slurm preempting a run, as only sacct can tell it once
    scontrol has forgotten the job): the engine checkpoints and exits 143; the job resumes from that checkpoint
    instead of failing with "exited with code 143"."""
    job = live.submit("kill-term", {**TINY, "max_steps": 60, "log_interval": 1, "save_interval": 1000})
    live.wait_for(job["id"], lambda j: j["status"] == "running" and j["step"] >= 5, what="training")
    for pid in training_processes(live.home, job["id"]):
        os.kill(pid, signal.SIGTERM)
    done = live.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed", "interrupted"),
                         what="recovered")
    assert done["status"] == "succeeded" and done["auto_resumes"] == 1, done
    log = log_text(live, job["id"])
    stopped = int(log.split("stopped by signal at step ")[1].split(";")[0])
    assert stopped >= 5 and int(log.split("resumed from step ")[1].split()[0]) == stopped  # no save_interval met


def test_time_limit_fails_the_job_and_retry_continues(live):
    status, datasets = live.request("GET", "/api/v1/datasets")
    ds = next(d for d in datasets["datasets"] if d["name"] == "demo-pretrain")
    status, job = live.request("POST", "/api/v1/jobs", {"name": "limited", "stage": "pretrain", "dataset": ds["id"],
                                                         "config": {**LONG, "save_interval": 5}, "time_limit_s": 6})
    assert status == 201 and job["time_limit_s"] == 6
    failed = live.wait_for(job["id"], lambda j: j["status"] == "failed", what="time limit")
    assert "time limit of 6 s" in failed["error"]
    status, body = live.request("POST", f"/api/v1/jobs/{job['id']}/retry")
    assert status == 202 and body["status"] == "queued"
    live.wait_for(job["id"], lambda j: j["status"] == "running", what="running again")
    live.request("POST", f"/api/v1/jobs/{job['id']}/cancel")
    live.wait_for(job["id"], lambda j: j["status"] == "cancelled", timeout=20, what="cancelled")


def test_a_model_larger_than_the_machine_is_refused_before_it_starts(live):
    """A model far too large for the machine (a 2 TiB embedding) on CPU slots: refused at submission, from the
    machine's RAM (a CPU slot's memory), not left to fail for lack of memory once started (the engine's own
    out-of-memory report: training/tests/test_pretrain.py)."""
    status, datasets = live.request("GET", "/api/v1/datasets")
    ds = next(d for d in datasets["datasets"] if d["name"] == "demo-pretrain")
    status, body = live.request("POST", "/api/v1/jobs", {"name": "too-big", "stage": "pretrain", "dataset": ds["id"],
                                                          "config": {**TINY, "vocab_size": 2**33, "max_steps": 1}})
    assert status == 400 and "can never start" in body["error"] and "GiB" in body["error"], body
    devices = live.request("GET", "/api/v1/devices")[1]["devices"]
    assert all(d["memory_total"] for d in devices)


def words_corpus(lines: int) -> bytes:
    """Pretraining text of many distinct words: a tokenizer trains on 10,000 such lines for a few seconds."""
    import json
    import random

    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(50000)]
    return "".join(json.dumps({"text": " ".join(rng.choices(words, k=120))}) + "\n" for _ in range(lines)).encode()


@pytest.mark.slow
def test_kill_9_of_serve_then_restart_resumes_the_job(tmp_path):
    """kill -9 of serve's process group: nothing of that portal lives on (web servers, the job runners, the training
    process) within 5 s — no orphan runner may resume a job without its portal — and the job resumes from its last
    checkpoint once serve starts again. Background work the kill stopped (a tokenizer's training) says so after the
    restart instead of "training" forever."""
    node = LiveNode(tmp_path / "home")
    (tmp_path / "home").mkdir()
    node.own_group = True
    node.start()
    try:
        status, corpus = node.upload("/api/v1/datasets", {"name": "words", "kind": "pretrain"},
                                     {"file": ("words.jsonl", words_corpus(10_000))})
        assert status == 201, corpus
        job = node.submit("survivor", {**TINY, "max_steps": 60, "log_interval": 1, "save_interval": 10})
        node.wait_for(job["id"], lambda j: j["status"] == "running" and j["step"] >= 25, what="past a checkpoint")
        assert training_processes(node.home, job["id"])
        status, tok = node.request("POST", "/api/v1/tokenizers/train", {"name": "words", "dataset": corpus["id"]})
        assert status == 202, tok
        deadline = time.time() + 60  # the background worker made the tokenizer's folder: it trains
        while not any((node.home / "tokenizers").glob("*/")) and time.time() < deadline:
            time.sleep(0.02)
        assert not any((node.home / "tokenizers").glob("*/tokenizer.json")), "trained before the kill"
        os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait()
        deadline = time.time() + 5
        while processes_of(node.home) and time.time() < deadline:
            time.sleep(0.1)
        assert processes_of(node.home) == [], "a killed serve must leave nothing running"
        node.start()  # the new serve requeues the job
        done = node.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed", "interrupted"),
                             what="finished after restart")
        assert done["status"] == "succeeded", done
        assert int(log_text(node, job["id"]).split("resumed from step ")[1].split()[0]) >= 20
        tok = node.request("GET", f"/api/v1/tokenizers/{tok['id']}")[1]
        assert tok["status"] == "failed" and tok["error"].endswith("train it again"), tok
    finally:
        rc = node.stop()
        node.drop_database()
    assert rc == 0, node.log()
    deadline = time.time() + 10
    while processes_of(node.home) and time.time() < deadline:
        time.sleep(0.3)
    assert processes_of(node.home) == []


@pytest.mark.slow
def test_background_work_never_holds_up_a_jobs_start_nor_an_uploads_check(tmp_path):
    """Tokenizer trainings (minutes each on a real corpus) shared the job runners' queue and workers: with a flood of
    them queued, a job submitted next waited until the queue reached its start token, the device idle meanwhile.
    They run in a cluster of their own now, one at a time, and the job starts while they are still queued. An
    upload's check waited behind them in that cluster (behind a 9 GB file's statistics, an hour): the checks have a
    cluster of their own too, and a large file is a dataset while the tokenizers still train."""
    node = LiveNode(tmp_path / "home")
    (tmp_path / "home").mkdir()
    node.env.update(MINICLOUD_DEVICES="cpu:1", MINICLOUD_TOKENIZER_TRAININGS_PER_USER="3")
    node.start()
    try:
        status, corpus = node.upload("/api/v1/datasets", {"name": "words", "kind": "pretrain"},
                                     {"file": ("words.jsonl", words_corpus(6_000))})
        assert status == 201, corpus
        tokenizers = []
        for n in range(3):
            status, tok = node.request("POST", "/api/v1/tokenizers/train", {"name": f"w{n}", "dataset": corpus["id"]})
            assert status == 202, tok
            tokenizers.append(tok["id"])
        training = lambda: [t for t in tokenizers  # noqa: E731
                            if node.request("GET", f"/api/v1/tokenizers/{t}")[1]["status"] == "training"]
        job = node.submit("not-behind", {**TINY, "max_steps": 3})
        big = tmp_path / "big.jsonl"  # over the node's MINICLOUD_VALIDATE_INLINE_BYTES: checked in the background
        big.write_bytes(words_corpus(300))
        status, upload = node.upload("/api/v1/datasets", {"name": "big", "kind": "pretrain",
                                                          "server_path": str(big)}, {})
        assert status == 202 and upload["status"] == "checking", upload
        node.wait_for(job["id"], lambda j: j["status"] != "queued", timeout=60, what="the job to start")
        assert len(training()) >= 2, f"the job started only once {3 - len(training())} of 3 tokenizers had trained"
        deadline = time.time() + 60
        while (upload := node.request("GET", f"/api/v1/uploads/{upload['id']}")[1])["status"] == "checking":
            assert time.time() < deadline, f"the upload is still being checked: {upload}\n{node.log()}"
            time.sleep(0.2)
        assert upload["status"] == "done", upload
        assert len(training()) >= 2, f"the upload was checked only once {3 - len(training())} of 3 tokenizers trained"
        assert node.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed"),
                             what="the job to end")["status"] == "succeeded"
    finally:
        rc = node.stop()
        node.drop_database()
    assert rc == 0, node.log()


def test_a_two_device_job_runs_ddp_under_torchrun(live):
    """Gang allocation on the node's two CPU slots: torchrun starts two gloo ranks; rank 0 alone reports."""
    job = live.submit("pair", {**TINY, "max_steps": 6, "log_interval": 2}, gpus=2)
    done = live.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed"), timeout=180, what="finished")
    assert done["status"] == "succeeded", done["error"]
    assert sorted(done["devices"]) == [0, 1]
    text = log_text(live, job["id"])
    # Two ranks of 16 rows × 64 tokens per step; one line per step (rank 0 alone reports).
    assert "step 1/6 (epoch 1)" in text and re.search(r"tokens: 2048\b", text) and text.count("step 6/6") == 1, \
        text[-3000:]


@pytest.mark.slow
def test_fifty_queued_jobs_from_ten_users_drain_in_fair_order(tmp_path):
    """Ten users queue five jobs each while no worker runs (the first user all five before anyone else); then the
    real `serve` drains the queue on its two CPU slots: everyone's first job starts before anyone's second, and every
    later start goes to a user with no running job and the least device time used so far (fair share: running jobs,
    then recent device use, then age). Rounds need not stay whole after the first: a user whose jobs happened to run
    longer (the two first ones start cold) rightly waits behind one whose jobs ran shorter."""
    (tmp_path / "home").mkdir()
    node = LiveNode(tmp_path / "home")
    node.args = ["--web"]  # a web node alone: nothing is claimed while the queue fills
    node.start()
    try:
        csv = tmp_path / "users.csv"
        csv.write_text("username,name,email,group\n" + "".join(f"user{i},,,\n" for i in range(10)))
        passwords = dict(line.split(",")[:2] for line in node.manage("import_users", str(csv)).splitlines()[1:])
        tokens = {f"user{i}": node.token_for(f"user{i}", passwords[f"user{i}"]) for i in range(10)}
        ids = [node.submit(f"{name}-{k}", {**TINY, "max_steps": 1}, token=token)["id"]
               for name, token in tokens.items() for k in range(5)]
        assert all(node.job(pk)["status"] == "queued" for pk in ids)
        node.stop()
        node.args = []  # web and worker: the queue drains
        node.start()
        jobs = [node.wait_for(pk, lambda j: j["status"] in ("succeeded", "failed"), timeout=600, what="finished")
                for pk in ids]
    finally:
        rc = node.stop()
        node.drop_database()
    assert rc == 0, node.log()
    assert [j["status"] for j in jobs] == ["succeeded"] * 50, [j["error"] for j in jobs if j["status"] != "succeeded"]
    runs = sorted((datetime.fromisoformat(j["started_at"]).timestamp(), datetime.fromisoformat(j["finished_at"])
                   .timestamp(), j["name"].split("-")[0]) for j in jobs)
    starts = [owner for _, _, owner in runs]
    assert sorted(starts[:10]) == sorted(tokens), starts
    assert unfair_starts(runs) == [], starts
    # both slots train from the start: the second job starts while the first still runs (the restart's one claim
    # token is handed on by the runner that took it), and so on to the end
    assert runs[1][0] < runs[0][1], runs[:2]
    assert busy_share(runs, slots=2) > 0.8, busy_share(runs, slots=2)


def busy_share(runs, slots):
    """The share of the slots' time from the first start to the last end that ``runs`` ((start, end, owner)) used."""
    span = max(e for _, e, _ in runs) - min(s for s, _, _ in runs)
    return sum(e - s for s, e, _ in runs) / (span * slots)


def unfair_starts(runs, slack=1.0):
    """The starts in ``runs`` ((start, end, owner), ordered by start) that went to an owner who had used more device
    time than another owner then waiting with no running job. ``slack`` seconds absorb the time between the
    scheduler's reading and the recorded start (and the 24-hour decay, a few milliseconds here)."""
    unfair = []
    for t, _, owner in runs:
        used = {o: 0.0 for _, _, o in runs}
        busy, waiting = set(), set()
        for s, e, o in runs:
            if s < t:
                used[o] += min(e, t) - s
            if s < t and e > t - slack:
                busy.add(o)
            if s >= t:
                waiting.add(o)
        least = min((used[o] for o in waiting - busy), default=used[owner])
        if used[owner] > least + slack:
            unfair.append((owner, round(used[owner], 1), round(least, 1)))
    return unfair
