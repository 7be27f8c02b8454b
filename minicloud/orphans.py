"""Files under ``MINICLOUD_HOME`` that no record names any more: what a process killed between writing a file and
committing its row (or between deleting a row and its files) leaves behind. Nothing of it is anyone's data -- no
dataset, job, model, upload or tokenizer points at it, so no page shows it and no storage quota counts it -- but
each can be a whole dataset, checkpoint or model, on the disk for ever. ``python manage.py orphans`` lists them;
``--delete`` removes them.

Only what is older than ``min_age_s`` (an hour by default) is taken: a file is written before the row that names it
is committed (a dataset linked into its store, an import's weights), and a run in progress must not lose it.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from minicloud.files import disk_usage


@dataclass
class Orphan:
    path: Path
    bytes: int
    why: str


def find(min_age_s: float = 3600) -> list[Orphan]:
    """Every orphan under ``settings.HOME``: in each folder a kind of record keeps its files in, what none of its
    records names. Each model that keeps files there says which (a ``home_files`` classmethod: the folder under
    MINICLOUD_HOME and the names its rows use in it, or None while it cannot tell), as each says what it stores for
    the storage quota (``stored_bytes``): this module knows no kind of record."""
    from django.apps import apps

    home = Path(settings.HOME)
    cutoff = time.time() - min_age_s
    found = []
    for model in apps.get_models():
        if not callable(getattr(model, "home_files", None)):
            continue
        folder, named = model.home_files()
        root = home / folder
        if named is None or not root.is_dir():
            continue
        why = f"no {model._meta.verbose_name} names it"
        for path in sorted(root.iterdir()):
            if path.name.startswith(".") or path.name in named or _newest(path) > cutoff:
                continue
            found.append(Orphan(path, disk_usage(path) if path.is_dir() else path.lstat().st_size, why))
    return found


def remove(orphans: list[Orphan]) -> int:
    """Delete ``orphans``; the bytes freed."""
    freed = 0
    for orphan in orphans:
        if orphan.path.is_dir() and not orphan.path.is_symlink():
            shutil.rmtree(orphan.path, ignore_errors=True)
        else:
            orphan.path.unlink(missing_ok=True)
        freed += orphan.bytes
    return freed


def _newest(path: Path) -> float:
    """The latest modification time of ``path`` or of anything in it (a run folder still being written is recent)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_mtime
    return max([path.stat().st_mtime] + [f.lstat().st_mtime for f in path.rglob("*")])
