"""Generation speed: cached (KV-cache) decoding against full recomputation, characters per second.

For each context length C in --contexts, builds a PaLM with seq_len = C and random weights, and a
random prompt of exactly C tokens, so every generated character works at full context: the
cached path attends over a full cache of C keys, the recompute path runs a whole C-token forward
per character. Both go through mingpt_palm.sampling.generate (recompute=False / True) at the same
settings: batch --batch, --new-chars characters, greedy (temperature 0).

Each path is called once with the same shapes first (that call compiles; its time is printed as
"first call"), then timed --repeats times; generate returns a host numpy array, so each timed call
includes waiting for the device. chars/s = batch * new_chars / best (minimum) time: on shared
cores the best of a few runs is the closest to the code's own cost (the median is printed too,
as the spread). The cached time includes the one C-token prompt pass that fills the cache; that
is part of generating. Pairs of back-to-back cached calls of 1 and --new-chars characters split
the cached time into that prompt pass and the marginal cost per further character.

Also prints the key/value cache size per sequence, measured from model.init_cache, against what
multi-head attention (heads key and value heads instead of one) would store, and how many greedy
characters the two paths agree on (they may part ways: with a full window, the cached keys still
carry context from characters the recompute window has dropped).

Run from the repository root:
  JAX_PLATFORMS=cpu python benchmarks/bench_generate.py [--contexts 512 1024] [--new-chars 128]
tests/test_benchmarks.py runs it with tiny arguments on every test run, so that it cannot rot.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# Run as `python benchmarks/bench_generate.py`, Python puts benchmarks/ (not the repository root) on
# sys.path; the package is not pip-installed, so add the root explicitly.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import loadavg, matmul_tflops  # noqa: E402  (benchmarks/ is on sys.path)
from mingpt_palm.config import ModelConfig  # noqa: E402
from mingpt_palm.model import PaLM, compute_dtype, init_cache, param_count  # noqa: E402
from mingpt_palm.sampling import generate  # noqa: E402


# XLA reports each backend compilation's duration; a timed call must never include one.
_compile_s = [0.0]
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **_: _compile_s.__setitem__(0, _compile_s[0] + secs)
    if event == "/jax/core/compile/backend_compile_duration" else None)


def timed(fn, repeats: int) -> tuple[float, list[float], np.ndarray]:
    """(first-call seconds, timed seconds, output); the first call compiles and is not timed."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    c0 = _compile_s[0]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()  # generate() returns np.asarray(...), which waits for the device
        times.append(time.perf_counter() - t0)
    if _compile_s[0] > c0:
        print(f"WARNING: {_compile_s[0] - c0:.2f} s of compilation inside the timed calls")
    return first, times, out


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 1024], help="model seq_len = prompt length")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--batch", type=int, default=1, help="sequences generated together (num_samples)")
    p.add_argument("--new-chars", type=int, default=128, help="characters generated per call")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per path (best and median reported)")
    p.add_argument("--calibration-size", type=int, default=2048,
                   help="n of the n^3 float32 matmul timed at the end, to tell a busy machine from slow code")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def measure(args, ctx: int, describe: bool) -> dict:
    """Cached against recomputed generation at context ctx: speeds, their agreement, the cache's size."""
    cfg = ModelConfig(seq_len=ctx, dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head,
                      dtype=args.dtype, num_tokens=256)
    params = jax.jit(PaLM(cfg).init)(jax.random.PRNGKey(args.seed), jnp.zeros((1, ctx), jnp.int32))["params"]
    prompt = np.random.default_rng(args.seed).integers(0, 256, size=ctx, dtype=np.int32)
    key = jax.random.PRNGKey(args.seed)
    if describe:
        print(f"model: {param_count(params):,} parameters (dim {cfg.dim}, depth {cfg.depth}, heads "
              f"{cfg.heads}x{cfg.dim_head}, multi-query, {compute_dtype(cfg).name}); batch {args.batch}, "
              f"{args.new_chars} new chars, greedy, prompt = full context; best of {args.repeats}")

    result = {"ctx": ctx}
    for name, recompute in (("cached", False), ("recompute", True)):
        def call():
            return generate(params, cfg, prompt, args.new_chars, key, num_samples=args.batch,
                            temperature=0.0, recompute=recompute)

        first, times, out = timed(call, args.repeats)
        med = statistics.median(times)
        result[name] = {"first": first, "median": med, "min": min(times),
                        "chars_s": args.batch * args.new_chars / min(times), "out": out}
    # The cached call = one C-token prompt pass + new_chars cheap steps; a 1-character call
    # isolates the prompt pass. The two are timed back to back in pairs (both are cheap), so
    # that a change of load on shared cores hits both sides of each difference alike.
    def one():
        return generate(params, cfg, prompt, 1, key, num_samples=args.batch, temperature=0.0)

    def full():
        return generate(params, cfg, prompt, args.new_chars, key, num_samples=args.batch, temperature=0.0)

    timed(one, 0)  # compiles the 1-character variant
    pairs = []
    for _ in range(max(args.repeats, 5)):
        t0 = time.perf_counter()
        one()
        t1 = time.perf_counter()
        full()
        pairs.append((t1 - t0, time.perf_counter() - t1))
    result["prefill"] = min(t for t, _ in pairs)
    result["per_char"] = statistics.median(f - o for o, f in pairs) / max(args.new_chars - 1, 1)
    a, b = result["cached"]["out"], result["recompute"]["out"]
    mismatch = np.flatnonzero((a != b).any(axis=0))
    result["agree"] = int(mismatch[0]) if len(mismatch) else args.new_chars

    # Measured, not computed: the leaves init_cache allocates for one sequence (the position
    # table is shared by the batch and counted once).
    cache = jax.eval_shape(lambda: init_cache(cfg, (1,)))
    result["kv_bytes"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache["layers"]))
    result["pos_bytes"] = cache["pos"].size * cache["pos"].dtype.itemsize
    result["mha_bytes"] = 2 * cfg.depth * ctx * cfg.heads * cfg.dim_head * compute_dtype(cfg).itemsize
    return result


def show(rows: list[dict], args, dev) -> None:
    print(f"\n{'context':>7} {'path':>9} {'chars/s':>9} {'best s':>7} {'median s':>9} {'first call s':>13} "
          f"{'speed-up':>9} {'greedy chars equal':>19}")
    for r in rows:
        ratio = r["cached"]["chars_s"] / r["recompute"]["chars_s"]
        for name in ("cached", "recompute"):
            x = r[name]
            extra = (f"{ratio:>8.1f}x {r['agree']:>9} of {args.new_chars:<6}" if name == "cached" else "")
            print(f"{r['ctx']:>7} {name:>9} {x['chars_s']:>9,.1f} {x['min']:>7.3f} {x['median']:>9.3f} "
                  f"{x['first']:>13.2f} {extra}")

    dtype = compute_dtype(ModelConfig(dtype=args.dtype))
    item = dtype.itemsize
    print(f"\nKV cache per sequence ({dtype.name}: {item} bytes/number; formula 2 * depth * context * dim_head "
          f"* bytes for multi-query, x heads for multi-head)")
    print(f"{'context':>7} {'multi-query (measured)':>23} {'multi-head would need':>22} {'ratio':>6}")
    for r in rows:
        ratio = r["mha_bytes"] / r["kv_bytes"]
        print(f"{r['ctx']:>7} {r['kv_bytes']:>16,} bytes {r['mha_bytes']:>16,} bytes {ratio:>5.0f}x"
              f"   (+{r['pos_bytes']:,} bytes of positions shared by the batch)")

    print("\ncached call split: prompt pass (best 1-character call) + marginal cost per further character "
          "(median over back-to-back pairs)")
    print(f"{'context':>7} {'prompt pass ms':>15} {'ms / cached char':>17} {'ms / recomputed char':>21}")
    for r in rows:
        print(f"{r['ctx']:>7} {1e3 * r['prefill']:>15.1f} {1e3 * r['per_char']:>17.3f} "
              f"{1e3 * r['recompute']['min'] / args.new_chars:>21.1f}")
    n = args.calibration_size
    print(f"\n{loadavg()} at the end; a {n}^3 float32 matmul "
          f"reaches {matmul_tflops(n):.3f} TFLOP/s now ({dev.platform})")


def main() -> None:
    args = parse_args()
    print(loadavg())
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}); jax {jax.__version__}")
    rows = [measure(args, ctx, describe=ctx == args.contexts[0]) for ctx in args.contexts]
    show(rows, args, dev)


if __name__ == "__main__":
    main()
