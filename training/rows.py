"""A stage's training rows, read by index from a token cache (training/token_cache.py) and padded per batch.

Modes: ``packed`` pretraining cuts the document stream (``[bos] text [eos]`` back to back) into full ``max_seq_len``
windows, as nanoGPT reads its token file; ``padded`` pretraining is MiniMind's (one document per row, truncated to
``max_seq_len`` with its eos kept, pad positions out of the loss); ``sft`` rows are conversations with labels on the
assistant spans; ``dpo`` rows pair a chosen and a rejected conversation; ``rl`` rows are prompts, left-padded, with
each record's expected answers beside them. A batch is padded only to its longest row (rounded up to ``multiple``
columns, so that torch.compile sees few shapes): rows are right-padded and attention is causal, so the logits and
the loss of the real tokens are those of rows padded to ``max_seq_len``.

``packing`` (SFT, LoRA and DPO; on by default) puts several of a batch's conversations into one row (first-fit
decreasing, up to ``max_seq_len``) with ``pos`` (positions restarting at each conversation) and ``doc`` (which
conversation each column belongs to, 0 for padding): the model attends only within a conversation
(``training.model.packed_inputs``), so every token's logits and loss are those of the unpacked batch, and the padding
that per-batch trimming leaves (a third of SFT's compute at MiniMind's conversation lengths) is gone.

Nothing here holds the dataset: a view is the cache's memory-mapped columns and, for a subset (the train/eval
split), an index array; peak memory grows with the batch, not with the file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from . import token_cache
from .records import is_gzip
from .tokenizer import EOS_ID, PAD_ID


class Rows:
    """``source``: a token_cache.Cache (or rows in memory), or a LazySource while the cache is being built (rows
    encoded on demand, identical to the cache's) with ``pending`` the cache's folder: the view moves to the cache
    as soon as it is complete, for every subset of it at once."""

    def __init__(self, source, mode: str, max_seq_len: int, index: np.ndarray | None = None, pending=None,
                 shared: dict | None = None, pack: bool = False):
        self.mode, self.msl, self.index = mode, max_seq_len, index
        self.shared = shared if shared is not None else {"source": source, "pending": pending,
                                                         "pack": pack and mode in ("sft", "dpo")}
        source = self.shared["source"]
        if mode == "packed":
            self.n_base = len(source.columns["x"].ids) // max_seq_len
        else:
            self.n_base = source.records

    @property
    def cache(self):
        return token_cache.settled(self.shared)

    @property
    def columns(self):
        return self.cache.columns

    def __len__(self):
        return self.n_base if self.index is None else len(self.index)

    def base(self, positions) -> np.ndarray:
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        return pos if self.index is None else self.index[pos]

    def subset(self, positions) -> "Rows":
        return Rows(None, self.mode, self.msl, self.base(positions), shared=self.shared)

    def split(self, ratio: float, seed: int) -> tuple["Rows", "Rows | None"]:
        """Hold out ``ratio`` of the rows (at least one, at most 1000) as a fixed eval split."""
        n = len(self)
        n_eval = min(max(int(n * ratio), 1), 1000) if ratio > 0 and n >= 20 else 0
        if not n_eval:
            return self, None
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 10_000))
        ev, tr = perm[:n_eval].sort().values, perm[n_eval:].sort().values
        return self.subset(tr.numpy()), self.subset(ev.numpy())

    def lengths(self) -> torch.Tensor:
        """Each row's real length in tokens after the cut to max_seq_len (the longer side for DPO)."""
        if self.mode == "packed":
            return torch.full((len(self),), self.msl, dtype=torch.long)
        lengths = None
        for col in self.columns.values():
            n = np.minimum(col.lengths(), self.msl)
            lengths = n if lengths is None else np.maximum(lengths, n)
        lengths = lengths if self.index is None else lengths[self.index]
        return torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int64))

    def order(self, global_bs: int, seed: int, epoch: int, lengths=None) -> torch.Tensor:
        """The positions of one epoch, in the order they are trained (``epoch_order``)."""
        return epoch_order(len(self), global_bs, seed, epoch, lengths)

    def state(self):
        """What a checkpoint keeps of the data besides the position (nothing: rows are found by index)."""
        return None

    def load_state(self, state) -> None:
        pass

    def record(self, i: int) -> dict:
        """An RL record's expected answers and question, by its index in the dataset."""
        return self.cache.record_meta(int(i))

    def batch(self, positions, multiple: int = 8) -> dict:
        """The rows at ``positions`` as tensors: ``x``/``y`` (``xr``/``yr`` for DPO's rejected side; ``idx`` for RL)."""
        base = self.base(positions)
        msl = self.msl
        if self.mode == "packed":
            ids = self.columns["x"].ids
            x = torch.from_numpy(np.stack([ids[i * msl:(i + 1) * msl] for i in base]).astype(np.int64))
            return {"x": x, "y": x.clone()}
        fetched = self.cache.rows(base)
        if self.mode == "rl":
            rows = [r.astype(np.int64)[-msl:] for r in fetched["p"]]
            width = _width(max(len(r) for r in rows), multiple, msl)
            x = np.full((len(rows), width), PAD_ID, dtype=np.int64)
            for j, r in enumerate(rows):
                x[j, width - len(r):] = r
            return {"x": torch.from_numpy(x), "idx": torch.from_numpy(base.copy())}
        sides = [("x", "y", "c"), ("xr", "yr", "r")] if self.mode == "dpo" else [("x", "y", "x")]
        cut = {}
        for xk, yk, col in sides:
            rows = []
            for j, ids in enumerate(fetched[col]):
                ids = ids.astype(np.int64)
                if self.mode == "padded":
                    ids = ids if len(ids) <= msl else np.append(ids[:msl - 1], EOS_ID)
                    rows.append((ids, np.where(ids == PAD_ID, -100, ids)))
                else:
                    ids = ids[:msl]
                    rows.append((ids, np.where(fetched[col + ".mask"][j][:msl].astype(bool), ids, -100)))
            cut[(xk, yk)] = rows
        if self.shared.get("pack"):
            return pack_rows([r for rows in cut.values() for r in rows], msl, multiple)
        width = _width(max(len(ids) for rows in cut.values() for ids, _ in rows), multiple, msl)
        out = {}
        for (xk, yk), rows in cut.items():
            x = np.full((len(rows), width), PAD_ID, dtype=np.int64)
            y = np.full((len(rows), width), -100, dtype=np.int64)
            for j, (ids, labels) in enumerate(rows):
                x[j, :len(ids)], y[j, :len(ids)] = ids, labels
            out[xk], out[yk] = torch.from_numpy(x), torch.from_numpy(y)
        return out

    def all(self, multiple: int = 8) -> dict:
        return self.batch(np.arange(len(self)), multiple)


def epoch_order(n_rows: int, global_bs: int, seed: int, epoch: int, lengths=None, window: int = 64) -> torch.Tensor:
    """The row order of one epoch: a seeded shuffle, and with ``lengths`` grouped by length.

    Grouping sorts each window of ``window`` global batches by length and shuffles the resulting batches, so a batch
    holds rows of similar length and ``trim_padding`` removes most of the padding, while every row is still seen once
    per epoch and the order depends only on (seed, epoch), which exact resume relies on. A last partial batch stays
    last. Rows of one length (packed pretraining) keep the plain shuffle.
    """
    gen = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n_rows, generator=gen)
    if lengths is None or n_rows <= global_bs or int(lengths.min()) == int(lengths.max()):
        return order
    chunk = global_bs * window
    order = torch.cat([idx[torch.argsort(lengths[idx], descending=True, stable=True)]
                       for idx in order.split(chunk)])
    full = n_rows // global_bs
    batches = order[:full * global_bs].view(full, global_bs)
    batches = batches[torch.randperm(full, generator=gen)].reshape(-1)
    return torch.cat([batches, order[full * global_bs:]])


def pack_rows(seqs: list, msl: int, multiple: int = 8) -> dict:
    """``seqs`` ((ids, labels) pairs, each at most ``msl`` long) packed into as few rows as first-fit decreasing
    finds: ``x``, ``y`` (labels, -100 on padding), ``pos`` (positions from 0 in each sequence) and ``doc`` (sequence
    ``i`` is ``i + 1`` wherever it lies; padding 0). A row keeps its sequences in batch order."""
    longest_first = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    fills: list[int] = []  # the rows first-fit decreasing needs ...
    for i in longest_first:
        n = len(seqs[i][0])
        j = next((j for j, f in enumerate(fills) if f + n <= msl), None)
        if j is None:
            fills.append(n)
        else:
            fills[j] += n
    bins: list[list] = [[0, []] for _ in fills]  # ... then as many rows, balanced: each sequence into the
    for i in longest_first:  # least filled row it fits in, so that the width (the fullest row) is as small as can be
        n = len(seqs[i][0])
        b = min((b for b in bins if b[0] + n <= msl), key=lambda b: b[0], default=None)
        if b is None:
            b = [0, []]
            bins.append(b)
        b[0] += n
        b[1].append(i)
    width = _width(max(b[0] for b in bins), multiple, msl)
    x = np.full((len(bins), width), PAD_ID, dtype=np.int64)
    y = np.full((len(bins), width), -100, dtype=np.int64)
    pos = np.zeros((len(bins), width), dtype=np.int64)
    doc = np.zeros((len(bins), width), dtype=np.int64)
    for r, (_, members) in enumerate(bins):
        at = 0
        for i in sorted(members):
            ids, labels = seqs[i]
            n = len(ids)
            x[r, at:at + n], y[r, at:at + n], pos[r, at:at + n], doc[r, at:at + n] = ids, labels, np.arange(n), i + 1
            at += n
    return {"x": torch.from_numpy(x), "y": torch.from_numpy(y), "pos": torch.from_numpy(pos),
            "doc": torch.from_numpy(doc)}


def _width(longest: int, multiple: int, msl: int) -> int:
    return max(min(-(-longest // multiple) * multiple, msl), 1)


MODES = {"sft": "sft", "dpo": "dpo", "rl": "rl"}


def mode_for(processing: str, cfg: dict) -> str:
    if processing == "pretrain":
        return "packed" if cfg.get("packing") else "padded"
    return MODES[processing]


LAZY_BYTES = int(float(os.environ.get("MINICLOUD_LAZY_DATA_MB", "32")) * 1e6)


def load(spec: dict, tok, dataset: str | None = None, processing: str | None = None):
    """The rows of the job's dataset (or of ``dataset``, its eval file), from the token cache, prepared when absent.

    A large plain file without a cache yet is not waited for where the rows can be read before it is tokenised:
    the record-row stages (all but packed pretraining) without ``group_by_length`` (which needs every length), and
    packed pretraining, which reads a large file shard by shard (training/shards.py, cache or not). Its cache is
    built by a background process (``python -m training prepare``, this node's first rank only) while training
    reads the records it needs and encodes them as the cache will (MiniMind's way of starting at once), and moves to
    the cache when it is done.
    """
    from . import shards

    cfg = spec["config"]
    processing = processing or token_cache.PROCESSING[spec["stage"]]
    path = dataset or spec["dataset"]
    root = Path(spec.get("data_cache") or token_cache.default_root())
    cap = spec.get("data_cache_gb")
    options = token_cache.processing_options(processing, cfg)
    data_sha = (spec.get("checksums") or {}).get(str(path))
    mode = mode_for(processing, cfg)
    size = os.path.getsize(path)
    large = size >= LAZY_BYTES
    source = pending = None
    if large and (mode == "packed" or not cfg.get("group_by_length")) and not is_gzip(path):
        root.mkdir(parents=True, exist_ok=True)
        name = token_cache.cache_name(data_sha or token_cache.file_sha256(path, root),
                                      token_cache.tokenizer_digest(spec["tokenizer"]), processing, options)
        if not (root / name / "meta.json").exists():
            command = ["--tokenizer", str(spec["tokenizer"]), "--processing", processing, "--options",
                       json.dumps(options), "--cache", str(root), "--sha256", data_sha or "", "--cap-gb", str(cap or "")]
            source, pending = _lazy(spec, tok, path, command, processing, options, root / name), root / name
    if source is None:
        source = token_cache.Cache(token_cache.prepare(path, tok, spec["tokenizer"], processing, options, root,
                                                       data_sha=data_sha,
                                                       cap_bytes=int(float(cap) * 1e9) if cap else None))
    if mode == "packed" and large:
        from . import events

        view = shards.ShardedRows(shards.Shards(source, cfg["max_seq_len"], size, pending),
                                  cfg.get("seed", 42))
        events.log(f"data: packed windows read shard by shard ({view.shards.count} shards; the window count is "
                   "estimated from the first ones)")
        return view
    return Rows(source, mode, cfg["max_seq_len"], pending=pending, pack=bool(cfg.get("packing")))


def _lazy(spec, tok, path, command, processing, options, folder):
    from . import events
    from .warm import background_child

    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        subprocess.Popen([sys.executable, "-u", "-m", "training", "prepare", str(path), *command],
                         stdin=subprocess.DEVNULL, preexec_fn=background_child)
    source = token_cache.LazySource(path, token_cache.Encoder(tok, processing, options), folder.parent)
    events.log(f"data: {source.records} records read as they are needed while the token cache is built in the "
               "background")
    return source


def from_records(tok, processing: str, records: list[dict], cfg: dict) -> Rows:
    """Rows of a few records encoded in memory (the eval stage's first ``eval_records``), through the same encoder."""
    encoded = token_cache.Encoder(tok, processing, token_cache.processing_options(processing, cfg)).rows(
        list(enumerate(records)))
    columns = {}
    for name in token_cache.COLUMNS[processing]:
        rows = encoded.get(name, [])
        off = np.concatenate([[0], np.cumsum([len(r) for r in rows], dtype=np.int64)]).astype(np.int64)
        ids = np.concatenate(rows) if rows else np.zeros(0, dtype=np.uint32)
        mask = np.concatenate(encoded[name + ".mask"]) if rows and name + ".mask" in encoded else None
        columns[name] = _Col(off, ids, mask)
    return _in_memory(columns, len(records), mode_for(processing, cfg), cfg["max_seq_len"],
                      pack=bool(cfg.get("packing")))


def memory_rows(stream: np.ndarray, mode: str, msl: int) -> Rows:
    """Packed rows of a token stream held in memory (a sharded file's eval windows)."""
    return _in_memory({"x": _Col(np.array([0, len(stream)], dtype=np.int64), stream, None)}, 1, mode, msl)


def _in_memory(columns: dict, records: int, mode: str, msl: int, pack: bool = False) -> Rows:
    cache = SimpleNamespace(columns=columns, records=records,
                            rows=lambda base: token_cache.column_rows(columns, base))
    return Rows(cache, mode, msl, pack=pack)


class _Col:
    """A column in memory, shaped like token_cache.Column."""

    def __init__(self, off, ids, mask):
        self.off, self.ids, self.mask = off, ids, mask

    def __len__(self):
        return len(self.off) - 1

    def lengths(self):
        return np.diff(self.off)
