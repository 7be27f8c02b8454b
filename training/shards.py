"""Packed pretraining on a large file, read shard by shard, so that training starts before the file is tokenised.

Packed rows are full ``max_seq_len`` windows of the document stream (training/rows.py). A plain shuffle of every
window of a file (what rows.Rows does) needs the whole stream, and so the whole file tokenised, before the first
step: ~70 s for 200 MB on two cores, where MiniMind's padded pretraining starts after ~13 s. A file of
``rows.LAZY_BYTES`` or more is therefore read this way instead, whether its token cache is complete or still being
built (the rows and their order are the same either way, so a resumed job continues where it was):

- **Shards.** The records are cut into at least ``MIN_SHARDS`` shards of consecutive records (about ``SHARD_BYTES``
  of the file each); a shard's stream (its records' ``[bos] text [eos]`` back to back) is cut into full windows, the
  tail of each shard (< ``max_seq_len`` tokens, ~0.2 % of a 256 KB shard) left out.
- **Epoch order.** Each epoch shuffles the training shards (seeded by seed and epoch), takes them ``GROUP`` at a
  time, and shuffles the windows of each group together: every window is seen once per epoch, a batch mixes windows
  from ``GROUP`` random places of the file, and training only ever needs the group it is in (and prefetches the
  next one on a thread while the current one trains).
- **Length of an epoch.** The number of windows is not known before the file is tokenised, so it is estimated from
  the shards of epoch 0's first group (tokens per record), identically with and without a cache. The epoch is that
  many windows: if the real stream is shorter the last positions wrap to the epoch's first windows, if longer its
  last windows wait for the next epoch's order (the difference is the estimate's error, ~1 %).
- **Eval split.** ``eval_ratio`` holds out that share of the shards (at least one, drawn with seed + 10000 as
  rows.Rows.split draws its rows); their first windows, at most 1000, are the eval rows, kept in memory.

While the cache is being built the shards are encoded on demand by the cache's own encoder
(token_cache.LazySource); once it is complete they are slices of its memory-mapped stream.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from . import token_cache
from .records import no_samples

SHARD_BYTES = 256 << 10
MIN_SHARDS = 64
GROUP = 4
KEEP = 3 * GROUP  # shards kept encoded in memory while there is no cache


class Shards:
    """The records of a file in shards, each one's token stream and its number of full windows."""

    def __init__(self, source, msl: int, file_bytes: int, pending=None):
        self.shared = {"source": source, "pending": pending}
        self.msl, self.records = msl, source.records
        wanted = max(MIN_SHARDS, -(-file_bytes // SHARD_BYTES))
        self.per = max(1, -(-self.records // wanted))
        self.count = -(-self.records // self.per) if self.records else 0
        self.windows = {}  # shard -> full windows in it, as they become known
        self._encoded = OrderedDict()
        self._lock = threading.Lock()

    @property
    def source(self):
        source = token_cache.settled(self.shared)
        if self._encoded and isinstance(source, token_cache.Cache):
            self._encoded.clear()  # the cache's memory-mapped stream from now on
        return source

    def span(self, k: int) -> tuple[int, int]:
        return k * self.per, min((k + 1) * self.per, self.records)

    def tokens(self, k: int) -> np.ndarray:
        """Shard ``k``'s token stream: a slice of the cache, or its records encoded now."""
        with self._lock:
            source = self.source
            a, b = self.span(k)
            if isinstance(source, token_cache.Cache):
                col = source.columns["x"]
                ids = col.ids[int(col.off[a]):int(col.off[b])]
            elif k in self._encoded:
                self._encoded.move_to_end(k)
                ids = self._encoded[k]
            else:
                rows = source.rows(range(a, b))["x"]
                ids = np.concatenate(rows) if rows else np.zeros(0, dtype=np.uint32)
                self._encoded[k] = ids
                while len(self._encoded) > KEEP:
                    self._encoded.popitem(last=False)
            self.windows[k] = len(ids) // self.msl
            return ids

    def n_windows(self, k: int) -> int:
        if k not in self.windows:
            source = self.source
            if isinstance(source, token_cache.Cache):
                a, b = self.span(k)
                off = source.columns["x"].off
                self.windows[k] = int(off[b] - off[a]) // self.msl
            else:
                self.tokens(k)
        return self.windows[k]

    def window(self, k: int, j: int) -> np.ndarray:
        return self.tokens(k)[j * self.msl:(j + 1) * self.msl]

    def estimate(self, shards, probe) -> int:
        """The full windows of ``shards``, estimated from the tokens per record of the shards ``probe``."""
        records = sum(self.span(k)[1] - self.span(k)[0] for k in probe)
        tokens = sum(len(self.tokens(int(k))) for k in probe)
        per_record = tokens / max(records, 1)
        est = sum(per_record * (self.span(k)[1] - self.span(k)[0]) / self.msl - 0.5 for k in shards)
        return max(int(round(est)), 1 if len(shards) else 0)


class ShardedRows:
    """A training view of packed windows over some of the shards (rows.Rows's interface, in the epoch order above:
    ``order`` draws an epoch and returns positions into it, ``batch`` reads them)."""

    mode = "packed"

    def __init__(self, shards: Shards, seed: int, members=None):
        self.shards, self.msl, self.seed = shards, shards.msl, seed
        self.members = np.arange(shards.count) if members is None else np.asarray(members, dtype=np.int64)
        self._n = None
        self._walk = None
        self._ahead = None

    def __len__(self):
        """The estimated windows of an epoch, from the shards of epoch 0's first group (encoded for its first step
        anyway, with or without a cache)."""
        if self._n is None:
            first = _Walk(self.shards, self.members, self.seed, 0).groups[:1]
            self._n = self.shards.estimate(self.members, first[0]) if first else 0
        return self._n

    def split(self, ratio: float, seed: int):
        """Hold out ``ratio`` of the shards (at least one; drawn with seed + 10000); the eval rows are their first
        windows, at most 1000, kept in memory."""
        from .rows import memory_rows

        if ratio <= 0 or len(self.members) < 2:
            return self, None
        drawn = np.random.default_rng([seed, 10_000]).permutation(self.members)
        held = drawn[:min(max(int(np.ceil(len(self.members) * ratio)), 1), len(self.members) - 1)]
        windows = []
        for k in held:
            windows += [self.shards.window(int(k), j) for j in range(self.shards.n_windows(int(k)))]
            if len(windows) >= 1000:
                break
        train = ShardedRows(self.shards, seed, np.setdiff1d(self.members, held))
        if not windows:
            return train, None
        return train, memory_rows(np.concatenate(windows[:1000]), "packed", self.msl)

    def lengths(self) -> torch.Tensor:
        return torch.full((len(self),), self.msl, dtype=torch.long)

    def order(self, global_bs: int, seed: int, epoch: int, lengths=None) -> torch.Tensor:
        """Start epoch ``epoch``; its rows are read in position order (every window has one length: no grouping)."""
        self._walk = _Walk(self.shards, self.members, seed, epoch)
        self.seed = seed
        return torch.arange(len(self))

    def batch(self, positions, multiple: int = 8) -> dict:
        if self._walk is None:  # read without an epoch (an eval_dataset): the order of epoch 0
            self.order(0, self.seed, 0)
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        picked = [self._walk.window(int(p)) for p in pos]
        x = torch.from_numpy(np.stack([self.shards.window(k, j) for k, j in picked]).astype(np.int64))
        self._prefetch(int(pos.max()) if len(pos) else 0)
        return {"x": x, "y": x.clone()}

    def _prefetch(self, position: int):
        """Encode the next group on a thread (the tokenizer releases the GIL) while this one trains."""
        if self._ahead is not None and self._ahead.is_alive():
            return
        if not isinstance(self.shards.source, token_cache.Cache):
            upcoming = self._walk.next_group(position)
            if upcoming:
                self._ahead = threading.Thread(target=lambda: [self.shards.tokens(k) for k in upcoming], daemon=True)
                self._ahead.start()

    def all(self, multiple: int = 8) -> dict:
        return self.batch(np.arange(len(self)), multiple)

    def state(self) -> dict:
        """What a resume needs to find its place without encoding every shard before it: the known window counts."""
        known = self.shards.windows.copy()  # one C call: the prefetch thread may be adding to it
        return {"windows": {str(k): v for k, v in known.items()}}

    def load_state(self, state) -> None:
        for k, v in ((state or {}).get("windows") or {}).items():
            self.shards.windows.setdefault(int(k), int(v))


class _Walk:
    """One epoch's order: groups of shuffled shards, each group's windows shuffled together; position -> window."""

    def __init__(self, shards: Shards, members, seed: int, epoch: int):
        self.shards, self.seed, self.epoch = shards, seed, epoch
        perm = np.asarray(members)[np.random.default_rng([seed, epoch]).permutation(len(members))]
        self.groups = [perm[i:i + GROUP] for i in range(0, len(perm), GROUP)]
        self.ends = []  # cumulative windows at the end of each group counted so far
        self._current = (None, None)

    def _count_to(self, position: int) -> bool:
        while (not self.ends or self.ends[-1] <= position) and len(self.ends) < len(self.groups):
            total = self.ends[-1] if self.ends else 0
            self.ends.append(total + sum(self.shards.n_windows(int(k)) for k in self.groups[len(self.ends)]))
        return bool(self.ends) and self.ends[-1] > position

    def window(self, position: int) -> tuple[int, int]:
        if not self._count_to(position):
            total = self.ends[-1] if self.ends else 0
            if not total:
                raise no_samples()
            position %= total  # the estimate was longer than the stream: wrap to the epoch's first windows
        g = int(np.searchsorted(self.ends, position, side="right"))
        if self._current[0] != g:
            pairs = [(int(k), j) for k in self.groups[g] for j in range(self.shards.n_windows(int(k)))]
            shuffle = np.random.default_rng([self.seed, self.epoch, g]).permutation(len(pairs))
            self._current = (g, [pairs[i] for i in shuffle])
        return self._current[1][position - (self.ends[g - 1] if g else 0)]

    def next_group(self, position: int) -> list[int]:
        g = int(np.searchsorted(self.ends, position, side="right")) + 1
        return [int(k) for k in self.groups[g]] if g < len(self.groups) else []
