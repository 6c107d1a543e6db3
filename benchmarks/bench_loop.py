"""The training loop's own cost: its median step against the bare compiled step, side by side in one process.

Each pair of windows: train_char.py's loop (mingpt_palm/train.py: prefetching, signals, steps in flight,
status reads, logging) trains a fresh experiment for --steps steps, and its logged ms/step (the first,
compiling step left out, as the loop does) is one figure; then the same compiled step and state are
driven by a bare loop (batches cut beforehand; dispatch a step, read the previous one's status) for
--steps steps. The pairs alternate on the same machine, so the ratio holds while its speed drifts;
reported: every pair's ratio and their median.

  JAX_PLATFORMS=cpu python benchmarks/bench_loop.py                       # char-small, 4 pairs
  JAX_PLATFORMS=cpu python benchmarks/bench_loop.py --steps 60 --pairs 6 --json /tmp/loop.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=4, help="loop / bare pairs of windows")
    p.add_argument("--steps", type=int, default=40, help="steps per window")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim-head", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--cpu-devices", type=int, default=None, help="simulate this many CPU devices")
    p.add_argument("--data", default=str(SHAKESPEARE), help="corpus (random printable bytes if missing)")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p.parse_args(argv)


def loop_window(cfg, steps: int):
    """A fresh experiment trained by the real loop; (its logged ms/step, the trainer it leaves)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from mingpt_palm import records, start
    from mingpt_palm.train import Trainer

    run = records.record_new(start.begin(cfg))
    trainer = Trainer(run)
    trainer.loop()
    run.exp.lock.release()
    rate = [v.tensor.float_val[0] for path in sorted(run.exp.tb_dir.glob("events.*"))
            for e in EventFileLoader(str(path)).Load() for v in e.summary.value if v.tag == "train/tokens_per_second"]
    return 1e3 * cfg.batch_size * cfg.model.seq_len / rate[-1], trainer


def bare_window(trainer, steps: int) -> float:
    """The trainer's compiled step and state, driven as simply as can be; ms/step."""
    import jax
    import numpy as np

    from mingpt_palm import parallel

    batches = [trainer.make_batch(s) for s in range(steps + 1)]
    stop = np.zeros(jax.local_device_count(), bool)
    state, control = trainer.state, trainer.control
    state, control, status, _ = trainer.p_step(state, control, batches[0], stop)  # one step before the clock
    jax.block_until_ready(status)
    began, pending = time.perf_counter(), status
    for batch in batches[1:]:
        state, control, status, _ = trainer.p_step(state, control, batch, stop)
        parallel.unreplicate(pending)  # the previous step's status, as the loop reads it: one step in flight
        pending = status
    parallel.unreplicate(pending)
    trainer.state, trainer.control = state, control
    return 1e3 * (time.perf_counter() - began) / steps


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.cpu_devices}"
    import numpy as np

    from mingpt_palm.config import ModelConfig, OptimizerConfig, TrainConfig

    work = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    data = Path(args.data)
    if not data.is_file():
        data = work / "random.txt"
        data.write_bytes(bytes(np.random.default_rng(0).integers(32, 127, 2_000_000, dtype=np.uint8)))
    model = ModelConfig(dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head, seq_len=args.seq_len)
    pairs = []
    for i in range(args.pairs):
        cfg = TrainConfig(dataset_path=str(data), experiments_dir=str(work), experiment_name=f"loop{i}",
                          batch_size=args.batch, max_steps=args.steps, log_interval=args.steps, eval_interval=0,
                          checkpoint_interval=10**9, progress=False, model=model, optim=OptimizerConfig(warmup_steps=0))
        loop_ms, trainer = loop_window(cfg, args.steps)
        bare_ms = bare_window(trainer, args.steps)
        pairs.append({"loop_ms": loop_ms, "bare_ms": bare_ms, "ratio": loop_ms / bare_ms})
        print(f"pair {i + 1}: loop {loop_ms:.2f} ms/step, bare step {bare_ms:.2f} ms/step, loop / bare "
              f"{loop_ms / bare_ms:.3f}", flush=True)
    ratio = statistics.median(p["ratio"] for p in pairs)
    print(f"the loop's step over the bare compiled step: median ratio {ratio:.3f} ({100 * (ratio - 1):+.1f}%) over "
          f"{len(pairs)} pairs of {args.steps} steps; load average (1 min) at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"pairs": pairs, "median_ratio": ratio, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
