"""Dataset upload, streaming validation with line numbers, versions, references, statistics."""
import gzip
import hashlib
import io
import json
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from django.utils import timezone

from jobs import services
from jobs.models import Dataset, Job, Upload
from jobs.validation import validate_file

from conftest import TINY

SFT_OK = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
TOOLS = {"conversations": [
    {"role": "system", "content": "You may use tools.", "tools": '[{"type": "function", "function": {"name": "t"}}]'},
    {"role": "user", "content": "Time?"},
    {"role": "assistant", "content": "", "tool_calls": '[{"name": "t", "arguments": {}}]'},
    {"role": "tool", "content": '{"t": 1}'}, {"role": "assistant", "content": "One."}]}


def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind, bad, message", [
    ("pretrain", '{"text": "ok", ', "not valid JSON"),
    ("pretrain", {"txt": "typo"}, "missing field 'text'"),
    ("pretrain", {"text": 5}, "'text' must be a string, not int"),
    ("pretrain", {"text": "   "}, "empty 'text'"),
    ("pretrain", "[1, 2]", "a record must be a JSON object"),
    ("sft", {"conversations": []}, "non-empty list"),
    ("sft", {"conversations": [{"role": "bot", "content": "x"}]}, "role must be one of"),
    ("sft", {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
     "empty assistant text"),
    ("sft", {"conversations": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]},
     "roles out of order"),
    ("sft", {"conversations": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q2"}]},
     "roles out of order (user after user)"),
    ("sft", {"conversations": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]},
     "has no assistant message"),
    ("sft", {"conversations": [{"role": "system", "content": "S", "tools": "[{not json"},
                               {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
     "'tools' is not valid JSON"),
    ("sft", {"conversations": [{"role": "user", "content": "Q"},
                               {"role": "assistant", "content": "", "tool_calls": [{"name": "t"}]}]},
     "'tool_calls' must be a JSON-encoded string"),
    ("dpo", {"chosen": SFT_OK["conversations"]}, "missing field 'rejected'"),
    ("dpo", {"chosen": SFT_OK["conversations"], "rejected": [{"role": "user", "content": "Other?"},
                                                             {"role": "assistant", "content": "No."}]},
     "must share the same prompt"),
    ("rlaif", {"conversations": [{"role": "user", "content": "Q"}]}, "placeholder assistant turn"),
    ("rlaif", {"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}],
               "gt": {"value": 4}}, "'gt'/'answer' must be a string, a number"),
])
def test_each_error_kind_is_reported_with_its_line(tmp_path, kind, bad, message):
    good = {"pretrain": {"text": "fine"}, "sft": SFT_OK, "dpo": {"chosen": SFT_OK["conversations"],
                                                                 "rejected": SFT_OK["conversations"][:1] + [
                                                                     {"role": "assistant", "content": "Bye."}]},
            "rlaif": {"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}],
                      "gt": "4"}}[kind]
    report = validate_file(write(tmp_path, [good, good, bad, good]), kind)
    assert not report.ok and report.error_count == 1 and report.records == 3
    line, text = report.errors[0]
    assert line == 3 and message in text, text


def test_valid_files_of_every_kind_pass_and_tools_are_accepted(tmp_path):
    assert validate_file(write(tmp_path, [SFT_OK, TOOLS]), "sft").ok
    report = validate_file(write(tmp_path, [{"text": "A b."}, {"text": "a  B"}, {"text": "A b."}]), "pretrain")
    assert report.ok and report.warning_count == 2
    assert report.warnings[0] == [2, "near-duplicate of line %(line)s (same text up to case, spaces and punctuation)",
                                  {"line": 1}]
    assert report.warnings[1] == [3, "duplicate of line %(line)s", {"line": 1}]


def test_near_duplicates_are_the_same_text_up_to_case_spaces_and_punctuation(tmp_path):
    """The near-duplicate fingerprint keeps exactly the characters the regex ``\\w`` keeps (the definition it had
    before its table), in every script, and reads a lone surrogate JSON may spell."""
    import re

    from jobs.validation import _near_fingerprint

    texts = ["模型，训练。数据！", "模型训练数据", "The model_2 learns.", "the MODEL_2 learns", "Ａｂｃ１２３（全角）", "abc123全角",
             "café crème", "cafe\u0301 cre\u0300me", "١٢٣ ٤", "१२३", "emoji 🙂 here", "emojihere", "a\u00a0b\u2003c",
             "abc", "x\ud800y", "xy", "ǅungla", "ǆungla", "", "。，、"]
    spec = {t: re.sub(r"[^\w]+", "", t.lower()) for t in texts}
    for a in texts:
        for b in texts:
            assert (_near_fingerprint(a) == _near_fingerprint(b)) == (spec[a] == spec[b]), (a, b)
    report = validate_file(write(tmp_path, [{"text": "模型，训练。"}, {"text": "模型 训练"}, '{"text": "x\\ud800y"}',
                                            {"text": "x y"}]), "pretrain")
    assert [w[0] for w in report.warnings] == [2, 4]


def test_errors_are_capped_at_100_but_all_counted(tmp_path):
    report = validate_file(write(tmp_path, ["{oops"] * 250 + [{"text": "x"}]), "pretrain")
    assert report.error_count == 250 and len(report.errors) == 100 and report.errors[-1][0] == 100


def test_gzip_and_non_utf8_files(tmp_path):
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "压缩的文本"}, ensure_ascii=False) + "\n")
    assert validate_file(gz, "pretrain").records == 1
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    report = validate_file(bad, "pretrain")
    assert not report.ok and "not UTF-8" in report.errors[0][1]


def test_validation_reads_the_file_once_for_its_records_and_its_checksum(tmp_path, monkeypatch):
    """A 9 GB upload's check read the whole file twice (its sha256, then its lines): now the lines' read hashes the
    bytes as stored, and where a refusal stops the lines early the rest is read into the checksum."""
    rows = [{"text": f"记录 {i} " + "x" * (i % 97)} for i in range(3000)]
    plain = write(tmp_path, rows)
    packed = tmp_path / "d.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=1))
    stops_early = tmp_path / "stops.jsonl"  # not UTF-8 at line 6: the lines stop there, the checksum must not
    stops_early.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows[:5]) + b'{"text": "caf\xe9"}\n'
                            + plain.read_bytes())
    too_long = tmp_path / "long.jsonl"
    too_long.write_bytes(b'{"text": "' + b"a" * (2 << 20) + b'"}\n' + plain.read_bytes())
    monkeypatch.setattr("training.records.MAX_LINE_BYTES", 1 << 20)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda file, *a, **k: opened.append(str(file)) or real_open(file, *a, **k))
    for path, records in ((plain, 3000), (packed, 3000), (stops_early, 5), (too_long, 0)):
        opened.clear()
        report = validate_file(path, "pretrain")
        assert opened.count(str(path)) == 1, opened
        assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert report.size_bytes == path.stat().st_size
        assert report.records == records and report.ok == (records == 3000)


def upload(api_client, token, **data):
    return api_client.post("/api/v1/datasets", data, HTTP_AUTHORIZATION=f"Bearer {token}")


def test_upload_validates_versions_and_is_stored_by_hash(client, user, token, tmp_path, settings):
    bad = SimpleUploadedFile("../../etc/evil.jsonl", b'{"text": "ok"}\n{"txt": 1}\n')
    r = upload(client, token, name="notes", kind="pretrain", file=bad)
    body = r.json()
    assert r.status_code == 400 and body["details"]["validation"]["errors"] == [[2, "missing field 'text'"]]
    assert Dataset.objects.filter(name="notes").count() == 0
    r = upload(client, token, name="notes", kind="pretrain",
               file=SimpleUploadedFile("../../etc/evil.jsonl", b'{"text": "ok"}\n'))
    first = r.json()
    assert r.status_code == 201 and first["version"] == 1 and first["records"] == 1
    stored = Dataset.objects.get(pk=first["id"])
    assert stored.path == str(settings.HOME / "datasets" / f"{first['sha256']}.jsonl")  # the name is never a path
    again = upload(client, token, name="notes", kind="pretrain",
                   file=SimpleUploadedFile("x.jsonl", b'{"text": "ok"}\n')).json()
    assert again["id"] == first["id"]  # the same content is the same version
    second = upload(client, token, name="notes", kind="pretrain",
                    file=SimpleUploadedFile("x.jsonl", b'{"text": "ok"}\n{"text": "more"}\n')).json()
    assert second["version"] == 2 and second["sha256"] != first["sha256"]
    assert Dataset.objects.get(pk=first["id"]).records == 1  # versions are immutable


def test_upload_size_limit_is_a_413(client, token, settings):
    settings.UPLOAD_MAX_BYTES = 50
    r = upload(client, token, name="big", kind="pretrain",
               file=SimpleUploadedFile("b.jsonl", b'{"text": "' + b"x" * 100 + b'"}\n'))
    assert r.status_code == 413


def test_only_admins_import_from_a_server_path(client, token, tmp_path, django_user_model):
    path = write(tmp_path, [{"text": "lab corpus"}])
    assert upload(client, token, name="lab", kind="pretrain", server_path=str(path)).status_code == 403
    admin = django_user_model.objects.create_superuser("root", password="x")
    from accounts.models import ApiToken

    r = upload(client, ApiToken.issue(admin)[1], name="lab", kind="pretrain", server_path=str(path))
    assert r.status_code == 201 and path.exists()  # copied, the lab's file stays


def test_a_dataset_in_use_cannot_be_deleted(client, user, token, tmp_path):
    ds = upload(client, token, name="mine", kind="pretrain",
                file=SimpleUploadedFile("m.jsonl", b'{"text": "a"}\n{"text": "b"}\n')).json()
    job = services.submit_job(owner=user, name="uses it", stage="pretrain", dataset=ds["id"], config=TINY)
    r = client.delete(f"/api/v1/datasets/{ds['id']}", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert r.status_code == 409 and r.json()["details"]["references"] == [f"job #{job.pk} uses it"]
    Job.objects.filter(pk=job.pk).delete()
    path = Dataset.objects.get(pk=ds["id"]).path
    assert client.delete(f"/api/v1/datasets/{ds['id']}", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 200
    assert not Dataset.objects.filter(pk=ds["id"]).exists() and not __import__("os").path.exists(path)


def test_a_later_request_for_statistics_supersedes_an_earlier_one(user, db, monkeypatch, settings,
                                                                  django_capture_on_commit_callbacks):
    """Two clicks on "compute" queued two tasks, each tokenising the whole file on the node's one background worker
    (an hour for a 9 GB SFT file). Only the latest request's task computes: an earlier one that has not started does
    nothing, and one that is running stops at its next progress report."""
    from jobs import dataset_stats
    from jobs.services import queue
    from training.spec import STAGE_DEFAULTS

    sent = []
    monkeypatch.setattr(queue, "enqueue", lambda func, *args, **kw: sent.append((func, args, kw["queue"])))
    ds = Dataset.objects.get(name="demo-sft")
    Dataset.objects.filter(pk=ds.pk).update(owner=user)
    with django_capture_on_commit_callbacks(execute=True):
        services.request_dataset_stats(ds, actor=user)
        services.request_dataset_stats(ds, max_seq_len=20, actor=user)
    assert [(func, q) for func, _, q in sent] == [  # the background cluster's queue, not the job runners'
        ("jobs.tasks.dataset_stats", queue.background_queue(settings.NODE_NAME))] * 2
    first, second = (args for _, args, _ in sent)
    assert first[-1] + 1 == second[-1] == Dataset.objects.get(pk=ds.pk).stats_request
    services.compute_dataset_stats(*first)  # superseded before it started: nothing
    assert Dataset.objects.get(pk=ds.pk).stats_status == "queued"
    real = dataset_stats.compute

    def clicked_again_meanwhile(*args, progress, **kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            services.request_dataset_stats(ds, actor=user)
        progress(0.5)
        raise AssertionError("went on after a later request")

    monkeypatch.setattr(dataset_stats, "compute", clicked_again_meanwhile)
    services.compute_dataset_stats(*second)  # superseded while it ran: it stops, writing nothing
    ds.refresh_from_db()
    assert ds.stats_status == "queued" and ds.stats_worker == "" and ds.stats == {}
    monkeypatch.setattr(dataset_stats, "compute", real)
    services.compute_dataset_stats(*sent[-1][1])  # the latest computes
    ds.refresh_from_db()
    assert ds.stats_status == "done" and ds.stats["max_seq_len"] == STAGE_DEFAULTS["sft"]["max_seq_len"]
    assert ds.stats_worker == ""


def test_statistics_of_a_file_already_counted_are_reused(user, other_user, db, monkeypatch, tmp_path):
    """Thirty students uploading the same corpus queued thirty computations of the same statistics (minutes each on
    the one background worker for MiniMind's 1.6 GB file). A dataset whose bytes were already counted with the same
    tokenizer and max_seq_len takes those statistics; another tokenizer or length is computed."""
    from jobs import dataset_stats

    source = Path(Dataset.objects.get(name="demo-sft").path)
    mine, theirs = (services.create_dataset(owner=owner, name="corpus", kind="sft", source=source, copy_source=True)
                    for owner in (user, other_user))
    services.compute_dataset_stats(mine.pk)
    counted = Dataset.objects.get(pk=mine.pk).stats
    def counted_again(*args, **kwargs):
        raise AssertionError("counted again")

    monkeypatch.setattr(dataset_stats, "compute", counted_again)
    services.compute_dataset_stats(theirs.pk)
    theirs.refresh_from_db()
    assert theirs.stats_status == "done" and theirs.stats == counted and theirs.stats_progress == 1.0
    with pytest.raises(AssertionError, match="counted again"):  # another max_seq_len: computed
        services.compute_dataset_stats(theirs.pk, max_seq_len=64)


def test_the_same_bytes_uploaded_again_take_their_stored_check(user, other_user, db, monkeypatch, tmp_path):
    """Thirty students uploading MiniMind's 9 GB SFT file queued thirty checks of three minutes each on the one
    checks worker. Bytes already checked as a dataset of that kind (anyone's, by this code) take that check: their
    sha256 is read (~1.5 GB/s) instead. Other bytes of the same size, another kind or a report of other code are
    checked whole; the sha256 is read only where a stored dataset of that kind has the file's size."""
    from jobs.services import datasets
    from training import records, token_cache

    source = _numbered(tmp_path)
    mine = services.create_dataset(owner=user, name="corpus", kind="sft", source=source)
    checked, hashed = [], []
    real_check, real_hash = datasets.validate_file, token_cache.file_sha256
    monkeypatch.setattr(datasets, "validate_file", lambda *a, **kw: checked.append(a[0]) or real_check(*a, **kw))
    monkeypatch.setattr(token_cache, "file_sha256", lambda *a, **kw: hashed.append(a[0]) or real_hash(*a, **kw))
    again = tmp_path / "again.jsonl"
    again.write_bytes(source.read_bytes())
    theirs = services.create_dataset(owner=other_user, name="mine-too", kind="sft", source=again)
    assert checked == [] and hashed == [again]
    assert (theirs.sha256, theirs.records, theirs.validation, theirs.path) == (
        mine.sha256, mine.records, mine.validation, mine.path) and theirs.owner == other_user
    assert len(records.load_record_index(theirs.index_path)) == 5
    assert services.dataset_records(theirs, 4321, 1)[0]["conversations"][1]["content"] == "answer 4321"

    text = source.read_text()
    broken = tmp_path / "broken.jsonl"  # the same size, one record cut short: refused, line named
    broken.write_text(text.replace('{"conversations"', '{"conversation_"', 1))
    assert broken.stat().st_size == source.stat().st_size
    with pytest.raises(services.ServiceError) as refused:
        services.create_dataset(owner=other_user, name="broken", kind="sft", source=broken)
    assert checked == [broken] and hashed[-1] == broken and refused.value.details["validation"]["errors"][0][0] == 2
    checked.clear(), hashed.clear()
    other_size = tmp_path / "shorter.jsonl"
    other_size.write_text("".join(text.splitlines(keepends=True)[:-1]))
    services.create_dataset(owner=other_user, name="shorter", kind="sft", source=other_size)
    assert checked == [other_size] and hashed == []  # no stored file of that size: one read, as before
    checked.clear()
    Dataset.objects.filter(pk=mine.pk).update(validation={**mine.validation, "checker": "older code"})
    Dataset.objects.filter(pk=theirs.pk).delete()
    services.create_dataset(owner=other_user, name="mine-again", kind="sft", source=again)
    assert checked == [again]  # checked by other code: checked again


def test_statistics_that_cannot_start_fail_saying_why(user, db):
    """A tokenizer whose folder is gone (or any error before the counting) left the statistics "running" for good,
    their worker alive: they fail with the error, and the worker is no longer named."""
    from models_registry.models import Tokenizer

    ds = Dataset.objects.get(name="demo-sft")
    gone = Tokenizer.objects.create(name="gone", owner=user, path="/nonexistent/tokenizer")
    with pytest.raises(OSError):
        services.compute_dataset_stats(ds.pk, tokenizer_id=gone.pk)
    ds.refresh_from_db()
    assert ds.stats_status == "failed" and "/nonexistent/tokenizer" in ds.stats_error and ds.stats_worker == ""


def test_statistics_with_the_demo_tokenizer(db):
    ds = Dataset.objects.get(name="demo-sft")
    services.compute_dataset_stats(ds.pk, max_seq_len=27)
    ds.refresh_from_db()
    s = ds.stats
    assert ds.stats_status == "done" and s["records"] == ds.records and s["tokenizer"] == "demo-tokenizer"
    assert sum(s["histogram"]["counts"]) == ds.records and 0 < s["truncated_share"] < 1
    assert s["total_tokens"] > ds.records * 10 and abs(sum(s["language"].values()) - 1) < 1e-3
    assert 0 < s["truncated_records"] and len(s["truncated_lines"]) == min(s["truncated_records"], 100)
    with open(ds.path) as f:  # the first line reported is really longer than max_seq_len
        line = f.readlines()[s["truncated_lines"][0] - 1]
    assert len(json.loads(line)["conversations"]) >= 2


def test_estimated_lengths_frame_each_message_in_the_tokenizers_own_tokens(db, tmp_path):
    """Without a token cache (a small file), a conversation's length is its messages' tokens and the template's frame
    as this tokenizer spells it: exact where no system prompt or empty think block is drawn; an RL record is its
    prompt, whatever the placeholder answer."""
    import random

    from jobs import dataset_stats
    from models_registry.models import Tokenizer
    from training.chat import load_hf_tokenizer, prompt_text, render

    folder = Tokenizer.demo().path
    tok = load_hf_tokenizer(folder)
    ask = {"role": "user", "content": "把这个词重复两次：海洋。"}
    chat = [ask, {"role": "assistant", "content": "好的, the ocean", "reasoning_content": "想一想 about it"},
            {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes."}]
    rl = [ask, {"role": "assistant", "content": "a placeholder " * 50}]
    expected = {"sft": render(tok, chat, random.Random(0), 0.0, 1.0),
                "rlaif": prompt_text(tok, rl[:-1], None, 0.0, 1.0)}
    for kind, conversation in (("sft", chat), ("rlaif", rl)):
        path = tmp_path / f"{kind}.jsonl"
        path.write_text(json.dumps({"conversations": conversation}, ensure_ascii=False) + "\n", encoding="utf-8")
        stats = dataset_stats.compute(path, kind, Path(folder) / "tokenizer.json", 768)
        assert stats["max_tokens"] == len(tok.encode(expected[kind], add_special_tokens=False)), kind


def test_the_language_mix_counts_the_scripts_by_their_code_point_ranges():
    from jobs.dataset_stats import letters

    # each range's first and last code point and their neighbours; spaces are not counted; a lone surrogate (JSON
    # may spell one) and a character beyond the BMP are "other"
    chinese = "\u3400\u4dbf\u4e00\u9fff\uf900\ufaff" + "模型"
    latin = "AZaz\u00c0\u00d7\u024f" + "é"
    other = "@[`{\u00bf\u0250\u33ff\u4dc0\u4dff\ua000\uf8ff\ufb00\ud800\U00020000" + "，1_"
    assert letters(chinese + " " + latin + "  " + other) == (len(chinese), len(latin), len(other))
    assert letters("") == (0, 0, 0)


def test_chunked_resumable_upload(client, user, token):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    start = client.post("/api/v1/uploads", **auth).json()
    body = b'{"text": "first"}\n{"text": "second"}\n'
    url = f"/api/v1/uploads/{start['id']}"
    r = client.put(f"{url}?offset=0", body[:10], content_type="application/octet-stream", **auth)
    assert r.json()["offset"] == 10
    r = client.put(f"{url}?offset=0", body[10:], content_type="application/octet-stream", **auth)
    assert r.status_code == 409 and r.json()["details"]["offset"] == 10  # resume from what the server has
    assert client.get(url, **auth).json()["offset"] == 10
    client.put(f"{url}?offset=10", body[10:], content_type="application/octet-stream", **auth)
    r = client.post("/api/v1/datasets", {"name": "chunked", "kind": "pretrain", "upload": start["id"]}, **auth)
    assert r.status_code == 201 and r.json()["records"] == 2
    done = client.get(url, **auth).json()  # it says what it became (for a day)
    assert done["status"] == "done" and done["dataset"]["id"] == r.json()["id"]
    assert client.post("/api/v1/datasets", {"name": "x", "kind": "pretrain", "upload": "not-a-uuid"},
                       **auth).status_code == 404


def test_a_user_has_a_bounded_number_of_uploads_in_progress(client, user, other_user, token, settings):
    """A script that only ever starts uploads made a row and a file each, without end (until the day-old ones were
    pruned): a user has at most UPLOADS_PER_USER unfinished; the stalest one, silent for an hour (a page closed during
    its upload), makes room for a new one; otherwise one more is 429, in the user's language."""
    import io
    import os
    import time

    from jobs import services
    from jobs.models import Upload

    settings.UPLOADS_PER_USER = 3
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    started = [client.post("/api/v1/uploads", **auth) for _ in range(3)]
    assert [r.status_code for r in started] == [201] * 3
    refused = client.post("/api/v1/uploads", HTTP_ACCEPT_LANGUAGE="zh-hans", **auth)
    assert refused.status_code == 429 and refused.json()["error"] == "你已有 3 个上传正在进行：请先完成或删除其中一个"
    assert services.start_upload(other_user)  # one user's count is theirs
    first, second = (Upload.objects.get(pk=r.json()["id"]) for r in started[:2])
    hour_ago = time.time() - services.datasets.UPLOAD_GIVEN_UP_S - 60
    os.utime(second.path, (hour_ago, hour_ago))  # given up on an hour ago
    os.utime(first.path, (hour_ago + 30, hour_ago + 30))  # and this one half a minute later
    assert client.post("/api/v1/uploads", **auth).status_code == 201
    assert not Upload.objects.filter(pk=second.pk).exists() and not second.path.exists()
    assert Upload.objects.filter(owner=user, status="").count() == 3 and first.path.exists()
    services.append_upload(first, 0, io.BytesIO(b'{"text": "a"}\n'), 14)  # it grows again: it stays
    assert client.post("/api/v1/uploads", **auth).status_code == 429


def test_the_pages_write_to_the_api_with_their_csrf_token(user):
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    assert browser.post("/api/v1/uploads").status_code == 401  # a session without the CSRF token is not enough
    browser.get("/datasets/")
    csrf = browser.cookies["csrftoken"].value
    assert browser.post("/api/v1/uploads", HTTP_X_CSRFTOKEN=csrf).status_code == 201


def test_the_form_without_javascript_shows_the_errors(client, user):
    client.force_login(user)
    r = client.post("/datasets/upload/", {"name": "n", "kind": "pretrain",
                                          "file": SimpleUploadedFile("n.jsonl", b'{"text": 1}\n')})
    assert r.status_code == 400 and "1: &#x27;text&#x27; must be a string, not int" in r.content.decode()
    r = client.post("/datasets/upload/", {"name": "n", "kind": "pretrain",
                                          "file": SimpleUploadedFile("n.jsonl", b'{"text": "ok"}\n')})
    assert r.status_code == 302


def test_a_refused_upload_is_explained_in_the_users_language(client, token):
    r = client.post("/api/v1/datasets", {"name": "n", "kind": "sft", "file": SimpleUploadedFile(
        "n.jsonl", b'{"conversations": [{"role": "user", "content": "hi"}]}\nnot json\n' + b"[" * 100_000 + b"\n")},
        HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_ACCEPT_LANGUAGE="zh-hans")
    body = r.json()
    assert r.status_code == 400 and body["details"]["validation"]["errors"] == [
        [1, "'conversations' 中没有可供学习的 assistant 消息"], [2, "不是有效的 JSON（Expecting value，第 1 列）"],
        [3, "无法读取的 JSON（nested too deeply）"]]
    assert body["error"].startswith("file: 3 处错误：第 1 行：")


def test_duplicate_warnings_are_kept_and_read_in_each_readers_language(client, user, token):
    """An upload's warnings stay with the dataset; a reader sees them in their own language, whoever uploaded."""
    r = client.post("/api/v1/datasets", {"name": "dups", "kind": "pretrain", "file": SimpleUploadedFile(
        "d.jsonl", b'{"text": "A b."}\n{"text": "a  B"}\n{"text": "A b."}\n')},
        HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_ACCEPT_LANGUAGE="zh-hans")
    assert r.status_code == 201 and r.json()["validation"]["warnings"][1] == [3, "与第 1 行重复"]
    ds = r.json()["id"]
    assert client.get(f"/api/v1/datasets/{ds}", HTTP_AUTHORIZATION=f"Bearer {token}").json()["validation"][
        "warnings"][1] == [3, "duplicate of line 1"]
    client.force_login(user)
    assert "与第 1 行重复" in client.get(f"/datasets/{ds}/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    stored = Dataset.objects.get(pk=ds)  # a warning stored before, as text: shown as written
    stored.validation["warnings"].append([9, "duplicate of line 4"])
    stored.save()
    assert "line 9: duplicate of line 4" in client.get(f"/datasets/{ds}/").content.decode()


def test_a_job_can_evaluate_on_a_second_file(user, db):
    from jobs.services import build_spec

    train, sft = Dataset.objects.get(name="demo-pretrain"), Dataset.objects.get(name="demo-sft")
    held = Dataset.objects.create(owner=user, name="held-out", kind="pretrain", path=train.path, records=10)
    job = services.submit_job(owner=user, name="e", stage="pretrain", dataset=train.pk, eval_dataset=held.pk,
                              config=TINY)
    assert build_spec(job)["eval_dataset"] == held.path
    assert services.dataset_references(held) == [f"job #{job.pk} e"]
    with pytest.raises(services.ServiceError) as exc:
        services.submit_job(owner=user, name="e", stage="pretrain", dataset=train.pk, eval_dataset=sft.pk,
                            config=TINY)
    assert exc.value.field == "eval_dataset"


def _numbered(tmp_path, n=5000, name="many.jsonl"):
    """``n`` conversations of varied lengths, multi-byte text and a blank line every 97th (a page is found by bytes,
    counted in records)."""
    lines = []
    for i in range(n):
        if i % 97 == 0:
            lines.append("   ")
        lines.append({"conversations": [{"role": "user", "content": f"问题 {i} " + "字" * (i % 50)},
                                        {"role": "assistant", "content": f"answer {i}"}]})
    return write(tmp_path, lines, name)


def _lines_read(monkeypatch):
    """The dataset readers opened during a call, to count the lines each read."""
    from training import records

    opened, real = [], records.open_text

    def spy(*args):
        opened.append(real(*args))
        return opened[-1]

    monkeypatch.setattr(records, "open_text", spy)
    return opened


def test_a_page_anywhere_in_a_large_file_reads_a_few_lines(user, db, tmp_path, monkeypatch):
    """A preview at a deep offset read the file up to it (about 12 s for the last page of a 9 GB SFT file, and a
    ?page=1000000000 read the whole file on every request). A stored file has a sparse index of its records' byte
    offsets, written by the validation's pass; a page reads on from the nearest indexed record."""
    from training import records

    ds = services.create_dataset(owner=user, name="many", kind="sft", source=_numbered(tmp_path))
    assert ds.records == 5000 and len(records.load_record_index(ds.index_path)) == 5  # every 1024th record
    opened = _lines_read(monkeypatch)
    for offset in (0, 1, 1023, 1024, 1025, 2047, 2048, 4095, 4990, 4999):
        page = services.dataset_records(ds, offset, 10)
        assert [r["conversations"][1]["content"] for r in page] == [
            f"answer {i}" for i in range(offset, min(offset + 10, 5000))]
        assert opened[-1].lineno <= 1024 + 10 + 11, (offset, opened[-1].lineno)  # blank lines: one in 97
    opened.clear()
    assert services.dataset_records(ds, 5000, 10) == [] and services.dataset_records(ds, 10**10, 10) == []
    assert opened == []  # past the end: nothing read


def test_a_file_stored_before_indexes_gets_one_in_the_background(user, db, tmp_path, monkeypatch):
    """Versions stored before the index: a deep page reads as before and queues the index's build (a newline scan,
    the same offsets as the validation's); later pages read from it. A gzip file is read from its start."""
    from jobs.services import datasets
    from training import records

    ds = services.create_dataset(owner=user, name="many", kind="sft", source=_numbered(tmp_path))
    written = records.load_record_index(ds.index_path)
    ds.index_path.unlink()
    queued = []
    monkeypatch.setattr(datasets, "background_task", lambda *args, **kw: queued.append(args))
    assert services.dataset_records(ds, 3000, 2)[0]["conversations"][1]["content"] == "answer 3000"
    assert queued == [("jobs.tasks.index_dataset", ds.pk)]
    assert services.dataset_records(ds, 3, 2) and len(queued) == 1  # the first page needs none
    assert services.index_dataset(ds.pk) and not services.index_dataset(ds.pk)  # once
    assert (records.load_record_index(ds.index_path) == written).all()
    opened = _lines_read(monkeypatch)
    assert services.dataset_records(ds, 4000, 1)[0]["conversations"][1]["content"] == "answer 4000"
    assert opened[-1].lineno < 1024 and len(queued) == 1



def test_a_gzip_file_is_read_from_its_seek_points(user, db, tmp_path, monkeypatch, django_capture_on_commit_callbacks):
    """A gzip file cannot be entered in the middle without the decompressor's state there: its seek points
    (indexed_gzip) are built in the background once it is stored; until then a page is read from its start."""
    from jobs.services import datasets
    from training import records

    queued = []
    monkeypatch.setattr(datasets, "background_task",
                        lambda *args, **kw: queued.append(args) if args[0] == "jobs.tasks.index_dataset" else None)
    packed = tmp_path / "many.jsonl.gz"
    packed.write_bytes(gzip.compress(_numbered(tmp_path).read_bytes()))
    with django_capture_on_commit_callbacks(execute=True):
        gz = services.create_dataset(owner=user, name="many-gz", kind="sft", source=packed)
    assert queued == [("jobs.tasks.index_dataset", gz.pk)] and gz.index_path.exists()
    assert not gz.gzip_index_path.exists()
    opened = _lines_read(monkeypatch)
    assert services.dataset_records(gz, 4321, 1)[0]["conversations"][1]["content"] == "answer 4321"
    assert opened[-1].lineno > 4321 and len(queued) == 2  # from the start, asking again for the seek points
    assert services.index_dataset(gz.pk) and gz.gzip_index_path.exists() and not services.index_dataset(gz.pk)
    for offset in (1024, 2047, 4321, 4999):
        page = services.dataset_records(gz, offset, 3)
        assert [r["conversations"][1]["content"] for r in page] == [
            f"answer {i}" for i in range(offset, min(offset + 3, 5000))]
        assert opened[-1].lineno < 1024 + 3 + 11 and len(queued) == 2
    written = records.load_record_index(gz.index_path)
    gz.index_path.unlink()  # stored before indexes: rebuilt from the unpacked lines, the same offsets
    assert services.index_dataset(gz.pk) and (records.load_record_index(gz.index_path) == written).all()
    indexes = gz.index_path, gz.gzip_index_path
    services.delete_dataset(user, gz)
    assert not any(p.exists() for p in indexes)


def test_the_page_goes_to_any_page_and_the_last(client, user, tmp_path):
    ds = services.create_dataset(owner=user, name="many", kind="sft", source=_numbered(tmp_path, n=1234))
    client.force_login(user)
    html = client.get(f"/datasets/{ds.pk}/?page=77").content.decode()
    assert "Records 761–770" in html and "answer 760" in html and "Page 77 of 124" in html
    assert 'href="?page=124" id="last-page"' in html and 'name="page"' in html
    html = client.get(f"/datasets/{ds.pk}/?page=1000000000").content.decode()  # past the end: the last page
    assert "Records 1231–1234" in html and "answer 1233" in html and 'id="next-page"' not in html
    html = client.get(f"/datasets/{ds.pk}/?page=124", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "第 124 页，共 124 页" in html and "跳转到第几页" in html and ">跳转</button>" in html


def test_deleting_a_dataset_removes_its_index(client, user, token, tmp_path):
    ds = services.create_dataset(owner=user, name="many", kind="sft", source=_numbered(tmp_path, n=1100))
    index = ds.index_path
    assert index.exists()
    assert client.delete(f"/api/v1/datasets/{ds.pk}", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 200
    assert not index.exists() and not Path(ds.path).exists()


def _finished_upload(client, auth, body: bytes, name: str, kind: str, **headers):
    start = client.post("/api/v1/uploads", **auth).json()
    url = f"/api/v1/uploads/{start['id']}"
    assert client.put(f"{url}?offset=0", body, content_type="application/octet-stream", **auth).status_code == 200
    return url, start["id"], client.post("/api/v1/datasets", {"upload": start["id"], "name": name, "kind": kind},
                                         **auth, **headers)


def test_a_large_upload_is_checked_in_the_background_with_its_progress(client, user, token, settings, monkeypatch):
    """Finishing an upload checked every record inside the request: seven minutes for a 9 GB file (20 MB/s), the
    browser showing "Checking…" without progress, a web thread and a share of its process's GIL held for all of
    it. A large one now answers 202 at once and is checked on the background cluster; the upload reports the
    check's progress, then its dataset."""
    from jobs.services import datasets

    settings.VALIDATE_INLINE_BYTES = 1000
    queued = []
    monkeypatch.setattr(datasets, "background_task", lambda *args, **kw: queued.append(args))
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    body = b"".join(b'{"text": "record %d"}\n' % i for i in range(100_000))
    url, upload_id, r = _finished_upload(client, auth, body, name="big", kind="pretrain")
    assert r.status_code == 202 and r.json()["status"] == "checking" and r.json()["progress"] == 0
    assert queued == [("jobs.tasks.check_upload", upload_id)]
    put = client.put(f"{url}?offset={len(body)}", b"{}", content_type="application/octet-stream", **auth)
    assert put.status_code == 409  # the file does not change while it is checked
    seen = []
    monkeypatch.setattr(Upload.objects.none().__class__, "update", _spy_progress(seen))
    ds = services.check_upload(upload_id)
    assert ds.records == 100_000 and len(seen) >= 3 and seen == sorted(seen) and 0 < seen[0] < seen[-1] <= 1
    done = client.get(url, **auth).json()
    assert done["status"] == "done" and done["progress"] == 1 and done["dataset"]["id"] == ds.pk
    upload = Upload.objects.get(pk=upload_id)
    assert not upload.path.exists() and Path(ds.path).exists() and Upload.stored_bytes(user) == 0  # moved
    assert services.check_upload(upload_id) is None  # once
    again = client.post("/api/v1/datasets", {"upload": upload_id, "name": "big", "kind": "pretrain"}, **auth)
    assert again.status_code == 409 and f"#{ds.pk}" in again.json()["error"]


def test_a_class_uploads_take_turns_on_the_checks_cluster(user, other_user, settings, monkeypatch):
    """The checks cluster took finished uploads first come, first served: one member who finished ten 9 GB uploads
    held every classmate's behind an hour of checks. Each finish still sends one task, but a task checks the next
    upload in fair order (``Upload.next_to_check``): the owner with the fewest checks running, then the one served
    longest ago; an inline check's upload, which its request checks, is never taken."""
    from jobs import tasks
    from jobs.services import datasets

    settings.VALIDATE_INLINE_BYTES = 10
    queued = []  # the checks cluster's queue: one task per finish, first in first out
    monkeypatch.setattr(datasets, "background_task", lambda func, upload_id, **kw: queued.append(upload_id))

    def finish(owner, name):
        upload = services.start_upload(owner)
        data = b"".join(b'{"text": "%s %d"}\n' % (name.encode(), i) for i in range(20))
        services.append_upload(upload, 0, io.BytesIO(data), len(data))
        assert isinstance(services.finish_upload(upload, name=name, kind="pretrain"), Upload)
        return upload

    def run_task():
        tasks.check_upload(queued.pop(0))

    checked = lambda: list(Dataset.objects.filter(owner__in=(user, other_user)).order_by("pk")  # noqa: E731
                           .values_list("name", flat=True))
    in_request = Upload.objects.create(owner=user, size=5, status="checking", finish={"name": "inline"})
    for name in ("a1", "a2", "a3"):
        finish(user, name)
    run_task()
    finish(other_user, "b1")  # while alice's first was checked
    for _task in range(3):
        run_task()
    assert checked() == ["a1", "b1", "a2", "a3"]  # first come, first served: a1, a2, a3, b1
    assert not queued and Upload.objects.get(pk=in_request.pk).worker == ""  # left to its request

    running = finish(user, "a4")
    Upload.objects.filter(pk=running.pk).update(worker="node-x:1")  # alice's check runs on another worker
    waiting, other = finish(user, "a5"), finish(other_user, "b2")  # bob was served last, but has none running
    assert Upload.next_to_check() == other.pk
    Upload.objects.filter(pk=running.pk).update(status="done", worker="", checked_at=timezone.now())  # just ended
    assert Upload.next_to_check() == other.pk  # bob's turn still: alice's last check began after his
    assert services.check_next_upload().name == "b2" and services.check_next_upload().name == "a5"
    assert services.check_next_upload() is None and Upload.objects.get(pk=waiting.pk).status == "done"


def _spy_progress(seen):
    """QuerySet.update, recording each progress written."""
    from django.db.models.query import QuerySet

    real = QuerySet.update

    def update(self, **kwargs):
        if set(kwargs) == {"progress"}:
            seen.append(kwargs["progress"])
        return real(self, **kwargs)

    return update


def test_a_refused_background_check_answers_in_the_askers_language(client, user, token, settings, monkeypatch):
    """The worker has no request: the refusal is written in the language of the one who finished the upload, the
    part is kept, and it may be finished again as another kind."""
    from jobs.services import datasets

    settings.VALIDATE_INLINE_BYTES = 10
    monkeypatch.setattr(datasets, "background_task", lambda *args, **kw: None)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    url, upload_id, r = _finished_upload(client, auth, b'{"text": "plain text"}\n' * 50, name="t", kind="sft",
                                         HTTP_ACCEPT_LANGUAGE="zh-hans")
    assert r.status_code == 202
    assert services.check_upload(upload_id) is None
    refused = client.get(url, **auth).json()
    assert refused["status"] == "refused" and refused["field"] == "file"
    assert refused["details"]["validation"]["errors"][0] == [1, "缺少字段 'conversations'"]
    assert Upload.objects.get(pk=upload_id).path.exists() and not Dataset.objects.filter(name="t").exists()
    r = client.post("/api/v1/datasets", {"upload": upload_id, "name": "t", "kind": "pretrain"}, **auth)
    assert r.status_code == 202 and services.check_upload(upload_id).records == 50


def test_a_check_whose_worker_died_can_be_finished_again(client, user, token, settings, monkeypatch):
    from django.utils import translation

    from jobs.services import datasets
    from jobs.tests.test_services import dead_pid

    settings.NODE_NAME = "node-x"
    settings.VALIDATE_INLINE_BYTES = 10
    monkeypatch.setattr(datasets, "background_task", lambda *args, **kw: None)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    url, upload_id, _r = _finished_upload(client, auth, b'{"text": "a"}\n' * 20, name="d", kind="pretrain")
    Upload.objects.filter(pk=upload_id).update(worker=f"node-x:{dead_pid()}")  # killed while checking
    assert client.post("/api/v1/datasets", {"upload": upload_id, "name": "d", "kind": "pretrain"},
                       **auth).status_code == 409  # a worker has it
    assert services.reconcile_background("node-x", starting=False) == 1
    lost = client.get(url, **auth).json()
    assert lost["status"] == "refused" and lost["error"].endswith("finish the upload again")
    with translation.override("zh-hans"):
        assert Upload.objects.get(pk=upload_id).to_dict()["error"].endswith("请重新完成上传")
    r = client.post("/api/v1/datasets", {"upload": upload_id, "name": "d", "kind": "pretrain"}, **auth)
    assert r.status_code == 202 and services.check_upload(upload_id).records == 20


class Killed(BaseException):
    """A kill -9: no handler of the process runs."""


@pytest.mark.parametrize("moment", ["save_record_index", "audit", "finish"])
def test_a_check_killed_at_the_worst_moment_loses_nothing(client, user, token, settings, monkeypatch, moment):
    """Killed once the file was in the store (the part moved there) but before the dataset was recorded, or before
    the upload said so: the upload had lost its bytes, and finishing it again failed. The part is now linked into
    the store and dropped only once the upload is done."""
    from jobs.services import datasets
    from jobs.tests.test_services import dead_pid

    settings.NODE_NAME = "node-x"
    settings.VALIDATE_INLINE_BYTES = 10
    monkeypatch.setattr(datasets, "background_task", lambda *args, **kw: None)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    data = b"".join(b'{"text": "record %d"}\n' % i for i in range(40))
    url, upload_id, _r = _finished_upload(client, auth, data, name="d", kind="pretrain")

    def kill(*args, **kwargs):
        raise Killed

    if moment == "finish":  # the dataset recorded, the upload not yet done
        from django.db.models import QuerySet

        real_update = QuerySet.update
        monkeypatch.setattr(QuerySet, "update", lambda qs, **fields: kill() if fields.get("status") == "done"
                            else real_update(qs, **fields))
    else:
        monkeypatch.setattr(datasets.trecords if moment == "save_record_index" else datasets, moment, kill)
    worker = f"node-x:{dead_pid()}"
    monkeypatch.setattr(datasets, "this_worker", lambda: worker)
    with pytest.raises(Killed):
        services.check_upload(upload_id)
    monkeypatch.undo()
    settings.NODE_NAME, settings.VALIDATE_INLINE_BYTES = "node-x", 10
    monkeypatch.setattr(datasets, "background_task", lambda *args, **kw: None)
    assert services.reconcile_background("node-x", starting=False) == 1
    assert client.get(url, **auth).json()["status"] == "refused"
    stored = sorted((settings.HOME / "datasets").glob("*.jsonl"))
    if moment == "save_record_index":  # a refused upload may grow before it is finished again: not what is stored
        more = b'{"text": "one more"}\n'
        assert client.put(f"{url}?offset={len(data)}", more, content_type="application/octet-stream",
                          **auth).status_code == 200
        assert [f.read_bytes() for f in stored] == [data]
        data += more
    r = client.post("/api/v1/datasets", {"upload": upload_id, "name": "d", "kind": "pretrain"}, **auth)
    assert r.status_code == 202
    ds = services.check_upload(upload_id)
    assert ds.records == data.count(b"\n") and Path(ds.path).read_bytes() == data
    assert Dataset.objects.filter(owner=user, name="d").count() == 1
    assert client.get(url, **auth).json()["status"] == "done" and not Upload.objects.get(pk=upload_id).path.exists()


def test_a_large_file_on_the_server_is_imported_in_the_background(client, tmp_path, settings, monkeypatch,
                                                                    django_user_model):
    """An admin's import of a corpus on the lab's disk (MiniMind's 9 GB SFT file) was copied and checked inside the
    request too: it is checked as a large upload is, and the lab's file stays."""
    from accounts.models import ApiToken
    from jobs.services import datasets

    settings.VALIDATE_INLINE_BYTES = 100
    monkeypatch.setattr(datasets, "background_task", lambda *args, **kw: None)
    admin = django_user_model.objects.create_superuser("root", password="x")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {ApiToken.issue(admin)[1]}"}
    path = write(tmp_path, [{"text": f"lab corpus {i}"} for i in range(30)])
    r = client.post("/api/v1/datasets", {"name": "lab", "kind": "sft", "server_path": str(path)}, **auth)
    assert r.status_code == 202 and services.check_upload(r.json()["id"]) is None  # the wrong kind: refused
    url = f"/api/v1/uploads/{r.json()['id']}"
    assert client.get(url, **auth).json()["status"] == "refused"
    again = client.post("/api/v1/datasets", {"name": "lab", "kind": "pretrain", "upload": r.json()["id"]}, **auth)
    assert again.status_code == 202 and services.check_upload(r.json()["id"]).records == 30
    assert client.get(url, **auth).json()["dataset"]["name"] == "lab" and path.exists()  # copied, the lab's file stays
    client.force_login(admin)  # the form without JavaScript: back to the datasets page, which shows the check
    r = client.post(reverse("dataset_upload"), {"name": "lab2", "kind": "pretrain", "server_path": str(path)},
                    follow=True)
    assert r.status_code == 200 and "being checked in the background" in r.content.decode()
    assert 'id="upload-checks"' in r.content.decode() and "lab2" in r.content.decode()


def test_the_datasets_page_shows_uploads_being_checked_and_refused(client, user, token, settings, monkeypatch):
    """The page that finished a large upload may be long closed: the datasets page shows the user's uploads being
    checked, with their progress, and those refused, saying why, in the reader's language."""
    from jobs.services import datasets

    settings.VALIDATE_INLINE_BYTES = 10
    monkeypatch.setattr(datasets, "background_task", lambda *args, **kw: None)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    _finished_upload(client, auth, b'{"text": "a"}\n' * 20, name="big-one", kind="pretrain")
    _url, bad, _r = _finished_upload(client, auth, b'{"text": "a"}\n' * 20, name="wrong-kind", kind="sft")
    services.check_upload(bad)
    Upload.objects.filter(status="checking").update(progress=0.42)
    client.force_login(user)
    html = client.get("/datasets/").content.decode()
    assert 'id="upload-checks"' in html and "big-one" in html and "Pretrain text" in html
    assert "waiting its turn to be checked" in html and "42 %" not in html  # no worker has it yet
    assert "wrong-kind" in html and "refused: file: 20 error(s)" in html
    html = client.get("/datasets/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "你正在检查中的上传" in html and "被拒绝" in html and "删除此上传" in html and "排队等待检查" in html
    assert html.count("删除此上传") == 2  # a check still queued may be dropped too
    checking = Upload.objects.get(status="checking")
    assert client.get(f"/api/v1/uploads/{checking.pk}", **auth).json()["waiting"] is True
    Upload.objects.filter(pk=checking.pk).update(worker=f"{settings.NODE_NAME}:1")  # a worker has it
    html = client.get("/datasets/").content.decode()
    assert html.count("Delete this upload") == 1 and "42 %" in html and "waiting its turn" not in html
    assert client.get(f"/api/v1/uploads/{checking.pk}", **auth).json()["waiting"] is False
    assert client.delete(f"/api/v1/uploads/{checking.pk}", **auth).status_code == 409  # not while it is checked
    part = Upload.objects.get(pk=bad).path
    assert part.exists() and client.post(f"/uploads/{bad}/delete/").status_code == 302  # the page's button
    assert not Upload.objects.filter(pk=bad).exists() and not part.exists()
    assert client.post(f"/uploads/{checking.pk}/delete/", follow=True).status_code == 200
    assert Upload.objects.filter(pk=checking.pk).exists()


def test_old_uploads_are_pruned_but_not_one_a_worker_checks(user, db):
    """Unfinished, done and refused uploads go after a day, and so does a check whose task was lost before a worker
    took it (a node gone, a Redis that keeps nothing): it stayed "checking", its bytes counted, for good."""
    from datetime import timedelta

    old = timezone.now() - timedelta(days=2)
    rows = {kind: Upload.objects.create(owner=user, size=5, created_at=old, **fields) for kind, fields in {
        "unfinished": {}, "done": {"status": "done"}, "refused": {"status": "refused"},
        "lost": {"status": "checking"}, "checked": {"status": "checking", "worker": "node-a:123"}}.items()}
    recent = Upload.objects.create(owner=user, size=5)
    for upload in rows.values():
        upload.path.parent.mkdir(parents=True, exist_ok=True)
        upload.path.write_bytes(b"x" * 5)
    assert services.prune_uploads() == 4
    assert set(Upload.objects.values_list("pk", flat=True)) == {rows["checked"].pk, recent.pk}
    assert not rows["lost"].path.exists() and rows["checked"].path.exists()


def test_background_work_whose_task_was_lost_is_sent_again(client, user, token, settings, monkeypatch,
                                                            django_capture_on_commit_callbacks):
    """A finished upload (or a dataset's statistics) whose task was lost before a worker took it (its node gone, a
    Redis that keeps nothing restarted) said "checking" until it was pruned a day later, its bytes lost ("Computing…"
    for good). The housekeeping now sends it again after ten minutes, once per interval whichever nodes run it; a
    duplicate does nothing."""
    from datetime import timedelta

    from jobs import tasks
    from jobs.services import datasets, nodes, statistics

    settings.VALIDATE_INLINE_BYTES = 10
    sent = []
    for module in (datasets, nodes, statistics):
        monkeypatch.setattr(module, "background_task", lambda func, *args, **kw: sent.append((func, *args)))
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    url, upload_id, r = _finished_upload(client, auth, b'{"text": "a"}\n{"text": "b"}\n', name="d", kind="pretrain")
    check = ("jobs.tasks.check_upload", upload_id)
    assert r.status_code == 202 and sent == [check]
    sent.clear()  # the token is lost
    assert services.resend_background() == 0  # sent a moment ago: it may be waiting behind other work

    def age(model, pk, field, minutes=11):
        ask = getattr(model.objects.get(pk=pk), field)
        model.objects.filter(pk=pk).update(**{field: {**ask, "at": (timezone.now() - timedelta(minutes=minutes))
                                                      .isoformat()}})

    age(Upload, upload_id, "finish")
    tasks.housekeeping()
    assert sent == [check]
    assert services.resend_background() == 0 and services.resend_background(after_s=0) == 1  # stamped: once
    ds = services.check_upload(upload_id)
    assert ds.records == 2 and services.check_upload(upload_id) is None  # the duplicate finds it taken
    assert client.get(url, **auth).json()["status"] == "done"

    with django_capture_on_commit_callbacks(execute=True):  # its statistics, asked for with settings; the token lost
        services.request_dataset_stats(ds, 64, None, actor=user)
    stats = [t for t in sent if t[0] == "jobs.tasks.dataset_stats"]
    sent.clear()
    age(Dataset, ds.pk, "stats_ask")
    request = Dataset.objects.get(pk=ds.pk).stats_request
    assert services.resend_background() == 1 and sent == [stats[-1]] == [("jobs.tasks.dataset_stats", ds.pk, 64,
                                                                          None, request)]
    services.compute_dataset_stats(*sent[0][1:])
    ds.refresh_from_db()
    assert ds.stats_status == "done" and ds.stats["max_seq_len"] == 64
    Dataset.objects.filter(pk=ds.pk).update(stats={**ds.stats, "seen": True})
    services.compute_dataset_stats(*sent[0][1:])  # the duplicate: nothing computed again
    ds.refresh_from_db()
    assert ds.stats_status == "done" and ds.stats["seen"] and services.resend_background(after_s=0) == 0
