"""Tokenizers as first-class objects: training on a dataset, upload (with MiniMind's layout checked), playground."""
import json
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from jobs.models import Dataset
from minicloud.errors import ServiceError
from models_registry import services
from models_registry.models import Tokenizer


def files_of(tok):
    from pathlib import Path

    folder = Path(tok.path)
    return ((folder / "tokenizer.json").read_bytes(), (folder / "tokenizer_config.json").read_bytes())


def test_train_a_tokenizer_on_a_dataset(api, user, db):
    ds = Dataset.objects.get(name="demo-sft")
    r = api.post("/api/v1/tokenizers/train", {"name": "my-bpe", "dataset": ds.pk, "vocab_size": 600})
    assert r.status_code == 202 and r.json()["status"] == "training"
    services.train_tokenizer_now(r.json()["id"])  # what the background task runs
    tok = Tokenizer.objects.get(pk=r.json()["id"])
    assert tok.status == "ready" and 300 < tok.vocab_size <= 600 and tok.trained_on == ds
    config = json.loads(files_of(tok)[1])
    assert config["eos_token"] == "<|im_end|>" and "chat_template" in config
    out = api.post(f"/api/v1/tokenizers/{tok.pk}/encode", {"text": "What is 12 plus 30?"}).json()
    assert out["count"] == len(out["ids"]) > 0 and "".join(out["pieces"]) == "What is 12 plus 30?"
    bad = api.post("/api/v1/tokenizers/train", {"name": "tiny", "dataset": ds.pk, "vocab_size": 10})
    assert bad.status_code == 400 and bad.json()["details"]["field"] == "vocab_size"


def test_background_work_names_its_worker_while_it_runs(user, db, monkeypatch):
    """A tokenizer's training and a dataset's statistics name the worker doing them until they end, so that the
    node's housekeeping can tell when that worker died (jobs.services.reconcile_background)."""
    import training.tokenizer
    from jobs import dataset_stats
    from jobs import services as job_services

    ds = Dataset.objects.get(name="demo-sft")
    seen = []

    def spy(real, read):
        def call(*args, **kwargs):
            seen.append(read())
            return real(*args, **kwargs)
        return call

    tok = services.start_tokenizer_training(owner=user, name="w", dataset=ds, vocab_size=600)
    monkeypatch.setattr(training.tokenizer, "train_tokenizer", spy(training.tokenizer.train_tokenizer,
                                                                   lambda: Tokenizer.objects.get(pk=tok.pk).worker))
    services.train_tokenizer_now(tok.pk)
    monkeypatch.setattr(dataset_stats, "compute", spy(dataset_stats.compute,
                                                      lambda: Dataset.objects.get(pk=ds.pk).stats_worker))
    job_services.compute_dataset_stats(ds.pk)
    assert seen == [job_services.this_worker()] * 2
    assert Tokenizer.objects.get(pk=tok.pk).worker == "" and Dataset.objects.get(pk=ds.pk).stats_worker == ""


def test_playground_shows_a_split_characters_bytes(api, db):
    """A byte-level tokenizer may split a character's UTF-8 bytes across tokens: each such token is shown as its
    bytes (<0xE4>), not as a replacement character, and all the pieces together still spell the text."""
    import re

    demo = Tokenizer.objects.get(name="demo-tokenizer")  # small: most Chinese characters are split into bytes
    text = "Hi 你好，世界。🙂"
    out = api.post(f"/api/v1/tokenizers/{demo.pk}/encode", {"text": text}).json()
    assert out["fragments"] and "\ufffd" not in "".join(out["pieces"])
    spelled = b""
    for n, piece in enumerate(out["pieces"]):
        if n in out["fragments"]:
            assert re.fullmatch(r"(<0x[0-9A-F]{2}>)+", piece)
            spelled += bytes(int(h, 16) for h in re.findall(r"<0x([0-9A-F]{2})>", piece))
        else:
            spelled += piece.encode()
    assert spelled.decode() == text


def test_upload_checks_minimind_layout_and_fills_the_chat_template(client, user, token, db):
    demo = Tokenizer.objects.get(name="demo-tokenizer")
    tjson, tconfig = files_of(demo)
    config = json.loads(tconfig)
    config.pop("chat_template")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}

    def upload(name, body_json, body_config):
        return client.post("/api/v1/tokenizers", {"name": name,
                                                  "tokenizer_json": SimpleUploadedFile("tokenizer.json", body_json),
                                                  "tokenizer_config": SimpleUploadedFile("c.json", body_config)},
                           **auth)

    r = upload("minimind-like", tjson, json.dumps(config).encode())
    assert r.status_code == 201 and r.json()["vocab_size"] == demo.vocab_size
    stored = Tokenizer.objects.get(pk=r.json()["id"])
    assert "chat_template" in json.loads(files_of(stored)[1])
    swapped = json.loads(tjson)
    for t in swapped["added_tokens"]:
        if t["id"] == 2:
            t["content"] = "</s>"
    swapped["model"]["vocab"] = {("</s>" if k == "<|im_end|>" else k): v for k, v in swapped["model"]["vocab"].items()}
    r = upload("wrong-layout", json.dumps(swapped).encode(), tconfig)
    assert r.status_code == 400 and "id 2 must be <|im_end|>" in r.json()["error"]
    assert upload("junk", b"{not json", tconfig).status_code == 400
    assert upload("minimind-like", tjson, tconfig).status_code == 409


@pytest.mark.parametrize("lang", ["en", "zh-hans"])
def test_tokenizer_pages(client, user, lang):
    client.force_login(user)
    demo = Tokenizer.objects.get(name="demo-tokenizer")
    assert client.get("/tokenizers/", HTTP_ACCEPT_LANGUAGE=lang).status_code == 200
    page = client.get(f"/tokenizers/{demo.pk}/", HTTP_ACCEPT_LANGUAGE=lang).content.decode()
    assert 'id="playground-text"' in page and str(demo.vocab_size) in page
    ready = "可用" if lang == "zh-hans" else "ready"
    assert f'data-status="ready">{ready}' in page
    assert f"<td>{ready}</td>" in client.get("/tokenizers/", HTTP_ACCEPT_LANGUAGE=lang).content.decode()


def test_delete_a_tokenizer_nothing_uses(api, client, user, other_user, db, settings, tmp_path):
    """A failed tokenizer (its worker died, say) held its name and its folder for good: nobody could delete one. Its
    owner now can, when no job or model uses it and it is not training; the folder goes with it."""
    from django.utils import translation

    from jobs import services as job_services

    settings.HOME = tmp_path
    ds = Dataset.objects.get(name="demo-sft")
    queued = services.start_tokenizer_training(owner=user, name="queued", dataset=ds, vocab_size=600)
    assert api.delete(f"/api/v1/tokenizers/{queued.pk}").status_code == 200  # not started: its task finds nothing
    services.train_tokenizer_now(queued.pk)
    assert not Tokenizer.objects.filter(pk=queued.pk).exists() and not (tmp_path / "tokenizers").exists()
    tok = services.start_tokenizer_training(owner=user, name="mine", dataset=ds, vocab_size=600)
    Tokenizer.objects.filter(pk=tok.pk).update(worker="node-x:1")  # a worker trains it
    r = api.delete(f"/api/v1/tokenizers/{tok.pk}")
    assert r.status_code == 409 and "still training" in r.json()["error"]
    Tokenizer.objects.filter(pk=tok.pk).update(worker="")
    services.train_tokenizer_now(tok.pk)
    tok.refresh_from_db()
    folder = Path(tok.path)
    assert folder.is_dir() and folder.parent == tmp_path / "tokenizers"
    job = job_services.submit_job(owner=user, name="uses-it", stage="sft", dataset=ds.pk, tokenizer=tok.pk,
                                  config={"max_steps": 1})
    r = api.delete(f"/api/v1/tokenizers/{tok.pk}")
    assert r.status_code == 409 and r.json()["details"]["references"] == [f"job #{job.pk} uses-it"]
    with translation.override("zh-hans"), pytest.raises(ServiceError) as refused:
        services.delete_tokenizer(user, tok)
    assert str(refused.value).startswith("分词器正被 1 个对象使用")
    job.delete()
    client.force_login(other_user)  # another user's: not theirs to delete (and not visible: 404)
    assert client.post(f"/tokenizers/{tok.pk}/delete/").status_code == 404
    demo = Tokenizer.objects.get(name="demo-tokenizer")
    assert api.delete(f"/api/v1/tokenizers/{demo.pk}").status_code == 403  # the portal's own
    client.force_login(user)
    page = client.get(f"/tokenizers/{tok.pk}/")
    assert b'id="delete-tokenizer">' in page.content  # not disabled: nothing uses it
    r = client.post(f"/tokenizers/{tok.pk}/delete/", follow=True)
    assert r.redirect_chain[-1][0] == "/tokenizers/" and "Tokenizer deleted." in r.content.decode()
    assert not Tokenizer.objects.filter(pk=tok.pk).exists() and not folder.exists()
    assert services.start_tokenizer_training(owner=user, name="mine", dataset=ds).name == "mine"  # the name is free


def test_a_user_trains_at_most_two_tokenizers_at_once(api, user, db, settings):
    """Each training is minutes of the node's one background worker, which everyone's statistics and tokenizers
    share: a student's loop of POSTs queued them without end. A third while two train is refused (429); once one
    has ended, another may start."""
    ds = Dataset.objects.get(name="demo-sft")
    ids = [api.post("/api/v1/tokenizers/train", {"name": f"t{n}", "dataset": ds.pk}).json()["id"] for n in range(2)]
    r = api.post("/api/v1/tokenizers/train", {"name": "t2", "dataset": ds.pk})
    assert r.status_code == 429 and r.json()["error"].startswith("you already have 2 tokenizers training")
    Tokenizer.objects.filter(pk=ids[0]).update(status="failed")
    assert api.post("/api/v1/tokenizers/train", {"name": "t2", "dataset": ds.pk}).status_code == 202


def test_tokenizer_files_are_bounded_and_count_against_storage(client, user, token, db, settings):
    """A tokenizer upload is parsed in the web process: a multi-gigabyte tokenizer.json (JSON that parses) would take
    that process's memory, and tokenizers were counted in nobody's storage. Each file is bounded (413), a stored
    tokenizer counts in its owner's storage, and an upload past the quota is refused (403) with nothing stored."""
    from accounts.models import Quota
    from accounts.services import storage_used

    demo = Tokenizer.objects.get(name="demo-tokenizer")
    tjson, tconfig = files_of(demo)

    def upload(name):
        return client.post("/api/v1/tokenizers", {"name": name, "tokenizer_json": SimpleUploadedFile("t.json", tjson),
                                                  "tokenizer_config": SimpleUploadedFile("c.json", tconfig)},
                           HTTP_AUTHORIZATION=f"Bearer {token}")

    settings.TOKENIZER_MAX_BYTES = len(tjson) - 1
    r = upload("too-big")
    assert r.status_code == 413 and r.json()["details"]["field"] == "tokenizer_json"
    settings.TOKENIZER_MAX_BYTES = len(tjson)
    before = storage_used(user)
    assert upload("fits").status_code == 201
    stored = Tokenizer.objects.get(owner=user, name="fits")
    assert stored.size_bytes >= len(tjson) + len(tconfig) and storage_used(user) == before + stored.size_bytes
    Quota.objects.create(user=user, storage_gb=(storage_used(user) + len(tjson)) / 1e9)
    r = upload("past-the-quota")
    assert r.status_code == 403 and r.json()["details"]["field"] == "quota"
    assert not Tokenizer.objects.filter(name="past-the-quota").exists()
    assert len(list((settings.HOME / "tokenizers").iterdir())) == 1  # only the stored one's folder
