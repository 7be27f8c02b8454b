"""A dataset's token statistics (record lengths against a max_seq_len, their histogram, the language mix), computed
in the background. A file of some size is tokenised by the engine into the token cache a job with the stage's
default options reads (``python -m training prepare``): the lengths are then exact, as trained, and the dataset's
first job starts without tokenising it again. A small file is counted in the worker (the chat template's framing
estimated): the engine's start would cost more than the tokenising."""
from __future__ import annotations

import json
import logging
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from accounts.access import check_manage
from minicloud.processes import engine_env
from training import events, spec as tspec
from training.warm import background_child

from .. import dataset_stats
from ..models import Dataset
from .queue import background_task, this_worker
from .submission import Tokenizer

log = logging.getLogger(__name__)

BUILD_SHARE = 0.9  # of the progress bar, the engine's tokenising (the rest: the pass for the language mix)


def request_dataset_stats(ds: Dataset, max_seq_len: int | None = None, tokenizer_id=None, actor=None) -> None:
    """Queue the token statistics of a dataset (a background task with progress). Asked by a person (``actor``),
    they replace the dataset's stored statistics: only its owner (or an admin) may, with a tokenizer they may use.
    Each request draws the next ``stats_request``; a task whose request a later one superseded (a second click, other
    settings) stops, so that the one background worker never computes what nobody will see."""
    if actor is not None:
        check_manage(actor, ds)
        tok = Tokenizer.objects.usable_by(actor, tokenizer_id, "tokenizer")
        tokenizer_id = tok.pk if tok else None
    with transaction.atomic():
        Dataset.objects.filter(pk=ds.pk).update(stats_status="queued", stats_progress=0.0, stats_worker="",
                                                stats_request=F("stats_request") + 1, stats_ask={
                                                    "max_seq_len": max_seq_len, "tokenizer_id": tokenizer_id,
                                                    "at": timezone.now().isoformat()})
        request = Dataset.objects.values_list("stats_request", flat=True).get(pk=ds.pk)
        transaction.on_commit(lambda: background_task("jobs.tasks.dataset_stats", ds.pk, max_seq_len, tokenizer_id,
                                                      request, task_name=f"dataset-stats-{ds.pk}"))


class _Superseded(Exception):
    """A later request for the same dataset's statistics took over."""


def compute_dataset_stats(ds_id: int, max_seq_len: int | None = None, tokenizer_id: int | None = None,
                          request: int | None = None) -> None:
    """Run the statistics of one dataset version (the background task), recording progress and the result; nothing
    when ``request`` is no longer the dataset's latest (``request_dataset_stats``), and it stops once it is not."""
    ds = Dataset.objects.filter(pk=ds_id).first()
    if ds is None:
        return
    mine = Dataset.objects.filter(pk=ds.pk, **({} if request is None else {"stats_request": request}))
    # a request's task claims it (a duplicate sent again finds it taken); a direct call computes
    claim = mine if request is None else mine.filter(stats_status="queued")
    if not claim.update(stats_status="running", stats_progress=0.0, stats_worker=this_worker()):
        return

    def progress(p):
        if not mine.update(stats_progress=p):
            raise _Superseded

    try:
        stats = _statistics(ds, max_seq_len, tokenizer_id, progress)
    except _Superseded:
        return
    except Exception as exc:  # a task must record why, not vanish (or it would show "running" while its worker lives)
        mine.update(stats_status="failed", stats={"error": str(exc)[:500]}, stats_worker="")
        raise
    mine.update(stats_status="done", stats_progress=1.0, stats=stats, stats_worker="")


def _statistics(ds: Dataset, max_seq_len, tokenizer_id, progress) -> dict:
    """The statistics of ``ds`` with the tokenizer (the demo one by default), taken from another dataset of the same
    bytes already counted alike, else from a job's token cache of it (built now for a file of some size), else
    counted here."""
    from training import token_cache

    tok = Tokenizer.objects.filter(pk=tokenizer_id).first() if tokenizer_id else None
    tok = tok or Tokenizer.demo()
    stage = {"pretrain": "pretrain", "sft": "sft", "dpo": "dpo", "rlaif": "grpo"}[ds.kind]
    msl = max_seq_len or tspec.STAGE_DEFAULTS[stage]["max_seq_len"]
    digest = token_cache.tokenizer_digest(tok.path)
    cached, share = None, 0.0  # share: of the progress bar, the tokenising done before the counting
    if ds.sha256:
        # The same file already counted with the same tokenizer and max_seq_len (a class uploading one corpus thirty
        # times; another version with the same bytes): its statistics, nothing read again.
        counted = Dataset.objects.filter(
            sha256=ds.sha256, kind=ds.kind, stats_status="done", stats__max_seq_len=msl,
            stats__tokenizer_digest=digest).exclude(pk=ds.pk).values_list("stats", flat=True).first()
        if counted:
            return {**counted, "tokenizer": tok.name}
        # A job already tokenised this dataset with this tokenizer: its exact lengths, no tokenising.
        processing = token_cache.PROCESSING[stage]
        cached = token_cache.find(settings.DATA_CACHE_DIR, ds.sha256, digest, processing)
        if cached is None and ds.size_bytes >= settings.STATS_TOKEN_CACHE_MB * 1e6:
            cached = _build_token_cache(ds, tok, digest, stage, progress)
            share = BUILD_SHARE if cached is not None else 0.0
    stats = dataset_stats.compute(ds.path, ds.kind, Path(tok.path) / "tokenizer.json", msl, ds.records,
                                  progress=lambda f: progress(share + (1 - share) * f),
                                  known_lengths=token_cache.record_lengths(cached) if cached else None)
    return {**stats, "tokenizer": tok.name, "tokenizer_digest": digest, "from_token_cache": cached is not None}


def _build_token_cache(ds: Dataset, tok, digest: str, stage: str, progress):
    """The token cache of ``ds`` (tokenizer ``tok``, whose files hash to ``digest``) that a ``stage`` job with the
    default options reads, built by the engine as a job's background builder is (a child at the lowest priority,
    dying with this worker; the cache's lock makes a job that starts meanwhile wait for it rather than tokenise
    twice). ``progress`` raising (a later request took over) stops the child, which removes its part. None when it
    failed (the file is then counted here; the reason is logged)."""
    from training import token_cache

    processing = token_cache.PROCESSING[stage]
    options = token_cache.processing_options(processing, tspec.defaults_for(stage))
    root = Path(settings.DATA_CACHE_DIR)
    token = secrets.token_hex(16)
    command = [sys.executable, "-u", "-m", "training", "prepare", ds.path, "--tokenizer", tok.path,
               "--processing", processing, "--options", json.dumps(options), "--cache", str(root),
               "--sha256", ds.sha256, "--cap-gb", str(settings.DATA_CACHE_GB)]
    warnings = []
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(command, cwd=settings.BASE_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=stderr, text=True, env={**engine_env(), "MINICLOUD_EVENT_TOKEN": token},
                                 preexec_fn=background_child)
        try:
            for line in child.stdout:
                event = events.parse(line.rstrip("\n"), token)[0] or {}
                if event.get("event") == "progress" and isinstance(event.get("fraction"), (int, float)):
                    progress(BUILD_SHARE * min(max(float(event["fraction"]), 0.0), 1.0))
                elif event.get("event") == "log" and event.get("level") == "warning":
                    warnings.append(str(event.get("message")))
        except BaseException:
            _stop(child)
            raise
        if child.wait() != 0:
            stderr.seek(0)
            reason = warnings or stderr.read().decode(errors="replace").strip().splitlines()[-1:] or [child.returncode]
            log.warning("statistics of dataset %s: the token cache was not built (%s); counted without it", ds.pk,
                        reason[-1])
            return None
    try:
        return token_cache.Cache(root / token_cache.cache_name(ds.sha256, digest, processing, options))
    except (OSError, ValueError):  # removed at once (another cache's eviction under a cap smaller than this one)
        return None


def _stop(child: subprocess.Popen) -> None:
    """Stop the builder (SIGTERM: it removes its part and its worker processes), killed if it has not ended in 30 s
    (its part is then a leftover that the housekeeping removes)."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
