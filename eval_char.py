"""Sample text from a trained experiment and score bits per byte on a whole split.

    python eval_char.py --experiment-name shakes --sample-steps 300 --sample-from-top-k 10
    python eval_char.py --experiment-name enwik8_run --split test --sample-steps 0
    python eval_char.py --experiment-name enwik8_run --split test --sample-steps 0 --eval-seq-len 1024 --stride 128
"""

import dataclasses
import sys
from pathlib import Path

from mingpt_palm import interrupts

if __name__ == "__main__":  # not when a test imports this file
    interrupts.hold()  # a Ctrl-C from here until the backend is up is acted on then (mingpt_palm/interrupts.py)

import tyro  # noqa: E402

from mingpt_palm.config import EvalConfig, UserError, validate_eval  # noqa: E402


def open_experiment(cfg: EvalConfig):
    """(experiment, its train config, vocabulary), from the directory alone, each checked."""
    import jax

    from mingpt_palm import sampling
    from mingpt_palm.experiment import Experiment, warn

    exp = Experiment(cfg.experiments_dir, cfg.experiment_name)
    exp.check_existing()
    train_cfg = exp.read_config()
    # The kernel changes how attention is computed, not what: the one a GPU run saved (cudnn) may not exist
    # here, and auto takes what runs on this machine.
    train_cfg = dataclasses.replace(train_cfg, model=dataclasses.replace(train_cfg.model, attention="auto"))
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
    from mingpt_palm import checkpoints
    from mingpt_palm.experiment import warn
    from mingpt_palm.state import build

    abstract = build(train_cfg)[-1]
    restored = checkpoints.restore(exp.checkpoint_dir, abstract, cfg.checkpoint_step, live=exp.lock.holder(), warn=warn)
    return restored.state.params, restored.step


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


def read_prompt(cfg: EvalConfig, vocab, corpus):
    """(the prompt's bytes, its token ids); a warning for bytes a char vocabulary lacks."""
    import numpy as np

    from mingpt_palm import data
    from mingpt_palm.experiment import warn

    if cfg.prompt_file is not None:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt-file {path} is not a file")
        prompt = path.read_bytes()
    elif cfg.prompt is not None:
        prompt = cfg.prompt.encode("utf-8")
    else:
        prompt = data.default_prompt(corpus.val, cfg.seed)
    raw = np.frombuffer(prompt, np.uint8)
    if unknown := vocab.unknown_count(raw):
        warn(f"{unknown:,} of the prompt's {len(raw):,} bytes are outside the char vocabulary ({vocab.size} ids) "
             "and become the unknown id")
    return prompt, vocab.encode(raw)


def draw(cfg: EvalConfig, m, params, prompt_ids) -> list:
    """The samples' token ids. Sample i (from 0) is drawn alone with seed --seed + i, so that it can be drawn
    again on its own: in one batch, float rounding would differ from a single sample's and move a draw now
    and then."""
    import jax

    from mingpt_palm import sampling
    from mingpt_palm.progress import Progress

    n = cfg.num_samples
    with Progress("generating" if n == 1 else f"generating {n} samples", n * cfg.sample_steps, "tokens") as shown:
        return [sampling.generate(params, m, prompt_ids, cfg.sample_steps, jax.random.PRNGKey(cfg.seed + i),
                                  temperature=cfg.temperature, top_k=cfg.sample_from_top_k, top_p=cfg.top_p,
                                  progress=shown)[0] for i in range(n)]


def sample(cfg: EvalConfig, train_cfg, vocab, params, corpus) -> None:
    prompt, prompt_ids = read_prompt(cfg, vocab, corpus)
    out = draw(cfg, train_cfg.model, params, prompt_ids)
    stdout = sys.stdout.buffer
    stdout.write(b"=== prompt ===\n" + prompt + b"\n")
    for i, ids in enumerate(out):
        text = vocab.decode(ids)
        length = (f"{cfg.sample_steps} tokens, {len(text):,} bytes" if vocab.kind == "sentencepiece" else
                  f"{cfg.sample_steps} characters")
        stdout.write(f"=== sample {i + 1} of {len(out)}: {length}, seed {cfg.seed + i} ===\n".encode())
        stdout.write(text + b"\n")
    stdout.flush()


def check_split(cfg: EvalConfig, train_cfg, corpus) -> None:
    """Before the checkpoint is read: the model can score windows of --eval-seq-len, and the split holds one."""
    from mingpt_palm import data, model
    from mingpt_palm.config import eval_windows

    length, _ = eval_windows(cfg, train_cfg.model, model.max_context(train_cfg.model))
    if cfg.eval_seq_len is not None:  # every token covers at least one byte: enough bytes are needed
        require_scoring_window(cfg, len(corpus.split(cfg.split)), "bytes", length, corpus.path)
        return
    other = "test" if cfg.split == "val" else "val"
    fraction = getattr(train_cfg.data, f"{cfg.split}_fraction")
    data.require_windows(corpus.split(cfg.split), cfg.split, length, corpus.path,
                         f"the split was fixed when the experiment was trained (its {cfg.split} fraction: {fraction}); "
                         f"score --split {other} instead")


def require_scoring_window(cfg: EvalConfig, n: int, unit: str, length: int, source) -> None:
    if n < length + 1:
        other = "test" if cfg.split == "val" else "val"
        raise UserError(f"the {cfg.split} split of {source} has {n:,} {unit}, fewer than one scoring window of "
                        f"{length} + 1 tokens; use a smaller --eval-seq-len, or score --split {other}")


def score(cfg: EvalConfig, exp, train_cfg, vocab, params, step, corpus) -> None:
    """Score the whole split with windows of L tokens advancing by S; print and write the report."""
    from mingpt_palm import data, evaluate, model, parallel
    from mingpt_palm.config import eval_windows
    from mingpt_palm.progress import Progress
    from mingpt_palm.state import build

    m, split = train_cfg.model, corpus.split(cfg.split)
    length, stride = eval_windows(cfg, m, model.max_context(m))
    ids = vocab.encode(split)
    require_scoring_window(cfg, len(ids), "tokens", length, corpus.path)
    tokens, weights = data.scoring_windows(ids, length, stride)
    # Past seq_len every query attends over its whole window, not the training length's sliding one.
    p_eval = evaluate.make_eval_step(build(train_cfg)[0], context=length if length > m.seq_len else None)
    with Progress(f"scoring {cfg.split}", len(tokens), "windows") as shown:
        result = evaluate.score(p_eval, parallel.replicate(params), tokens, weights, cfg.batch_size,
                                vocab.byte_lengths, progress=shown)
    report = {
        "split": cfg.split, "checkpoint_step": step, "eval_seq_len": length, "stride": stride,
        "loss_nats": result["loss"], "bits_per_token": result["bits_per_token"],
        "bits_per_byte": result["bits_per_byte"], "bpc": result["bpc"],
        "tokens_scored": result["tokens"], "bytes_scored": result["bytes"], "split_tokens": int(len(ids)),
        "split_bytes": int(len(split)), "unknown_bytes": vocab.unknown_count(split[1:]), "seq_len": m.seq_len,
        "dataset": str(corpus.path),
    }
    out_path = exp.write_report(f"{cfg.split}.json" if cfg.checkpoint_step is None else f"{cfg.split}_step{step}.json",
                                report)
    print(f"=== {cfg.split}: {result['bits_per_byte']:.4f} bits per byte, {result['bits_per_token']:.4f} bits per "
          f"token (loss {result['loss']:.4f} nats per token) over {result['bytes']:,} bytes in {result['tokens']:,} "
          f"tokens; windows of {length} tokens advancing by {stride} (checkpoint step {step}) -> {out_path}")
    if report["unknown_bytes"]:
        print(f"    {report['unknown_bytes']:,} scored bytes are outside the char vocabulary "
              "(scored as the unknown id)")


def run(cfg: EvalConfig) -> int:
    import jax

    jax.devices()  # the backend starts while a Ctrl-C is still held
    interrupts.release()
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
