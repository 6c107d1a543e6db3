#!/usr/bin/env bash
# The lent GPU machine has jax, flax, optax, orbax and tensorboard, but not tyro (train_char.py and
# mingpt_palm/config.py need it), and it cannot reach a package index. Run this here, once, from the
# repository root: it puts tyro and the packages tyro needs, as Python 3.12 wheels, into .whl/
# (git-ignored), which the device call carries and installs (README, "Measured figures").
set -euo pipefail
cd "$(dirname "$0")/.."
${PYTHON:-python3} -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl tyro docstring-parser typeguard typing-extensions
ls .whl
