"""Configuration: nested dataclasses that tyro turns into the command line.

Every field's docstring is its `--help` text. The sequence length lives in exactly one place,
`ModelConfig.seq_len` (alias `--block-size`); data, sampling and evaluation all read it from there.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Literal, Optional

import tyro


class UserError(Exception):
    """Bad input from the user: the scripts print the message as one line and exit with code 2."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The PaLM architecture. Saved with the experiment; a restored run must match it exactly."""

    seq_len: Annotated[int, tyro.conf.arg(aliases=("--block-size",))] = 512
    """Context length in tokens: training windows, evaluation windows and the sampling window."""
    dim: int = 512
    """Width of the residual stream."""
    depth: int = 12
    """Number of parallel attention + feed-forward blocks."""
    heads: int = 8
    """Query heads; keys and values have a single head (multi-query attention)."""
    dim_head: int = 64
    """Width of each attention head."""
    ff_mult: int = 4
    """Feed-forward hidden width as a multiple of dim (each SwiGLU half has ff_mult * dim units)."""
    z_loss: float = 1e-4
    """Weight of the auxiliary z-loss, z_loss * logsumexp(logits)^2, which keeps logits from drifting."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of matmuls (parameters, norms, softmax and loss stay float32). bfloat16 for GPUs."""
    num_tokens: tyro.conf.Suppress[int] = 256
    """Vocabulary size; set from the data's vocabulary, not from the command line."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with decoupled weight decay on dense kernels, warmup-cosine schedule, clipping."""

    learning_rate: float = 6e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr_ratio: float = 0.1
    """The cosine decays to learning_rate * min_lr_ratio at max_steps."""
    warmup_steps: int = 1000
    """Linear warmup from 0, in optimizer steps (independent of device count)."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to dense kernels only (not norms, not the embedding)."""
    b1: float = 0.9
    """Adam beta1."""
    b2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How the corpus is split, encoded and sampled."""

    vocab: Literal["byte", "char"] = "byte"
    """byte: the 256 byte values (what bits per character on enwik8 means). char: the distinct byte
    values of the training split, plus one unknown id for bytes seen only in val/test."""
    val_fraction: float = 0.05
    """Fraction of the file used for validation (ignored for corpora with a standard split)."""
    test_fraction: float = 0.05
    """Fraction of the file used for test, taken from the end (ignored for standard splits)."""
    datasets_dir: str = "datasets"
    """Where named corpora (enwik8, tinyshakespeare) are downloaded to."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Train a PaLM character model, data-parallel over every local device."""

    dataset_path: str = "enwik8"
    """A file to train on (read as bytes) or a registered corpus name (enwik8, tinyshakespeare)."""
    experiment_name: Optional[str] = None
    """Directory name under experiments_dir; default <dataset>_<timestamp>."""
    experiments_dir: str = "experiments"
    """Parent directory of all experiment directories."""
    restore_checkpoint: bool = False
    """Continue the experiment named by --experiment-name from its latest checkpoint."""
    batch_size: int = 32
    """Global batch in sequences per step, split evenly over all devices of all processes."""
    max_steps: int = 100_000
    """Number of optimizer steps; the cosine schedule ends here."""
    max_epochs: Optional[float] = None
    """If set, overrides max_steps: one epoch = (training tokens / seq_len) windows."""
    seed: int = 0
    """Seeds parameter initialisation and the data order (the batch of step t depends on seed and t)."""
    log_interval: int = 50
    """Write training scalars to TensorBoard every this many steps."""
    eval_interval: int = 1000
    """Validation loss on fixed windows, and a text sample, every this many steps (0 disables)."""
    eval_batches: int = 8
    """Number of fixed validation batches (of batch_size windows) per evaluation."""
    sample_length: int = 200
    """Characters sampled into TensorBoard at each evaluation (0 disables)."""
    checkpoint_interval: int = 1000
    """Save a checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep on disk."""
    max_nonfinite_steps: int = 10
    """Stop the run after this many consecutive steps with a non-finite loss or gradient."""
    progress: bool = True
    """Show a progress bar."""
    model: ModelConfig = ModelConfig()
    optim: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Sample text from a trained experiment and score bits per character on a whole split."""

    experiment_name: str
    """The experiment directory under experiments_dir to load."""
    experiments_dir: str = "experiments"
    """Parent directory of all experiment directories."""
    checkpoint_step: Optional[int] = None
    """Load the checkpoint of this step instead of the latest."""
    split: Literal["val", "test", "none"] = "val"
    """Score this whole split (every byte after the first predicted once), or none."""
    batch_size: int = 32
    """Windows per evaluation batch, split over all devices."""
    prompt: Optional[str] = None
    """Text to continue; default a line from the validation split."""
    prompt_file: Optional[str] = None
    """Read the prompt from this file instead."""
    sample_steps: int = 500
    """Number of characters to generate (0 skips sampling)."""
    num_samples: int = 1
    """Number of independent samples drawn from the same prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    sample_from_top_k: Optional[int] = None
    """Sample only among the k most likely characters."""
    top_p: Optional[float] = None
    """Nucleus sampling: the smallest set of characters whose probability reaches top_p."""
    seed: int = 0
    """Seeds the sampler and the choice of the default prompt."""


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    """Rebuild a (nested) config dataclass from `to_dict` output, ignoring unknown keys."""
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        value, hint = d[f.name], hints[f.name]
        while typing.get_origin(hint) is Annotated:
            hint = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate_model(m: ModelConfig) -> None:
    for name in ("seq_len", "dim", "depth", "heads", "dim_head", "ff_mult"):
        _require(getattr(m, name) >= 1, f"--model.{name.replace('_', '-')} {getattr(m, name)} must be >= 1")
    _require(m.dim_head % 2 == 0, f"--model.dim-head {m.dim_head} must be even (rotary embeddings rotate pairs)")
    _require(m.z_loss >= 0, f"--model.z-loss {m.z_loss} must be >= 0")


def validate_train(cfg: TrainConfig) -> None:
    """Reject nonsensical numbers before anything touches the disk."""
    validate_model(cfg.model)
    o = cfg.optim
    _require(o.learning_rate > 0, f"--optim.learning-rate {o.learning_rate} must be > 0")
    _require(0 <= o.min_lr_ratio <= 1, f"--optim.min-lr-ratio {o.min_lr_ratio} must be in [0, 1]")
    _require(o.warmup_steps >= 0, f"--optim.warmup-steps {o.warmup_steps} must be >= 0")
    _require(o.weight_decay >= 0, f"--optim.weight-decay {o.weight_decay} must be >= 0")
    _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"--optim.b1/--optim.b2 ({o.b1}, {o.b2}) must be in [0, 1)")
    _require(o.eps > 0, f"--optim.eps {o.eps} must be > 0")
    _require(o.grad_clip >= 0, f"--optim.grad-clip {o.grad_clip} must be >= 0 (0 disables clipping)")
    _require(cfg.batch_size >= 1, f"--batch-size {cfg.batch_size} must be >= 1")
    _require(cfg.max_steps >= 1, f"--max-steps {cfg.max_steps} must be >= 1")
    _require(cfg.max_epochs is None or cfg.max_epochs > 0, f"--max-epochs {cfg.max_epochs} must be > 0")
    for name in ("log_interval", "checkpoint_interval", "keep_checkpoints", "max_nonfinite_steps"):
        _require(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 1")
    for name in ("eval_interval", "sample_length"):
        _require(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 0")
    _require(cfg.eval_batches >= 1, f"--eval-batches {cfg.eval_batches} must be >= 1")
