"""A real job's trackers, end to end: the supervisor of a running portal writes TensorBoard event files whose loss
series is the job's own, `tensorboard --logdir $MINICLOUD_HOME/runs` serves it, and a W&B offline run holds it too."""
import json
import subprocess
import sys
import time
import urllib.request

import pytest

from jobs.tests.test_trackers import tensorboard_series, wandb_history

from .live import TINY, free_port


@pytest.mark.slow
def test_a_jobs_loss_reaches_tensorboard_and_wandb(live):
    job = live.submit("tracked", {**TINY, "max_steps": 6}, trackers={"wandb": {"mode": "offline"}})
    live.wait_for(job["id"], lambda j: j["status"] == "succeeded", what="the job to succeed")
    status, body = live.request("GET", f"/api/v1/jobs/{job['id']}/metrics")
    expected = [(p["step"], p["values"]["loss"]) for p in body["points"] if "loss" in p["values"]]
    assert len(expected) >= 3
    run_dir = live.home / "runs" / f"job-{job['id']}"
    for got in (tensorboard_series(run_dir / "tensorboard"), wandb_history(run_dir)):
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5)
    status, log = live.request("GET", f"/api/v1/jobs/{job['id']}/logs")
    assert "W&B offline run" in json.dumps(log)
    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(live.home / "runs"),
                              "--port", str(port), "--host", "127.0.0.1"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline, runs = time.time() + 60, []
        while time.time() < deadline and f"job-{job['id']}/tensorboard" not in runs:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as resp:
                    runs = json.loads(resp.read())
            except OSError:
                pass
            time.sleep(1)
        assert f"job-{job['id']}/tensorboard" in runs, runs
    finally:
        board.terminate()
        board.wait(timeout=30)
