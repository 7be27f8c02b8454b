"""MiniCloud's training engine.

Runs on its own: ``python -m training run SPEC.json``. It never imports Django; the portal talks to it only through
the spec file (JSON in) and JSON-lines events on stdout (see docs/training-spec.md). Importing this package (or
``training.spec``, ``training.records``, ``training.token_cache``, ``training.demo_data``) does not import torch,
so the portal may use them for validation, statistics and cache management.
"""
import os


def threads_given() -> int | None:
    """The threads this process was given (OMP_NUM_THREADS: a job's or a chat worker's share of the cores, set by
    jobs/supervisor.py and models_registry/inference.py), or None when none was."""
    threads = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(threads) if threads.isdigit() and int(threads) > 0 else None
