"""The portal's side of the token caches: specs name the cache and the dataset's checksum, the job page shows the
data preparation, token statistics reuse a cache, and ``manage.py data_cache`` lists and clears them."""
import io
import json
from pathlib import Path

import pytest
from django.core.management import call_command

from jobs import services
from jobs.models import Dataset
from jobs.validation import validate_file
from models_registry.models import Tokenizer
from training import token_cache

from conftest import TINY


@pytest.fixture
def cache_dir(settings, tmp_path):
    settings.DATA_CACHE_DIR = tmp_path / "data-cache"
    return settings.DATA_CACHE_DIR


def _prepare(ds, processing, cache_dir):
    from training.chat import load_hf_tokenizer

    tok_dir = Tokenizer.demo().path
    return token_cache.prepare(ds.path, load_hf_tokenizer(tok_dir), tok_dir, processing, {}, cache_dir,
                               data_sha=ds.sha256)


def test_the_spec_names_the_cache_its_cap_and_the_dataset_checksum(user, cache_dir):
    ds = Dataset.objects.get(name="demo-sft")
    job = services.submit_job(owner=user, name="j", stage="sft", dataset=ds.pk, config=TINY)
    spec = services.build_spec(job)
    assert spec["data_cache"] == str(cache_dir) and spec["data_cache_gb"] > 0
    assert spec["checksums"] == {ds.path: ds.sha256} and len(ds.sha256) == 64


def test_the_job_shows_its_data_preparation_until_its_first_step(user):
    from jobs.supervisor import Supervisor

    ds = Dataset.objects.get(name="demo-pretrain")
    job = services.submit_job(owner=user, name="prep", stage="pretrain", dataset=ds.pk, config=TINY)
    job.transition("running")
    sup = Supervisor(job)
    sup.raw_log = io.StringIO()
    sup.lines.put(sup.token + " " + json.dumps({"event": "progress", "time": 0, "phase": "prepare", "fraction": 0.41,
                              "records": 2_100_000}))
    sup.flush()
    job.refresh_from_db()
    assert job.phase_text == "preparing data: 41 %, 2.1 M records"
    assert job.to_dict()["phase_text"] == job.phase_text
    from jobs.models import LogChunk

    assert "preparing data: 41 %, 2100000 records" in "".join(LogChunk.objects.filter(job=job).values_list("text",
                                                                                                      flat=True))
    from django.utils import translation

    with translation.override("zh-hans"):
        assert job.phase_text == "正在准备数据：41 %，2.1 M 条记录"
    sup.lines.put(sup.token + " " + json.dumps({"event": "start", "time": 0, "total_steps": 5}))
    sup.flush()
    job.refresh_from_db()
    assert job.phase == {} and job.phase_text == ""
    # after the start, a background build's progress is for the log only: the page keeps the steps
    sup.lines.put(sup.token + " " + json.dumps({"event": "progress", "time": 0, "phase": "prepare", "fraction": 0.5, "records": 9}))
    sup.flush()
    job.refresh_from_db()
    assert job.phase == {} and "preparing data: 50 %, 9 records" in LogChunk.objects.filter(job=job).last().text
    # an odd progress event (a new run of the job) is recorded as numbers, never trusted as text
    sup = Supervisor(job)
    sup.raw_log = io.StringIO()
    sup.lines.put(sup.token + " " + json.dumps({"event": "progress", "time": 0, "phase": "prepare", "fraction": "<b>x</b>",
                              "records": None}))
    sup.flush()
    job.refresh_from_db()
    assert job.phase == {"name": "prepare", "fraction": 0.0, "records": 0}


def test_token_statistics_reuse_a_jobs_cache(client, user, cache_dir):
    ds = Dataset.objects.get(name="demo-sft")
    services.compute_dataset_stats(ds.pk)
    fresh = Dataset.objects.get(pk=ds.pk).stats
    assert fresh["from_token_cache"] is False
    client.force_login(user)
    assert 'id="stats-estimated"' in client.get(f"/datasets/{ds.pk}/").content.decode()  # the page says so
    cache = token_cache.Cache(_prepare(ds, "sft", cache_dir))
    services.compute_dataset_stats(ds.pk)
    reused = Dataset.objects.get(pk=ds.pk).stats
    assert reused["from_token_cache"] is True and reused["records"] == 3000
    assert reused["total_tokens"] == int(token_cache.record_lengths(cache).sum())
    # exact (the rendered template: framing, empty think blocks) where the statistics' own count estimates
    assert reused["mean_tokens"] > fresh["mean_tokens"] and sum(reused["histogram"]["counts"]) == 3000
    assert 'id="stats-estimated"' not in client.get(f"/datasets/{ds.pk}/").content.decode()


def test_statistics_of_a_large_file_build_the_cache_a_default_job_reads(user, cache_dir, settings):
    settings.STATS_TOKEN_CACHE_MB = 0  # the demo file counts as large
    ds = Dataset.objects.get(name="demo-sft")
    services.compute_dataset_stats(ds.pk)
    stats = Dataset.objects.get(pk=ds.pk).stats
    assert stats["from_token_cache"] is True and stats["records"] == 3000
    # the very cache a job keeping the default options reads (training.rows.load names it so): it tokenises nothing
    job = services.submit_job(owner=user, name="j", stage="sft", dataset=ds.pk, config=TINY)
    spec = services.build_spec(job)
    name = token_cache.cache_name(ds.sha256, token_cache.tokenizer_digest(spec["tokenizer"]), "sft",
                                  token_cache.processing_options("sft", spec["config"]))
    assert [c["name"] for c in token_cache.list_caches(cache_dir)] == [name]
    assert stats["total_tokens"] == int(token_cache.record_lengths(token_cache.Cache(cache_dir / name)).sum())


def test_statistics_superseded_while_the_cache_is_built_stop_the_builder(user, cache_dir, settings, tmp_path):
    import signal

    from training.demo_data import write_sized

    from jobs.services import statistics

    settings.STATS_TOKEN_CACHE_MB = 1
    write_sized(tmp_path / "sft.jsonl", "sft", 6 << 20)  # tokenised by worker processes for a few seconds
    ds = services.create_dataset(owner=user, name="big", kind="sft", source=tmp_path / "sft.jsonl")
    seen = []

    def progress(p):
        seen.append(p)
        raise statistics._Superseded  # a later request took over as the build started

    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a django-q2 worker: its children inherit it
    try:
        with pytest.raises(statistics._Superseded):
            statistics._statistics(ds, None, None, progress)
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert seen == [0.0]
    # interrupted, the builder removed its part (killed, it would leave it; left running, it would finish the cache)
    assert token_cache.list_caches(cache_dir) == [] and not [p for p in cache_dir.iterdir() if ".part" in p.name]


def test_statistics_whose_cache_cannot_be_built_are_counted_without_it(user, settings, tmp_path, caplog):
    settings.STATS_TOKEN_CACHE_MB = 0
    settings.DATA_CACHE_DIR = tmp_path / "a-file"
    settings.DATA_CACHE_DIR.write_text("not a folder")
    ds = Dataset.objects.get(name="demo-sft")
    services.compute_dataset_stats(ds.pk)
    ds.refresh_from_db()
    assert ds.stats_status == "done" and ds.stats["from_token_cache"] is False and ds.stats["records"] == 3000
    assert "the token cache was not built" in caplog.text


def test_the_command_lists_and_clears_caches(user, cache_dir):
    folder = _prepare(Dataset.objects.get(name="demo-pretrain"), "pretrain", cache_dir)
    out = io.StringIO()
    call_command("data_cache", "list", stdout=out)
    assert folder.name in out.getvalue() and "1 cache(s)" in out.getvalue() and "6000 records" in out.getvalue()
    out = io.StringIO()
    call_command("data_cache", "clear", "--all", stdout=out)
    assert f"removed: {folder.name}" in out.getvalue() and not Path(folder).exists()
    call_command("data_cache", "evict", "--gb", "0", stdout=io.StringIO())


def test_what_a_killed_build_leaves_is_removed_by_the_housekeeping(user, cache_dir, settings, tmp_path):
    import fcntl
    import subprocess
    import sys

    from jobs import tasks
    from training.demo_data import write_sized

    write_sized(tmp_path / "sft.jsonl", "sft", 6 << 20)
    child = subprocess.Popen([sys.executable, "-m", "training", "prepare", str(tmp_path / "sft.jsonl"), "--tokenizer",
                              Tokenizer.demo().path, "--processing", "sft", "--options", "{}", "--cache",
                              str(cache_dir)], cwd=settings.BASE_DIR, stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        if '"progress"' in line:  # building: its part is there
            break
    child.kill()  # a job cancelled while tokenising, a worker killed under statistics: no rename, no cleanup
    child.wait()
    parts = list(cache_dir.glob(".*.part*"))
    assert len(parts) == 1 and token_cache.list_caches(cache_dir) == []
    with open(cache_dir / f"{parts[0].name.rsplit('.part', 1)[0]}.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a build in progress holds it: its part is not a leftover
        tasks.housekeeping()
        assert parts[0].exists()
    out = io.StringIO()
    call_command("data_cache", "list", stdout=out)
    assert "1 unfinished build(s) that killed processes left" in out.getvalue()
    tasks.housekeeping()
    assert not parts[0].exists() and token_cache.leftovers(cache_dir) == []


def test_numeric_expected_answers_pass_validation(tmp_path):
    """MiniMind's agent-RL data gives ``gt`` as numbers; it reads them with str()."""
    path = tmp_path / "agent.jsonl"
    msgs = [{"role": "user", "content": "What is 50 plus 9?"}, {"role": "assistant", "content": ""}]
    path.write_text("".join(json.dumps({"conversations": msgs, "gt": gt}) + "\n" for gt in ([59], 59, ["59", 1.5])))
    report = validate_file(path, "rlaif")
    assert report.ok and report.records == 3, report.errors
