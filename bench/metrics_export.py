"""The compare page and the metrics downloads at a class's sizes, as JSON: the compare page of many long runs (its
time and size, in process), and a long run's JSON download, streamed (this tree) beside the whole document built in
memory first (the previous way), its peak memory measured with tracemalloc (which slows both alike).

    python bench/metrics_export.py                       # 100 runs of 5,000 points compared; a 200,000-point run
    python bench/metrics_export.py --jobs 100 --points 5000 --long 200000
"""
import argparse
import json
import os
import sys
import time
import tracemalloc

from fresh_portal import fresh_portal


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=100, help="runs asked for on one compare page")
    p.add_argument("--points", type=int, default=5000, help="each compared run's metric points")
    p.add_argument("--long", type=int, default=200_000, help="the long run's points (its JSON download)")
    args = p.parse_args()
    os.environ["ALLOWED_HOSTS"] = "testserver"
    fresh_portal("minicloud-metrics-export-")
    from django.contrib.auth import get_user_model
    from django.test import Client

    from jobs.models import Dataset, Job, MetricPoint
    from jobs.services import exports
    from models_registry.models import Tokenizer

    user = get_user_model().objects.create_user("student")
    ds, tok = Dataset.objects.get(name="demo-pretrain"), Tokenizer.objects.get(name="demo-tokenizer")

    def run(name, points):
        job = Job.objects.create(owner=user, name=name, stage="pretrain", dataset=ds, tokenizer=tok,
                                 status="succeeded", config={"lr": name}, resolved_config={"lr": name})
        MetricPoint.objects.bulk_create(
            [MetricPoint(job=job, seq=s, step=s, time=float(s), values={"loss": 5 - s / points, "lr": 1e-3,
                                                                        "tokens": s * 1000, "grad_norm": 1.0})
             for s in range(1, points + 1)], batch_size=5000)
        return job

    client = Client()
    client.force_login(user)
    jobs = [run(f"sweep-{i}", args.points) for i in range(args.jobs)]
    ids = ",".join(str(j.pk) for j in jobs)
    start = time.perf_counter()
    page = client.get(f"/jobs/compare/?ids={ids}")
    out = {"bench": "metrics_export", "cpus": os.cpu_count(), "compare": {
        "jobs_asked": args.jobs, "points_each": args.points, "status": page.status_code,
        "seconds": round(time.perf_counter() - start, 2), "page_mb": round(len(page.content) / 2**20, 1)}}

    long = run("long", args.long)

    def whole_document():  # the previous download: the document built, then dumped
        return json.dumps({"jobs": [{"id": long.pk, "name": long.name, "stage": long.stage, "status": long.status,
                                     "config": long.resolved_config,
                                     "points": [{"seq": s, "step": st, "time": t, "values": v}
                                                for s, st, t, v in exports._raw_points(long)]}]}, ensure_ascii=False)

    out["json_download"] = {"points": args.long}
    for code, make in [("previous", whole_document), ("streamed", lambda: exports.metrics_json([long]))]:
        tracemalloc.start()
        start = time.perf_counter()
        size = sum(len(piece) for piece in make())
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out["json_download"][code] = {"seconds": round(seconds, 2), "peak_mb": round(peak / 2**20, 1),
                                      "mb": round(size / 2**20, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
