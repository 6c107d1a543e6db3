"""Train a PaLM character-level language model on every local device.

    python train_char.py --dataset-path enwik8
    python train_char.py --dataset-path ../shared/data/tinyshakespeare.txt --model.depth 4 --max-steps 2000
    python train_char.py --experiment-name X --restore-checkpoint     # continue X with its saved settings
"""

import sys

import tyro

from mingpt_palm.config import TrainConfig


def parse(argv: list[str]) -> TrainConfig:
    """The command line; when continuing an experiment, over the settings saved with it.

    The saved config.json becomes the defaults, so `--experiment-name X --restore-checkpoint` alone
    continues X, and any flag given now is a deliberate change (train() refuses the ones that would
    change what the run computes).
    """
    cfg = tyro.cli(TrainConfig, args=argv)  # --help answers here, before anything slow is imported
    if (cfg.restore_checkpoint or cfg.restore_step is not None) and cfg.experiment_name is not None:
        from mingpt_palm.experiment import Experiment

        exp = Experiment(cfg.experiments_dir, cfg.experiment_name)
        exp.check_existing()
        cfg = tyro.cli(TrainConfig, default=exp.read_config(), args=argv)
    return cfg


def main() -> int:
    from mingpt_palm import cli

    def parse_and_train(argv):
        cfg = parse(argv)
        from mingpt_palm.train import train

        return train(cfg)

    # Ctrl-C before the training loop installs its own handler (loading, restoring, compiling): no
    # step has run, so there is nothing to save, and orbax only renames complete checkpoints.
    return cli.run(parse_and_train, sys.argv[1:], interrupted="interrupted before training started; "
                   "checkpoints already on disk are complete and intact")


if __name__ == "__main__":
    sys.exit(main())
