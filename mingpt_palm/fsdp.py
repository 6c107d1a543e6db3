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
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


def mesh() -> Mesh:
    """All devices of all processes on one `data` axis, each process's devices side by side (the order in
    which make_array_from_process_local_data lays out the processes' rows)."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (AXIS,))
