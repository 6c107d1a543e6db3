"""Train a PaLM character-level language model on every local device.

    python train_char.py --dataset-path enwik8
    python train_char.py --dataset-path ../shared/data/tinyshakespeare.txt --model.depth 4 --max-steps 2000
    python train_char.py --experiment-name X --restore-checkpoint     # continue X with its saved settings
    python train_char.py --init-from experiments/X --dataset-path other.txt --max-steps 500   # fine-tune X
    python train_char.py --preset palm-540b --print-params            # sizes from shapes alone, a dry run
"""

import sys

from mingpt_palm import errors

if __name__ == "__main__":  # not when a test imports this file
    errors.script_start()  # Ctrl-C until the backend is up, no CUDA plugin without a GPU (mingpt_palm/errors.py)

import tyro  # noqa: E402

from mingpt_palm.config import TrainConfig  # noqa: E402
from mingpt_palm.errors import UserError  # noqa: E402


def parse(argv: list[str]) -> tuple[TrainConfig, str]:
    """The command line over the defaults of its start mode (mingpt_palm/start.py); (config, mode). A flag
    given on the command line always wins; train() refuses those a continued or fine-tuned run may not change."""
    cfg = tyro.cli(TrainConfig, args=argv)  # --help answers here, before anything slow is imported
    if cfg.preset is not None and cfg.init_from is not None:
        raise UserError("--preset and --init-from both choose the model (--init-from takes the model of the "
                        "experiment it starts from): give one of them")
    from mingpt_palm import start

    mode = start.mode(cfg)
    default = start.defaults(cfg, mode)
    if mode in ("resume", "restart") and cfg.preset is not None:
        # The command that started an experiment from a preset also continues it, while it describes its model.
        asked = tyro.cli(TrainConfig, default=start.defaults(cfg, "new"), args=argv).model
        start.check_preset(cfg.preset, asked, default.model)
    return (cfg if default is None else tyro.cli(TrainConfig, default=default, args=argv)), mode


def run(argv: list[str]) -> int:
    cfg, mode = parse(argv)
    if cfg.print_params:
        from mingpt_palm.flops import print_params

        return print_params(cfg, continued=mode in ("resume", "restart"))
    from mingpt_palm.train import train

    return train(cfg)


def main() -> int:
    from mingpt_palm import distributed

    errors.install()
    # Ctrl-C before the training loop installs its own handler (loading, restoring, compiling): no step has
    # run, so there is nothing to save, and orbax only renames complete checkpoints.
    return errors.main(run, sys.argv[1:], on_failure=distributed.report_failure,
                       interrupted="interrupted before training started; checkpoints already on disk are complete "
                                   "and intact")


if __name__ == "__main__":
    sys.exit(main())
