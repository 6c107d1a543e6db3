"""The parts the model is assembled from: norms, position schemes, attention, feed-forwards.

Each is a small function or module with no knowledge of which family uses it; `model.py` combines
them per variant (MaxText's "one model from configurable parts"). Shapes: x [..., T, dim]; queries
[..., T, H, D]; keys and values [..., S, K, D] with K key/value heads (1 = multi-query).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mingpt_palm.errors import UserError

# --- norms ------------------------------------------------------------------------------------


BATCH_AXIS = "data"  # the mesh axis --parallel fsdp lays the batch (and the parameters' width) along


def along_batch(x: jax.Array) -> jax.Array:
    """x [batch, tokens, dim] kept split by sequence over the mesh's data axis, whole along tokens and dim,
    when the step runs over a mesh (--parallel fsdp sets one around tracing). Without this hint XLA may
    follow the parameters' split and cut activations along dim (tensor-parallel all-reduces) where FSDP
    gathers each weight instead. A no-op without a mesh (pmap, sampling, tests). Under the step's per-
    sequence vmap x is [tokens, dim] and vmap's spmd_axis_name adds the batch axis."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or BATCH_AXIS not in mesh.axis_names:
        return x
    spec = (BATCH_AXIS, None, None) if x.ndim == 3 else (None,) * x.ndim
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def norm(kind: str, name: str) -> nn.Module:
    """layernorm: PaLM's (scale only, no bias). layernorm_bias: GPT-2's. rmsnorm: PaLM-lite's (scale
    only, no mean subtraction). Always float32: a bfloat16 variance loses the small features."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dtype=jnp.float32, name=name)
    return nn.LayerNorm(use_bias=kind == "layernorm_bias", dtype=jnp.float32, name=name)


# --- positions --------------------------------------------------------------------------------


def rotary_tables(positions: jax.Array, dim_head: int):
    """(cos, sin) [T, dim_head] for rotate-half rotary embeddings, computed once per forward pass."""
    half = dim_head // 2
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq  # [T, half]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotary(x: jax.Array, tables) -> jax.Array:
    """Rotate pairs of features (rotate-half layout) of x [..., T, H, D]: each half i is paired with
    i + D/2 and turned by angle position * freq_i.

    x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) is a signed permutation applied
    as a D x D matmul: exact (one nonzero per column), and on CPUs far cheaper than the concatenate
    that splitting and re-joining the halves costs in the forward and again in the backward pass.
    """
    cos, sin = tables[0][:, None, :], tables[1][:, None, :]  # broadcast over heads
    d = x.shape[-1]
    half = d // 2
    perm = jnp.zeros((d, d), jnp.float32)
    perm = perm.at[jnp.arange(half) + half, jnp.arange(half)].set(-1.0).at[jnp.arange(half), jnp.arange(half) + half].set(1.0)
    xf = x.astype(jnp.float32)
    rotated = jnp.matmul(xf, perm, precision=jax.lax.Precision.HIGHEST)
    return (xf * cos + rotated * sin).astype(x.dtype)


def alibi_slopes(heads: int) -> np.ndarray:
    """ALiBi's per-head slopes (Press et al. 2022, section 3 and their reference code): for n a power
    of two the geometric sequence 2^(-8i/n), i = 1..n; otherwise the n' = 2^floor(log2 n) slopes of n',
    then every other slope of 2n' until there are n."""

    def power_of_two(n):
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    lower = 2 ** int(math.floor(math.log2(heads)))
    slopes = power_of_two(lower) + power_of_two(2 * lower)[0::2][: heads - lower]
    return np.asarray(slopes, np.float32)


def alibi_bias(positions, key_positions, heads: int) -> jax.Array:
    """[H, T, S] float32: -slope_h * (query position - key position). Only distances enter, so a key
    keeps its bias wherever the window starts: the cache can slide and windows can be longer."""
    distance = (positions[:, None] - key_positions[None, :]).astype(jnp.float32)
    return -jnp.asarray(alibi_slopes(heads))[:, None, None] * distance


def t5_bucket(distance, num_buckets: int = 32, max_distance: int = 128):
    """T5's causal relative-position bucket of distance = query - key >= 0 (Raffel et al. 2020;
    mesh_tensorflow `_relative_position_bucket` with bidirectional=False): distances below
    num_buckets/2 get a bucket each, larger ones share log-spaced buckets up to max_distance, and
    everything farther shares the last bucket."""
    n = jnp.maximum(distance, 0)
    exact = num_buckets // 2
    # log of 0 is never taken: small distances are routed around it (the reference computes it and
    # throws it away, which is harmless in torch but a NaN gradient waiting to happen in jax).
    safe = jnp.maximum(n, exact).astype(jnp.float32)
    large = exact + (jnp.log(safe / exact) / math.log(max_distance / exact) * (num_buckets - exact)).astype(jnp.int32)
    return jnp.where(n < exact, n, jnp.minimum(large, num_buckets - 1))


class RelativeBias(nn.Module):
    """T5 relative position bias [H, T, S]: one learned scalar per (bucket, head).

    One table for the whole model, as T5 does (Raffel et al. 2020, section 2.1: "we share the position
    embedding parameters across all layers"): 32 x heads numbers need no per-layer copies, and it is
    computed once per forward pass. (The LaMDA reference gives each layer its own, scaled by
    sqrt(dim_head); with Adam that scale only multiplies the table's learning rate.) Zero at init:
    the model starts position-blind and learns what distances matter.
    """

    heads: int
    num_buckets: int = 32
    max_distance: int = 128

    @nn.compact
    def __call__(self, positions, key_positions):
        table = self.param("table", nn.initializers.zeros, (self.num_buckets, self.heads), jnp.float32)
        buckets = t5_bucket(positions[:, None] - key_positions[None, :], self.num_buckets, self.max_distance)
        return jnp.transpose(table[buckets], (2, 0, 1))


def sinusoidal(positions, dim: int) -> jax.Array:
    """[T, dim] fixed absolute positions (Vaswani et al. 2017, section 3.5): sines in the first half,
    cosines in the second, wavelengths from 2pi to 10000 * 2pi."""
    half = dim // 2
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


# --- attention --------------------------------------------------------------------------------


def choose_attention(requested: str, dtype, dim_head: int, biased: bool) -> str:
    """'cudnn' or 'xla' for the training/scoring forward pass; UserError for a cudnn request that cannot
    run here (cuDNN raises deep inside compilation otherwise).

    auto picks cuDNN's fused kernel for the schemes that need no score bias (rotary, learned, sinusoidal).
    ALiBi and T5 add a bias [H, T, S], which cuDNN accepts but which no test here has run on a GPU: they
    stay on XLA unless cudnn is asked for. Dropout on attention weights (gpt in training) has no fused
    kernel at all and is computed by `attend` itself.
    """
    why_not = None
    if jax.default_backend() != "gpu":
        why_not = f"it needs an NVIDIA GPU (this is {jax.default_backend()})"
    elif jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        why_not = f"it needs bfloat16 or float16 (compute dtype is {jnp.dtype(dtype).name}; pass --model.dtype bfloat16)"
    elif dim_head % 8 or dim_head > _cudnn_max_head():
        why_not = f"it needs --model.dim-head a multiple of 8 and at most {_cudnn_max_head()} on this GPU"
    if requested == "cudnn" and why_not:
        raise UserError(f"--model.attention cudnn cannot run here: {why_not}; use --model.attention xla or auto")
    if requested == "auto":
        return "xla" if why_not or biased else "cudnn"
    return requested


def _cudnn_max_head() -> int:
    cc = getattr(jax.devices()[0], "compute_capability", "8.0")
    return 256 if float(cc) >= 9.0 else 128



def attend(q, k, v, positions, key_positions, *, context: int, implementation: str, contiguous: bool,
           bias=None, dropout=None):
    """Causal attention: q [..., T, H, D] over keys/values [..., S, K, D] -> [..., T, H, D].

    A query attends to keys at positions p with 0 <= query - p < context (causal, and never farther back
    than `context`). `contiguous`: keys are the queries' own positions 0..T-1, so the mask is plain
    causal (a sliding window past `context`), which fused kernels compute without materialising it;
    otherwise (a cache) it is built from the positions. K < H key heads are never copied per query
    head: jax groups the query heads over them, and one float32 key head is met by folding the query
    heads into rows (`_attend_xla`). Scores and softmax accumulate in float32 whatever the compute dtype.
    `bias` [H, T, S] (ALiBi, T5) is added to the scores. `dropout(weights)` drops attention weights;
    jax's function has no such hook, so then the weights are computed here.
    """
    lead, (t, h, d), (s, kh) = q.shape[:-3], q.shape[-3:], k.shape[-3:-1]
    q4, k4, v4 = q.reshape(-1, t, h, d), k.reshape(-1, s, kh, d), v.reshape(-1, s, kh, d)
    # float32 multi-query attention folds its heads into rows (_attend_xla); bfloat16 keeps jax's path,
    # whose dot precision presets keep the backward pass's dtypes consistent.
    fold = kh == 1 and q.dtype == jnp.float32
    if dropout is None and not fold:
        bias4 = None if bias is None else bias[None].astype(jnp.float32)
        if contiguous:
            window = (context - 1, 0) if t > context else None
            out = jax.nn.dot_product_attention(q4, k4, v4, bias=bias4, is_causal=True, local_window_size=window,
                                               implementation=implementation if window is None else "xla")
            return out.reshape(*lead, t, h, d)
        mask = _allowed(positions, key_positions, context)[None, None]
        out = jax.nn.dot_product_attention(q4, k4, v4, bias=bias4, mask=mask, implementation="xla")
        return out.reshape(*lead, t, h, d)
    return _attend_xla(q4, k4, v4, bias, _allowed(positions, key_positions, context), dropout).reshape(*lead, t, h, d)


def _allowed(positions, key_positions, context: int):
    """[T, S] bool: key slot filled, not in the future, fewer than `context` positions back."""
    delta = positions[:, None] - key_positions[None, :]
    return (key_positions[None, :] >= 0) & (delta >= 0) & (delta < context)


def _attend_xla(q, k, v, bias, allowed, dropout):
    """jax.nn.dot_product_attention's XLA path, written out: scores in float32 times 1/sqrt(D), masked to
    float32's lowest, softmax in float32. Used for two things jax's function cannot do as well:

    - dropout on the normalised weights (GPT-2's attn_pdrop): jax's function has no hook for it;
    - one key/value head (K = 1): the H query heads fold into rows, [B, T*H, D] x [B, S, D], so the
      scores and the output are each one plain batched matmul with no transpose; jax's grouped path
      transposes queries and scores around every group (the CPU train step: 2-7% faster, measured side by side).

    Scores are laid out [B, T, H, S] either way; with K > 1 (multi-head, dropout) the keys are matched
    head for head, after repeating K heads to H when they are grouped.
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1:3]
    if kh == 1:
        scores = jnp.einsum("bqd,bsd->bqs", q.reshape(b, t * h, d), k[:, :, 0], preferred_element_type=jnp.float32)
        scores = scores.reshape(b, t, h, s)
    else:
        k, v = jnp.repeat(k, h // kh, axis=2), jnp.repeat(v, h // kh, axis=2)
        scores = jnp.einsum("bthd,bshd->bths", q, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(1 / math.sqrt(d))
    if bias is not None:  # [H, T, S] -> [T, H, S]
        scores = scores + jnp.transpose(bias, (1, 0, 2)).astype(jnp.float32)
    scores = jnp.where(allowed[:, None, :], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = (weights if dropout is None else dropout(weights)).astype(v.dtype)
    if kh == 1:
        return jnp.einsum("bqs,bsd->bqd", weights.reshape(b, t * h, s), v[:, :, 0]).reshape(b, t, h, d)
    return jnp.einsum("bths,bshd->bthd", weights, v)


# --- feed-forwards ----------------------------------------------------------------------------


def gated(kind: str, gate, up):
    """SwiGLU (PaLM: swish(gate) * up) or GeGLU (LaMDA: gelu(gate) * up; Shazeer 2020)."""
    return (nn.swish(gate) if kind == "swiglu" else nn.gelu(gate, approximate=False)) * up
