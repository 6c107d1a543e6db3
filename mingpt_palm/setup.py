"""Setting a run up: everything that can fail on bad input happens here, before anything is written.

prepare() opens (or checks) the experiment, loads and checks the corpus, resolves the settings
against a saved run, builds the model and the (restored or new) state; agree_across_processes() makes the processes
of a job compare their settings; record_start() writes the experiment's records; announce() says
what is about to run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import socket
import sys
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import jax

from mingpt_palm import config as config_lib
from mingpt_palm import data, parallel
from mingpt_palm.config import TrainConfig, UserError
from mingpt_palm.experiment import Experiment
from mingpt_palm.model import PaLM, attention_implementation, compute_dtype, param_count
from mingpt_palm.optim import lr_schedule
from mingpt_palm.state import TrainState, build, init_state


def steps_for_epochs(epochs: float, train_bytes: int, seq_len: int, batch_size: int) -> int:
    """Optimizer steps for `epochs` passes: an epoch is train_bytes / seq_len windows of seq_len targets."""
    return max(1, math.ceil(epochs * train_bytes / seq_len / batch_size))


def resume_command(cfg: TrainConfig) -> str:
    """The command that continues this run: the saved config supplies every other setting."""
    args = ["python", "train_char.py", "--experiment-name", cfg.experiment_name, "--restore-checkpoint"]
    if cfg.experiments_dir != TrainConfig.experiments_dir:
        args[2:2] = ["--experiments-dir", cfg.experiments_dir]
    return shlex.join(args)


def eval_command(cfg: TrainConfig) -> str:
    args = ["python", "eval_char.py", "--experiment-name", cfg.experiment_name]
    if cfg.experiments_dir != TrainConfig.experiments_dir:
        args += ["--experiments-dir", cfg.experiments_dir]
    return shlex.join(args)


@dataclasses.dataclass
class Run:
    cfg: TrainConfig  # as it will be saved: name, max_steps, corpus path and vocabulary size resolved
    exp: Experiment
    corpus: data.Corpus
    fingerprint: dict
    vocab: data.Vocab
    model: PaLM
    tx: Any
    schedule: Any
    decayed: list
    state: TrainState  # on the host (restored or freshly initialised)
    start: int
    saved: TrainConfig | None  # the settings of the run being continued (None for a new run)
    notes: list  # start-up lines particular to this start (resumes: what changed and what it means)
    stepped: bool = False  # a step has finished: from now on the directory is worth keeping


def _open_experiment(cfg: TrainConfig, resuming: bool) -> Experiment:
    """Name, existence and (when continuing) the lock, before a single byte of the corpus is read."""
    name = cfg.experiment_name
    if name is None:
        if resuming:
            raise UserError("--restore-checkpoint needs --experiment-name (which experiment to continue)")
        if jax.process_count() > 1:  # each process would stamp its own time
            raise UserError("a multi-process run needs --experiment-name (the same on every process)")
        name = f"{Path(cfg.dataset_path).stem}_{datetime.now():%Y-%m-%d-%H%M%S}"
    exp = Experiment(cfg.experiments_dir, name, keep=cfg.keep_checkpoints, unique=cfg.experiment_name is None)
    if resuming:
        exp.check_existing()
        if not exp.checkpoint_steps():
            raise UserError(f"--restore-checkpoint: {exp.checkpoint_dir} holds no checkpoint to continue from "
                            f"(the run stopped before its first save); delete {exp.path} to start it over")
        if jax.process_index() == 0:
            # Before orbax looks at the checkpoints: it would delete a live run's save in progress.
            exp.lock.acquire(shlex.join(sys.argv))
    elif cfg.experiment_name is not None:
        exp.check_new()
    return exp


def _load_data(cfg: TrainConfig, exp: Experiment, saved: TrainConfig | None):
    """(corpus, fingerprint, vocab); a continued run gets exactly the corpus and vocabulary it had."""
    recorded = exp.read_corpus() if saved else None
    corpus = data.load_corpus(cfg.dataset_path, cfg.data, progress=cfg.progress and jax.process_index() == 0,
                              expect=recorded, owner=str(exp.path))
    seq_len = cfg.model.seq_len
    fractions = "" if corpus.registered and corpus.registered.split_bytes else (
        f", smaller --data.val-fraction/--data.test-fraction (now {cfg.data.val_fraction} + "
        f"{cfg.data.test_fraction} of the file)")
    data.require_windows(corpus.train, "train", seq_len, corpus.path,
                         f"use a smaller --block-size{fractions} or a bigger corpus")
    if cfg.eval_interval:
        val_hint = "" if fractions == "" else ", a larger --data.val-fraction"
        data.require_windows(corpus.val, "val", seq_len, corpus.path,
                             f"use a smaller --block-size{val_hint}, --eval-interval 0, or a bigger corpus")
    vocab = exp.read_vocab(saved.model.num_tokens) if saved else data.Vocab.build(cfg.data.vocab, corpus.train)
    return corpus, recorded or data.fingerprint(corpus.path), vocab


def _resolve(cfg: TrainConfig, saved: TrainConfig | None, exp: Experiment, corpus, vocab) -> TrainConfig:
    """The settings as they will be saved, checked against the saved ones when continuing."""
    epochs = cfg.max_epochs
    if saved is not None and cfg.max_steps != saved.max_steps and cfg.max_epochs == saved.max_epochs:
        epochs = None  # --max-steps given now wins over the --max-epochs of the original command
    max_steps = cfg.max_steps
    if epochs is not None:
        max_steps = steps_for_epochs(epochs, len(corpus.train), cfg.model.seq_len, cfg.batch_size)
        if max_steps > config_lib.STEP_LIMIT:
            raise UserError(f"--max-epochs {epochs} means {max_steps:,} steps, more than the 2**31 - 1 a run can take")
    # A file path is stored absolute so that eval_char.py finds the corpus from any directory.
    dataset = cfg.dataset_path if corpus.registered else str(corpus.path.resolve())
    out = dataclasses.replace(cfg, experiment_name=exp.name, max_steps=max_steps, max_epochs=epochs,
                              dataset_path=dataset, restore_checkpoint=False, restore_step=None,
                              model=dataclasses.replace(cfg.model, num_tokens=vocab.size))
    if saved is not None:
        # The corpus is checked by content (corpus.json): a moved file with the same bytes is the same corpus.
        by_content = exp.corpus_path.exists()
        refused = [d for d in config_lib.differences(saved, out, config_lib.is_run_defining)
                   if not (d[0] == "dataset_path" and by_content)]
        if refused:
            listing = "; ".join(f"{path}: {a!r} saved vs {b!r} given" for path, a, b in refused)
            raise UserError(f"cannot continue {exp.path} with different settings ({listing}); they would silently "
                            "change what the run computes: leave them out to continue with the saved ones, or "
                            "start a new experiment")
    return out


def _resume_notes(run_cfg: TrainConfig, saved: TrainConfig, state, meta: dict) -> list[str]:
    notes = []
    start, applied = int(state.step), int(state.step) - int(state.skipped)
    if run_cfg.max_steps != saved.max_steps:
        before = float(lr_schedule(saved.optim, saved.max_steps)(applied))
        after = float(lr_schedule(run_cfg.optim, run_cfg.max_steps)(applied))
        notes.append(f"schedule: re-planned from step {start} for {run_cfg.max_steps:,} steps instead of "
                     f"{saved.max_steps:,}; learning rate of the next step {before:.4g} -> {after:.4g}")
    if saved.dataset_path != run_cfg.dataset_path:
        notes.append(f"corpus: {run_cfg.dataset_path} (moved from {saved.dataset_path}; same size and sha256)")
    n_dev = jax.device_count()
    if meta.get("devices") not in (None, n_dev):
        notes.append(f"devices: {n_dev} now, {meta['devices']} when step {start} was saved: the data order is "
                     "unchanged (a batch depends only on seed and step), but gradients are summed in another "
                     "order, so numbers agree with an uninterrupted run to float rounding, not bit for bit")
    return notes


def prepare(cfg: TrainConfig) -> Run:
    """Check and build everything a run needs. Writes nothing, except that a continued run takes its
    lock and moves aside checkpoints it must not continue from (damaged, or newer than --restore-step)."""
    resuming = cfg.restore_checkpoint or cfg.restore_step is not None
    exp = _open_experiment(cfg, resuming)
    try:
        saved = exp.read_config() if resuming else None
        corpus, fingerprint, vocab = _load_data(cfg, exp, saved)
        run_cfg = _resolve(cfg, saved, exp, corpus, vocab)
        parallel.check_batch(run_cfg.batch_size, run_cfg.grad_accum_steps)
        attention_implementation(run_cfg.model)  # a cudnn request that cannot run here is refused now
        model, tx, schedule, decayed, abstract = build(run_cfg)
        make_state = partial(init_state, model, tx, run_cfg)
        notes = []
        if resuming:
            # Only process 0 moves damaged or superseded checkpoints; the others just read.
            main = jax.process_index() == 0
            state, meta, _ = exp.restore(abstract, cfg.restore_step, read_only=not main)
            if cfg.restore_step is not None and main:
                exp.supersede_newer(cfg.restore_step)
            notes = _resume_notes(run_cfg, saved, state, meta)
        else:
            # Wait on every leaf: reading one output (the step) of a computation whose other output could
            # not be allocated hangs forever on the CPU backend, while waiting on that output raises
            # RESOURCE_EXHAUSTED (jax 0.10).
            state = jax.block_until_ready(jax.jit(make_state)())
        start = int(state.step)
        if start >= run_cfg.max_steps:
            raise UserError(f"{exp.path} is at step {start}, and --max-steps is {run_cfg.max_steps}: nothing to "
                            f"train; pass a larger --max-steps to continue")
        return Run(run_cfg, exp, corpus, fingerprint, vocab, model, tx, schedule, decayed, state, start, saved, notes)
    except BaseException:
        exp.lock.release(started=False)
        raise


def agree_across_processes(run: Run) -> None:
    """Every process must run the same settings on the same corpus from the same step (a mismatch would
    hang in the first all-reduce, or silently train a different model on each)."""
    mine = {"config": config_lib.to_dict(run.cfg), "corpus_sha256": run.fingerprint["sha256"], "start": run.start}
    for pid, payload in parallel.agree("settings", json.dumps(mine), run.cfg.distributed_timeout):
        theirs = json.loads(payload)
        diffs = [f"{path}: {a!r} here vs {b!r} on process {pid}" for path, a, b in config_lib.differences(
            run.cfg, config_lib.from_dict(TrainConfig, theirs["config"]))]
        diffs += [f"{k}: {mine[k]!r} here vs {theirs[k]!r} on process {pid}" for k in ("corpus_sha256", "start")
                  if mine[k] != theirs[k]]
        if diffs:
            raise UserError(f"process {jax.process_index()} and process {pid} were started with different settings "
                            f"({'; '.join(diffs[:6])}); start every process with the same arguments")


def record_start(run: Run) -> None:
    """Process 0 writes the experiment's records: config.json (current settings), one history line."""
    exp, cfg = run.exp, run.cfg
    if run.saved is None:
        exp.create(shlex.join(sys.argv))
        cfg = run.cfg = dataclasses.replace(cfg, experiment_name=exp.name)  # a default name may have moved on
        exp.write_corpus(run.fingerprint)
        exp.write_vocab(run.vocab)
    changed = {path: [a, b] for path, a, b in config_lib.differences(run.saved, cfg)} if run.saved else {}
    exp.write_config(cfg)
    exp.append_history({
        "event": "resume" if run.saved else "new", "time": f"{datetime.now():%Y-%m-%d %H:%M:%S}", "step": run.start,
        "host": socket.gethostname(), "pid": os.getpid(), "command": shlex.join(sys.argv),
        "devices": jax.device_count(), "processes": jax.process_count(), "changed": changed,
        "config": config_lib.to_dict(cfg),
    })


def announce(run: Run) -> None:
    cfg, n_dev, k, m = run.cfg, jax.device_count(), run.cfg.grad_accum_steps, run.cfg.model
    split = (f"{cfg.batch_size // n_dev} per device x {n_dev}" if k == 1 else
             f"{k} micro-batches of {cfg.batch_size // n_dev // k} per device x {n_dev} devices, accumulated")
    print(f"devices: {n_dev} x {jax.devices()[0].platform} ({jax.process_count()} process(es)); global batch "
          f"{cfg.batch_size} = {split}; {cfg.batch_size * m.seq_len:,} tokens/step")
    dtype, attention = compute_dtype(m).name, attention_implementation(m)
    print(f"model: {param_count(run.state.params):,} parameters (dim {m.dim}, depth {m.depth}, heads "
          f"{m.heads}x{m.dim_head}, seq_len {m.seq_len}); compute {dtype}{' (auto)' if m.dtype == 'auto' else ''}, "
          f"attention {attention}, remat {m.remat}; vocab {run.vocab.kind} ({run.vocab.size})")
    c = run.corpus
    print(f"data: {c.path}: train {len(c.train):,} / val {len(c.val):,} / test {len(c.test):,} bytes")
    print(f"weight decay on {len(run.decayed)} kernels: {', '.join(run.decayed)}")
    for note in run.notes:
        print(note)
    start_note = f"restored from step {run.start}" if run.saved else "new"
    print(f"experiment: {run.exp.path} ({start_note}); steps {run.start} -> {cfg.max_steps}")
