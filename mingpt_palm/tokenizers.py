"""SentencePiece sub-word tokens (BPE or unigram) learned from the training split, exact on any bytes.

The sibling of vocab.Vocab (byte and char ids) with the same methods: kind, size, encode(raw uint8) ->
int32 ids, decode(ids) -> bytes, byte_lengths, table, unknown_count, stream, describe, to_json.

Exactness: decode(encode(x)) == x byte for byte, for any x, so that bits per byte are the model's loss
over exactly the corpus's bytes. SentencePiece is trained with no normalization (identity), no dummy
prefix, no whitespace removal, and byte fallback (a character outside the pieces becomes its UTF-8
bytes, each a token: nothing is unknown). Three things it would still not give back are taken out of
its hands and written as byte pieces by us: a newline (SentencePiece reads lines as sentences, so no
piece ever spans one), U+2581 (its own marker for a space: a literal one would come back as a
space), and bytes that are not UTF-8 (it reads text; they reach us as surrogate escapes). Decoding
concatenates each id's bytes from a table, never SentencePiece's decoder, which would turn invalid
byte sequences into U+FFFD.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import re
import time
from pathlib import Path

import numpy as np

from mingpt_palm.config import DataConfig
from mingpt_palm.errors import UserError
from mingpt_palm.logs import is_main

MODEL_FILE = "tokenizer.model"  # in the experiment directory, beside vocab.json
_SPECIAL = "\n\u2581\udc80-\udcff"
# Plain runs are capped so that no single piece of text sent to SentencePiece is huge (a file without
# newlines); the cap is a constant, so the same bytes always give the same ids.
_MAX_RUN = 1 << 16
_SEGMENT = re.compile(f"[{_SPECIAL}]|[^{_SPECIAL}]{{1,{_MAX_RUN}}}")
_SPECIAL_SET = frozenset(["\n", "\u2581", *map(chr, range(0xDC80, 0xDD00))])
_CHUNK = 1 << 23  # bytes of text decoded and encoded at a time (memory stays bounded for enwik8's 90 MB)
# SentencePiece's training result depends on its thread count: a constant keeps the tokenizer a function
# of the data and the settings alone, the same on every machine and every process of a job.
_THREADS = 4


def _spm():
    import sentencepiece

    return sentencepiece


def _text(raw) -> str:
    return bytes(raw).decode("utf-8", errors="surrogateescape")


def _plain_runs(text: str) -> list[str]:
    return [s for s in _SEGMENT.findall(text) if s[0] not in _SPECIAL_SET]


def training_lines(train: np.ndarray, budget: int, seed: int) -> tuple[list[str], int]:
    """What the tokenizer learns from: whole lines of the training split drawn at random (by seed, in
    their order in the file) until `budget` bytes, all of it when it is smaller. Lines longer than 64
    KiB count as 64 KiB pieces. Returns (the plain runs of those lines, bytes drawn)."""
    n = len(train)
    bounds = np.concatenate([[0], np.flatnonzero(train == ord("\n")) + 1, [n]])
    long = np.flatnonzero(np.diff(bounds) > _MAX_RUN)
    bounds = np.unique(np.concatenate([bounds] + [np.arange(bounds[i] + _MAX_RUN, bounds[i + 1], _MAX_RUN)
                                                  for i in long]))
    starts, stops = bounds[:-1], bounds[1:]
    if n > budget:
        order = np.random.default_rng([seed, 3]).permutation(len(starts))
        taken = np.searchsorted(np.cumsum(stops[order] - starts[order]), budget) + 1
        keep = np.sort(order[:taken])
        starts, stops = starts[keep], stops[keep]
    runs = []
    for a in range(0, len(starts), 4096):  # a few thousand lines at a time: one bytes object each
        runs += _plain_runs(_text(b"".join(bytes(train[s:e]) for s, e in zip(starts[a:a + 4096], stops[a:a + 4096]))))
    return runs, int(np.sum(stops - starts))


class SentencePieceVocab:
    """Sub-word ids from a trained SentencePiece model (the bytes of tokenizer.model)."""

    kind = "sentencepiece"

    def __init__(self, model: bytes, info: dict, cache_dir: Path | None = None):
        self.model = model
        self.info = info  # how it was trained (type, vocab size, sample, seconds): vocab.json records it
        self.sha256 = hashlib.sha256(model).hexdigest()
        sp = self._sp = _spm().SentencePieceProcessor(model_proto=model)
        self.size = sp.get_piece_size()
        self._byte_ids = np.array([sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)], np.int32)
        if any(not sp.is_byte(int(i)) for i in self._byte_ids):
            raise ValueError("the model has no byte pieces (it was not trained with byte fallback)")
        self._pieces = [self._piece_bytes(i) for i in range(self.size)]
        self._lengths = np.array([len(p) for p in self._pieces], np.int32)
        self._special_ids = {c: self._byte_ids[list(c.encode("utf-8", "surrogateescape"))].tolist()
                             for c in _SPECIAL_SET}
        self.cache_dir = cache_dir  # <experiment>/tokens/: ids of whole splits, see `cache_file`

    def _piece_bytes(self, i: int) -> bytes:
        sp, piece = self._sp, self._sp.id_to_piece(i)
        if sp.is_byte(i):
            return bytes([int(piece[1:-1], 16)])
        if sp.is_unknown(i):
            return b"?"  # never produced by encode (byte fallback); a sampled one stays printable
        if sp.is_control(i):
            return b""
        return piece.replace("\u2581", " ").encode("utf-8")

    @classmethod
    def train(cls, train: np.ndarray, cfg: DataConfig, seed: int) -> "SentencePieceVocab":
        lines, drawn = training_lines(train, cfg.sp_train_bytes, seed)
        began, model = time.perf_counter(), io.BytesIO()
        try:
            _spm().SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=model, model_type=cfg.sp_model_type,
                vocab_size=cfg.vocab_size, normalization_rule_name="identity", add_dummy_prefix=False,
                remove_extra_whitespaces=False, byte_fallback=True, character_coverage=0.9995,
                allow_whitespace_only_pieces=True, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                max_sentence_length=_MAX_RUN, num_threads=_THREADS, minloglevel=2)  # no line is longer: none skipped
        except RuntimeError as e:
            raise UserError(_training_error(str(e), cfg.vocab_size, drawn)) from None
        info = {"model_type": cfg.sp_model_type, "vocab_size": cfg.vocab_size, "trained_on_bytes": drawn,
                "train_seconds": round(time.perf_counter() - began, 2)}
        return cls(model.getvalue(), info)

    @property
    def table(self) -> np.ndarray:
        """int32 [size], the identity: sentencepiece batches are cut from token ids already."""
        return np.arange(self.size, dtype=np.int32)

    @property
    def byte_lengths(self) -> np.ndarray:
        """int32 [size]: the bytes of text each id stands for (bits per byte divide by their sum)."""
        return self._lengths

    def encode(self, raw: np.ndarray) -> np.ndarray:
        """int32 ids of a 1-D stretch of bytes; a whole split the experiment has cached is read back
        from its .npy (memory-mapped) instead of being encoded again."""
        raw = np.asarray(raw, np.uint8)
        if raw.ndim != 1:
            raise ValueError(f"sentencepiece encodes one stretch of text (1-D bytes), not shape {raw.shape}")
        cached = self.cached(raw)
        if cached is not None:
            return cached
        parts = [self._encode_text(_text(raw[a:b])) for a, b in _chunks(raw)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def _encode_text(self, text: str) -> np.ndarray:
        segments = _SEGMENT.findall(text)
        plain = iter(self._sp.encode([s for s in segments if s[0] not in _SPECIAL_SET], out_type=int,
                                     num_threads=_THREADS))
        ids = (self._special_ids[s] if s[0] in _SPECIAL_SET else next(plain) for s in segments)
        return np.fromiter(itertools.chain.from_iterable(ids), np.int32)

    def decode(self, ids) -> bytes:
        return b"".join(self._pieces[i] for i in np.asarray(ids).reshape(-1).tolist())

    def unknown_count(self, raw: np.ndarray) -> int:
        return 0  # byte fallback: every byte has a piece

    # --- the cache of whole splits, content-addressed ---------------------------------------------

    def cache_file(self, raw: np.ndarray, directory: Path | None = None) -> Path | None:
        """Where the ids of exactly these bytes under exactly this model are kept, in `directory` (default
        the experiment's tokens/ this vocabulary was read from; None: no cache)."""
        directory = directory or self.cache_dir
        if directory is None:
            return None
        digest = hashlib.sha256(np.ascontiguousarray(raw)).hexdigest()
        return directory / f"{self.sha256[:16]}-{digest[:32]}.npy"

    def cached(self, raw: np.ndarray) -> np.ndarray | None:
        """The cached ids of `raw`, memory-mapped; None when there are none (or they are damaged: they
        are derived data, encoded again and rewritten by the next training run)."""
        path = self.cache_file(raw)
        if path is None or not path.is_file():
            return None
        try:
            ids = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if ids.ndim != 1 or ids.dtype != np.int32 or len(ids) > len(raw) or (len(ids) and (
                int(ids.min()) < 0 or int(ids.max()) >= self.size)):
            return None
        return ids

    # --- what the rest of the package asks of a vocabulary (vocab.Vocab has the same) -----------------

    def stream(self, raw: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
        """(the token ids batches of a split are cut from, whether they had to be encoded now): a whole split
        is encoded once per experiment and memory-mapped from its tokens/ after that."""
        ids = self.cached(raw)
        if ids is not None:
            return ids, False
        if is_main():
            print(f"tokenizer: encoding the {name} split ({len(raw):,} bytes) once; later runs read it from "
                  "tokens/ in the experiment", flush=True)
        return self.encode(raw), True

    def describe(self, train_tokens: int, train_bytes: int) -> str:
        learned = (f" (learned in {self.info['train_seconds']} s from {self.info['trained_on_bytes']:,} bytes of whole "
                   "lines)" if "train_seconds" in self.info else "")
        return (f"tokenizer: sentencepiece {self.info.get('model_type', '')}, {self.size:,} pieces{learned}; train "
                f"split {train_tokens:,} tokens, {train_bytes / max(train_tokens, 1):.3f} bytes/token")

    def amount(self, tokens: int, text: bytes) -> str:
        return f"{tokens} tokens, {len(text):,} bytes"

    def fingerprint(self) -> str:
        return self.sha256  # each process learns its own: the same bytes and settings give the same model

    def files(self) -> dict[str, bytes]:
        return {MODEL_FILE: self.model}

    def to_json(self) -> dict:
        return {"kind": self.kind, "model_file": MODEL_FILE, "sha256": self.sha256, "size": self.size, **self.info}

    @classmethod
    def from_json(cls, d: dict, model: bytes, cache_dir: Path | None = None) -> "SentencePieceVocab":
        """From vocab.json's record and the bytes of the model file it names (checked against it)."""
        if hashlib.sha256(model).hexdigest() != d["sha256"]:
            raise ValueError(f"its sha256 is not the {d['sha256'][:16]}... that vocab.json records")
        vocab = cls(model, {k: d[k] for k in ("model_type", "vocab_size", "trained_on_bytes", "train_seconds")
                            if k in d}, cache_dir)
        if vocab.size != d["size"]:
            raise ValueError(f"it holds {vocab.size} pieces, vocab.json says {d['size']}")
        return vocab


def _training_error(message: str, vocab_size: int, drawn: int) -> str:
    """sentencepiece's refusal in our words; its own text (less the source location) otherwise."""
    text = re.sub(r"^.*?\] ", "", " ".join(message.split()))
    if (small := re.search(r"smaller than required_chars\. \d+ vs (\d+)", text)):
        return (f"--data.vocab-size {vocab_size} is too small for this corpus: it needs at least {small[1]} "
                f"(256 byte pieces, the unknown id and {int(small[1]) - 257} characters that cover 99.95% of the "
                f"text); pass --data.vocab-size {small[1]} or more")
    if (high := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", text)):
        return (f"--data.vocab-size {vocab_size} is more pieces than {drawn:,} bytes of training lines hold: at most "
                f"{high[1]}; pass --data.vocab-size {high[1]} or less, or a larger --data.sp-train-bytes")
    return (f"sentencepiece cannot learn --data.vocab-size {vocab_size} pieces from {drawn:,} bytes of the training "
            f"split ({text[:300]}); choose another --data.vocab-size, a larger --data.sp-train-bytes or a bigger "
            "corpus")


def _chunks(raw: np.ndarray):
    """(start, stop) of pieces of about _CHUNK bytes, each cut just after a newline when there is one
    (a newline is always a token of its own, so the ids are those of the whole) or else at the start of
    a UTF-8 character."""
    start, n = 0, len(raw)
    while start < n:
        stop = min(start + _CHUNK, n)
        if stop < n:
            newlines = np.flatnonzero(raw[stop : stop + _CHUNK] == ord("\n"))
            if len(newlines):
                stop += int(newlines[0]) + 1
            else:
                while stop < n and 0x80 <= raw[stop] < 0xC0:  # a continuation byte: not a character start
                    stop += 1
        yield start, stop
        start = stop
