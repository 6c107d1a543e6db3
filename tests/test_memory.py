"""The memory plan (mingpt_palm/memory.py): bytes per device under dp and fsdp, said by --print-params and
checked by a real run before it compiles."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, call_main, main_ok
from test_reliability import assert_unchanged, assert_user_error, snapshot

from mingpt_palm import memory
from mingpt_palm.config import ModelConfig, TrainConfig
from mingpt_palm.flops import human_bytes
from mingpt_palm.loss import cross_entropy
from mingpt_palm.presets import PRESETS
from mingpt_palm.state import build


def palm_8b(**kw) -> TrainConfig:
    return TrainConfig(preset="palm-8b", model=ModelConfig(**PRESETS["palm-8b"].model), **kw)


def test_fsdp_over_8_devices_holds_an_eighth_of_palm_8b_state(tmp_path):
    """The rule: a leaf of at least --fsdp-min-bytes with an axis of the width is split 8 ways; the rest (norm
    scales, optax's step counters) is whole on every device. So fsdp's state is exactly small + (dp's - small)/8."""
    dp_cfg = palm_8b()
    abstract = build(dp_cfg).abstract
    dp = memory.plan(dp_cfg, 8, abstract)
    fsdp = memory.plan(dataclasses.replace(dp_cfg, parallel="fsdp"), 8, abstract)
    leaves = jax.tree.leaves(abstract.params) * 2 + jax.tree.leaves(abstract.opt_state)  # params, grads, Adam
    sizes = [math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves]
    small = sum(n for n in sizes if n < dp_cfg.fsdp_min_bytes)
    assert all(4096 in x.shape and n % 8 == 0 for x, n in zip(leaves, sizes) if n >= dp_cfg.fsdp_min_bytes)
    assert dp.state == sum(sizes) and 16 * 8_632_012_800 <= dp.state <= 16 * 8_632_012_800 + 64  # 138 GB
    assert 0 <= small - 4 * 33 * 4096 * 4 <= 64  # 33 norm scales of 4,096 floats, four times over; optax's counters
    assert fsdp.state == small + (dp.state - small) // 8
    # --print-params says the same figures, and writes nothing.
    out = main_ok("train_char.py", "--preset", "palm-8b", "--print-params", "--parallel", "fsdp", "--plan-devices", 8,
                  cwd=tmp_path).stdout
    assert (f"plan: --parallel fsdp over 8 devices (--plan-devices): per device parameters {human_bytes(fsdp.params)}, "
            f"gradients {human_bytes(fsdp.grads)}, Adam {human_bytes(fsdp.adam)} = {human_bytes(fsdp.state)}") in out
    assert list(tmp_path.iterdir()) == []


def test_print_params_says_whether_a_given_device_memory_fits(tmp_path):
    """palm-8b under dp is 138 GB of state: over an 80 GB device, and fsdp over the fewest devices that fit is
    named; the plan over that many fits, over the next smaller divisor of the width it does not."""
    args = ["--preset", "palm-8b", "--print-params", "--device-memory-gb", 80, "--batch-size", 8, "--model.remat", "block"]
    out = main_ok("train_char.py", *args, cwd=tmp_path).stdout
    line = next(line for line in out.splitlines() if "--device-memory-gb" in line)
    assert "plan: one device has 80 GB (--device-memory-gb) = 74.51 GiB: does not fit; try --parallel fsdp on >= " in line
    k = int(line.split("fsdp on >= ")[1].split()[0])
    cfg = dataclasses.replace(palm_8b(), batch_size=8, parallel="fsdp",
                              model=dataclasses.replace(palm_8b().model, remat="block"))
    abstract = build(cfg).abstract
    assert memory.plan(cfg, k, abstract).total <= 80e9 < memory.plan(cfg, k // 2, abstract).total
    tiny = main_ok("train_char.py", *TINY, "--print-params", "--device-memory-gb", 80, cwd=tmp_path).stdout
    assert "plan: one device has 80 GB (--device-memory-gb) = 74.51 GiB: fits" in tiny
    assert "plan: --parallel dp over 4 devices (visible)" in tiny  # conftest's 4 simulated devices


def test_print_params_says_when_fsdp_cannot_split_the_width(tmp_path):
    out = main_ok("train_char.py", "--preset", "palm-8b", "--print-params", "--parallel", "fsdp", "--plan-devices", 3,
                  cwd=tmp_path).stdout
    assert "plan: --parallel fsdp over 3 devices (--plan-devices): cannot: --parallel fsdp splits the model width " \
           "(--model.dim 4096) over the 3 devices, which does not divide it" in out


@pytest.mark.parametrize("flag, value, says", [("--plan-devices", 0, "--plan-devices 0 must be >= 1"),
                                               ("--device-memory-gb", 0, "--device-memory-gb 0.0 must be > 0"),
                                               ("--device-memory-gb", -1, "--device-memory-gb -1.0 must be > 0")])
def test_plan_flags_are_checked(tmp_path, flag, value, says):
    proc = call_main("train_char.py", *TINY, "--print-params", flag, value, cwd=tmp_path)
    assert_user_error(proc, says)


@pytest.mark.parametrize("extra, says", [
    ([*TINY, "--device-memory-gb", 0.001], ["the model (dim 64, depth 2) needs at least 0.00",
                                            "GB per device under --parallel dp",
                                            "one device has 0.001 GB (--device-memory-gb); no fsdp device count",
                                            "makes it fit: use a smaller model"]),
    (["--preset", "palm-8b", "--batch-size", 8, "--device-memory-gb", 80, "--model.remat", "block"],
     ["--preset palm-8b needs at least 1", "GB of parameters, gradients and Adam state", "2 sequence(s) of 2,048 tokens",
      "one device has 80 GB (--device-memory-gb); try --parallel fsdp on >= "]),
    ([*TINY, "--parallel", "fsdp", "--model.dim", 66], ["splits the model width (--model.dim 66) over the 4 devices"]),
], ids=["tiny", "palm-8b", "fsdp-width"])
def test_a_run_that_cannot_fit_stops_in_one_line_and_writes_nothing(shakespeare, tmp_path, extra, says):
    """Before compiling: exit 2, one line, no experiment directory (named or not)."""
    for name in ([], ["--experiment-name", "x"]):
        before = snapshot(tmp_path)
        proc = call_main("train_char.py", "--dataset-path", shakespeare, "--no-progress", "--eval-interval", 0, *name,
                         *extra, cwd=tmp_path)
        assert_user_error(proc, *says)
        assert_unchanged(before, snapshot(tmp_path))


def test_the_activation_estimate_is_within_3x_of_xla(tmp_path):
    """The estimate per sequence against what XLA's buffer assignment keeps for one gradient (CPU, float32,
    remat none: the CPU compile does not realise remat's savings). Measured 0.8-1.1x on three small configs."""
    m = ModelConfig(dim=128, depth=2, heads=4, dim_head=32, seq_len=128, num_tokens=256)
    model = build(TrainConfig(model=m)).model
    params = build(TrainConfig(model=m)).abstract.params

    def loss(p, tokens):
        return cross_entropy(model.apply({"params": p}, tokens[:, :-1])[0], tokens[:, 1:], m.z_loss)[0]

    batch = 2
    tokens = jax.ShapeDtypeStruct((batch, m.seq_len + 1), jnp.int32)
    temp = jax.jit(jax.grad(loss)).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes
    estimate = memory.activations(m, batch)
    assert estimate / 3 < temp < 3 * estimate, (temp, estimate)


def test_a_run_that_fits_says_how_much_of_the_device_it_plans_for(shakespeare, tmp_path):
    """With a device memory known (a GPU's, or --device-memory-gb) a run that fits says its plan against it at
    start: the same figures --print-params gives, so that a user sees the margin before a long run."""
    args = ["--dataset-path", shakespeare, *TINY, "--max-steps", 1, "--eval-interval", 0, "--parallel", "fsdp",
            "--fsdp-min-bytes", 0, "--device-memory-gb", 1, "--experiment-name", "fits"]
    out = main_ok("train_char.py", *args, cwd=tmp_path).stdout
    line = next(x for x in out.splitlines() if x.startswith("memory: "))
    assert "per device under --parallel fsdp" in line and line.endswith("; one device has 1 GB (--device-memory-gb)")
    state = float(line.split("(")[1].split(" GB of state")[0])
    dp = float(next(x for x in main_ok("train_char.py", *args[:-1], "fits-dp", "--parallel", "dp",
                                        cwd=tmp_path).stdout.splitlines() if x.startswith("memory: "))
               .split("(")[1].split(" GB of state")[0])
    assert state < 0.3 * dp, (state, dp)  # the state split 4 ways, as the plan says
