"""Training throughput of the real train step: tokens/s, step time, MFU, compile time, memory, bwd/fwd.

The step is built as mingpt_palm/train.py builds it, through the layout of --parallel (dp: pmapped, the
state replicated; fsdp: jitted over the state sharded by fsdp.py's rule): state.build, layout.init and
place_state, step.train_step compiled by layout.compile with the state donated, the vocabulary table
encoding bytes on the device, batches from data.get_batch placed by layout.batch, compiled ahead of
time, and exactly as many steps in flight as train.py keeps (one on CPUs, three on accelerators),
reading one status vector per step through layout.read. Checkpointing, evaluation and logging are not
in it.

Figures (printed, and written as JSON with --json):
- step time: the median over --windows timed windows of --steps steps each, after --warmup steps;
  the spread (min, max) of the windows beside it.
- model FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6 N + 12 L H Q T, where N counts
  the parameters of every matmul a token goes through (mingpt_palm/flops.py, which --print-params
  uses too). Rematerialisation is not counted (model FLOPs, not hardware FLOPs). XLA's cost analysis
  of the compiled step is printed beside it.
- MFU against two peaks: one measured in this run with an n^3 matmul in the run's compute dtype, best
  of 20 calls, once before the timing and once after it, and the higher of the two taken (the peak
  moves from machine to machine and minute to minute on shared CPUs, docs/design.md: one slow moment in one
  measurement must not inflate the MFU; both are printed); and the datasheet's dense peak for known
  GPUs (the device kind is printed). Simulated CPU devices share the same cores: the measured peak is
  the whole machine's, not one per device.
- compile time of the step; peak memory right after the timed steps (device peak_bytes_in_use on
  GPUs; on CPUs the process's VmHWM) and XLA's own memory analysis of the compiled step, per device:
  arguments, outputs, outputs aliased to donated arguments, temporaries (what remat saves), generated
  code; and the collective ops in its HLO by kind (all-gather, reduce-scatter, all-reduce, ...).
- backward / forward: a jitted forward pass (loss) and forward + backward (value_and_grad), called in
  turn, medians; (fwd+bwd - fwd) / fwd, about 2 for a healthy step. dp: one device's parameters and
  batch on that device; fsdp: the sharded parameters and the whole batch over the mesh (the same rows
  per device), so fsdp's all-gathers are in both.
- --compare-layouts: no timing; the step compiled under dp and under fsdp for the same settings and
  devices, their per-device memory side by side (fsdp/dp) and their collectives.

Presets: char-small (issue 9's small char model: dim 128, depth 4, 4x32 heads, block 64, batch 12,
tinyshakespeare's char vocabulary), cpu-medium (dim 256, depth 6, 4x64, block 256, batch 16, bytes),
gpt2-small (dim 768, depth 12, 12x64, block 1024, bytes; ~101M parameters with the PaLM block and a
256-token vocabulary, GPT-2 small's shape without its 50k-token embedding; for GPUs).

  JAX_PLATFORMS=cpu python benchmarks/bench_train.py --preset char-small
  JAX_PLATFORMS=cpu python benchmarks/bench_train.py --preset cpu-medium --devices-sweep 1 4
  JAX_PLATFORMS=cpu python benchmarks/bench_train.py --preset cpu-medium --parallel fsdp --cpu-devices 4
  JAX_PLATFORMS=cpu python benchmarks/bench_train.py --dim 256 --depth 4 --seq-len 256 --batch 8 --compare-layouts \
      --cpu-devices 8
  python benchmarks/bench_train.py --preset gpt2-small --batch 32 --remat dots --json out.json   # GPU
tests/test_benchmarks.py runs it with tiny arguments on every test run, so that it cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

# Run as `python benchmarks/bench_train.py`, Python puts benchmarks/ (not the repository root) on
# sys.path; the package is not pip-installed, so add the root explicitly.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import loadavg, matmul_tflops  # noqa: E402  (benchmarks/ is on sys.path)

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PRESETS = {
    "char-small": dict(dim=128, depth=4, heads=4, dim_head=32, seq_len=64, batch=12, vocab="char"),
    "cpu-medium": dict(dim=256, depth=6, heads=4, dim_head=64, seq_len=256, batch=16, vocab="byte"),
    "gpt2-small": dict(dim=768, depth=12, heads=12, dim_head=64, seq_len=1024, batch=32, vocab="byte"),
}
# Dense datasheet peaks in TFLOP/s by (device_kind substring, dtype). float32 on these GPUs runs as
# TF32, XLA's default matmul precision there.
GPU_PEAK_TFLOPS = {
    ("H100", "bfloat16"): 989.0, ("H100", "float32"): 494.5,
    ("H200", "bfloat16"): 989.0, ("H200", "float32"): 494.5,
    ("A100", "bfloat16"): 312.0, ("A100", "float32"): 156.0,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-medium")
    for name in ("dim", "depth", "heads", "dim-head", "seq-len", "batch", "ff-mult"):
        p.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    p.add_argument("--vocab", choices=("byte", "char"), default=None, help="overrides the preset")
    p.add_argument("--variant", choices=("palm", "palm-lite", "lamda", "gpt"), default="palm",
                   help="model family (the preset gives only the shape)")
    p.add_argument("--position", choices=("auto", "rotary", "alibi", "t5", "learned", "sinusoidal"), default="auto")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto")
    p.add_argument("--remat", choices=("none", "block", "dots"), default="none")
    p.add_argument("--parallel", choices=("dp", "fsdp"), default="dp",
                   help="the state's layout over the devices, as train_char.py's --parallel")
    p.add_argument("--fsdp-min-bytes", type=int, default=None,
                   help="under fsdp, leaves smaller than this stay whole (default: train_char.py's)")
    p.add_argument("--compare-layouts", action="store_true",
                   help="compile the step under dp and under fsdp (no timing) and compare their per-device memory "
                        "and collectives")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update (--batch stays the global batch)")
    p.add_argument("--windows", type=int, default=3, help="timed windows (the median is reported)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--cpu-devices", type=int, default=None, help="simulate this many CPU devices (they share the cores)")
    p.add_argument("--devices-sweep", type=int, nargs="+", default=None,
                   help="run once per simulated CPU device count, each in its own process, and compare")
    p.add_argument("--data", default=str(SHAKESPEARE), help="corpus to draw batches from (random bytes if missing)")
    p.add_argument("--calibration-size", type=int, default=None,
                   help="n of the n^3 peak matmul (default 2048 on CPU, 8192 on GPU)")
    p.add_argument("--no-ratio", action="store_true", help="skip the separate forward / backward timing")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ff_mult = args.ff_mult or 4
    return args


def proc_status(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in keys:
                out[key] = int(rest.split()[0]) * 1024
    return out


def _corpus(args):
    """(train split as bytes, where it came from): the --data corpus, or random bytes without one."""
    import numpy as np

    from mingpt_palm import data
    from mingpt_palm.config import DataConfig

    if Path(args.data).is_file():
        return data.load_corpus(args.data, DataConfig(), progress=False).train, args.data
    return np.random.default_rng(args.seed).integers(0, 256, 1 << 20, dtype=np.uint8), "random bytes"


def _config(args, vocab_size: int):
    from mingpt_palm.config import ModelConfig, OptimizerConfig, TrainConfig

    model_cfg = ModelConfig(variant=args.variant, position=args.position, dropout=args.dropout,
                            seq_len=args.seq_len, dim=args.dim, depth=args.depth, heads=args.heads,
                            dim_head=args.dim_head, ff_mult=args.ff_mult, dtype=args.dtype, attention=args.attention,
                            remat=args.remat, num_tokens=vocab_size)
    min_bytes = {} if args.fsdp_min_bytes is None else {"fsdp_min_bytes": args.fsdp_min_bytes}
    # No warmup in the schedule: every update runs at the peak rate, as most of a real run does.
    return TrainConfig(batch_size=args.batch, max_steps=args.warmup + args.windows * args.steps, seed=args.seed,
                       model=model_cfg, grad_accum_steps=args.grad_accum, optim=OptimizerConfig(warmup_steps=0),
                       parallel=args.parallel, **min_bytes)


# Collective ops by name in the compiled HLO text. A result may be a tuple ("%x = (f32[..], f32[..]) all-reduce(")
# and GPU collectives are async ("all-gather-start(" ... "all-gather-done("): the op is matched after
# whitespace and before "(", its "-start" half counted, its "-done" half not. A reduce-scatter made async
# sits in its own computation ("async-start(..., calls=%...)") as a plain "reduce-scatter(", counted once.
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COLLECTIVE_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def count_collectives(hlo: str) -> dict[str, int]:
    """Collective ops in a compiled module's text, by kind. Static counts: an op inside a loop body (the
    --grad-accum scan) is one op however many times the loop runs it."""
    found = _COLLECTIVE_OP.findall(hlo)
    return {kind: found.count(kind) for kind in COLLECTIVES}


def _xla_analysis(compiled, args) -> dict:
    """XLA's own view of the compiled step, as cross-checks and per-device figures: its FLOPs of the whole
    step (None with accumulation), memory_analysis's bytes per device (arguments, outputs, outputs aliased
    to donated arguments, temporaries, generated code) and the collectives in its HLO. Both pmap's and
    jit's compiled modules are one device's program, so every figure is per device."""
    import jax

    out = {"xla_flops": None, "memory": None, "collectives": None}
    try:
        # XLA counts a loop body once: with accumulation (a scan) its count would cover one micro-batch.
        if args.grad_accum == 1:
            out["xla_flops"] = compiled.cost_analysis()["flops"] * jax.local_device_count()
    except Exception:  # noqa: BLE001 - a cross-check must never sink the benchmark
        pass
    try:
        m = compiled.memory_analysis()
        out["memory"] = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in MEMORY_FIELDS}
    except Exception:  # noqa: BLE001
        pass
    try:
        out["collectives"] = count_collectives(compiled.as_text())
    except Exception:  # noqa: BLE001
        pass
    return out


def _timed_loop(compiled, state, control, batch, args, in_flight: int, read):
    """--warmup untimed steps, then --windows windows of --steps steps, with `in_flight` steps dispatched
    before the oldest one's status is read (as train.py does, through the layout's `read`). Returns
    (seconds per step of each window, every step's loss, the last state: the loop donates each one it is
    given)."""
    import jax

    from mingpt_palm.step import STATUS

    pending, losses, windows = [], [], []

    def complete(keep: int) -> None:
        while len(pending) > keep:
            status = pending.pop(0)
            jax.block_until_ready(status)
            losses.append(float(read(status)[STATUS.index("loss")]))

    step = 0
    for n in [args.warmup] + [args.steps] * args.windows:
        t0 = time.perf_counter()
        for _ in range(n):
            state, control, status, _ = compiled(state, control, *batch(step))
            pending.append(status)
            complete(in_flight)
            step += 1
        complete(0)
        windows.append((time.perf_counter() - t0) / max(n, 1))
    return windows[1:], losses, state


def _bwd_over_fwd(model, params, tokens, z_loss: float, mesh=None, repeats: int = 7):
    """(forward seconds, forward + backward seconds), medians of calls taken in turn, so that a slow moment
    of a shared machine falls on both rather than on one of the two. `mesh`: traced and run with it set
    (fsdp's sharded parameters: the model's activation hints need it)."""
    import jax

    from mingpt_palm.loss import cross_entropy

    def loss(p):
        logits, _ = model.apply({"params": p}, tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:], z_loss)[0]

    f, fb = jax.jit(loss), jax.jit(jax.value_and_grad(loss))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        jax.block_until_ready((f(params), fb(params)))
        times = ([], [])
        for _ in range(repeats):
            for fn, out in zip((f, fb), times):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(params))
                out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def _ratio_inputs(s: "Setup", params, raw):
    """(params, tokens, mesh) for _bwd_over_fwd with the same rows per device as the step. dp: one device's
    parameters (layout.one_copy) and its rows, on that device. fsdp: the sharded parameters as they are
    (layout.one_copy gives them back unchanged) and the whole batch split by sequence over the mesh, so the
    ratio is fsdp's own forward and backward, the weights' all-gathers and the gradients' reductions in it."""
    import jax
    import jax.numpy as jnp

    if s.layout.name == "dp":
        rows = raw[: len(raw) // jax.local_device_count()]
        return s.layout.one_copy(params), jnp.asarray(s.vocab.encode(rows)), None
    tokens = jax.device_put(s.vocab.encode(raw), s.layout.flags)  # flags: [devices, ...] split over the mesh
    return s.layout.one_copy(params), tokens, s.layout.mesh


def _peak_memory():
    """(bytes, what they are): the devices' own peak where they report one, else the process's VmHWM."""
    import jax

    stats = [d.memory_stats() for d in jax.local_devices()]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        return max(s["peak_bytes_in_use"] for s in stats), "device peak_bytes_in_use"
    return proc_status("VmHWM").get("VmHWM"), "host VmHWM (whole process)"


def _start_jax(args):
    import jax

    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before the backend starts
    # Compile time is one of the figures: a JAX_COMPILATION_CACHE_DIR (README) would report a load instead.
    jax.config.update("jax_enable_compilation_cache", False)


class Setup(NamedTuple):
    """What train.py's Trainer holds before its first step, built the way it builds them."""

    cfg: Any
    built: Any
    vocab: Any
    layout: Any
    state: Any  # placed by the layout
    control: Any
    step: Any  # the layout's compiled-on-call step (it has .lower)
    split: Any
    source: str

    def raw(self, step: int):
        """This process's rows of the batch of `step`, as train.py's data.batch cuts them."""
        import jax

        from mingpt_palm import data

        return data.get_batch(self.split, self.cfg.seed, step, self.cfg.batch_size, self.cfg.model.seq_len,
                              jax.process_index(), jax.process_count())

    def batch(self, step: int):
        """(bytes, stop flags): the step's two host-made arguments, placed by the layout."""
        return self.layout.batch(self.raw(step), self.cfg.grad_accum_steps), self.layout.stop_flags(False)

    def state_bytes(self) -> int:
        """The train state's bytes on each device by the layout's rule (a plan from shapes)."""
        from mingpt_palm import fsdp
        from mingpt_palm.flops import nbytes

        if self.layout.name == "dp":
            return nbytes(self.built.abstract)
        return fsdp.bytes_per_device(self.built.abstract, self.cfg.model.dim, self.cfg.fsdp_min_bytes, self.layout.n)


def prepare(args, split, source) -> Setup:
    """The state, control and step under --parallel as start.py and train.py make them: build, the layout
    (start._settle's rule), layout.init and place_state, the step partial compiled by layout.compile."""
    import jax.numpy as jnp

    from mingpt_palm import fsdp, parallel
    from mingpt_palm.model import attention_implementation
    from mingpt_palm.state import build, init_state
    from mingpt_palm.step import Control, train_step
    from mingpt_palm.vocab import Vocab

    vocab = Vocab.build(args.vocab, split)
    cfg = _config(args, vocab.size)
    parallel.check_batch(cfg.batch_size, cfg.grad_accum_steps)
    attention_implementation(cfg.model)  # refuses a kernel this machine cannot run, before any work
    built = build(cfg)
    layout = fsdp.layout(cfg, built.abstract)
    state = layout.place_state(layout.init(partial(init_state, built.model, built.tx, cfg)))
    step = layout.compile(partial(
        train_step, model=built.model, tx=built.tx, schedule=built.schedule, z_loss=cfg.model.z_loss,
        table=jnp.asarray(vocab.table), byte_lengths=jnp.asarray(vocab.byte_lengths),
        max_nonfinite=cfg.max_nonfinite_steps, seed=cfg.seed, layout=layout))
    return Setup(cfg, built, vocab, layout, state, layout.place(Control.start()), step, split, source)


def run(args) -> dict:
    _start_jax(args)
    import jax

    from mingpt_palm import parallel
    from mingpt_palm.flops import attention_flops, flops_per_token, matmul_params
    from mingpt_palm.model import attention_implementation, compute_dtype, param_count

    s = prepare(args, *_corpus(args))
    cfg, model_cfg = s.cfg, s.cfg.model
    dense, embed, norms = matmul_params(s.built.abstract.params)
    flops_tok, n_params = flops_per_token(s.built.abstract.params, model_cfg), param_count(s.built.abstract.params)
    dev, n_dev = jax.devices()[0], jax.device_count()
    dtype = compute_dtype(model_cfg).name

    # The peak first, before any timing, in the run's own dtype; again after the timing.
    cal_n = args.calibration_size or (2048 if dev.platform == "cpu" else 8192)
    peak_before = matmul_tflops(cal_n, dtype=dtype)
    t0 = time.perf_counter()
    compiled = s.step.lower(s.state, s.control, *s.batch(0)).compile()
    compile_s = time.perf_counter() - t0
    xla = _xla_analysis(compiled, args)
    in_flight = parallel.steps_in_flight()
    windows, losses, state = _timed_loop(compiled, s.state, s.control, s.batch, args, in_flight, s.layout.read)
    peak_mem, mem_kind = _peak_memory()  # before anything else allocates: the step's own peak
    peak_after = matmul_tflops(cal_n, dtype=dtype)
    peak_measured = max(peak_before, peak_after)
    fwd = both = bwd_ratio = None
    if not args.no_ratio:
        params, tokens, mesh = _ratio_inputs(s, state.params, s.raw(0))
        fwd, both = _bwd_over_fwd(s.built.model, params, tokens, model_cfg.z_loss, mesh)
        bwd_ratio = (both - fwd) / fwd

    step_s = statistics.median(windows)
    tokens_per_step = cfg.batch_size * args.seq_len
    achieved = tokens_per_step / step_s * flops_tok / 1e12
    per = next((v for (kind, dt), v in GPU_PEAK_TFLOPS.items() if kind in dev.device_kind and dt == dtype), None)
    return {
        "preset": args.preset, "variant": args.variant, "device_kind": dev.device_kind, "platform": dev.platform, "devices": n_dev,
        "parallel": s.layout.name, "fsdp_min_bytes": cfg.fsdp_min_bytes,
        "jax": jax.__version__, "source": s.source, "params": n_params, "matmul_params": dense + embed,
        "norm_params": norms, "dim": args.dim, "depth": args.depth, "heads": args.heads, "dim_head": args.dim_head,
        "seq_len": args.seq_len, "batch": args.batch, "grad_accum": args.grad_accum, "vocab": s.vocab.size,
        "dtype": dtype, "attention": attention_implementation(model_cfg), "remat": args.remat,
        "in_flight": in_flight, "tokens_per_step": tokens_per_step,
        "step_ms_median": 1e3 * step_s, "step_ms_windows": [1e3 * w for w in windows],
        "tokens_per_s": tokens_per_step / step_s, "flops_per_token": flops_tok,
        "attention_flops_per_token": attention_flops(model_cfg),
        "xla_flops_per_token": xla["xla_flops"] / tokens_per_step if xla["xla_flops"] else None,
        "achieved_tflops": achieved, "peak_measured_tflops": peak_measured, "peak_matmul_n": cal_n,
        "peak_before_tflops": peak_before, "peak_after_tflops": peak_after,
        "mfu_measured": achieved / peak_measured,
        "peak_datasheet_tflops": per * n_dev if per else None,
        "mfu_datasheet": achieved / (per * n_dev) if per else None,
        "compile_s": compile_s, "peak_memory_bytes": peak_mem, "peak_memory_kind": mem_kind,
        "xla_temp_bytes": xla["memory"]["temp"] if xla["memory"] else None, "xla_memory": xla["memory"],
        "collectives": xla["collectives"], "state_bytes_per_device": s.state_bytes(),
        "fwd_ms": 1e3 * fwd if fwd else None,
        "fwd_bwd_ms": 1e3 * both if both else None, "bwd_over_fwd": bwd_ratio,
        "loss_first": losses[0], "loss_last": losses[-1], "load_before": loadavg(),
    }


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.2f} MiB"


def _collectives_line(counts) -> str:
    if counts is None:
        return "n/a"
    return ", ".join(f"{kind} {n}" for kind, n in counts.items() if n or kind in COLLECTIVES[:3])


def show_layout(r: dict) -> None:
    """The layout's lines: what XLA says the compiled step holds on each device, and its collectives."""
    rule = f" (--fsdp-min-bytes {r['fsdp_min_bytes']:,})" if r["parallel"] == "fsdp" else ""
    print(f"  layout         {r['parallel']} over {r['devices']} device(s); train state "
          f"{_mib(r['state_bytes_per_device'])} per device by the layout's rule{rule}")
    m = r["xla_memory"]
    if m:
        print(f"  XLA memory     per device: arguments {_mib(m['argument'])}, outputs {_mib(m['output'])} (aliased to "
              f"donated arguments {_mib(m['alias'])}), temporaries {_mib(m['temp'])}, generated code "
              f"{_mib(m['generated_code'])}")
    print(f"  collectives    {_collectives_line(r['collectives'])} (ops in the compiled step's HLO; one in a loop "
          "body counts once)")
    if r["parallel"] == "fsdp" and r["platform"] == "cpu" and r["devices"] > 1:
        print("                 (XLA's CPU pipeline has no reduce-scatter: the gradients' reduce-scatter is an "
              "all-reduce + dynamic-slice here; a GPU compiles a reduce-scatter)")


def show(r: dict) -> None:
    print(f"devices: {r['devices']} x {r['platform']} ({r['device_kind']}), --parallel {r['parallel']}; "
          f"jax {r['jax']}; batch {r['batch']} "
          f"({r['grad_accum']} micro-batch(es)), {r['tokens_per_step']:,} tokens/step; {r['in_flight']} step(s) in "
          f"flight; batches from {r['source']}")
    print(f"model: {r['variant']}, {r['params']:,} parameters (dim {r['dim']}, depth {r['depth']}, heads {r['heads']}x{r['dim_head']}, "
          f"seq_len {r['seq_len']}, vocab {r['vocab']}); compute {r['dtype']}, attention {r['attention']}, "
          f"remat {r['remat']}")
    print(f"  FLOPs/token = 6N + 12*L*H*Q*T = 6*{r['matmul_params']:,} + {r['attention_flops_per_token']:,} = "
          f"{r['flops_per_token']:,} "
          f"({r['flops_per_token'] / 1e6:.1f} MFLOP)")
    if r["xla_flops_per_token"]:
        print(f"  XLA cost analysis of the whole step: {r['xla_flops_per_token'] / 1e6:.1f} MFLOP/token "
              f"({r['xla_flops_per_token'] / r['flops_per_token']:.3f}x the formula)")
    else:
        print("  XLA cost analysis: not shown (with --grad-accum > 1 it counts the scan's body once)")
    print(f"  compile        {r['compile_s']:10.1f} s")
    w = r["step_ms_windows"]
    print(f"  step time      {r['step_ms_median']:10.1f} ms (median of {len(w)} windows; min {min(w):.1f}, "
          f"max {max(w):.1f})")
    print(f"  throughput     {r['tokens_per_s']:10,.0f} tokens/s")
    print(f"  model FLOP/s   {r['achieved_tflops']:10.3f} TFLOP/s")
    print(f"  MFU            {100 * r['mfu_measured']:10.1f}% of {r['peak_measured_tflops']:.3f} TFLOP/s measured in this "
          f"run ({r['peak_matmul_n']}^3 {r['dtype']} matmul, the higher of {r['peak_before_tflops']:.3f} before "
          f"and {r['peak_after_tflops']:.3f} after the timing"
          + ("; all simulated devices share these cores)" if r["platform"] == "cpu" else ")"))
    if r["mfu_datasheet"] is not None:
        print(f"  MFU            {100 * r['mfu_datasheet']:10.1f}% of the datasheet's {r['peak_datasheet_tflops']:g} "
              f"TFLOP/s dense {r['dtype']} ({r['device_kind']})")
    else:
        print("  MFU (datasheet) n/a: no datasheet peak for this device and dtype")
    print(f"  peak memory    {r['peak_memory_bytes'] / 2**20:10,.0f} MiB ({r['peak_memory_kind']}); XLA temporaries of "
          f"the step {r['xla_temp_bytes'] / 2**20 if r['xla_temp_bytes'] is not None else float('nan'):,.1f} MiB")
    show_layout(r)
    if r["bwd_over_fwd"] is not None:
        on = ("one device's batch" if r["parallel"] == "dp" else
              f"the whole batch over the {r['devices']} device(s), fsdp's all-gathers in it")
        print(f"  backward/fwd   {r['bwd_over_fwd']:10.2f} (forward {r['fwd_ms']:.1f} ms on {on})")
    print(f"  loss {r['loss_first']:.3f} at step 1 -> {r['loss_last']:.3f}")


def compare_layouts(args) -> dict:
    """The step compiled under dp and under fsdp for the same settings and devices, not run: what each holds
    on a device (XLA's memory_analysis, and the state by the layout's rule) and its collectives."""

    _start_jax(args)
    import jax

    split, source = _corpus(args)
    results = {"devices": jax.device_count(), "platform": jax.devices()[0].platform, "layouts": {}}
    for name in ("dp", "fsdp"):
        s = prepare(argparse.Namespace(**{**vars(args), "parallel": name}), split, source)
        t0 = time.perf_counter()
        compiled = s.step.lower(s.state, s.control, *s.batch(0)).compile()
        xla = _xla_analysis(compiled, args)
        results["layouts"][name] = {"memory": xla["memory"], "collectives": xla["collectives"],
                                    "state_bytes_per_device": s.state_bytes(), "compile_s": time.perf_counter() - t0,
                                    "fsdp_min_bytes": s.cfg.fsdp_min_bytes}
        del s, compiled  # one layout's state on the devices at a time
    show_comparison(results, args)
    return results


def _peak_bound(m: dict) -> int:
    return m["argument"] + m["output"] - m["alias"] + m["temp"]


def show_comparison(results: dict, args) -> None:
    dp, fs = results["layouts"]["dp"], results["layouts"]["fsdp"]
    print(f"dim {args.dim}, depth {args.depth}, heads {args.heads}x{args.dim_head}, seq_len {args.seq_len}, batch "
          f"{args.batch} ({args.grad_accum} micro-batch(es)), --fsdp-min-bytes {fs['fsdp_min_bytes']:,}; the step "
          f"compiled for {results['devices']} {results['platform']} device(s), per device:")
    print(f"  {'':22}{'dp':>14}{'fsdp':>14}{'fsdp/dp':>9}")
    rows = [(f"XLA {k.replace('_', ' ')}", dp["memory"][k], fs["memory"][k]) for k in MEMORY_FIELDS]
    # What the step needs at once on a device, at most: outputs aliased to donated arguments count once.
    rows.append(("XLA arg+out-alias+temp", *(_peak_bound(x["memory"]) for x in (dp, fs))))
    rows.append(("train state (rule)", dp["state_bytes_per_device"], fs["state_bytes_per_device"]))
    for label, a, b in rows:
        print(f"  {label:22}{_mib(a):>14}{_mib(b):>14}" + (f"{b / a:9.3f}" if a else f"{'-':>9}"))
    for kind in COLLECTIVES:
        a, b = dp["collectives"][kind], fs["collectives"][kind]
        if a or b or kind in COLLECTIVES[:3]:
            print(f"  {kind + ' ops':22}{a:>14}{b:>14}")
    if results["platform"] == "cpu":
        print("  (simulated CPU devices share this machine's cores: these are memory and collective figures, not "
              "speed. XLA's CPU pipeline has no reduce-scatter: fsdp's gradient reduce-scatter is an all-reduce + "
              "dynamic-slice here; a GPU compiles a reduce-scatter)")


def sweep(args, counts) -> list[dict]:
    """One process per simulated device count (the count is fixed when JAX starts)."""
    results = []
    for n in counts:
        out = Path(f"/tmp/bench_train_{os.getpid()}_{n}.json")
        argv = [a for a in sys.argv[1:]]
        i = argv.index("--devices-sweep")
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        argv = argv[:i] + argv[j:] + ["--cpu-devices", str(n), "--json", str(out)]
        subprocess.run([sys.executable, __file__, *argv], check=True)
        results.append(json.loads(out.read_text()))
        out.unlink()
    print(f"\ndevices  step ms  tokens/s  MFU (measured peak)   (--parallel {args.parallel}; simulated CPU devices "
          "share the same cores: more of them is not a speed-up, only the collectives' path)")
    for r in results:
        print(f"{r['devices']:>7} {r['step_ms_median']:8.1f} {r['tokens_per_s']:9,.0f} {100 * r['mfu_measured']:8.1f}%")
    return results


def main() -> None:
    from mingpt_palm.errors import UserError

    args = parse_args()
    print(loadavg())
    if args.devices_sweep:
        results = sweep(args, args.devices_sweep)
    elif args.compare_layouts:
        results = compare_layouts(args)
    else:
        try:
            results = run(args)
        except UserError as e:  # a setting this machine cannot run (cudnn on a CPU, say): one line
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        show(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{loadavg()} at the end")


if __name__ == "__main__":
    main()
