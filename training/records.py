"""MiniMind's JSONL datasets: the one reader and record schema of the portal and the engine.

A dataset is a ``.jsonl`` file or a gzip-compressed one (``.jsonl.gz``, told by its magic bytes), one JSON record per
line, of one kind (../docs/datasets.md): ``pretrain`` ``{"text"}``; ``sft`` ``{"conversations": [...]}``; ``dpo``
``{"chosen", "rejected"}`` sharing their prompt; ``rlaif`` conversations ending with a placeholder assistant turn,
optionally with the expected answers ``gt``/``answer`` (strings or numbers, which MiniMind reads with ``str()``).

The portal's upload validation (jobs/validation.py), the engine's data preparation (training/token_cache.py), the
eval stage and the demo data all read through here, so a record the portal accepted is one the engine trains on.
Problems are ``(template, params)``: English templates marked for the catalogue (the portal translates them, the
engine writes them as they are). Pure Python: no torch, no Django (numpy and indexed_gzip for the record index of a
preview, imported when used).
"""
from __future__ import annotations

import gzip
import io
import json
import os

from .spec import Explained, gettext_noop, render

KINDS = ("pretrain", "sft", "dpo", "rlaif")
ROLES = ("system", "user", "assistant", "tool")
Problem = tuple  # (template, params)


def problem(template: str, **params) -> Problem:
    return template, params


def message(p: Problem, translate=None) -> str:
    """A problem as text, its template passed through ``translate`` (the portal's gettext) when given."""
    return render(*p, translate or gettext_noop)


class LineError(Explained):
    """A problem with one line of a dataset: ``lineno`` and ``problem`` (the portal's validation reports them),
    explained as "dataset line N: ..." (the engine's error event, translated by the portal; ``str()`` in English)."""

    def __init__(self, lineno: int, problem: Problem):
        self.lineno, self.problem = lineno, problem
        super().__init__(gettext_noop("dataset line %(line)s: %(problem)s"), line=lineno, problem=problem)


# Bounds of the one reader: a line longer than this is refused, not read into memory (a record is a few KB; MiniMind's
# longest are well under 1 MB), and a gzip file may unpack to at most this many times its size (text packs 2-10x; a
# "zip bomb" packs a thousand) or GZIP_FLOOR_BYTES, whichever is more.
MAX_LINE_BYTES = int(os.environ.get("MINICLOUD_MAX_LINE_MB", "16")) << 20
GZIP_MAX_RATIO = 50
GZIP_FLOOR_BYTES = 256 << 20


class DataTooLarge(LineError):
    """A line or an unpacked file beyond the reader's bounds: ``problem`` says which."""


def line_too_long(lineno: int) -> DataTooLarge:
    """The refusal of a line longer than MAX_LINE_BYTES (by ``Lines``, and by the engine's reads of single lines)."""
    return DataTooLarge(lineno, problem(gettext_noop("longer than %(mb)s MB"), mb=MAX_LINE_BYTES >> 20))


GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path) -> bool:
    """Whether a dataset file is gzip-compressed (told by its magic bytes, whatever its name)."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


class _Hashed(io.RawIOBase):
    """A file's bytes as stored, each passed through ``digest`` (a hashlib object) as it is read: one read of a file
    gives both its lines and its checksum (``Lines(digest=...)``)."""

    def __init__(self, f, digest):
        self.f, self.digest, self.pos = f, digest, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer)
        if n:
            self.digest.update(memoryview(buffer)[:n])
            self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()
        super().close()


class Lines:
    """A dataset file read line by line (bytes, ``\\n`` kept), gunzipped on the fly when compressed, within the bounds
    above: iterating never holds more than one line of at most MAX_LINE_BYTES. ``text=True`` yields str (UTF-8,
    strict: a UnicodeDecodeError names nothing, callers add the line). ``digest`` (a hashlib object): every byte of the
    file as stored goes through it as it is read; ``read_rest`` reads what the lines left, so that it covers the
    whole file however the reading stopped (the upload's validation: one read for the records and the checksum)."""

    def __init__(self, path, text: bool = False, gzip_index=None, digest=None):
        if digest is None:
            self.raw = open(path, "rb")
        else:
            self.raw = io.BufferedReader(_Hashed(open(path, "rb", buffering=0), digest), 1 << 20)
        self.text = text
        self.gzip = self.raw.peek(2)[:2] == GZIP_MAGIC
        self.f = gzip.GzipFile(fileobj=self.raw, mode="rb") if self.gzip else self.raw
        self.seekable = not self.gzip
        if self.gzip and gzip_index is not None:  # its seek points (save_gzip_index): read on from anywhere
            import indexed_gzip

            self.f = indexed_gzip.IndexedGzipFile(fileobj=self.raw, index_file=str(gzip_index), auto_build=False)
            self.seekable = True
        self.budget = max(GZIP_MAX_RATIO * os.fstat(self.raw.fileno()).st_size, GZIP_FLOOR_BYTES)
        self.lineno = 0
        self.unpacked = 0
        self.start = 0  # the byte offset of the line last yielded (in the unpacked stream)

    def seek(self, offset: int) -> None:
        """Read on from byte ``offset`` of the (unpacked) file: a record's start, from a record index below; a gzip
        file only with its seek points. Line numbers then count from there."""
        if not self.seekable:
            raise ValueError("a gzip file without its seek points is read from its start")
        self.f.seek(offset)
        self.unpacked = self.start = offset

    def __iter__(self):
        while True:
            line = self.f.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            self.lineno += 1
            if len(line) > MAX_LINE_BYTES:
                raise line_too_long(self.lineno)
            self.start = self.unpacked
            self.unpacked += len(line)
            if self.gzip and self.unpacked > self.budget:
                raise DataTooLarge(self.lineno, problem(gettext_noop(
                    "the gzip file unpacks to more than %(mb)s MB (%(ratio)s times its size)"),
                    mb=self.budget >> 20, ratio=GZIP_MAX_RATIO))
            yield line.decode("utf-8") if self.text else line

    def read_rest(self) -> None:
        """Read the stored bytes the lines have not (through ``digest``)."""
        while self.raw.read(1 << 20):
            pass

    def close(self):
        self.f.close()
        self.raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_binary(path) -> Lines:
    """A dataset file's lines as bytes (``Lines``)."""
    return Lines(path)


def open_text(path, gzip_index=None, digest=None) -> Lines:
    """A dataset file's lines as text (``Lines``)."""
    return Lines(path, text=True, gzip_index=gzip_index, digest=digest)


def _json_string_list(value, what: str) -> Problem | None:
    """``tools``/``tool_calls`` are JSON-encoded strings of a list in MiniMind's data."""
    if not isinstance(value, str):
        return problem(gettext_noop("%(what)s must be a JSON-encoded string (MiniMind stores it as text)"), what=what)
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError as exc:
        return problem(gettext_noop("%(what)s is not valid JSON (%(msg)s)"), what=what, msg=exc.msg)
    if not isinstance(decoded, list):
        return problem(gettext_noop("%(what)s must encode a list"), what=what)
    return None


def check_conversation(msgs, where: str = "conversations", placeholder: bool = False) -> Problem | None:
    """The first problem of one conversation, or None. ``placeholder``: the last message is RL's empty answer."""
    if not isinstance(msgs, list) or not msgs:
        return problem(gettext_noop("'%(where)s' must be a non-empty list of messages"), where=where)
    previous = None
    for i, m in enumerate(msgs, 1):
        if not isinstance(m, dict):
            return problem(gettext_noop("%(where)s message %(i)s must be an object"), where=where, i=i)
        role = m.get("role")
        if role not in ROLES:
            return problem(gettext_noop("%(where)s message %(i)s: role must be one of %(roles)s, not %(role)s"),
                           where=where, i=i, roles=", ".join(ROLES), role=repr(role))
        for key in ("content", "reasoning_content"):
            if key in m and not isinstance(m[key], str):
                return problem(gettext_noop("%(where)s message %(i)s: '%(key)s' must be a string"), where=where, i=i,
                               key=key)
        if "content" not in m:
            return problem(gettext_noop("%(where)s message %(i)s: 'content' is missing"), where=where, i=i)
        last = i == len(msgs)
        if m.get("tools"):
            found = _json_string_list(m["tools"], f"{where} message {i}: 'tools'")
            if found:
                return found
        if m.get("tool_calls"):
            if role != "assistant":
                return problem(gettext_noop("%(where)s message %(i)s: only assistant messages carry 'tool_calls'"),
                               where=where, i=i)
            found = _json_string_list(m["tool_calls"], f"{where} message {i}: 'tool_calls'")
            if found:
                return found
        empty = not m["content"].strip() and not m.get("tool_calls") and not m.get("reasoning_content")
        if empty and role in ("user", "assistant") and not (placeholder and last):
            return problem(gettext_noop("%(where)s message %(i)s: empty %(role)s text"), where=where, i=i, role=role)
        if role == "system" and i != 1:
            return problem(gettext_noop("%(where)s message %(i)s: a system message may only come first"),
                           where=where, i=i)
        if role == "user" and previous not in (None, "system", "assistant", "tool"):
            return problem(gettext_noop("%(where)s message %(i)s: roles out of order (user after %(previous)s)"),
                           where=where, i=i, previous=previous)
        if role == "assistant" and previous not in ("user", "tool"):
            return problem(gettext_noop("%(where)s message %(i)s: roles out of order (assistant after %(previous)s)"),
                           where=where, i=i, previous=previous or "nothing")
        if role == "tool" and previous not in ("assistant", "tool"):
            return problem(gettext_noop("%(where)s message %(i)s: roles out of order (tool result after "
                                        "%(previous)s)"), where=where, i=i, previous=previous)
        if role == "tool" and previous == "assistant" and not msgs[i - 2].get("tool_calls"):
            return problem(gettext_noop("%(where)s message %(i)s: a tool result must follow an assistant message "
                                        "with 'tool_calls'"), where=where, i=i)
        previous = role
    if placeholder:
        if msgs[-1].get("role") != "assistant":
            return problem(gettext_noop("the last message must be the placeholder assistant turn"))
        if len(msgs) < 2:
            return problem(gettext_noop("an RL prompt needs a user message before the placeholder"))
    elif not any(m.get("role") == "assistant" for m in msgs):
        return problem(gettext_noop("'%(where)s' has no assistant message to learn from"), where=where)
    return None


def _answer_ok(g) -> bool:
    return isinstance(g, (str, int, float)) and not isinstance(g, bool)


def check_record(kind: str, rec) -> Problem | None:
    """The first problem of one record of ``kind``, or None."""
    if not isinstance(rec, dict):
        return problem(gettext_noop("a record must be a JSON object"))
    if kind == "pretrain":
        text = rec.get("text")
        if "text" not in rec:
            return problem(gettext_noop("missing field 'text'"))
        if not isinstance(text, str):
            return problem(gettext_noop("'text' must be a string, not %(type)s"), type=type(text).__name__)
        if not text.strip():
            return problem(gettext_noop("empty 'text'"))
        return None
    if kind == "sft":
        if "conversations" not in rec:
            return problem(gettext_noop("missing field 'conversations'"))
        return check_conversation(rec["conversations"])
    if kind == "dpo":
        for side in ("chosen", "rejected"):
            if side not in rec:
                return problem(gettext_noop("missing field '%(side)s'"), side=side)
            found = check_conversation(rec[side], side)
            if found:
                return found
        if _prompt(rec["chosen"]) != _prompt(rec["rejected"]):
            return problem(gettext_noop("'chosen' and 'rejected' must share the same prompt (every message before "
                                        "the last answer)"))
        return None
    if kind == "rlaif":
        if "conversations" not in rec:
            return problem(gettext_noop("missing field 'conversations'"))
        found = check_conversation(rec["conversations"], placeholder=True)
        if found:
            return found
        gt = rec.get("gt", rec.get("answer"))
        if gt is not None and not (_answer_ok(gt) or (isinstance(gt, list) and all(_answer_ok(g) for g in gt))):
            return problem(gettext_noop("'gt'/'answer' must be a string, a number or a list of them"))
        return None
    return problem(gettext_noop("unknown dataset kind %(kind)s"), kind=repr(kind))


def _prompt(msgs) -> list:
    last_answer = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=len(msgs))
    return [(m.get("role"), m.get("content")) for m in msgs[:last_answer]]


def expected_answers(rec) -> list[str]:
    """An RL record's expected answers as strings (MiniMind applies ``str()``: ``"gt": [59]`` means "59")."""
    gt = rec.get("gt", rec.get("answer"))
    if gt is None:
        return []
    return [str(g) for g in (gt if isinstance(gt, list) else [gt])]


def kind_of(rec) -> str:
    """The kind of dataset a record belongs to (the eval stage reads any kind)."""
    if isinstance(rec, dict):
        if "text" in rec:
            return "pretrain"
        if "chosen" in rec:
            return "dpo"
        if "gt" in rec or "answer" in rec:
            return "rlaif"
        if "conversations" in rec:
            return "sft"
    raise Explained(gettext_noop("dataset: records need text, conversations, chosen/rejected, or conversations "
                                 "with gt"))


def record_text(kind: str, rec) -> str:
    """All the text of a record (statistics, duplicate checks, tokenizer training)."""
    if kind == "pretrain":
        return rec.get("text", "")
    msgs = rec.get("chosen", []) + rec.get("rejected", []) if kind == "dpo" else rec.get("conversations", [])
    return "\n".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))


def parse(line, lineno: int, kind: str | None):
    """One line's record, checked against ``kind`` (None: any JSON object); a LineError (a ValueError) names the
    line and the problem."""
    try:
        rec = loads(line)
    except ValueError as exc:
        raise LineError(lineno, unparsed(exc)) from None
    found = check_record(kind, rec) if kind else None
    if found:
        raise LineError(lineno, found)
    return rec


def unparsed(exc: ValueError) -> Problem:
    """Why ``loads`` could not read a line: not JSON, not UTF-8, or JSON it cannot hold (nesting too deep, a number
    too long)."""
    if isinstance(exc, json.JSONDecodeError):
        return problem(gettext_noop("not valid JSON (%(msg)s at column %(colno)s)"), msg=exc.msg, colno=exc.colno)
    if isinstance(exc, UnicodeDecodeError):
        return not_utf8(exc)
    return problem(gettext_noop("not readable JSON (%(error)s)"), error=str(exc))


def not_utf8(exc: UnicodeDecodeError) -> Problem:
    return problem(gettext_noop("not UTF-8 text (%(reason)s)"), reason=exc.reason)


def loads(line):
    """``json.loads`` of one dataset line, its RecursionError (deep nesting) a ValueError like the others."""
    try:
        return json.loads(line)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def iter_records(path, kind: str | None = None, limit: int | None = None):
    """``(line number, record)`` of every non-blank line, each checked against ``kind``; at most ``limit``."""
    n = 0
    with open_binary(path) as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and n >= limit:
                return
            if line.strip():
                n += 1
                yield lineno, parse(line, lineno, kind)


# A dataset's sparse record index: the byte offset of every INDEX_STRIDE-th record (non-blank line) in the file's
# (unpacked) bytes, written beside it when it is stored (from the validation's pass) so that a page of records
# anywhere in a 9 GB file is read after at most INDEX_STRIDE - 1 lines (a few MB), not the whole file up to it. A
# gzip file is entered in the middle through its seek points (indexed_gzip's zran index: the decompressor's 32 KB
# window every GZIP_SPACING bytes of the unpacked stream, ~2 MB per GB), built in the background once it is stored.
INDEX_STRIDE = 1024
GZIP_SPACING = 16 << 20


def save_record_index(path, offsets) -> None:
    """Write a record index (``offsets``: every INDEX_STRIDE-th record's start) as a NumPy file, atomically."""
    import numpy as np

    path = str(path)
    tmp = f"{path}.{os.getpid()}.part"
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(offsets, dtype=np.int64))
    os.replace(tmp, path)


def load_record_index(path):
    """A saved record index, or None when there is none (or it cannot be read: it is written again)."""
    import numpy as np

    try:
        index = np.load(str(path))
    except (OSError, ValueError, EOFError):
        return None
    return index if index.ndim == 1 and index.dtype == np.int64 else None


def save_gzip_index(path, index_path) -> None:
    """Build the seek points of a gzip dataset file (one pass) and write them, atomically."""
    import indexed_gzip

    tmp = f"{index_path}.{os.getpid()}.part"
    with indexed_gzip.IndexedGzipFile(str(path), spacing=GZIP_SPACING) as f:
        f.build_full_index()
        f.export_index(tmp)
    os.replace(tmp, str(index_path))


def record_offsets(path) -> list[int]:
    """Every INDEX_STRIDE-th record's byte offset, read line by line (a gzip file, or one stored before its index
    was kept; a plain file's are found faster by token_cache.line_index)."""
    offsets, n = [], 0
    with open_binary(path) as f:
        for line in f:
            if line.strip():
                if n % INDEX_STRIDE == 0:
                    offsets.append(f.start)
                n += 1
    return offsets


def read_records(path, offset: int, limit: int, index=None, gzip_index=None) -> list:
    """Records ``offset``…``offset + limit`` of a dataset file (blank lines skipped; .gz read as it streams), read on
    from the nearest record of ``index`` at or before ``offset`` when there is one (a gzip file: with its seek points
    ``gzip_index``, else from its start)."""
    import itertools

    with open_text(path, gzip_index) as f:
        skip = offset
        if index is not None and len(index) and f.seekable:
            k = min(offset // INDEX_STRIDE, len(index) - 1)
            f.seek(int(index[k]))
            skip -= k * INDEX_STRIDE
        lines = (line for line in f if line.strip())
        return [loads(line) for line in itertools.islice(lines, skip, skip + limit)]


def first_record(path) -> dict:
    for _, rec in iter_records(path, limit=1):
        return rec
    raise Explained(gettext_noop("dataset: no records"))


def no_samples() -> Explained:
    """Nothing left to train on once the records are tokenised (every record empty, or cut to nothing)."""
    return Explained(gettext_noop("dataset: no training samples after tokenization"))
