"""The storage quota's check at each submission, as JSON: a user who has run many jobs.

    python bench/storage_check.py                     # 100, 300 and 1000 finished jobs
    python bench/storage_check.py --jobs 300 --repeat 20

For each size, one user owns that many finished jobs, each with a run folder laid out as a real tiny run leaves it
(engine.log, spec.json, model.pth, model_config.json, checkpoints/ with resume.pt, a step checkpoint and index.json,
tensorboard/ with one event file: 8 files in 3 folders), plus one queued job. It times ``Job.stored_bytes`` (the job
part of ``accounts.services.storage_used``, which every submission of a user with a storage quota runs): the
reference is the previous code, measured in the same run -- a walk of every job's folder -- and the new reads the
size each finished job's folder had when it ended (``Job.disk_bytes``) and walks only the others. Both must give the
same bytes. Local disk, page cache warm: on shared storage (NFS, a Slurm cluster's home) each file's stat is a
network round trip, and the walk costs far more.
"""
import argparse
import json
import statistics
import time

from fresh_portal import fresh_portal

FILES = {"engine.log": 20_000, "spec.json": 2_000, "model.pth": 100_000, "model_config.json": 1_000,
         "checkpoints/resume.pt": 300_000, "checkpoints/step-0000024.pt": 300_000, "checkpoints/index.json": 200,
         "tensorboard/events.out.tfevents.1.vm": 5_000}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, nargs="*", default=[100, 300, 1000])
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    fresh_portal("minicloud-storage-")
    from django.contrib.auth import get_user_model

    from jobs.models import Dataset, Job
    from minicloud.files import disk_usage
    from models_registry.models import Tokenizer

    ds, tok = Dataset.objects.get(name="demo-pretrain"), Tokenizer.objects.get(name="demo-tokenizer")  # migrate's
    for n in args.jobs:
        user = get_user_model().objects.create_user(f"student-{n}")
        jobs = Job.objects.bulk_create([Job(owner=user, name=f"run-{i}", stage="pretrain", dataset=ds, tokenizer=tok,
                                            status="queued") for i in range(n + 1)])
        for job in jobs[:n]:
            for name, size in FILES.items():
                path = job.run_dir / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"\0" * size)
            Job.objects.filter(pk=job.pk).update(status="running")
            job.refresh_from_db()
            job.transition(Job.Status.SUCCEEDED)  # measures its folder once, as the supervisor's finish does

        def previous():  # the code before: every job's folder walked
            return sum(disk_usage(job.run_dir) for job in Job.objects.filter(owner=user).only("pk"))

        def new():
            return Job.stored_bytes(user)

        times = {"previous": [], "new": []}
        for _ in range(args.repeat):
            for name, f in (("previous", previous), ("new", new)):
                t = time.perf_counter()
                result = f()
                times[name].append(time.perf_counter() - t)
                assert result == n * sum(FILES.values()), (name, result)
        print(json.dumps({"finished_jobs": n, "files_per_run": len(FILES), "repeat": args.repeat,
                          **{f"{k}_ms": round(statistics.median(v) * 1000, 2) for k, v in times.items()},
                          "speedup": round(statistics.median(times["previous"]) / statistics.median(times["new"]), 1)}))


if __name__ == "__main__":
    main()
