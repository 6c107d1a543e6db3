"""One directory per run, and its records. If this is your first read through, skip the guard rails here.

experiments/<name>/{config.json, history.jsonl, corpus.json, vocab.json, run.lock, checkpoints/, tb/},
and for a sentencepiece tokenizer tokenizer.model and tokens/. `eval_char.py` rebuilds everything from
this directory alone, and `--restore-checkpoint` continues a run from it alone: config.json holds the
current settings, history.jsonl one record per start (the first holds the settings the run began with,
the last those it runs with now), corpus.json the size and sha256 of the corpus. A training run holds
an exclusive `flock` on run.lock for as long as it lives, so a second run of the same experiment is
refused, and the kernel releases the lock of a process that dies. The checkpoints are checkpoints.py's.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np

from mingpt_palm import checkpoints, settings
from mingpt_palm import vocab as vocab_lib
from mingpt_palm.config import TrainConfig
from mingpt_palm.errors import UserError, fs_error, write_atomically
from mingpt_palm.lock import RunLock
from mingpt_palm.logs import warn

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


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


class Records:
    """The files an experiment directory keeps about its run, each read back checked: config.json,
    history.jsonl, corpus.json, the vocabulary, the token cache, and evaluation reports."""

    def __init__(self, path: Path):
        self.path = path
        self.config_path, self.history_path = path / "config.json", path / "history.jsonl"
        self.corpus_path, self.vocab_path, self.tokens_dir = path / "corpus.json", path / "vocab.json", path / "tokens"

    def write_config(self, cfg: TrainConfig) -> None:
        write_atomically(self.config_path, json.dumps(settings.to_json(cfg), indent=2) + "\n")

    def read_config(self) -> TrainConfig:
        """config.json, checked against the settings the run last started with (history.jsonl): a run-defining
        value edited by hand would silently change what a resume computes, or what eval rebuilds."""
        fix = ("the first record of history.jsonl there holds the settings the run started with"
               if self.history_path.is_file() else "restore it from a backup")
        try:
            cfg = settings.from_json(_read_json(self.config_path, "the run's settings", fix))
        except settings.OtherFormat as e:
            raise UserError(f"{self.config_path} cannot be read: {e}; continue or evaluate this experiment with the "
                            "build that made it, or start a new one") from None
        except ValueError as e:
            raise UserError(f"{self.config_path} is damaged ({e}); it holds the run's settings; {fix}") from None
        started = self.started_config()
        # The corpus is checked by content (corpus.json): a path edited to a moved copy is the same corpus.
        edited = [d for d in settings.differences(started, cfg, settings.is_run_defining)
                  if d[0] != "dataset_path"] if started else []
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
                return settings.from_json(json.loads(line)["config"])
            except (ValueError, KeyError, TypeError):  # json.JSONDecodeError is a ValueError
                continue
        return None

    def append_history(self, record: dict) -> None:
        try:
            with self.history_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise fs_error(f"cannot write {self.history_path}", e) from None

    def write_corpus(self, fingerprint: dict) -> None:
        write_atomically(self.corpus_path, json.dumps(fingerprint, indent=2) + "\n")

    def read_corpus(self) -> dict:
        d = _read_json(self.corpus_path, "the size and sha256 of the training corpus", "restore it from a backup")
        if not (isinstance(d, dict) and isinstance(d.get("size"), int) and isinstance(d.get("sha256"), str)):
            raise UserError(f"{self.corpus_path} is damaged (no size and sha256); restore it from a backup")
        return d

    def write_vocab(self, vocab) -> None:
        vocab_lib.write(self.path, vocab)

    def read_vocab(self, num_tokens: int):
        return vocab_lib.read(self.path, num_tokens, self.tokens_dir)

    def write_tokens(self, vocab, raw: np.ndarray, ids: np.ndarray) -> None:
        """Keep the token ids of a whole split in tokens/, where later resumes and evaluations memory-map them
        instead of encoding the split again."""
        try:
            self.tokens_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise fs_error(f"cannot create {self.tokens_dir}", e) from None
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(ids, np.int32))
        write_atomically(vocab.cache_file(raw, self.tokens_dir), buffer.getvalue())

    def check_reports_writable(self) -> None:
        """Before a long scoring run, so that it cannot fail at its end; eval/ itself is made only then, so
        that an evaluation refused or interrupted on the way leaves nothing behind."""
        path = self.path / "eval"
        where = path if path.is_dir() else self.path
        if not os.access(where, os.W_OK | os.X_OK):
            reason = "the file system is read-only" if os.statvfs(where).f_flag & os.ST_RDONLY else "permission denied"
            raise UserError(f"cannot {'write into' if where == path else 'create'} {path}: {reason}")

    def write_report(self, filename: str, report: dict) -> Path:
        """An evaluation report in eval/, written whole or not at all."""
        path = self.path / "eval"
        try:
            path.mkdir(exist_ok=True)
        except OSError as e:
            raise fs_error(f"cannot create {path}", e) from None
        write_atomically(path / filename, json.dumps(report, indent=2) + "\n")
        return path / filename


class Experiment(Records):
    """An experiment directory: its name and place, its creation, its lock and its checkpoints."""

    def __init__(self, experiments_dir: str | Path, name: str, unique: bool = False):
        if not _NAME.fullmatch(name) or name in (".", ".."):
            raise UserError(f"experiment name {name!r} must be a plain directory name inside {experiments_dir}/ "
                            "(letters, digits, '.', '_', '-'; no '/', '..' or absolute paths)")
        if len(name.encode()) > 250:  # room for the suffix a colliding default name gets ("-2")
            raise UserError(f"experiment name {name[:40]!r}... is {len(name.encode())} bytes long; file systems "
                            "allow 255 bytes per name: use at most 250")
        self.experiments_dir = Path(experiments_dir)
        self.unique = unique  # a default name: on a collision, `create` takes the next free suffix
        self.created = False  # this run made the directory (and removes it if it fails before step 1)
        self._set_name(name)

    def _set_name(self, name: str) -> None:
        self.name = name
        super().__init__(self.experiments_dir / name)
        self.tb_dir, self.checkpoint_dir = self.path / "tb", (self.path / "checkpoints").absolute()
        self.lock = RunLock(self.path)

    def command(self, script: str, *args: str) -> str:
        """The command line of `script` on this experiment (train_char.py: continue it; eval_char.py: score it)."""
        where = ["--experiments-dir", str(self.experiments_dir)] if str(self.experiments_dir) != "experiments" else []
        return shlex.join(["python", script, *where, "--experiment-name", self.name, *args])

    # --- the directory -------------------------------------------------------------------------

    def _check_parent(self) -> None:
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise UserError(f"--experiments-dir {self.path.parent} is not a directory; pass a directory (it is "
                            "created if missing)")

    def check_new(self) -> None:
        self._check_parent()
        if self.path.is_dir():
            holder = self.lock.holder()
            running = f" and a training run is using it ({holder})" if holder else ""
            raise UserError(f"experiment directory {self.path} already exists{running}; pass --restore-checkpoint to "
                            "continue it, or choose another --experiment-name (nothing was changed)")
        if self.path.exists() or self.path.is_symlink():
            raise UserError(f"{self.path} exists and is not an experiment directory (it is a file); choose another "
                            "--experiment-name (nothing was changed)")

    def check_existing(self) -> None:
        self._check_parent()
        if not self.config_path.is_file():
            known = ", ".join(list_experiments(self.path.parent)) or "none"
            raise UserError(f"no experiment {self.name!r} in {self.path.parent}/ (existing experiments: {known})")

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
        self.lock.acquire()
        self.lock.record(command)

    def discard(self) -> None:
        """Remove a directory this run created, when the run failed before its first step: it holds
        nothing worth keeping, and left behind it would block the same command from running again."""
        self.lock.release()
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            self.created = False

    # --- checkpoints (checkpoints.py reads and writes them) ----------------------------------------

    def checkpoint_steps(self) -> list[int]:
        return checkpoints.steps(self.checkpoint_dir)

    def set_aside(self, damaged: list[int], superseded: list[int]) -> dict:
        """Move checkpoints a continued run must not keep beside its own into <what>_checkpoints/<step>_<time>
        (kept, never deleted): damaged ones, and for --restore-step the newer ones. Left in place, a newer step
        would make orbax skip every save up to it. Returns {what: [where]} for history.jsonl."""
        stamp, moved = f"{datetime.now():%Y-%m-%d-%H%M%S}", {}
        for key, steps, what in (("damaged", damaged, "the damaged checkpoint"),
                                 ("superseded", superseded, "the newer checkpoint")):
            dest_dir = self.path / f"{key}_checkpoints"
            try:
                for s in steps:
                    dest_dir.mkdir(exist_ok=True)
                    dest = dest_dir / f"{s}_{stamp}"
                    (self.checkpoint_dir / str(s)).rename(dest)
                    warn(f"moved {what} step {s} to {dest}")
                    moved.setdefault(key, []).append(str(dest))
            except OSError as e:
                raise fs_error(f"cannot move {what} out of {self.checkpoint_dir}", e) from None
        return moved
