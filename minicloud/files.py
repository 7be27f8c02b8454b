"""File helpers shared by the apps: the upload size limit, writing an uploaded file to disk, zipping a folder, and
the bytes under a folder (storage quotas)."""
from __future__ import annotations

import zipfile
from pathlib import Path

from django.conf import settings
from django.utils.translation import gettext as _

from .errors import ServiceError


def check_upload_size(n_bytes: int) -> None:
    """Refuse (413, on ``file``) a request or upload larger than ``UPLOAD_MAX_BYTES``."""
    if n_bytes > settings.UPLOAD_MAX_BYTES:
        raise ServiceError(
            _("file: larger than the upload limit of %(gb)s GB") % {"gb": format(settings.UPLOAD_MAX_BYTES / 1e9, "g")},
            status=413,
            field="file",
        )


def save_upload(upload, dest: Path) -> Path:
    """Write an uploaded file (Django's ``UploadedFile``) to ``dest`` chunk by chunk."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as f:
        for chunk in upload.chunks():
            f.write(chunk)
    return dest


def zip_files(out: Path, entries) -> Path:
    """Write ``(file, name in the zip)`` pairs to the zip ``out``, atomically (a ``.tmp`` renamed into place)."""
    tmp = Path(out).with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, name in entries:
            zf.write(path, name)
    tmp.replace(out)
    return Path(out)


def folder_entries(folder: Path, prefix: str = "") -> list[tuple[Path, str]]:
    """Every file under ``folder`` as a ``zip_files`` entry named ``prefix`` + its path in the folder."""
    folder = Path(folder)
    return [(f, f"{prefix}{f.relative_to(folder)}") for f in sorted(folder.rglob("*")) if f.is_file()]


def disk_usage(path) -> int:
    """Bytes under ``path`` (a job's run folder: checkpoints, weights, logs), links not followed."""
    root = Path(path)
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink()) if root.exists() else 0


class exclusive_lock:
    """An exclusive lock file (fcntl) held for a ``with`` block, across processes of this machine (and NFS nodes
    with working locks); released if the process dies. One conversion of a model at a time, one claim at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()
