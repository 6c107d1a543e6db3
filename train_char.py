"""Train a PaLM character-level language model on every local device.

    python train_char.py --dataset-path enwik8
    python train_char.py --dataset-path ../shared/data/tinyshakespeare.txt --model.depth 4 --max-steps 2000
    python train_char.py --experiment-name X --restore-checkpoint     # continue X with its saved settings
    python train_char.py --init-from experiments/X --dataset-path other.txt --max-steps 500   # fine-tune X
    python train_char.py --preset palm-540b --print-params            # sizes from shapes alone, a dry run
"""

import sys

from mingpt_palm import interrupts

if __name__ == "__main__":  # not when a test imports this file
    interrupts.hold()  # a Ctrl-C from here until the backend is up is acted on then (mingpt_palm/interrupts.py)

import tyro  # noqa: E402

from mingpt_palm.config import ModelConfig, TrainConfig, UserError  # noqa: E402
from mingpt_palm.presets import PRESETS


def parse(argv: list[str]) -> TrainConfig:
    """The command line, over the defaults its choice of starting point makes.

    Continuing an experiment: the saved config.json becomes the defaults, so `--experiment-name X
    --restore-checkpoint` alone continues X, and any flag given now is a deliberate change (train()
    refuses the ones that would change what the run computes). --init-from X: X's model, vocabulary and
    corpus are the defaults (train() refuses flags that change the model or the vocabulary). --preset:
    the preset's model fields are the defaults. In every case a flag given on the command line wins.
    """
    cfg = tyro.cli(TrainConfig, args=argv)  # --help answers here, before anything slow is imported
    resuming = cfg.restore_checkpoint or cfg.restore_step is not None
    if resuming and cfg.init_from is not None:
        raise UserError("--init-from starts a new experiment from another's parameters and --restore-checkpoint "
                        "continues an existing one: give one of them (a fine-tuned experiment continues with "
                        "--experiment-name NAME --restore-checkpoint alone)")
    if cfg.preset is not None and cfg.init_from is not None:
        raise UserError("--preset and --init-from both choose the model (--init-from takes the model of the "
                        "experiment it starts from): give one of them")
    if cfg.preset is not None and resuming:
        raise UserError("--preset chooses the model of a new experiment; a continued one keeps the model saved in "
                        "its config.json: leave out --preset")
    if resuming and cfg.experiment_name is not None:
        from mingpt_palm.experiment import Experiment

        exp = Experiment(cfg.experiments_dir, cfg.experiment_name)
        exp.check_existing()
        cfg = tyro.cli(TrainConfig, default=exp.read_config(), args=argv)
    elif cfg.init_from is not None:
        from mingpt_palm.setup import finetune_defaults, init_source

        cfg = tyro.cli(TrainConfig, default=finetune_defaults(init_source(cfg).read_config()), args=argv)
    elif cfg.preset is not None:
        cfg = tyro.cli(TrainConfig, default=TrainConfig(model=ModelConfig(**PRESETS[cfg.preset].model)), args=argv)
    return cfg


def main() -> int:
    from mingpt_palm import cli

    def parse_and_train(argv):
        cfg = parse(argv)
        if cfg.print_params:
            from mingpt_palm.flops import print_params

            return print_params(cfg)
        from mingpt_palm.train import train

        return train(cfg)

    # Ctrl-C before the training loop installs its own handler (loading, restoring, compiling): no
    # step has run, so there is nothing to save, and orbax only renames complete checkpoints.
    return cli.run(parse_and_train, sys.argv[1:], interrupted="interrupted before training started; "
                   "checkpoints already on disk are complete and intact")


if __name__ == "__main__":
    sys.exit(main())
