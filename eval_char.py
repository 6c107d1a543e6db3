"""Sample text from a trained experiment and score bits per character on a whole split.

    python eval_char.py --experiment-name shakes --sample-steps 300 --sample-from-top-k 10
    python eval_char.py --experiment-name enwik8_run --split test --sample-steps 0
"""

import sys
from pathlib import Path

import tyro

from mingpt_palm.config import EvalConfig, UserError, validate_eval


def open_experiment(cfg: EvalConfig):
    """(experiment, its train config, vocabulary), from the directory alone, each checked."""
    import jax

    from mingpt_palm import sampling
    from mingpt_palm.experiment import Experiment, warn

    exp = Experiment(cfg.experiments_dir, cfg.experiment_name)
    exp.check_existing()
    train_cfg = exp.read_config()
    vocab = exp.read_vocab(train_cfg.model.num_tokens)
    sampling.check_sampling_args(vocab.size, cfg.temperature, cfg.sample_from_top_k, cfg.top_p,
                                 cfg.sample_steps, cfg.num_samples)
    if cfg.batch_size % jax.local_device_count():
        raise UserError(f"--batch-size {cfg.batch_size} must be a positive multiple of the "
                        f"{jax.local_device_count()} local devices")
    if holder := exp.lock.holder():
        warn(f"a training run is using {exp.path} ({holder}): reading its newest complete checkpoint")
    return exp, train_cfg, vocab


def restore_params(cfg: EvalConfig, exp, train_cfg):
    """(params, checkpoint step): the abstract train state is rebuilt exactly as training saved it."""
    from mingpt_palm.state import build

    abstract = build(train_cfg)[-1]
    state, _, step = exp.restore(abstract, cfg.checkpoint_step, read_only=True)
    exp.close()
    return state.params, step


def load_corpus(exp, train_cfg):
    """The corpus the experiment was trained on, checked against its recorded size and sha256."""
    from mingpt_palm import data
    from mingpt_palm.experiment import warn

    recorded = exp.read_corpus()
    if recorded is None:
        warn(f"{exp.path} has no corpus.json (it predates corpus fingerprints): {train_cfg.dataset_path} cannot be "
             "checked against the corpus it was trained on")
    return data.load_corpus(train_cfg.dataset_path, train_cfg.data, progress=True, expect=recorded,
                            owner=str(exp.path))


def sample(cfg: EvalConfig, train_cfg, vocab, params, corpus) -> None:
    import jax
    import numpy as np

    from mingpt_palm import data, sampling

    if cfg.prompt_file is not None:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt-file {path} is not a file")
        prompt = path.read_bytes()
    elif cfg.prompt is not None:
        prompt = cfg.prompt.encode("utf-8")
    else:
        prompt = data.default_prompt(corpus.val, cfg.seed)
    prompt_ids = vocab.encode(np.frombuffer(prompt, np.uint8))
    out = sampling.generate(params, train_cfg.model, prompt_ids, cfg.sample_steps, jax.random.PRNGKey(cfg.seed),
                            num_samples=cfg.num_samples, temperature=cfg.temperature,
                            top_k=cfg.sample_from_top_k, top_p=cfg.top_p)
    stdout = sys.stdout.buffer
    stdout.write(b"=== prompt ===\n" + prompt + b"\n")
    for i, ids in enumerate(out):
        stdout.write(f"=== sample {i + 1} of {len(out)}: {cfg.sample_steps} characters, seed {cfg.seed} ===\n"
                     .encode())
        stdout.write(vocab.decode(ids) + b"\n")
    stdout.flush()


def check_split(cfg: EvalConfig, train_cfg, corpus) -> None:
    from mingpt_palm import data

    other = "test" if cfg.split == "val" else "val"
    fraction = getattr(train_cfg.data, f"{cfg.split}_fraction")
    data.require_windows(corpus.split(cfg.split), cfg.split, train_cfg.model.seq_len, corpus.path,
                         f"the split was fixed when the experiment was trained (its {cfg.split} fraction: {fraction}); "
                         f"score --split {other} instead")


def score(cfg: EvalConfig, exp, train_cfg, vocab, params, step, corpus) -> None:
    from mingpt_palm import data, evaluate, parallel
    from mingpt_palm.model import PaLM

    split, seq_len = corpus.split(cfg.split), train_cfg.model.seq_len
    raw, weights = data.split_windows(split, seq_len)
    result = evaluate.score(evaluate.make_eval_step(PaLM(train_cfg.model)), parallel.replicate(params),
                            vocab.encode(raw), weights, cfg.batch_size)
    report = {
        "split": cfg.split, "checkpoint_step": step, "loss_nats": result["loss"], "bpc": result["bpc"],
        "bytes_scored": result["tokens"], "split_bytes": int(len(split)),
        "unknown_bytes": vocab.unknown_count(split[1:]), "seq_len": seq_len, "dataset": str(corpus.path),
    }
    out_path = exp.write_report(f"{cfg.split}.json" if cfg.checkpoint_step is None else f"{cfg.split}_step{step}.json",
                                report)
    print(f"=== {cfg.split}: loss {result['loss']:.4f} nats, {result['bpc']:.4f} bits per character over "
          f"{result['tokens']:,} bytes (checkpoint step {step}) -> {out_path}")
    if report["unknown_bytes"]:
        print(f"    {report['unknown_bytes']:,} scored bytes are outside the char vocabulary "
              "(scored as the unknown id)")


def run(cfg: EvalConfig) -> int:
    validate_eval(cfg)
    exp, train_cfg, vocab = open_experiment(cfg)
    need_corpus = cfg.split != "none" or (cfg.sample_steps and cfg.prompt is None and cfg.prompt_file is None)
    corpus = load_corpus(exp, train_cfg) if need_corpus else None
    if cfg.split != "none":
        check_split(cfg, train_cfg, corpus)
    params, step = restore_params(cfg, exp, train_cfg)
    if cfg.split != "none":
        exp.report_dir()  # before sampling and scoring, which may take long, so that it cannot fail at the end
    print(f"experiment {exp.path}: checkpoint step {step}, {train_cfg.dataset_path}", file=sys.stderr)
    if cfg.sample_steps:
        sample(cfg, train_cfg, vocab, params, corpus)
    if cfg.split != "none":
        score(cfg, exp, train_cfg, vocab, params, step, corpus)
    return 0


def main() -> int:
    from mingpt_palm import cli

    cfg = tyro.cli(EvalConfig)
    # Evaluation writes only its report, at the very end and atomically: Ctrl-C can leave at once.
    return cli.run(run, cfg, interrupted="interrupted by Ctrl-C; nothing was written", exit_at_once=True)


if __name__ == "__main__":
    sys.exit(main())
