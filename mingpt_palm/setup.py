"""Setting a run up: everything that can fail on bad input happens here, before anything is written.

prepare() opens (or checks) the experiment, loads and checks the corpus, resolves the settings
against a saved run, builds the model and the (restored, fine-tuned from another experiment's
parameters, or new) state; agree_across_processes() makes the processes
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
import jax.numpy as jnp

from mingpt_palm import config as config_lib
from mingpt_palm import data, parallel, tokenizers
from mingpt_palm.config import TrainConfig, UserError
from mingpt_palm.experiment import Experiment
from mingpt_palm.model import PaLM, attention_implementation, compute_dtype, param_count
from mingpt_palm.optim import lr_schedule, not_decayed
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
    init: dict | None = None  # --init-from: the experiment (absolute path) and step the parameters came from
    splits: TokenSplits | None = None  # what batches are cut from


@dataclasses.dataclass
class TokenSplits:
    """What training batches and validation windows are cut from: the corpus's bytes for byte and char
    tokens (turned into ids on the device, through vocab.table), token ids for sentencepiece, encoded once
    per experiment and memory-mapped from its tokens/ after that."""

    train: Any
    val: Any
    to_cache: list  # [(bytes, ids)] of the splits this start had to encode: record_start keeps them


def _token_splits(cfg: TrainConfig, corpus: data.Corpus, vocab) -> TokenSplits:
    if vocab.kind != "sentencepiece":
        return TokenSplits(corpus.train, corpus.val, [])
    ids, to_cache = {}, []
    for name in ("train", "val") if cfg.eval_interval else ("train",):
        raw = corpus.split(name)
        ids[name] = vocab.cached(raw)
        if ids[name] is None:
            if jax.process_index() == 0:
                print(f"tokenizer: encoding the {name} split ({len(raw):,} bytes) once; later runs read it from "
                      "tokens/ in the experiment", flush=True)
            ids[name] = vocab.encode(raw)
            to_cache.append((raw, ids[name]))
        if len(ids[name]) < cfg.model.seq_len + 1:
            raise UserError(f"the {name} split of {corpus.path} is {len(ids[name]):,} sentencepiece tokens "
                            f"({len(raw):,} bytes), fewer than one window of block size + 1 = "
                            f"{cfg.model.seq_len + 1}; use a smaller --block-size, a smaller --data.vocab-size or a "
                            "bigger corpus")
    return TokenSplits(ids["train"], ids.get("val"), to_cache)


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


def init_source(cfg: TrainConfig) -> Experiment:
    """The experiment --init-from names (a path such as experiments/X, or a bare name under
    --experiments-dir), checked: it exists and holds a checkpoint."""
    path = Path(cfg.init_from)
    parent = path.parent if len(path.parts) > 1 else Path(cfg.experiments_dir)
    try:
        exp = Experiment(parent, path.name)
        exp.check_existing()
    except UserError as e:
        raise UserError(f"--init-from {cfg.init_from}: {e}") from None
    if not exp.checkpoint_steps():
        raise UserError(f"--init-from {cfg.init_from}: {exp.checkpoint_dir} holds no checkpoint to take parameters "
                        "from; train it first, or start from another experiment")
    return exp


def finetune_defaults(source: TrainConfig) -> TrainConfig:
    """The defaults of a run started from `source`'s parameters: its model, its vocabulary settings and
    its corpus; everything else (optimizer, steps, batch, seed) a new run's."""
    return TrainConfig(dataset_path=source.dataset_path, model=source.model, data=source.data)


def _finetune_source(cfg: TrainConfig) -> tuple[Experiment, TrainConfig]:
    """The --init-from experiment and its settings, refusing a model or vocabulary other than its own."""
    exp = init_source(cfg)
    source = exp.read_config()
    refused = config_lib.differences(source, cfg, config_lib.finetune_keeps)
    if refused:
        listing = ", ".join(f"--{path.replace('_', '-')} {b!r} (it has {a!r})" for path, a, b in refused)
        raise UserError(f"--init-from {cfg.init_from}: {listing}: a run started from {exp.path}'s parameters keeps "
                        "its architecture and vocabulary (of the model only dropout, z-loss, dtype, attention and "
                        "remat may differ); leave those flags out")
    return exp, source


def _unknown_note(vocab, corpus) -> str:
    """How many bytes of the corpus a vocabulary taken from another experiment cannot represent."""
    if vocab.kind != "char":
        return ""
    whole = corpus.split("train"), corpus.split("val"), corpus.split("test")
    total = sum(len(part) for part in whole)
    # In chunks: encoding a 100 MB memmap at once would make a 400 MB int32 copy.
    unknown = sum(vocab.unknown_count(part[i : i + (1 << 24)]) for part in whole for i in range(0, len(part), 1 << 24))
    return (f"; vocabulary {vocab.kind} ({vocab.size} ids) from there: {unknown:,} of this corpus's {total:,} bytes "
            f"({100 * unknown / max(total, 1):.2f}%) are outside it and become the unknown id")


def _init_from(source: tuple[Experiment, TrainConfig], run_cfg: TrainConfig, tx):
    """A step-0 state holding the newest parameters of the source experiment, with a fresh optimizer.

    The checkpoint is read whole (the source's optimizer decides the layout of its optimizer state,
    which is dropped): the source's optimizer settings with this run's model, whose parameters have the
    source's shapes (finetune_keeps). Returns (state, {"experiment": its absolute path, "step": the
    step the parameters were saved at})."""
    exp, source_cfg = source
    abstract = build(dataclasses.replace(source_cfg, model=run_cfg.model))[4]
    try:
        restored, _, step = exp.restore(abstract, read_only=True)
    finally:
        exp.close()

    def fresh(params):
        return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), skipped=jnp.int32(0))

    return jax.block_until_ready(jax.jit(fresh)(restored.params)), {"experiment": str(exp.path.resolve()), "step": step}


def _load_data(cfg: TrainConfig, exp: Experiment, saved: TrainConfig | None, source=None):
    """(corpus, fingerprint, vocab); a continued run gets exactly the corpus and vocabulary it had, a run
    started from another experiment's parameters that experiment's vocabulary."""
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
    if saved:
        vocab = exp.read_vocab(saved.model.num_tokens)
    elif source:
        vocab = source[0].read_vocab(source[1].model.num_tokens)
    else:
        if cfg.data.tokenizer == "sentencepiece" and jax.process_index() == 0:
            print(f"tokenizer: learning {cfg.data.vocab_size:,} sentencepiece {cfg.data.sp_model_type} pieces from "
                  f"the train split", flush=True)
        vocab = tokenizers.build_vocab(cfg.data, corpus.train, cfg.seed)
    return corpus, recorded or data.fingerprint(corpus.path), vocab


def _resolve(cfg: TrainConfig, saved: TrainConfig | None, exp: Experiment, corpus, vocab,
             train_tokens: int | None = None) -> TrainConfig:
    """The settings as they will be saved, checked against the saved ones when continuing. `train_tokens`:
    the length of the training split in tokens (default its bytes), which epochs count in."""
    epochs = cfg.max_epochs
    if saved is not None and cfg.max_steps != saved.max_steps and cfg.max_epochs == saved.max_epochs:
        epochs = None  # --max-steps given now wins over the --max-epochs of the original command
    max_steps = cfg.max_steps
    if epochs is not None:
        n_train = len(corpus.train) if train_tokens is None else train_tokens
        max_steps = steps_for_epochs(epochs, n_train, cfg.model.seq_len, cfg.batch_size)
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
        # A resumed run's init_from is only the record of how it began.
        source = _finetune_source(cfg) if cfg.init_from is not None and not resuming else None
        corpus, fingerprint, vocab = _load_data(cfg, exp, saved, source)
        splits = _token_splits(cfg, corpus, vocab)
        run_cfg = _resolve(cfg, saved, exp, corpus, vocab, train_tokens=len(splits.train))
        parallel.check_batch(run_cfg.batch_size, run_cfg.grad_accum_steps)
        attention_implementation(run_cfg.model)  # a cudnn request that cannot run here is refused now
        model, tx, schedule, decayed, abstract = build(run_cfg)
        make_state = partial(init_state, model, tx, run_cfg)
        notes, init = [], None
        if resuming:
            # Only process 0 moves damaged or superseded checkpoints; the others just read.
            main = jax.process_index() == 0
            state, meta, _ = exp.restore(abstract, cfg.restore_step, read_only=not main)
            if cfg.restore_step is not None and main:
                exp.supersede_newer(cfg.restore_step)
            notes = _resume_notes(run_cfg, saved, state, meta)
        elif source:
            state, init = _init_from(source, run_cfg, tx)
            notes = [f"init: parameters from {source[0].path} step {init['step']} (step 0 here, fresh optimizer and "
                     f"schedule){_unknown_note(vocab, corpus)}"]
        else:
            # Wait on every leaf: reading one output (the step) of a computation whose other output could
            # not be allocated hangs forever on the CPU backend, while waiting on that output raises
            # RESOURCE_EXHAUSTED (jax 0.10).
            state = jax.block_until_ready(jax.jit(make_state)())
        start = int(state.step)
        if start >= run_cfg.max_steps:
            raise UserError(f"{exp.path} is at step {start}, and --max-steps is {run_cfg.max_steps}: nothing to "
                            f"train; pass a larger --max-steps to continue")
        return Run(run_cfg, exp, corpus, fingerprint, vocab, model, tx, schedule, decayed, state, start, saved, notes,
                   init=init, splits=splits)
    except BaseException:
        exp.lock.release(started=False)
        raise


def agree_across_processes(run: Run) -> None:
    """Every process must run the same settings on the same corpus from the same step (a mismatch would
    hang in the first all-reduce, or silently train a different model on each)."""
    # A tokenizer is learned by each process on its own: the same bytes and settings give the same one.
    tokenizer = run.vocab.sha256 if run.vocab.kind == "sentencepiece" else run.vocab.to_json()
    mine = {"config": config_lib.to_dict(run.cfg), "corpus_sha256": run.fingerprint["sha256"], "start": run.start,
            "tokenizer": tokenizer}
    for pid, payload in parallel.agree("settings", json.dumps(mine), run.cfg.distributed_timeout):
        theirs = json.loads(payload)
        diffs = [f"{path}: {a!r} here vs {b!r} on process {pid}" for path, a, b in config_lib.differences(
            run.cfg, config_lib.from_dict(TrainConfig, theirs["config"]))]
        diffs += [f"{k}: {mine[k]!r} here vs {theirs[k]!r} on process {pid}"
                  for k in ("corpus_sha256", "start", "tokenizer") if mine[k] != theirs[k]]
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
    for raw, ids in run.splits.to_cache if run.splits else ():
        exp.write_tokens(run.vocab, raw, ids)
    changed = {path: [a, b] for path, a, b in config_lib.differences(run.saved, cfg)} if run.saved else {}
    exp.write_config(cfg)
    exp.append_history({
        "event": "resume" if run.saved else "new", "time": f"{datetime.now():%Y-%m-%d %H:%M:%S}", "step": run.start,
        "host": socket.gethostname(), "pid": os.getpid(), "command": shlex.join(sys.argv),
        "devices": jax.device_count(), "processes": jax.process_count(), "changed": changed,
        **({"init_from": run.init} if run.init else {}), "config": config_lib.to_dict(cfg),
    })


def _attention_note(m) -> str:
    """Why the attention implementation is what it is, where that is not obvious."""
    if m.dropout:
        return " (training computes dropped-out weights itself: no fused kernel drops them)"
    if config_lib.position_scheme(m) in ("alibi", "t5") and m.attention == "auto" and jax.default_backend() == "gpu":
        return " (score bias: cuDNN's bias path is opt-in, --model.attention cudnn)"
    return ""


def announce(run: Run) -> None:
    cfg, n_dev, k, m = run.cfg, jax.device_count(), run.cfg.grad_accum_steps, run.cfg.model
    split = (f"{cfg.batch_size // n_dev} per device x {n_dev}" if k == 1 else
             f"{k} micro-batches of {cfg.batch_size // n_dev // k} per device x {n_dev} devices, accumulated")
    print(f"devices: {n_dev} x {jax.devices()[0].platform} ({jax.process_count()} process(es)); global batch "
          f"{cfg.batch_size} = {split}; {cfg.batch_size * m.seq_len:,} tokens/step")
    dtype, attention = compute_dtype(m).name, attention_implementation(m)
    print(f"model: {m.variant}, {param_count(run.state.params):,} parameters (dim {m.dim}, depth {m.depth}, heads "
          f"{m.heads}x{m.dim_head}, seq_len {m.seq_len}, {config_lib.position_scheme(m)} positions"
          f"{f', dropout {m.dropout}' if m.dropout else ''}); compute {dtype}{' (auto)' if m.dtype == 'auto' else ''}, "
          f"attention {attention}{_attention_note(m)}, remat {m.remat}; vocab {run.vocab.kind} ({run.vocab.size})")
    c = run.corpus
    print(f"data: {c.path}: train {len(c.train):,} / val {len(c.val):,} / test {len(c.test):,} bytes")
    if run.vocab.kind == "sentencepiece":
        v, train = run.vocab, run.splits.train
        learned = f" (learned in {v.info['train_seconds']} s from {v.info['trained_on_bytes']:,} bytes of whole lines)"
        print(f"tokenizer: sentencepiece {v.info.get('model_type', '')}, {v.size:,} pieces"
              f"{learned if 'train_seconds' in v.info else ''}; train split {len(train):,} tokens, "
              f"{len(c.train) / max(len(train), 1):.3f} bytes/token")
    print(f"weight decay on {len(run.decayed)} kernels: {', '.join(run.decayed)}")
    kept = not_decayed(run.state.params)
    print(f"no weight decay on {len(kept)} biases, norm scales, embeddings and position tables: {', '.join(kept)}")
    for note in run.notes:
        print(note)
    start_note = f"restored from step {run.start}" if run.saved else "new"
    print(f"experiment: {run.exp.path} ({start_note}); steps {run.start} -> {cfg.max_steps}")
