"""One directory per run: experiments/<name>/{config.json, history.jsonl, corpus.json, vocab.json,
run.lock, checkpoints/, tb/}, and for a sentencepiece tokenizer tokenizer.model and tokens/.

`eval_char.py` rebuilds everything from this directory alone, and `--restore-checkpoint` continues a
run from it alone: config.json holds the current settings, history.jsonl one record per start
(the first holds the settings the run began with, the last those it runs with now), corpus.json the
size and sha256 of the corpus. A training run holds an exclusive `flock` on run.lock for as long as it
lives, so a second run of the same experiment is refused, and the kernel releases the lock of a
process that dies. The checkpoints themselves are checkpoints.py's.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

import jax
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from mingpt_palm import checkpoints
from mingpt_palm import config as config_lib
from mingpt_palm.config import TrainConfig, UserError
from mingpt_palm.errors import fs_error, is_disk_full  # noqa: F401 (is_disk_full: callers import it from here)
from mingpt_palm.data import Vocab
from mingpt_palm.tokenizers import MODEL_FILE, SentencePieceVocab

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def warn(msg: str) -> None:
    if jax.process_index() == 0:  # every process would say the same
        print(f"warning: {msg}", file=sys.stderr, flush=True)


class _DropDiskFull(logging.Filter):
    """orbax logs a full disk from its writer threads, traceback and all; the run then reports it once,
    in one line that says which checkpoint is the last complete one."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else Exception(record.getMessage())
        return not is_disk_full(exc)


logging.getLogger("absl").addFilter(_DropDiskFull())


def _is_late_tensorstore_callback(unraisable) -> bool:
    """A save that fails (a full disk) ends orbax's event loop while tensorstore is still finishing the
    other writes of that checkpoint; each of them then reports into the closed loop from a C++ thread,
    and Python prints one "Event loop is closed" traceback per array. The save itself raised, and the
    run says so in one line; these are echoes of a checkpoint already abandoned."""
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
            and unraisable.object is None
            and any(f.name == "call_soon_threadsafe" and f.filename.endswith("base_events.py") for f in frames))


def _drop_late_tensorstore_callbacks(previous=sys.unraisablehook):
    def hook(unraisable):
        if not _is_late_tensorstore_callback(unraisable):
            previous(unraisable)
    return hook


sys.unraisablehook = _drop_late_tensorstore_callbacks()


def list_experiments(experiments_dir: str | Path) -> list[str]:
    root = Path(experiments_dir)
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def _read_json(path: Path, what: str, fix: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: it holds {what}; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); it holds {what}; {fix}") from None


class RunLock:
    """An exclusive `flock` on <experiment>/run.lock, held by a training run for as long as it lives.

    The file names the holder (pid, host, start time, command). The kernel releases the lock of a process
    that dies, however it dies, so a stale file never blocks. A run that is refused, or fails before its
    first step, puts the file back as it found it.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.path = directory / "run.lock"
        self._fd = None
        self._was = None  # (content or None, atime, mtime) as this run found it

    def acquire(self, command: str) -> None:
        try:
            if self.path.exists():
                st = self.path.stat()
                self._was = (self.path.read_bytes(), st.st_atime_ns, st.st_mtime_ns)
            else:  # an experiment from before locks: the directory's times change when run.lock comes and goes
                st = self.directory.stat()
                self._was = (None, st.st_atime_ns, st.st_mtime_ns)
        except OSError as e:
            raise fs_error(f"cannot read {self.path}", e) from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise fs_error(f"cannot open {self.path} to lock the experiment", e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"experiment {self.directory} is in use by another training run "
                            f"({self.holder() or 'unknown'}); wait for it to finish or stop it, or choose another "
                            "--experiment-name") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": f"{datetime.now():%Y-%m-%d %H:%M:%S}",
                  "command": command}
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(record) + "\n").encode())
        except OSError as e:
            self.release(started=False)
            raise fs_error(f"cannot write {self.path}", e) from None

    def release(self, started: bool = True) -> None:
        """started=False: the run was refused or failed before its first step, so the file is put back."""
        if self._fd is None:
            return
        content, atime, mtime = self._was
        if not started and content is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, content, 0)
            os.utime(self._fd, ns=(atime, mtime))
        os.close(self._fd)  # releases the flock; the file stays, naming the last holder
        self._fd = None
        if not started and content is None and self.directory.is_dir():
            self.path.unlink(missing_ok=True)
            os.utime(self.directory, ns=(atime, mtime))

    def holder(self) -> str | None:
        """Who holds the lock now ("pid 12 on host h, started ..."), or None when no live run does."""
        if self._fd is not None:
            return None  # this process holds it
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            try:
                r = json.loads(os.read(fd, 1 << 16))
                return f"pid {r['pid']} on host {r['host']}, started {r['started']}"
            except (ValueError, KeyError, TypeError):
                return "a process that has not yet written its name"
        finally:
            os.close(fd)


class Experiment:
    def __init__(self, experiments_dir: str | Path, name: str, unique: bool = False):
        if not _NAME.fullmatch(name) or name in (".", ".."):
            raise UserError(
                f"experiment name {name!r} must be a plain directory name inside {experiments_dir}/ "
                "(letters, digits, '.', '_', '-'; no '/', '..' or absolute paths)"
            )
        # Leave room for the suffix a colliding default name gets ("-2").
        if len(name.encode()) > 250:
            raise UserError(f"experiment name {name[:40]!r}... is {len(name.encode())} bytes long; file systems "
                            "allow 255 bytes per name: use at most 250")
        self.experiments_dir = Path(experiments_dir)
        self.unique = unique  # a default name: on a collision, `create` takes the next free suffix
        self.created = False  # this run made the directory (and removes it if it fails before step 1)
        self._set_name(name)

    def _set_name(self, name: str) -> None:
        self.name = name
        self.path = self.experiments_dir / name
        self.config_path = self.path / "config.json"
        self.history_path = self.path / "history.jsonl"
        self.corpus_path = self.path / "corpus.json"
        self.vocab_path = self.path / "vocab.json"
        self.tokenizer_path = self.path / MODEL_FILE
        self.tokens_dir = self.path / "tokens"
        self.lock = RunLock(self.path)
        self.checkpoint_dir = (self.path / "checkpoints").absolute()
        self.tb_dir = self.path / "tb"
        self.damaged_dir = self.path / "damaged_checkpoints"
        self.superseded_dir = self.path / "superseded_checkpoints"

    # --- lifecycle -----------------------------------------------------------------------------

    def _check_parent(self) -> None:
        parent = self.path.parent
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--experiments-dir {parent} is not a directory; pass a directory (it is created "
                            "if missing)")

    def check_new(self) -> None:
        self._check_parent()
        if self.path.is_dir():
            holder = self.lock.holder()
            running = f" and a training run is using it ({holder})" if holder else ""
            raise UserError(
                f"experiment directory {self.path} already exists{running}; pass --restore-checkpoint to continue "
                "it, or choose another --experiment-name (nothing was changed)"
            )
        if self.path.exists() or self.path.is_symlink():
            raise UserError(f"{self.path} exists and is not an experiment directory (it is a file); choose another "
                            "--experiment-name (nothing was changed)")

    def check_existing(self) -> None:
        self._check_parent()
        if not self.config_path.is_file():
            known = list_experiments(self.path.parent)
            listing = ", ".join(known) if known else "none"
            raise UserError(f"no experiment {self.name!r} in {self.path.parent}/ (existing experiments: {listing})")

    def create(self, command: str) -> None:
        """Claim a new experiment directory and lock it. mkdir is atomic: of two runs that pick the same
        name at once, exactly one gets the directory; the other is told who has it, or, for a default
        name, takes the next free suffix."""
        base = self.name
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise fs_error(f"cannot create --experiments-dir {self.path.parent}", e) from None
        for attempt in range(2, 1000):
            try:
                self.path.mkdir()
                break
            except FileExistsError:
                if not self.unique:
                    self.check_new()  # raises, naming the holder if there is one
                    raise
                self._set_name(f"{base}-{attempt}")
            except OSError as e:
                raise fs_error(f"cannot create the experiment directory {self.path}", e) from None
        else:
            raise UserError(f"{base} and 998 numbered variants of it exist in {self.path.parent}; pass "
                            "--experiment-name")
        self.created = True
        self.lock.acquire(command)

    def discard(self) -> None:
        """Remove a directory this run created, when the run failed before its first step: it holds
        nothing worth keeping, and left behind it would block the same command from running again."""
        self.lock.release(started=False)
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            self.created = False

    # --- records: config, history, corpus fingerprint, vocabulary -------------------------------

    def _write(self, path: Path, text: str | bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(text) if isinstance(text, bytes) else tmp.write_text(text)
            tmp.replace(path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise fs_error(f"cannot write {path}", e) from None

    def write_config(self, cfg: TrainConfig) -> None:
        self._write(self.config_path, json.dumps(config_lib.to_dict(cfg), indent=2) + "\n")

    def read_config(self, verify: bool = True) -> TrainConfig:
        """config.json, checked against the settings the run last started with (history.jsonl): a
        run-defining value edited by hand would silently change what a resume computes, or what eval
        rebuilds, so it is refused like the same change given as a flag."""
        fix = ("the first record of history.jsonl there holds the settings the run started with"
               if self.history_path.is_file() else "restore it from a backup")
        raw = _read_json(self.config_path, "the run's settings", fix)
        try:
            cfg = config_lib.from_dict(TrainConfig, raw, required=config_lib.is_run_defining)
        except ValueError as e:
            raise UserError(f"{self.config_path} is damaged ({e}); it holds the run's settings; {fix}") from None
        started = self.started_config() if verify else None
        # The corpus is checked by content (corpus.json): a path edited to a moved copy is the same corpus.
        by_content = self.corpus_path.exists()
        edited = [d for d in config_lib.differences(started, cfg, config_lib.is_run_defining)
                  if not (d[0] == "dataset_path" and by_content)] if started else []
        if edited:
            listing = "; ".join(f"{path}: {a!r} recorded, {b!r} in config.json" for path, a, b in edited[:6])
            raise UserError(f"{self.config_path} was changed after the run last started ({listing}); that would "
                            "silently change what the checkpoints mean: put the recorded values back (the last record "
                            f"of {self.history_path.name} holds them), or start a new experiment")
        return cfg

    def started_config(self) -> TrainConfig | None:
        """The settings of the run's last start as history.jsonl recorded them; None without a readable
        record (a line cut short by a kill is skipped for the one before it)."""
        try:
            lines = self.history_path.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return None
        for line in reversed(lines):
            try:
                return config_lib.from_dict(TrainConfig, json.loads(line)["config"])
            except (ValueError, KeyError, TypeError):  # json.JSONDecodeError is a ValueError
                continue
        return None

    def append_history(self, record: dict) -> None:
        try:
            with self.history_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise fs_error(f"cannot write {self.history_path}", e) from None

    def write_vocab(self, vocab: Vocab | SentencePieceVocab) -> None:
        if vocab.kind == "sentencepiece":  # first, so that vocab.json never names a model that is not there
            self._write(self.tokenizer_path, vocab.model)
        self._write(self.vocab_path, json.dumps(vocab.to_json()))

    def write_tokens(self, vocab: SentencePieceVocab, raw: np.ndarray, ids: np.ndarray) -> None:
        """Keep the token ids of a whole split in tokens/ (content-addressed, see SentencePieceVocab.cache_file),
        where later resumes and evaluations memory-map them instead of encoding the split again."""
        vocab.cache_dir = self.tokens_dir
        path = vocab.cache_file(raw)
        tmp = path.with_name(path.name + ".tmp")
        try:
            self.tokens_dir.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(ids, np.int32))
            tmp.replace(path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise fs_error(f"cannot write {path}", e) from None

    def report_dir(self) -> Path:
        """eval/, where reports go: made before a long scoring run, so that it cannot fail at the end."""
        path = self.path / "eval"
        try:
            path.mkdir(exist_ok=True)
        except OSError as e:
            raise fs_error(f"cannot create {path}", e) from None
        return path

    def write_report(self, filename: str, report: dict) -> Path:
        """An evaluation report in eval/, written whole or not at all."""
        path = self.report_dir() / filename
        self._write(path, json.dumps(report, indent=2) + "\n")
        return path

    def write_corpus(self, fingerprint: dict) -> None:
        self._write(self.corpus_path, json.dumps(fingerprint, indent=2) + "\n")

    def read_corpus(self) -> dict | None:
        """The corpus fingerprint, or None for an experiment from before fingerprints were recorded."""
        if not self.corpus_path.exists():
            return None
        d = _read_json(self.corpus_path, "the size and sha256 of the training corpus", "delete it to skip the check")
        if not (isinstance(d, dict) and isinstance(d.get("size"), int) and isinstance(d.get("sha256"), str)):
            raise UserError(f"{self.corpus_path} is damaged (no size and sha256); delete it to skip the check")
        return d

    def read_vocab(self, num_tokens: int) -> Vocab | SentencePieceVocab:
        d = _read_json(self.vocab_path, "the byte-to-token table of the model", "restore it from a backup")
        if isinstance(d, dict) and d.get("kind") == "sentencepiece":
            vocab = self._read_sentencepiece(d)
        else:
            vocab = self._read_byte_vocab(d)
        if vocab.size != num_tokens:
            raise UserError(f"{self.vocab_path} describes {vocab.size} tokens but the model in config.json has "
                            f"num_tokens {num_tokens}; the two files do not belong together")
        return vocab

    def _read_sentencepiece(self, d: dict) -> SentencePieceVocab:
        path, what = self.tokenizer_path, "the sentencepiece model that turns text into the model's tokens"
        try:
            model = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"{path} is missing: it holds {what}; restore it from a backup (vocab.json there "
                            "records its sha256)") from None
        except OSError as e:
            raise fs_error(f"cannot read {path}", e) from None
        try:
            vocab = SentencePieceVocab.from_json(d, model)
        except KeyError as e:
            raise UserError(f"{self.vocab_path} is damaged (lacks {e}); restore it from a backup") from None
        except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: sentencepiece cannot parse it
            reason = " ".join(str(e).split())[:200]
            raise UserError(f"{path} is damaged ({reason}); it holds {what}; restore it from a backup") from None
        vocab.cache_dir = self.tokens_dir
        return vocab

    def _read_byte_vocab(self, d) -> Vocab:
        try:
            if d["kind"] not in ("byte", "char") or not all(0 <= b < 256 for b in d["symbols"]):
                raise ValueError("kind must be byte, char or sentencepiece, symbols bytes 0-255")
            return Vocab.from_json(d)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UserError(f"{self.vocab_path} is damaged ({type(e).__name__}: {e}); restore it from a backup") from None

    # --- checkpoints (checkpoints.py reads and writes them) ----------------------------------------

    def checkpoint_steps(self) -> list[int]:
        return checkpoints.steps(self.checkpoint_dir)

    def set_aside(self, damaged: list[int], superseded: list[int]) -> dict:
        """Move checkpoints a continued run must not keep beside its own: damaged ones (unreadable) and, for
        --restore-step, the newer ones. Kept, never deleted; returns {what: [where]} for history.jsonl."""
        moved = {}
        for key, steps_, dest, what in (("damaged", damaged, self.damaged_dir, "the damaged checkpoint"),
                                        ("superseded", superseded, self.superseded_dir, "the newer checkpoint")):
            if steps_:
                moved[key] = checkpoints.set_aside(self.checkpoint_dir, steps_, dest, what, warn)
        return moved


class TensorBoardWriter:
    """Scalars and text written with the tensorboard package alone (no TensorFlow)."""

    def __init__(self, logdir: Path):
        logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(logdir))

    def scalars(self, step: int, values: dict) -> None:
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()]
        )
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def text(self, step: int, tag: str, text: str) -> None:
        summary = text_pb(tag, text)
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
