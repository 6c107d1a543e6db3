"""One directory per run: experiments/<name>/{config.json, vocab.json, checkpoints/, tb/}.

`eval_char.py` rebuilds everything from this directory alone. Checkpoints are orbax
CheckpointManager steps holding the (unreplicated) train state plus a JSON record; orbax writes
each step into a temporary directory and renames it when complete, so a save that is killed
midway leaves a `*.orbax-checkpoint-tmp*` directory that is never restored. Old steps leave the
same way, renamed into checkpoints/deleted/ before they are removed, so every numbered directory
is a whole checkpoint. One that fails to load all the same is skipped for the one before it, and
training moves it to damaged_checkpoints/.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from mingpt_palm import config as config_lib
from mingpt_palm.config import TrainConfig, UserError

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_TMP_GLOB = "*.orbax-checkpoint-tmp*"
_TRASH = "deleted"  # checkpoints/deleted/: old steps renamed here by orbax, then removed by us


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


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


class Experiment:
    def __init__(self, experiments_dir: str | Path, name: str, keep: int | None = None):
        if not _NAME.fullmatch(name) or name in (".", ".."):
            raise UserError(
                f"experiment name {name!r} must be a plain directory name inside {experiments_dir}/ "
                "(letters, digits, '.', '_', '-'; no '/', '..' or absolute paths)"
            )
        self.name = name
        self.path = Path(experiments_dir) / name
        self.config_path = self.path / "config.json"
        self.vocab_path = self.path / "vocab.json"
        self.checkpoint_dir = (self.path / "checkpoints").absolute()
        self.tb_dir = self.path / "tb"
        self.damaged_dir = self.path / "damaged_checkpoints"
        self.keep = keep  # newest checkpoints kept on disk; None keeps all
        self._manager = None
        self._read_only = True

    # --- lifecycle -----------------------------------------------------------------------------

    def check_new(self) -> None:
        if self.path.exists():
            raise UserError(
                f"experiment directory {self.path} already exists; pass --restore-checkpoint to continue "
                "it, or choose another --experiment-name (nothing was changed)"
            )

    def check_existing(self) -> None:
        if not self.config_path.is_file():
            known = list_experiments(self.path.parent)
            listing = ", ".join(known) if known else "none"
            raise UserError(f"no experiment {self.name!r} in {self.path.parent}/ (existing experiments: {listing})")

    def write_config(self, cfg: TrainConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config_lib.to_dict(cfg), indent=2))
        tmp.replace(self.config_path)

    def read_config(self) -> TrainConfig:
        return config_lib.from_dict(TrainConfig, json.loads(self.config_path.read_text()))

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
        """Start an asynchronous save; the next save (or `wait`) waits for this one to finish."""
        self._empty_trash()
        # Host copies: a process can only write arrays it owns, and pmap's per-device arrays are
        # not global arrays that orbax could split among processes.
        state = jax.device_get(state)
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

        Returns (state, meta, step). Incomplete (interrupted) saves are never candidates.
        """
        for tmp in self.incomplete_checkpoints():
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
                reason = type(e).__name__ + (f": {str(e).strip().splitlines()[0][:200]}" if str(e).strip() else "")
                errors.append(f"step {s}: {reason}")
                damaged.append(s)
                warn(f"checkpoint step {s} is unreadable ({reason}); trying an older one")
                continue
            if errors:
                warn(f"restored step {s} instead of the newer, damaged checkpoint(s)")
                if not read_only:
                    self._set_aside(damaged)
            return restored["state"], restored["meta"], s
        raise UserError(f"no readable checkpoint in {self.checkpoint_dir} ({'; '.join(errors)})")

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged checkpoints out of checkpoints/ (kept for inspection, never deleted).

        Left in place, a damaged step newer than the restored one would make orbax skip every
        save up to it, and a later restart would stumble over it again.
        """
        self.damaged_dir.mkdir(exist_ok=True)
        stamp = f"{datetime.now():%Y-%m-%d-%H%M%S}"
        for s in steps:
            dest = self.damaged_dir / f"{s}_{stamp}"
            (self.checkpoint_dir / str(s)).rename(dest)
            warn(f"moved the damaged checkpoint step {s} to {dest}")
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
