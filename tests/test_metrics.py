"""Prometheus: /metrics behind a scrape token, the portal's series from the database, and Debian's real prometheus
scraping a running portal."""
import datetime
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from django.utils import timezone

from jobs.models import Dataset, DeviceSample, Job, MetricPoint, Node
from models_registry.models import Tokenizer

from .live import TINY, free_port

GiB = 1024 ** 3


def _series(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
    return out


def test_metrics_need_the_scrape_token_and_show_queue_jobs_devices_and_throughput(client, user, settings):
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics").status_code == 404
    settings.METRICS_TOKEN = "s3cret"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    Node.objects.create(name="gpu1", heartbeat_at=timezone.now(), devices=[
        {"index": 0, "kind": "cuda", "name": "H100", "memory_total": 80 * GiB},
        {"index": 1, "kind": "cuda", "name": "H100", "memory_total": 80 * GiB}])
    DeviceSample.objects.create(node="gpu1", readings=[[0, 87, 30 * GiB, 1], [1, 0, 1 * GiB, 0]])
    common = dict(owner=user, dataset=Dataset.objects.get(name="demo-pretrain"),
                  tokenizer=Tokenizer.objects.get(name="demo-tokenizer"))
    running = Job.objects.create(name="r", stage="pretrain", status="running", node="gpu1", devices=[0],
                                 memory_estimate=20 * GiB, **common)
    MetricPoint.objects.create(job=running, seq=1, step=10, time=1.0, values={"loss": 5.0, "tokens_per_s": 1234.5})
    MetricPoint.objects.create(job=running, seq=2, step=10, time=2.0, values={"eval_loss": 5.1})
    Job.objects.create(name="q", stage="sft", created_at=timezone.now() - datetime.timedelta(seconds=120), **common)
    Job.objects.create(name="done", stage="sft", status="succeeded", **common)
    Job.objects.create(name="bad", stage="sft", status="failed", **common)
    client.force_login(user)
    client.get("/queue/")  # a request for the latency histogram
    r = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret")
    assert r.status_code == 200 and r["Content-Type"].startswith("text/plain; version=")
    s = _series(r.content.decode())
    assert s['minicloud_queue_jobs{"stage": "sft"}'] == 1
    assert 119 < s['minicloud_queue_wait_seconds_max{"stage": "sft"}'] < 200
    assert s['minicloud_jobs{"state": "running"}'] == 1 and s['minicloud_jobs{"state": "paused"}'] == 0
    assert s['minicloud_job_outcomes_total{"outcome": "succeeded", "stage": "sft"}'] == 1
    assert s['minicloud_job_outcomes_total{"outcome": "failed", "stage": "sft"}'] == 1
    dev0 = '{"device": "0", "kind": "cuda", "node": "gpu1"}'
    assert s["minicloud_device_running_jobs" + dev0] == 1
    assert s["minicloud_device_job_memory_bytes" + dev0] == 20 * GiB
    assert s["minicloud_device_utilization_percent" + dev0] == 87
    assert s["minicloud_device_memory_used_bytes" + dev0] == 30 * GiB
    assert s['minicloud_device_running_jobs{"device": "1", "kind": "cuda", "node": "gpu1"}'] == 0
    key = json.dumps({"job": str(running.pk), "node": "gpu1", "owner": user.username, "stage": "pretrain"},
                     sort_keys=True)
    assert s["minicloud_job_tokens_per_second" + key] == 1234.5
    assert any(k.startswith("minicloud_http_request_duration_seconds_count") and '"route": "/queue/"' in k
               for k in s)


def test_metrics_show_the_chats_at_the_nodes_generation_worker(client, db, settings, tmp_path):
    """A teacher's Grafana sees the class's chats: generating and waiting for their turn at the node's worker (asked
    on its socket when scraped), and how many users hold them. A process with no node worker shows none."""
    import socket
    import sys

    from models_registry.inference import node_socket, worker_env
    from training.model import build_model, save_pth
    from training.spec import model_config, resolve_config

    settings.METRICS_TOKEN = "s3cret"
    auth = {"HTTP_AUTHORIZATION": "Bearer s3cret"}
    assert not any(k.startswith("minicloud_chat") for k in _series(client.get("/metrics", **auth).content.decode()))
    pth, mcfg = tmp_path / "tiny.pth", model_config(resolve_config("pretrain", dict(TINY)))
    save_pth(build_model(mcfg), pth)
    model = {"path": str(pth), "config": mcfg, "tokenizer": Tokenizer.objects.get(name="demo-tokenizer").path}
    settings.CHAT_SOCKET = node_socket()
    worker = subprocess.Popen([sys.executable, "-m", "training", "chat-worker", "--listen", settings.CHAT_SOCKET,
                               "--slots", "1"], cwd=settings.BASE_DIR, env=worker_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:  # a web process of the node: two members' chats, one turn at a time
            try:
                web = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                web.connect("\0" + settings.CHAT_SOCKET)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        lines = web.makefile("rwb")
        for rid, who in (("a", "1"), ("b", "2")):
            lines.write(json.dumps({"id": rid, "who": who, "model": model, "max_new_tokens": 4000, "temperature": 0,
                                    "messages": [{"role": "user", "content": "Hi"}]}).encode() + b"\n")
        lines.flush()
        places = {}
        while len(places) < 2:
            msg = json.loads(lines.readline())
            if "queued" in msg:
                places.setdefault(msg["id"], msg["queued"])
        assert places == {"a": 0, "b": 1}
        s = _series(client.get("/metrics", **auth).content.decode())
        node = settings.NODE_NAME
        assert s[json.dumps({"node": node, "state": "generating"}, sort_keys=True).join(("minicloud_chats", ""))] == 1
        assert s[json.dumps({"node": node, "state": "waiting"}, sort_keys=True).join(("minicloud_chats", ""))] == 1
        assert s["minicloud_chat_users" + json.dumps({"node": node})] == 2
        lines.close()
        web.close()  # the web process goes: its chats end, and the worker goes on
        deadline = time.monotonic() + 60
        while (s := _series(client.get("/metrics", **auth).content.decode())).get(
                "minicloud_chat_models" + json.dumps({"node": node})) != 1:  # loaded beside the turns
            assert time.monotonic() < deadline, s
            time.sleep(0.2)
        assert s["minicloud_chat_model_loads_total" + json.dumps({"node": node})] == 1  # once for both members
        time.sleep(1)
        s = _series(client.get("/metrics", **auth).content.decode())
        assert s[json.dumps({"node": node, "state": "generating"}, sort_keys=True).join(("minicloud_chats", ""))] == 0
    finally:
        worker.stdin.close()
        assert worker.wait(timeout=30) == 0


def _prometheus_query(port: int, query: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())["data"]["result"]


@pytest.mark.slow
def test_debians_prometheus_scrapes_a_running_portal(live, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("Debian's prometheus is needed (.ci/run installs it: apt-get install prometheus)")
    job = live.submit("scraped", {**TINY, "max_steps": 4})
    live.wait_for(job["id"], lambda j: j["status"] == "succeeded", what="the job to succeed")
    port = free_port()
    host = urllib.parse.urlsplit(live.url).netloc
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: minicloud\n"
        "    metrics_path: /metrics\n"
        f"    authorization: {{credentials: {live.env['MINICLOUD_METRICS_TOKEN']}}}\n"
        f"    static_configs: [{{targets: ['{host}']}}]\n")
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    try:
        deadline, result = time.time() + 60, []
        while time.time() < deadline:
            try:
                result = _prometheus_query(port, 'minicloud_job_outcomes_total{outcome="succeeded"}')
                if result:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert result, (tmp_path / "prometheus.log").read_text()[-3000:]
        assert sum(float(r["value"][1]) for r in result) >= 1
        up = _prometheus_query(port, 'up{job="minicloud"}')
        assert up and up[0]["value"][1] == "1"
        assert _prometheus_query(port, 'minicloud_jobs{state="succeeded"}')
        latency = _prometheus_query(port, "sum(minicloud_http_request_duration_seconds_count)")
        assert latency and float(latency[0]["value"][1]) > 0  # summed over the web processes
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_grafana_dashboard_queries_only_series_the_portal_exports(db):
    import re
    from pathlib import Path

    from jobs.services import exposition

    dash = json.loads((Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "minicloud.json").read_text())
    assert dash["uid"] == "minicloud" and len(dash["panels"]) >= 10
    exported = set(re.findall(r"^# TYPE (\w+) (\w+)", exposition().decode(), re.M))
    names = {n for n, _ in exported} | {f"{n}_{suffix}" for n, t in exported if t == "histogram"
                                        for suffix in ("bucket", "count", "sum")} | \
        {f"{n}_total" for n, t in exported if t == "counter"}
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used = set(re.findall(r"\b(minicloud_\w+)", target["expr"]))
            assert used and used <= names, (panel["title"], used - names)
