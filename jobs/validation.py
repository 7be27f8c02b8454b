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

    def warn(self, line: int, message: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append([line, message])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "records": self.records, "lines": self.lines, "ok": self.ok,
                "error_count": self.error_count, "errors": self.errors, "warning_count": self.warning_count,
                "warnings": self.warnings, "sha256": self.sha256, "size_bytes": self.size_bytes}

    def summary(self, limit: int = 5) -> str:
        shown = "; ".join(f"line {n}: {m}" for n, m in self.errors[:limit])
        more = f" (and {self.error_count - limit} more)" if self.error_count > limit else ""
        return f"{self.error_count} error(s): {shown}{more}"


def _json_string_list(value, what: str) -> str | None:
    """``tools``/``tool_calls`` are JSON-encoded strings of a list in MiniMind's data."""
    if not isinstance(value, str):
        return f"{what} must be a JSON-encoded string (MiniMind stores it as text)"
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError as exc:
        return f"{what} is not valid JSON ({exc.msg})"
    if not isinstance(decoded, list):
        return f"{what} must encode a list"
    return None


def check_conversation(msgs, where: str = "conversations", placeholder: bool = False) -> str | None:
    """The first problem of one conversation, or None. ``placeholder``: the last message is RL's empty answer."""
    if not isinstance(msgs, list) or not msgs:
        return f"'{where}' must be a non-empty list of messages"
    previous = None
    for i, m in enumerate(msgs, 1):
        if not isinstance(m, dict):
            return f"{where} message {i} must be an object"
        role = m.get("role")
        if role not in ROLES:
            return f"{where} message {i}: role must be one of {', '.join(ROLES)}, not {role!r}"
        for key in ("content", "reasoning_content"):
            if key in m and not isinstance(m[key], str):
                return f"{where} message {i}: '{key}' must be a string"
        if "content" not in m:
            return f"{where} message {i}: 'content' is missing"
        last = i == len(msgs)
        if m.get("tools"):
            problem = _json_string_list(m["tools"], f"{where} message {i}: 'tools'")
            if problem:
                return problem
        if m.get("tool_calls"):
            if role != "assistant":
                return f"{where} message {i}: only assistant messages carry 'tool_calls'"
            problem = _json_string_list(m["tool_calls"], f"{where} message {i}: 'tool_calls'")
            if problem:
                return problem
        empty = not m["content"].strip() and not m.get("tool_calls") and not m.get("reasoning_content")
        if empty and role in ("user", "assistant") and not (placeholder and last):
            return f"{where} message {i}: empty {role} text"
        if role == "system" and i != 1:
            return f"{where} message {i}: a system message may only come first"
        if role == "user" and previous not in (None, "system", "assistant", "tool"):
            return f"{where} message {i}: roles out of order (user after {previous})"
        if role == "assistant" and previous not in ("user", "tool"):
            return f"{where} message {i}: roles out of order (assistant after {previous or 'nothing'})"
        if role == "tool" and previous not in ("assistant", "tool"):
            return f"{where} message {i}: roles out of order (tool result after {previous})"
        if role == "tool" and previous == "assistant" and not msgs[i - 2].get("tool_calls"):
            return f"{where} message {i}: a tool result must follow an assistant message with 'tool_calls'"
        previous = role
    if placeholder:
        if msgs[-1].get("role") != "assistant":
            return "the last message must be the placeholder assistant turn"
        if len(msgs) < 2:
            return "an RL prompt needs a user message before the placeholder"
    elif not any(m.get("role") == "assistant" for m in msgs):
        return f"'{where}' has no assistant message to learn from"
    return None


def check_record(kind: str, rec) -> str | None:
    """The first problem of one record of ``kind``, or None."""
    if not isinstance(rec, dict):
        return "a record must be a JSON object"
    if kind == "pretrain":
        text = rec.get("text")
        if "text" not in rec:
            return "missing field 'text'"
        if not isinstance(text, str):
            return f"'text' must be a string, not {type(text).__name__}"
        if not text.strip():
            return "empty 'text'"
        return None
    if kind == "sft":
        if "conversations" not in rec:
            return "missing field 'conversations'"
        return check_conversation(rec["conversations"])
    if kind == "dpo":
        for side in ("chosen", "rejected"):
            if side not in rec:
                return f"missing field '{side}'"
            problem = check_conversation(rec[side], side)
            if problem:
                return problem
        if _prompt(rec["chosen"]) != _prompt(rec["rejected"]):
            return "'chosen' and 'rejected' must share the same prompt (every message before the last answer)"
        return None
    if kind == "rlaif":
        if "conversations" not in rec:
            return "missing field 'conversations'"
        problem = check_conversation(rec["conversations"], placeholder=True)
        if problem:
            return problem
        gt = rec.get("gt", rec.get("answer"))
        if gt is not None and not (isinstance(gt, str) or (isinstance(gt, list) and all(isinstance(g, str)
                                                                                          for g in gt))):
            return "'gt'/'answer' must be a string or a list of strings"
        return None
    return f"unknown dataset kind {kind!r}"


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
                    report.error(lineno, f"not valid JSON ({exc.msg} at column {exc.colno})")
                    continue
                problem = check_record(kind, rec)
                if problem:
                    report.error(lineno, problem)
                    continue
                report.records += 1
                text = record_text(kind, rec)
                key = _fingerprint(line.strip())
                if key in exact:
                    report.warn(lineno, f"duplicate of line {exact[key]}")
                    continue
                fuzzy = _fingerprint(_PUNCT.sub("", _SPACE.sub("", text.lower())))
                if fuzzy in near:
                    report.warn(lineno, f"near-duplicate of line {near[fuzzy]} (same text up to case, spaces "
                                        "and punctuation)")
                if len(exact) < MAX_TRACKED:
                    exact[key] = lineno
                    near.setdefault(fuzzy, lineno)
    except UnicodeDecodeError as exc:
        report.error(report.lines + 1, f"not UTF-8 text ({exc.reason})")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        report.error(report.lines + 1, f"unreadable file ({exc})")
    if report.records == 0 and report.ok:
        report.error(1, "the file holds no records")
    return report
