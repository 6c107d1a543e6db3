"""One directory per run: experiments/<name>/{config.json, history.jsonl, corpus.json, vocab.json,
run.lock, checkpoints/, tb/}, and for a sentencepiece tokenizer tokenizer.model and tokens/.

`eval_char.py` rebuilds everything from this directory alone, and `--restore-checkpoint` continues a
run from it alone: config.json holds the current settings, history.jsonl one record per start or
resume (the first holds the settings the run began with), corpus.json the size and sha256 of the
corpus. A training run holds an exclusive `flock` on run.lock for as long as it lives, so a second
run of the same experiment is refused, and the kernel releases the lock of a process that dies.

Checkpoints are orbax CheckpointManager steps holding the (unreplicated) train state plus a JSON
record; orbax writes each step into a temporary directory and renames it when complete, so a save
that is killed midway leaves a `*.orbax-checkpoint-tmp*` directory that is never restored. Old steps
leave the same way, renamed into checkpoints/deleted/ before they are removed, so every numbered
directory is a whole checkpoint. One that fails to load all the same is skipped for the one before
it, and training moves it to damaged_checkpoints/.
"""

from __future__ import annotations

import contextlib
import errno
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
import orbax.checkpoint as ocp
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from mingpt_palm import config as config_lib
from mingpt_palm.config import TrainConfig, TrainingStopped, UserError
from mingpt_palm.data import Vocab
from mingpt_palm.tokenizers import MODEL_FILE, SentencePieceVocab

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_TMP_GLOB = "*.orbax-checkpoint-tmp*"
_TRASH = "deleted"  # checkpoints/deleted/: old steps renamed here by orbax, then removed by us
_FS_REASONS = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "a file grew past the file-size limit",
    errno.ENAMETOOLONG: "a name is too long for the file system",
    errno.ENOTDIR: "a part of the path is not a directory",
}
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def warn(msg: str) -> None:
    if jax.process_index() == 0:  # every process would say the same
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def fs_error(doing: str, e: OSError) -> UserError:
    """One line for a file-system failure: what we were doing, why it failed, on which path."""
    reason = _FS_REASONS.get(e.errno, e.strerror or type(e).__name__)
    where = f" ({e.filename})" if e.filename and str(e.filename) not in doing else ""
    return UserError(f"{doing}: {reason}{where}")


def is_disk_full(e: BaseException) -> bool:
    """True if e, or anything it was raised from, says the disk is full (orbax wraps OSError in its own
    errors, and tensorstore reports it only in its message)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        if any(s in str(e) for s in ("No space left on device", "Disk quota exceeded", "File too large")):
            return True
        e = e.__cause__ or e.__context__
    return False


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


@contextlib.contextmanager
def _quiet_orbax():
    """Silence orbax's own error logs while trying a checkpoint: a failure is reported once, by us."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_json(path: Path, what: str, fix: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: it holds {what}; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); it holds {what}; {fix}") from None


class _Vanished(Exception):
    """A checkpoint step that a live training run removed (rotation) while it was being read."""


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
    def __init__(self, experiments_dir: str | Path, name: str, keep: int | None = None, unique: bool = False):
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
        self.keep = keep  # newest checkpoints kept on disk; None keeps all
        self.unique = unique  # a default name: on a collision, `create` takes the next free suffix
        self.created = False  # this run made the directory (and removes it if it fails before step 1)
        self._manager = None
        self._read_only = True
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
        self.close()
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

    def read_config(self) -> TrainConfig:
        fix = ("the first record of history.jsonl there holds the settings the run started with"
               if self.history_path.is_file() else "restore it from a backup")
        raw = _read_json(self.config_path, "the run's settings", fix)
        try:
            return config_lib.from_dict(TrainConfig, raw, required=config_lib.is_run_defining)
        except ValueError as e:
            raise UserError(f"{self.config_path} is damaged ({e}); it holds the run's settings; {fix}") from None

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

    # --- checkpoints ---------------------------------------------------------------------------

    def manager(self, read_only: bool = False) -> ocp.CheckpointManager:
        if self._manager is None:
            self._read_only = read_only
            # read_only mode only adds warnings; a reader simply never saves, creates or cleans up.
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep,
                create=not read_only,
                cleanup_tmp_directories=not read_only,
                enable_async_checkpointing=True,
                # orbax removes an old step file by file, so a kill midway would leave a numbered,
                # half-deleted checkpoint; a rename out of the way first is atomic.
                todelete_subdir=_TRASH,
            )
            self._manager = ocp.CheckpointManager(self.checkpoint_dir, options=options, item_names=("state", "meta"))
        return self._manager

    def incomplete_checkpoints(self) -> list[str]:
        return sorted(p.name for p in self.checkpoint_dir.glob(_TMP_GLOB)) if self.checkpoint_dir.is_dir() else []

    def checkpoint_steps(self) -> list[int]:
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.checkpoint_dir.iterdir() if p.name.isdigit() and p.is_dir())

    def save(self, step: int, state, meta: dict) -> None:
        """Start an asynchronous save; the next save (or `wait`) waits for this one to finish.

        A state with a non-finite number is never written: the newest checkpoint must always be one
        a run can continue from, and rotation would otherwise push the good ones out.
        """
        self._empty_trash()
        # Host copies: a process can only write arrays it owns, and pmap's per-device arrays are
        # not global arrays that orbax could split among processes.
        state = jax.device_get(state)
        bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(state)
               if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.isfinite(x).all()]
        if bad:
            raise TrainingStopped(f"step {step}: the train state holds non-finite numbers ({', '.join(bad[:3])}"
                                  f"{', ...' if len(bad) > 3 else ''}); no checkpoint was written, the newest in "
                                  f"{self.checkpoint_dir} is step {max(self.checkpoint_steps(), default='none')}")
        saved = self.manager().save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                  meta=ocp.args.JsonSave(meta)))
        # orbax silently skips a step that is not newer than the newest one it knows of; a run that
        # reports "checkpoint saved" must never have skipped it.
        if not saved:
            raise RuntimeError(f"orbax refused to save step {step} in {self.checkpoint_dir} "
                               f"(existing steps: {self.checkpoint_steps()})")

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()  # waits for the last save, and for old steps to be renamed away
            self._manager = None
            if not self._read_only:  # nothing runs any more: the whole trash can go
                shutil.rmtree(self.checkpoint_dir / _TRASH, ignore_errors=True)

    def _empty_trash(self) -> None:
        trash = self.checkpoint_dir / _TRASH
        if trash.is_dir():
            for old in trash.iterdir():  # entries only: orbax may be renaming a new one in right now
                shutil.rmtree(old, ignore_errors=True)

    def restore(self, abstract_state, step: int | None = None, read_only: bool = False):
        """Restore `step` (default: the newest that loads), falling back past corrupt ones.

        Returns (state, meta, step). Incomplete saves are never candidates; a reader (eval) while a
        training run holds the lock knows they are saves in progress, not interrupted ones, and that the
        run may rotate the step it is reading away: then it reads the directory again and takes the
        newest one there now.
        """
        live = read_only and self.lock.holder()
        for _ in range(10 if live else 1):
            try:
                return self._restore(abstract_state, step, read_only, bool(live))
            except (_Vanished, FileNotFoundError):
                if not live:
                    raise
                self._manager = None  # its list of steps is out of date
        raise UserError(f"the training run using {self.path} ({live}) removed each checkpoint before it could be "
                        "read, 10 times; pass --checkpoint-step of a step it keeps, or raise --keep-checkpoints")

    def _restore(self, abstract_state, step, read_only: bool, in_progress: bool):
        for tmp in self.incomplete_checkpoints():
            if not in_progress:
                warn(f"ignoring incomplete checkpoint {self.checkpoint_dir / tmp} (its save was interrupted)")
        steps = self.checkpoint_steps()
        if step is not None:
            if step not in steps:
                raise UserError(
                    f"no checkpoint for step {step} in {self.checkpoint_dir} (available: {steps or 'none'})"
                )
            candidates = [step]
        else:
            candidates = steps[::-1]
        if not candidates:
            raise UserError(f"no checkpoint in {self.checkpoint_dir}; train first, or start a new experiment")
        with _quiet_orbax():  # it reads every step's metadata when it starts
            mgr = self.manager(read_only=read_only)
        errors, damaged = [], []
        for s in candidates:
            try:
                with _quiet_orbax():
                    restored = mgr.restore(
                        s,
                        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                meta=ocp.args.JsonRestore()),
                    )
            except Exception as e:  # a damaged checkpoint can fail in many layers (json, tensorstore, zarr)
                if in_progress and not (self.checkpoint_dir / str(s)).is_dir():
                    raise _Vanished(s) from e  # rotated away by the live run while we read it: not damaged
                reason = type(e).__name__ + (f": {str(e).strip().splitlines()[0][:200]}" if str(e).strip() else "")
                errors.append(f"step {s}: {reason}")
                damaged.append(s)
                warn(f"checkpoint step {s} is unreadable ({reason}); trying an older one")
                continue
            if errors:
                warn(f"restored step {s} instead of the newer, damaged checkpoint(s)")
                if not read_only:
                    self._move_steps(damaged, self.damaged_dir, "the damaged checkpoint")
            return restored["state"], restored["meta"], s
        raise UserError(f"no readable checkpoint in {self.checkpoint_dir} ({'; '.join(errors)})")

    def supersede_newer(self, step: int) -> None:
        """Continuing from an older step: the newer checkpoints move to superseded_checkpoints/ (kept,
        never deleted). Left in place they would make orbax skip every save up to them."""
        self._move_steps([s for s in self.checkpoint_steps() if s > step], self.superseded_dir,
                         "the newer checkpoint")

    def _move_steps(self, steps: list[int], dest_dir: Path, what: str) -> None:
        """Move whole checkpoints out of checkpoints/ (kept for inspection, never deleted).

        Left in place, a step newer than the restored one would make orbax skip every save up to
        it, and a later restart would stumble over it again.
        """
        if not steps:
            return
        stamp = f"{datetime.now():%Y-%m-%d-%H%M%S}"
        try:
            dest_dir.mkdir(exist_ok=True)
            for s in steps:
                dest = dest_dir / f"{s}_{stamp}"
                (self.checkpoint_dir / str(s)).rename(dest)
                warn(f"moved {what} step {s} to {dest}")
        except OSError as e:
            raise fs_error(f"cannot move {what} out of {self.checkpoint_dir}", e) from None
        self._manager.reload()


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
