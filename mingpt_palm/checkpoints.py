"""Checkpoints: orbax steps under experiments/<name>/checkpoints/, restored with fallback, written asynchronously.
If this is your first read through, skip to `Checkpointer`: the loop calls its `on_step` and `close`.

Each step holds the train state (one copy: each process writes its shards of a sharded one) and a JSON
record (`meta`); a restore lays it out as its target says, whatever layout or device count saved it.
orbax writes a step into a temporary directory and renames it when complete, so a save that is killed
midway leaves a `*.orbax-checkpoint-tmp*` directory that is never restored. Old steps leave the same way, renamed into
checkpoints/deleted/ before they are removed, so every numbered directory is a whole checkpoint. One
that fails to load all the same is skipped for the one before it.

Reading and writing are kept apart, because in a multi-process job they are different kinds of act.
A read (`restore`) is each process's own: no collective runs, so processes can never disagree on one
inside orbax, and they compare what they read afterwards (start.agree). Writing goes through one orbax
CheckpointManager (`Saver`) that every process creates alike at the first save, after anything that
had to move out of the way (`set_aside`) has moved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mingpt_palm import parallel
from mingpt_palm.errors import TrainingStopped, UserError, is_disk_full

TMP_GLOB = "*.orbax-checkpoint-tmp*"
_TRASH = "deleted"  # checkpoints/deleted/: old steps renamed here by orbax, then removed by us


def steps(directory: Path) -> list[int]:
    """The complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def incomplete(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(TMP_GLOB)) if directory.is_dir() else []


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


def _reader() -> ocp.Checkpointer:
    # active_processes of this process alone: orbax then runs no cross-process barrier.
    me = jax.process_index()
    handler = ocp.CompositeCheckpointHandler(state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
    return ocp.Checkpointer(handler, multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


class Vanished(Exception):
    """A checkpoint step that a live training run removed (rotation) while it was being read."""


@dataclasses.dataclass(frozen=True)
class Restored:
    state: Any
    meta: dict
    step: int
    damaged: tuple[int, ...]  # newer steps that could not be read (nothing moved yet: see set_aside)


def restore(directory: Path, abstract_state, step: int | None = None, *, live: str | None = None,
            warn=print) -> Restored:
    """Restore `step` (default: the newest that loads, falling back past damaged ones). Reads only.

    `live`: a training run holding the experiment (its description), when the caller only reads
    beside it (eval): its saves in progress are not called interrupted, and a step it rotates away
    while it is read makes this read the directory again and take the newest one there now.
    """
    for _ in range(10 if live else 1):
        try:
            return _restore(directory, abstract_state, step, live, warn)
        except (Vanished, FileNotFoundError):
            if not live:
                raise
    raise UserError(f"the training run using {directory.parent} ({live}) removed each checkpoint before it could be "
                    "read, 10 times; pass --checkpoint-step of a step it keeps, or raise --keep-checkpoints")


def _restore(directory: Path, abstract_state, step, live, warn) -> Restored:
    if not live:
        for tmp in incomplete(directory):
            warn(f"ignoring incomplete checkpoint {directory / tmp} (its save was interrupted)")
    available = steps(directory)
    if step is not None and step not in available:
        raise UserError(f"no checkpoint for step {step} in {directory} (available: {available or 'none'})")
    candidates = [step] if step is not None else available[::-1]
    if not candidates:
        raise UserError(f"no checkpoint in {directory}; train first, or start a new experiment")
    errors = []
    with _reader() as reader:
        for s in candidates:
            try:
                with _quiet_orbax():
                    check_shapes(reader, directory / str(s), abstract_state.params)
                    restored = reader.restore(directory / str(s), args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(_placed(abstract_state)), meta=ocp.args.JsonRestore()))
            except UserError:
                raise
            except Exception as e:  # a damaged checkpoint can fail in many layers (json, tensorstore, zarr)
                if live and not (directory / str(s)).is_dir():
                    raise Vanished(s) from e  # rotated away by the live run while we read it: not damaged
                reason = type(e).__name__ + (f": {str(e).strip().splitlines()[0][:200]}" if str(e).strip() else "")
                errors.append(f"step {s}: {reason}")
                warn(f"checkpoint step {s} is unreadable ({reason}); trying an older one")
                continue
            if errors:
                warn(f"restored step {s} instead of the newer, damaged checkpoint(s)")
            damaged = tuple(c for c in candidates if c > s)
            return Restored(restored["state"], restored["meta"], s, damaged)
    raise UserError(f"no readable checkpoint in {directory} ({'; '.join(errors)})")


def _shapes(tree) -> dict[str, tuple]:
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_shapes(reader: ocp.Checkpointer, step_dir: Path, abstract_params) -> None:
    """UserError when the checkpoint's parameters have other names or shapes than the model the
    experiment's config.json describes: the config does not belong to these checkpoints (an edited
    file), and every step would fail alike, so no fallback to an older one could help."""
    saved_state = reader.metadata(step_dir).item_metadata["state"]
    saved = _shapes(saved_state["params"])
    wanted = _shapes(abstract_params)
    if saved == wanted:
        return
    diffs = [f"{k} is {list(saved[k])} there, {list(wanted[k])} in config.json"
             for k in wanted if k in saved and saved[k] != wanted[k]]
    diffs += [f"{k} is missing there" for k in wanted if k not in saved]
    diffs += [f"{k} is not in the model config.json describes" for k in saved if k not in wanted]
    raise UserError(f"the model in {step_dir.parent.parent / 'config.json'} does not match checkpoint step "
                    f"{step_dir.name} ({len(diffs)} parameter(s) differ: {'; '.join(diffs[:3])}"
                    f"{'; ...' if len(diffs) > 3 else ''}): the checkpoints were trained with other model settings; "
                    "put back the ones they were trained with (history.jsonl records them)")


def nonfinite_leaves(state) -> list[str]:
    """The floating leaves that hold a non-finite number. A host copy is checked here; arrays on the devices
    are checked there, shard by shard (a sharded state is never gathered for it; every process runs it)."""
    floats = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state)
              if np.issubdtype(np.dtype(x.dtype), np.floating)]
    if all(isinstance(x, np.ndarray) for _, x in floats):
        return [path for path, x in floats if not np.isfinite(x).all()]
    sharding = floats[0][1].sharding
    whole = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
             if isinstance(sharding, jax.sharding.NamedSharding) else None)
    finite = _finite_check(whole)([x for _, x in floats])
    return [path for (path, _), ok in zip(floats, np.asarray(finite.addressable_data(0))) if not ok]


@functools.lru_cache(maxsize=8)
def _finite_check(whole):
    """One compiled verdict per output layout, kept: a fresh lambda under jit would compile at every save."""
    return jax.jit(lambda xs: jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]), out_shardings=whole)


def _placed(abstract):
    """A restore target whose every leaf says where it goes: a leaf that does not is read onto this process's
    first device. Without one, orbax would place it as it was saved, on devices that may no longer exist."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None else
                        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)


class Saver:
    """The write side: one orbax CheckpointManager, made at the first save. In a multi-process job every
    process makes it at the same step with the same options (its constructor runs collectives)."""

    def __init__(self, directory: Path, keep: int | None):
        self.directory, self.keep = directory, keep
        self._manager: ocp.CheckpointManager | None = None

    def _open(self) -> ocp.CheckpointManager:
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=True,
                # orbax removes an old step file by file, so a kill midway would leave a numbered,
                # half-deleted checkpoint; a rename out of the way first is atomic.
                todelete_subdir=_TRASH,
            )
            with _quiet_orbax():  # it reads every step's metadata when it starts
                self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        return self._manager

    def save(self, step: int, state, meta: dict) -> None:
        """Start an asynchronous save of a host copy; the next save (or `wait`) waits for this one.

        A state with a non-finite number is never written: the newest checkpoint must always be one
        a run can continue from, and rotation would otherwise push the good ones out.
        """
        self._empty_trash()
        if bad := nonfinite_leaves(state):
            raise TrainingStopped(f"step {step}: the train state holds non-finite numbers ({', '.join(bad[:3])}"
                                  f"{', ...' if len(bad) > 3 else ''}); no checkpoint was written, the newest in "
                                  f"{self.directory} is step {max(steps(self.directory), default='none')}")
        saved = self._open().save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                meta=ocp.args.JsonSave(meta)))
        # orbax silently skips a step that is not newer than the newest one it knows of; a run that
        # reports "checkpoint saved" must never have skipped it.
        if not saved:
            raise RuntimeError(f"orbax refused to save step {step} in {self.directory} "
                               f"(existing steps: {steps(self.directory)})")

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()  # waits for the last save, and for old steps to be renamed away
            self._manager = None
            shutil.rmtree(self.directory / _TRASH, ignore_errors=True)  # nothing runs any more

    def _empty_trash(self) -> None:
        trash = self.directory / _TRASH
        if trash.is_dir():
            for old in trash.iterdir():  # entries only: orbax may be renaming a new one in right now
                shutil.rmtree(old, ignore_errors=True)


class Checkpointer:
    """The run's checkpoints while it trains (levanter's Checkpointer): when to save, and a pipeline that
    keeps saving off the training's critical path. A due step's state is copied on the device (the next
    step may overwrite donated buffers), brought to the host on a background thread, and handed to orbax
    (which writes asynchronously) on the main thread once it is there: orbax's threads and event loop
    belong to the main thread. Every hand-off runs inside `idle()`, the loop's promise that no step is in
    flight (the time is left out of tokens/s). A multi-process job hands off at once: every process must
    reach orbax's save together."""

    def __init__(self, directory: Path, *, interval: int, keep: int, last_step: int, start: int, seed: int,
                 tokens_per_step: int, idle, before_save, layout, resume_command: str):
        self.directory, self.interval, self.last_step = directory, interval, last_step
        self.meta = {"seed": seed, "tokens_per_step": tokens_per_step}
        # layout.snapshot(state): its copy for a checkpoint (parallel.HostCopy or parallel.Ready)
        self.idle, self.before_save, self.layout, self.resume_command = idle, before_save, layout, resume_command
        self.saver = Saver(directory, keep)
        self.last_saved = start  # the step of the newest checkpoint taken (the start: none taken yet)
        self._copy: parallel.HostCopy | parallel.Ready | None = None
        self._pending: tuple[int, dict] | None = None  # (step, meta) of the checkpoint on its way to the host

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.last_step

    def on_step(self, step: int, state) -> None:
        """Called after every step: hands a finished host copy to orbax, and saves `step` when it is due."""
        self._hand_off()
        if self.due(step):
            self.save(step, state)

    def save(self, step: int, state) -> None:
        with self.idle():
            self.finish()  # the previous save first, so that a failure is blamed on the step that failed
            copy = self.layout.snapshot(state)
            self.last_saved = step
            with self._stopping_on_a_full_disk(step):
                self.before_save()  # the logs: a killed run's curves then reach at least its last checkpoint
            self._copy = copy
            self._pending = (step, {"step": step, "seed": self.meta["seed"],
                                    "tokens_seen": step * self.meta["tokens_per_step"], "devices": jax.device_count(),
                                    "processes": jax.process_count(), "parallel": self.layout.name})
            if jax.process_count() > 1:
                self._hand_off(wait=True)

    def _hand_off(self, wait: bool = False) -> None:
        if self._pending is None or not (wait or self._copy.done()):
            return
        # Taken over only once idle() has drained the loop (which may find the run halted, and raise):
        # close() then still writes a checkpoint taken just before the step that stopped the run.
        with self.idle():
            step, meta = self._pending
            self._pending = None
            with self._stopping_on_a_full_disk(step):
                self.saver.save(step, self._copy.result(), meta)
            self._copy = None

    def finish(self) -> None:
        """Every checkpoint taken is written and complete on disk."""
        self._hand_off(wait=True)
        with self._stopping_on_a_full_disk(self.last_saved):
            self.saver.wait()

    def close(self) -> None:
        """Also after a failure: a checkpoint already taken is written (the stop message may name it)."""
        with contextlib.suppress(Exception):
            self._hand_off(wait=True)
        with contextlib.suppress(Exception):  # after a failed save orbax raises its error again here
            self.saver.close()

    @contextlib.contextmanager
    def _stopping_on_a_full_disk(self, step: int):
        """A full disk stops the run with one line that says what survived; anything else passes through."""
        try:
            yield
        except Exception as e:
            if not is_disk_full(e):
                raise
            complete = steps(self.directory)
            raise TrainingStopped(
                f"the disk is full: checkpoint step {step} could not be written to {self.directory}; the last "
                f"complete checkpoint is {f'step {complete[-1]}' if complete else 'none'}. Free some space, then "
                f"resume with: {self.resume_command}") from None
