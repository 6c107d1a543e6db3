"""The vocabularies: the 256 bytes, the distinct characters of a corpus, or sentencepiece pieces.

Each is one object with the same methods (table and byte_lengths for the train step, encode/decode,
stream for what batches are cut from, describe and amount for what the user reads, to_json and files for
the experiment): the rest of the package asks these, never which kind it holds. `build` makes a new
run's; `load` reads an experiment's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mingpt_palm.config import DataConfig
from mingpt_palm.errors import UserError, fs_error, write_atomically
from mingpt_palm.tokenizers import MODEL_FILE, SentencePieceVocab


class Vocab:
    """Maps raw bytes to token ids and back with lookup tables (vectorised, no Python loops).

    byte: the identity on 256 values. char: the distinct bytes of the training split get ids
    0..n-1 in byte order; any other byte (seen only in val/test) maps to the unknown id n.
    tokenizers.SentencePieceVocab has the same methods: the rest of the package asks them, never the kind.
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

    @property
    def table(self) -> np.ndarray:
        """int32 [256]: the token id of every byte value (training encodes on the device with it)."""
        return self._encode

    @property
    def byte_lengths(self) -> np.ndarray:
        """int32 [size]: how many corpus bytes each token id stands for; bits per byte divide the summed
        token losses by the bytes their targets cover (one each for byte and char ids)."""
        return np.ones(self.size, np.int32)

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

    def files(self) -> dict[str, bytes]:
        """Files the vocabulary needs beside vocab.json: none, its table is all there is."""
        return {}

    def fingerprint(self) -> str:
        """What the processes of a job compare: each builds its own vocabulary from the same corpus."""
        return json.dumps(self.to_json())

    def stream(self, raw: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
        """(what batches of a split are cut from, whether it had to be encoded now): the bytes themselves,
        turned into ids on the device through `table`."""
        return raw, False

    def describe(self, train_tokens: int, train_bytes: int) -> str | None:
        """A start-up line of its own, for a vocabulary that has more to say than its kind and size."""
        return None

    def amount(self, tokens: int, text: bytes) -> str:
        """How much text `tokens` ids decoded to `text` are, in the words a user reads them in."""
        return f"{tokens} characters"

    @classmethod
    def from_json(cls, d: dict) -> "Vocab":
        return cls(d["kind"], np.asarray(d["symbols"]))


def build(cfg: DataConfig, train: np.ndarray, seed: int) -> "Vocab | SentencePieceVocab":
    """A new run's vocabulary, from its training split alone."""
    if cfg.tokenizer == "sentencepiece":
        return SentencePieceVocab.train(train, cfg, seed)
    return Vocab.build(cfg.tokenizer, train)


def load(d: dict, read_file, cache_dir: Path | None = None) -> "Vocab | SentencePieceVocab":
    """An experiment's vocabulary from vocab.json's record `d`; `read_file(name)` gives the bytes of a file
    it names. KeyError, TypeError or ValueError for a record that does not describe one."""
    if isinstance(d, dict) and d.get("kind") == "sentencepiece":
        return SentencePieceVocab.from_json(d, read_file(MODEL_FILE), cache_dir)
    if d["kind"] not in ("byte", "char") or not all(0 <= b < 256 for b in d["symbols"]):
        raise ValueError("kind must be byte, char or sentencepiece, symbols bytes 0-255")
    return Vocab.from_json(d)


def write(directory: Path, vocab) -> None:
    """vocab.json, and the files it names (first, so that vocab.json never names a file that is not there)."""
    for name, data in vocab.files().items():
        write_atomically(directory / name, data)
    write_atomically(directory / "vocab.json", json.dumps(vocab.to_json()))


def read(directory: Path, num_tokens: int, cache_dir: Path | None = None):
    """An experiment's vocabulary, each way it can be missing or damaged said in one line."""
    path, model = directory / "vocab.json", directory / MODEL_FILE
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: it holds the byte-to-token table of the model; restore it from a "
                        "backup") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); it holds the byte-to-token table of the "
                        "model; restore it from a backup") from None
    try:
        vocab = load(d, lambda name: (directory / name).read_bytes(), cache_dir)
    except FileNotFoundError:
        raise UserError(f"{model} is missing: it holds the sentencepiece model that turns text into the model's "
                        "tokens; restore it from a backup (vocab.json there records its sha256)") from None
    except OSError as e:
        raise fs_error(f"cannot read {model}", e) from None
    except (KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); restore it from a backup") from None
    except (ValueError, RuntimeError) as e:  # RuntimeError: sentencepiece cannot parse the model
        damaged = model if d.get("kind") == "sentencepiece" else path
        raise UserError(f"{damaged} is damaged ({' '.join(str(e).split())[:200]}); restore it from a backup") from None
    if vocab.size != num_tokens:
        raise UserError(f"{path} describes {vocab.size} tokens but the model in config.json has num_tokens "
                        f"{num_tokens}; the two files do not belong together")
    return vocab
