"""Everything this project measures on a GPU, in one command that fits a short lease of the machine.

The lent GPU machine gives a session 15 minutes in all, its start-up included, and 10 minutes a
command; gpt2-small compiles in tens of seconds per configuration. So the runs go in order of what
matters most, each a fresh bench_train.py process (an out-of-memory run cannot poison the next, and
each reports its own peak memory), inside a wall-clock budget (--budget-s): a run whose expected
length (the median of the runs so far) no longer fits is skipped and named, and summary.json is
rewritten after every run, so whatever the budget allowed is on disk even if the command is cut off.

1. gpt2-small in bfloat16 at --batch with cuDNN's fused attention (with the backward/forward ratio),
   then with XLA's attention: the headline MFU and the kernel comparison.
   Then the faster of the two under --parallel fsdp over the one GPU: its tokens/s over dp's (the issue
   asks within a few percent), and both steps' per-device XLA memory and collectives in summary.json.
2. Larger batches (--more-batches) with the faster kernel, until one does not fit or gains < 3%.
3. remat dots and block at the best batch: the memory they save and the time they cost.
4. train_char.py end to end (--train-steps, a generated corpus, the best settings): its logged tokens/s
   (which leave out compilation, evaluation and checkpoints) beside the benchmark's for the same step.
5. The other variants (palm-lite, lamda, gpt) at the best settings, attention auto, and palm-lite and
   lamda (score-bias schemes) with cuDNN, whose bias path only a GPU can run.

  bash benchmarks/fetch_gpu_wheels.sh                 # here, once: tyro and its needs into .whl/
  python benchmarks/gpu_suite.py --out $OUT           # there (docs/measurements.md, "GPU": the full call)
  JAX_PLATFORMS=cpu python benchmarks/gpu_suite.py --tiny --out /tmp/x   # the same path in seconds on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--seq-len", "32", "--windows", "2",
        "--steps", "2", "--warmup", "1", "--calibration-size", "128", "--dtype", "float32"]
MIN_GAIN = 1.03  # a larger batch must buy at least this much throughput to be worth its memory
FIRST_RUN_S = 90.0  # what a first gpt2-small run is expected to take before any has been timed


class Suite:
    """The budget, the results so far, and summary.json (rewritten after every run)."""

    def __init__(self, out: Path, runs: Path, budget_s: float, tiny: bool):
        self.out, self.runs, self.budget_s, self.tiny = out, runs, budget_s, tiny
        self.start = time.monotonic()
        self.durations: list[float] = []
        self.summary: dict = {"budget_s": budget_s, "runs": [], "variants": [], "skipped": [], "failed": []}

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def fits(self, name: str) -> bool:
        expected = statistics.median(self.durations) if self.durations else min(FIRST_RUN_S, self.budget_s)
        if self.remaining() < expected:
            print(f"  {name}: skipped ({max(0.0, self.remaining()):.0f} s of the budget left, a run takes ~{expected:.0f} s)",
                  flush=True)
            self.summary["skipped"].append(name)
            self.save()
            return False
        return True

    def call(self, name: str, argv: list[str]) -> subprocess.CompletedProcess | None:
        """Runs argv within what is left of the budget; None (and the reason recorded) if it fails."""
        if not self.fits(name):
            return None
        t0 = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                                  timeout=max(1.0, self.remaining()))
        except subprocess.TimeoutExpired as e:
            # (the captured output of a timed-out run comes back as bytes, text=True or not)
            err = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
            (self.runs / f"{name}.log").write_text(err)
            return self._fail(name, f"{err}\ncut off at the end of the budget after {time.monotonic() - t0:.0f} s")
        (self.runs / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:  # a refusal takes seconds: it would make the estimate a lie
            return self._fail(name, proc.stderr)
        self.durations.append(time.monotonic() - t0)
        return proc

    def _fail(self, name: str, stderr: str) -> None:
        lines = stderr.strip().splitlines() or ["?"]
        print(f"  {name}: failed ({lines[-1][:200]})", flush=True)
        # The runs' logs may stay on the lent machine: the end of the error travels in the summary.
        self.summary["failed"].append({"name": name, "why": lines[-1], "stderr_tail": lines[-30:]})
        self.save()
        return None

    def bench(self, name: str, args: list[str], ratio: bool = False) -> dict | None:
        path = self.runs / f"{name}.json"
        base = ["--preset", "gpt2-small", "--dtype", "bfloat16"] + (TINY if self.tiny else [])
        argv = [str(ROOT / "benchmarks" / "bench_train.py"), *base, *args, "--json", str(path)]
        if self.call(name, argv + ([] if ratio else ["--no-ratio"])) is None:
            return None
        r = json.loads(path.read_text()) | {"name": name}
        print(f"  {name}: {r['parallel']}, {r['step_ms_median']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, MFU "
              f"{100 * r['mfu_measured']:.1f}% measured / "
              + (f"{100 * r['mfu_datasheet']:.1f}% datasheet" if r["mfu_datasheet"] else "n/a datasheet")
              + f", peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB, compile {r['compile_s']:.1f} s"
              + (f", backward/forward {r['bwd_over_fwd']:.2f}" if r["bwd_over_fwd"] is not None else ""), flush=True)
        return r

    def save(self) -> None:
        self.summary["elapsed_s"] = time.monotonic() - self.start
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")


def attention(suite: Suite, batch: int) -> list[dict]:
    """Step 1: each kernel at the first batch."""
    runs = []
    for attention in ("cudnn", "xla"):
        r = suite.bench(f"gpt2-small_{attention}_none_b{batch}", ["--attention", attention, "--batch", str(batch)],
                        ratio=not runs)
        runs += [r] if r else []
    return runs


def fsdp_one_device(suite: Suite, dp: dict) -> dict | None:
    """Step 1b: the headline step under --parallel fsdp over the one device, beside dp's (the issue: on one
    GPU fsdp must cost within a few percent of dp). Both runs' JSON hold XLA's per-device memory and the
    step's collectives; summary.json keeps them side by side."""
    r = suite.bench(f"{dp['name']}_fsdp", ["--attention", dp["attention"], "--batch", str(dp["batch"]),
                                           "--parallel", "fsdp"])
    if r is None:
        return None
    ratio = r["tokens_per_s"] / dp["tokens_per_s"]
    keep = ("name", "parallel", "devices", "tokens_per_s", "step_ms_median", "xla_memory", "collectives",
            "state_bytes_per_device", "peak_memory_bytes")
    print(f"  fsdp over {r['devices']} device(s) / dp: {ratio:.3f} of dp's tokens/s (one run each: the issue asks "
          f"within a few percent)", flush=True)
    return {"dp": {k: dp[k] for k in keep}, "fsdp": {k: r[k] for k in keep}, "tokens_per_s_ratio": ratio}


def larger_batches(suite: Suite, runs: list[dict], more: list[int]) -> list[dict]:
    """Step 2: larger batches with the faster kernel, until one does not fit or gains < MIN_GAIN."""
    best, added = max(runs, key=lambda r: r["tokens_per_s"]), []
    for b in more:
        r = suite.bench(f"gpt2-small_{best['attention']}_none_b{b}", ["--attention", best["attention"], "--batch", str(b)])
        if r is None:
            break  # out of memory (or out of budget): a larger batch will not do better
        added.append(r)
        gained = r["tokens_per_s"] / best["tokens_per_s"]
        best = max(best, r, key=lambda x: x["tokens_per_s"])
        if gained < MIN_GAIN:
            break
    return added


def remat(suite: Suite, best: dict) -> list[dict]:
    """Step 3: the same step with each remat policy, for the memory it saves."""
    runs = []
    for policy in ("dots", "block"):
        r = suite.bench(f"gpt2-small_{best['attention']}_{policy}_b{best['batch']}",
                        ["--attention", best["attention"], "--batch", str(best["batch"]), "--remat", policy])
        runs += [r] if r else []
    return runs


def variants(suite: Suite, best: dict) -> list[dict]:
    """Step 5: the rest of the family at the best settings."""
    base = ["--batch", str(best["batch"]), "--remat", best["remat"]]
    results = []
    plan = (("palm-lite", "auto"), ("lamda", "auto"), ("gpt", "auto"), ("palm-lite", "cudnn"), ("lamda", "cudnn"))
    for variant, attention in plan[:1] if suite.tiny else plan:  # (each variant's model has its own tests)
        r = suite.bench(f"{variant}_{attention}", [*base, "--variant", variant, "--attention", attention])
        if r is not None:
            results.append(r | {"variant": variant})
    return results


def end_to_end(suite: Suite, best: dict, steps: int) -> dict | None:
    """Step 4: train_char.py on a generated corpus with the benchmark's best settings; its logged tokens/s."""
    corpus = suite.runs / "corpus.txt"
    rng = random.Random(0)
    corpus.write_bytes(bytes(rng.randrange(32, 127) for _ in range(100_000 if suite.tiny else 4_000_000)))
    log_every = max(1, steps // 10)
    args = ["--dataset-path", str(corpus), "--experiments-dir", str(suite.runs / "experiments"), "--experiment-name",
            "e2e", "--model.dim", str(best["dim"]), "--model.depth", str(best["depth"]), "--model.heads",
            str(best["heads"]), "--model.dim-head", str(best["dim_head"]), "--block-size", str(best["seq_len"]),
            "--batch-size", str(best["batch"]), "--model.dtype", best["dtype"], "--model.attention",
            best["attention"], "--model.remat", best["remat"], "--max-steps", str(steps), "--log-interval",
            str(log_every), "--eval-interval", "0", "--checkpoint-interval", str(steps), "--no-progress",
            "--optim.warmup-steps", str(max(1, steps // 10))]
    proc = suite.call("end_to_end", [str(ROOT / "train_char.py"), *args])
    corpus.unlink()
    if proc is None:
        return None
    rates = [float(m.replace(",", "")) for m in re.findall(r"loss [\d.]+, lr [\d.e+-]+, ([\d,]+) tokens/s", proc.stdout)]
    # The first window holds the first steps' warm-up of caches and allocators; the rest are steady state.
    steady = statistics.median(rates[1:] if len(rates) > 2 else rates)
    e2e = {"logged_tokens_per_s_median": steady, "logged_tokens_per_s": rates, "bench_tokens_per_s": best["tokens_per_s"],
           "ratio": steady / best["tokens_per_s"], "steps": steps}
    print(f"  train_char.py, {steps} steps with those settings: {steady:,.0f} tokens/s logged (median of its log "
          f"windows after the first) = {100 * e2e['ratio']:.1f}% of the benchmark's", flush=True)
    return e2e


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for summary.json (every figure, what failed and why)")
    p.add_argument("--runs", default=None, help="folder for each run's JSON and log (default OUT/runs)")
    p.add_argument("--batch", type=int, default=16, help="global batch of step 1")
    p.add_argument("--more-batches", type=int, nargs="*", default=[32, 64, 128], help="step 2, in this order")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall-clock seconds for the whole suite (the lease: 15 minutes with the machine's start)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, to check the whole path on a CPU")
    args = p.parse_args()
    out = Path(args.out)
    runs_dir = Path(args.runs) if args.runs else out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    suite = Suite(out, runs_dir, args.budget_s, args.tiny)
    batch, more = (4, [8]) if args.tiny else (args.batch, args.more_batches)
    print(f"gpt2-small in bfloat16, within {args.budget_s:.0f} s:", flush=True)
    suite.summary["runs"] = runs = attention(suite, batch)
    if not runs:
        suite.save()
        raise SystemExit(f"no benchmark run succeeded: see {out / 'summary.json'} and {runs_dir}/*.log")
    suite.summary["fsdp"] = fsdp_one_device(suite, max(runs, key=lambda r: r["tokens_per_s"]))
    suite.save()
    runs += larger_batches(suite, runs, more)
    best = max(runs, key=lambda r: r["tokens_per_s"])
    suite.summary["best"] = best
    print(f"best: attention {best['attention']}, batch {best['batch']}: {best['tokens_per_s']:,.0f} tokens/s", flush=True)
    runs += remat(suite, best)
    suite.save()
    suite.summary["end_to_end"] = end_to_end(suite, best, 6 if args.tiny else args.train_steps)
    suite.save()
    print("the other variants at those settings:", flush=True)
    suite.summary["variants"] = variants(suite, best)
    suite.save()
    left = suite.summary["skipped"] + [f["name"] for f in suite.summary["failed"]]
    print(f"done in {suite.summary['elapsed_s']:.0f} s; " + (f"not measured: {', '.join(left)}" if left else "all measured"))


if __name__ == "__main__":
    main()
