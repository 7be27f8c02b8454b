"""Token caches: a dataset version tokenised once, kept as memory-mapped files that every job on it reads by index.

A cache is one folder under the cache root (``MINICLOUD_HOME/cache/data`` in the portal) named by what decides its
tokens: the dataset's sha256, the tokenizer's files, how records become token rows (``pretrain``, ``sft``, ``dpo``,
``rl``) and the random options of that processing (the seed with MiniMind's identity system prompts, empty-think
dropping and opened thinking). ``max_seq_len`` and packing are not in it: rows are stored whole and cut when read,
so a job with another length or mode reuses the cache. In the folder, per column (``x``; DPO's ``c`` and ``r``;
RL's prompts ``p``):

- ``NAME.ids``: every row's token ids back to back (uint16 when the vocabulary fits, else uint32);
- ``NAME.off``: int64 offsets, row ``i`` is ``ids[off[i]:off[i + 1]]``;
- ``NAME.mask``: uint8, 1 where the token is a trained label (the assistant spans of the conversation stages);

``meta.bin``/``meta.off`` hold one JSON object per RL record (its expected answers and question) and ``meta.json``
describes the cache; it is written last, and the folder is built under another name and renamed into place, so a
job killed while preparing leaves nothing a later job trusts. One lock per cache makes a second job (or a second
DDP rank) on the same data wait for the first and then read its files: a class of thirty tokenises once.

Records are tokenised in worker processes (forked, so each has the job's tokenizer) over chunks of a few MB of lines
streamed from the file, at most two chunks per worker in flight: memory does not grow with the file. Least recently
used caches beyond a size cap are removed after a new one is written (a running job's mapped files stay readable:
the kernel keeps a removed file until it is unmapped). No torch here; the portal lists and clears caches with it.
One module (past 500 lines) because the folder's format, its builder and its readers change together.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import time
from collections import deque
from pathlib import Path

import numpy as np

from . import events, threads_given
from .records import MAX_LINE_BYTES, expected_answers, line_too_long, open_binary, parse

CACHE_VERSION = 1
CHUNK_BYTES = 1 << 20
CHUNK_LINES = 4096
INLINE_BYTES = 4 << 20  # smaller files are tokenised in the job's own process (a pool costs more than it saves)
PROCESSING = {"pretrain": "pretrain", "sft": "sft", "lora": "sft", "distill": "sft", "dpo": "dpo", "ppo": "rl",
              "grpo": "rl", "eval": None}
DATASET_KIND = {"pretrain": "pretrain", "sft": "sft", "dpo": "dpo", "rl": "rlaif"}
COLUMNS = {"pretrain": {"x": False}, "sft": {"x": True}, "dpo": {"c": True, "r": True}, "rl": {"p": False}}


# --- what a cache is keyed by ------------------------------------------------------------------------------------

def processing_options(processing: str, cfg: dict) -> dict:
    """The options that change the tokens of ``processing``; the seed only where something random may be drawn."""
    if processing == "sft":
        opts = {"system_prompt_ratio": cfg.get("system_prompt_ratio", 0.0),
                "empty_think_drop_ratio": cfg.get("empty_think_drop_ratio", 0.0)}
    elif processing == "dpo":
        opts = {"empty_think_drop_ratio": cfg.get("empty_think_drop_ratio", 0.0)}
    elif processing == "rl":
        opts = {"system_prompt_ratio": cfg.get("system_prompt_ratio", 0.0),
                "thinking_ratio": cfg.get("thinking_ratio", 0.0)}
    else:
        return {}
    opts = {k: float(v) for k, v in opts.items()}
    if any(v > 0 for v in opts.values()):
        opts["seed"] = int(cfg.get("seed", 42))
    return opts


def file_sha256(path, root: Path | None = None, progress=None) -> str:
    """The file's sha256, remembered under ``root`` by (path, size, mtime, inode) as git's index does, so a job on
    a 9 GB file does not hash it again when nothing changed. ``progress(fraction)``: the share read, every 64 MB."""
    st = os.stat(path)
    stamp = [str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino]
    memo = None
    if root is not None:
        memo = root / "checksums" / (hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:32] + ".json")
        try:
            return json.loads(memo.read_text())["sha256"]
        except (OSError, ValueError, KeyError):
            pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for n, block in enumerate(iter(lambda: f.read(1 << 20), b""), 1):
            digest.update(block)
            if progress and n % 64 == 0:
                progress(min(f.tell() / max(st.st_size, 1), 1.0))
    sha = digest.hexdigest()
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "sha256": sha}))
        os.replace(tmp, memo)
    return sha


def tokenizer_digest(tok_dir) -> str:
    """The tokenizer's identity: a hash of the files of its folder (vocabulary, merges, chat template)."""
    digest = hashlib.sha256()
    for path in sorted(Path(tok_dir).iterdir()):
        if path.is_file() and path.suffix in (".json", ".jinja", ".txt", ".model"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_name(data_sha: str, tok_digest: str, processing: str, options: dict) -> str:
    key = json.dumps({"v": CACHE_VERSION, "data": data_sha, "tokenizer": tok_digest, "processing": processing,
                      "options": options}, sort_keys=True)
    return f"{data_sha[:12]}-{processing}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


# --- encoding records into token rows (in worker processes) ------------------------------------------------------

def _starts(ids: np.ndarray, pattern: list[int]) -> np.ndarray:
    """Positions where ``pattern`` begins in ``ids``."""
    n, k = len(ids), len(pattern)
    if n < k:
        return np.zeros(0, dtype=np.int64)
    hit = ids[:n - k + 1] == pattern[0]
    for j in range(1, k):
        hit &= ids[j:n - k + 1 + j] == pattern[j]
    return np.flatnonzero(hit)


def assistant_mask(ids: np.ndarray, start: list[int], end: list[int]) -> np.ndarray:
    """MiniMind's SFT labels as a mask: 1 from right after each ``<|im_start|>assistant\\n`` through the closing
    ``<|im_end|>\\n`` inclusive (to the end of the row when it is cut before), 0 elsewhere. The scan is MiniMind's
    ``generate_labels`` (a start found inside a span is part of that span), found with array compares."""
    mask = np.zeros(len(ids), dtype=np.uint8)
    starts, ends = _starts(ids, start), _starts(ids, end)
    i = 0
    for p in starts:
        if p < i:
            continue
        first = p + len(start)
        j = np.searchsorted(ends, first)
        stop = min(int(ends[j]) + len(end), len(ids)) if j < len(ends) else len(ids)
        mask[first:stop] = 1
        i = stop
    return mask


class Encoder:
    """Records → token rows for one processing; one per process (the worker's copy comes with the fork)."""

    def __init__(self, tok, processing: str, options: dict):
        from .tokenizer import BOS_ID, EOS_ID

        self.tok, self.processing, self.options = tok, processing, options
        self.backend = tok.backend_tokenizer
        self.bos, self.eos = BOS_ID, EOS_ID
        self.start = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.end = tok.encode("<|im_end|>\n", add_special_tokens=False)

    def _rng(self, index: int, side: str = "") -> random.Random | None:
        seed = self.options.get("seed")
        return None if seed is None else random.Random(f"{seed}:{index}:{side}")

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def rows(self, indexed: list[tuple[int, dict]]) -> dict:
        """``{column: [ids, ...]}`` (with ``column + ".mask"`` where labels are masked, ``"meta"`` for RL)."""
        from .chat import prompt_text, render

        o = self.options
        if self.processing == "pretrain":
            ids = self._encode([rec["text"] for _, rec in indexed])
            return {"x": [np.concatenate([[self.bos], row, [self.eos]]).astype(np.uint32) for row in ids]}
        if self.processing == "sft":
            texts = [render(self.tok, rec["conversations"], self._rng(i), o.get("system_prompt_ratio", 0.0),
                            o.get("empty_think_drop_ratio", 0.0)) for i, rec in indexed]
            ids = self._encode(texts)
            return {"x": ids, "x.mask": [assistant_mask(row, self.start, self.end) for row in ids]}
        if self.processing == "dpo":
            out = {}
            for col, side in (("c", "chosen"), ("r", "rejected")):
                # no random system prompt; empty-think removal drawn independently for each side (MiniMind)
                texts = [render(self.tok, rec[side], self._rng(i, side), 0.0, o.get("empty_think_drop_ratio", 0.0))
                         for i, rec in indexed]
                ids = self._encode(texts)
                out[col], out[col + ".mask"] = ids, [assistant_mask(row, self.start, self.end) for row in ids]
            return out
        texts, meta = [], []
        for i, rec in indexed:
            texts.append(prompt_text(self.tok, rec["conversations"][:-1], self._rng(i),
                                     o.get("system_prompt_ratio", 0.0), o.get("thinking_ratio", 0.0)))
            users = [m["content"] for m in rec["conversations"][:-1] if m["role"] == "user"]
            meta.append(json.dumps({"gt": expected_answers(rec), "question": users[-1] if users else ""},
                                   ensure_ascii=False).encode())
        return {"p": self._encode(texts), "meta": meta}


_WORKER: dict = {}


def _encode_chunk(first_line: int, first_index: int, lines: list[bytes]) -> tuple[int, dict]:
    """A chunk of lines → (records, rows); runs in a worker with ``_WORKER["encoder"]`` set before the fork."""
    encoder = _WORKER["encoder"]
    kind = DATASET_KIND[encoder.processing]
    indexed, index = [], first_index
    for lineno, line in enumerate(lines, first_line):
        if line.strip():
            indexed.append((index, parse(line, lineno, kind)))
            index += 1
    return len(indexed), encoder.rows(indexed) if indexed else {}


def _chunks(f):
    """(first line number, first record index, lines) of about CHUNK_BYTES each."""
    lineno, index, lines, size = 1, 0, [], 0
    first_line, first_index = 1, 0
    for line in f:
        lines.append(line)
        size += len(line)
        if line.strip():
            index += 1
        lineno += 1
        if size >= CHUNK_BYTES or len(lines) >= CHUNK_LINES:
            yield first_line, first_index, lines
            first_line, first_index, lines, size = lineno, index, [], 0
    if lines:
        yield first_line, first_index, lines


def workers_for(size_bytes: int) -> int:
    """Tokenising processes for a file of ``size_bytes``: the cores this process may use, at most 8, and no more
    than the threads it was given (a job on CPU slots gets its share of the node's cores, OMP_NUM_THREADS: its build
    must not take the cores of the job beside it); 0 (inline) for a small file or a single core."""
    if size_bytes < INLINE_BYTES:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus = min(cpus, 8, threads_given() or cpus)
    return cpus if cpus > 1 else 0


class Writer:
    """Appends rows to a cache folder being built; offsets are written as they come (memory stays flat)."""

    def __init__(self, folder: Path, processing: str, dtype):
        self.folder, self.dtype = folder, dtype
        self.columns = COLUMNS[processing]
        self.files, self.ends = {}, {}
        for col, masked in self.columns.items():
            self.files[col] = open(folder / f"{col}.ids", "wb")
            self.files[col + ".off"] = open(folder / f"{col}.off", "wb")
            self.files[col + ".off"].write(np.zeros(1, dtype=np.int64).tobytes())
            self.ends[col] = 0
            if masked:
                self.files[col + ".mask"] = open(folder / f"{col}.mask", "wb")
        if processing == "rl":
            self.files["meta"] = open(folder / "meta.bin", "wb")
            self.files["meta.off"] = open(folder / "meta.off", "wb")
            self.files["meta.off"].write(np.zeros(1, dtype=np.int64).tobytes())
            self.ends["meta"] = 0
        self.records = self.tokens = 0

    def add(self, n: int, rows: dict) -> None:
        self.records += n
        for col in self.columns:
            lengths = np.fromiter((len(r) for r in rows.get(col, [])), dtype=np.int64)
            if not len(lengths):
                continue
            self.files[col].write(np.concatenate(rows[col]).astype(self.dtype).tobytes())
            self.files[col + ".off"].write((self.ends[col] + np.cumsum(lengths)).tobytes())
            self.ends[col] += int(lengths.sum())
            if col + ".mask" in self.files:
                self.files[col + ".mask"].write(np.concatenate(rows[col + ".mask"]).tobytes())
        if "meta" in self.files and rows.get("meta"):
            lengths = np.fromiter((len(m) for m in rows["meta"]), dtype=np.int64)
            self.files["meta"].write(b"".join(rows["meta"]))
            self.files["meta.off"].write((self.ends["meta"] + np.cumsum(lengths)).tobytes())
            self.ends["meta"] += int(lengths.sum())
        self.tokens = sum(self.ends[c] for c in self.columns)

    def close(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()


def build(folder: Path, path, encoder: Encoder, progress=None) -> dict:
    """Tokenise the file at ``path`` into ``folder``; ``progress(fraction, records)`` now and then."""
    size = max(os.path.getsize(path), 1)
    dtype = np.uint16 if len(encoder.tok) <= 1 << 16 else np.uint32
    writer = Writer(folder, encoder.processing, dtype)
    workers = workers_for(size)
    t0 = time.time()
    with open_binary(path) as f:
        raw = f.raw  # the file as stored: how far the reading has come
        last = [0.0]

        def done(result, position):
            """A chunk's rows are written; ``position``: how far into the file (as stored) the chunk ended."""
            writer.add(*result)
            if progress and time.time() - last[0] > 0.5:
                last[0] = time.time()
                progress(min(position / size, 1.0), writer.records)

        if progress:
            progress(0.0, 0)
        _WORKER["encoder"] = encoder
        try:
            if not workers:
                for chunk in _chunks(f):
                    done(_encode_chunk(*chunk), raw.tell())
            else:
                from .warm import die_with_parent

                ctx = multiprocessing.get_context("fork")  # the workers inherit the loaded tokenizer
                os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: they are the parallelism
                with ctx.Pool(workers, initializer=die_with_parent) as pool:  # a killed job takes them along
                    pending = deque()
                    for chunk in _chunks(f):
                        pending.append((pool.apply_async(_encode_chunk, chunk), raw.tell()))
                        while len(pending) >= 2 * workers or (pending and pending[0][0].ready()):
                            result, position = pending.popleft()
                            done(result.get(), position)
                    while pending:
                        result, position = pending.popleft()
                        done(result.get(), position)
        finally:
            _WORKER.clear()
    writer.close()
    if progress:
        progress(1.0, writer.records)
    return {"records": writer.records, "tokens": writer.tokens, "dtype": np.dtype(dtype).name,
            "seconds": round(time.time() - t0, 3), "workers": workers, "source_bytes": size}


# --- preparing, reading, listing and evicting caches ---------------------------------------------------------------

def default_root() -> Path:
    return Path(os.environ.get("MINICLOUD_HOME", "var")) / "cache" / "data"


def _touch(folder: Path) -> None:
    try:
        os.utime(folder / "meta.json")
    except OSError:
        pass


def prepare(path, tok, tok_dir, processing: str, options: dict, root: Path, data_sha: str | None = None,
            cap_bytes: int | None = None) -> Path:
    """The folder of the cache for (``path``, tokenizer, processing, options), built now when there is none."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data_sha = data_sha or file_sha256(path, root)
    tok_digest = tokenizer_digest(tok_dir)
    name = cache_name(data_sha, tok_digest, processing, options)
    final = root / name
    if (final / "meta.json").exists():
        _touch(final)
        events.log(f"data: reusing the token cache {name}")
        return final
    with open(root / f".{name}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            events.log("data: another job is preparing the same data; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "meta.json").exists():  # the other job finished it
            _touch(final)
            return final
        for stale in root.glob(f".{name}.part*"):  # left by a job killed while preparing
            shutil.rmtree(stale, ignore_errors=True)
        part = root / f".{name}.part{os.getpid()}"
        part.mkdir()
        try:
            def progress(fraction, records):
                events.emit("progress", phase="prepare", fraction=round(fraction, 4), records=records)

            info = build(part, path, Encoder(tok, processing, options), progress)
            meta = {"version": CACHE_VERSION, "name": name, "dataset": str(Path(path).resolve()), "dataset_sha256": data_sha,
                    "dataset_kind": DATASET_KIND[processing], "tokenizer": str(tok_dir), "tokenizer_sha256": tok_digest, "processing": processing,
                    "options": options, "created": round(time.time(), 3), **info}
            (part / "meta.json").write_text(json.dumps(meta, indent=1))
            os.rename(part, final)
        except BaseException:
            shutil.rmtree(part, ignore_errors=True)
            raise
        events.log(f"data: tokenised {info['records']} records ({info['tokens']} tokens) in {info['seconds']:.1f} s "
                   f"with {info['workers'] or 1} process(es)")
    if cap_bytes is not None:
        evict(root, cap_bytes, keep={name})
    return final


def folder_bytes(folder: Path) -> int:
    """The bytes of the files in ``folder`` (those a removal takes away meanwhile count nothing)."""
    total = 0
    try:
        for p in folder.iterdir():
            try:
                total += p.stat().st_size if p.is_file() else 0
            except OSError:
                pass
    except OSError:
        pass
    return total


def list_caches(root: Path) -> list[dict]:
    """Every complete cache under ``root``, most recently used first, with its size and last use."""
    out = []
    root = Path(root)
    if not root.is_dir():
        return out
    for folder in root.iterdir():
        meta_path = folder / "meta.json"
        if folder.name.startswith(".") or not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        out.append({**meta, "path": str(folder), "bytes": folder_bytes(folder), "last_used": meta_path.stat().st_mtime})
    return sorted(out, key=lambda c: -c["last_used"])


def remove(root: Path, name: str) -> bool:
    """Remove one cache unless a job is building it (its lock is held)."""
    root = Path(root)
    folder = root / name
    if "/" in name or name.startswith(".") or not (folder / "meta.json").exists():
        return False
    with open(root / f".{name}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        gone = folder.with_name(f".{name}.gone{os.getpid()}")
        os.rename(folder, gone)  # atomic: no job sees a half-removed cache
        shutil.rmtree(gone, ignore_errors=True)
    (root / f".{name}.lock").unlink(missing_ok=True)
    return True


def _leftovers(root: Path):
    """What killed processes left under ``root``, each while the lock of its cache is held (a build cannot start on it
    meanwhile): the part of a build killed before its rename (``.NAME.partPID``: a job cancelled while tokenising, a
    worker killed under a statistics build) whose cache nobody is building now (a build in progress holds the lock),
    and a removal's folder killed mid-way (``.NAME.gonePID``). A part is otherwise removed only when the same cache is
    built again, which may be never: gigabytes that no cache lists."""
    root = Path(root)
    if not root.is_dir():
        return
    yield from root.glob(".*.gone*")
    for part in root.glob(".*.part*"):
        with open(root / f"{part.name.rsplit('.part', 1)[0]}.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being built
            yield part


def leftovers(root: Path) -> list[dict]:
    """``_leftovers(root)`` with their sizes (``data_cache list``)."""
    return [{"path": str(p), "bytes": folder_bytes(p)} for p in _leftovers(root)]


def remove_leftovers(root: Path) -> int:
    """Remove ``_leftovers(root)`` (each node's housekeeping, and before an eviction); the bytes freed."""
    freed = 0
    for path in _leftovers(root):
        freed += folder_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
    return freed


def evict(root: Path, cap_bytes: int, keep=()) -> list[str]:
    """Remove the least recently used caches until the rest fit in ``cap_bytes``; never those in ``keep``."""
    remove_leftovers(root)
    caches = list_caches(root)
    total = sum(c["bytes"] for c in caches)
    removed = []
    for c in reversed(caches):  # least recently used first
        if total <= cap_bytes:
            break
        if c["name"] in keep:
            continue
        if remove(root, c["name"]):
            total -= c["bytes"]
            removed.append(c["name"])
    return removed


class Column:
    """One column of a cache, memory-mapped: row ``i`` is ``ids[off[i]:off[i + 1]]``."""

    def __init__(self, folder: Path, name: str, dtype: str):
        self.off = _map(folder / f"{name}.off", np.int64)
        self.ids = _map(folder / f"{name}.ids", np.dtype(dtype))
        mask = folder / f"{name}.mask"
        self.mask = _map(mask, np.uint8) if mask.exists() else None

    def __len__(self):
        return len(self.off) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.off)


def _map(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class Cache:
    """A complete cache folder, opened read-only."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.columns = {name: Column(self.folder, name, self.meta["dtype"]) for name in COLUMNS[self.meta["processing"]]}
        self.records = self.meta["records"]
        meta_off = self.folder / "meta.off"
        self._meta = (_map(meta_off, np.int64), _map(self.folder / "meta.bin", np.uint8)) if meta_off.exists() else None

    def record_meta(self, i: int) -> dict:
        off, blob = self._meta
        return json.loads(bytes(blob[off[i]:off[i + 1]]))

    def rows(self, base) -> dict:
        return column_rows(self.columns, base)


def column_rows(columns: dict, base) -> dict:
    """``{name: [ids of row i for i in base]}`` (and ``name + ".mask"``) of memory-mapped or in-memory columns."""
    out = {}
    for name, col in columns.items():
        spans = [(int(col.off[i]), int(col.off[i + 1])) for i in base]
        out[name] = [col.ids[a:b] for a, b in spans]
        if col.mask is not None:
            out[name + ".mask"] = [col.mask[a:b] for a, b in spans]
    return out


_SPACE = np.frombuffer(b" \t\r\x0b\x0c", dtype=np.uint8)


def line_index(path, scratch, block: int = 64 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of every non-blank line of a plain (not compressed) file, from one newline scan,
    as arrays memory-mapped from files in the folder ``scratch`` (removed once mapped): a 9 GB file's index does not
    sit in the job's memory."""
    size = os.path.getsize(path)
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    files = {k: scratch / f".index-{os.getpid()}-{time.time_ns()}.{k}" for k in ("start", "end")}
    fd = os.open(path, os.O_RDONLY)
    try:
        with open(files["start"], "wb") as out_s, open(files["end"], "wb") as out_e:
            pos, line_start = 0, 0
            while chunk := os.pread(fd, block, pos):
                ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10).astype(np.int64) + pos + 1
                pos += len(chunk)
                if pos >= size and (not len(ends) or ends[-1] < size):
                    ends = np.append(ends, size)  # a last line without its newline
                starts = np.concatenate([[line_start], ends[:-1]]).astype(np.int64) if len(ends) else ends
                if len(ends):
                    line_start = int(ends[-1])
                keep = ends > starts
                here = starts - (pos - len(chunk))  # where each line starts in this chunk (< 0: in an earlier one)
                first = np.frombuffer(chunk, dtype=np.uint8)[np.clip(here, 0, max(len(chunk) - 1, 0))]
                maybe_blank = keep & ((ends - starts <= 4) | (here < 0) | np.isin(first, _SPACE))
                for i in np.flatnonzero(maybe_blank):  # a blank line is white space only
                    keep[i] = not _blank(fd, int(starts[i]), int(ends[i]))
                out_s.write(starts[keep].tobytes())
                out_e.write(ends[keep].tobytes())
        maps = tuple(_map(files[k], np.int64) for k in ("start", "end"))
    finally:
        os.close(fd)
        for f in files.values():
            f.unlink(missing_ok=True)  # the mappings keep the data until they are dropped
    return maps


def _blank(fd: int, start: int, end: int, block: int = 64 << 10) -> bool:
    """Whether the bytes [start, end) of the file are white space only, read a block at a time (a line may be long:
    it is not read whole to find its first character)."""
    while start < end:
        if os.pread(fd, min(block, end - start), start).strip():
            return False
        start += block
    return True


def line_number(path, offset: int) -> int:
    """The line number of the byte ``offset`` (for an error message)."""
    count, pos = 1, 0
    with open(path, "rb") as f:
        while pos < offset and (chunk := f.read(min(1 << 20, offset - pos))):
            count += chunk.count(b"\n")
            pos += len(chunk)
    return count


def settled(shared: dict):
    """``shared["source"]``, replaced by the finished Cache once the folder ``shared["pending"]`` being built in the
    background has its meta.json (one dict shared by every view of a dataset, so they all move at once)."""
    pending = shared["pending"]
    if pending is not None and (Path(pending) / "meta.json").exists():
        shared["source"], shared["pending"] = Cache(pending), None
    return shared["source"]


class LazySource:
    """The rows of a dataset whose cache is still being built, encoded on demand by the cache's own encoder (so
    identical to the cache's rows) from the lines of the file, found by ``line_index``."""

    def __init__(self, path, encoder: Encoder, scratch):
        self.path = path
        self.starts, self.ends = line_index(path, scratch)
        self.records = len(self.starts)
        self.encoder, self.kind = encoder, DATASET_KIND[encoder.processing]
        self.fd = os.open(path, os.O_RDONLY)  # read with pread: no shared file position between threads
        self.columns = None  # no lengths: group_by_length waits for the cache

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)

    def _records(self, base) -> list[tuple[int, dict]]:
        out = []
        for i in base:
            i = int(i)
            start, size = int(self.starts[i]), int(self.ends[i] - self.starts[i])
            if size > MAX_LINE_BYTES:  # refused as the cache's build (training.records.Lines) refuses it: unread
                raise line_too_long(line_number(self.path, start))
            line = os.pread(self.fd, size, start)
            try:
                out.append((i, parse(line, 0, self.kind)))
            except ValueError:  # name the line as the cache's build would
                out.append((i, parse(line, line_number(self.path, int(self.starts[i])), self.kind)))
        return out

    def rows(self, base) -> dict:
        return self.encoder.rows(self._records(base))

    def record_meta(self, i: int) -> dict:
        return json.loads(self.rows([i])["meta"][0])


def record_lengths(cache: Cache) -> np.ndarray:
    """Each record's length in tokens as the engine trains it (before the cut to max_seq_len; DPO: its longer side)."""
    lengths = None
    for col in cache.columns.values():
        n = col.lengths()
        lengths = n if lengths is None else np.maximum(lengths, n)
    return lengths


def find(root: Path, data_sha: str, tok_digest: str, processing: str) -> Cache | None:
    """A complete cache of this dataset, tokenizer and processing, whatever its options (the most recent)."""
    for c in list_caches(root):
        if (c["dataset_sha256"], c.get("tokenizer_sha256"), c["processing"]) == (data_sha, tok_digest, processing):
            return Cache(c["path"])
    return None
