"""What every benchmark prints beside its figures, so a reader can tell slow code from a busy machine."""

from __future__ import annotations

import os
import time


def loadavg() -> str:
    return f"loadavg (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"


def matmul_tflops(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Best-of-N jitted n^3 matmul rate right now, in `dtype`: how docs/design.md measured the CPU peak.

    JAX is imported here, not at module level: bench_train sets the device count before JAX starts.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(x, x).block_until_ready()
    best = float("inf")
    # Twice the repeats, best of all: on shared cores the first calls after start-up often run slow.
    for _ in range(2 * repeats):
        t0 = time.perf_counter()
        f(x, x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12
