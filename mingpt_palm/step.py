"""The train step: a pure function of (state, control, bytes), compiled by the run's layout (parallel.py):
pmapped under --parallel dp, jitted over sharded state under fsdp. The body is the same for both; the
layout answers its few questions about devices (the mean over them, a flag from any, a row's number).

It accumulates gradients over micro-batches inside the step (one all-reduce per update, as MaxText
and levanter do), skips any update whose loss, gradient or result is not finite, and halts itself on
the device: once a stop is agreed or too many non-finite steps came in a row, later steps change
nothing, so steps already in flight when the host finds out cannot move the run past the right step.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mingpt_palm import parallel
from mingpt_palm.loss import cross_entropy
from mingpt_palm.state import TrainState, all_finite

# status: what the host reads every step (one small vector from one device); the metrics only on the
# steps it logs.
STATUS = ("finite", "halted", "stop", "bad_in_row", "loss", "grad_norm")
DROPOUT_STREAM = 3  # folded into the seed: dropout's random numbers are not the parameter init's


@flax.struct.dataclass
class Control:
    """Run control carried from step to step on the devices (not checkpointed)."""

    bad_in_row: jax.Array  # consecutive non-finite steps
    halted: jax.Array  # a stop was agreed or the run gave up: later steps are no-ops

    @classmethod
    def start(cls) -> "Control":
        return cls(bad_in_row=jnp.int32(0), halted=jnp.bool_(False))


def _grads(params, tokens, model, z_loss, keys=None, batch_axis=None):
    def loss_fn(p):
        if keys is None:
            logits, _ = model.apply({"params": p}, tokens[:, :-1])
        else:  # a dropout key per sequence: the masks do not depend on how the batch was split
            apply = lambda t, k: model.apply({"params": p}, t, deterministic=False, rngs={"dropout": k})[0]  # noqa: E731
            logits = jax.vmap(apply, spmd_axis_name=batch_axis)(tokens[:, :-1], keys)
        return cross_entropy(logits, tokens[:, 1:], z_loss)

    (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, {k: m[k] for k in ("loss", "z_loss")}


def accumulated_grads(params, tokens, model, z_loss, keys=None, layout=parallel.DP):
    """Mean gradient and metrics over micro-batches tokens [k, b, L+1] (dropout keys [k, b, ...] or
    None): a scan, so the k backward passes share one compiled body and the activations of one
    micro-batch live at a time. The carry is laid out like the parameters (sharded under fsdp)."""
    if tokens.shape[0] == 1:
        return _grads(params, tokens[0], model, z_loss, None if keys is None else keys[0], layout.batch_axis)

    def body(total, micro):
        tokens, keys = micro
        grads, metrics = _grads(params, tokens, model, z_loss, keys, layout.batch_axis)
        return layout.like_params(jax.tree.map(jnp.add, total, grads)), metrics

    zeros = layout.like_params(jax.tree.map(jnp.zeros_like, params))
    total, metrics = jax.lax.scan(body, zeros, (tokens, keys))
    k = tokens.shape[0]
    # Equal micro-batches: the mean of their means is the mean over the whole batch.
    return jax.tree.map(lambda g: g / k, total), jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)


def dropout_keys(seed: int, step, shape: tuple[int, int], layout=parallel.DP):
    """Keys [k, b, 2] for the k micro-batches of b sequences the step sees, each a function of (seed,
    step, the sequence's row in the global batch) alone: a resumed run, another device count, another
    accumulation or another layout draws the same masks for the same sequence."""
    k, b = shape
    rows = layout.rows(k, b).reshape(-1)
    base = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), DROPOUT_STREAM), step)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(rows).reshape(k, b, -1)


def train_step(state: TrainState, control: Control, raw, stop, *, model, tx, schedule, z_loss, table, byte_lengths,
               max_nonfinite, seed: int = 0, layout=parallel.DP):
    """One update from the bytes raw uint8 [k, b, L+1] (k micro-batches; this device's under dp), encoded here
    through `table` (byte -> token id). `stop`: this process asks to stop; the step returns whether any
    process asked, so all processes stop after the same step. `seed` keys dropout (if the model has
    any). Returns (state, control, status, metrics): status (STATUS, read every step) and every scalar
    to log (the logger writes whatever is here: a new metric is one line)."""
    keys = dropout_keys(seed, state.step, raw.shape[:2], layout) if model.cfg.dropout > 0 else None
    tokens = table[raw]
    grads, metrics = accumulated_grads(state.params, tokens, model, z_loss, keys, layout)
    # The bytes the targets stand for (one each for byte and char ids) ride along in the one all-reduce.
    targets = tokens[..., 1:]
    metrics["bytes"] = jnp.sum(byte_lengths[targets]).astype(jnp.float32)
    grads, metrics = layout.mean((grads, metrics))
    grad_norm = optax.tree_utils.tree_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A finite loss and gradient can still give non-finite weights (an overflowing update): the
    # result is checked too, so that no step can poison the parameters.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & all_finite((params, opt_state))
    active = ~control.halted
    apply = finite & active
    # A skipped step changes nothing but the counters: params and Adam moments stay as they were.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)  # noqa: E731
    stop_any = layout.any(stop)
    bad = jnp.where(active, jnp.where(finite, 0, control.bad_in_row + 1), control.bad_in_row)
    halted = control.halted | (active & (stop_any | (bad >= max_nonfinite)))
    new_state = TrainState(
        step=state.step + active.astype(jnp.int32),
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + (active & ~finite).astype(jnp.int32),
    )
    tokens_per_byte = targets.size / metrics.pop("bytes")  # the whole batch's ratio (dp: per device, bytes averaged)
    metrics.update(bits_per_token=metrics["loss"] / math.log(2), bpc=metrics["loss"] / math.log(2) * tokens_per_byte,
                   grad_norm=grad_norm, learning_rate=schedule(state.step - state.skipped),
                   skipped_steps=new_state.skipped)
    status = {"finite": finite, "halted": halted, "stop": stop_any, "bad_in_row": bad, "loss": metrics["loss"],
              "grad_norm": grad_norm}
    return new_state, Control(bad_in_row=bad, halted=halted), jnp.stack(
        [jnp.asarray(status[k], jnp.float32) for k in STATUS]), metrics
