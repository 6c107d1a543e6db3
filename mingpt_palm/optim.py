"""AdamW with weight decay on dense kernels only, a step-based warmup-cosine schedule, clipping."""

from __future__ import annotations

import jax
import optax

from mingpt_palm.config import OptimizerConfig


def decay_mask(params):
    """True for the kernels of dense projections, False for norm scales and the embedding.

    Decided by the parameter's own name (`kernel`, which flax gives Dense weights and nothing
    else here), not by a substring of its path. Returns (mask, names of the decayed parameters).
    """
    mask = jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)
    return mask, _names(mask, True)


def not_decayed(params) -> list[str]:
    """Names of the parameters decay_mask leaves alone (biases, norm scales, embeddings, position tables)."""
    return _names(decay_mask(params)[0], False)


def _names(mask, decayed: bool) -> list[str]:
    return ["/".join(k.key for k in path) for path, d in jax.tree_util.tree_leaves_with_path(mask) if d == decayed]


def resolved_warmup(cfg: OptimizerConfig, max_steps: int) -> int:
    """--optim.warmup-steps, or its default: 5% of the run, at most 1000 steps (a run of a few hundred
    steps then still warms up, peaks and decays; a long one warms up over 1000 as GPT-2-sized runs do)."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, max_steps // 20)


def lr_schedule(cfg: OptimizerConfig, max_steps: int) -> optax.Schedule:
    """The learning rate as a function of optax's update count (0 for the first update).

    Update i (1-based) gets learning_rate * i / warmup_steps during the warmup, so the first update
    already learns (a ramp starting at 0 would make it a no-op), learning_rate at update
    warmup_steps, then a cosine to learning_rate * min_lr_ratio at update max_steps, and that floor
    after. warmup_steps 0 (or 1) starts at the peak; a warmup longer than the run is kept as given (the
    rate then never reaches its peak; start.py says so). train.py logs schedule(step - skipped) for the
    step being taken: the same count optax passes.
    """
    warmup = max(1, resolved_warmup(cfg, max_steps))
    by_update = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(max_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )
    return lambda count: by_update(count + 1)


def make_optimizer(cfg: OptimizerConfig, max_steps: int, params):
    """Returns (optimizer, schedule, decayed parameter names)."""
    schedule = lr_schedule(cfg, max_steps)
    mask, names = decay_mask(params)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    )
    return optax.chain(*parts), schedule, names
