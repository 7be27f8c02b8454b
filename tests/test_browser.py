"""In a real browser (Playwright + Debian's chromium): log in, submit the form, watch the chart grow, see success."""
import json
import os
import shutil

import pytest

from .live import ADMIN, TINY

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.slow]
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it with apt-get install -y chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def dataset_id(live, name) -> int:
    return next(d["id"] for d in live.request("GET", "/api/v1/datasets")[1]["datasets"] if d["name"] == name)


def chart_points(page) -> int:
    return page.evaluate("() => { const gd = document.getElementById('chart'); "
                         "return gd && gd.data ? gd.data[0].x.length : -1; }")


def login(live, browser, username=ADMIN[0], password=ADMIN[1]):
    page = browser.new_page()
    page.set_default_timeout(30_000)
    page.goto(live.url + "/")
    assert "/accounts/login/" in page.url
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(live.url + "/")
    return page


def test_login_submit_watch_chart_and_succeed(live, browser):
    page = login(live, browser)
    page.click("text=New job")
    page.fill("#id_name", "browser-job")
    assert page.input_value("#id_hidden_size") == "64"

    def shows(selector, text):
        page.wait_for_function("([s, t]) => document.querySelector(s).textContent === t", arg=[selector, text])

    shows("#param-count", "0.53M")  # the tiny model, as the engine counts it (asked from the server)
    page.select_option("#id_preset", "minimind3")
    shows("#param-count", "63.91M")  # MiniMind-3's published count
    assert "GiB per device" in page.inner_text("#memory-estimate")
    page.select_option("#id_preset", "minimind3_moe")
    shows("#param-count", "198.42M (63.94M active)")
    page.select_option("#id_stage", "sft")  # MiniMind's SFT defaults for a full-size model
    assert page.input_value("#id_dataset") == str(dataset_id(live, "demo-sft"))  # datasets follow the stage
    assert (page.input_value("#id_batch_size"), page.input_value("#id_max_seq_len")) == ("16", "768")
    assert page.is_visible("#id_base_model") and not page.is_visible("#id_teacher_model")
    page.click("details.advanced summary")
    assert not page.is_visible("#id_lora_rank")
    page.select_option("#id_stage", "lora")
    assert page.is_visible("#id_lora_rank") and page.input_value("#id_lora_rank") == "16"
    page.wait_for_selector("#estimate-error:not([hidden])")  # LoRA needs a trained model to start from
    assert "base_model" in page.inner_text("#estimate-error")
    page.select_option("#id_preset", "tiny")
    page.select_option("#id_stage", "pretrain")
    page.fill("#id_num_attention_heads", "5")  # validated as you type, with the field named
    page.wait_for_function("() => document.getElementById('estimate-error').textContent.includes('must divide')")
    assert page.locator(".field.invalid #id_num_attention_heads").count() == 1
    page.fill("#id_num_attention_heads", "4")
    page.wait_for_selector("#estimate-error", state="hidden")
    assert page.input_value("#id_dataset") == str(dataset_id(live, "demo-pretrain"))
    page.fill("#id_max_steps", "300")
    page.fill("#id_log_interval", "2")
    preview = json.loads(page.text_content("#spec-preview"))
    assert preview["stage"] == "pretrain" and preview["name"] == "browser-job"
    assert preview["config"]["max_steps"] == 300 and preview["config"]["hidden_size"] == 64
    page.click("#submit-job")
    page.wait_for_url("**/jobs/*/")
    page.wait_for_selector("#chart.js-plotly-plot")
    # The chart gains points while the job runs (WebSocket → Plotly.extendTraces).
    page.wait_for_function("() => document.getElementById('chart').data[0].x.length > 0", timeout=120_000)
    seen = chart_points(page)
    page.wait_for_function(f"() => document.getElementById('chart').data[0].x.length > {seen}", timeout=60_000)
    assert page.get_attribute("#job-status", "data-status") in ("running", "succeeded")
    page.wait_for_function("() => document.getElementById('job-status').dataset.status === 'succeeded'",
                           timeout=240_000)
    job_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
    # Finished: only a clone is offered (the actions of other states, and the half-batch offer, are out of sight).
    visible = page.evaluate("() => [...document.querySelectorAll('#job-actions button, #job-actions a, "
                            "#retry-half-batch, #clone-half-batch')].filter(b => b.offsetParent !== null).map(b => b.id)")
    assert visible == ["action-clone"], visible
    history = page.inner_text("#job-events")  # grown while the page was open, with no reload
    assert "· running ·" in history and "· succeeded" in history, history
    stored = live.request("GET", f"/api/v1/jobs/{job_id}/metrics?after=0")[1]["points"]
    train_points = [p for p in stored if "loss" in p["values"]]
    assert len(train_points) > 10 and chart_points(page) == len(train_points)  # every point reached the chart
    assert page.locator("#job-model a").count() == 1
    page.click("#job-model a")
    page.wait_for_selector("#download-pth")
    # The same page in Simplified Chinese.
    with page.expect_navigation():
        page.select_option("select[name=language]", "zh-hans")
    assert page.inner_text("#download-pth") == "下载" and "谱系" in page.inner_text("#lineage")
    with page.expect_navigation():
        page.select_option("select[name=language]", "en")
    page.close()


def test_job_page_metrics_and_log_tools_and_the_compare_page(live, browser):
    jobs = [live.submit(f"cmp-{i}", {**TINY, "max_steps": 8 + 4 * i, "log_interval": 1, "seed": 5})
            for i in range(2)]
    for job in jobs:
        live.wait_for(job["id"], lambda j: j["status"] == "succeeded", what="finished")
    page = login(live, browser)
    page.goto(f"{live.url}/jobs/{jobs[0]['id']}/")
    page.wait_for_selector("#metric-chart.js-plotly-plot")
    page.select_option("#metric", "grad_norm")
    assert page.evaluate("() => document.getElementById('metric-chart').data[0].name") == "grad_norm"
    page.check("#logy")
    assert page.evaluate("() => document.getElementById('metric-chart').layout.yaxis.type") == "log"
    page.fill("#log-search", "checkpoint")
    assert all("checkpoint" in line for line in page.inner_text("#log").strip().splitlines())
    page.goto(f"{live.url}/jobs/compare/?ids={jobs[0]['id']},{jobs[1]['id']}")
    page.wait_for_selector("#compare-chart.js-plotly-plot")
    assert page.evaluate("() => document.getElementById('compare-chart').data.length") == 2
    lengths = page.evaluate("() => document.getElementById('compare-chart').data.map(t => t.x.length)")
    assert lengths == [8, 12]
    page.select_option("#xaxis", "tokens")
    assert page.evaluate("() => document.getElementById('compare-chart').layout.xaxis.title.text") == "tokens"
    assert "max_steps" in page.inner_text("table.list")
    toolbar = "() => [...document.querySelectorAll('#compare-chart .modebar-btn')].map(b => b.dataset.title)"
    assert "Zoom" in page.evaluate(toolbar) and not any("Share" in t for t in page.evaluate(toolbar))  # no upload
    with page.expect_navigation():
        page.select_option("select[name=language]", "zh-hans")
    page.wait_for_selector("#compare-chart.js-plotly-plot")
    assert "缩放" in page.evaluate(toolbar)  # the chart in the page's language
    with page.expect_navigation():
        page.select_option("select[name=language]", "en")
    # Clone: the form filled in as the job ran (a key the form has no field for kept), edited, then submitted.
    page.goto(f"{live.url}/jobs/{jobs[1]['id']}/")
    page.click("#action-clone")
    page.wait_for_url("**/jobs/new/?clone=*")
    assert (page.input_value("#id_name"), page.input_value("#id_max_steps")) == ("cmp-1 (copy)", "12")
    assert (page.input_value("#id_preset"), page.input_value("#id_hidden_size")) == ("tiny", "64")
    assert json.loads(page.text_content("#spec-preview"))["config"]["seed"] == 5
    page.fill("#id_max_steps", "3")
    page.wait_for_function("() => JSON.parse(document.getElementById('spec-preview').textContent).config.max_steps"
                           " === 3")
    page.click("#submit-job")
    page.wait_for_url("**/jobs/*/")
    clone = live.wait_for(int(page.url.rstrip("/").rsplit("/", 1)[1]), lambda j: j["status"] == "succeeded",
                          what="the clone finished")
    assert (clone["name"], clone["config"]["max_steps"], clone["config"]["seed"]) == ("cmp-1 (copy)", 3, 5)
    page.close()


def test_an_instructor_builds_a_group_and_students_see_only_what_is_theirs_or_shared(live, browser, tmp_path):
    csv = tmp_path / "class.csv"
    csv.write_text("username,name,email,group\nteacher,Wang Laoshi,,\nstu1,,,\nstu2,,,\nstu3,,,\n")
    out = live.manage("import_users", str(csv)).splitlines()[1:]
    passwords = dict(line.split(",")[:2] for line in out)
    live.manage("shell", "-c", "from accounts.models import Profile; from django.contrib.auth.models import User; "
                "Profile.objects.create(user=User.objects.get(username='teacher'), role='instructor')")
    teacher = login(live, browser, "teacher", passwords["teacher"])
    teacher.goto(live.url + "/groups/")
    teacher.fill("#group-name", "nlp-lab")
    teacher.click("#new-group button[type=submit]")
    teacher.wait_for_selector("#add-member")
    for student in ("stu1", "stu2"):  # invited: each joins by accepting on their own groups page
        teacher.fill("#member-username", student)
        teacher.click("#add-member button[type=submit]")
        teacher.wait_for_selector(f"#invited >> text={student}")
    group_url = teacher.url
    for student in ("stu1", "stu2"):
        invited = login(live, browser, student, passwords[student])
        invited.goto(live.url + "/groups/")
        assert "nlp-lab" in invited.inner_text("#invitations")
        with invited.expect_navigation():
            invited.click("#invitations button[value=accept]")
        invited.wait_for_selector("#group-table >> text=nlp-lab")
        invited.close()
    teacher.goto(group_url)
    for student in ("stu1", "stu2"):
        teacher.wait_for_selector(f"#member-table >> text={student}")
    tokens = {s: live.token_for(s, passwords[s]) for s in ("stu1", "stu2", "stu3")}
    slow = {**TINY, "max_steps": 3}
    own = live.submit("stu1-own", slow, token=tokens["stu1"])
    shared = live.submit("stu2-shared", slow, token=tokens["stu2"])
    private = live.submit("stu3-private", slow, token=tokens["stu3"])
    group_id = live.request("GET", "/api/v1/me", token=tokens["stu2"])[1]["groups"][0]["id"]
    status, body = live.request("POST", f"/api/v1/jobs/{shared['id']}/share",
                                {"visibility": "group", "group": group_id}, token=tokens["stu2"])
    assert status == 200 and body["visibility"] == "group"
    student = login(live, browser, "stu1", passwords["stu1"])
    for job, visible in ((own, True), (shared, True), (private, False)):
        response = student.goto(f"{live.url}/jobs/{job['id']}/")
        assert response.status == (200 if visible else 404), job["name"]
        assert ("stu3-private" in student.content()) is False
    student.goto(live.url + "/groups/")
    assert student.locator("#new-group").count() == 0  # students do not create groups
    teacher.goto(group_url)
    jobs_text = teacher.inner_text("#group-jobs")
    assert "stu1-own" in jobs_text and "stu2-shared" in jobs_text and "stu3-private" not in jobs_text
    for job in (own, shared, private):
        live.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed"), what="finished")
    teacher.close()
    student.close()


def test_upload_errors_fix_preview_and_statistics(live, browser, tmp_path):
    bad = tmp_path / "chat.jsonl"
    good_rec = {"conversations": [{"role": "user", "content": "<b>Hi</b>"}, {"role": "assistant", "content": "Hello."}]}
    bad.write_text(json.dumps(good_rec) + "\n" + '{"conversations": [{"role": "user", "content": "Q"}]}\n'
                   + "{broken\n")
    page = login(live, browser)
    page.goto(live.url + "/datasets/")
    page.fill("#upload-name", "browser-chat")
    page.select_option("#upload-kind", "sft")
    page.set_input_files("#upload-file", str(bad))
    page.click("#upload-submit")
    page.wait_for_selector("#upload-errors:not([hidden])")
    errors = page.inner_text("#upload-error-list")
    assert "2: 'conversations' has no assistant message" in errors and "3: not valid JSON" in errors
    fixed = tmp_path / "chat-fixed.jsonl"
    fixed.write_text("".join(json.dumps(good_rec if i % 2 else {**good_rec, "n": i}) + "\n" for i in range(25)))
    assert fixed.stat().st_size > 1000 > bad.stat().st_size  # checked in the background, and in the request
    page.set_input_files("#upload-file", str(fixed))
    with page.expect_navigation():
        page.click("#upload-submit")
    assert "/datasets/" in page.url and page.inner_text("#ds-records") == "25"
    assert page.locator(".bubble.role-user").first.inner_text().endswith("<b>Hi</b>")  # shown as text
    page.click("#next-page")
    page.wait_for_selector("#prev-page")
    page.click("#stats-form button[type=submit]")
    page.wait_for_selector("#length-chart.js-plotly-plot", timeout=120_000)  # computed in the background
    assert "Total tokens" in page.inner_text("#stats-facts")
    page.close()


def test_playground_streams_two_models_side_by_side_with_thinking(live, browser, tmp_path):
    import torch

    from training.model import build_model, save_pth
    from training.spec import model_config, resolve_config

    arch = {k: TINY[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")}
    ids = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_pth(build_model(model_config(resolve_config("pretrain", arch))), tmp_path / f"m{seed}.pth")
        status, body = live.upload("/api/v1/models/import", {"name": f"play-{seed}", "config": json.dumps(arch)},
                                   {"file": (f"m{seed}.pth", (tmp_path / f"m{seed}.pth").read_bytes())})
        assert status == 201, body
        ids.append(body["id"])
    page = login(live, browser)
    page.goto(f"{live.url}/playground/?model={ids[0]}")
    assert page.input_value("#pg-model-a") == str(ids[0])
    page.select_option("#pg-model-b", str(ids[1]))
    page.click("summary")
    page.fill("#pg-max-tokens", "6")
    page.fill("#pg-temperature", "0")
    page.fill("#pg-input", "What is 2+3?")
    page.click("#pg-send")
    page.wait_for_selector("#pg-chat-b .bubble.role-assistant.done", timeout=120_000)
    page.wait_for_selector("#pg-chat-a .bubble.role-assistant.done")
    assert page.locator(".bubble .error").count() == 0
    answers = [page.inner_text(f"#pg-chat-{k} .bubble.role-assistant .answer") for k in "ab"]
    assert all(a for a in answers), answers
    # a random model's greedy favourite is the newline: a blank answer is said to be blank, not an empty bubble
    assert not answers[0].strip() and page.locator("#pg-chat-a .bubble.role-assistant .hint").is_visible()
    page.check("#pg-thinking")
    page.fill("#pg-temperature", "2")  # a random model: widely sampled tokens, not its favourite newline
    page.fill("#pg-top-p", "1")
    page.fill("#pg-max-tokens", "24")
    page.fill("#pg-seed", "3")  # repeatable: some draws (about 1 in 100) are nothing but blank lines
    page.select_option("#pg-model-b", "")
    page.fill("#pg-input", "Think first")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#pg-send")
    body = json.loads(sent.value.post_data)
    assert body["enable_thinking"] is True and body["stream"] is True and body["seed"] == 3 and [m["role"] for m in body["messages"]] == [
        "user", "assistant", "user"]
    page.wait_for_function("() => document.querySelectorAll('#pg-chat-a .bubble.role-assistant.done').length == 2")
    last = page.locator("#pg-chat-a .bubble.role-assistant").nth(1)
    assert last.locator(".error").count() == 0 and last.locator(".hint").count() == 0
    assert last.locator("details").is_visible()  # the <think> part arrives as reasoning_content, folded
    assert last.locator(".reasoning").text_content()  # folded: in the page, not rendered until opened
    assert page.locator("#pg-chat-a .bubble.role-user").count() == 2  # multi-turn: the history grows

    # while other users' chats have their turns, a chat hears how many start before it (an SSE comment): shown until
    # its first token comes (answers given here by the page's own route, to hold the wait still)
    role = 'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}'
    token = 'data: {"choices": [{"index": 0, "delta": {"content": "Five"}}]}'
    for n, events in enumerate([(role, ": queued 2"), (role, ": queued 1", token, "data: [DONE]")]):
        body = "".join(f"{e}\n\n" for e in events)
        page.route("**/v1/chat/completions", lambda route, _request, body=body: route.fulfill(
            status=200, content_type="text/event-stream", body=body))
        page.fill("#pg-input", "Wait")
        page.click("#pg-send")
        page.wait_for_function(
            f"() => document.querySelectorAll('#pg-chat-a .bubble.role-assistant.done').length == {3 + n}")
        page.unroute("**/v1/chat/completions")
    waited, answered = (page.locator("#pg-chat-a .bubble.role-assistant").nth(i) for i in (2, 3))
    assert waited.locator(".waiting").inner_text() == "Waiting for its turn: 2 ahead"
    assert answered.locator(".waiting").is_hidden() and answered.locator(".answer").inner_text() == "Five"
    page.close()


def test_tokenizer_playground_counts_in_the_pages_language(live, browser):
    tokenizers = live.request("GET", "/api/v1/tokenizers")[1]["tokenizers"]
    demo = next(t["id"] for t in tokenizers if t["name"] == "demo-tokenizer")
    page = login(live, browser)
    page.goto(f"{live.url}/tokenizers/{demo}/")

    def counted(words):
        page.fill("#playground-text", "What is 12 plus 30?")
        page.wait_for_function("w => document.getElementById('playground-count').textContent.includes(w)", arg=words)
        return page.inner_text("#playground-count")

    assert counted(" tokens · 19 characters · ids: ")
    with page.expect_navigation():
        page.select_option("select[name=language]", "zh-hans")
    assert counted(" 个词元 · 19 个字符 · id: ")
    assert page.locator("#playground-tokens .token").count() == int(counted("个词元").split()[0])
    with page.expect_navigation():
        page.select_option("select[name=language]", "en")
    page.close()
