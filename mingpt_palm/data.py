"""Corpus -> memory-mapped bytes -> train/val/test splits -> batches keyed by (seed, step).

The file is never read into Python objects: it is memory-mapped as uint8, splits are views, and a
batch is one vectorised gather of windows. The batch of step t is a pure function of
(seed, t, process index), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from mingpt_palm import download
from mingpt_palm.config import DataConfig, UserError

TRAIN_STREAM, EVAL_STREAM = 0, 1


class Vocab:
    """Maps raw bytes to token ids and back with lookup tables (vectorised, no Python loops).

    byte: the identity on 256 values. char: the distinct bytes of the training split get ids
    0..n-1 in byte order; any other byte (seen only in val/test) maps to the unknown id n.
    """

    def __init__(self, kind: str, symbols: np.ndarray):
        self.kind = kind
        self.symbols = np.asarray(symbols, dtype=np.uint8)
        self.unk_id = len(self.symbols) if kind == "char" else None
        self.size = 256 if kind == "byte" else len(self.symbols) + 1
        self._encode = np.full(256, self.unk_id or 0, dtype=np.int32)
        self._encode[self.symbols] = np.arange(len(self.symbols), dtype=np.int32)
        # The unknown id decodes to '?' so that generated text stays printable.
        self._decode = np.concatenate([self.symbols, np.frombuffer(b"?", np.uint8)])

    @classmethod
    def build(cls, kind: str, train: np.ndarray) -> "Vocab":
        if kind == "byte":
            return cls("byte", np.arange(256))
        # In chunks: bincount of the whole memmap would first copy it as int64 (8x its size).
        counts = np.zeros(256, np.int64)
        for start in range(0, len(train), 1 << 24):
            counts += np.bincount(train[start : start + (1 << 24)], minlength=256)
        return cls("char", np.flatnonzero(counts))

    def encode(self, raw: np.ndarray) -> np.ndarray:
        return self._encode[raw]

    def decode(self, ids) -> bytes:
        return self._decode[np.asarray(ids)].tobytes()

    def unknown_count(self, raw: np.ndarray) -> int:
        if self.unk_id is None:
            return 0
        return int(np.sum(self.encode(raw) == self.unk_id))

    def to_json(self) -> dict:
        return {"kind": self.kind, "symbols": self.symbols.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "Vocab":
        return cls(d["kind"], np.asarray(d["symbols"]))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> "Vocab":
        return cls.from_json(json.loads(path.read_text()))


@dataclasses.dataclass
class Corpus:
    path: Path
    registered: download.Corpus | None  # set when the corpus came by its registered name
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def split(self, name: str) -> np.ndarray:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def load_corpus(path_or_name: str, cfg: DataConfig, progress: bool = True) -> Corpus:
    """Resolve a path or registered name, memory-map it and split it (standard split if known)."""
    path, known = download.resolve_corpus(path_or_name, cfg.datasets_dir, progress=progress)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    n = len(data)
    if known is not None and known.split_bytes is not None and sum(known.split_bytes) == n:
        n_train, n_val, _ = known.split_bytes
    else:
        for name, frac in (("val", cfg.val_fraction), ("test", cfg.test_fraction)):
            if not 0 <= frac < 1:
                raise UserError(f"--data.{name}-fraction {frac} must be in [0, 1)")
        n_val, n_test = int(n * cfg.val_fraction), int(n * cfg.test_fraction)
        n_train = n - n_val - n_test
        if n_train <= 0:
            raise UserError(f"--data.val-fraction + --data.test-fraction leave no training data in {path}")
    return Corpus(path, known, data[:n_train], data[n_train : n_train + n_val], data[n_train + n_val :])


def require_windows(split: np.ndarray, name: str, seq_len: int, source) -> None:
    """A split must hold at least one window of seq_len + 1 bytes (inputs plus shifted targets)."""
    if len(split) < seq_len + 1:
        hint = "a smaller --block-size" + (", or a larger --data.val-fraction" if name == "val" else "")
        if name == "test":
            hint += ", or a larger --data.test-fraction"
        raise UserError(
            f"the {name} split of {source} has {len(split)} bytes, fewer than one window of "
            f"block size + 1 = {seq_len + 1}; use {hint} or a bigger corpus"
        )


def get_batch(
    split: np.ndarray,
    seed: int,
    step: int,
    global_batch: int,
    seq_len: int,
    process_index: int = 0,
    process_count: int = 1,
    stream: int = TRAIN_STREAM,
) -> np.ndarray:
    """This process's share of the global batch of step `step`: uint8 [global_batch / P, seq_len + 1].

    All processes draw the same global offsets from (seed, step, stream) and keep their own
    contiguous slice, so the slices are disjoint and together form the global batch.
    """
    rng = np.random.default_rng([seed, step, stream])
    offsets = rng.integers(0, len(split) - seq_len, size=global_batch)
    per = global_batch // process_count
    mine = offsets[process_index * per : (process_index + 1) * per]
    return split[mine[:, None] + np.arange(seq_len + 1)]


def split_windows(split: np.ndarray, seq_len: int):
    """Non-overlapping windows covering a whole split, for exact scoring.

    Window w has inputs split[w*L : w*L+L] and targets one byte later, so every byte except the
    first is predicted exactly once; each window starts without context from the previous one.
    The last window is padded; `weights` is 0 on padding. Returns (tokens [W, L+1], weights [W, L]).
    """
    n_targets = len(split) - 1
    windows = -(-n_targets // seq_len)
    padded = np.zeros(windows * seq_len + 1, dtype=np.uint8)
    padded[: len(split)] = split
    tokens = np.lib.stride_tricks.sliding_window_view(padded, seq_len + 1)[::seq_len]
    weights = (np.arange(windows * seq_len) < n_targets).reshape(windows, seq_len).astype(np.float32)
    return tokens, weights


def default_prompt(val: np.ndarray, seed: int, max_len: int = 200) -> bytes:
    """A whole line from the validation split, chosen by seed (the first line start after a random offset)."""
    rng = np.random.default_rng([seed, 2])
    start = int(rng.integers(0, max(1, len(val) - max_len)))
    chunk = bytes(val[start : start + 4 * max_len])
    lines = [line for line in chunk.split(b"\n")[1:-1] if line.strip()]
    return (lines[0] if lines else chunk[:max_len])[:max_len] + b"\n"
