"""A run's settings as saved, compared and resolved. If this is your first read through, skip this file.

Which settings define what a run computes (a continued run must keep them), which only say how it
computes them, which a fine-tuning run may set differently from its source; the JSON form of a
TrainConfig, type-checked field by field, with a format number; and the values a run writes down at
its start (its step count from --max-epochs, what `auto` dtypes resolve to, its warmup).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from fractions import Fraction
from typing import Annotated, Any, Literal

from mingpt_palm.config import EvalConfig, ModelConfig, TrainConfig, flatten, position_scheme
from mingpt_palm.errors import UserError
from mingpt_palm.model import compute_dtype
from mingpt_palm.optim import resolved_warmup

FORMAT = 1  # of config.json and of the configs in history.jsonl; another one is refused, never guessed at

# The settings that define what a run computes. A continued run must keep them (each change is refused,
# naming the field). Everything else (step counts, intervals, logging, where files live) may change.
RUN_DEFINING = ("dataset_path", "seed", "batch_size", "model", "optim", "data.tokenizer", "data.vocab_size",
                "data.sp_model_type", "data.sp_train_bytes", "data.val_fraction", "data.test_fraction")
# Inside `model`, how the same numbers are computed rather than which: a resume may change them (on another
# machine, say), as it may change grad_accum_steps. Not the dtype: bfloat16 computes other numbers.
HOW_NOT_WHAT = ("model.attention", "model.remat")
# What a run started with --init-from may set differently from its source: how it trains on the parameters,
# not what they mean. The rest of the model and of the vocabulary must be the source's.
FINETUNE_MAY_CHANGE = HOW_NOT_WHAT + ("model.dropout", "model.z_loss", "model.dtype", "model.num_tokens",
                                      "data.val_fraction", "data.test_fraction", "data.datasets_dir")


def is_run_defining(path: str) -> bool:
    return path not in HOW_NOT_WHAT and any(path == p or path.startswith(p + ".") for p in RUN_DEFINING)


def finetune_keeps(path: str) -> bool:
    """The fields a fine-tuning run takes unchanged from its source (num_tokens is set by the vocabulary,
    which is the source's)."""
    return path.startswith(("model.", "data.")) and path not in FINETUNE_MAY_CHANGE


def differences(saved, given, keep=lambda path: True) -> list[tuple[str, Any, Any]]:
    """(path, saved value, given value) for every leaf field that differs and that `keep` selects."""
    a, b = flatten(saved), flatten(given)
    return [(k, a[k], b[k]) for k in a if keep(k) and a[k] != b[k]]


# --- what values may be --------------------------------------------------------------------------

SEED_LIMIT = 2**32  # jax.random.PRNGKey keeps only the low 32 bits: larger seeds would collide
STEP_LIMIT = 2**31 - 1  # the train state's step counter is int32


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _flag(path: str) -> str:
    return "--" + path.replace("_", "-")


def require_finite(cfg) -> None:
    """inf and nan pass every `x > 0` style check that they fail silently later: refuse them first."""
    for path, value in flatten(cfg).items():
        if isinstance(value, float):
            _require(math.isfinite(value), f"{_flag(path)} {value} must be a finite number")


def validate_model(m: ModelConfig) -> None:
    for name in ("seq_len", "dim", "depth", "heads", "dim_head", "ff_mult"):
        _require(getattr(m, name) >= 1, f"--model.{name.replace('_', '-')} {getattr(m, name)} must be >= 1")
    if position_scheme(m) == "rotary":
        _require(m.dim_head % 2 == 0, f"--model.dim-head {m.dim_head} must be even (rotary embeddings rotate pairs)")
    if position_scheme(m) == "sinusoidal":
        _require(m.dim % 2 == 0, f"--model.dim {m.dim} must be even (sinusoidal positions pair sines and cosines)")
    _require(0 <= m.dropout < 1, f"--model.dropout {m.dropout} must be in [0, 1)")
    _require(m.z_loss >= 0, f"--model.z-loss {m.z_loss} must be >= 0")


def validate_train(cfg: TrainConfig) -> None:
    """Reject nonsensical numbers before anything touches the disk."""
    require_finite(cfg)
    validate_model(cfg.model)
    o = cfg.optim
    # Adam moves every weight by about the learning rate per step: above 1 a single step rewrites the model.
    _require(0 < o.learning_rate <= 1, f"--optim.learning-rate {o.learning_rate} must be in (0, 1]")
    _require(0 <= o.min_lr_ratio <= 1, f"--optim.min-lr-ratio {o.min_lr_ratio} must be in [0, 1]")
    _require(o.warmup_steps is None or o.warmup_steps >= 0, f"--optim.warmup-steps {o.warmup_steps} must be >= 0")
    _require(o.weight_decay >= 0, f"--optim.weight-decay {o.weight_decay} must be >= 0")
    _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"--optim.b1/--optim.b2 ({o.b1}, {o.b2}) must be in [0, 1)")
    _require(o.eps > 0, f"--optim.eps {o.eps} must be > 0")
    _require(o.grad_clip >= 0, f"--optim.grad-clip {o.grad_clip} must be >= 0 (0 disables clipping)")
    d = cfg.data
    for name in ("val_fraction", "test_fraction"):
        _require(0 <= getattr(d, name) < 1, f"--data.{name.replace('_', '-')} {getattr(d, name)} must be in [0, 1)")
    _require(d.val_fraction + d.test_fraction < 1,
             f"--data.val-fraction {d.val_fraction} + --data.test-fraction {d.test_fraction} leave no training "
             "data; lower them so that they add up to less than 1")
    if d.tokenizer == "sentencepiece":
        _require(d.vocab_size > 257, f"--data.vocab-size {d.vocab_size} must be more than 257 (the 256 byte pieces "
                                     "and the unknown id are among the pieces)")
        _require(d.sp_train_bytes >= 1, f"--data.sp-train-bytes {d.sp_train_bytes} must be >= 1")
    _require(0 <= cfg.seed < SEED_LIMIT, f"--seed {cfg.seed} must be in [0, 2**32)")
    _require(cfg.batch_size >= 1, f"--batch-size {cfg.batch_size} must be >= 1")
    _require(1 <= cfg.max_steps <= STEP_LIMIT, f"--max-steps {cfg.max_steps} must be in [1, 2**31 - 1]")
    _require(cfg.max_epochs is None or cfg.max_epochs > 0, f"--max-epochs {cfg.max_epochs} must be > 0")
    _require(cfg.restore_step is None or cfg.restore_step >= 1, f"--restore-step {cfg.restore_step} must be >= 1")
    _require(cfg.init_from is None or cfg.init_from.strip() != "", "--init-from needs the path of an experiment, "
             "e.g. experiments/X")
    for name in ("log_interval", "checkpoint_interval", "keep_checkpoints", "max_nonfinite_steps",
                 "distributed_timeout", "peer_timeout", "grad_accum_steps"):
        _require(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 1")
    for name in ("eval_interval", "sample_length"):
        _require(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 0")
    _require(cfg.eval_batches >= 1, f"--eval-batches {cfg.eval_batches} must be >= 1")
    _require(cfg.plan_devices is None or cfg.plan_devices >= 1, f"--plan-devices {cfg.plan_devices} must be >= 1")
    _require(cfg.device_memory_gb is None or cfg.device_memory_gb > 0,
             f"--device-memory-gb {cfg.device_memory_gb} must be > 0")


def validate_eval(cfg: EvalConfig) -> None:
    """The checks that need no experiment; the vocabulary-dependent ones are in sampling."""
    require_finite(cfg)
    _require(cfg.batch_size >= 1, f"--batch-size {cfg.batch_size} must be >= 1")
    _require(cfg.checkpoint_step is None or cfg.checkpoint_step >= 1,
             f"--checkpoint-step {cfg.checkpoint_step} must be >= 1")
    _require(0 <= cfg.seed < SEED_LIMIT, f"--seed {cfg.seed} must be in [0, 2**32)")
    _require(cfg.seed + cfg.num_samples - 1 < SEED_LIMIT,
             f"--seed {cfg.seed} + --num-samples {cfg.num_samples} - 1 must be below 2**32: sample i is drawn with "
             f"seed --seed + i - 1; use --seed {SEED_LIMIT - cfg.num_samples} or less")
    _require(cfg.prompt is None or cfg.prompt_file is None, "give either --prompt or --prompt-file, not both")
    for flag, value in (("--eval-seq-len", cfg.eval_seq_len), ("--stride", cfg.stride)):
        _require(value is None or value >= 1, f"{flag} {value} must be >= 1")


# --- the JSON form --------------------------------------------------------------------------------

def to_json(cfg: TrainConfig) -> dict:
    return {"format": FORMAT, **dataclasses.asdict(cfg)}


class OtherFormat(ValueError):
    """A config written by another build of the project: refused, never half read."""


def from_json(d) -> TrainConfig:
    """A TrainConfig from `to_json` output, every value type-checked. ValueError naming every problem, so
    that a damaged file is reported as such, never as something else downstream; a file of another format
    (an earlier build's) says so. A setting that does not define the run may be absent (one added later):
    it takes its default."""
    if isinstance(d, dict) and d.get("format") != FORMAT:
        raise OtherFormat(f"it is format {d.get('format')!r}, written by another build of mingpt-palm; this one "
                          f"reads format {FORMAT}")
    return _from_dict(TrainConfig, d)


def _base_type(hint):
    while typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def _type_ok(value, hint) -> bool:
    hint = _base_type(hint)
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:  # JSON writes 1.0 as 1.0, but a hand-edited file may say 1
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _from_dict(cls, d, prefix: str = ""):
    if not isinstance(d, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'the file'} is {type(d).__name__}, expected an object")
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs, problems = {}, []
    for f in dataclasses.fields(cls):
        path, hint = prefix + f.name, _base_type(hints[f.name])
        if f.name not in d:
            # What defines the run must be there; anything else takes its default (a setting added later).
            if any(is_run_defining(p) for p in ([path] if not dataclasses.is_dataclass(hint) else
                                                  flatten(hint(), path + "."))):
                problems.append(f"lacks {path}")
        elif dataclasses.is_dataclass(hint):
            try:
                kwargs[f.name] = _from_dict(hint, d[f.name], path + ".")
            except ValueError as e:
                problems.append(str(e))
        elif _type_ok(d[f.name], hint):
            kwargs[f.name] = float(d[f.name]) if hint is float else d[f.name]
        else:
            expected = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            problems.append(f"{path} is {d[f.name]!r} (expected {expected})")
    if problems:
        raise ValueError("; ".join(problems))
    return cls(**kwargs)


# --- what a run writes down when it starts --------------------------------------------------------

def steps_for_epochs(epochs: float, train_tokens: int, seq_len: int, batch_size: int) -> int:
    """Optimizer steps for `epochs` passes: an epoch is train_tokens / seq_len windows of seq_len targets.

    In exact arithmetic on the number as written (1.1 is 11/10): float rounding would make 1.1 epochs of
    3,000 bytes at seq_len 10, batch 1, ceil(330.00000000000006) = 331 steps instead of 330."""
    windows = Fraction(repr(float(epochs))) * train_tokens / (seq_len * batch_size)
    return max(1, -(-windows.numerator // windows.denominator))


def resolved(cfg: TrainConfig) -> TrainConfig:
    """What `auto` means on this machine, written down: a run saved as "auto" would compute in bfloat16
    when continued on a GPU after starting on a CPU. The attention kernel stays auto (how, not what)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=compute_dtype(cfg.model).name))


def resolve(cfg: TrainConfig, saved: TrainConfig | None, *, name: str, dataset: str, vocab_size: int,
            train_tokens: int, by_content: bool, where: str) -> TrainConfig:
    """The settings as this run saves them, checked against the saved ones (`saved`) when continuing.
    `train_tokens`: the training split's length in tokens, which epochs count in; `by_content`: the corpus
    is checked by its recorded size and sha256, so a moved file with the same bytes is the same corpus."""
    epochs, max_steps = cfg.max_epochs, cfg.max_steps
    if saved is not None and cfg.max_steps != saved.max_steps and cfg.max_epochs == saved.max_epochs:
        epochs = None  # --max-steps given now wins over the --max-epochs of the original command
    if epochs is not None:
        max_steps = steps_for_epochs(epochs, train_tokens, cfg.model.seq_len, cfg.batch_size)
        if max_steps > STEP_LIMIT:
            raise UserError(f"--max-epochs {epochs} means {max_steps:,} steps, more than the 2**31 - 1 a run can take")
    out = resolved(dataclasses.replace(
        cfg, experiment_name=name, max_steps=max_steps, max_epochs=epochs, dataset_path=dataset,
        restore_checkpoint=False, restore_step=None, model=dataclasses.replace(cfg.model, num_tokens=vocab_size),
        optim=dataclasses.replace(cfg.optim, warmup_steps=resolved_warmup(cfg.optim, max_steps))))
    if saved is not None:
        refused = [d for d in differences(saved, out, is_run_defining) if not (d[0] == "dataset_path" and by_content)]
        if refused:
            listing = "; ".join(f"{path}: {a!r} saved vs {b!r} given" for path, a, b in refused)
            raise UserError(f"cannot continue {where} with different settings ({listing}); they would silently "
                            "change what the run computes: leave them out to continue with the saved ones, or "
                            "start a new experiment")
    return out
