"""Trackers fed by the supervisor's side: TensorBoard event files that tensorboard reads back, W&B and SwanLab
offline runs holding the same series, a failing tracker that never fails anything, the TensorBoard zip download."""
import io
import json
import struct
import zipfile
from pathlib import Path

import pytest

from jobs.models import Dataset, Job
from jobs.trackers import RunTrackers
from models_registry.models import Tokenizer

LOSSES = [(2, 5.5), (4, 4.25), (6, 3.0), (8, 2.75)]


def tensorboard_series(folder: Path, tag: str = "loss") -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def _leveldb_records(path: Path):
    """The records of a W&B / SwanLab run file (LevelDB's log format: 32 KiB blocks of crc, length, type, data)."""
    data = path.read_bytes()[7:]  # the file header: magic, id, version
    pos, buf, out = 0, b"", []
    while pos + 7 <= len(data):
        block_left = 32768 - ((pos + 7) % 32768)
        if block_left < 7 and block_left != 0 and (pos + 7) % 32768 != 0:
            pos += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            out.append(buf)
            buf = b""
    return out


def wandb_history(run_dir: Path, key: str = "loss") -> list[tuple[int, float]]:
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = []
    for raw in _leveldb_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            if key in items:
                out.append((int(items["_step"]), round(items[key], 6)))
    return out


def swanlab_history(run_dir: Path, key: str = "loss") -> list[tuple[int, float]]:
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    (path,) = run_dir.glob("swanlab/run-*/run-*.swanlab")
    reader, out = DataStoreReader(), []
    reader.open(path)
    while (raw := reader.scan()) is not None:
        rec = Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "scalar" and rec.scalar.key == key:
            out.append((rec.scalar.step, round(rec.scalar.value.number, 6)))
    reader.close()
    return out


@pytest.fixture
def job(user, db):
    return Job.objects.create(owner=user, name="tracked", stage="pretrain",
                              dataset=Dataset.objects.get(name="demo-pretrain"),
                              tokenizer=Tokenizer.objects.get(name="demo-tokenizer"),
                              resolved_config={"learning_rate": 1e-3, "batch_size": 16},
                              trackers={"wandb": {"project": "p", "mode": "offline"},
                                        "swanlab": {"project": "p", "mode": "offline"}})


def test_every_tracker_gets_the_series_the_supervisor_logs(job, client, user):
    run_dir = job.run_dir
    run_dir.mkdir(parents=True)
    trackers = RunTrackers(job, run_dir).start()
    for step, loss in LOSSES:
        trackers.log(step, {"loss": loss, "lr": 1e-3, "note": "text is skipped", "bad": float("nan")})
    trackers.close()
    notes = trackers.drain_notes()
    assert any("W&B offline run" in n and "wandb sync" in n for n in notes), notes
    assert any("SwanLab offline run" in n and "swanlab sync" in n for n in notes), notes
    assert tensorboard_series(run_dir / "tensorboard") == LOSSES
    assert wandb_history(run_dir) == LOSSES
    assert swanlab_history(run_dir) == LOSSES
    client.force_login(user)
    r = client.get(f"/jobs/{job.pk}/tensorboard.zip")
    assert r.status_code == 200 and r["Content-Disposition"].endswith(f'job-{job.pk}-tensorboard.zip"')
    z = zipfile.ZipFile(io.BytesIO(b"".join(r.streaming_content)))
    assert all(n.startswith(f"job-{job.pk}/tensorboard/events.out.tfevents.") for n in z.namelist())
    assert not list(run_dir.glob("*.zip"))  # the zip is not left on disk


def test_a_failing_tracker_is_switched_off_and_the_others_go_on(job, monkeypatch):
    from jobs import trackers as mod

    def broken_init(self, *args, **kwargs):
        raise RuntimeError("wandb-core would not start")

    class Flaky:
        name = "SwanLab"
        note = "flaky"

        def __init__(self, *a, **k):
            pass

        def log(self, step, values):
            raise OSError("disk full")

        def close(self):
            pass

    monkeypatch.setattr(mod.WandB, "__init__", broken_init)
    monkeypatch.setattr(mod, "SwanLab", Flaky)
    job.run_dir.mkdir(parents=True)
    t = RunTrackers(job, job.run_dir).start()
    for step, loss in LOSSES:
        t.log(step, {"loss": loss})
    t.close()
    notes = " | ".join(t.drain_notes())
    assert "wandb is off for this run: wandb-core would not start" in notes
    assert "SwanLab stopped: disk full" in notes
    assert tensorboard_series(job.run_dir / "tensorboard") == LOSSES
