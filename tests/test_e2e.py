"""End to end against the real `serve`: submit through the API, train, read metrics, download, cancel."""
import http.client
import io
import os
import signal
import time
import zipfile

import pytest
import torch
from transformers import Qwen3ForCausalLM

from training.model import hf_config

from .live import TINY, node_processes, training_processes

pytestmark = pytest.mark.e2e


def test_pretrain_job_end_to_end(live):
    job = live.submit("e2e-pretrain", {**TINY, "max_steps": 40})
    assert job["status"] == "queued"
    done = live.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"), what="finish")
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["node"] and done["devices"] in ([0], [1])
    all_points = live.request("GET", f"/api/v1/jobs/{job['id']}/metrics?after=0")[1]["points"]
    assert [p["seq"] for p in all_points] == list(range(1, len(all_points) + 1))
    assert "eval_loss" in all_points[-1]["values"]
    points = [p for p in all_points if "loss" in p["values"]]
    steps = [p["step"] for p in points]
    assert steps == sorted(steps) and steps[-1] == 40
    assert points[-1]["values"]["loss"] < 0.8 * points[0]["values"]["loss"]
    later = live.request("GET", f"/api/v1/jobs/{job['id']}/metrics?after={all_points[-3]['seq']}")[1]["points"]
    assert [p["seq"] for p in later] == [p["seq"] for p in all_points[-2:]]
    status, logs = live.request("GET", f"/api/v1/jobs/{job['id']}/logs?after=0")
    assert status == 200 and "done after 40 steps" in logs["text"]

    model_id = done["output_model"]
    status, model = live.request("GET", f"/api/v1/models/{model_id}")
    assert status == 200 and model["lineage"]["job"] == job["id"] and model["parameters"] > 0
    status, raw = live.request("GET", f"/api/v1/models/{model_id}/download?format=pth", raw=True)
    assert status == 200
    sd = torch.load(io.BytesIO(raw), weights_only=True)
    qwen = Qwen3ForCausalLM(hf_config(model["config"]))
    qwen.load_state_dict(sd, strict=True)
    assert live.request("GET", f"/api/v1/models/{model_id}/download?format=onnx")[0] == 400
    status, raw = live.request("GET", f"/api/v1/models/{model_id}/download?format=gguf&type=q8_0", raw=True)
    assert status == 200 and "Modelfile" in zipfile.ZipFile(io.BytesIO(raw)).namelist()  # verified in llama.cpp
    checks = live.request("GET", f"/api/v1/models/{model_id}")[1]["verifications"]
    assert checks["gguf"]["ok"] and checks["gguf_q8_0"]["tokens"] > 0


def test_cancel_a_running_job_kills_the_process(live):
    job = live.submit("e2e-cancel", {**TINY, "max_steps": 100000, "log_interval": 1})
    live.wait_for(job["id"], lambda j: j["status"] == "running" and j["step"] > 0, what="running with steps")
    spec = (live.home, job["id"])
    assert training_processes(*spec), "the training child should be running"
    t0 = time.time()
    status, body = live.request("POST", f"/api/v1/jobs/{job['id']}/cancel")
    assert status == 202, body
    live.wait_for(job["id"], lambda j: j["status"] == "cancelled", timeout=15, what="cancelled")
    while training_processes(*spec) and time.time() - t0 < 10:
        time.sleep(0.2)
    assert not training_processes(*spec), "the training child must be gone within 10 s"
    assert time.time() - t0 < 10
    assert live.request("POST", f"/api/v1/jobs/{job['id']}/cancel")[0] == 409


def test_devices_health_and_errors(live):
    status, body = live.request("GET", "/api/v1/devices")
    assert status == 200 and [d["kind"] for d in body["devices"]] == ["cpu", "cpu"]
    assert live.request("GET", "/api/v1/health", auth=False)[1]["status"] == "ok"
    assert live.request("GET", "/api/v1/jobs", auth=False)[0] == 401
    assert live.request("GET", "/api/v1/jobs/999999")[0] == 404
    status, body = live.request("POST", "/api/v1/jobs", {"name": "x", "stage": "pretrain", "dataset": 1,
                                                         "config": {"hidden_size": "big"}})
    assert status == 400 and body["details"]["field"] == "config.hidden_size"


def test_a_large_files_statistics_tokenise_it_for_its_first_job(live, tmp_path):
    from training.demo_data import write_sized

    write_sized(tmp_path / "sft.jsonl", "sft", 4_300_000)  # over MINICLOUD_STATS_TOKEN_CACHE_MB (4)
    status, ds = live.upload("/api/v1/datasets", {"name": "e2e-stats", "kind": "sft"},
                             {"file": ("sft.jsonl", (tmp_path / "sft.jsonl").read_bytes())})
    assert status == 201, ds
    deadline = time.time() + 180
    while (body := live.request("GET", f"/api/v1/datasets/{ds['id']}")[1])["stats_status"] not in ("done", "failed"):
        assert time.time() < deadline, body
        time.sleep(0.5)
    stats = body["stats"]
    assert body["stats_status"] == "done" and stats["from_token_cache"] is True, body  # the engine's cache, exact
    assert stats["records"] == ds["records"]
    status, job = live.request("POST", "/api/v1/jobs", {"name": "e2e-stats", "stage": "sft", "dataset": ds["id"],
                                                        "config": {**TINY, "max_steps": 2}})
    assert status == 201, job
    done = live.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"), what="finish")
    assert done["status"] == "succeeded", done
    log = live.request("GET", f"/api/v1/jobs/{job['id']}/logs?after=0")[1]["text"]
    assert "data: reusing the token cache" in log and "tokenised" not in log  # built by the statistics


@pytest.mark.slow
def test_pretrain_sft_lora_chain_merges_downloads_and_chats_through_the_openai_client(live, tmp_path):
    import json
    import zipfile

    from openai import OpenAI, RateLimitError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = live.submit("e2e-base", {**TINY, "max_steps": 10})
    base = live.wait_for(base["id"], lambda j: j["status"] in ("succeeded", "failed"), what="base finished")
    assert base["status"] == "succeeded", base
    sft_data = next(d for d in live.request("GET", "/api/v1/datasets")[1]["datasets"] if d["name"] == "demo-sft")
    parent = base
    for stage in ("sft", "lora"):
        status, job = live.request("POST", "/api/v1/jobs", {
            "name": f"e2e-{stage}", "stage": stage, "dataset": sft_data["id"], "base_model": parent["output_model"],
            "config": {"batch_size": 8, "max_seq_len": 64, "max_steps": 10, "log_interval": 2,
                       "learning_rate": 1e-3}})
        assert status == 201, job
        done = live.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed"), what=f"{stage} finished")
        assert done["status"] == "succeeded", done
        parent = done
    status, model = live.request("GET", f"/api/v1/models/{parent['output_model']}")
    assert model["formats"] == ["pth", "hf", "gguf", "lora"] and model["stage"] == "lora"
    sft_model = live.request("GET", f"/api/v1/models/{model['lineage']['parent']}")[1]
    assert sft_model["stage"] == "sft" and sft_model["lineage"]["parent"] == base["output_model"]
    status, raw = live.request("GET", f"/api/v1/models/{model['id']}/download?format=lora", raw=True)
    assert status == 200
    names = zipfile.ZipFile(io.BytesIO(raw)).namelist()
    assert any(n.endswith("_lora.pth") for n in names) and "adapter/adapter_config.json" in names

    status, merged = live.request("POST", f"/api/v1/models/{model['id']}/merge")
    assert status == 201 and merged["lineage"]["parent"] == model["id"], merged
    assert merged["verifications"]["merge"]["ok"]
    status, raw = live.request("GET", f"/api/v1/models/{merged['id']}/download?format=hf", raw=True)
    assert status == 200
    zipfile.ZipFile(io.BytesIO(raw)).extractall(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert hf.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 2

    client = OpenAI(base_url=f"{live.url}/v1", api_key=live.token)
    name = f"{merged['name']}:v{merged['version']}"
    assert name in [m.id for m in client.models.list().data]
    chunks = list(client.chat.completions.create(model=name, messages=[{"role": "user", "content": "What is 2+3?"}],
                                                 stream=True, max_tokens=8, temperature=0))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason in ("stop", "length")
    thinking = list(client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Why?"}], stream=True, max_tokens=6, temperature=0.7,
        seed=1, extra_body={"enable_thinking": True}))
    parts = [(c.choices[0].delta.model_extra or {}).get("reasoning_content") or c.choices[0].delta.content or ""
             for c in thinking if c.choices]
    assert "".join(parts)
    whole = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens <= 4
    # the node's one generation worker answered them all, whichever web process took each request
    workers = [pid for pid, cmd in node_processes(live.home).items() if " chat-worker --listen " in cmd]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)  # the OOM killer, say: serve starts another, the next chat is answered
    again = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert again.choices[0].message.role == "assistant" and 0 < again.usage.completion_tokens <= 4
    assert [pid for pid, cmd in node_processes(live.home).items() if " chat-worker --listen " in cmd] not in (
        [], workers) and live.proc.poll() is None
    # a member's fifth chat while four stream, whichever web processes took them, is refused before any stream
    # starts: 429 in OpenAI's shape (the worker counts the member's chats over the node)
    streams = []
    for n in range(4):
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps({  # the end token banned: none ends before it is cut
            "model": name, "stream": True, "max_tokens": 4000, "logit_bias": {"2": -100},
            "messages": [{"role": "user", "content": f"{n}"}]}),
            {"Authorization": f"Bearer {live.token}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        streams.append(conn)
    with pytest.raises(RateLimitError) as refused:
        client.with_options(max_retries=0).chat.completions.create(
            model=name, messages=[{"role": "user", "content": "one more"}], max_tokens=4)
    assert "4" in refused.value.message
    for conn in streams:  # their clients go: the chats end at the worker
        conn.close()

    rlaif = next(d for d in live.request("GET", "/api/v1/datasets")[1]["datasets"] if d["name"] == "demo-rlaif")
    for target in (sft_model["id"], merged["id"]):
        status, job = live.request("POST", f"/api/v1/models/{target}/evaluations", {
            "dataset": rlaif["id"], "config": {"eval_records": 12, "accuracy_tasks": 6, "max_gen_len": 12}})
        assert status == 201 and job["stage"] == "eval", job
        done = live.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed"), what="evaluated")
        assert done["status"] == "succeeded" and done["output_model"] is None, done
    evals = live.request("GET", f"/api/v1/models/{merged['id']}")[1]["evaluations"]
    assert len(evals) == 1 and evals[0]["dataset"] == rlaif["id"]
    assert {"exact_accuracy", "numeric_accuracy", "demo_accuracy"} <= set(evals[0]["metrics"])
    status, bad = live.request("POST", f"/api/v1/models/{merged['id']}/evaluations",
                               {"dataset": rlaif["id"], "config": {"learning_rate": 1}})
    assert status == 400 and bad["details"]["field"] == "config.learning_rate"
