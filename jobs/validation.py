"""Streaming validation of MiniMind JSONL datasets (``.jsonl`` or ``.jsonl.gz``), one record in memory at a time.

Each kind has MiniMind's schema, written once in training/records.py (the engine reads with the same checks, so a
record accepted here never fails in training). Errors name the line (the first 100 are kept,
all are counted); warnings (not errors) flag exact and near-duplicate records. Pure Python: the portal calls it.
"""
from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass, field

from django.utils.translation import gettext as _, gettext_noop

from training.records import (INDEX_STRIDE, DataTooLarge, check_record, loads, message, not_utf8, open_text,
                              record_text, unparsed)

__all__ = ["Report", "validate_file", "check_record", "open_text", "record_text"]

MAX_ERRORS = 100
MAX_WARNINGS = 100
MAX_TRACKED = 500_000  # records whose fingerprints are kept for duplicate warnings (bounds memory on huge files)
_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w]+", re.UNICODE)


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
                "warnings": self.warnings, "sha256": self.sha256, "size_bytes": self.size_bytes}

    def summary(self, limit: int = 5) -> str:
        shown = "; ".join(_("line %(line)s: %(message)s") % {"line": n, "message": m} for n, m in self.errors[:limit])
        more = _(" (and %(n)s more)") % {"n": self.error_count - limit} if self.error_count > limit else ""
        return _("%(n)s error(s): %(errors)s%(more)s") % {"n": self.error_count, "errors": shown, "more": more}


def _fingerprint(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def validate_file(path, kind: str, progress=None) -> Report:
    """Validate a whole file in one streaming pass; also its sha256 (of the bytes as stored) and size.
    ``progress(fraction)``: the share of the file read, every 20,000 lines."""
    report = Report(kind)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            report.size_bytes += len(block)
    report.sha256 = digest.hexdigest()
    exact, near = {}, {}
    try:
        with open_text(path) as f:
            index = report.record_index = []
            for lineno, line in enumerate(f, 1):
                report.lines = lineno
                if progress and lineno % 20_000 == 0:
                    progress(min(f.raw.tell() / max(report.size_bytes, 1), 1.0))
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
                key = _fingerprint(line.strip())
                if key in exact:
                    report.warn(lineno, gettext_noop("duplicate of line %(line)s"), {"line": exact[key]})
                    continue
                fuzzy = _fingerprint(_PUNCT.sub("", _SPACE.sub("", text.lower())))
                if fuzzy in near:
                    near_note = gettext_noop("near-duplicate of line %(line)s (same text up to case, spaces and "
                                             "punctuation)")
                    report.warn(lineno, near_note, {"line": near[fuzzy]})
                if len(exact) < MAX_TRACKED:
                    exact[key] = lineno
                    near.setdefault(fuzzy, lineno)
    except UnicodeDecodeError as exc:
        report.error(report.lines + 1, message(not_utf8(exc), _))
    except DataTooLarge as exc:
        report.error(report.lines + 1, message(exc.problem, _))
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        report.error(report.lines + 1, _("unreadable file (%(exc)s)") % {"exc": exc})
    if report.records == 0 and report.ok:
        report.error(1, _("the file holds no records"))
    return report
