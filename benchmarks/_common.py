"""What every benchmark prints beside its figures, so a reader can tell slow code from a busy machine."""

from __future__ import annotations

import os
import time


def loadavg() -> str:
    return f"loadavg (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"


def matmul_tflops(n: int = 2048, repeats: int = 10) -> float:
    """Best-of-N jitted float32 n^3 matmul rate right now: how DESIGN.md measured the CPU peak.

    JAX is imported here, not at module level: bench_train sets XLA_FLAGS before JAX starts.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(x, x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x, x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12
