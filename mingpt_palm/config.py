"""Configuration: nested dataclasses that tyro turns into the command line.

Every field's docstring is its `--help` text; what values may be, and how settings are saved, compared
and resolved, is settings.py's. The sequence length lives in exactly one place, `ModelConfig.seq_len`
(alias `--block-size`); data, sampling and evaluation all read it from there.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, Optional

import tyro

from mingpt_palm import presets


VARIANT_POSITION = {"palm": "rotary", "palm-lite": "alibi", "lamda": "t5", "gpt": "learned"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture. Saved with the experiment; a restored run must match it exactly."""

    variant: Literal["palm", "palm-lite", "lamda", "gpt"] = "palm"
    """Which family's parts to assemble. palm: parallel block (attention and feed-forward side by side
    from one LayerNorm), multi-query attention, SwiGLU, rotary, no biases. palm-lite: palm with RMSNorm,
    one single-head projection used as both keys and values, ALiBi. lamda: sequential pre-norm block,
    multi-query attention, T5 relative position bias, GeGLU. gpt: sequential pre-LayerNorm block with
    biases, multi-head attention, GELU MLP, learned absolute positions, dropout."""
    position: Literal["auto", "rotary", "alibi", "t5", "learned", "sinusoidal"] = "auto"
    """Position scheme. auto: the variant's own (palm rotary, palm-lite alibi, lamda t5, gpt learned).
    alibi and t5 add a bias to attention scores and can score windows longer than seq_len; rotary
    runs there but was never trained for it; learned absolute positions stop at seq_len."""
    dropout: float = 0.0
    """Dropout rate on the embeddings, the attention weights and each residual branch, in training only
    (evaluation and sampling never drop). The masks depend on (seed, step, example) alone, so a resumed
    run and any device count draw the same ones. nanoGPT/GPT-2 use 0.1 (0 for long pre-training)."""
    seq_len: Annotated[int, tyro.conf.arg(aliases=("--block-size",))] = 512
    """Context length in tokens: training windows, evaluation windows and the sampling window."""
    dim: int = 512
    """Width of the residual stream."""
    depth: int = 12
    """Number of blocks (attention + feed-forward)."""
    heads: int = 8
    """Query heads. palm, palm-lite and lamda have a single key/value head (multi-query attention);
    gpt has one per query head."""
    dim_head: int = 64
    """Width of each attention head."""
    ff_mult: int = 4
    """Feed-forward hidden width as a multiple of dim (each half of SwiGLU/GeGLU, or the GELU MLP, has
    ff_mult * dim units)."""
    z_loss: float = 1e-4
    """Weight of the auxiliary z-loss, z_loss * logsumexp(logits)^2, which keeps logits from drifting."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype of matmuls and attention. auto: bfloat16 on GPUs, float32 on CPUs. Parameters,
    optimizer state, the residual stream, norms, softmax and the loss stay float32 either way."""
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    """Attention kernel (jax.nn.dot_product_attention). cudnn: cuDNN's fused flash kernel (NVIDIA GPU,
    bfloat16, dim_head a multiple of 8 and at most 128, or 256 from Hopper on). xla: plain XLA, any device.
    auto: cudnn where it applies, else xla. Cached decoding always uses xla (its mask is not causal)."""
    remat: Literal["none", "block", "dots"] = "none"
    """Rematerialisation of each block in the backward pass, trading compute for memory. block: keep
    only each block's input and recompute the rest; dots: keep matmul outputs, recompute elementwise
    work. The numbers are the same as with none."""
    num_tokens: tyro.conf.Suppress[int] = 256
    """Vocabulary size; set from the data's vocabulary, not from the command line."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with decoupled weight decay on dense kernels, warmup-cosine schedule, clipping."""

    learning_rate: float = 6e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr_ratio: float = 0.1
    """The cosine decays to learning_rate * min_lr_ratio at max_steps."""
    warmup_steps: Optional[int] = None
    """Linear warmup over this many optimizer steps: update i uses learning_rate * i / warmup_steps (so
    the first update already moves the weights) and reaches learning_rate at update warmup_steps; 0
    starts at the peak. Counted in optimizer steps, independent of device count. Default: 5% of
    --max-steps, at most 1000, fixed when the run starts (a continued run keeps it). A warmup longer
    than the run is kept as given: the rate then never reaches its peak (the start-up says so)."""
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

    tokenizer: Literal["byte", "char", "sentencepiece"] = "byte"
    """byte: the 256 byte values (what bits per character on enwik8 means). char: the distinct byte
    values of the training split, plus one unknown id for bytes seen only in val/test. sentencepiece:
    --data.vocab-size sub-word pieces learned from the training split (BPE or unigram), stored in the
    experiment as tokenizer.model; any bytes encode and decode exactly."""
    vocab_size: int = 8192
    """sentencepiece: the number of pieces, the 256 byte pieces (for text no piece covers) and the
    unknown id included. Ignored by byte and char."""
    sp_model_type: Literal["bpe", "unigram"] = "bpe"
    """sentencepiece: bpe merges the most frequent pair of pieces until the vocabulary is full (seconds
    on 5 MB of text); unigram prunes a large set of candidates by their likelihood (minutes)."""
    sp_train_bytes: int = 20_000_000
    """sentencepiece: learn the pieces from whole lines of the training split drawn at random (by --seed)
    until this many bytes, or from all of it when it is smaller."""
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
    """Continue the experiment named by --experiment-name if there is anything to continue: from its
    newest complete checkpoint, with the settings saved in its config.json (flags given now may change
    only step counts, intervals and logging); from step 0 with those settings when it has no checkpoint
    yet (killed before its first save); and as a new experiment when it does not exist yet. So one
    command line serves the first start and every restart (a scheduler's requeue)."""
    restore_step: Optional[int] = None
    """Continue from this checkpoint step instead of the newest (implies --restore-checkpoint); newer
    checkpoints are moved to superseded_checkpoints/ in the experiment, never deleted."""
    init_from: Optional[str] = None
    """Fine-tune: start a new experiment from the parameters of another's newest checkpoint (a path such as
    experiments/X, or a name under --experiments-dir), at step 0 with a fresh optimizer and schedule. It
    keeps X's model and vocabulary (of the model, only dropout, z-loss, dtype, attention and remat may
    differ) and trains on --dataset-path, by default X's corpus."""
    preset: Optional[Literal[presets.NAMES]] = None
    """A named size from the papers (mingpt_palm/presets.py) as the model's defaults; --model.X flags given
    beside it still win. A run sets the vocabulary size from its corpus all the same."""
    print_params: bool = False
    """Dry run: print the model's parameter count, the bytes its parameters and Adam state need, its
    training FLOPs per token and the memory plan per device (parameters, gradients, Adam state and
    activations under --parallel over --plan-devices), from shapes alone (nothing is allocated, no corpus
    read, nothing written)."""
    batch_size: int = 32
    """Global batch in sequences per optimizer step, split evenly over all devices of all processes."""
    grad_accum_steps: int = 1
    """Split each device's share of the batch into this many micro-batches and accumulate their gradients
    inside the step (one all-reduce per update): the same update, with the activation memory of one
    micro-batch. --batch-size stays the global batch per update."""
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
    """Show a progress bar (on a terminal); otherwise, and with --no-progress, print one line every
    --log-interval steps."""
    parallel: Literal["dp", "fsdp"] = "dp"
    """How the train state is laid over the devices. dp: a whole copy of the parameters and Adam state on
    every device (jax.pmap), each device a slice of the batch. fsdp: each parameter and its Adam moments
    sharded along the model width over all devices of all processes (jax.jit over a device mesh), the
    batch sliced the same way: about 1/N of the state per device, for models larger than one device's
    memory. Both compute the same update; a run may change it when it continues."""
    fsdp_min_bytes: int = 1 << 20
    """Under --parallel fsdp, parameters smaller than this many bytes (norm scales, position tables) stay
    whole on every device: sharding them saves little memory and costs a collective each."""
    plan_devices: Optional[int] = None
    """--print-params: plan the memory per device for this many devices instead of the visible ones."""
    device_memory_gb: Optional[float] = None
    """Memory per device (GB, 1e9 bytes) the run plans against before it compiles: a plan that does not fit
    stops it with one line. Default: what the device reports (GPUs, times the fraction jax may use); CPUs
    report none and are not checked."""
    distributed_timeout: int = 300
    """Seconds a multi-process job waits for every process to join it and to report its settings
    before giving up with an error that names the missing process."""
    peer_timeout: int = 60
    """Seconds a process of a multi-process job may go silent while training (each sends a heartbeat
    every second through the job's coordinator) before the others count it as dead: they stop within
    this time with one line naming it and the last complete checkpoint (exit 1), so that a scheduler can
    restart the job, which then resumes."""
    model: ModelConfig = ModelConfig()
    optim: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Sample text from a trained experiment and score bits per byte on a whole split."""

    experiment_name: str
    """The experiment directory under experiments_dir to load."""
    experiments_dir: str = "experiments"
    """Parent directory of all experiment directories."""
    checkpoint_step: Optional[int] = None
    """Load the checkpoint of this step instead of the latest."""
    split: Literal["val", "test", "none"] = "val"
    """Score this whole split (every token after the first scored once), or none."""
    batch_size: int = 32
    """Windows per evaluation batch, split over all devices."""
    eval_seq_len: Optional[int] = None
    """Tokens per scoring window, L; default the model's seq_len. Windows longer than seq_len need a
    position scheme that extends (alibi, t5; rotary runs there but was never trained for it); learned
    positions stop at seq_len."""
    stride: Optional[int] = None
    """Tokens each scoring window advances, S (1 <= S <= L); default L: non-overlapping windows, each
    starting without context. Each window after the first scores only its last S targets, so every token
    is scored once, with at least L - S tokens of context, at about L / S times the compute."""
    prompt: Optional[str] = None
    """Text to continue; default a line from the validation split."""
    prompt_file: Optional[str] = None
    """Read the prompt from this file instead."""
    sample_steps: int = 500
    """Number of characters to generate (0 skips sampling)."""
    num_samples: int = 1
    """Number of independent samples drawn from the same prompt. Sample i (from 1) is drawn with seed
    --seed + i - 1, as if alone: --seed S+i-1 --num-samples 1 draws it again (with the same prompt)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    sample_from_top_k: Optional[int] = None
    """Sample only among the k most likely characters."""
    top_p: Optional[float] = None
    """Nucleus sampling: the smallest set of characters whose probability reaches top_p."""
    seed: int = 0
    """Seeds the sampler (sample i with --seed + i - 1; each header shows its seed) and the choice of the
    default prompt."""


def flatten(cfg, prefix: str = "") -> dict:
    """{"model.dim": 64, "seed": 0, ...}: every leaf field of a nested config by its dotted path."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out.update(flatten(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else {prefix + f.name: value})
    return out


def position_scheme(m: ModelConfig) -> str:
    return VARIANT_POSITION[m.variant] if m.position == "auto" else m.position
