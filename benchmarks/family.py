"""The family side by side: parameters, training tokens/s and val bits per byte of every variant after
the same short CPU run, and bits per byte at 1x, 2x and 4x the training length.

Trains one small model per variant with the same run (train_char.py, same corpus, seed, shape, steps
and learning rate; only --model.variant differs, no dropout): palm (rotary), palm-lite (ALiBi), lamda
(T5 bias) and gpt (learned absolute positions). tokens/s is the median of train_char.py's own logged
windows after the first (training time only). Then each one's whole validation split is scored with
eval_char.py at --eval-seq-len f x seq_len for each factor f in --factors, advancing by --stride
(default seq_len, so at 2x and 4x every scored token sits past the training length, with at least
(f - 1) x seq_len tokens of context). A window the model cannot score shows eval_char.py's refusal
(gpt past 1x: its position table has seq_len rows).

ALiBi's claim (Press et al., "Train Short, Test Long"): bits per byte at 2x and 4x stay close to 1x.
Rotary runs at any length but was never trained past seq_len: expect it to degrade.

Run from the repository root (the defaults: 4 x 400 steps of ~1M-parameter models on 2 CPU cores):
  JAX_PLATFORMS=cpu python benchmarks/family.py [--steps 400] [--seq-len 64] [--json out.json]
With --experiments-dir DIR, experiments already there (family-<variant>) are scored, not retrained.
tests/test_benchmarks.py runs it with tiny arguments on every test run, so that it cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import loadavg  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
POSITIONS = {"palm-lite": "alibi", "palm": "rotary", "lamda": "t5", "gpt": "learned"}


def cli(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def train(a, exps: Path, variant: str) -> dict:
    """Train family-<variant> unless it is there already: its parameters and logged tokens/s."""
    name = f"family-{variant}"
    if (exps / name / "checkpoints").is_dir():
        return {"note": f"{variant}: taken as it was from {exps / name}", "params": None, "tokens_per_s": None}
    began = time.perf_counter()
    proc = cli("train_char.py", "--dataset-path", a.data, "--experiments-dir", exps, "--experiment-name", name,
               "--model.variant", variant, "--model.dim", a.dim, "--model.depth", a.depth, "--model.heads", a.heads,
               "--model.dim-head", a.dim_head, "--block-size", a.seq_len, "--batch-size", a.batch,
               "--max-steps", a.steps, "--optim.warmup-steps", max(1, a.steps // 10),
               "--optim.learning-rate", a.lr, "--seed", a.seed, "--eval-interval", 0, "--sample-length", 0,
               "--checkpoint-interval", a.steps, "--log-interval", max(1, a.steps // 4), "--no-progress")
    if proc.returncode:
        sys.exit(f"training {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    params = re.search(r"([\d,]+) parameters", proc.stdout)
    rates = [float(r.replace(",", "")) for r in re.findall(r", ([\d,]+) tokens/s", proc.stdout)]
    took = time.perf_counter() - began
    return {"note": f"{variant}: trained in {took:.0f} s", "params": int(params.group(1).replace(",", "")),
            # The first logged window holds the warm-up of caches and allocators; the rest are steady.
            "tokens_per_s": statistics.median(rates[1:] if len(rates) > 2 else rates) if rates else None}


def score(a, exps: Path, variant: str, length: int) -> dict:
    """eval_char.py's report for one window length, or {"refused": its error line}."""
    stride = min(a.stride or a.seq_len, length)
    proc = cli("eval_char.py", "--experiments-dir", exps, "--experiment-name", f"family-{variant}", "--split", "val",
               "--sample-steps", 0, "--batch-size", a.eval_batch, "--eval-seq-len", length, "--stride", stride)
    if proc.returncode == 2 and proc.stderr.startswith("error: "):
        return {"refused": proc.stderr.strip()}
    if proc.returncode:
        sys.exit(f"scoring family-{variant} at {length} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((exps / f"family-{variant}" / "eval" / "val.json").read_text())


def family_table(a, results: dict, trained: dict) -> str:
    rows = ["| variant | parameters | tokens/s (training) | val bits per byte |", "| --- | --- | --- | --- |"]
    for variant, by_length in results.items():
        t = trained[variant]
        rate = f"{t['tokens_per_s']:,.0f}" if t["tokens_per_s"] else "-"
        params = f"{t['params']:,}" if t["params"] else "-"
        rows.append(f"| {variant} ({POSITIONS.get(variant, '?')}) | {params} | {rate} | "
                    f"{by_length[a.seq_len]['bits_per_byte']:.3f} |")
    return "\n".join(rows)


def table(a, results: dict) -> str:
    lengths = [f * a.seq_len for f in a.factors]
    head = "| variant (positions) | " + " | ".join(f"{f}x ({n})" for f, n in zip(a.factors, lengths)) + " |"
    rows = [head, "|" + " --- |" * (len(lengths) + 1)]
    for variant, by_length in results.items():
        base = by_length[lengths[0]].get("bits_per_byte")
        cells = []
        for n in lengths:
            r = by_length[n]
            if "refused" in r:
                cells.append("refused")
            elif n == lengths[0] or base is None:
                cells.append(f"{r['bits_per_byte']:.3f}")
            else:
                cells.append(f"{r['bits_per_byte']:.3f} ({r['bits_per_byte'] - base:+.3f})")
        rows.append(f"| {variant} ({POSITIONS.get(variant, '?')}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="corpus to train and score on")
    p.add_argument("--variants", nargs="+", default=["palm", "palm-lite", "lamda", "gpt"])
    p.add_argument("--factors", nargs="+", type=int, default=[1, 2, 4], help="window lengths as multiples of seq_len")
    p.add_argument("--stride", type=int, default=None, help="tokens each window advances (default seq_len)")
    p.add_argument("--seq-len", type=int, default=64, help="training length")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim-head", type=int, default=32)
    p.add_argument("--batch", type=int, default=32, help="training batch (sequences)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batch", type=int, default=32, help="scoring windows per batch")
    p.add_argument("--experiments-dir", default=None, help="keep (and reuse) the experiments here; default a "
                                                           "temporary directory, removed at the end")
    p.add_argument("--json", default=None, help="also write every report here")
    a = p.parse_args()
    if not Path(a.data).is_file():
        sys.exit(f"error: {a.data} is not a file (pass --data)")
    if a.factors[0] != 1:
        sys.exit("error: --factors must start with 1 (the training length, the baseline of the table)")
    print(loadavg())
    with tempfile.TemporaryDirectory() as tmp:
        exps = Path(a.experiments_dir or tmp)
        results, trained = {}, {}
        for variant in a.variants:
            trained[variant] = train(a, exps, variant)
            results[variant] = {f * a.seq_len: score(a, exps, variant, f * a.seq_len) for f in a.factors}
    stride = a.stride or a.seq_len
    first = next(iter(results.values()))[a.seq_len]
    print(f"val bits per byte of {a.data} ({first['split_bytes']:,} bytes, every byte after the first scored "
          f"once); trained {a.steps} steps at seq_len {a.seq_len} (dim {a.dim}, depth {a.depth}, {a.heads}x"
          f"{a.dim_head} heads, batch {a.batch}, seed {a.seed}); each window advances {stride} tokens (its length, if that is shorter)")
    print("; ".join(t["note"] for t in trained.values()))
    print()
    print(family_table(a, results, trained))
    print()
    print(table(a, results))
    print()
    for variant, by_length in results.items():
        refused = [(n, r["refused"]) for n, r in by_length.items() if "refused" in r]
        if refused:
            print(f"{variant} at {refused[0][0]}: {refused[0][1]}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "trained": trained, "reports": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
