"""Streaming validation of MiniMind JSONL datasets (``.jsonl`` or ``.jsonl.gz``), one record in memory at a time.

Each kind has MiniMind's schema (../shared/reference/minimind-facts.md): ``pretrain`` ``{"text"}``; ``sft``
``{"conversations": [...]}``; ``dpo`` ``{"chosen", "rejected"}`` sharing their prompt; ``rlaif`` conversations ending
with a placeholder assistant turn, optionally with ``gt``/``answer``. Errors name the line (the first 100 are kept,
all are counted); warnings (not errors) flag exact and near-duplicate records. Pure Python: the portal calls it.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
from dataclasses import dataclass, field

from django.utils.translation import gettext as _, gettext_noop

MAX_ERRORS = 100
MAX_WARNINGS = 100
MAX_TRACKED = 500_000  # records whose fingerprints are kept for duplicate warnings (bounds memory on huge files)
ROLES = ("system", "user", "assistant", "tool")
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


def _json_string_list(value, what: str) -> str | None:
    """``tools``/``tool_calls`` are JSON-encoded strings of a list in MiniMind's data."""
    if not isinstance(value, str):
        return _("%(what)s must be a JSON-encoded string (MiniMind stores it as text)") % {"what": what}
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError as exc:
        return _("%(what)s is not valid JSON (%(msg)s)") % {"what": what, "msg": exc.msg}
    if not isinstance(decoded, list):
        return _("%(what)s must encode a list") % {"what": what}
    return None


def check_conversation(msgs, where: str = "conversations", placeholder: bool = False) -> str | None:
    """The first problem of one conversation, or None. ``placeholder``: the last message is RL's empty answer."""
    if not isinstance(msgs, list) or not msgs:
        return _("'%(where)s' must be a non-empty list of messages") % {"where": where}
    previous = None
    for i, m in enumerate(msgs, 1):
        if not isinstance(m, dict):
            return _("%(where)s message %(i)s must be an object") % {"where": where, "i": i}
        role = m.get("role")
        if role not in ROLES:
            return _("%(where)s message %(i)s: role must be one of %(roles)s, not %(role)s") % {
                "where": where,
                "i": i,
                "roles": ", ".join(ROLES),
                "role": repr(role),
            }
        for key in ("content", "reasoning_content"):
            if key in m and not isinstance(m[key], str):
                return _("%(where)s message %(i)s: '%(key)s' must be a string") % {"where": where, "i": i, "key": key}
        if "content" not in m:
            return _("%(where)s message %(i)s: 'content' is missing") % {"where": where, "i": i}
        last = i == len(msgs)
        if m.get("tools"):
            problem = _json_string_list(m["tools"], f"{where} message {i}: 'tools'")
            if problem:
                return problem
        if m.get("tool_calls"):
            if role != "assistant":
                return _("%(where)s message %(i)s: only assistant messages carry 'tool_calls'") % {
                    "where": where,
                    "i": i,
                }
            problem = _json_string_list(m["tool_calls"], f"{where} message {i}: 'tool_calls'")
            if problem:
                return problem
        empty = not m["content"].strip() and not m.get("tool_calls") and not m.get("reasoning_content")
        if empty and role in ("user", "assistant") and not (placeholder and last):
            return _("%(where)s message %(i)s: empty %(role)s text") % {"where": where, "i": i, "role": role}
        if role == "system" and i != 1:
            return _("%(where)s message %(i)s: a system message may only come first") % {"where": where, "i": i}
        if role == "user" and previous not in (None, "system", "assistant", "tool"):
            return _("%(where)s message %(i)s: roles out of order (user after %(previous)s)") % {
                "where": where,
                "i": i,
                "previous": previous,
            }
        if role == "assistant" and previous not in ("user", "tool"):
            return _("%(where)s message %(i)s: roles out of order (assistant after %(previous)s)") % {
                "where": where,
                "i": i,
                "previous": previous or _("nothing"),
            }
        if role == "tool" and previous not in ("assistant", "tool"):
            return _("%(where)s message %(i)s: roles out of order (tool result after %(previous)s)") % {
                "where": where,
                "i": i,
                "previous": previous,
            }
        if role == "tool" and previous == "assistant" and not msgs[i - 2].get("tool_calls"):
            return _("%(where)s message %(i)s: a tool result must follow an assistant message with 'tool_calls'") % {
                "where": where,
                "i": i,
            }
        previous = role
    if placeholder:
        if msgs[-1].get("role") != "assistant":
            return _("the last message must be the placeholder assistant turn")
        if len(msgs) < 2:
            return _("an RL prompt needs a user message before the placeholder")
    elif not any(m.get("role") == "assistant" for m in msgs):
        return _("'%(where)s' has no assistant message to learn from") % {"where": where}
    return None


def check_record(kind: str, rec) -> str | None:
    """The first problem of one record of ``kind``, or None."""
    if not isinstance(rec, dict):
        return _("a record must be a JSON object")
    if kind == "pretrain":
        text = rec.get("text")
        if "text" not in rec:
            return _("missing field 'text'")
        if not isinstance(text, str):
            return _("'text' must be a string, not %(type)s") % {"type": type(text).__name__}
        if not text.strip():
            return _("empty 'text'")
        return None
    if kind == "sft":
        if "conversations" not in rec:
            return _("missing field 'conversations'")
        return check_conversation(rec["conversations"])
    if kind == "dpo":
        for side in ("chosen", "rejected"):
            if side not in rec:
                return _("missing field '%(side)s'") % {"side": side}
            problem = check_conversation(rec[side], side)
            if problem:
                return problem
        if _prompt(rec["chosen"]) != _prompt(rec["rejected"]):
            return _("'chosen' and 'rejected' must share the same prompt (every message before the last answer)")
        return None
    if kind == "rlaif":
        if "conversations" not in rec:
            return _("missing field 'conversations'")
        problem = check_conversation(rec["conversations"], placeholder=True)
        if problem:
            return problem
        gt = rec.get("gt", rec.get("answer"))
        if gt is not None and not (isinstance(gt, str) or (isinstance(gt, list) and all(isinstance(g, str)
                                                                                          for g in gt))):
            return _("'gt'/'answer' must be a string or a list of strings")
        return None
    return _("unknown dataset kind %(kind)s") % {"kind": repr(kind)}


def _prompt(msgs) -> list:
    last_answer = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=len(msgs))
    return [(m.get("role"), m.get("content")) for m in msgs[:last_answer]]


def record_text(kind: str, rec) -> str:
    """All the text of a record (statistics, duplicate checks)."""
    if kind == "pretrain":
        return rec.get("text", "")
    msgs = rec.get("chosen", []) + rec.get("rejected", []) if kind == "dpo" else rec.get("conversations", [])
    return "\n".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))


def _fingerprint(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def open_text(path) -> io.TextIOBase:
    """A dataset file as text, gunzipped on the fly when it is gzip-compressed (by its magic bytes)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    raw = gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def validate_file(path, kind: str, progress=None) -> Report:
    """Validate a whole file in one streaming pass; also its sha256 (of the bytes as stored) and size."""
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
            for lineno, line in enumerate(f, 1):
                report.lines = lineno
                if progress and lineno % 100_000 == 0:
                    progress(lineno)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    report.error(
                        lineno, _("not valid JSON (%(msg)s at column %(colno)s)") % {"msg": exc.msg, "colno": exc.colno}
                    )
                    continue
                problem = check_record(kind, rec)
                if problem:
                    report.error(lineno, problem)
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
        report.error(report.lines + 1, _("not UTF-8 text (%(reason)s)") % {"reason": exc.reason})
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        report.error(report.lines + 1, _("unreadable file (%(exc)s)") % {"exc": exc})
    if report.records == 0 and report.ok:
        report.error(1, _("the file holds no records"))
    return report
