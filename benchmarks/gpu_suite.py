"""Everything this project measures on a GPU, in one command (made for the lent H100/H200 machine).

1. bench_train.py --preset gpt2-small in bfloat16: each attention implementation (xla, cudnn), with
   and without remat, at growing batch sizes until one does not fit (the last that fits is kept).
2. The other variants (palm-lite, lamda, gpt) at the best batch and remat of step 1, attention auto,
   and palm-lite and lamda (score-bias schemes) again with cuDNN, whose bias path only a GPU can run.
3. train_char.py end to end for --train-steps steps on a generated corpus (random printable bytes,
   the gpt2-small shape, the best batch and attention of step 1), its logged tokens/s (which leaves
   out compilation, evaluation and checkpoints) beside the benchmark's figure for the same settings.

Prints a table and writes every figure to --out (a folder: one JSON per run, and summary.json).

  python benchmarks/gpu_suite.py --out /tmp/gpu                         # on the GPU machine
  JAX_PLATFORMS=cpu python benchmarks/gpu_suite.py --tiny --out /tmp/x   # the same path, in seconds, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--seq-len", "32", "--windows", "2",
        "--steps", "2", "--warmup", "1", "--calibration-size", "128", "--no-ratio"]


def bench(out: Path, name: str, args: list[str]) -> dict | None:
    path = out / f"{name}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), *args, "--json", str(path)],
                          capture_output=True, text=True)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {name}: failed ({last[:160]})", flush=True)
        return None
    r = json.loads(path.read_text())
    print(f"  {name}: {r['step_ms_median']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, MFU "
          f"{100 * r['mfu_measured']:.1f}% measured / "
          + (f"{100 * r['mfu_datasheet']:.1f}% datasheet" if r["mfu_datasheet"] else "n/a datasheet")
          + f", peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB, compile {r['compile_s']:.1f} s", flush=True)
    return r


def sweep(out: Path, tiny: bool, batches: list[int]) -> list[dict]:
    results = []
    base = ["--preset", "gpt2-small", "--dtype", "bfloat16"] + (TINY + ["--dtype", "float32"] if tiny else [])
    for attention in ("xla", "cudnn"):
        for remat in ("none", "dots", "block"):
            for batch in batches:
                name = f"gpt2-small_{attention}_{remat}_b{batch}"
                r = bench(out, name, [*base, "--attention", attention, "--remat", remat, "--batch", str(batch)])
                if r is None:
                    break  # out of memory (or not supported here): larger batches will not do better
                results.append(r)
    return results


def variants(out: Path, best: dict, tiny: bool) -> list[dict]:
    base = ["--preset", "gpt2-small", "--dtype", "bfloat16"] + (TINY + ["--dtype", "float32"] if tiny else [])
    base += ["--batch", str(best["batch"]), "--remat", best["remat"]]
    results = []
    for variant, attentions in (("palm-lite", ("auto", "cudnn")), ("lamda", ("auto", "cudnn")), ("gpt", ("auto",))):
        for attention in attentions if not tiny else ("auto",):
            r = bench(out, f"{variant}_{attention}", [*base, "--variant", variant, "--attention", attention])
            if r is not None:
                results.append(r | {"variant": variant})
    return results


def end_to_end(out: Path, best: dict, steps: int, tiny: bool) -> dict:
    """train_char.py on a generated corpus with the benchmark's best settings; its logged tokens/s."""
    corpus = out / "corpus.txt"
    rng = __import__("random").Random(0)
    corpus.write_bytes(bytes(rng.randrange(32, 127) for _ in range(4_000_000 if not tiny else 100_000)))
    log_every = max(1, steps // 10)
    args = ["--dataset-path", str(corpus), "--experiments-dir", str(out / "experiments"), "--experiment-name", "e2e",
            "--model.dim", str(best["dim"]), "--model.depth", str(best["depth"]), "--model.heads", str(best["heads"]),
            "--model.dim-head", str(best["dim_head"]), "--block-size", str(best["seq_len"]), "--batch-size",
            str(best["batch"]), "--model.dtype", best["dtype"], "--model.attention", best["attention"],
            "--model.remat", best["remat"], "--max-steps", str(steps), "--log-interval", str(log_every),
            "--eval-interval", "0", "--checkpoint-interval", str(steps), "--no-progress",
            "--optim.warmup-steps", str(max(1, steps // 10))]
    proc = subprocess.run([sys.executable, str(ROOT / "train_char.py"), *args], capture_output=True, text=True)
    (out / "e2e.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"train_char.py failed:\n{proc.stderr[-3000:]}")
    rates = [float(m.replace(",", "")) for m in re.findall(r"loss [\d.]+, lr [\d.e+-]+, ([\d,]+) tokens/s", proc.stdout)]
    # The first window holds the first steps' warm-up of caches and allocators; the rest are steady state.
    steady = statistics.median(rates[1:] if len(rates) > 2 else rates)
    return {"logged_tokens_per_s_median": steady, "logged_tokens_per_s": rates, "bench_tokens_per_s": best["tokens_per_s"],
            "ratio": steady / best["tokens_per_s"], "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the JSON and logs")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--tiny", action="store_true", help="tiny shapes, to check the whole path on a CPU")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print("bench_train.py --preset gpt2-small, bfloat16:", flush=True)
    results = sweep(out, args.tiny, args.batches if not args.tiny else [4, 8])
    if not results:
        raise SystemExit("no benchmark run succeeded")
    best = max(results, key=lambda r: r["tokens_per_s"])
    print(f"best: attention {best['attention']}, remat {best['remat']}, batch {best['batch']}: "
          f"{best['tokens_per_s']:,.0f} tokens/s", flush=True)
    print("the other variants at that batch and remat:", flush=True)
    family = variants(out, best, args.tiny)
    e2e = end_to_end(out, best, args.train_steps if not args.tiny else 6, args.tiny)
    print(f"train_char.py, {e2e['steps']} steps with those settings: {e2e['logged_tokens_per_s_median']:,.0f} "
          f"tokens/s logged (median of its log windows after the first) = {100 * e2e['ratio']:.1f}% of the "
          "benchmark's", flush=True)
    (out / "summary.json").write_text(json.dumps({"runs": results, "best": best, "variants": family, "end_to_end": e2e}, indent=2) + "\n")


if __name__ == "__main__":
    main()
