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
    names = [
        "/".join(k.key for k in path)
        for path, decayed in jax.tree_util.tree_leaves_with_path(mask)
        if decayed
    ]
    return mask, names


def lr_schedule(cfg: OptimizerConfig, max_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then cosine to learning_rate * min_lr_ratio at max_steps."""
    warmup = min(cfg.warmup_steps, max_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(max_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimizerConfig, max_steps: int, params):
    """Returns (optimizer, schedule, decayed parameter names)."""
    schedule = lr_schedule(cfg, max_steps)
    mask, names = decay_mask(params)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    )
    return optax.chain(*parts), schedule, names
