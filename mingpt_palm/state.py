"""The train state and how to build it (or its abstract shape) from a config: what training,
evaluation and the benchmarks all need, below all of them."""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from mingpt_palm.config import TrainConfig
from mingpt_palm.model import PaLM
from mingpt_palm.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken so far (= index of the next batch)
    params: Any
    opt_state: Any
    skipped: jax.Array  # steps whose loss or gradient was non-finite and were not applied


def init_params(model, cfg: TrainConfig):
    return model.init(jax.random.PRNGKey(cfg.seed), jnp.zeros((1, cfg.model.seq_len), jnp.int32))["params"]


def init_state(model, tx, cfg: TrainConfig) -> TrainState:
    params = init_params(model, cfg)
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), skipped=jnp.int32(0))


class Built(NamedTuple):
    model: PaLM
    tx: Any  # the optax optimizer
    schedule: Any  # the learning rate by optax's update count (optim.lr_schedule)
    decayed: list  # names of the weight-decayed parameters
    abstract: TrainState  # shapes and dtypes only


def build(cfg: TrainConfig) -> Built:
    """The model, optimizer and abstract train state of a config: shapes only (jax.eval_shape), nothing
    allocated."""
    model = PaLM(cfg.model)
    # The model is traced once (seconds for a deep one): the optimizer state's shapes follow from the params'.
    params = jax.eval_shape(partial(init_params, model, cfg))
    tx, schedule, decayed = make_optimizer(cfg.optim, cfg.max_steps, params)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)  # what init_state's step and skipped are
    abstract = TrainState(step=scalar, params=params, opt_state=jax.eval_shape(tx.init, params), skipped=scalar)
    return Built(model, tx, schedule, decayed, abstract)


def all_finite(tree) -> jax.Array:
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats]))
