"""Training throughput of the real train step: tokens/s, step time, model FLOPs utilisation, memory.

The step is built exactly as mingpt_palm/train.py builds it: PaLM + make_optimizer, a jitted
init_state, parallel.pmap(partial(train.train_step, ...), donate_state=True), parallel.replicate,
and per step data.get_batch + Vocab.encode + parallel.shard (and the stop flags) on the host, with
exactly one step in flight (dispatch step t, then read step t-1's metrics). Host-side batching is
therefore inside the timing, as it is in a real run; checkpointing, evaluation and logging are not.

--warmup steps run first and are excluded; compilation happens there (XLA's compile-duration events
are summed and counted per phase and printed, so a recompilation anywhere is visible). Then --steps
steps are timed from the dispatch of the first to the arrival of the last one's metrics.

Model FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6 * N + 12 * L * H * Q * T, where
N counts the parameters of every matmul a token goes through: the dense kernels of the blocks
(the non-embedding parameters, less the LayerNorm scales, which do no matmul) plus vocab * dim for
the tied output head (its weights are the embedding's, but the head matmul is real work; the input
lookup is not). L = depth, H = heads, Q = dim_head, T = seq_len: the attention score and
weighted-sum matmuls, counted for the full T x T square as in the paper (causal masking halves the
useful part; the code computes all of it). Rematerialisation is not counted: this is model FLOPs,
not hardware FLOPs.

MFU = achieved model FLOP/s / peak. Peak: --peak-tflops, else 0.48 TFLOP/s on CPU (this machine's
float32 jitted-matmul peak, DESIGN.md, shared by all simulated CPU devices), else a table of dense
peaks per GPU kind and dtype (H100/H200: 989 bfloat16, 494.5 TF32 for float32), times the number
of GPUs. Memory: the device's peak_bytes_in_use where the backend reports memory_stats (GPU); on
CPU the process's resident set (VmRSS now, VmHWM peak).

Run from the repository root:
  JAX_PLATFORMS=cpu python benchmarks/bench_train.py [--dim 256 --depth 4 --seq-len 512 --batch 32 --steps 5]
  python benchmarks/bench_train.py --dim 1024 --depth 12 --heads 8 --dim-head 128 --dtype bfloat16 --batch 64  # GPU
tests/test_benchmarks.py runs it with tiny arguments on every test run, so that it cannot rot.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

# Run as `python benchmarks/bench_train.py`, Python puts benchmarks/ (not the repository root) on
# sys.path; the package is not pip-installed, so add the root explicitly.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import loadavg, matmul_tflops  # noqa: E402  (benchmarks/ is on sys.path)

# Dense peaks in TFLOP/s by (device_kind substring, dtype). float32 on these GPUs runs as TF32,
# XLA's default matmul precision there.
GPU_PEAK_TFLOPS = {
    ("H100", "bfloat16"): 989.0, ("H100", "float32"): 494.5,
    ("H200", "bfloat16"): 989.0, ("H200", "float32"): 494.5,
    ("A100", "bfloat16"): 312.0, ("A100", "float32"): 156.0,
}
CPU_PEAK_TFLOPS = 0.48


def proc_status(*keys: str) -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in keys:
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        import psutil

        out["VmRSS"] = psutil.Process().memory_info().rss
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--ff-mult", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=32, help="global batch in sequences, split over all devices")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="matmul compute dtype")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak TFLOP/s for MFU, per GPU (times the GPU count) or for the whole CPU "
                        f"(default: {CPU_PEAK_TFLOPS} on CPU; a known GPU's dense peak for the dtype)")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="simulate this many CPU devices (exercises the pmap/pmean path; they share the same cores)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"),
                   help="corpus file to draw batches from (random bytes if it does not exist)")
    p.add_argument("--calibration-size", type=int, default=2048,
                   help="n of the n^3 float32 matmul timed on CPU after the run, for comparison with the peak "
                        "(2048 is how DESIGN.md measured it; small sizes understate the peak)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    print(loadavg())
    import jax

    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before the backend starts
    import numpy as np

    from mingpt_palm import data, parallel
    from mingpt_palm.config import DataConfig, ModelConfig, OptimizerConfig, TrainConfig
    from mingpt_palm.model import PaLM, param_count
    from mingpt_palm.optim import make_optimizer
    from mingpt_palm.train import init_params, init_state, train_step

    if Path(args.data).is_file():
        corpus = data.load_corpus(args.data, DataConfig(), progress=False)
        split, source = corpus.train, args.data
    else:
        split, source = np.random.default_rng(args.seed).integers(0, 256, 1 << 20, dtype=np.uint8), "random bytes"
    vocab = data.Vocab.build("byte", split)

    max_steps = args.warmup + args.steps
    model_cfg = ModelConfig(seq_len=args.seq_len, dim=args.dim, depth=args.depth, heads=args.heads,
                            dim_head=args.dim_head, ff_mult=args.ff_mult, dtype=args.dtype, num_tokens=vocab.size)
    # No warmup: every timed update, the first one included, runs at the peak rate, as most of a real
    # run does. The learning rate does not change the step's cost, only what the printed losses mean.
    cfg = TrainConfig(batch_size=args.batch, max_steps=max_steps, seed=args.seed, model=model_cfg,
                      optim=OptimizerConfig(warmup_steps=0))
    local_batch = parallel.check_batch(cfg.batch_size)
    model = PaLM(cfg.model)
    tx, schedule, _ = make_optimizer(cfg.optim, max_steps, jax.eval_shape(partial(init_params, model, cfg)))
    state = jax.jit(partial(init_state, model, tx, cfg))()
    p_step = parallel.pmap(partial(train_step, model=model, tx=tx, schedule=schedule, z_loss=cfg.model.z_loss),
                           donate_state=True)
    rstate = parallel.replicate(state)
    # Counted by parameter name, not by formula, so the count follows the model if it changes:
    # `kernel` = a dense projection, `embedding` = the tied table, anything else (norm scales) no matmul.
    sizes = {"kernel": 0, "embedding": 0, "other": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
        name = path[-1].key
        sizes[name if name in sizes else "other"] += leaf.size
    n_params = param_count(state.params)
    del state

    devices = jax.devices()
    dev = devices[0]
    n_dev = len(devices)
    tokens_per_step = cfg.batch_size * args.seq_len
    print(f"devices: {n_dev} x {dev.platform} ({dev.device_kind}); jax {jax.__version__}; global batch "
          f"{cfg.batch_size} = {local_batch // jax.local_device_count()} per device x {n_dev}; "
          f"{tokens_per_step:,} tokens/step; batches from {source}")

    def step_args(step: int):
        """The step's inputs as train.py makes them: this process's sharded batch, and the per-device
        "stop requested" flags (never set here)."""
        raw = data.get_batch(split, cfg.seed, step, cfg.batch_size, args.seq_len, jax.process_index(),
                             jax.process_count())
        return parallel.shard(vocab.encode(raw)), np.full(jax.local_device_count(), False)

    # XLA reports every backend compilation's duration; summing (and counting) them per phase tells
    # compile time from step time exactly, and shows whether anything recompiled after the warm-up.
    compile_s, compiles = [0.0], [0]

    def on_duration(event, secs, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compile_s[0] += secs
            compiles[0] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)

    # Warm-up: compilation happens here; wait for each step so none of it leaks into the timed window.
    warm_times, warm_compile, losses = [], [], []
    for step in range(args.warmup):
        t0, c0 = time.perf_counter(), compile_s[0]
        rstate, metrics = p_step(rstate, *step_args(step))
        losses.append(float(metrics["loss"][0]))
        warm_times.append(time.perf_counter() - t0)
        warm_compile.append(compile_s[0] - c0)

    # Timed: one step in flight, as train.py runs (free-running dispatch can hang CPU all-reduces).
    c0, n0 = compile_s[0], compiles[0]
    t_start = time.perf_counter()
    pending = None
    for step in range(args.warmup, max_steps):
        rstate, metrics = p_step(rstate, *step_args(step))
        if pending is not None:
            float(pending["loss"][0])
        pending = metrics
    last_loss = float(pending["loss"][0])
    elapsed = time.perf_counter() - t_start
    timed_compile, timed_compiles = compile_s[0] - c0, compiles[0] - n0

    # XLA's own count of the step's floating-point work, from the lowered (not compiled) HLO: an
    # independent check of the formula. It is per device and also counts the optimizer, norms,
    # softmax and masking, so expect it a little above the model FLOPs.
    try:
        xla_flops = p_step.lower(rstate, *step_args(0)).cost_analysis()["flops"] * jax.local_device_count()
    except Exception as e:  # noqa: BLE001 - a cross-check must never sink the benchmark
        xla_flops, xla_error = None, f"{type(e).__name__}: {e}"

    step_s = elapsed / args.steps
    tok_s = tokens_per_step / step_s
    m = cfg.model
    embed, norms, dense = sizes["embedding"], sizes["other"], sizes["kernel"]
    n_matmul = dense + embed  # the tied table counts once: as the head's matmul
    attn_flops = 12 * m.depth * m.heads * m.dim_head * m.seq_len
    flops_tok = 6 * n_matmul + attn_flops

    if args.peak_tflops is not None:
        peak, peak_note = args.peak_tflops * (1 if dev.platform == "cpu" else n_dev), "--peak-tflops"
    elif dev.platform == "cpu":
        # Simulated CPU devices split the same cores, so the peak does not scale with their number.
        peak, peak_note = CPU_PEAK_TFLOPS, "CPU float32 jitted-matmul peak (DESIGN.md)"
    else:
        per = next((v for (kind, dt), v in GPU_PEAK_TFLOPS.items() if kind in dev.device_kind and dt == m.dtype), None)
        peak = None if per is None else per * n_dev
        peak_note = f"{per} dense {m.dtype} x {n_dev}" if per else "unknown device: pass --peak-tflops"

    print(f"model: {n_params:,} parameters (dim {m.dim}, depth {m.depth}, heads {m.heads}x{m.dim_head}, "
          f"ff_mult {m.ff_mult}, seq_len {m.seq_len}, {m.dtype})")
    print(f"  N (matmul parameters) = {dense:,} dense kernels + {embed:,} tied head "
          f"= {n_matmul:,}  [excluded: {embed:,} embedding lookup, {norms:,} norm scales]")
    print(f"  FLOPs/token = 6N + 12*L*H*Q*T = {6 * n_matmul:,} + 12*{m.depth}*{m.heads}*{m.dim_head}*{m.seq_len} "
          f"({attn_flops:,}) = {flops_tok:,} ({flops_tok / 1e6:.1f} MFLOP)")
    if xla_flops:
        print(f"  XLA cost analysis of the whole step: {xla_flops / tokens_per_step / 1e6:.1f} MFLOP/token "
              f"({xla_flops / tokens_per_step / flops_tok:.3f}x the formula)")
    else:
        print(f"  XLA cost analysis unavailable ({xla_error})")
    print(f"warm-up: {args.warmup} steps: " + ", ".join(f"{t:.2f} s ({c:.2f} s compiling)"
                                                     for t, c in zip(warm_times, warm_compile))
          + f"; loss {losses[0]:.3f} at step 1 -> {last_loss:.3f} at step {max_steps}")
    print(f"\ntimed: {args.steps} steps in {elapsed:.2f} s ({timed_compile:.2f} s of it compiling, "
          f"{timed_compiles} compilations)")
    print(f"  step time      {1e3 * step_s:12,.1f} ms (mean)")
    print(f"  throughput     {tok_s:12,.0f} tokens/s ({cfg.batch_size / step_s:,.2f} sequences/s)")
    achieved = tok_s * flops_tok / 1e12
    if peak:
        print(f"  model FLOP/s   {achieved:12.3f} TFLOP/s; MFU {100 * achieved / peak:.1f}% of {peak:g} TFLOP/s "
              f"({peak_note})")
    else:
        print(f"  model FLOP/s   {achieved:12.3f} TFLOP/s; MFU n/a ({peak_note})")

    stats = [d.memory_stats() for d in jax.local_devices()]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        peaks = [s["peak_bytes_in_use"] for s in stats]
        limit = stats[0].get("bytes_limit")
        print(f"  device memory  peak {max(peaks) / 2**30:.2f} GiB in use (max over {len(peaks)} devices)"
              + (f" of {limit / 2**30:.1f} GiB" if limit else ""))
    else:
        mem = proc_status("VmRSS", "VmHWM")
        rss, hwm = mem.get("VmRSS", 0) / 2**20, mem.get("VmHWM", 0) / 2**20
        print(f"  host memory    RSS {rss:,.0f} MiB now, peak {hwm:,.0f} "
              f"MiB (VmHWM; the backend reports no device memory_stats)")
    if dev.platform == "cpu":
        n = args.calibration_size
        cal = matmul_tflops(n)
        print(f"  calibration    a {n}^3 float32 matmul reaches {cal:.3f} TFLOP/s right now (best of 10; "
              f"DESIGN.md says {CPU_PEAK_TFLOPS}); the step's model FLOP/s are {100 * achieved / cal:.0f}% of that")
    print(f"{loadavg()} at the end")


if __name__ == "__main__":
    main()
