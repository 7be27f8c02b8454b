"""Model versions: verified formats, resumable downloads, import, LoRA merge, lineage, edits, deletes, visibility and
the OpenAI-compatible endpoints (non-streaming here; streaming runs against a real server in tests/test_models_live)."""
import io
import json
import zipfile

import pytest
import torch
from django.core.files.uploadedfile import SimpleUploadedFile

from models_registry import services
from models_registry.models import ModelVersion, Tokenizer

ARCH = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def _weights(path, seed=0, moe=False):
    from training.model import build_model, save_pth
    from training.spec import model_config, resolve_config

    torch.manual_seed(seed)
    mcfg = model_config(resolve_config("pretrain", {**ARCH, "use_moe": moe}))
    save_pth(build_model(mcfg), path)
    return mcfg


@pytest.fixture
def tiny(user, settings, db):
    """A tiny random model registered for ``user`` with the demo tokenizer."""
    path = settings.HOME / "w" / "tiny.pth"
    path.parent.mkdir(parents=True)
    mcfg = _weights(path)
    return ModelVersion.objects.create(name="tiny", owner=user, stage="pretrain", config=mcfg, path=str(path),
                                       parameters=1, size_bytes=path.stat().st_size,
                                       tokenizer=Tokenizer.objects.get(name="demo-tokenizer"))


def _zip_names(raw: bytes) -> list[str]:
    return zipfile.ZipFile(io.BytesIO(raw)).namelist()


def test_hf_download_is_converted_once_verified_and_loads_in_transformers(api, tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = api.get(f"/api/v1/models/{tiny.pk}/download?format=hf")
    assert r.status_code == 200 and r["Accept-Ranges"] == "bytes" and "_hf.zip" in r["Content-Disposition"]
    raw = b"".join(r.streaming_content)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "chat_template.jinja"} <= set(_zip_names(raw))
    zipfile.ZipFile(io.BytesIO(raw)).extractall(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert model.config.model_type == "qwen3" and tok.eos_token_id == 2
    check = api.get(f"/api/v1/models/{tiny.pk}").json()["verifications"]["hf"]
    assert check["ok"] and check["max_abs_diff"] <= check["tolerance"]
    cached = tiny.files_dir / "hf.zip"
    before = cached.stat().st_mtime_ns
    again = api.get(f"/api/v1/models/{tiny.pk}/download?format=hf")
    assert b"".join(again.streaming_content) == raw and cached.stat().st_mtime_ns == before


def test_downloads_resume_with_http_range(api, tiny):
    whole = b"".join(api.get(f"/api/v1/models/{tiny.pk}/download?format=pth").streaming_content)
    head = api.get(f"/api/v1/models/{tiny.pk}/download", HTTP_RANGE="bytes=0-99")
    assert head.status_code == 206 and head["Content-Range"] == f"bytes 0-99/{len(whole)}"
    tail = api.get(f"/api/v1/models/{tiny.pk}/download", HTTP_RANGE="bytes=100-")
    assert tail.status_code == 206 and b"".join(head.streaming_content) + b"".join(tail.streaming_content) == whole
    last = api.get(f"/api/v1/models/{tiny.pk}/download", HTTP_RANGE="bytes=-10")
    assert b"".join(last.streaming_content) == whole[-10:]
    assert api.get(f"/api/v1/models/{tiny.pk}/download", HTTP_RANGE=f"bytes={len(whole)}-").status_code == 416
    changed = api.get(f"/api/v1/models/{tiny.pk}/download", HTTP_RANGE="bytes=100-", HTTP_IF_RANGE='"old"')
    assert changed.status_code == 200  # the file changed since: the whole file again
    bad = api.get(f"/api/v1/models/{tiny.pk}/download?format=onnx")
    assert bad.status_code == 400 and bad.json()["details"]["field"] == "format"


def test_private_models_are_invisible_to_others_until_shared(client, tiny, other_user):
    from accounts.models import ApiToken

    bob = {"HTTP_AUTHORIZATION": f"Bearer {ApiToken.issue(other_user)[1]}"}
    assert client.get(f"/api/v1/models/{tiny.pk}/download", **bob).status_code == 404
    assert client.post("/v1/chat/completions", json.dumps({"model": tiny.pk, "messages": [
        {"role": "user", "content": "hi"}]}), content_type="application/json", **bob).status_code == 404
    tiny.is_public = True
    tiny.save()
    assert client.get(f"/api/v1/models/{tiny.pk}/download", **bob).status_code == 200
    assert client.delete(f"/api/v1/models/{tiny.pk}", **bob).status_code == 403


@pytest.mark.slow
def test_import_a_minimind_pth_with_its_config_and_generate(client, token, user, tmp_path):
    mcfg = _weights(tmp_path / "full_sft_64.pth", seed=3)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}

    def upload(name, config, path=tmp_path / "full_sft_64.pth", **headers):
        return client.post("/api/v1/models/import", {
            "name": name, "config": json.dumps(config),
            "file": SimpleUploadedFile(path.name, path.read_bytes())}, **auth, **headers)

    wrong = upload("wrong", {**ARCH, "hidden_size": 128})
    assert wrong.status_code == 400 and "shape mismatch" in wrong.json()["error"]
    # the engine's explanation, in the reader's language (what does not fit stays as the engine names it)
    wrong = upload("wrong", {**ARCH, "hidden_size": 128}, HTTP_ACCEPT_LANGUAGE="zh-hans").json()["error"]
    assert wrong.startswith("检查点与模型配置不符：") and "shape mismatch" in wrong
    missing = upload("noconfig", {})
    assert missing.status_code == 400 and missing.json()["details"]["field"] == "config"
    r = upload("my-sft", ARCH)
    assert r.status_code == 201, r.json()
    body = r.json()
    assert body["source"] == "import" and body["config"]["hidden_size"] == 64 and body["version"] == 1
    assert body["parameters"] > 0 and upload("my-sft", ARCH).json()["version"] == 2
    mv = ModelVersion.objects.get(pk=body["id"])
    a = torch.load(tmp_path / "full_sft_64.pth", weights_only=True)
    b = torch.load(mv.path, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a) and mcfg["vocab_size"] == body["config"]["vocab_size"]
    chat = client.post("/v1/chat/completions", json.dumps({"model": "my-sft:v1", "max_tokens": 5, "temperature": 0,
                                                             "messages": [{"role": "user", "content": "Hello"}]}),
                       content_type="application/json", **auth)
    assert chat.status_code == 200, chat.content
    out = chat.json()
    assert out["object"] == "chat.completion" and out["model"] == "my-sft:v1"
    assert out["usage"]["completion_tokens"] <= 5 and out["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.slow
def test_import_a_zipped_hf_folder_and_refuse_other_architectures(api, client, token, tiny, tmp_path):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    raw = b"".join(api.get(f"/api/v1/models/{tiny.pk}/download?format=hf").streaming_content)
    r = client.post("/api/v1/models/import", {"name": "from-hf", "file": SimpleUploadedFile("m.zip", raw)}, **auth)
    assert r.status_code == 201, r.json()
    body = r.json()
    assert body["verifications"]["pth"]["ok"] and body["lineage"]["tokenizer"] is not None
    assert Tokenizer.objects.get(pk=body["lineage"]["tokenizer"]).name == "from-hf-tokenizer"
    llama = io.BytesIO()
    with zipfile.ZipFile(llama, "w") as zf:
        zf.writestr("m/config.json", json.dumps({"model_type": "llama"}))
    r = client.post("/api/v1/models/import", {"name": "llama", "file": SimpleUploadedFile("l.zip",
                                                                                           llama.getvalue())}, **auth)
    assert r.status_code == 400 and "not a MiniMind/Qwen3 architecture" in r.json()["error"]
    r = client.post("/api/v1/models/import", {"name": "junk", "config": json.dumps(ARCH),
                                              "file": SimpleUploadedFile("x.pth", b"not a checkpoint")}, **auth)
    assert r.status_code == 400 and r.json()["error"]
    assert ModelVersion.objects.filter(name__in=["llama", "junk"]).count() == 0


def test_lora_merge_makes_a_verified_version_and_lineage_and_deletes_respect_references(api, user, tiny, settings):
    from training.model import save_state_dict

    gen = torch.Generator().manual_seed(1)
    lora = {}
    for i in range(2):
        for proj in ("q_proj", "o_proj"):
            lora[f"model.layers.{i}.self_attn.{proj}.lora.A.weight"] = (torch.randn(4, 64, generator=gen) * .1).half()
            lora[f"model.layers.{i}.self_attn.{proj}.lora.B.weight"] = (torch.randn(64, 4, generator=gen) * .1).half()
    lora_file = settings.HOME / "w" / "lora.pth"
    save_state_dict(lora, lora_file)
    adapter = ModelVersion.objects.create(name="tiny-lora", owner=user, stage="lora", parent=tiny, config=tiny.config,
                                          path=tiny.path, lora_path=str(lora_file), tokenizer=tiny.tokenizer)
    assert api.post(f"/api/v1/models/{tiny.pk}/merge").status_code == 409
    r = api.post(f"/api/v1/models/{adapter.pk}/merge")
    assert r.status_code == 201, r.json()
    merged = r.json()
    assert merged["source"] == "merge" and merged["lineage"]["parent"] == adapter.pk
    assert merged["verifications"]["merge"]["ok"] and merged["verifications"]["merge"]["adapted_modules"] == 4
    mv = ModelVersion.objects.get(pk=merged["id"])
    tree = services.lineage(mv, user)
    assert [m.pk for m in tree["ancestors"]] == [tiny.pk, adapter.pk]
    assert services.lineage(tiny, user)["descendants"][0]["children"][0]["model"].pk == mv.pk
    refused = api.delete(f"/api/v1/models/{adapter.pk}")
    assert refused.status_code == 409 and f"model #{mv.pk}" in refused.json()["details"]["references"][0]
    path = mv.pth_path
    assert path.exists() and api.delete(f"/api/v1/models/{mv.pk}").status_code == 200
    assert not path.exists() and not mv.files_dir.exists()


def test_notes_and_tags_and_the_model_pages_in_both_languages(api, client, user, tiny):
    r = api.patch(f"/api/v1/models/{tiny.pk}", {"notes": "first try", "tags": ["baseline", "week-1"]})
    assert r.status_code == 200 and r.json()["tags"] == ["baseline", "week-1"]
    assert api.patch(f"/api/v1/models/{tiny.pk}", {"tags": ["x" * 50]}).json()["details"]["field"] == "tags"
    client.force_login(user)
    page = client.get(f"/models/{tiny.pk}/").content.decode()
    assert "first try" in page and "baseline" in page and 'id="download-hf"' in page and 'id="lineage"' in page
    assert "baseline" in client.get("/models/?tag=baseline").content.decode()
    assert "tiny" not in client.get("/models/?tag=nothing").content.decode().split("<tbody>")[1]
    assert 'id="playground"' in client.get(f"/playground/?model={tiny.pk}").content.decode()
    zh = client.get(f"/models/{tiny.pk}/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "谱系" in zh and "下载" in zh
    assert '<span class="status">预训练</span>' in zh and "(预训练文本)" in zh  # its stage; the datasets' kinds
    assert "<td>预训练</td>" in client.get("/models/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "<td>Pretrain</td>" in client.get("/models/").content.decode()
    assert "导入模型" in client.get("/models/import/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    playground = client.get("/playground/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "对话" in playground and "在 &lt;think&gt; 块中推理" in playground  # shown as text, not swallowed as a tag
    words = json.loads(playground.split('<script id="pg-text" type="application/json">')[1].split("</script>")[0])
    assert words == {"reasoning": "推理过程", "you": "你", "error": "错误", "tokens": "个词元",
                     "empty": "（没有文字：模型立即结束，或只输出了空行）", "waiting": "排队等待中：前面还有 %(n)s 个"}, words
    from jobs.models import Dataset
    from models_registry.models import Evaluation

    ds = Dataset.objects.get(name="demo-rlaif")
    Evaluation.objects.create(model=tiny, dataset=ds, metrics={"exact_accuracy": 0.25, "demo_accuracy": 0.5})
    page = client.get(f"/models/{tiny.pk}/").content.decode()
    assert "exact_accuracy" in page and "0.25" in page and 'id="evaluate-form"' in page
    table = client.get(f"/models/evaluations/?dataset={ds.pk}").content.decode()
    assert "demo_accuracy" in table and "tiny v1" in table
    r = client.post(f"/models/{tiny.pk}/evaluate/", {"dataset": ds.pk, "eval_records": "5", "accuracy_tasks": "0"})
    from jobs.models import Job

    job = Job.objects.get(stage="eval")
    assert r.status_code == 302 and r["Location"] == f"/jobs/{job.pk}/" and job.base_model == tiny
    assert job.resolved_config["eval_records"] == 5 and job.resolved_config["hidden_size"] == 64
    r = client.post(f"/models/{tiny.pk}/edit/", {"notes": "edited", "tags": "a, b"})
    assert r.status_code == 302 and ModelVersion.objects.get(pk=tiny.pk).tags == ["a", "b"]


def test_openai_models_and_chat_errors_use_openai_shapes(client, token, tiny):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    listed = client.get("/v1/models", **auth).json()
    assert listed["object"] == "list" and listed["data"][0]["id"] == "tiny:v1"
    assert client.get("/v1/models").status_code == 401

    def chat(**body):
        return client.post("/v1/chat/completions", json.dumps(body), content_type="application/json", **auth)

    r = chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = chat(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = chat(model="tiny", messages=[])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    for seed in (1.5, "7", 2**64):
        r = chat(model="tiny", messages=[{"role": "user", "content": "hi"}], seed=seed)
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", seed
    for bias in ([5], {"a": 1}, {"-1": 1}, {"5": 101}, {"5": True}, {str(i): 1 for i in range(301)}, {"6400": -100}):
        r = chat(model="tiny", messages=[{"role": "user", "content": "hi"}], logit_bias=bias)
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", bias
    assert "0 to 6399" in r.json()["error"]["message"]  # the model's vocabulary
    bad = client.post("/v1/chat/completions", "{", content_type="application/json", **auth)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]


def test_a_reward_model_a_job_is_rewarded_by_is_not_deleted_under_it_and_one_no_job_uses_is(api, user, tiny,
                                                                                              tmp_path):
    """A PPO/GRPO job keeps its reward model's folder in its resolved config (no foreign key): deleting the model
    would leave a queued job to fail at its start with the folder gone."""
    from jobs import services as job_services
    from jobs.models import Dataset

    folder = tmp_path / "rm"
    folder.mkdir()
    reward = ModelVersion.objects.create(name="rm", owner=user, stage="reward", source="reward", path=str(folder),
                                         config={})
    (tmp_path / "rm2").mkdir()
    (tmp_path / "rm2" / "config.json").write_text("{}")
    unused = ModelVersion.objects.create(name="rm2", owner=user, stage="reward", source="reward",
                                         path=str(tmp_path / "rm2"), config={})
    from conftest import TINY

    job = job_services.submit_job(owner=user, name="rl", stage="grpo", dataset=Dataset.objects.filter(kind="rlaif")[0],
                                  base_model=tiny.pk, config={**TINY, "rewards": {"model": 1.0},
                                                              "reward_model": reward.pk})
    assert job.resolved_config["reward_model_path"] == str(folder)
    refused = api.delete(f"/api/v1/models/{reward.pk}")
    assert refused.status_code == 409 and f"job #{job.pk}" in refused.json()["details"]["references"][0]
    assert folder.exists() and api.delete(f"/api/v1/models/{unused.pk}").status_code == 200
    assert not (tmp_path / "rm2").exists()  # its folder went with it (it was a 500: unlink of a folder)


def test_the_chat_worker_takes_the_nodes_cores(monkeypatch, settings):
    """One worker generates every chat of the node: it gets the node's cores (at most 4), whatever the number of web
    processes (each had a worker of its own before, with its share)."""
    from jobs import devices
    from models_registry.inference import worker_env

    for cores, processes, threads in [(2, 3, "2"), (16, 4, "4"), (64, 4, "4"), (1, 2, "1")]:
        monkeypatch.setattr(devices, "cpu_cores", lambda: cores)
        settings.WEB_PROCESSES = processes
        env = worker_env()
        assert env["OMP_NUM_THREADS"] == threads and env["CUDA_VISIBLE_DEVICES"] == "", (cores, processes)


def _ask(tiny, **over):
    from models_registry.inference import model_entry

    return {"model": model_entry(tiny), "messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 2,
            "temperature": 0, "top_p": 1, "thinking": False, "seed": None, **over}


class _Chats:
    """Chats streamed through ``ChatWorker``s, each as an asyncio task: the places each heard (``queued``), the order
    in which they began to be answered (``started``), their text and how each ended."""

    def __init__(self):
        import asyncio

        self.queued, self.started, self.text, self.ended, self.heard = {}, [], {}, {}, {}
        self.tasks, self.asyncio = {}, asyncio

    def start(self, worker, request, who, name):
        self.heard[name] = self.asyncio.Event()
        self.tasks[name] = self.asyncio.create_task(self._run(worker, request, who, name))
        return self.heard[name].wait()  # the worker has it

    async def _run(self, worker, request, who, name):
        from minicloud.errors import ServiceError

        self.queued[name], self.text[name] = [], ""
        try:
            async for msg in worker.stream(request, who):
                self.heard[name].set()
                if "queued" in msg:
                    self.queued[name].append(msg["queued"])
                elif name not in self.started:
                    self.started.append(name)
                self.text[name] += msg.get("content", "")
                if msg.get("done"):
                    self.ended[name] = msg["finish_reason"]
        except ServiceError as exc:
            self.ended[name] = exc.status
        finally:
            self.heard[name].set()


def test_a_class_chats_take_turns_at_the_generation_worker(tiny, settings):
    """CHAT_BATCH generations run at once at the node's worker (here one). A member whose script sends several chats
    at once used to hold every classmate's behind all of them (first come, first served); now the next turn goes to
    the user whose last turn began longest ago, each waiting chat is told how many end before it starts, and a user's
    chats beyond CHAT_REQUESTS_PER_USER are refused (429) instead of queueing without bound. The real worker and
    model."""
    import asyncio

    from minicloud.errors import ServiceError
    from models_registry.inference import ChatWorker

    settings.CHAT_REQUESTS_PER_USER, settings.CHAT_BATCH = 3, 1
    chats = _Chats()

    async def main():
        worker = ChatWorker()
        try:
            # a long chat of member 1 holds the turn; then member 1 sends two more, then member 2 one
            await chats.start(worker, _ask(tiny, max_new_tokens=4000), 1, "a1")
            while "a1" not in chats.started:  # its model loaded (beside the turns), it streams
                await asyncio.sleep(0.01)
            for who, name in [(1, "a2"), (1, "a3"), (2, "b1")]:
                await chats.start(worker, _ask(tiny), who, name)
            with pytest.raises(ServiceError) as refused:  # a fourth of member 1's while three are held
                await anext(worker.stream(_ask(tiny), 1))
            assert refused.value.status == 429 and "already have 3 chats" in str(refused.value)
            assert (await worker.stats())["held"] == {"1": 3, "2": 1}
            chats.tasks["a1"].cancel()  # its client goes away: the turn goes on
            await asyncio.gather(*chats.tasks.values(), return_exceptions=True)
            stats = await worker.stats()
            assert {k: stats[k] for k in ("running", "waiting", "held", "generating")} == {
                "running": 0, "waiting": 0, "held": {}, "generating": 0}
            assert stats["models"] == stats["model_loads"] == 1  # one model for all four chats, loaded once
        finally:
            await worker.aclose()

    asyncio.run(main())
    assert chats.started == ["a1", "b1", "a2", "a3"]  # first come, first served: a1, a2, a3, b1
    # each waiting chat heard its place: b1 went ahead of member 1's others, then each moved up as turns ended
    assert chats.queued == {"a1": [0], "a2": [1, 2, 1, 0], "a3": [2, 3, 2, 1, 0], "b1": [1, 0]}


def test_a_class_chats_are_generated_together_at_the_worker(tiny, settings):
    """Up to CHAT_BATCH chats run at once at the worker, generated together (one forward pass per token for all):
    two classmates' replies stream side by side, a third waits until one of them ends (told so), and each greedy
    reply is the one it gets alone. Before, one chat generated at a time: b's reply began after a's ended."""
    import asyncio

    from models_registry.inference import ChatWorker

    settings.CHAT_BATCH = 2
    request = _ask(tiny, max_new_tokens=24)
    events = []

    async def chat(worker, who):
        text = ""
        async for msg in worker.stream(request, who):
            if msg.get("queued") != 0:
                events.append((who, "queued" if "queued" in msg else "done" if msg.get("done") else "delta"))
            text += msg.get("content", "")
        return text

    async def main():
        worker = ChatWorker()
        try:
            alone = await chat(worker, "alone")
            events.clear()
            a, b = asyncio.create_task(chat(worker, "a")), asyncio.create_task(chat(worker, "b"))
            await asyncio.sleep(0)  # a and b take the two turns, c waits
            together = await asyncio.gather(a, b, chat(worker, "c"))
            assert (await worker.stats())["held"] == {}
            return alone, together
        finally:
            await worker.aclose()

    alone, together = asyncio.run(main())
    assert alone and together == [alone, alone, alone]
    first_done = min(events.index(("a", "done")), events.index(("b", "done")))
    assert ("a", "delta") in events[:first_done] and ("b", "delta") in events[:first_done], events
    assert events.index(("c", "queued")) < first_done < events.index(("c", "delta")), events


def test_opening_the_playground_loads_its_model_before_the_first_question(client, user, tiny, settings):
    """The playground, opened with a model, asks the node's worker to load it (torch's import and the weights: the
    first question of a node, or of a model, waited for both); the question that follows finds it loaded. Without a
    node's worker (runserver, the tests) nothing is started for it."""
    import asyncio
    import subprocess
    import sys
    import time

    from models_registry.inference import ChatWorker, node_socket, worker_args, worker_env

    client.force_login(user)
    assert client.get(f"/playground/?model={tiny.pk}").status_code == 200  # no node's worker: no load
    settings.CHAT_SOCKET = node_socket()
    node = subprocess.Popen([sys.executable, "-m", "training", "chat-worker", "--listen", settings.CHAT_SOCKET,
                             *worker_args()], cwd=settings.BASE_DIR, env=worker_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert node.stdout.readline().startswith(b'{"ready"')  # listening

        async def stats():
            line = ChatWorker()
            try:
                return await line.stats()
            finally:
                await line.aclose()

        assert asyncio.run(stats())["model_loads"] == 0
        assert client.get(f"/playground/?model={tiny.pk}").status_code == 200
        deadline = time.monotonic() + 120
        while (now := asyncio.run(stats()))["models"] == 0:
            assert time.monotonic() < deadline, now
            time.sleep(0.2)

        async def ask():
            line = ChatWorker()
            try:
                return [m async for m in line.stream(_ask(tiny, max_new_tokens=3), user.pk)], await line.stats()
            finally:
                await line.aclose()

        answers, after = asyncio.run(ask())
        assert answers[-1]["done"] and after["model_loads"] == 1 and after["models"] == 1  # not loaded again
    finally:
        node.stdin.close()
        node.wait(timeout=30)


def test_the_web_processes_of_a_node_share_one_generation_worker(tiny, settings):
    """Every web process of a node speaks to the node's one worker (``serve`` starts it; the processes connect to its
    socket). Before, each web process had a worker of its own: a class's chats, most of which one process's accept
    loop takes, were generated CHAT_BATCH at a time there while the others idled (bench/chat_class.py). Now chats
    from two processes are generated in one batch, the turns and each user's bound count over the node, and a
    process that goes away ends its own chats only."""
    import asyncio
    import subprocess
    import sys

    from models_registry.inference import ChatWorker, node_socket, worker_args, worker_env

    settings.CHAT_REQUESTS_PER_USER, settings.CHAT_BATCH = 3, 4
    settings.CHAT_SOCKET = node_socket()
    node = subprocess.Popen([sys.executable, "-m", "training", "chat-worker", "--listen", settings.CHAT_SOCKET,
                             *worker_args()], cwd=settings.BASE_DIR, env=worker_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    chats = _Chats()

    async def main():
        one, two = ChatWorker(), ChatWorker()  # the lines of two web processes
        try:
            await chats.start(one, _ask(tiny, max_new_tokens=4000), 1, "one-long")
            await chats.start(one, _ask(tiny, max_new_tokens=24), 1, "one-short")
            await chats.start(two, _ask(tiny, max_new_tokens=24), 2, "two-short")
            await chats.start(two, _ask(tiny, max_new_tokens=4000), 1, "two-long")
            assert one.pid == two.pid == node.pid and one.proc is None  # the node's worker, not one of their own
            with pytest.raises(Exception) as refused:  # member 1 holds three over the two processes
                await anext(two.stream(_ask(tiny), 1))
            assert refused.value.status == 429
            await asyncio.gather(chats.tasks["one-short"], chats.tasks["two-short"])
            stats = await two.stats()
            assert stats["running"] == 2 and stats["held"] == {"1": 2}  # both long chats generate on
            await one.aclose()  # a web process goes away: its chat ends, the other's goes on
            await asyncio.sleep(0.5)
            stats = await two.stats()
            assert stats["running"] == 1 and not chats.tasks["two-long"].done(), stats
            chats.tasks["two-long"].cancel()
            await asyncio.gather(*chats.tasks.values(), return_exceptions=True)
            three = ChatWorker()  # a process that comes later is served by the same worker
            assert "".join([m.get("content", "") async for m in three.stream(_ask(tiny, max_new_tokens=24), 3)]) \
                == chats.text["one-short"] == chats.text["two-short"]
            assert three.pid == node.pid and (await three.stats())["held"] == {}
            await three.aclose()
        finally:
            await two.aclose()

    try:
        asyncio.run(main())
    finally:
        node.stdin.close()  # its parent goes: it ends
        assert node.wait(timeout=30) == 0
    assert chats.queued["two-short"] == [0] and chats.queued["two-long"] == [0]  # four slots: none waited
    # generated together: the short chats of both processes began while both long ones were running
    assert set(chats.started) == {"one-long", "one-short", "two-short", "two-long"}
    assert chats.ended["one-short"] == chats.ended["two-short"] == "length"


def test_a_refused_chat_says_when_to_try_again_as_openai_does():
    from minicloud.errors import ServiceError
    from models_registry.openai_api import _error_response

    r = _error_response(ServiceError("busy", status=429))
    body = json.loads(r.content)["error"]
    assert r.status_code == 429 and r["Retry-After"] == "5"
    assert body["type"] == "requests" and body["code"] == "rate_limit_exceeded" and body["message"] == "busy"


def test_a_conversation_longer_than_the_model_reads_is_refused_in_the_readers_language(client, token, tiny):
    """A prompt past the model's positions (a 10 MiB body is millions of tokens) used to be generated from anyway:
    noise from positions the model never learned, after a prefill that held the generation worker for minutes
    (160,000 tokens: 68 s on the CPU for a 64-wide model). The worker refuses it, explained."""
    assert tiny.config["max_position_embeddings"] == 32768
    body = json.dumps({"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hello " * 40000}]})
    r = client.post("/v1/chat/completions", body, content_type="application/json",
                    HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_ACCEPT_LANGUAGE="zh-hans")
    assert r.status_code == 400, r.content
    message = r.json()["error"]["message"]
    assert message.startswith("对话长 ") and "此模型最多读取 32768 个" in message, message


def test_a_generation_worker_killed_mid_chat_fails_that_chat_only(tiny, settings):
    """The worker killed while it generates (the OOM killer, say): that chat says so (503, try again), the chat
    waiting for its turn starts a new worker and is answered, and no turn is left held."""
    import asyncio
    import os
    import signal

    from minicloud.errors import ServiceError
    from models_registry.inference import ChatWorker, model_entry

    settings.CHAT_BATCH = 1  # "next" waits for its turn (its place is the dead worker's: it is sent to a new one)
    request = {"model": model_entry(tiny), "messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 200,
               "temperature": 0, "top_p": 1, "thinking": False, "seed": None}
    outcome = {}

    async def chat(worker, who, kill=False):
        try:
            async for msg in worker.stream(request, who):
                if kill and "content" in msg:
                    os.kill(worker.pid, signal.SIGKILL)
                    kill = False
                if msg.get("done"):
                    outcome[who] = msg["finish_reason"]
        except ServiceError as exc:
            outcome[who] = exc.status

    async def main():
        worker = ChatWorker()
        try:
            await asyncio.gather(chat(worker, "killed", kill=True), chat(worker, "next"))
            assert (await worker.stats())["held"] == {}
        finally:
            await worker.aclose()

    asyncio.run(main())
    assert outcome["killed"] == 503 and outcome["next"] in ("length", "stop"), outcome
