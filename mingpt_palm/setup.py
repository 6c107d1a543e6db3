"""Setting a run up: everything that can fail on bad input happens here, before anything is written.

start_mode() decides how this run starts (new, fine-tune, resume, or start over); prepare() opens (or
checks) the experiment, loads and checks the corpus, resolves the settings against a saved run, builds
the model and the (restored, fine-tuned from another experiment's parameters, or new) state;
agree_across_processes() makes the processes of a job compare their settings; record_new() writes a
new experiment's records before the first step, record_continued() a continued one's once its first
step has run; announce() says what is about to run.
"""
from __future__ import annotations

import dataclasses
import json
from fractions import Fraction
import os
import shutil
import shlex
import socket
import sys
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp

from mingpt_palm import config as config_lib
from mingpt_palm import checkpoints, data, parallel, tokenizers
from mingpt_palm.config import TrainConfig, UserError
from mingpt_palm.experiment import Experiment, warn
from mingpt_palm.model import PaLM, attention_implementation, compute_dtype, param_count
from mingpt_palm.optim import lr_schedule, not_decayed, resolved_warmup
from mingpt_palm.state import TrainState, build, init_state


def steps_for_epochs(epochs: float, train_tokens: int, seq_len: int, batch_size: int) -> int:
    """Optimizer steps for `epochs` passes: an epoch is train_tokens / seq_len windows of seq_len targets.

    In exact arithmetic on the number as written (1.1 is 11/10): float rounding would make 1.1 epochs of
    3,000 bytes at seq_len 10, batch 1, ceil(330.00000000000006) = 331 steps instead of 330."""
    windows = Fraction(repr(float(epochs))) * train_tokens / (seq_len * batch_size)
    return max(1, -(-windows.numerator // windows.denominator))


Mode = Literal["new", "finetune", "resume", "restart"]


def start_mode(cfg: TrainConfig) -> Mode:
    """How this run starts, decided here once. --restore-checkpoint means "continue if there is something
    to continue": the same command line starts an experiment and every restart of it (a scheduler's
    requeue). So with --restore-checkpoint, an experiment that does not exist yet is started (new, or
    fine-tuned with --init-from), and one that exists but has no complete checkpoint (killed before its
    first save) starts over from step 0 with its saved settings ("restart"). --restore-step N needs N."""
    resuming = cfg.restore_checkpoint or cfg.restore_step is not None
    if resuming and cfg.experiment_name is None:
        raise UserError("--restore-checkpoint needs --experiment-name (which experiment to continue)")
    if resuming:
        exp = Experiment(cfg.experiments_dir, cfg.experiment_name)
        if cfg.restore_step is not None or exp.path.exists():
            exp.check_existing()
            return "resume" if cfg.restore_step is not None or exp.checkpoint_steps() else "restart"
    return "finetune" if cfg.init_from is not None else "new"


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
    cfg: TrainConfig  # as it will be saved: name, max_steps, corpus path, vocabulary size, dtype, warmup resolved
    mode: Mode
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
    recorded: TrainConfig | None  # the settings of the continued run's last start (None for a new run)
    notes: list  # start-up lines particular to this start (resumes: what changed and what it means)
    stepped: bool = False  # a step has finished: from now on the directory is worth keeping
    init: dict | None = None  # --init-from: the experiment (absolute path) and step the parameters came from
    splits: TokenSplits | None = None  # what batches are cut from
    # Checkpoints a continued run moves out of the way when its first step has run: {"damaged": [steps],
    # "superseded": [steps]} (unreadable ones, and with --restore-step the newer ones).
    set_aside: dict = dataclasses.field(default_factory=dict)


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


def _open_experiment(cfg: TrainConfig, mode: Mode) -> Experiment:
    """Name, existence and (when continuing) the lock, before a single byte of the corpus is read."""
    name = cfg.experiment_name
    if name is None:
        if jax.process_count() > 1:  # each process would stamp its own time
            raise UserError("a multi-process run needs --experiment-name (the same on every process)")
        name = f"{Path(cfg.dataset_path).stem}_{datetime.now():%Y-%m-%d-%H%M%S}"
    exp = Experiment(cfg.experiments_dir, name, unique=cfg.experiment_name is None)
    if mode in ("resume", "restart"):
        if jax.process_index() == 0:
            # Before anything reads the checkpoints: a live run may be saving one right now.
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
    # The compute dtype and the attention kernel are the new run's to choose for its machine (auto).
    model = dataclasses.replace(source.model, dtype="auto", attention="auto")
    return TrainConfig(dataset_path=source.dataset_path, model=model, data=source.data)


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
    restored = checkpoints.restore(exp.checkpoint_dir, abstract, warn=warn)

    def fresh(params):
        return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), skipped=jnp.int32(0))

    state = jax.block_until_ready(jax.jit(fresh)(restored.state.params))
    return state, {"experiment": str(exp.path.resolve()), "step": restored.step}


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


def _resolved(cfg: TrainConfig) -> TrainConfig:
    """What `auto` means on this machine, written down: a run saved as "auto" would compute in bfloat16
    when continued on a GPU after starting on a CPU. The attention kernel stays auto (how, not what)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=compute_dtype(cfg.model).name))


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
    out = _resolved(dataclasses.replace(
        cfg, experiment_name=exp.name, max_steps=max_steps, max_epochs=epochs, dataset_path=dataset,
        restore_checkpoint=False, restore_step=None, model=dataclasses.replace(cfg.model, num_tokens=vocab.size),
        optim=dataclasses.replace(cfg.optim, warmup_steps=resolved_warmup(cfg.optim, max_steps))))
    if saved is not None:
        saved = _resolved(saved)  # an experiment saved before dtypes were resolved: what auto means here
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


def _restart_note(exp: Experiment) -> str:
    incomplete = checkpoints.incomplete(exp.checkpoint_dir)
    cut = f" (its save of {incomplete[0].split('.')[0]} was cut short)" if incomplete else ""
    kept = ("nothing to keep but its TensorBoard logs, which this run replaces"
            if exp.tb_dir.is_dir() and any(exp.tb_dir.iterdir()) else "nothing to keep")
    return (f"restart: {exp.path} has no complete checkpoint yet{cut}: starting it over from step 0 with its saved "
            f"settings (the earlier attempt had {kept})")


def _warmup_note(cfg: TrainConfig) -> list[str]:
    w = cfg.optim.warmup_steps
    if w <= cfg.max_steps:
        return []
    last = float(lr_schedule(cfg.optim, cfg.max_steps)(cfg.max_steps - 1))
    return [f"schedule: the warmup ({w:,} steps) is longer than the run ({cfg.max_steps:,} steps): the learning rate "
            f"rises to {last:.3g} and never reaches its peak {cfg.optim.learning_rate:g}"]


def prepare(cfg: TrainConfig) -> Run:
    """Check and build everything a run needs. Writes nothing: a continued run takes its lock, and what it
    must move aside (damaged checkpoints, or those newer than --restore-step) moves only once its first
    step has run (record_continued), so that a refused or failed start leaves the experiment as it was."""
    mode = start_mode(cfg)
    exp = _open_experiment(cfg, mode)
    try:
        continued = mode in ("resume", "restart")
        saved = exp.read_config() if continued else None
        # The base that history.jsonl's "changed" is counted from: config.json may have been edited since.
        recorded = (exp.started_config() or saved) if continued else None
        source = _finetune_source(cfg) if mode == "finetune" else None
        corpus, fingerprint, vocab = _load_data(cfg, exp, saved, source)
        splits = _token_splits(cfg, corpus, vocab)
        run_cfg = _resolve(cfg, saved, exp, corpus, vocab, train_tokens=len(splits.train))
        parallel.check_batch(run_cfg.batch_size, run_cfg.grad_accum_steps)
        attention_implementation(run_cfg.model)  # a cudnn request that cannot run here is refused now
        model, tx, schedule, decayed, abstract = build(run_cfg)
        notes, init, set_aside = _warmup_note(run_cfg), None, {}
        if mode == "resume":
            restored = checkpoints.restore(exp.checkpoint_dir, abstract, cfg.restore_step, warn=warn)
            state = restored.state
            set_aside = {"damaged": list(restored.damaged),
                         "superseded": [s for s in exp.checkpoint_steps() if s > restored.step
                                        and s not in restored.damaged]}
            notes += _resume_notes(run_cfg, recorded, state, restored.meta)
        elif mode == "finetune":
            state, init = _init_from(source, run_cfg, tx)
            notes.append(f"init: parameters from {source[0].path} step {init['step']} (step 0 here, fresh optimizer "
                         f"and schedule){_unknown_note(vocab, corpus)}")
        else:
            # Wait on every leaf: reading one output (the step) of a computation whose other output could
            # not be allocated hangs forever on the CPU backend, while waiting on that output raises
            # RESOURCE_EXHAUSTED (jax 0.10).
            state = jax.block_until_ready(jax.jit(partial(init_state, model, tx, run_cfg))())
            if mode == "restart":
                notes.append(_restart_note(exp))
        start = int(state.step)
        if start >= run_cfg.max_steps:
            raise UserError(f"{exp.path} is at step {start}, and --max-steps is {run_cfg.max_steps}: nothing to "
                            f"train; pass a larger --max-steps to continue")
        return Run(run_cfg, mode, exp, corpus, fingerprint, vocab, model, tx, schedule, decayed, state, start,
                   recorded, notes, init=init, splits=splits, set_aside=set_aside)
    except BaseException:
        exp.lock.release(started=False)
        raise


def agree_across_processes(run: Run) -> None:
    """Every process must run the same settings on the same corpus from the same step (a mismatch would
    hang in the first all-reduce, or silently train a different model on each)."""
    # A tokenizer is learned by each process on its own: the same bytes and settings give the same one.
    tokenizer = run.vocab.sha256 if run.vocab.kind == "sentencepiece" else run.vocab.to_json()
    mine = {"config": config_lib.to_dict(run.cfg), "corpus_sha256": run.fingerprint["sha256"], "start": run.start,
            "tokenizer": tokenizer, "mode": run.mode}
    for pid, payload in parallel.agree("settings", json.dumps(mine), run.cfg.distributed_timeout):
        theirs = json.loads(payload)
        diffs = [f"{path}: {a!r} here vs {b!r} on process {pid}" for path, a, b in config_lib.differences(
            run.cfg, config_lib.from_dict(TrainConfig, theirs["config"]))]
        diffs += [f"{k}: {mine[k]!r} here vs {theirs[k]!r} on process {pid}"
                  for k in ("corpus_sha256", "start", "tokenizer", "mode") if mine[k] != theirs[k]]
        if diffs:
            raise UserError(f"process {jax.process_index()} and process {pid} were started with different settings "
                            f"({'; '.join(diffs[:6])}); start every process with the same arguments")


def _history(run: Run, event: str, **extra) -> dict:
    cfg = run.cfg
    # What the run computes or how it is run; not how it is displayed (--no-progress applies to one run).
    changed = {path: [a, b] for path, a, b in config_lib.differences(run.recorded, cfg) if path != "progress"} \
        if run.recorded else {}
    return {"event": event, "time": f"{datetime.now():%Y-%m-%d %H:%M:%S}", "step": run.start,
            "host": socket.gethostname(), "pid": os.getpid(), "command": shlex.join(sys.argv),
            "devices": jax.device_count(), "processes": jax.process_count(), "changed": changed, **extra,
            "config": config_lib.to_dict(cfg)}


def record_new(run: Run) -> None:
    """Process 0, before the first step of a new experiment: its directory and records. A run that fails
    before its first step removes the directory again (train.py), so that the same command can rerun."""
    exp = run.exp
    exp.create(shlex.join(sys.argv))
    run.cfg = dataclasses.replace(run.cfg, experiment_name=exp.name)  # a default name may have moved on
    exp.write_corpus(run.fingerprint)
    exp.write_vocab(run.vocab)
    _write_token_cache(run)
    exp.write_config(run.cfg)
    exp.append_history(_history(run, "new", **({"init_from": run.init} if run.init else {})))


def record_continued(run: Run) -> None:
    """Process 0, once the first step of a resumed or restarted run has run: only now does the run change
    its experiment (moves checkpoints aside, replaces the logs of an attempt that is started over, and
    writes config.json and a history record), so that a refused or failed start leaves it as it was."""
    exp = run.exp
    moved = exp.set_aside(run.set_aside.get("damaged", []), run.set_aside.get("superseded", []))
    if run.mode == "restart":
        shutil.rmtree(exp.tb_dir, ignore_errors=True)
    _write_token_cache(run)
    exp.write_config(run.cfg)
    exp.append_history(_history(run, run.mode, **({"moved": moved} if moved else {})))


def _write_token_cache(run: Run) -> None:
    for raw, ids in run.splits.to_cache if run.splits else ():
        run.exp.write_tokens(run.vocab, raw, ids)


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
    start_note = {"new": "new", "finetune": "new", "restart": "started over"}.get(run.mode, f"restored from step {run.start}")
    print(f"experiment: {run.exp.path} ({start_note}); steps {run.start} -> {cfg.max_steps}")
