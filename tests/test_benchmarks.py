"""Every benchmark runs end to end with tiny arguments, so that none can rot between the occasions
someone runs it for real: each must exit 0 and print its key figures, which are parsed and checked
for what they must be whatever the machine's speed (never for how fast it was)."""

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SHAKESPEARE, cli_env


def run_benchmark(name: str, *args, devices: int, cwd) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)], cwd=cwd,
                          env=cli_env(devices), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"no match for {pattern!r} in:\n{text}"
    return float(match.group(1).replace(",", ""))


TINY_TRAIN = ["--dim", 32, "--depth", 1, "--heads", 2, "--dim-head", 16, "--ff-mult", 4, "--seq-len", 32,
              "--batch", 8, "--windows", 3, "--steps", 2, "--warmup", 1, "--calibration-size", 128]


def test_bench_train(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"It was the best of times, it was the worst of times, it was the age of wisdom. " * 300)
    dim, depth, heads, dim_head, ff_mult, seq_len = 32, 1, 2, 16, 4, 32
    # 4 simulated devices and 2 micro-batches: the timed steps go through the accumulation and pmean path.
    out = run_benchmark("bench_train.py", *TINY_TRAIN, "--grad-accum", 2, "--data", corpus, "--json",
                        tmp_path / "r.json", devices=4, cwd=tmp_path)
    assert "4 x cpu" in out and f"batches from {corpus}" in out and "(2 micro-batch(es))" in out
    # The model-FLOPs formula, recomputed here from the architecture: dense kernels of the fused
    # projection (q, one k, one v, two SwiGLU halves), attention output and feed-forward output,
    # plus the tied head; then 12 * L * H * Q * T for attention.
    inner = ff_mult * dim
    dense = depth * (dim * (heads * dim_head + 2 * dim_head + 2 * inner) + heads * dim_head * dim + inner * dim)
    flops = 6 * (dense + 256 * dim) + 12 * depth * heads * dim_head * seq_len
    assert number(r"FLOPs/token = .* = ([\d,]+) \(", out) == flops
    assert "XLA cost analysis: not shown (with --grad-accum > 1" in out
    assert re.search(r"loss \d+\.\d+ at step 1 -> \d+\.\d+", out)  # finite, and the run stepped
    assert number(r"step time\s+([\d.,]+) ms \(median of 3 windows", out) > 0
    assert number(r"MFU\s+([\d.]+)% of [\d.]+ TFLOP/s measured in this run \(128\^3 float32", out) >= 0
    r = json.loads((tmp_path / "r.json").read_text())
    # Not its sign: at this size the backward pass is shorter than the machine's noise.
    assert number(r"backward/fwd\s+(-?[\d.]+)", out) == float(f"{r['bwd_over_fwd']:.2f}")
    assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
    assert r["bwd_over_fwd"] == pytest.approx((r["fwd_bwd_ms"] - r["fwd_ms"]) / r["fwd_ms"], rel=1e-9)
    assert r["devices"] == 4 and r["grad_accum"] == 2 and len(r["step_ms_windows"]) == 3
    assert r["tokens_per_s"] == r["tokens_per_step"] / (r["step_ms_median"] / 1e3)
    assert r["compile_s"] > 0 and r["xla_temp_bytes"] > 0
    # MFU is against the higher of the peaks measured before and after the timing: a slow moment during
    # one of them would otherwise inflate it.
    assert r["peak_measured_tflops"] == max(r["peak_before_tflops"], r["peak_after_tflops"]) > 0
    assert r["mfu_measured"] == r["achieved_tflops"] / r["peak_measured_tflops"]


def test_bench_train_fsdp_holds_less_state_per_device_than_dp(tmp_path):
    """The fsdp step, built through its layout as train.py builds it, on 4 devices: it trains, says its
    layout, and with every leaf sharded (--fsdp-min-bytes 0) XLA's arguments per device (the state, mostly)
    are below dp's; both report their collectives, and only fsdp gathers weights."""
    results = {}
    for layout in ("dp", "fsdp"):
        out = run_benchmark("bench_train.py", *TINY_TRAIN, "--no-ratio", "--data", SHAKESPEARE, "--parallel", layout,
                            "--fsdp-min-bytes", 0, "--json", tmp_path / f"{layout}.json", devices=4, cwd=tmp_path)
        assert f"4 x cpu (cpu), --parallel {layout};" in out and f"layout         {layout} over 4 device(s)" in out
        assert re.search(r"loss \d+\.\d+ at step 1 -> \d+\.\d+", out)
        results[layout] = r = json.loads((tmp_path / f"{layout}.json").read_text())
        assert r["parallel"] == layout and r["tokens_per_s"] > 0 and r["xla_memory"]["temp"] > 0
    dp, fsdp = results["dp"], results["fsdp"]
    assert fsdp["xla_memory"]["argument"] < dp["xla_memory"]["argument"]
    assert fsdp["state_bytes_per_device"] < dp["state_bytes_per_device"]
    assert dp["collectives"]["all-gather"] == 0 < fsdp["collectives"]["all-gather"]
    assert dp["collectives"]["all-reduce"] > 0  # the gradients' pmean
    # The same batches and initial parameters: the first step's loss is the same computation.
    assert fsdp["loss_first"] == pytest.approx(dp["loss_first"], rel=1e-5)


def test_bench_train_device_sweep_and_flops_agree_with_xla(tmp_path):
    """One process per device count, and a row for each. Each process prints its own figures, the first
    (1 device) XLA's own count of the compiled step, which also covers the optimizer, norms, softmax and
    the rotary matmul: measured 1.1-1.2x the formula. Losing the head (+50%) or double-counting the
    backward pass lands outside [1.0, 1.5]."""
    out = run_benchmark("bench_train.py", *TINY_TRAIN, "--no-ratio", "--data", SHAKESPEARE, "--devices-sweep", 1, 2,
                        devices=1, cwd=tmp_path)
    rows = re.findall(r"^\s+(\d+)\s+[\d.]+\s+[\d,]+\s+[\d.]+%$", out, re.M)
    assert rows == ["1", "2"], out
    assert "simulated CPU devices share the same cores" in out
    assert out.index("devices: 1 x cpu") < out.index("XLA cost analysis of the whole step") < out.index(
        "devices: 2 x cpu"), out  # the figure below is the 1-device run's
    assert 1.0 <= number(r"XLA cost analysis of the whole step: .*\(([\d.]+)x the formula\)", out) <= 1.5


def test_gpu_suite_runs_its_whole_path(tmp_path):
    """The GPU command, with tiny shapes on the CPU: both kernels, the faster under fsdp, a larger batch,
    both remat policies at the best, train_char.py end to end with its logged tokens/s set beside the
    benchmark's, a variant."""
    out = run_benchmark("gpu_suite.py", "--tiny", "--out", tmp_path / "gpu", devices=1, cwd=tmp_path)
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    # cudnn cannot run on a CPU: it fails with its one-line reason and the xla runs carry on.
    assert {(r["attention"], r["remat"]) for r in summary["runs"]} == {("xla", "none"), ("xla", "dots"),
                                                                         ("xla", "block")}
    assert "cudnn cannot run here" in out
    assert summary["end_to_end"]["logged_tokens_per_s_median"] > 0
    assert "of the benchmark's" in out
    # The headline step under fsdp over the one device, beside dp's.
    fsdp = summary["fsdp"]
    assert (fsdp["dp"]["parallel"], fsdp["fsdp"]["parallel"]) == ("dp", "fsdp") and fsdp["tokens_per_s_ratio"] > 0
    assert fsdp["fsdp"]["xla_memory"]["argument"] > 0 and "all-gather" in fsdp["fsdp"]["collectives"]
    assert "of dp's tokens/s" in out
    assert [r["variant"] for r in summary["variants"]] == ["palm-lite"]
    assert summary["skipped"] == [] and [f["name"] for f in summary["failed"]] == ["gpt2-small_cudnn_none_b4"]


def test_gpu_suite_skips_what_its_budget_cannot_hold_and_says_so(tmp_path):
    """The lease is short: a run that would not fit in what is left of --budget-s is not started, and
    summary.json (written as the suite goes) names it, so a cut-off lease still says what is missing."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--tiny", "--budget-s", "0",
                           "--out", str(tmp_path / "gpu")], env=cli_env(1), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"no benchmark run succeeded: see {tmp_path / 'gpu' / 'summary.json'} and {tmp_path / 'gpu' / 'runs'}/*.log"]
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert summary["skipped"] == ["gpt2-small_cudnn_none_b4", "gpt2-small_xla_none_b4"]
    assert "skipped (0 s of the budget left" in proc.stdout


def test_bench_generate(tmp_path):
    ctx, depth, heads, dim_head, new = 16, 1, 2, 8, 8
    out = run_benchmark("bench_generate.py", "--contexts", ctx, "--dim", 32, "--depth", depth, "--heads", heads,
                        "--dim-head", dim_head, "--new-chars", new, "--repeats", 1, "--calibration-size", 128,
                        devices=1, cwd=tmp_path)
    assert "WARNING" not in out  # no compilation inside a timed call
    row = re.search(rf"^\s+{ctx}\s+cached\s+([\d,.]+) .* ([\d.]+)x\s+(\d+) of {new}", out, re.M)
    assert row, out
    assert float(row.group(1).replace(",", "")) > 0 and float(row.group(2)) > 0
    # Both paths start from the same full-context prompt pass, so their first greedy character agrees.
    assert 1 <= int(row.group(3)) <= new
    recompute = re.search(rf"^\s+{ctx}\s+recompute\s+([\d,.]+) ", out, re.M)
    assert recompute and float(recompute.group(1).replace(",", "")) > 0, out
    # The cache it measures is multi-query: one key and one value head per layer, float32.
    kv = re.search(rf"^\s+{ctx}\s+([\d,]+) bytes\s+([\d,]+) bytes", out, re.M)
    assert kv, out
    assert int(kv.group(1).replace(",", "")) == 2 * depth * ctx * dim_head * 4
    assert int(kv.group(2).replace(",", "")) == 2 * depth * ctx * dim_head * 4 * heads
    assert re.search(rf"^\s+{ctx}\s+[\d.]+\s+-?[\d.]+\s+[\d.]+$", out, re.M)  # prompt pass / per-char split
    assert number(r"a 128\^3 float32 matmul reaches ([\d.]+) TFLOP/s", out) > 0


def test_bench_loader(tmp_path):
    size_mb = 16
    out = run_benchmark("bench_loader.py", "--size-mb", size_mb, "--batches", 20, "--batch", 4, "--large-batch", 8,
                        "--seq-len", 64, "--tmpdir", tmp_path, devices=1, cwd=tmp_path)
    assert "train is a memmap" in out
    runs = re.findall(r"^\s*(cold|warm)\s+(\d+)\s+([\d,]+)\s+([\d.]+)\s", out, re.M)
    assert [(cache, int(batch)) for cache, batch, _, _ in runs] == [("cold", 4), ("cold", 8), ("warm", 4)], out
    assert all(float(rate.replace(",", "")) > 0 for _, _, rate, _ in runs)
    # The point of the memory map: the corpus never becomes the process's own memory. Reading it
    # into an array instead would add the whole 16 MiB; batches of 8 x 65 bytes add nothing visible.
    assert number(r"anonymous memory added by loading and batching: ([+-][\d.]+) MiB", out) < size_mb / 2
    assert list(tmp_path.iterdir()) == []  # its temporary corpus is removed


def test_family(tmp_path):
    """Two tiny models through train_char.py and eval_char.py (every variant takes the same path through
    family.py, at three processes each; the variants themselves are tests/test_variants.py's): a row of
    parameters, tokens/s and bits per byte for each, a number for every window of palm-lite (ALiBi),
    eval_char.py's refusal for gpt past its 16 learned positions, and the reports behind the tables (L
    and S as asked, every val byte but the first scored at each length)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes((b"It was the best of times, it was the worst of times, it was the age of wisdom. " * 300))
    out = run_benchmark("family.py", "--data", corpus, "--variants", "palm-lite", "gpt", "--dim", 32, "--depth", 1,
                        "--heads", 2, "--dim-head", 16, "--seq-len", 16, "--batch", 8, "--steps", 2, "--eval-batch", 8,
                        "--stride", 8, "--factors", 1, 2, "--json", tmp_path / "r.json", devices=1, cwd=tmp_path)
    number_cell = r"\d+\.\d{3}"
    assert re.search(rf"^\| palm-lite \(alibi\) \| {number_cell} \| {number_cell} \(\+?-?\d\.\d{{3}}\) \|$", out, re.M), out
    assert re.search(rf"^\| gpt \(learned\) \| {number_cell} \| refused \|$", out, re.M), out
    for variant in ("palm-lite (alibi)", "gpt (learned)"):
        assert re.search(rf"^\| {re.escape(variant)} \| [\d,]+ \| [\d,]+ \| {number_cell} \|$", out, re.M), out
    assert "gpt at 32: error: --eval-seq-len 32: scoring windows longer than seq_len needs a position scheme" in out
    reports = json.loads((tmp_path / "r.json").read_text())["reports"]
    assert set(reports) == {"palm-lite", "gpt"} and "refused" in reports["gpt"]["32"]
    for length in (16, 32):
        r = reports["palm-lite"][str(length)]
        assert (r["eval_seq_len"], r["stride"]) == (length, 8)
        assert r["bytes_scored"] == r["split_bytes"] - 1 and 0 < r["bits_per_byte"] < 10
