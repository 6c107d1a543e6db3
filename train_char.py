"""Train a PaLM character-level language model on every local device.

    python train_char.py --dataset-path enwik8
    python train_char.py --dataset-path ../shared/data/tinyshakespeare.txt --model.depth 4 --max-steps 2000
"""

import sys

import tyro

from mingpt_palm.config import TrainConfig, UserError


def main() -> int:
    cfg = tyro.cli(TrainConfig)
    from mingpt_palm.train import TrainingStopped, train  # after parsing: --help stays instant

    try:
        return train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C before the training loop installs its own handler (loading, restoring, compiling):
        # no step has run, so there is nothing to save, and orbax only renames complete checkpoints.
        print("error: interrupted before training started; checkpoints already on disk are complete "
              "and intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
