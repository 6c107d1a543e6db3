"""The memory plan: what a run needs on each device, from shapes alone, checked before the first step.

Per device, for --parallel dp (everything whole on every device) or fsdp (fsdp.py's rule over N devices):
parameters (float32), gradients (float32, the parameters' shapes) and Adam's two moments: 16 bytes a
parameter under dp, about 16/N under fsdp; plus the activations a backward pass keeps, estimated per
sequence (`activations`) times the sequences each device holds per micro-batch (--batch-size / devices /
--grad-accum-steps). A lower bound: XLA's workspace, the optimizer's update temporaries and, under fsdp,
the weights of a block gathered whole while it runs are not counted. So a plan over the device's memory
cannot fit, and a run refuses it in one line (`check_fits`) instead of an out-of-memory trace after
minutes of compiling; a plan under it may still not.

The device's memory is --device-memory-gb, else what jax reports it may use of a GPU (the allocator's
`bytes_limit`: XLA_PYTHON_CLIENT_MEM_FRACTION of it, 75% by default); CPUs report no limit and are not
checked.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax

from mingpt_palm import fsdp
from mingpt_palm.config import ModelConfig, TrainConfig
from mingpt_palm.errors import UserError
from mingpt_palm.model import (
    VARIANTS,
    attention_implementation,
    compute_dtype,
    kv_heads,
)
from mingpt_palm.state import build

GB = 10**9  # --device-memory-gb counts in these, as GPU datasheets do


def gb(n: int) -> str:
    """Bytes in GB: one decimal from 1 GB up, two significant digits below (a tiny model's 0.0016)."""
    return f"{n / GB:,.1f}" if n >= GB else f"{n / GB:.2g}"


# --- activations -----------------------------------------------------------------------------------

def block_bytes_per_token(m: ModelConfig) -> int:
    """What one block's forward pass leaves for its backward pass, per token, in bytes. With c the compute
    dtype's bytes, Hq = heads x dim_head, KV the key/value width, F = ff_mult x dim, T = seq_len:

        4 dim (the float32 residual stream in) + (4 + c) dim (the norm's float32 output and its cast)
        + c (Hq + KV) (the projections) + 4 (Hq + KV) (rotary's float32 copies) + c Hq (attention's output)
        + 8 H T (the float32 scores and softmax weights; 4 H for cuDNN's fused kernel, which keeps
          only each row's logsumexp) + c FF_in + c F (the feed-forward's input projection and its
          gated or GELU output) + 2 c dim (the two output projections),

    the residual stream and norm counted twice for a sequential block (lamda, gpt), which has two."""
    parts, c = VARIANTS[m.variant], compute_dtype(m).itemsize
    hq, f = m.heads * m.dim_head, m.ff_mult * m.dim
    kv = m.dim_head if parts.kv == "shared" else 2 * kv_heads(m) * m.dim_head
    ff_in = f if parts.ff == "gelu" else 2 * f
    scores = 4 * m.heads if attention_implementation(m) == "cudnn" else 8 * m.heads * m.seq_len
    streams = 1 if parts.arrangement == "parallel" else 2
    return (streams * (8 + c) * m.dim + c * (hq + kv) + 4 * (hq + kv) + c * hq + scores + c * (ff_in + f)
            + 2 * c * m.dim)


def head_bytes_per_token(m: ModelConfig) -> int:
    """The embedding's output and the final norm's (float32), and the float32 logits with their gradient:
    with a large vocabulary (PaLM's 256k) the largest single term."""
    return 8 * m.dim + 8 * m.num_tokens


def activations(m: ModelConfig, sequences: float = 1, remat: str | None = None) -> int:
    """Bytes of activations a backward pass over `sequences` sequences of seq_len tokens keeps at its peak,
    for remat `remat` (default the model's). Per token, with B a block's bytes (block_bytes_per_token),
    D the depth and H the head's:

        remat none (and dots, which keeps the matmul outputs, most of a block): D B + B + H, every
          block's activations plus the backward working set of one;
        remat block: 4 dim D + 2 B + H, each block's float32 input, and one block recomputed and
          differentiated at a time.
    """
    remat = m.remat if remat is None else remat
    b, head = block_bytes_per_token(m), head_bytes_per_token(m)
    per_token = (4 * m.dim * m.depth + 2 * b + head) if remat == "block" else (m.depth * b + b + head)
    return math.ceil(sequences * m.seq_len * per_token)


# --- the plan --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per device of one run's train state and activations."""

    parallel: str  # dp | fsdp
    devices: int
    params: int
    grads: int
    adam: int
    sequences: int  # per device per micro-batch
    per_sequence: dict  # {"none": bytes, "block": bytes}: activations of one sequence under each remat
    activations: int  # the run's own remat, times `sequences`

    @property
    def state(self) -> int:
        return self.params + self.grads + self.adam

    @property
    def total(self) -> int:
        return self.state + self.activations


def sequences_per_device(cfg: TrainConfig, devices: int) -> int:
    """Sequences each device holds per micro-batch (both dp and fsdp split the batch over every device)."""
    return max(1, -(-cfg.batch_size // (devices * cfg.grad_accum_steps)))


def plan(cfg: TrainConfig, devices: int, abstract=None) -> Plan:
    """cfg's plan over `devices` devices under cfg.parallel; `abstract`: state.build(cfg).abstract, if at
    hand (nothing is allocated either way). UserError if fsdp cannot split the width over `devices`."""
    abstract = build(cfg).abstract if abstract is None else abstract
    split = devices if cfg.parallel == "fsdp" else 1
    if cfg.parallel == "fsdp":
        fsdp.check_width(cfg.model.dim, devices)

    def per_device(tree):
        return fsdp.bytes_per_device(tree, cfg.model.dim, cfg.fsdp_min_bytes, split)

    # Gradients have the parameters' shapes and dtype (float32), so the rule splits them alike.
    params = per_device(abstract.params)
    sequences = sequences_per_device(cfg, devices)
    return Plan(cfg.parallel, devices, params=params, grads=params, adam=per_device(abstract.opt_state),
                sequences=sequences, per_sequence={r: activations(cfg.model, 1, r) for r in ("none", "block")},
                activations=activations(cfg.model, sequences))


# --- the device --------------------------------------------------------------------------------------

def preallocation() -> tuple[float, str]:
    """(the fraction of a GPU's memory jax may use, how that is set): XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by
    default, taken at start unless XLA_PYTHON_CLIENT_PREALLOCATE=false (the limit holds either way)."""
    raw = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    try:
        fraction = float(raw) if raw else 0.75
    except ValueError:
        fraction = 0.75
    said = f"XLA_PYTHON_CLIENT_MEM_FRACTION={raw}" if raw else "jax's default; XLA_PYTHON_CLIENT_MEM_FRACTION sets it"
    lazy = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() in ("false", "0")
    return fraction, f"{said}, {'allocated as needed' if lazy else 'preallocated at start'}"


def device_limit(cfg: TrainConfig) -> tuple[int, str] | None:
    """(bytes a device may use, a phrase saying so and why), or None when nothing says (a CPU)."""
    if cfg.device_memory_gb is not None:
        return int(cfg.device_memory_gb * GB), f"one device has {cfg.device_memory_gb:g} GB (--device-memory-gb)"
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform == "gpu" else None
    if not stats or not stats.get("bytes_limit"):
        return None
    fraction, said = preallocation()
    limit = int(stats["bytes_limit"])
    return limit, (f"jax may use {gb(limit)} GB of one {device.device_kind} ({100 * fraction:g}% of about "
                   f"{limit / fraction / GB:,.0f} GB: {said})")


# --- the check -----------------------------------------------------------------------------------------

def _divisors(n: int, above: int) -> list[int]:
    return [k for k in range(above + 1, n + 1) if n % k == 0]


def _fsdp_devices(cfg: TrainConfig, abstract, limit: int, at_least: int, whole: bool) -> int | None:
    """The fewest devices (more than `at_least`, dividing the width) whose fsdp plan fits `limit`: all of it
    when `whole`, else its state alone."""
    fsdp_cfg = dataclasses.replace(cfg, parallel="fsdp")
    for k in _divisors(cfg.model.dim, at_least):
        p = plan(fsdp_cfg, k, abstract)
        if (p.total if whole else p.state) <= limit:
            return k
    return None


def advice(cfg: TrainConfig, p: Plan, abstract, limit: int) -> str:
    """What would make a plan fit: more devices under fsdp when the state and one sequence's activations
    (with remat) are too much already, and less activation memory when activations are the larger part."""
    more = None
    if p.state + p.per_sequence["block"] > limit:
        at_least = p.devices if cfg.parallel == "fsdp" else 1
        k = (_fsdp_devices(cfg, abstract, limit, at_least, whole=True)
             or _fsdp_devices(cfg, abstract, limit, at_least, whole=False))
        if k is None:
            return f"no fsdp device count up to --model.dim {cfg.model.dim} makes it fit: use a smaller model"
        more = f"--parallel fsdp on >= {k} devices"
    less = []
    if more is None or p.activations > p.state:
        if cfg.model.remat != "block":
            less.append(f"--model.remat block (~{gb(p.per_sequence['block'] * p.sequences)} GB of activations)")
        less.append(f"a smaller --batch-size or a larger --grad-accum-steps (now {p.sequences} sequence(s) per device "
                    "per micro-batch)" if p.sequences > 1 else "a smaller --block-size")
    return "try " + "; or ".join(filter(None, [more, ", ".join(less)]))


def check_fits(cfg: TrainConfig, abstract, devices: int) -> Plan:
    """A run's plan over `devices`; UserError in one line when it cannot fit the device's memory (or, under
    fsdp, cannot split the width over them). Before anything is written or compiled."""
    p = plan(cfg, devices, abstract)
    known = device_limit(cfg)
    if known is None or p.total <= known[0]:
        return p
    limit, where = known
    name = f"--preset {cfg.preset}" if cfg.preset else f"the model (dim {cfg.model.dim}, depth {cfg.model.depth})"
    over = "" if cfg.parallel == "dp" else f" over {devices} device{'s' if devices > 1 else ''}"
    raise UserError(
        f"{name} needs at least {gb(p.total)} GB per device under --parallel {cfg.parallel}{over} "
        f"({gb(p.state)} GB of parameters, gradients and Adam state, {gb(p.activations)} GB of activations "
        f"for {p.sequences} sequence(s) of {cfg.model.seq_len:,} tokens, --model.remat {cfg.model.remat}); "
        f"{where}; {advice(cfg, p, abstract, limit)}")


def fits_note(cfg: TrainConfig, abstract, devices: int) -> tuple[str, ...]:
    """The start-up line of a run whose plan fits a known device memory (on GPUs: how much of the device
    jax will use); nothing where no limit is known (a CPU)."""
    known = device_limit(cfg)
    if known is None:
        return ()
    p = plan(cfg, devices, abstract)
    return (f"memory: the plan needs at least {gb(p.total)} GB per device under --parallel {cfg.parallel} ("
            f"{gb(p.state)} GB of state, {gb(p.activations)} GB of activations); {known[1]}",)
