"""Streaming validation of MiniMind JSONL datasets (``.jsonl`` or ``.jsonl.gz``), one record in memory at a time.

Each kind has MiniMind's schema, written once in training/records.py (the engine reads with the same checks, so a
record accepted here never fails in training). Errors name the line (the first 100 are kept,
all are counted); warnings (not errors) flag exact and near-duplicate records. Pure Python: the portal calls it.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import sys
from dataclasses import dataclass, field

from django.utils.translation import gettext as _, gettext_noop

from training.records import (INDEX_STRIDE, DataTooLarge, check_record, loads, message, not_utf8, open_text,
                              record_text, unparsed)

__all__ = ["Report", "validate_file", "check_record", "open_text", "record_text"]

MAX_ERRORS = 100
MAX_WARNINGS = 100
MAX_TRACKED = 500_000  # records whose fingerprints are kept for duplicate warnings (bounds memory on huge files)


@functools.cache
def checker_version() -> str:
    """What a report was checked by: the digest of this module's and training/records.py's code (the checks and the
    schema), kept in each report, so that a stored report stands for a file's check only while those are unchanged
    (``jobs.services.datasets``: the same bytes uploaded again)."""
    from training import records

    digest = hashlib.sha256()
    for module in (sys.modules[__name__], records):
        with open(module.__file__, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


@dataclass
class Report:
    kind: str
    records: int = 0
    lines: int = 0
    error_count: int = 0
    errors: list = field(default_factory=list)  # [line, message]
    warning_count: int = 0
    warnings: list = field(default_factory=list)
    sha256: str = ""
    size_bytes: int = 0
    record_index: list | None = None  # every INDEX_STRIDE-th record's (unpacked) byte offset (not stored in the row)

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def error(self, line: int, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append([line, message])

    def warn(self, line: int, template: str, params: dict) -> None:
        """Warnings are kept with the dataset: an English template and its parameters, shown to every reader in
        their language (``Dataset.warning_lines``). Errors refuse the upload and answer its sender at once."""
        self.warning_count += 1
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append([line, template, params])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "records": self.records, "lines": self.lines, "ok": self.ok,
                "error_count": self.error_count, "errors": self.errors, "warning_count": self.warning_count,
                "warnings": self.warnings, "sha256": self.sha256, "size_bytes": self.size_bytes,
                "checker": checker_version()}

    @classmethod
    def from_dict(cls, stored: dict) -> Report:
        """A report as ``to_dict`` stored it (without the record index, which is kept beside the file)."""
        return cls(**{name: stored[name] for name in ("kind", "records", "lines", "error_count", "errors",
                                                      "warning_count", "warnings", "sha256", "size_bytes")})

    def summary(self, limit: int = 5) -> str:
        shown = "; ".join(_("line %(line)s: %(message)s") % {"line": n, "message": m} for n, m in self.errors[:limit])
        more = _(" (and %(n)s more)") % {"n": self.error_count - limit} if self.error_count > limit else ""
        return _("%(n)s error(s): %(errors)s%(more)s") % {"n": self.error_count, "errors": shown, "more": more}


def _fingerprint(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@functools.cache
def _word_table():
    """Whether each Unicode code point is a word character (what the regex ``\\w`` matches: a letter or digit of any
    script, or ``_``), as a NumPy array indexed by code point (1.1 MB, built once per process in ~0.15 s)."""
    import numpy as np

    return np.array([chr(c).isalnum() or c == 0x5F for c in range(sys.maxunicode + 1)], dtype=bool)


def _near_fingerprint(text: str) -> int:
    """The fingerprint of ``text`` up to case, spaces and punctuation: of its lowercase word characters, picked from
    its code points by ``_word_table`` (the regex ``[^\\w]+`` it replaces, scanning each character in Python's regex
    engine, took three quarters of a large upload's check: docs/performance.md). JSON may spell a lone surrogate,
    which is no word character."""
    import numpy as np

    codes = np.frombuffer(text.lower().encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return _fingerprint(codes.compress(_word_table().take(codes)).tobytes())


def validate_file(path, kind: str, progress=None) -> Report:
    """Validate a whole file in one streaming pass, which also gives its sha256 (of the bytes as stored) and size.
    ``progress(fraction)``: the share of the file read, every 20,000 lines."""
    report = Report(kind)
    digest = hashlib.sha256()
    stored = os.path.getsize(path)
    with open_text(path, digest=digest) as f:
        try:
            _check_lines(f, kind, report, progress and (lambda: progress(min(f.raw.tell() / max(stored, 1), 1.0))))
        except UnicodeDecodeError as exc:
            report.error(report.lines + 1, message(not_utf8(exc), _))
        except DataTooLarge as exc:
            report.error(report.lines + 1, message(exc.problem, _))
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            report.error(report.lines + 1, _("unreadable file (%(exc)s)") % {"exc": exc})
        f.read_rest()  # where the lines stopped early (a refusal above): the checksum covers the whole file
        report.size_bytes = f.raw.tell()
    report.sha256 = digest.hexdigest()
    if report.records == 0 and report.ok:
        report.error(1, _("the file holds no records"))
    return report


def _check_lines(f, kind: str, report: Report, progress) -> None:
    """Check every line of ``f`` (``open_text``) into ``report``: records, errors, duplicates, the record index."""
    exact, near = {}, {}
    index = report.record_index = []
    for lineno, line in enumerate(f, 1):
        report.lines = lineno
        if progress and lineno % 20_000 == 0:
            progress()
        if not line.strip():
            continue
        if (report.records + report.error_count) % INDEX_STRIDE == 0:
            index.append(f.start)
        try:
            rec = loads(line)
        except ValueError as exc:  # not JSON; nesting too deep, an integer of 4300+ digits
            report.error(lineno, message(unparsed(exc), _))
            continue
        problem = check_record(kind, rec)
        if problem:
            report.error(lineno, message(problem, _))
            continue
        report.records += 1
        text = record_text(kind, rec)
        key = _fingerprint(line.strip().encode())
        if key in exact:
            report.warn(lineno, gettext_noop("duplicate of line %(line)s"), {"line": exact[key]})
            continue
        fuzzy = _near_fingerprint(text)
        if fuzzy in near:
            near_note = gettext_noop("near-duplicate of line %(line)s (same text up to case, spaces and "
                                     "punctuation)")
            report.warn(lineno, near_note, {"line": near[fuzzy]})
        if len(exact) < MAX_TRACKED:
            exact[key] = lineno
            near.setdefault(fuzzy, lineno)
