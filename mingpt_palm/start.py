"""How a run starts, decided once (nanoGPT's `init_from`): new, fine-tune, resume, or restart.

`mode` decides; `defaults` gives the command line the defaults of that mode; `begin` builds everything
the run needs with one function per mode and returns a frozen `Run` of concrete objects (corpus,
vocabulary, splits, model and optimizer, state, notes): below this module nothing asks which mode it is
in. Everything that can fail on bad input fails here, before anything is written (records.py writes).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from mingpt_palm import checkpoints, data, fsdp, memory, parallel, settings
from mingpt_palm import vocab as vocab_lib
from mingpt_palm.config import ModelConfig, TrainConfig
from mingpt_palm.errors import UserError
from mingpt_palm.experiment import Experiment
from mingpt_palm.logs import is_main, warn
from mingpt_palm.model import attention_implementation
from mingpt_palm.optim import lr_schedule
from mingpt_palm.presets import PRESETS
from mingpt_palm.state import Built, TrainState, build, init_state

Mode = Literal["new", "finetune", "resume", "restart"]


def mode(cfg: TrainConfig) -> Mode:
    """--restore-checkpoint means "continue if there is something to continue": the same command line starts
    an experiment and every restart of it (a scheduler's requeue). So with it, an experiment that does not
    exist yet is started (new, or fine-tuned with --init-from), and one that exists but has no complete
    checkpoint (killed before its first save) starts over from step 0 with its saved settings ("restart").
    --restore-step N needs checkpoint N."""
    resuming = cfg.restore_checkpoint or cfg.restore_step is not None
    if resuming and cfg.experiment_name is None:
        raise UserError("--restore-checkpoint needs --experiment-name (which experiment to continue)")
    if resuming:
        exp = Experiment(cfg.experiments_dir, cfg.experiment_name)
        if cfg.restore_step is not None or exp.path.exists():
            exp.check_existing()
            return "resume" if cfg.restore_step is not None or exp.checkpoint_steps() else "restart"
    return "finetune" if cfg.init_from is not None else "new"


def defaults(cfg: TrainConfig, mode_: Mode) -> TrainConfig | None:
    """The command line's defaults in this mode (None: the built-in ones). A continued run: its saved
    settings, but display flags (--no-progress) belong to the run given them. --init-from X: X's model,
    vocabulary and corpus, the dtype and attention kernel left to this machine (auto). --preset: its model."""
    if mode_ in ("resume", "restart"):
        saved = Experiment(cfg.experiments_dir, cfg.experiment_name).read_config()
        return dataclasses.replace(saved, progress=TrainConfig.progress)
    if mode_ == "finetune":
        source = source_experiment(cfg).read_config()
        model = dataclasses.replace(source.model, dtype="auto", attention="auto")
        return TrainConfig(dataset_path=source.dataset_path, model=model, data=source.data)
    if cfg.preset is not None:
        return TrainConfig(model=ModelConfig(**PRESETS[cfg.preset].model))
    return None


def check_preset(name: str, asked: ModelConfig, saved: ModelConfig) -> None:
    """A command that starts an experiment from a preset also continues it, as long as the model it describes
    (`asked`: the preset with the command's flags) is the one the experiment has."""
    keys = [k for k in PRESETS[name].model if k != "num_tokens"]  # a run sets num_tokens from its corpus
    diffs = [f"model.{k} {getattr(asked, k)!r} (saved: {getattr(saved, k)!r})" for k in keys
             if getattr(asked, k) != getattr(saved, k)]
    if diffs:
        raise UserError(f"--preset {name} describes another model than the experiment was started with "
                        f"({'; '.join(diffs[:6])}); leave out --preset to continue it with its own, or start a new "
                        "experiment")


def source_experiment(cfg: TrainConfig) -> Experiment:
    """The experiment --init-from names (experiments/X, or a bare name under --experiments-dir), with a checkpoint."""
    path = Path(cfg.init_from)
    try:
        exp = Experiment(path.parent if len(path.parts) > 1 else Path(cfg.experiments_dir), path.name)
        exp.check_existing()
    except UserError as e:
        raise UserError(f"--init-from {cfg.init_from}: {e}") from None
    if not exp.checkpoint_steps():
        raise UserError(f"--init-from {cfg.init_from}: {exp.checkpoint_dir} holds no checkpoint to take parameters "
                        "from; train it first, or start from another experiment")
    return exp


@dataclasses.dataclass(frozen=True)
class Splits:
    """What batches are cut from (bytes for byte and char ids, token ids for sentencepiece), and the splits
    this start had to encode, which the records keep in tokens/."""

    train: np.ndarray
    val: np.ndarray | None
    to_cache: tuple = ()  # ((bytes, ids), ...)


@dataclasses.dataclass(frozen=True)
class Run:
    cfg: TrainConfig  # as saved: name, max_steps, corpus path, vocabulary size, dtype and warmup resolved
    mode: Mode
    exp: Experiment
    corpus: data.Corpus
    fingerprint: dict
    vocab: Any
    splits: Splits
    built: Built
    layout: Any  # how the state lies on the devices (--parallel): parallel.Replicated or fsdp.Sharded
    state: TrainState  # as the layout holds it before the loop places it: restored, taken from another experiment, or new
    recorded: TrainConfig | None  # the settings of the continued run's last start (None for a new run)
    notes: tuple = ()  # start-up lines particular to this start
    init: dict | None = None  # --init-from: the experiment (absolute path) and step the parameters came from
    set_aside: dict = dataclasses.field(default_factory=dict)  # {"damaged": [steps], "superseded": [steps]}

    @property
    def start(self) -> int:
        return int(self.state.step.addressable_data(0))  # a scalar every device of the layout holds alike


def begin(cfg: TrainConfig) -> Run:
    """Check and build everything the run needs, in its mode. Writes nothing: a continued run takes its
    lock, and what it must move aside moves only once its first step has run (record_continued)."""
    mode_ = mode(cfg)
    exp = _open_experiment(cfg, mode_)
    try:
        run = {"new": _new, "finetune": _finetune, "resume": _resume, "restart": _restart}[mode_](cfg, exp)
    except BaseException:
        exp.lock.release()
        raise
    if run.start >= run.cfg.max_steps:
        exp.lock.release()
        raise UserError(f"{exp.path} is at step {run.start}, and --max-steps is {run.cfg.max_steps}: nothing to train; "
                        "pass a larger --max-steps to continue")
    memory_note = memory.fits_note(run.cfg, run.built.abstract, jax.device_count())
    return dataclasses.replace(run, notes=(*_warmup_note(run.cfg), *memory_note, *run.notes))


def _open_experiment(cfg: TrainConfig, mode_: Mode) -> Experiment:
    """Name, existence and (when continuing) the lock, before a single byte of the corpus is read."""
    name = cfg.experiment_name
    if name is None:
        if jax.process_count() > 1:  # each process would stamp its own time
            raise UserError("a multi-process run needs --experiment-name (the same on every process)")
        name = f"{Path(cfg.dataset_path).stem}_{datetime.now():%Y-%m-%d-%H%M%S}"
    exp = Experiment(cfg.experiments_dir, name, unique=cfg.experiment_name is None)
    if mode_ in ("resume", "restart") and is_main():
        exp.lock.acquire()  # before anything reads the checkpoints: a live run may be saving one right now
    elif mode_ in ("new", "finetune") and cfg.experiment_name is not None:
        exp.check_new()
    return exp


# --- one function per mode ------------------------------------------------------------------------

def _new(cfg: TrainConfig, exp: Experiment) -> Run:
    corpus, fingerprint = _corpus(cfg, exp, None)
    if cfg.data.tokenizer == "sentencepiece" and is_main():
        print(f"tokenizer: learning {cfg.data.vocab_size:,} sentencepiece {cfg.data.sp_model_type} pieces from the "
              "train split", flush=True)
    vocab = vocab_lib.build(cfg.data, corpus.train, cfg.seed)
    run_cfg, splits, built, layout = _settle(cfg, exp, None, corpus, vocab)
    return Run(run_cfg, "new", exp, corpus, fingerprint, vocab, splits, built, layout,
               _initialise(built, layout, run_cfg), None)


def _finetune(cfg: TrainConfig, exp: Experiment) -> Run:
    """A new experiment from the newest parameters of another, at step 0 with a fresh optimizer."""
    source_exp = source_experiment(cfg)
    source = source_exp.read_config()
    refused = settings.differences(source, cfg, settings.finetune_keeps)
    if refused:
        listing = ", ".join(f"--{path.replace('_', '-')} {b!r} (it has {a!r})" for path, a, b in refused)
        raise UserError(f"--init-from {cfg.init_from}: {listing}: a run started from {source_exp.path}'s parameters "
                        "keeps its architecture and vocabulary (of the model only dropout, z-loss, dtype, attention "
                        "and remat may differ); leave those flags out")
    corpus, fingerprint = _corpus(cfg, exp, None)
    vocab = source_exp.read_vocab(source.model.num_tokens)
    run_cfg, splits, built, layout = _settle(cfg, exp, None, corpus, vocab)
    # Read whole: the source's optimizer decides its state's layout (dropped); its parameters have our shapes.
    source_state = build(dataclasses.replace(source, model=run_cfg.model)).abstract
    restored = checkpoints.restore(source_exp.checkpoint_dir, layout.restore_target(source_state), warn=warn)
    fresh = layout.init(lambda p: TrainState(step=jnp.int32(0), params=p, opt_state=built.tx.init(p),
                                             skipped=jnp.int32(0)), restored.state.params)
    init = {"experiment": str(source_exp.path.resolve()), "step": restored.step}
    note = (f"init: parameters from {source_exp.path} step {restored.step} (step 0 here, fresh optimizer and "
            f"schedule){_unknown_note(vocab, corpus)}")
    return Run(run_cfg, "finetune", exp, corpus, fingerprint, vocab, splits, built, layout,
               jax.block_until_ready(fresh), None, (note,), init=init)


def _resume(cfg: TrainConfig, exp: Experiment) -> Run:
    saved, recorded = _saved(exp)
    corpus, fingerprint = _corpus(cfg, exp, exp.read_corpus())
    vocab = exp.read_vocab(saved.model.num_tokens)
    run_cfg, splits, built, layout = _settle(cfg, exp, saved, corpus, vocab)
    restored = checkpoints.restore(exp.checkpoint_dir, layout.restore_target(built.abstract), cfg.restore_step,
                                   warn=warn)
    newer = [s for s in exp.checkpoint_steps() if s > restored.step and s not in restored.damaged]
    notes = _resume_notes(run_cfg, recorded, restored.state, restored.meta)
    return Run(run_cfg, "resume", exp, corpus, fingerprint, vocab, splits, built, layout, restored.state, recorded,
               tuple(notes), set_aside={"damaged": list(restored.damaged), "superseded": newer})


def _restart(cfg: TrainConfig, exp: Experiment) -> Run:
    """No complete checkpoint yet (killed before its first save): from step 0 with the saved settings."""
    saved, recorded = _saved(exp)
    corpus, fingerprint = _corpus(cfg, exp, exp.read_corpus())
    vocab = exp.read_vocab(saved.model.num_tokens)
    run_cfg, splits, built, layout = _settle(cfg, exp, saved, corpus, vocab)
    incomplete = checkpoints.incomplete(exp.checkpoint_dir)
    cut = f" (its save of {incomplete[0].split('.')[0]} was cut short)" if incomplete else ""
    kept = ("nothing to keep but its TensorBoard logs, which this run replaces"
            if exp.tb_dir.is_dir() and any(exp.tb_dir.iterdir()) else "nothing to keep")
    note = (f"restart: {exp.path} has no complete checkpoint yet{cut}: starting it over from step 0 with its saved "
            f"settings (the earlier attempt had {kept})")
    return Run(run_cfg, "restart", exp, corpus, fingerprint, vocab, splits, built, layout,
               _initialise(built, layout, run_cfg), recorded, (note,))


# --- what the modes share --------------------------------------------------------------------------

def _saved(exp: Experiment) -> tuple[TrainConfig, TrainConfig]:
    """(config.json, the settings of the last start): history.jsonl's "changed" counts from the second, since
    config.json may have been edited in what a run may change."""
    saved = exp.read_config()
    return saved, exp.started_config() or saved


def _corpus(cfg: TrainConfig, exp: Experiment, expect: dict | None):
    """(corpus, fingerprint); a continued run's corpus is checked against the one it was trained on."""
    corpus = data.load_corpus(cfg.dataset_path, cfg.data, progress=cfg.progress and is_main(), expect=expect,
                              owner=str(exp.path))
    return corpus, expect or data.fingerprint(corpus.path)


def _settle(cfg: TrainConfig, exp: Experiment, saved: TrainConfig | None, corpus, vocab):
    """(the settings as this run saves them, the splits batches are cut from, the model and optimizer, the
    layout of its state on the devices)."""
    fractions = "" if corpus.registered and corpus.registered.split_bytes else (
        f", smaller --data.val-fraction/--data.test-fraction (now {cfg.data.val_fraction} + {cfg.data.test_fraction} "
        "of the file)")
    streams, to_cache = {}, []
    for name in ("train", "val") if cfg.eval_interval else ("train",):
        raw = corpus.split(name)
        hint = (f"use a smaller --block-size{fractions} or a bigger corpus" if name == "train" else
                f"use a smaller --block-size{', a larger --data.val-fraction' if fractions else ''}, --eval-interval 0, "
                "or a bigger corpus")
        data.require_windows(raw, name, cfg.model.seq_len, corpus.path, hint)
        streams[name], fresh = vocab.stream(raw, name)
        to_cache += [(raw, streams[name])] if fresh else []
        data.require_windows(streams[name], name, cfg.model.seq_len, corpus.path, "use a smaller --block-size, "
                             "a smaller --data.vocab-size or a bigger corpus", unit="tokens")
    run_cfg = settings.resolve(
        cfg, saved, name=exp.name, dataset=cfg.dataset_path if corpus.registered else str(corpus.path.resolve()),
        vocab_size=vocab.size, train_tokens=len(streams["train"]), by_content=saved is not None, where=str(exp.path))
    parallel.check_batch(run_cfg.batch_size, run_cfg.grad_accum_steps)
    attention_implementation(run_cfg.model)  # a cudnn request that cannot run here is refused now
    built = build(run_cfg)
    memory.check_fits(run_cfg, built.abstract, jax.device_count())  # one line now, not an OOM after compiling
    return run_cfg, Splits(streams["train"], streams.get("val"), tuple(to_cache)), built, fsdp.layout(run_cfg,
                                                                                              built.abstract)


def _initialise(built: Built, layout, cfg: TrainConfig) -> TrainState:
    # Wait on every leaf: reading one output (the step) of a computation whose other output could not be
    # allocated hangs forever on the CPU backend, while waiting on that output raises RESOURCE_EXHAUSTED.
    return jax.block_until_ready(layout.init(partial(init_state, built.model, built.tx, cfg)))


def _unknown_note(vocab, corpus) -> str:
    """How many bytes of the corpus a vocabulary taken from another experiment cannot represent."""
    whole = corpus.split("train"), corpus.split("val"), corpus.split("test")
    total = sum(len(part) for part in whole)
    # In chunks: encoding a 100 MB memmap at once would make a 400 MB int32 copy.
    unknown = sum(vocab.unknown_count(part[i : i + (1 << 24)]) for part in whole for i in range(0, len(part), 1 << 24))
    return (f"; vocabulary {vocab.kind} ({vocab.size} ids) from there: {unknown:,} of this corpus's {total:,} bytes "
            f"({100 * unknown / max(total, 1):.2f}%) are outside it and become the unknown id")


def _resume_notes(cfg: TrainConfig, recorded: TrainConfig, state, meta: dict) -> list[str]:
    notes, start, applied = [], int(state.step), int(state.step) - int(state.skipped)
    if cfg.max_steps != recorded.max_steps:
        before = float(lr_schedule(recorded.optim, recorded.max_steps)(applied))
        after = float(lr_schedule(cfg.optim, cfg.max_steps)(applied))
        notes.append(f"schedule: re-planned from step {start} for {cfg.max_steps:,} steps instead of "
                     f"{recorded.max_steps:,}; learning rate of the next step {before:.4g} -> {after:.4g}")
    if recorded.dataset_path != cfg.dataset_path:
        notes.append(f"corpus: {cfg.dataset_path} (moved from {recorded.dataset_path}; same size and sha256)")
    then, now = (meta.get("devices"), meta.get("parallel", "dp")), (jax.device_count(), cfg.parallel)
    if then[0] is not None and then != now:
        notes.append(f"devices: {now[0]} under --parallel {now[1]} now, {then[0]} under {then[1]} when step {start} was "
                     "saved: the data order is unchanged (a batch depends only on seed and step), but gradients are "
                     "summed in another order, so numbers agree with an uninterrupted run to float rounding, not bit "
                     "for bit")
    return notes


def _warmup_note(cfg: TrainConfig) -> tuple[str, ...]:
    if cfg.optim.warmup_steps <= cfg.max_steps:
        return ()
    last = float(lr_schedule(cfg.optim, cfg.max_steps)(cfg.max_steps - 1))
    return (f"schedule: the warmup ({cfg.optim.warmup_steps:,} steps) is longer than the run ({cfg.max_steps:,} "
            f"steps): the learning rate rises to {last:.3g} and never reaches its peak {cfg.optim.learning_rate:g}",)
