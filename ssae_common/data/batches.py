"""Shuffled mini-batches streamed from one or several activation files, with bounded memory.

The files are cut into blocks (aligned with the HDF5 chunks, at most `MAX_BLOCK_ROWS` rows).  A seeded
set of blocks is held out for validation; the rest is the training set, which several files share as
one dataset.  Every epoch visits the training blocks in a seeded order, grouped into windows of about
`shuffle_rows` rows; each window is read, its rows shuffled (seeded by epoch and window), and the
windows laid end to end form the epoch's row stream.  Epochs follow each other without a gap.

Batch `s` is rows [s * B, (s + 1) * B) of that endless stream, a pure function of the seed and `s`:
a resumed run rebuilds exactly the batches it would have seen, from nothing but the step number.
Memory is one window plus the one read ahead in a background thread, whatever the files' size.
Under torchrun every rank reads the same global batch (so a bad row fails every rank at the same
step) and trains on its own slice of it (sae/distributed.py).  With `tokens=True` each batch also carries the
rows' token ids (/token_ids, shuffled with them), for the tilt over token types.
"""
from __future__ import annotations

import bisect
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .activations import ActivationStore
from ..core.errors import BadInput

MAX_BLOCK_ROWS = 2048
SPLIT, EPOCH, WINDOW = 1, 2, 3  # seed streams


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % (2**63), *keys])


@dataclass(frozen=True)
class Block:
    store: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def check_finite(path: str, start: int, rows: np.ndarray) -> None:
    """BadInput naming the file and rows when `rows` (read from row `start` of `path`) hold NaN or inf."""
    if not np.isfinite(rows).all():
        bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
        first, last = start + int(bad[0]), start + int(bad[-1])
        raise BadInput(f"{path}: NaN or inf in the activations, rows {first}-{last}")


def _check_finite(store: ActivationStore, block: Block, rows: np.ndarray) -> None:
    check_finite(store.path, block.start, rows)


class ActivationStream:
    def __init__(self, stores: list[ActivationStore], batch_size: int, seed: int, *, shuffle_rows: int = 32768,
                 val_rows: int = 8192, val_fraction_max: float = 0.1, tokens: bool = False):
        self.stores, self.batch_size, self.seed, self.tokens = stores, batch_size, seed, tokens
        self.d = stores[0].d_model
        blocks = []
        for si, store in enumerate(stores):
            step = max(1, min(store.chunk_rows, MAX_BLOCK_ROWS))
            blocks += [Block(si, s, min(s + step, store.n_tokens)) for s in range(0, store.n_tokens, step)]
        if not blocks:
            raise BadInput(f"{stores[0].path}: no activation rows")
        total = sum(b.rows for b in blocks)
        val_target = min(val_rows, int(total * val_fraction_max))
        order = _rng(seed, SPLIT).permutation(len(blocks))
        val, rest, taken = [], [], 0
        for i in order:  # the last held-out block is split so validation is exactly val_target rows
            if taken >= val_target or len(val) + 1 >= len(blocks):
                break
            b = blocks[i]
            need = val_target - taken
            if b.rows > need:
                val.append((int(i), Block(b.store, b.start, b.start + need)))
                rest.append((int(i), Block(b.store, b.start + need, b.stop)))
            else:
                val.append((int(i), b))
            taken += min(b.rows, need)
        held = {i for i, _ in val}
        self.val_blocks = [b for _, b in sorted(val)]
        self.val_size = taken
        self.train_blocks = sorted([b for i, b in enumerate(blocks) if i not in held] + [b for _, b in rest],
                                   key=lambda b: (b.store, b.start))
        self.n_train = sum(b.rows for b in self.train_blocks)
        self.shuffle_rows = max(shuffle_rows, batch_size)
        self._epochs: dict[int, tuple[list[list[int]], np.ndarray]] = {}
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssae-read")
        self._ahead: tuple[tuple[int, int], Future] | None = None

    # --- layout of one epoch -------------------------------------------------------------------
    def _epoch(self, epoch: int) -> tuple[list[list[int]], np.ndarray]:
        """The epoch's windows (lists of block indices) and their cumulative row offsets."""
        if epoch not in self._epochs:
            order = _rng(self.seed, EPOCH, epoch).permutation(len(self.train_blocks))
            windows, current, rows = [], [], 0
            for i in order:
                current.append(int(i))
                rows += self.train_blocks[i].rows
                if rows >= self.shuffle_rows:
                    windows.append(current)
                    current, rows = [], 0
            if current:
                windows.append(current)
            sizes = [sum(self.train_blocks[i].rows for i in w) for w in windows]
            self._epochs = {epoch: (windows, np.concatenate([[0], np.cumsum(sizes)]))}
        return self._epochs[epoch]

    def _read_window(self, epoch: int, w: int, block_ids: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        parts, ids = [], []
        for i in block_ids:
            b = self.train_blocks[i]
            rows = self.stores[b.store].rows(b.start, b.stop)
            _check_finite(self.stores[b.store], b, rows)
            parts.append(rows)
            if self.tokens:
                ids.append(self.stores[b.store].token_ids(b.start, b.stop))
        data = np.concatenate(parts) if len(parts) > 1 else parts[0]
        perm = _rng(self.seed, WINDOW, epoch, w).permutation(len(data))
        return data[perm], (np.concatenate(ids)[perm] if self.tokens else None)

    def _next_key(self, epoch: int, w: int) -> tuple[int, int]:
        windows, _ = self._epoch(epoch)
        return (epoch, w + 1) if w + 1 < len(windows) else (epoch + 1, 0)

    def _window(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray | None]:
        key = (epoch, w)
        if key not in self._cache:
            if self._ahead is not None and self._ahead[0] == key:
                data = self._ahead[1].result()
            else:
                if self._ahead is not None:
                    self._ahead[1].result()  # h5py is not re-entrant across threads
                data = self._read_window(epoch, w, self._epoch(epoch)[0][w])
            self._ahead = None
            self._cache = {key: data}  # the previous window is no longer needed
            nxt = self._next_key(epoch, w)
            if nxt[0] == epoch:  # read ahead within the epoch, overlapping I/O with training
                blocks = self._epoch(epoch)[0][nxt[1]]
                self._ahead = (nxt, self._pool.submit(self._read_window, *nxt, blocks))
        return self._cache[key]

    # --- batches -------------------------------------------------------------------------------
    def rows_at(self, offset: int, count: int) -> np.ndarray:
        """Rows [offset, offset + count) of the endless shuffled stream."""
        return self._take(offset, count)[0]

    def _take(self, offset: int, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows [offset, offset + count) of the stream and (with `tokens`) their token ids."""
        out = np.empty((count, self.d), dtype=np.float32)
        ids = np.empty(count, dtype=np.int64) if self.tokens else None
        filled = 0
        while filled < count:
            epoch, within = divmod(offset + filled, self.n_train)
            windows, starts = self._epoch(epoch)
            w = bisect.bisect_right(starts, within) - 1
            data, tok = self._window(epoch, w)
            a = within - int(starts[w])
            take = min(count - filled, len(data) - a)
            out[filled:filled + take] = data[a:a + take]
            if ids is not None:
                ids[filled:filled + take] = tok[a:a + take]
            filled += take
        return out, ids

    def batch(self, step: int) -> np.ndarray:
        return self.rows_at(step * self.batch_size, self.batch_size)

    def batch_with_tokens(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `step` and its rows' token ids (the stream must be made with tokens=True)."""
        if not self.tokens:
            raise ValueError("ActivationStream(tokens=True) is needed for token ids")
        return self._take(step * self.batch_size, self.batch_size)

    def sample(self, rows: int) -> np.ndarray:
        """A shuffled sample of training rows for statistics (the stream's start)."""
        return self.rows_at(0, min(rows, self.n_train))

    def validation(self) -> np.ndarray:
        parts = []
        for b in self.val_blocks:
            rows = self.stores[b.store].rows(b.start, b.stop)
            _check_finite(self.stores[b.store], b, rows)
            parts.append(rows)
        if not parts:
            return np.empty((0, self.d), dtype=np.float32)
        return np.concatenate(parts)

    def close(self) -> None:
        if self._ahead is not None:
            try:
                self._ahead[1].result()
            except BaseException:
                pass
            self._ahead = None
        self._pool.shutdown(wait=True)
        self._cache.clear()
