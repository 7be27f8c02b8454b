"""A gzip-compressed dataset (``.jsonl.gz``) trains through the portal end to end: upload, validate, tokenise into the
token cache, train; the job shows its data preparation; a second job on the same data reuses the cache."""
import gzip
import json

import pytest

from training.demo_data import pretrain_records, sft_records

from .live import TINY

pytestmark = pytest.mark.e2e


def _gz(records) -> bytes:
    return gzip.compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())


@pytest.mark.parametrize("stage,kind,records", [("pretrain", "pretrain", pretrain_records),
                                                ("sft", "sft", sft_records)])
def test_a_gzipped_dataset_trains_through_the_portal(live, stage, kind, records):
    import random

    data = _gz(records(400, random.Random(f"gz-{stage}")))
    status, ds = live.upload("/api/v1/datasets", {"name": f"gz-{stage}", "kind": kind},
                             {"file": (f"gz-{stage}.jsonl.gz", data)})
    assert status == 201, ds
    assert ds["records"] == 400 and ds["validation"]["ok"], ds
    jobs = []
    for n in range(2):
        status, job = live.request("POST", "/api/v1/jobs", {"name": f"gz-{stage}-{n}", "stage": stage,
                                                            "dataset": ds["id"], "config": {**TINY, "max_steps": 3}})
        assert status == 201, job
        done = live.wait_for(job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"),
                             what="finish")
        assert done["status"] == "succeeded", done
        jobs.append(done)
    first = live.request("GET", f"/api/v1/jobs/{jobs[0]['id']}/logs?after=0")[1]["text"]
    second = live.request("GET", f"/api/v1/jobs/{jobs[1]['id']}/logs?after=0")[1]["text"]
    assert "preparing data: 100 %, 400 records" in first and "data: tokenised 400 records" in first
    assert "data: reusing the token cache" in second and "tokenised" not in second
