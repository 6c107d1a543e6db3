"""Data parallelism over devices and hosts; every pmap detail lives here.

Parameters and optimizer state are replicated on each local device; each device takes an equal
slice of the batch, and gradients and metrics are averaged with `pmean` over AXIS. A later
jit + sharding path (FSDP) replaces this module and nothing else.
"""

from __future__ import annotations

import os

import flax.jax_utils
import jax
import numpy as np

from mingpt_palm.config import UserError

AXIS = "devices"


def initialize_distributed() -> None:
    """Join a multi-process job when the launcher says so (JAX_COORDINATOR_ADDRESS and friends).

    A single process (the usual case) needs nothing and skips this.
    """
    # Must run before anything touches a JAX backend (jax.process_count() would).
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and not jax.distributed.is_initialized():
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )


def sync(name: str) -> None:
    """A barrier across processes (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def sum_over_processes(values: np.ndarray) -> np.ndarray:
    """Elementwise sum of a host array over all processes (identity in a single process)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)


def check_batch(global_batch: int) -> int:
    """The per-process batch for a global batch; a clear error when it does not divide evenly."""
    devices = jax.device_count()
    if global_batch <= 0 or global_batch % devices:
        raise UserError(
            f"--batch-size {global_batch} is not a positive multiple of the {devices} devices "
            f"({jax.process_count()} process(es) x {jax.local_device_count()} local); "
            f"use a multiple of {devices}, e.g. {max(devices, global_batch // devices * devices or devices)}"
        )
    return global_batch // jax.process_count()


def replicate(tree):
    """A copy of tree on every local device, laid out exactly like pmap's own outputs.

    flax.jax_utils.replicate gives arrays on a differently named device axis, so the first train
    step would compile once for them and again for its own outputs.
    """
    n = jax.local_device_count()
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), tree)
    return jax.pmap(lambda x: x, axis_name=AXIS)(stacked)


def unreplicate(tree):
    return flax.jax_utils.unreplicate(tree)


def shard(batch: np.ndarray) -> np.ndarray:
    """[local_batch, ...] -> [local_devices, local_batch / local_devices, ...] (a view, no copy)."""
    n = jax.local_device_count()
    return batch.reshape(n, batch.shape[0] // n, *batch.shape[1:])


def pmean(tree):
    """Average over all devices of all processes; call inside a function given to `pmap`."""
    return jax.lax.pmean(tree, AXIS)


def psum(tree):
    return jax.lax.psum(tree, AXIS)


def pany(flag):
    """True on every device if it is true on any device of any process."""
    return jax.lax.pmax(flag.astype(np.int32), AXIS) > 0


def pmap(fn, donate_state: bool = False):
    """pmap over the local devices with AXIS bound; optionally donate argument 0 (the train state).

    Donation halves the state's memory on accelerators; the CPU backend cannot donate and would
    only warn, so it is skipped there.
    """
    donate = donate_state and jax.default_backend() != "cpu"
    return jax.pmap(fn, axis_name=AXIS, donate_argnums=(0,) if donate else ())
