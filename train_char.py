"""Train a PaLM character-level language model on every local device.

    python train_char.py --dataset-path enwik8
    python train_char.py --dataset-path ../shared/data/tinyshakespeare.txt --model.depth 4 --max-steps 2000
    python train_char.py --experiment-name X --restore-checkpoint     # continue X with its saved settings
    python train_char.py --init-from experiments/X --dataset-path other.txt --max-steps 500   # fine-tune X
    python train_char.py --preset palm-540b --print-params            # sizes from shapes alone, a dry run
"""

import dataclasses
import sys

from mingpt_palm import interrupts

if __name__ == "__main__":  # not when a test imports this file
    interrupts.hold()  # a Ctrl-C from here until the backend is up is acted on then (mingpt_palm/interrupts.py)

import tyro  # noqa: E402

from mingpt_palm.config import ModelConfig, TrainConfig, UserError  # noqa: E402
from mingpt_palm.presets import PRESETS


def parse(argv: list[str]) -> tuple[TrainConfig, str]:
    """The command line, over the defaults its start mode makes; returns (config, mode).

    Continuing an experiment (setup.start_mode: "resume", or "restart" when it has no checkpoint yet):
    the saved config.json becomes the defaults, so `--experiment-name X --restore-checkpoint` alone
    continues X, and any flag given now is a deliberate change (train() refuses the ones that would change
    what the run computes; display flags such as --no-progress apply to this run only). --init-from X:
    X's model, vocabulary and corpus are the defaults (train() refuses flags that change the model or the
    vocabulary). --preset: the preset's model fields are the defaults of a new run; beside a continued
    one it must describe the model the run has. In every case a flag given on the command line wins.
    """
    cfg = tyro.cli(TrainConfig, args=argv)  # --help answers here, before anything slow is imported
    if cfg.preset is not None and cfg.init_from is not None:
        raise UserError("--preset and --init-from both choose the model (--init-from takes the model of the "
                        "experiment it starts from): give one of them")
    from mingpt_palm.setup import start_mode

    mode = start_mode(cfg)
    preset = (TrainConfig(model=ModelConfig(**PRESETS[cfg.preset].model)) if cfg.preset is not None else None)
    if mode in ("resume", "restart"):
        from mingpt_palm.experiment import Experiment

        saved = Experiment(cfg.experiments_dir, cfg.experiment_name).read_config()
        if preset is not None:
            _check_preset(cfg.preset, tyro.cli(TrainConfig, default=preset, args=argv).model, saved.model)
        default = dataclasses.replace(saved, progress=TrainConfig.progress)
        return tyro.cli(TrainConfig, default=default, args=argv), mode
    if mode == "finetune":
        from mingpt_palm.setup import finetune_defaults, init_source

        return tyro.cli(TrainConfig, default=finetune_defaults(init_source(cfg).read_config()), args=argv), mode
    if preset is not None:
        return tyro.cli(TrainConfig, default=preset, args=argv), mode
    return cfg, mode


def _check_preset(name: str, asked: ModelConfig, saved: ModelConfig) -> None:
    """A command that starts an experiment from a preset also continues it, as long as the model it
    describes is the one the experiment has."""
    keys = [k for k in PRESETS[name].model if k != "num_tokens"]  # a run sets num_tokens from its corpus
    diffs = [f"model.{k} {getattr(asked, k)!r} (saved: {getattr(saved, k)!r})" for k in keys
             if getattr(asked, k) != getattr(saved, k)]
    if diffs:
        raise UserError(f"--preset {name} describes another model than the experiment was started with "
                        f"({'; '.join(diffs[:6])}); leave out --preset to continue it with its own, or start a new "
                        "experiment")


def main() -> int:
    from mingpt_palm import cli

    def parse_and_train(argv):
        cfg, mode = parse(argv)
        if cfg.print_params:
            from mingpt_palm.flops import print_params

            return print_params(cfg, continued=mode in ("resume", "restart"))
        from mingpt_palm.train import train

        return train(cfg)

    # Ctrl-C before the training loop installs its own handler (loading, restoring, compiling): no
    # step has run, so there is nothing to save, and orbax only renames complete checkpoints.
    return cli.run(parse_and_train, sys.argv[1:], interrupted="interrupted before training started; "
                   "checkpoints already on disk are complete and intact")


if __name__ == "__main__":
    sys.exit(main())
