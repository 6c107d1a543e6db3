"""Named sizes (--preset) and the dry run that sizes a model from its shapes alone (--print-params)."""

from __future__ import annotations

import json
import re

import pytest

from conftest import TINY, call_main, main_ok
from test_reliability import assert_unchanged, assert_user_error, snapshot

from mingpt_palm.presets import PRESETS


def palm_params(dim: int, depth: int, heads: int, dim_head: int, ff_mult: int, vocab: int) -> int:
    """PaLM's parameters counted by hand: per block one fused projection (heads queries, one key, one value,
    two SwiGLU halves), the attention and feed-forward outputs and a LayerNorm scale; the tied embedding
    and a final scale."""
    inner = ff_mult * dim
    block = dim * (heads * dim_head + 2 * dim_head + 2 * inner) + heads * dim_head * dim + inner * dim + dim
    return vocab * dim + depth * block + dim


def figures(out: str) -> dict:
    def number(pattern):
        match = re.search(pattern, out, re.M)
        assert match, f"no {pattern!r} in:\n{out}"
        return int(match.group(1).replace(",", ""))

    return {"params": number(r"^parameters: ([\d,]+) "), "param_bytes": number(r"parameters ([\d,]+) bytes"),
            "adam_bytes": number(r"Adam state ([\d,]+) bytes"), "total": number(r"= ([\d,]+) bytes"),
            "matmul": number(r"6 x ([\d,]+) matmul"), "attention": number(r"\+ ([\d,]+) attention"),
            "flops": number(r"attention = ([\d,]+) ")}


def check_printout(name: str, cwd) -> dict:
    """Run the dry run of a preset (main() of train_char.py, in process: it never touches a device); check
    what must hold of its figures, and that it wrote nothing."""
    before = snapshot(cwd)
    out = main_ok("train_char.py", "--preset", name, "--print-params", cwd=cwd).stdout
    assert_unchanged(before, snapshot(cwd))  # a dry run: no experiments/, no datasets/
    m = PRESETS[name].model
    f = figures(out)
    assert f"variant {m['variant']}, dim {m['dim']:,}, depth {m['depth']}, heads {m['heads']} x {m['dim_head']}" in out
    assert f"vocabulary {m['num_tokens']:,} tokens (the preset's" in out
    # float32 parameters; Adam's two float32 moments and a few int32 step counters (optax's).
    assert f["param_bytes"] == 4 * f["params"] and 8 * f["params"] < f["adam_bytes"] <= 8 * f["params"] + 64
    assert f["total"] == f["param_bytes"] + f["adam_bytes"]
    assert f["attention"] == 12 * m["depth"] * m["heads"] * m["dim_head"] * m["seq_len"]
    assert f["flops"] == 6 * f["matmul"] + f["attention"]
    # The source's count within 1% (the bar; papers round to 3-4 digits).
    reported = PRESETS[name].reported_params
    assert reported is None or abs(f["params"] / reported - 1) < 0.01, (f["params"], reported)
    if m["variant"] == "palm":
        assert f["params"] == palm_params(m["dim"], m["depth"], m["heads"], m["dim_head"], m["ff_mult"],
                                          m["num_tokens"])
        # Every parameter is a matmul's except the norm scales (one per block, one final).
        assert f["matmul"] == f["params"] - (m["depth"] + 1) * m["dim"]
    return {"out": out, **f}


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"palm-540b"}))
def test_every_preset_prints_its_sizes_and_writes_nothing(name, tmp_path):
    check_printout(name, tmp_path)


def test_palm_540b_count_from_shapes_alone(tmp_path):
    """The issue's bar: 540B within 1% of the paper's 540.35B. Allocating it would take 2 TB of float32
    (the run would be killed long before); the count comes from jax.eval_shape in seconds."""
    f = check_printout("palm-540b", tmp_path)
    assert abs(f["params"] - 540.35e9) / 540.35e9 < 0.01
    assert "(540.36B); reported: 540.35B (+0.00%)" in f["out"]
    assert "(3.28 TFLOP)" in f["out"]


def test_a_flag_beside_a_preset_wins(tmp_path):
    out = main_ok("train_char.py", "--preset", "palm-8b", "--model.depth", 2, "--block-size", 128, "--print-params",
                  cwd=tmp_path).stdout
    assert "depth 2," in out and "seq_len 128," in out and "dim 4,096," in out
    assert figures(out)["params"] == palm_params(4096, 2, 16, 256, 4, 256_000)
    assert "reported:" not in out  # no longer the paper's model: nothing to compare with


def test_without_a_preset_the_vocabulary_is_the_default_and_said_so(tmp_path):
    out = main_ok("train_char.py", "--model.dim", 64, "--model.depth", 2, "--print-params", cwd=tmp_path).stdout
    assert "vocabulary 256 tokens (the byte tokenizer's; a run sets it from its corpus)" in out
    assert figures(out)["params"] == palm_params(64, 2, 8, 64, 4, 256)
    assert list(tmp_path.iterdir()) == []


def test_a_preset_is_the_default_of_a_real_run_and_of_its_restarts(shakespeare, tmp_path):
    """gpt2-small's shape, shrunk by flags: the flags win, the preset supplies the rest (variant, ff_mult),
    and num_tokens comes from the corpus (256 bytes), not from the preset's 50,257. The same command line,
    --restore-checkpoint included, starts the experiment and continues it; a preset that describes another
    model than the experiment's is refused, changing nothing."""
    command = ["--dataset-path", shakespeare, "--experiment-name", "g", "--preset", "gpt2-small", *TINY,
               "--eval-interval", 0, "--restore-checkpoint"]
    first = main_ok("train_char.py", *command, "--max-steps", 1, cwd=tmp_path)
    assert "experiment: experiments/g (new); steps 0 -> 1" in first.stdout
    config = json.loads((tmp_path / "experiments" / "g" / "config.json").read_text())
    assert config["preset"] == "gpt2-small"
    assert {k: config["model"][k] for k in ("variant", "dim", "depth", "heads", "dim_head", "seq_len", "num_tokens")} \
        == {"variant": "gpt", "dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "seq_len": 64, "num_tokens": 256}
    again = main_ok("train_char.py", *command, "--max-steps", 2, cwd=tmp_path)
    assert "experiment: experiments/g (restored from step 1); steps 1 -> 2" in again.stdout

    before = snapshot(tmp_path)
    proc = call_main("train_char.py", "--experiment-name", "g", "--restore-checkpoint", "--preset", "palm-8b",
                     "--max-steps", 3, cwd=tmp_path)
    assert_user_error(proc, "--preset palm-8b describes another model than the experiment was started with",
                      "model.variant 'palm' (saved: 'gpt')", "leave out --preset")
    assert_unchanged(before, snapshot(tmp_path))
