"""Server-rendered pages: login required, the job form, and both languages."""
import pytest

from models_registry.models import Tokenizer
from jobs.models import Dataset, Job


@pytest.fixture
def logged_in(client, user):
    client.force_login(user)
    return client


@pytest.mark.parametrize("path", ["/", "/jobs/new/", "/queue/", "/devices/", "/datasets/", "/models/"])
def test_pages_need_login_and_render(client, user, path):
    assert client.get(path).status_code == 302
    client.force_login(user)
    assert client.get(path).status_code == 200


def test_new_job_form_submits_a_job(logged_in):
    page = logged_in.get("/jobs/new/")
    form = page.context["form"]
    data = {k: v for k, v in form.initial.items()}
    data.update(name="from the form", dataset=form.initial["dataset"], preset="tiny", max_steps=5)
    r = logged_in.post("/jobs/new/", data)
    job = Job.objects.get()
    assert r.status_code == 302 and r["Location"] == f"/jobs/{job.pk}/"
    assert job.resolved_config["hidden_size"] == 64 and job.resolved_config["max_steps"] == 5
    detail = logged_in.get(r["Location"])
    assert b"js-plotly-plot" not in detail.content  # plotly adds that class in the browser
    assert b'id="chart"' in detail.content and b"/static/vendor/plotly." in detail.content


def test_new_job_form_asks_for_devices_a_time_limit_and_a_priority(logged_in):
    initial = logged_in.get("/jobs/new/").context["form"].initial
    assert (initial["gpus"], initial["priority"]) == (1, 0)
    r = logged_in.post("/jobs/new/", dict(initial, name="limited", time_limit_h=0.5, priority=2))
    job = Job.objects.get()
    assert r.status_code == 302 and (job.gpus, job.time_limit_s, job.priority) == (1, 1800, 2)
    form = logged_in.get(f"/jobs/new/?clone={job.pk}").context["form"]
    assert (form.initial["gpus"], form.initial["time_limit_h"], form.initial["priority"]) == (1, 0.5, 2)
    r = logged_in.post("/jobs/new/", dict(initial, name="too wide", gpus=64))
    assert r.status_code == 200 and "can never start" in r.content.decode() and Job.objects.count() == 1


def test_new_job_form_offers_cuda_graphs_when_compiling(logged_in):
    page = logged_in.get("/jobs/new/")
    initial = page.context["form"].initial
    assert initial["compile_mode"] == "default" and 'value="reduce-overhead"' in page.content.decode()
    assert initial["compile_tuning"] is False and 'name="compile_tuning"' in page.content.decode()
    r = logged_in.post("/jobs/new/", dict(initial, name="graphs", use_compile="on", compile_mode="reduce-overhead",
                                          compile_tuning="on"))
    job = Job.objects.get()
    assert r.status_code == 302 and job.resolved_config["use_compile"] is True
    assert (job.resolved_config["compile_mode"], job.resolved_config["compile_tuning"]) == ("reduce-overhead", True)
    clone = logged_in.get(f"/jobs/new/?clone={job.pk}").context["form"].initial
    assert (clone["compile_mode"], clone["compile_tuning"]) == ("reduce-overhead", True)
    r = logged_in.post("/jobs/new/", dict(initial, name="bad", compile_mode="fastest"))
    assert r.status_code == 200 and "fastest" in r.content.decode() and Job.objects.count() == 1


def test_new_job_form_shows_errors_in_the_page(logged_in):
    page = logged_in.get("/jobs/new/")
    data = dict(page.context["form"].initial, name="x", hidden_size=64, num_attention_heads=5)
    r = logged_in.post("/jobs/new/", data)
    assert r.status_code == 200 and "must divide hidden_size" in r.content.decode()
    zh = logged_in.post("/jobs/new/", data, HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "config.num_attention_heads: 必须能整除 hidden_size" in zh
    assert Job.objects.count() == 0


def test_pages_in_simplified_chinese(logged_in):
    r = logged_in.get("/", HTTP_ACCEPT_LANGUAGE="zh-hans")
    text = r.content.decode()
    assert "新建任务" in text and "我的任务" in text
    r = logged_in.get("/jobs/new/", HTTP_ACCEPT_LANGUAGE="zh-hans")
    assert "开始训练" in r.content.decode()


@pytest.mark.parametrize("lang", ["en", "zh-hans"])
def test_every_demo_dataset_page_shows_its_records(logged_in, lang):
    kinds = set()
    for ds in Dataset.objects.filter(owner=None):
        r = logged_in.get(f"/datasets/{ds.pk}/", HTTP_ACCEPT_LANGUAGE=lang)
        assert r.status_code == 200, ds.name
        assert r.content.decode().count('class="record-view"') == 10, ds.name
        kinds.add(ds.kind)
    assert {"pretrain", "sft", "dpo", "rlaif"} <= kinds
    rl = logged_in.get(f"/datasets/{Dataset.objects.filter(owner=None, kind='rlaif').first().pk}/",
                       HTTP_ACCEPT_LANGUAGE=lang).content.decode()
    assert rl.count("标准答案" if lang == "zh-hans" else "expected answer") == 10


def test_a_refused_submission_is_explained_in_the_pages_language(logged_in, user):
    from accounts.models import Quota

    Quota.objects.create(user=user, max_queued_jobs=0)
    data = dict(logged_in.get("/jobs/new/").context["form"].initial, name="x", preset="tiny")
    zh = logged_in.post("/jobs/new/", data, HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "quota: 你已有 0 个排队中的任务，上限为 0" in zh
    en = logged_in.post("/jobs/new/", data, HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "quota: you already have 0 queued job(s), your limit is 0" in en
    assert Job.objects.count() == 0


def test_language_switch(logged_in):
    r = logged_in.post("/i18n/setlang/", {"language": "zh-hans", "next": "/"})
    assert r.status_code == 302
    assert "仪表盘" in logged_in.get("/").content.decode()


def test_the_menu_marks_the_current_section_in_both_languages(logged_in, user, admin_client):
    import re

    def current(path, lang="en", client=logged_in):
        page = client.get(path, HTTP_ACCEPT_LANGUAGE=lang).content.decode()
        return re.findall(r'<a href="([^"]*)" aria-current="page">([^<]*)</a>', page)

    ds = Dataset.objects.get(name="demo-pretrain")
    job = Job.objects.create(owner=user, name="mine", stage="pretrain", dataset=ds,
                             tokenizer=Tokenizer.objects.get(name="demo-tokenizer"))
    assert current("/datasets/") == [("/datasets/", "Datasets")]
    assert current(f"/datasets/{ds.pk}/", "zh-hans") == [("/datasets/", "数据集")]  # a page below its section
    assert current(f"/jobs/{job.pk}/") == [("/", "Dashboard")]
    assert current("/jobs/new/") == [("/jobs/new/", "New job")]
    assert current("/accounts/tokens/") == []  # the account pages are on the right, not in the menu
    assert "/admin/" not in logged_in.get("/").content.decode()
    assert 'href="/admin/"' in admin_client.get("/").content.decode()  # staff also see the admin


def test_other_users_job_page_is_404(logged_in, other_user):
    from jobs.models import Dataset

    ds = Dataset.objects.get(name="demo-pretrain")
    job = Job.objects.create(owner=other_user, name="secret", stage="pretrain", dataset=ds, tokenizer=Tokenizer.objects.get(name="demo-tokenizer"))
    assert logged_in.get(f"/jobs/{job.pk}/").status_code == 404
    assert logged_in.post(f"/jobs/{job.pk}/cancel/").status_code == 404


def _job_with_points(owner, name, n, config=None):
    from jobs.models import Dataset, LogChunk, MetricPoint

    job = Job.objects.create(owner=owner, name=name, stage="pretrain", dataset=Dataset.objects.get(name="demo-pretrain"),
                             tokenizer=Tokenizer.objects.get(name="demo-tokenizer"),
                             resolved_config=config or {"batch_size": 16, "learning_rate": 1e-3})
    MetricPoint.objects.bulk_create([MetricPoint(job=job, seq=i, step=i, time=float(i),
                                                 values={"loss": 10.0 / i, "lr": 1e-3, "tokens": 64 * i})
                                     for i in range(1, n + 1)])
    LogChunk.objects.create(job=job, offset=0, text="line one\nline two\n")
    return job


def test_compare_page_overlays_jobs_and_lists_config_differences(logged_in, user):
    a = _job_with_points(user, "a", 30)
    b = _job_with_points(user, "b", 20, {"batch_size": 32, "learning_rate": 1e-3})
    r = logged_in.get(f"/jobs/compare/?ids={a.pk},{b.pk}")
    assert r.status_code == 200
    assert r.context["differing"][-1] == ("batch_size", ["16", "32"])
    assert set(r.context["series"]) == {str(a.pk), str(b.pk)} and "loss" in r.context["metric_keys"]
    assert logged_in.get("/jobs/compare/?ids=oops").status_code == 200  # bad input: an empty comparison


def test_job_page_downsamples_long_histories(logged_in, user):
    from jobs import selectors

    from jobs.models import MetricPoint

    job = _job_with_points(user, "long", 2500)
    MetricPoint.objects.filter(job=job, seq=1234).update(values={"eval_loss": 1.5})
    pts = selectors.metric_history(job, max_points=1000)
    seqs = [p["seq"] for p in pts]
    assert len(pts) <= 1002 and seqs[0] == 1 and seqs[-1] == 2500 and 1234 in seqs  # eval points always kept
    assert seqs == sorted(seqs) and seqs[1] - seqs[0] == 3  # every third point
    assert logged_in.get(f"/jobs/{job.pk}/").status_code == 200


def test_job_page_points_are_the_stored_points(logged_in, user):
    """The page writes its chart's points from the stored JSON text; they parse to what the API's reader returns."""
    import json
    import re

    from jobs import selectors

    from jobs.models import MetricPoint

    job = _job_with_points(user, "pts", 40)
    MetricPoint.objects.filter(job=job, seq=7).update(values={"eval_loss": 1.25, "note": "</script><b>&"})
    html = logged_in.get(f"/jobs/{job.pk}/").content.decode()
    text = re.search(r'<script id="points" type="application/json">(.*?)</script>', html, re.S).group(1)
    assert "</script><b>" not in text and "\\u003C/script\\u003E" in text  # escaped as json_script escapes
    assert json.loads(text) == selectors.metric_history(job) and len(json.loads(text)) == 40
    assert json.loads(text)[6]["values"] == {"eval_loss": 1.25, "note": "</script><b>&"}
    assert re.search(r'"after": 40,', html)


def test_log_download_and_queue_reasons(logged_in, user):
    job = _job_with_points(user, "q", 1)
    r = logged_in.get(f"/jobs/{job.pk}/log.txt")
    assert r.status_code == 200 and r.content == b"line one\nline two\n"
    assert "attachment" in r["Content-Disposition"]
    page = logged_in.get("/queue/")
    row = next(j for j in page.context["jobs"] if j.pk == job.pk)
    assert row.position == 1 and row.reason == "no worker node is running"  # no serve has registered a node here


def test_new_job_page_estimates_as_the_form_changes(logged_in):
    initial = logged_in.get("/jobs/new/").context["form"].initial
    data = dict(initial, name="e", preset="minimind3", hidden_size=768, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, batch_size=32, max_seq_len=340, max_steps=100)
    r = logged_in.post("/jobs/new/estimate", data).json()
    assert r["ok"] and r["parameters"] == "63.91M" and r["memory"].endswith("GiB per device")
    assert "weights, gradients, AdamW" in r["memory_parts"] and r["time"].startswith("about")
    bad = logged_in.post("/jobs/new/estimate", dict(data, num_attention_heads=5)).json()
    assert not bad["ok"] and bad["field"] == "num_attention_heads" and "must divide" in bad["error"]
    zh = logged_in.post("/jobs/new/estimate", data, HTTP_ACCEPT_LANGUAGE="zh-hans").json()
    assert "每个设备" in zh["memory"]
    assert Job.objects.count() == 0  # nothing stored


def test_job_page_shows_memory_estimate_and_peak(logged_in, user):
    job = _job_with_points(user, "mem", 1)
    Job.objects.filter(pk=job.pk).update(memory_estimate=6 * 2**30, peak_memory=5 * 2**30)
    text = logged_in.get(f"/jobs/{job.pk}/").content.decode().replace("\xa0", " ")
    assert "6.0 GB" in text and "5.0 GB" in text and "+20%" in text


def test_job_page_shows_its_configuration_as_json(logged_in, user):
    import html
    import json
    import re

    config = {"use_compile": True, "max_steps": None, "learning_rate": 0.0005, "lora_targets": ["q_proj"]}
    job = _job_with_points(user, "cfg", 1, config)
    page = logged_in.get(f"/jobs/{job.pk}/").content.decode()
    shown = re.search(r'<pre class="record">(.*?)</pre>', page, re.S).group(1)
    assert json.loads(html.unescape(shown)) == config  # copyable into a spec or an API call as it stands


def test_job_history_names_its_events_in_the_pages_language(logged_in, user):
    from jobs import services

    job = services.submit_job(owner=user, name="h", stage="pretrain", dataset=Dataset.objects.get(name="demo-pretrain"),
                              config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "num_key_value_heads": 2})
    services.cancel_job(job, user)
    zh = logged_in.get(f"/jobs/{job.pk}/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "· 已提交 · alice" in zh and "· 已取消 · alice" in zh
    en = logged_in.get(f"/jobs/{job.pk}/").content.decode()
    assert "· submitted · alice" in en and "· cancelled · alice" in en


def test_job_history_notes_and_errors_read_in_the_readers_language(logged_in, user, settings, tmp_path, admin_client):
    """The portal's own notes (where a job ran, why it stopped, how it resumed) and errors are stored as English
    templates with their parameters: the page and the API show them in the reader's language; text stored without
    parameters (an engine's own error line, records written before) as it is."""
    from jobs import services
    from jobs.models import JobEvent

    settings.HOME, settings.AUTO_RESUME_LIMIT = tmp_path, 1
    job = services.submit_job(owner=user, name="h", stage="pretrain", dataset=Dataset.objects.get(name="demo-pretrain"),
                              config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "num_key_value_heads": 2}, time_limit_s=6)
    services.claim_next_job("n", 1)
    job.checkpoint_path.parent.mkdir(parents=True)
    job.checkpoint_path.write_bytes(b"x")
    services.interrupt_job(Job.objects.get(pk=job.pk), "the training process was killed by signal %(signal)s",
                           {"signal": 9})
    services.claim_next_job("n", 1)
    services.finish_job(Job.objects.get(pk=job.pk), Job.Status.FAILED,
                        error="time limit of %(limit)s s reached at step %(step)s; retry continues from the last "
                              "checkpoint", error_params={"limit": 6, "step": 40})
    JobEvent.objects.create(job=job, kind="failed", message="an old note: 100% (%(kept)s as written)")

    zh = logged_in.get(f"/jobs/{job.pk}/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    for text in ("· 运行中 · n · 设备 [0]", "训练进程被信号 9 终止", "自动恢复 1/1（从最近的检查点接着训练）",
                 "在第 40 步达到 6 秒的时间限制；重试会从最近的检查点继续", "an old note: 100% (%(kept)s as written)"):
        assert text in zh
    assert zh.count("在第 40 步达到 6 秒的时间限制") == 2  # the error above the chart and the history line
    en = logged_in.get(f"/jobs/{job.pk}/").content.decode()
    assert "the training process was killed by signal 9" in en and "automatic resume 1/1 (continues" in en
    assert "time limit of 6 s reached at step 40" in en

    api = logged_in.get(f"/api/v1/jobs/{job.pk}", HTTP_ACCEPT_LANGUAGE="zh-hans").json()
    assert api["error"].startswith("在第 40 步达到 6 秒的时间限制")
    assert "自动恢复 1/1（从最近的检查点接着训练）" in [e["message"] for e in api["events"]]
    assert logged_in.get(f"/api/v1/jobs/{job.pk}").json()["error"].startswith("time limit of 6 s")
    admin = admin_client.get(f"/admin/jobs/job/{job.pk}/change/")
    assert admin.status_code == 200 and "automatic resume 1/1" in admin.content.decode()


def test_a_saved_template_starts_the_next_job(logged_in, user):
    initial = logged_in.get("/jobs/new/").context["form"].initial
    data = dict(initial, name="my sft recipe", stage="sft", preset="tiny", epochs=3, max_steps=7,
                dataset=Dataset.objects.get(name="demo-sft").pk)
    r = logged_in.post("/jobs/new/", dict(data, save_template="1"))
    assert r.status_code == 302 and Job.objects.count() == 0  # saved, not submitted
    page = logged_in.get(r["Location"])
    form = page.context["form"]
    assert page.context["chosen"].name == "my sft recipe"
    assert (form.initial["stage"], str(form.initial["max_steps"]), str(form.initial["epochs"])) == ("sft", "7", "3")
    bad = logged_in.post("/jobs/new/", dict(data, save_template="1", num_attention_heads=5))
    assert bad.status_code == 200 and "must divide" in bad.content.decode()  # checked before it is saved


def test_clone_fills_the_form_to_edit_and_after_out_of_memory_halves_the_batch(logged_in, user, other_user):
    initial = logged_in.get("/jobs/new/").context["form"].initial
    logged_in.post("/jobs/new/", dict(initial, name="first", preset="tiny", max_steps=5, batch_size=16,
                                      accumulation_steps=2, learning_rate=2e-3))
    job = Job.objects.get()
    assert f'href="/jobs/new/?clone={job.pk}"' in logged_in.get(f"/jobs/{job.pk}/").content.decode()
    form = logged_in.get(f"/jobs/new/?clone={job.pk}").context["form"]
    assert form.initial["name"] == "first (copy)" and form.initial["preset"] == "tiny"
    assert (form.initial["stage"], form.initial["dataset"], form.initial["max_steps"]) == ("pretrain", job.dataset_id, 5)
    assert (form.initial["batch_size"], form.initial["accumulation_steps"], form.initial["learning_rate"]) == (16, 2, 2e-3)
    assert Job.objects.count() == 1  # nothing is queued before the user submits
    r = logged_in.post(f"/jobs/new/?clone={job.pk}", dict(form.initial, learning_rate=1e-3))  # edited, submitted
    copy = Job.objects.exclude(pk=job.pk).get()
    assert r["Location"] == f"/jobs/{copy.pk}/" and copy.name == "first (copy)"
    from accounts.models import AuditEntry

    assert AuditEntry.objects.filter(action="submit").latest("pk").detail == {"clone_of": job.pk}
    assert {k: v for k, v in copy.resolved_config.items() if k != "learning_rate"} == \
        {k: v for k, v in job.resolved_config.items() if k != "learning_rate"}
    assert copy.resolved_config["learning_rate"] == 1e-3

    assert 'id="half-batch" hidden' in logged_in.get(f"/jobs/{job.pk}/").content.decode()  # shown if it fails so
    Job.objects.filter(pk=job.pk).update(status="failed", error="out of memory: CUDA out of memory. Tried to allocate "
                                         "2.00 GiB — try a smaller batch_size or max_seq_len")
    page = logged_in.get(f"/jobs/{job.pk}/").content.decode()
    assert 'id="half-batch">' in page and f"/jobs/new/?clone={job.pk}&amp;half_batch=1" in page
    assert Job.objects.get(pk=job.pk).to_dict()["can_halve_batch"]  # what the live page's updates carry
    form = logged_in.get(f"/jobs/new/?clone={job.pk}&half_batch=1").context["form"]
    assert (form.initial["batch_size"], form.initial["accumulation_steps"]) == (8, 4)  # the same effective batch
    assert f'action="/jobs/{job.pk}/retry-half-batch/"' in page  # or go on from the checkpoint with half the batch
    r = logged_in.post(f"/jobs/{job.pk}/retry-half-batch/")
    retried = Job.objects.get(pk=job.pk)
    assert r["Location"] == f"/jobs/{job.pk}/" and retried.status == "queued"
    assert (retried.resolved_config["batch_size"], retried.resolved_config["accumulation_steps"]) == (8, 4)
    assert "with half the batch size" in logged_in.get(f"/jobs/{job.pk}/").content.decode()

    from jobs import services

    api_job = services.submit_job(owner=user, name="api", stage="pretrain", dataset=job.dataset_id,
                                  config={**{k: job.resolved_config[k] for k in ("hidden_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads")}, "seed": 7, "packing": False})
    page = logged_in.get(f"/jobs/new/?clone={api_job.pk}")
    assert 'id="other-config"' in page.content.decode() and "&quot;seed&quot;: 7" in page.content.decode()
    r = logged_in.post("/jobs/new/", {k: v for k, v in page.context["form"].initial.items()
                                      if k != "other_config"} | {"other_config": '{"seed": 7, "packing": false}'})
    clone = Job.objects.latest("pk")
    assert r.status_code == 302 and clone.name == "api (copy)"
    assert (clone.resolved_config["seed"], clone.resolved_config["packing"]) == (7, False)
    assert 'id="other-config"' not in logged_in.get(f"/jobs/new/?clone={job.pk}").content.decode()
    assert 'id="other-config"' not in logged_in.get("/jobs/new/").content.decode()
    bad = logged_in.post("/jobs/new/", dict(form.initial, other_config="[1, 2]"))
    assert bad.status_code == 200 and "Must be a JSON object." in bad.content.decode()

    theirs = Job.objects.create(owner=other_user, name="theirs", stage="pretrain", dataset_id=job.dataset_id,
                                tokenizer=job.tokenizer)
    assert logged_in.get(f"/jobs/new/?clone={theirs.pk}").status_code == 404


def test_devices_page_charts_the_last_hour(logged_in, user):
    from jobs import services
    from jobs.models import DeviceSample, Node

    Node.objects.create(name="box", devices=[])
    services.sample_devices("box", [{"index": 0, "kind": "cuda", "utilization": 40, "memory_used": 2**30},
                                    {"index": 1, "kind": "cpu"}])
    services.sample_devices("box", [{"index": 0, "kind": "cuda", "utilization": 90, "memory_used": 2 * 2**30},
                                    {"index": 1, "kind": "cpu"}])
    assert DeviceSample.objects.count() == 2
    history = logged_in.get("/devices/").context["history"]
    assert history["box"]["devices"]["0"]["utilization"] == [40, 90]
    assert history["box"]["devices"]["1"]["utilization"] == [0, 0]  # an idle CPU slot


def test_cpu_slots_are_named_in_the_pages_language(logged_in):
    from jobs.devices import _parse
    from jobs.models import Node

    Node.objects.create(name="box", devices=_parse("cpu:2"))
    zh = logged_in.get("/devices/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "<td>CPU 槽位 0</td>" in zh and "<td>CPU 槽位 1</td>" in zh
    assert "<td>CPU slot 1</td>" in logged_in.get("/devices/").content.decode()


def test_records_and_logs_are_escaped(logged_in, user, tmp_path):
    from jobs.models import LogChunk

    data = tmp_path / "evil.jsonl"
    data.write_text('{"text": "<script>alert(1)</script> hello"}\n')
    ds = Dataset.objects.create(owner=user, name="evil", kind="pretrain", path=str(data), records=1)
    page = logged_in.get(f"/datasets/{ds.pk}/").content.decode()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    job = _job_with_points(user, "evil-log", 1)
    LogChunk.objects.create(job=job, offset=100, text="<script>alert(2)</script>\n")
    page = logged_in.get(f"/jobs/{job.pk}/").content.decode()
    assert "<script>alert(2)</script>" not in page and "&lt;script&gt;alert(2)&lt;/script&gt;" in page


@pytest.mark.parametrize("path, data", [
    ("/jobs/new/", {"name": "x"}), ("/jobs/new/estimate", {}), ("/groups/", {"name": "g"}),
    ("/accounts/tokens/", {"name": "t"}), ("/accounts/password/", {}), ("/share/job/1/", {"visibility": "public"}),
])
def test_every_form_needs_its_csrf_token(user, path, data):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.post(path, data).status_code == 403


def test_error_pages_keep_the_site_and_the_language(logged_in, user, other_user):
    r = logged_in.get("/jobs/999999/", HTTP_ACCEPT_LANGUAGE="zh-hans")
    page = r.content.decode()
    assert r.status_code == 404 and 'id="not-found"' in page and "仪表盘" in page  # the site's header, in Chinese
    assert logged_in.get("/no/such/page/").status_code == 404
    theirs = Job.objects.create(owner=other_user, name="theirs", stage="pretrain", is_public=True,
                                dataset=Dataset.objects.get(name="demo-pretrain"),
                                tokenizer=Tokenizer.objects.get(name="demo-tokenizer"))
    r = logged_in.post(f"/jobs/{theirs.pk}/cancel/")
    assert r.status_code == 403 and "Only the job&#x27;s owner can do that." in r.content.decode()
    zh = logged_in.post(f"/jobs/{theirs.pk}/cancel/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert 'id="forbidden"' in zh and "只有任务的所有者可以这样做。" in zh
    assert Job.objects.get(pk=theirs.pk).status == "queued"

    from django.template.loader import render_to_string

    assert "服务器出错了" in render_to_string("500.html")  # rendered with no context at all, in both languages
