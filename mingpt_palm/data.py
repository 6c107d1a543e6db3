"""Corpus -> memory-mapped bytes -> train/val/test splits -> batches keyed by (seed, step).

The file is never read into Python objects: it is memory-mapped as uint8, splits are views, and a
batch is one vectorised gather of windows. The batch of step t is a pure function of
(seed, t, process index), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import threading
from pathlib import Path

import numpy as np

from mingpt_palm import download
from mingpt_palm.config import DataConfig
from mingpt_palm.errors import UserError

TRAIN_STREAM, EVAL_STREAM = 0, 1


@dataclasses.dataclass
class Corpus:
    path: Path
    registered: download.Source | None  # set when the corpus came by its registered name
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def split(self, name: str) -> np.ndarray:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def load_corpus(path_or_name: str, cfg: DataConfig, progress: bool = True, expect: dict | None = None,
                owner: str = "") -> Corpus:
    """Resolve a path or registered name, memory-map it and split it (standard split if known).

    `expect`: the fingerprint the file must have (an experiment's corpus.json; `owner` names the
    experiment in the error), so that nothing is resumed or scored on different data.
    """
    if expect is not None and path_or_name not in download.CORPORA and not Path(path_or_name).is_file():
        check_fingerprint(expect, Path(path_or_name), owner)  # says the file is gone
    path, known = download.resolve_corpus(path_or_name, cfg.datasets_dir, progress=progress)
    if expect is not None:
        check_fingerprint(expect, path, owner)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    n = len(data)
    if known is not None and known.split_bytes is not None and sum(known.split_bytes) == n:
        n_train, n_val, _ = known.split_bytes
    else:  # fractions that add up to less than 1 (settings.validate_train) leave n_train > 0
        n_val, n_test = int(n * cfg.val_fraction), int(n * cfg.test_fraction)
        n_train = n - n_val - n_test
    return Corpus(path, known, data[:n_train], data[n_train : n_train + n_val], data[n_train + n_val :])


def require_windows(split: np.ndarray, name: str, length: int, source, hint: str = "use a smaller --block-size or "
                    "a bigger corpus", unit: str = "bytes", window: str = "block size") -> None:
    """A split must hold at least one window of `length` + 1 tokens (inputs plus shifted targets), where
    `window` names the setting `length` comes from; `hint` says what the caller's user can change."""
    if len(split) < length + 1:
        raise UserError(f"the {name} split of {source} has {len(split):,} {unit}, fewer than one window of "
                        f"{window} + 1 = {length + 1}; {hint}")


def fingerprint(path: Path) -> dict:
    """Size and sha256 of a corpus file (about 0.1 s for enwik8's 100 MB): recorded when a run starts,
    checked by every resume and evaluation so that nothing is trained or scored on other data."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            size += len(chunk)
    return {"path": str(Path(path).resolve()), "size": size, "sha256": digest.hexdigest()}


def check_fingerprint(recorded: dict, path: Path, owner: str) -> None:
    """UserError unless the file at `path` is the corpus `recorded` describes."""
    original = Path(recorded.get("path", path))
    if not Path(path).is_file():
        raise UserError(f"the corpus {owner} was trained on is gone: {path} is not a file any more; put it back "
                        "(its size and sha256 are in corpus.json there)")
    now = fingerprint(path)
    if (now["size"], now["sha256"]) == (recorded["size"], recorded["sha256"]):
        return
    was = f"{recorded['size']:,} bytes with sha256 {recorded['sha256'][:16]}..."
    found = f"{now['size']:,} bytes with sha256 {now['sha256'][:16]}..."
    if Path(path).resolve() != original:
        raise UserError(f"{path} is not the corpus {owner} was trained on ({found}; it was trained on {original}, "
                        f"{was}); leave out --dataset-path to use that one, or start a new experiment")
    raise UserError(f"the corpus {owner} was trained on has changed: {path} is now {found}, it was {was}; put the "
                    "original back (training or scoring on other data would silently mean something else)")


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


def window_spans(n: int, seq_len: int, stride: int | None = None):
    """Where scoring windows over n ids start, and which of their target positions each scores.

    Window w holds inputs ids[w*S : w*S+L] and, one id later, the targets of ids w*S+1 .. w*S+L.
    The first window scores all L targets; every later one only its last S, whose L - S earlier
    targets were scored before and serve as context. So every target id 1..n-1 is scored exactly
    once, each after the first L with at least L - S ids of context; S = L gives non-overlapping
    windows, each starting without context. The last window may reach past the end (padding).
    Returns (starts, first, stop), int64 [W]: window w scores positions first[w] <= j < stop[w].
    """
    stride = seq_len if stride is None else stride
    targets = n - 1
    if targets < 1:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    windows = 1 + max(0, -(-(targets - seq_len) // stride))
    starts = np.arange(windows, dtype=np.int64) * stride
    first = np.where(starts == 0, 0, seq_len - stride)
    stop = np.minimum(seq_len, targets - starts)
    return starts, first, stop


class SpanWeights:
    """The 0/1 weights [W, L] of scoring windows, made a slice of rows at a time (row w is 1 on
    positions first[w] <= j < stop[w]): dense float32 weights would cost as much as copying every
    window, 5 GB for enwik8's test split at L = 1024, S = 1."""

    def __init__(self, first: np.ndarray, stop: np.ndarray, seq_len: int):
        self.first, self.stop, self.shape = first, stop, (len(first), seq_len)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        j = np.arange(self.shape[1])
        return ((j >= self.first[rows, None]) & (j < self.stop[rows, None])).astype(np.float32)


def scoring_windows(ids: np.ndarray, seq_len: int, stride: int | None = None):
    """(tokens [W, L+1], SpanWeights [W, L]) over a whole split of token ids, laid out by `window_spans`.

    tokens is a strided view of one zero-padded copy of ids, not W copied windows; the padding is
    never scored, and being later than every scored target it cannot change their (causal) losses.
    """
    stride = seq_len if stride is None else stride
    starts, first, stop = window_spans(len(ids), seq_len, stride)
    # The last window ends at or past the last id, so the padded copy holds all of them.
    padded = np.zeros((starts[-1] if len(starts) else 0) + seq_len + 1, np.asarray(ids).dtype)
    padded[: len(ids)] = ids
    tokens = np.lib.stride_tricks.sliding_window_view(padded, seq_len + 1)[::stride]
    return tokens[: len(starts)], SpanWeights(first, stop, seq_len)


def split_windows(split: np.ndarray, seq_len: int, stride: int | None = None):
    """`scoring_windows` with dense weights, for small splits: (tokens [W, L+1], weights float32 [W, L]).

    With stride None (= seq_len) these are the non-overlapping windows: window w has inputs
    split[w*L : w*L+L] and targets one later, every id but the first predicted exactly once.
    """
    tokens, weights = scoring_windows(split, seq_len, stride)
    return tokens, weights[:]


def default_prompt(val: np.ndarray, seed: int, max_len: int = 200) -> bytes:
    """A whole line from the validation split, chosen by seed (the first line start after a random offset)."""
    rng = np.random.default_rng([seed, 2])
    start = int(rng.integers(0, max(1, len(val) - max_len)))
    chunk = bytes(val[start : start + 4 * max_len])
    lines = [line for line in chunk.split(b"\n")[1:-1] if line.strip()]
    return (lines[0] if lines else chunk[:max_len])[:max_len] + b"\n"


def batch(split: np.ndarray, seed: int, step: int, global_batch: int, seq_len: int,
          stream: int = TRAIN_STREAM) -> np.ndarray:
    """This process's share of `get_batch`: what the loop and the evaluation windows cut."""
    import jax

    return get_batch(split, seed, step, global_batch, seq_len, jax.process_index(), jax.process_count(), stream)


class Prefetcher:
    """Cuts the batches of the coming steps on a background thread, `ahead` of the loop."""

    def __init__(self, make_batch, start: int, stop: int, ahead: int = 2):
        self._make, self._steps = make_batch, iter(range(start, stop))
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True, name="batches")

    def _fill(self) -> None:
        for step in self._steps:
            try:
                item = (step, self._make(step), None)
            except BaseException as e:  # handed to the loop, which raises it where it would have happened
                item = (step, None, e)
            while not self._done.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._done.is_set() or item[2] is not None:
                return

    def __enter__(self) -> "Prefetcher":
        self._thread.start()
        return self

    def get(self, step: int):
        got, batch_, error = self._queue.get()
        if error is not None:
            raise error
        assert got == step, (got, step)
        return batch_

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
