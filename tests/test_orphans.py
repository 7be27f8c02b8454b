"""``manage.py orphans``: files under MINICLOUD_HOME that no record names (a process killed between a file and its
row) are listed and, with --delete, removed; everything a record names, and anything written in the last hour,
stays."""
import io
import os
import time
from pathlib import Path

from django.core.management import call_command

from jobs.models import Dataset, Job, Upload
from jobs.services import create_dataset
from models_registry.models import ModelVersion, Tokenizer


def _old(path, hours=2):
    """``path`` and everything in it last written ``hours`` ago."""
    stamp = time.time() - hours * 3600
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(p, (stamp, stamp))
    return path


def _write(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def test_orphans_are_listed_then_removed_and_nothing_named_is_touched(user, settings, tmp_path):
    home = settings.HOME
    source = tmp_path / "kept.jsonl"
    source.write_text('{"text": "a dataset someone uses"}\n' * 20)
    kept_ds = create_dataset(owner=user, name="kept", kind="pretrain", source=source)
    job = Job.objects.create(owner=user, name="j", stage="pretrain", dataset=kept_ds, tokenizer=Tokenizer.demo())
    kept_run = _write(job.run_dir / "checkpoints" / "step-0000010.pt", 1000).parent.parent
    mv = ModelVersion.objects.create(owner=user, name="m", path="", size_bytes=0)
    kept_model = _write(mv.files_dir / "model.pth", 500).parent
    upload = Upload.objects.create(owner=user, size=10)
    kept_part = _write(upload.path, 10)
    kept = [Path(kept_ds.path), kept_ds.index_path, kept_run, kept_model, kept_part]
    for path in kept:
        _old(path)
    orphans = [_old(_write(home / "datasets" / ("0" * 64 + ".jsonl"), 3000)),  # moved in, its row never committed
               _old(_write(home / "datasets" / ("1" * 64 + ".jsonl.part"), 200)),
               _old(_write(home / "runs" / "job-99999" / "checkpoints" / "step-0000020.pt", 4000).parent.parent),
               _old(_write(home / "models" / "import-1234abcd" / "model.pth", 700).parent),  # an import killed
               _old(_write(home / "uploads" / "0b6c1a3e-7f00-4a59-9a7a-2f1c4e6a0d11.part", 50)),
               _old(_write(home / "tokenizers" / ("a" * 32) / "tokenizer.json", 60).parent)]
    recent = _write(home / "runs" / "job-99998" / "checkpoints" / "resume.pt", 10).parent.parent  # being written

    out = io.StringIO()
    call_command("orphans", stdout=out)
    listed = out.getvalue()
    assert all(str(p) in listed for p in orphans), listed
    assert not any(str(p) in listed for p in kept + [recent]), listed
    assert "6 orphan(s)" in listed and all(p.exists() for p in orphans)  # only listed

    out = io.StringIO()
    call_command("orphans", "--delete", stdout=out)
    assert "removed 6 orphan(s)" in out.getvalue()
    assert not any(p.exists() for p in orphans)
    assert all(p.exists() for p in kept + [recent])
    assert Dataset.objects.filter(pk=kept_ds.pk).exists()


def test_a_tokenizer_in_training_keeps_every_tokenizer_folder(user, settings):
    """A tokenizer being trained names its folder only once trained: while one trains, none is taken."""
    folder = _old(_write(settings.HOME / "tokenizers" / ("b" * 32) / "tokenizer.json", 60).parent)
    ds = Dataset.objects.filter(kind="pretrain").first()
    Tokenizer.objects.create(name="t", owner=user, path="", status="training", trained_on=ds, vocab_size=300)
    out = io.StringIO()
    call_command("orphans", "--delete", stdout=out)
    assert folder.exists() and "removed 0 orphan(s)" in out.getvalue()
