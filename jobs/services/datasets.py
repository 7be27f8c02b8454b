"""Datasets: a version created from a file (validated, stored by checksum), its references and deletion, token
statistics, chunked uploads."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone, translation
from django.utils.translation import gettext as _

from accounts.services import audit, check_deletable, check_storage, storage_room
from minicloud.errors import ServiceError, clean_name
from minicloud.files import check_upload_size, save_upload
from training import records as trecords, token_cache

from ..models import Dataset, Job, Upload
from ..validation import Report, checker_version, validate_file
from .queue import background_task, this_worker
from .statistics import request_dataset_stats
from .submission import ModelVersion


def _dataset_store() -> Path:
    path = settings.HOME / "datasets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def create_dataset(*, owner, name: str, kind: str, source, copy_source: bool = False,
                   quota_checked: bool = False, request=None, progress=None) -> Dataset:
    """Check a JSONL(.gz) file (``_checked``) and store it as a new immutable dataset version; a bad file is refused
    with its line-numbered errors and nothing is stored. ``source``: a file path, put into the store (``_store_file``)
    and left where it is: its caller removes its own once the dataset is recorded. The same name again makes the
    next version; the same content again returns the stored one. ``progress(fraction)`` is called as the check reads
    the file."""

    name = clean_name(name, 200)
    kinds = dict(Dataset._meta.get_field("kind").choices)
    if kind not in kinds:
        raise ServiceError(_("kind: one of %(kinds)s") % {"kinds": ", ".join(kinds)}, field="kind")
    if not quota_checked:
        check_storage(owner, Path(source).stat().st_size)
    report = _checked(source, kind, progress)
    if not report.ok:
        raise ServiceError(f"file: {report.summary()}", field="file", details={"validation": report.to_dict()})
    latest = Dataset.objects.filter(owner=owner, name=name).order_by("-version").first()
    if latest and latest.sha256 == report.sha256:
        return latest
    dest = _dataset_store() / f"{report.sha256}.jsonl{'.gz' if trecords.is_gzip(source) else ''}"
    _store_file(source, dest, copy=copy_source)
    index, gzip_index = Dataset.index_paths(dest)
    if not index.exists() and report.record_index is not None:  # a reused report has none: the file has one already
        trecords.save_record_index(index, report.record_index)
    ds = Dataset.objects.create(owner=owner, name=name, kind=kind, path=str(dest), records=report.records,
                                size_bytes=report.size_bytes, sha256=report.sha256,
                                version=(latest.version + 1) if latest else 1, validation=report.to_dict())
    audit(owner, "upload", ds, request=request, sha256=report.sha256, version=ds.version)
    request_dataset_stats(ds)
    if not index.exists() or dest.name.endswith(".gz") and not gzip_index.exists():  # for the preview's deep pages:
        # a gzip file's seek points; the record index of a reused check's file that was first stored elsewhere
        transaction.on_commit(lambda: background_task("jobs.tasks.index_dataset", ds.pk,
                                                      task_name=f"index_dataset_{ds.pk}"))
    return ds


HASH_SHARE = 0.04  # of a check's progress bar, the sha256 read before it (~1.5 GB/s against ~60 MB/s)


def _checked(source, kind: str, progress=None) -> Report:
    """The check of ``source`` as a ``kind`` dataset: the whole check (``validate_file``: ~60 MB/s, three minutes for
    9 GB), unless a dataset of that kind with the same bytes was checked by this code already: its report then, the
    file's sha256 read at ~1.5 GB/s (a class uploading one corpus thirty times waited an hour and a half for thirty
    checks of it on the one checks worker). The sha256 is read first only where a stored dataset of that kind has
    the file's size (anyone's: the store keeps one file per sha256 already, and the report is the same function of
    the bytes whoever asks)."""
    same_size = dict(Dataset.objects.filter(kind=kind, size_bytes=Path(source).stat().st_size,
                                            validation__checker=checker_version())
                     .values_list("sha256", "validation")[:100])
    if not same_size:
        return validate_file(source, kind, progress)
    sha256 = token_cache.file_sha256(source, progress=progress and (lambda f: progress(HASH_SHARE * f)))
    if sha256 in same_size:
        return Report.from_dict(same_size[sha256])
    return validate_file(source, kind, progress and (lambda f: progress(HASH_SHARE + (1 - HASH_SHARE) * f)))


def _store_file(source, dest: Path, copy: bool) -> None:
    """Put a checked file into the store as ``dest`` (named by its sha256), whole or not at all, unless it is there:
    a hard link to the caller's file (no copy of gigabytes, and the caller's name stays until the dataset is recorded,
    so a process killed in between leaves the upload whole, to be finished again), or a copy where ``copy`` (a file
    that is not the portal's, which its owner may change after: a lab's file on the server) or where no link can be
    made (another filesystem)."""
    if dest.exists():
        return
    tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.part")  # two checks of the same bytes at once: one wins
    try:
        if not copy:
            try:
                os.link(source, tmp)
            except OSError:
                copy = True
        if copy:
            shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def dataset_references(ds: Dataset) -> list[str]:
    """What uses a dataset version: jobs (any state) and models trained on it."""
    jobs = Job.objects.filter(Q(dataset=ds) | Q(eval_dataset=ds)).order_by("pk")[:50]
    refs = [f"job #{j.pk} {j.name}" for j in jobs]
    refs += [f"model #{m.pk} {m.name}" for m in ModelVersion.objects.filter(dataset=ds).order_by("pk")[:50]]
    return refs


def delete_dataset(actor, ds: Dataset, request=None) -> None:
    """Delete a dataset version nobody uses (its file too, unless another version shares it)."""

    check_deletable(actor, ds, dataset_references(ds))
    path = Path(ds.path)
    audit(actor, "delete", ds, request=request, name=ds.name, version=ds.version)
    indexes = ds.index_path, ds.gzip_index_path
    ds.delete()
    if path.parent == _dataset_store() and not Dataset.objects.filter(path=str(path)).exists():
        for stored in (path, *indexes):
            stored.unlink(missing_ok=True)


def dataset_records(ds: Dataset, offset: int = 0, limit: int = 20) -> list[dict]:
    """Records ``offset``…``offset + limit`` of a dataset version (its preview), read from the nearest indexed record
    before them: a page anywhere in a 9 GB file reads a few MB. A file whose index (or, gzipped, whose seek points)
    is not there yet -- stored before indexes were, or a gzip file's seek points still being built -- has it built
    in the background, and this page is read from the file's start, as before."""
    if offset >= ds.records:
        return []
    if offset < trecords.INDEX_STRIDE:
        return trecords.read_records(ds.path, offset, limit)
    index = trecords.load_record_index(ds.index_path)
    gzip_index = ds.gzip_index_path if ds.gzip_index_path.exists() else None
    if index is None or (gzip_index is None and trecords.is_gzip(ds.path)):
        background_task("jobs.tasks.index_dataset", ds.pk, task_name=f"index_dataset_{ds.pk}")
    return trecords.read_records(ds.path, offset, limit, index, gzip_index)


def index_dataset(ds_id: int) -> bool:
    """Write what a dataset file's preview lacks: its record index (a plain file's from one newline scan, ~0.15 s per
    100 MB) and a gzip file's seek points; True when it wrote anything."""
    ds = Dataset.objects.filter(pk=ds_id).first()
    if ds is None:
        return False
    wrote, gz = False, trecords.is_gzip(ds.path)
    if gz and not ds.gzip_index_path.exists():
        trecords.save_gzip_index(ds.path, ds.gzip_index_path)
        wrote = True
    if trecords.load_record_index(ds.index_path) is None:
        if gz:
            offsets = trecords.record_offsets(ds.path)
        else:
            from training.token_cache import line_index

            offsets = line_index(ds.path, _dataset_store())[0][::trecords.INDEX_STRIDE]
        trecords.save_record_index(ds.index_path, offsets)
        wrote = True
    return wrote


def remove_cache_leftovers() -> int:
    """What killed token-cache builds left (a job cancelled while tokenising, a worker killed under a statistics build:
    ``training.token_cache.remove_leftovers``), from each node's housekeeping; the bytes freed."""
    from training import token_cache

    return token_cache.remove_leftovers(settings.DATA_CACHE_DIR)


def find_upload(owner, upload_id):
    """One of the owner's uploads, or None (also for an id that is not a UUID)."""
    try:
        return Upload.objects.filter(pk=upload_id, owner=owner).select_related("dataset").first()
    except ValidationError:
        return None


def upload_dataset(request, owner) -> Dataset | Upload:
    """A dataset from a multipart request (``file``, ``name``, ``kind``; admins may give ``server_path`` instead of a
    file; ``upload``: a finished chunked upload, which a large one returns, being checked in the background). The
    file was streamed to a temporary file by Django's upload handler; too large a request is a 413."""
    check_upload_size(int(request.META.get("CONTENT_LENGTH") or 0))
    name, kind = request.POST.get("name", ""), request.POST.get("kind", "")
    upload_id = request.POST.get("upload", "").strip()
    if upload_id:  # a chunked upload finished: see start_upload / append_upload
        upload = find_upload(owner, upload_id)
        if upload is None:
            raise ServiceError(
                _("upload: no upload %(upload_id)s of yours") % {"upload_id": upload_id}, status=404, field="upload"
            )
        return finish_upload(upload, name=name, kind=kind, request=request)
    server_path = request.POST.get("server_path", "").strip()
    if server_path:
        if not owner.is_superuser:
            raise ServiceError(
                _("server_path: only admins import files from the server"), status=403, field="server_path"
            )
        path = Path(server_path)
        if not path.is_absolute() or not path.is_file():
            raise ServiceError(
                _("server_path: no file at %(server_path)s") % {"server_path": server_path}, field="server_path"
            )
        size = path.stat().st_size
        if size >= settings.VALIDATE_INLINE_BYTES:  # a corpus on the lab's disk: checked as a large upload is
            check_storage(owner, size)
            upload = Upload.objects.create(owner=owner, size=size)
            return finish_upload(upload, name=name, kind=kind, request=request, source=str(path))
        return create_dataset(owner=owner, name=name, kind=kind, source=path, copy_source=True, request=request)
    upload = request.FILES.get("file")
    if upload is None:
        raise ServiceError(_("file: attach a .jsonl or .jsonl.gz file"), field="file")
    check_upload_size(upload.size)
    if not name:
        name = Path(upload.name or "dataset").name.removesuffix(".gz").removesuffix(".jsonl")[:200]
    if hasattr(upload, "temporary_file_path"):  # streamed to disk: validated, then linked into the store
        return create_dataset(owner=owner, name=name, kind=kind, source=upload.temporary_file_path(), request=request)
    spool = Path(settings.FILE_UPLOAD_TEMP_DIR or tempfile.gettempdir())
    tmp = save_upload(upload, spool / f"upload-{uuid.uuid4().hex}")
    try:
        return create_dataset(owner=owner, name=name, kind=kind, source=tmp, request=request)
    finally:
        tmp.unlink(missing_ok=True)  # linked into the store, or refused


UPLOAD_GIVEN_UP_S = 3600  # an unfinished upload whose file has not grown for this long may make room for a new one


def start_upload(owner):
    """A new resumable upload of ``owner``'s: refused when their storage is full, or when they have
    ``UPLOADS_PER_USER`` unfinished already (429)."""
    check_storage(owner)  # refused before the first chunk when the owner's storage is full
    started = list(Upload.objects.filter(owner=owner, status=Upload.Status.RECEIVING))
    if len(started) >= settings.UPLOADS_PER_USER:
        # a page closed during an upload leaves it unfinished: the stalest one, silent for an hour, makes room
        stalest = max(started, key=lambda u: u.silent_s)
        if stalest.silent_s < UPLOAD_GIVEN_UP_S:
            raise ServiceError(_("you already have %(n)s uploads in progress: finish or delete one first")
                               % {"n": len(started)}, status=429)
        delete_upload(stalest)
    upload = Upload.objects.create(owner=owner)
    upload.path.parent.mkdir(parents=True, exist_ok=True)
    upload.path.touch()
    return upload


def append_upload(upload, offset: int, stream, length: int) -> int:
    """Append one chunk at ``offset`` (which must be the bytes received so far: a client resumes from there)."""
    if upload.status in ("checking", "done"):
        raise ServiceError(_("upload: it is finished; start another upload"), status=409, field="upload")
    if offset != upload.size:
        raise ServiceError(
            _("offset: this upload has %(size)s bytes; send from there") % {"size": upload.size},
            status=409,
            field="offset",
            details={"offset": upload.size},
        )
    check_upload_size(upload.size + length)
    room = storage_room(upload.owner)  # every chunk spends the storage quota, the unfinished parts counted
    if room is not None and (room == 0 or length > room):
        check_storage(upload.owner, adding=length)  # refuses, naming the quota
    allowed = settings.UPLOAD_MAX_BYTES - upload.size if room is None else min(
        settings.UPLOAD_MAX_BYTES - upload.size, room)
    written = 0
    _unshare(upload.path)
    with open(upload.path, "ab") as f:
        for block in iter(lambda: stream.read(1 << 20), b""):
            written += len(block)
            if written > allowed:  # more than it declared: the chunk is dropped, the upload kept as it was
                f.truncate(upload.size)
                check_upload_size(upload.size + written)
                check_storage(upload.owner, adding=written)
            f.write(block)
    type(upload).objects.filter(pk=upload.pk).update(size=upload.size + written)
    upload.size += written
    return upload.size


def _unshare(path: Path) -> None:
    """Give ``path`` a file of its own where the dataset store shares it (``_store_file`` linked an upload's part there
    and the check was killed before the upload was done; a refused upload may grow): what is stored stays as it was
    checked."""
    if path.stat().st_nlink > 1:
        tmp = path.with_name(f"{path.name}.copy")
        shutil.copyfile(path, tmp)
        os.replace(tmp, path)


def finish_upload(upload, *, name: str, kind: str, request=None, source: str | None = None) -> Dataset | Upload:
    """Turn a complete upload into a dataset version. The file is checked record by record (~60 MB/s: three
    minutes for 9 GB): in this request when it is smaller than ``VALIDATE_INLINE_BYTES`` (the dataset, or the
    refusal with its line errors, as before), else on the node's background cluster, the upload returned at once
    (its ``status`` and ``progress``, then its dataset or its refusal: ``GET /api/v1/uploads/{id}``). A refused upload
    keeps its part and may be finished again (another kind). ``source``: an admin's file on the server, copied into
    the store instead of the upload's part (kept for a second finish)."""
    background = upload.size >= settings.VALIDATE_INLINE_BYTES
    ask = {"name": name, "kind": kind, "language": translation.get_language(), "background": background,
           "source": source or upload.finish.get("source"), "at": timezone.now().isoformat()}
    mine = Upload.objects.filter(pk=upload.pk)
    if not (mine.filter(status__in=("", "refused")).update(status="checking", progress=0.0, outcome={}, finish=ask)
            or mine.filter(status="checking", worker="").update(finish=ask)):  # asked again before a worker took it
        upload.refresh_from_db()
        raise ServiceError(_("upload: it became dataset #%(id)s") % {"id": upload.dataset_id}
                           if upload.status == "done" else _("upload: it is being checked"), status=409,
                           field="upload")
    if background:
        background_task("jobs.tasks.check_upload", str(upload.pk), task_name=f"check-upload-{upload.pk}")
        return Upload.objects.get(pk=upload.pk)
    return check_upload(upload.pk, request=request)


def check_next_upload(upload_id=None) -> Dataset | None:
    """A background check (the task that finishing ``upload_id`` sent): of the uploads waiting for one, the next in
    fair order (``Upload.next_to_check``), so each finish's task checks one upload and a class's uploads take turns
    on the checks cluster instead of first come, first served. Nothing when none waits (a duplicate task)."""
    while (pick := Upload.next_to_check(hint=upload_id)) is not None:
        if _claim_upload(pick):  # else another worker took it between the pick and the claim: the next one
            return _check_claimed(pick)
    return None


def _claim_upload(upload_id) -> bool:
    """Name this worker on a waiting upload; False when it is gone or another worker took it."""
    return bool(Upload.objects.filter(pk=upload_id, status="checking", worker="").update(
        worker=this_worker(), checked_at=timezone.now()))


def check_upload(upload_id, request=None) -> Dataset | None:
    """Check a finished upload and store it as a dataset version (linked into the store: no copy), its messages in
    the asker's language; a refusal is recorded on the upload (and raised to a ``request`` waiting for it). Nothing
    when another worker took it first. The upload names its worker while it checks (``reconcile_background``)."""
    if not _claim_upload(upload_id):
        return None  # gone, or another worker took it
    return _check_claimed(upload_id, request)


def _check_claimed(upload_id, request=None) -> Dataset | None:
    mine = Upload.objects.filter(pk=upload_id, status="checking", worker=this_worker())
    upload = mine.select_related("owner").get()  # read once claimed: what was asked is fixed from here on
    ask = upload.finish
    try:
        with translation.override(ask.get("language")):
            ds = create_dataset(owner=upload.owner, name=ask.get("name", ""), kind=ask.get("kind", ""),
                                source=ask.get("source") or upload.path, copy_source=bool(ask.get("source")),
                                quota_checked=True, request=request,  # each chunk was (a server file is counted)
                                progress=lambda fraction: mine.update(progress=fraction))
    except ServiceError as exc:
        mine.update(status="refused", worker="", outcome={"error": str(exc), "field": exc.field,
                                                          "status": exc.status, "details": exc.details})
        if request is not None:
            raise
        return None
    except Exception as exc:  # recorded, not left "checking" while its worker lives on
        mine.update(status="refused", worker="", outcome={"error": str(exc)[:500]})
        raise
    mine.update(status="done", worker="", progress=1.0, dataset=ds)
    upload.path.unlink(missing_ok=True)  # the store has its own link now (or had the same bytes already)
    return ds


def delete_upload(upload) -> None:
    """Drop an upload and its bytes (given up on, or refused); not while a worker checks it."""
    if not Upload.objects.filter(pk=upload.pk).exclude(Upload.BEING_CHECKED).delete()[0]:
        raise ServiceError(_("upload: it is being checked"), status=409, field="upload")
    upload.path.unlink(missing_ok=True)


def prune_uploads(max_age_h: float = 24) -> int:
    """Forget uploads left unfinished (or finished: done, refused, a check whose task was lost) for a day, not those
    a worker checks (housekeeping)."""
    old = Upload.objects.filter(created_at__lt=timezone.now() - timedelta(hours=max_age_h)).exclude(
        Upload.BEING_CHECKED)
    for upload in old:
        upload.path.unlink(missing_ok=True)
    return old.delete()[0]
