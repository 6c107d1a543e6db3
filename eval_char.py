"""Sample text from a trained experiment and score bits per character on a whole split.

    python eval_char.py --experiment-name shakes --sample-steps 300 --sample-from-top-k 10
    python eval_char.py --experiment-name enwik8_run --split test --sample-steps 0
"""

import json
import sys
from functools import partial
from pathlib import Path

import tyro

from mingpt_palm.config import EvalConfig, UserError


def run(cfg: EvalConfig) -> int:
    import jax
    import numpy as np

    from mingpt_palm import data, evaluate, parallel, sampling
    from mingpt_palm.experiment import Experiment
    from mingpt_palm.model import PaLM
    from mingpt_palm.optim import make_optimizer
    from mingpt_palm.train import init_params, init_state

    exp = Experiment(cfg.experiments_dir, cfg.experiment_name)
    exp.check_existing()
    train_cfg = exp.read_config()
    vocab = data.Vocab.load(exp.vocab_path)
    model_cfg = train_cfg.model
    sampling.check_sampling_args(vocab.size, cfg.temperature, cfg.sample_from_top_k, cfg.top_p,
                                 cfg.sample_steps, cfg.num_samples)
    if cfg.batch_size < 1 or cfg.batch_size % jax.local_device_count():
        raise UserError(f"--batch-size {cfg.batch_size} must be a positive multiple of the "
                        f"{jax.local_device_count()} local devices")
    if cfg.prompt is not None and cfg.prompt_file is not None:
        raise UserError("give either --prompt or --prompt-file, not both")

    # Rebuild the abstract train state (params + optimizer state) exactly as training saved it.
    model = PaLM(model_cfg)
    tx, _, _ = make_optimizer(train_cfg.optim, train_cfg.max_steps, jax.eval_shape(partial(init_params, model, train_cfg)))
    state, _, step = exp.restore(jax.eval_shape(partial(init_state, model, tx, train_cfg)), cfg.checkpoint_step,
                                 read_only=True)
    exp.close()
    params = state.params
    print(f"experiment {exp.path}: checkpoint step {step}, {train_cfg.dataset_path}", file=sys.stderr)

    need_corpus = cfg.split != "none" or (cfg.sample_steps and cfg.prompt is None and cfg.prompt_file is None)
    corpus = data.load_corpus(train_cfg.dataset_path, train_cfg.data) if need_corpus else None

    if cfg.sample_steps:
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
        out = sampling.generate(params, model_cfg, prompt_ids, cfg.sample_steps, jax.random.PRNGKey(cfg.seed),
                                num_samples=cfg.num_samples, temperature=cfg.temperature,
                                top_k=cfg.sample_from_top_k, top_p=cfg.top_p)
        stdout = sys.stdout.buffer
        stdout.write(b"=== prompt ===\n" + prompt + b"\n")
        for i, ids in enumerate(out):
            stdout.write(f"=== sample {i + 1} of {len(out)}: {cfg.sample_steps} characters, seed {cfg.seed} ===\n"
                         .encode())
            stdout.write(vocab.decode(ids) + b"\n")
        stdout.flush()

    if cfg.split != "none":
        split = corpus.split(cfg.split)
        data.require_windows(split, cfg.split, model_cfg.seq_len, corpus.path)
        raw, weights = data.split_windows(split, model_cfg.seq_len)
        result = evaluate.score(evaluate.make_eval_step(model), parallel.replicate(params), vocab.encode(raw),
                                weights, cfg.batch_size)
        report = {
            "split": cfg.split, "checkpoint_step": step, "loss_nats": result["loss"], "bpc": result["bpc"],
            "bytes_scored": result["tokens"], "split_bytes": int(len(split)),
            "unknown_bytes": vocab.unknown_count(split[1:]), "seq_len": model_cfg.seq_len,
            "dataset": str(corpus.path),
        }
        out_dir = exp.path / "eval"
        out_dir.mkdir(exist_ok=True)
        out_path = out_dir / (f"{cfg.split}.json" if cfg.checkpoint_step is None else f"{cfg.split}_step{step}.json")
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"=== {cfg.split}: loss {result['loss']:.4f} nats, {result['bpc']:.4f} bits per character over "
              f"{result['tokens']:,} bytes (checkpoint step {step}) -> {out_path}")
        if report["unknown_bytes"]:
            print(f"    {report['unknown_bytes']:,} scored bytes are outside the char vocabulary "
                  "(scored as the unknown id)")
    return 0


def main() -> int:
    cfg = tyro.cli(EvalConfig)
    try:
        return run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
