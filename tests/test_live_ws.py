"""The job WebSocket on the real daphne, fed by a training process that runs under the qcluster."""
import json

import pytest
from websockets.sync.client import connect

from .live import TINY

pytestmark = pytest.mark.e2e


def test_websocket_receives_live_metric_points(live):
    job = live.submit("e2e-ws", {**TINY, "max_steps": 100000, "log_interval": 1})
    uri = f"ws://127.0.0.1:{live.port}/ws/jobs/{job['id']}/?after=0&log_after=0"
    seqs, statuses = [], set()
    try:
        with connect(uri, origin=live.url, additional_headers={"Authorization": f"Bearer {live.token}"},
                     open_timeout=10) as ws:
            while len(seqs) < 6:
                try:
                    msg = json.loads(ws.recv(timeout=120))
                except Exception as exc:  # say what the server logged
                    raise AssertionError(f"{exc!r}\n{live.log()}") from exc
                statuses.add(msg["job"]["status"])
                seqs += [p["seq"] for p in msg["points"]]
                assert all(("loss" in p["values"] and "lr" in p["values"]) or "eval_loss" in p["values"]
                           for p in msg["points"])
    finally:
        live.request("POST", f"/api/v1/jobs/{job['id']}/cancel")
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert "running" in statuses


def test_websocket_refuses_without_credentials(live):
    job = live.submit("e2e-ws-auth", {**TINY, "max_steps": 2})
    uri = f"ws://127.0.0.1:{live.port}/ws/jobs/{job['id']}/"
    with pytest.raises(Exception):
        with connect(uri, origin=live.url, open_timeout=10) as ws:
            ws.recv(timeout=10)
