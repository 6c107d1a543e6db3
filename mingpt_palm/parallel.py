"""How the train state and the batches are laid over the devices: the one seam between --parallel dp
(`Replicated`, here: every pmap detail lives in this module) and --parallel fsdp (fsdp.Sharded). The
loop, the step, the checkpoints and evaluation ask the run's layout (fsdp.layout chooses it from the
config) and never which one it is. How several processes form one job is distributed.py's.
"""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from mingpt_palm.errors import UserError

AXIS = "devices"


def fetch(x) -> np.ndarray:
    """np.asarray(x), waiting in short sleeps: a blocking read of a long computation (a generation of
    thousands of characters) would not notice Ctrl-C until it ends."""
    began = time.perf_counter()
    while not x.is_ready():
        # Sleeps grow with the wait: a short computation is read within ~10% of its time, a long one
        # within 50 ms, which is still well inside "Ctrl-C stops it at once".
        time.sleep(min(0.05, max(1e-4, (time.perf_counter() - began) / 10)))
    return np.asarray(x)


def check_batch(global_batch: int, accum: int = 1) -> int:
    """The per-process batch for a global batch; a clear error when it does not divide evenly over the
    devices and, within each device, into `accum` equal micro-batches."""
    devices = jax.device_count()
    unit = devices * accum
    if global_batch <= 0 or global_batch % unit:
        split = f"the {devices} devices" if accum == 1 else f"{devices} devices x {accum} micro-batches (= {unit})"
        raise UserError(
            f"--batch-size {global_batch} is not a positive multiple of {split} "
            f"({jax.process_count()} process(es) x {jax.local_device_count()} local); "
            f"use a multiple of {unit}, e.g. {max(unit, global_batch // unit * unit or unit)}"
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


def first_replica(tree):
    """The copy on the first local device of every replicated leaf, still on that device (no transfer).

    Indexing a pmap output (`x[0]`, as flax.jax_utils.unreplicate does) gathers the whole array to
    every device since pmap became jit(shard_map); the first shard is already there.
    """
    return jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree)


def unreplicate(tree):
    """A host (numpy) copy of a replicated tree, read from the first local device only."""
    return jax.device_get(first_replica(tree))


def shard(batch: np.ndarray) -> np.ndarray:
    """[local_batch, ...] -> [local_devices, local_batch / local_devices, ...] (a view, no copy)."""
    n = jax.local_device_count()
    return batch.reshape(n, batch.shape[0] // n, *batch.shape[1:])


def shard_micro_batches(batch: np.ndarray, accum: int) -> np.ndarray:
    """[local_batch, ...] -> [local_devices, accum, micro-batch, ...]: each device's rows (the same rows
    `shard` gives it) cut into accum micro-batches (a view, no copy)."""
    n = jax.local_device_count()
    return batch.reshape(n, accum, batch.shape[0] // n // accum, *batch.shape[1:])


def steps_in_flight() -> int:
    """Train steps dispatched before the oldest is read: on an accelerator the host runs ahead while the
    device works; on CPUs exactly one, as back-to-back dispatch can hang XLA's all-reduce
    (docs/design.md, "Platform facts")."""
    return 1 if jax.default_backend() == "cpu" else 3


def pmap(fn, donate_state: bool = False):
    """pmap over the local devices with AXIS bound; optionally donate argument 0 (the train state).

    Donation halves the state's memory on accelerators; the CPU backend cannot donate and would
    only warn, so it is skipped there.
    """
    donate = donate_state and jax.default_backend() != "cpu"
    return jax.pmap(fn, axis_name=AXIS, donate_argnums=(0,) if donate else ())


class HostCopy:
    """jax.device_get of a tree on a background thread; result() waits and raises what it raised."""

    def __init__(self, tree):
        self._out, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(tree,), daemon=True, name="host-copy")
        self._thread.start()

    def _run(self, tree) -> None:
        try:
            self._out = jax.device_get(tree)
        except BaseException as e:  # raised on the main thread by result()
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out


class Ready:
    """A snapshot already where orbax takes it from (sharded on the devices): orbax copies each process's
    shards to its host itself, so nothing gathers the whole state anywhere."""

    def __init__(self, tree):
        self.tree = tree

    def done(self) -> bool:
        return True

    def result(self):
        return self.tree


class Replicated:
    """--parallel dp: a whole copy of the state on every local device, jax.pmap over AXIS; each device
    takes an equal slice of the batch, and gradients and metrics are averaged with pmean.

    Every layout (this one, fsdp.Sharded) answers the same questions: inside the step, `mean`, `any`,
    `rows` and `like_params`; on the host, where the state and the batches go and how results come back.
    """

    name = "dp"
    collective_sampling = False  # sampling runs on one device of the main process only
    batch_axis = None  # pmap gives each device its own sequences already

    # --- inside the step (traced under pmap) ---
    def mean(self, tree):
        """Average over all devices of all processes."""
        return jax.lax.pmean(tree, AXIS)

    def any(self, flag):
        """True on every device if it is true on any device of any process."""
        return jax.lax.pmax(flag.astype(np.int32), AXIS) > 0

    def rows(self, k: int, b: int):
        """[k, b]: the global-batch row of each of this device's k micro-batches of b sequences (the order
        `shard_micro_batches` and get_batch's per-process slices lay the global batch out in)."""
        return jax.lax.axis_index(AXIS) * k * b + jnp.arange(k * b).reshape(k, b)

    def like_params(self, tree):
        return tree

    # --- on the host ---
    def init(self, fn, *args):
        """fn(*args) computed on one device (the loop replicates it with `place_state`)."""
        return jax.jit(fn)(*args)

    def restore_target(self, abstract):
        """Where a restore puts the state: the first local device (the loop replicates it)."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)

    def place_state(self, state):
        return replicate(state)

    def place(self, tree):
        return replicate(tree)

    def compile(self, step):
        return pmap(step, donate_state=True)

    def batch(self, raw: np.ndarray, accum: int):
        return shard_micro_batches(raw, accum)

    def stop_flags(self, flag: bool):
        return np.full(jax.local_device_count(), flag)

    def read(self, tree):
        """A host copy of a result every device holds alike (status, metrics, the step)."""
        return unreplicate(tree)

    def snapshot(self, state):
        """A copy for a checkpoint: on the device first (the next step may overwrite donated buffers), then to
        the host on a background thread."""
        return HostCopy(jax.tree.map(jnp.copy, first_replica(state)))

    def one_copy(self, params):
        """Parameters a sampler can take (one device's)."""
        return first_replica(params)

    # --- evaluation: (params, tokens [B, L+1], weights [B, L]) -> per-window sums [B] ---
    def eval_step(self, fn):
        return pmap(fn)

    def eval_inputs(self, tokens: np.ndarray, weights: np.ndarray):
        return shard(np.ascontiguousarray(tokens)), shard(weights)

    def eval_rows(self, out) -> np.ndarray:
        return fetch(out).reshape(-1)


DP = Replicated()

