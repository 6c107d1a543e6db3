"""--parallel fsdp: the train state sharded along the model width over every device of every process.

The rule, in one line: each leaf of at least --fsdp-min-bytes is split over the mesh's `data` axis along
one axis of length --model.dim (a kernel's input axis when it has that length, else its output axis; an
embedding table's width axis), and everything else is whole on every device. So the fused projection
(dim, q | kv | ff) is split by rows and never along the columns the block slices apart; Adam's moments
have their parameter's shapes and get the same split. The batch is split over the same axis, and the
step is the dp body run under jax.jit in a global view: XLA inserts the all-gathers of the weights and
the reduce-scatters of the gradients (levanter's `embed -> data`, MaxText's pure FSDP).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mingpt_palm import parallel
from mingpt_palm.errors import UserError

AXIS = "data"


def shard_axis(path: str, shape: tuple[int, ...], itemsize: int, dim: int, min_bytes: int) -> int | None:
    """The axis the rule splits a leaf along (None: the leaf stays whole). `path` is the leaf's key path
    (jax.tree_util.keystr), which tells an embedding table from a kernel."""
    if len(shape) == 0 or math.prod(shape) * itemsize < min_bytes or dim not in shape:
        return None
    if "embedding" in path:  # (rows, dim): the rows are the vocabulary or the positions
        return len(shape) - 1 - list(reversed(shape)).index(dim)
    if len(shape) == 2 and shape[0] != dim:  # a kernel (in, out) whose input is not the width: ff_out, attn_out
        return 1
    return list(shape).index(dim)


def specs(abstract, dim: int, min_bytes: int):
    """A PartitionSpec for every leaf of a tree of arrays or ShapeDtypeStructs, by the rule."""
    def spec(path, x):
        axis = shard_axis(jax.tree_util.keystr(path), tuple(x.shape), np.dtype(x.dtype).itemsize, dim, min_bytes)
        return PartitionSpec() if axis is None else PartitionSpec(*([None] * axis), AXIS)

    return jax.tree_util.tree_map_with_path(spec, abstract)


def bytes_per_device(abstract, dim: int, min_bytes: int, devices: int) -> int:
    """What a tree takes on each of `devices` devices under the rule (shapes only: a plan)."""
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(abstract):
        size = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        axis = shard_axis(jax.tree_util.keystr(path), tuple(x.shape), np.dtype(x.dtype).itemsize, dim, min_bytes)
        total += size if axis is None else size // devices
    return total


def check_width(dim: int, devices: int) -> None:
    if dim % devices:
        raise UserError(f"--parallel fsdp splits the model width (--model.dim {dim}) over the {devices} devices, "
                        f"which does not divide it; use a --model.dim that is a multiple of {devices}, or "
                        "--parallel dp")


class _InMesh:
    """A jitted function traced and run with the mesh set, as the model's activation hints
    (layers.along_batch) need; `lower` too (the benchmarks and tests compile it ahead of time)."""

    def __init__(self, fn, mesh: Mesh):
        self.fn, self.mesh = fn, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.fn(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args)


def layout(cfg, abstract):
    """The layout --parallel asks for: parallel.DP, or a Sharded one for a train state of `abstract`'s shapes."""
    return parallel.DP if cfg.parallel == "dp" else Sharded(abstract, cfg.model.dim, cfg.fsdp_min_bytes)


def mesh() -> Mesh:
    """All devices of all processes on one `data` axis, each process's devices side by side (the order in
    which make_array_from_process_local_data lays out the processes' rows)."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (AXIS,))


class Sharded:
    """--parallel fsdp: the layout parallel.Replicated describes, for a state sharded by the rule (the module's
    first paragraph) over `mesh()`. The step body is the same; here it runs under jax.jit in a global view,
    so the mean over the batch is already the global one and `mean` has nothing to do."""

    name = "fsdp"
    # Every process must take part in a computation on sharded parameters, sampling included.
    collective_sampling = True
    batch_axis = AXIS  # the per-sequence vmap (dropout) keeps sequences split over the devices

    def __init__(self, abstract, dim: int, min_bytes: int):
        self.mesh, self.dim, self.min_bytes = mesh(), dim, min_bytes
        self.n = self.mesh.size
        check_width(dim, self.n)
        self.state = self.shardings(abstract)
        self.whole = NamedSharding(self.mesh, PartitionSpec())
        self.flags = NamedSharding(self.mesh, PartitionSpec(AXIS))  # one per device; also eval rows [B, ...]
        self.micro = NamedSharding(self.mesh, PartitionSpec(None, AXIS))  # raw bytes [k, B, L+1]
        self._copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=self.state)

    def shardings(self, abstract):
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs(abstract, self.dim, self.min_bytes))

    # --- inside the step (traced under jit, global view) ---
    def mean(self, tree):
        return tree

    def any(self, flag):
        return jnp.any(flag)

    def rows(self, k: int, width: int):
        """[k, width]: the global-batch row of each sequence of the k micro-batches, numbered as dp numbers
        them (device d holds columns d*b .. d*b+b-1 of every micro-batch), so dropout masks match dp's."""
        b = width // self.n
        m, j = jnp.arange(k)[:, None], jnp.arange(width)[None, :]
        return (j // b) * k * b + m * b + j % b

    def like_params(self, tree):
        """Gradients (the accumulation's carry) sharded like the parameters: never whole on a device."""
        return jax.lax.with_sharding_constraint(tree, self.state.params)

    # --- on the host ---
    def init(self, fn, *args):
        """fn(*args) computed straight into its shards: no device ever holds the whole state."""
        return jax.jit(fn, out_shardings=self.state)(*args)

    def restore_target(self, abstract):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                            self.shardings(abstract))

    def place_state(self, state):
        return jax.device_put(state, self.state)

    def place(self, tree):
        """Whole on every device (the run control)."""
        return jax.device_put(tree, self.whole)

    def compile(self, step):
        donate = (0,) if jax.default_backend() != "cpu" else ()  # the CPU backend cannot donate
        return self._in_mesh(jax.jit(step, in_shardings=(self.state, self.whole, self.micro, self.flags),
                                     out_shardings=(self.state, self.whole, self.whole, self.whole),
                                     donate_argnums=donate))

    def _in_mesh(self, fn):
        return _InMesh(fn, self.mesh)

    def batch(self, raw: np.ndarray, accum: int):
        """This process's rows [local_batch, L+1] -> the global [k, B, L+1]: dp's per-device micro-batches
        side by side, so micro-batch m holds the same sequences as dp's m on every device."""
        per_device = parallel.shard_micro_batches(raw, accum)  # [local devices, k, b, L+1]
        local = np.ascontiguousarray(per_device.swapaxes(0, 1)).reshape(accum, -1, *raw.shape[1:])
        shape = (accum, local.shape[1] * jax.process_count(), *raw.shape[1:])
        return jax.make_array_from_process_local_data(self.micro, local, shape)

    def stop_flags(self, flag: bool):
        return jax.make_array_from_process_local_data(self.flags, np.full(jax.local_device_count(), flag),
                                                      (self.n,))

    def read(self, tree):
        """A host copy of a replicated result, from this process's first device (no cross-process call)."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)

    def snapshot(self, state):
        """A copy for a checkpoint, shard by shard on the devices (the next step may overwrite donated buffers)."""
        return parallel.Ready(self._copy(state))

    def one_copy(self, params):
        return params  # the sampler's jit gathers what it needs

    # --- evaluation ---
    def eval_step(self, fn):
        return self._in_mesh(jax.jit(fn, in_shardings=(self.state.params, self.flags, self.flags),
                                     out_shardings=self.flags))

    def eval_inputs(self, tokens: np.ndarray, weights: np.ndarray):
        n = jax.process_count()
        return tuple(jax.make_array_from_process_local_data(self.flags, np.ascontiguousarray(x),
                                                            (len(x) * n, *x.shape[1:])) for x in (tokens, weights))

    def eval_rows(self, out) -> np.ndarray:
        """This process's windows' sums, in its order (its devices' shards side by side)."""
        shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([parallel.fetch(s.data) for s in shards])
