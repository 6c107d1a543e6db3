"""Autoregressive generation with a key/value cache, compiled once per (batch, chunk length, settings).

The prompt is encoded in one pass (padded to seq_len so every prompt length shares one compilation),
then a `lax.scan` runs one cached step per new character, CHUNK steps per call, its state carried from
call to call. Past seq_len the cache works as a sliding window: each new character attends to the
seq_len - 1 characters before it. Models with absolute positions (learned, sinusoidal) cannot slide a
cache (every key carries its position), so past seq_len each step runs the model over the last seq_len
characters instead. `generate(recompute=True)` is the reference: a full forward over the last seq_len
characters per step.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mingpt_palm import parallel
from mingpt_palm.config import ModelConfig
from mingpt_palm.errors import UserError
from mingpt_palm.model import PaLM, init_cache, relative_positions


def filter_logits(logits, temperature: float, top_k: int | None, top_p: float | None):
    """Scale by temperature and mask everything outside the top-k / top-p set with -inf."""
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the mass strictly before it is below top_p (so the top one always stays).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_token(logits, key, temperature: float, top_k: int | None, top_p: float | None):
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


def check_sampling_args(vocab_size: int, temperature: float, top_k, top_p, steps: int, num_samples: int) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):  # nan would sample NUL bytes, inf noise
        raise UserError(f"--temperature {temperature} must be a finite number >= 0 (0 means greedy)")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise UserError(f"--sample-from-top-k {top_k} must be between 1 and the vocabulary size {vocab_size}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p} must be in (0, 1]")
    if steps < 0:
        raise UserError(f"--sample-steps {steps} must be >= 0")
    if num_samples < 1:
        raise UserError(f"--num-samples {num_samples} must be >= 1")


def _pad_prompt(cfg: ModelConfig, prompt_ids) -> tuple[np.ndarray, int]:
    prompt_ids = np.asarray(prompt_ids, dtype=np.int32)[-cfg.seq_len :]
    if len(prompt_ids) == 0:
        raise UserError("the prompt is empty; pass --prompt with at least one character")
    padded = np.zeros(cfg.seq_len, np.int32)
    padded[: len(prompt_ids)] = prompt_ids
    return padded, len(prompt_ids)


# New tokens per compiled call: between calls the host takes the tokens, shows progress and notices
# Ctrl-C, and nothing is sized by the whole length. Each call costs one dispatch: small next to 512 steps.
CHUNK = 512


def _step_key(key, step):
    """Step t's key depends on (key, t) alone: a longer sample extends a shorter one exactly, and how the
    steps are cut into chunks never shows."""
    return jax.random.fold_in(key, step)


@partial(jax.jit, static_argnames=("cfg", "num_samples"))
def _start_cached(params, padded, prompt_len, *, cfg, num_samples):
    """The prompt in one pass: (logits after it, cache, window, position of the first new token)."""
    tokens = jnp.broadcast_to(padded, (num_samples, cfg.seq_len))
    logits, cache = PaLM(cfg).apply({"params": params}, tokens, jnp.arange(cfg.seq_len),
                                    init_cache(cfg, (num_samples,)))
    last = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1, axis=1, keepdims=False)
    return last, cache, tokens, prompt_len.astype(jnp.int32)


@partial(jax.jit, static_argnames=("cfg", "length", "temperature", "top_k", "top_p"))
def _chunk_cached(params, carry, key, first, *, cfg, length, temperature, top_k, top_p):
    model = PaLM(cfg)
    slides = relative_positions(cfg)

    def cached(tok, cache, window, pos):
        logits, cache = model.apply({"params": params}, tok[:, None], pos[None], cache)
        return logits[:, 0], cache

    def recomputed(tok, cache, window, pos):
        # Absolute positions (learned, sinusoidal) are baked into every cached key and value: once the
        # window moves, position 0 is a different character, so the window is run again from scratch.
        logits, _ = model.apply({"params": params}, window)
        return logits[:, -1], cache

    def step(carry, t):
        logits, cache, window, pos = carry  # pos: the position of the token sampled now
        tok = sample_token(logits, _step_key(key, t), temperature, top_k, top_p)
        window = _push(window, tok, pos, cfg.seq_len)
        if slides:
            logits, cache = cached(tok, cache, window, pos)
        else:
            logits, cache = jax.lax.cond(pos < cfg.seq_len, cached, recomputed, tok, cache, window, pos)
        return (logits, cache, window, pos + 1), tok

    return jax.lax.scan(step, carry, first + jnp.arange(length, dtype=jnp.uint32))


def _push(window, tok, length, seq_len: int):
    """The last seq_len tokens after appending tok to a window holding `length` of them (left-aligned)."""
    full = length >= seq_len
    # A full window drops its oldest character; otherwise the new one goes at `length`.
    shifted = jnp.where(full, jnp.roll(window, -1, axis=1), window)
    return jax.lax.dynamic_update_index_in_dim(shifted, tok, jnp.where(full, seq_len - 1, length), axis=1)


def _start_recompute(params, padded, prompt_len, *, cfg, num_samples):
    return jnp.broadcast_to(padded, (num_samples, cfg.seq_len)), prompt_len.astype(jnp.int32)


@partial(jax.jit, static_argnames=("cfg", "length", "temperature", "top_k", "top_p"))
def _chunk_recompute(params, carry, key, first, *, cfg, length, temperature, top_k, top_p):
    model = PaLM(cfg)

    def step(carry, t):
        window, filled = carry
        logits, _ = model.apply({"params": params}, window)
        last = jax.lax.dynamic_index_in_dim(logits, filled - 1, axis=1, keepdims=False)
        tok = sample_token(last, _step_key(key, t), temperature, top_k, top_p)
        return (_push(window, tok, filled, cfg.seq_len), jnp.minimum(filled + 1, cfg.seq_len)), tok

    return jax.lax.scan(step, carry, first + jnp.arange(length, dtype=jnp.uint32))


def generate(params, cfg: ModelConfig, prompt_ids, steps: int, key, num_samples: int = 1, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, recompute: bool = False,
             progress=None) -> np.ndarray:
    """Continue `prompt_ids` by `steps` tokens; returns int32 [num_samples, steps].

    The prompt keeps its last seq_len tokens. recompute=True runs the cache-free reference, with the same
    keys. The steps run in compiled chunks of CHUNK (compiled once per chunk length: CHUNK and the
    remainder); `progress`, if given, is called with the tokens of each chunk (per sample) once they are
    on the host.
    """
    out = np.zeros((num_samples, steps), np.int32)
    if steps == 0:
        return out
    padded, prompt_len = _pad_prompt(cfg, prompt_ids)
    start, chunk = (_start_recompute, _chunk_recompute) if recompute else (_start_cached, _chunk_cached)
    carry = start(params, padded, jnp.int32(prompt_len), cfg=cfg, num_samples=num_samples)
    settings = {"cfg": cfg, "temperature": float(temperature), "top_k": top_k, "top_p": top_p}
    ahead = None  # the chunk dispatched before this one: read while this one runs, so the device never waits
    for first in range(0, steps, CHUNK):
        carry, tokens = chunk(params, carry, key, np.uint32(first), length=min(CHUNK, steps - first), **settings)
        if ahead is not None:
            _take(out, *ahead, progress)
        ahead = first, tokens
    _take(out, *ahead, progress)
    return out


def _take(out: np.ndarray, first: int, tokens, progress) -> None:
    out[:, first : first + len(tokens)] = parallel.fetch(tokens).T  # fetch polls: Ctrl-C is noticed meanwhile
    if progress is not None:
        progress(len(tokens))
