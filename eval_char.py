"""Sample text from a trained experiment and score bits per byte on a whole split.

    python eval_char.py --experiment-name shakes --sample-steps 300 --sample-from-top-k 10
    python eval_char.py --experiment-name enwik8_run --split test --sample-steps 0
    python eval_char.py --experiment-name enwik8_run --split test --sample-steps 0 --eval-seq-len 1024 --stride 128
"""

import dataclasses
import sys
from pathlib import Path

from mingpt_palm import errors

if __name__ == "__main__":  # not when a test imports this file
    errors.script_start()  # Ctrl-C until the backend is up, no CUDA plugin without a GPU (mingpt_palm/errors.py)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

from mingpt_palm import checkpoints, data, evaluate, model, parallel, sampling  # noqa: E402
from mingpt_palm.config import EvalConfig, ModelConfig, position_scheme  # noqa: E402
from mingpt_palm.settings import validate_eval  # noqa: E402
from mingpt_palm.errors import UserError  # noqa: E402
from mingpt_palm.experiment import Experiment  # noqa: E402
from mingpt_palm.logs import Progress, warn  # noqa: E402
from mingpt_palm.state import build  # noqa: E402


def open_experiment(cfg: EvalConfig):
    """(experiment, its train config, vocabulary), from the directory alone, each checked."""
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


def read_prompt(cfg: EvalConfig, vocab, corpus):
    """(the prompt's bytes, its token ids); a warning for bytes the vocabulary lacks."""
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
        warn(f"{unknown:,} of the prompt's {len(raw):,} bytes are outside the {vocab.kind} vocabulary ({vocab.size} "
             "ids) and become the unknown id")
    return prompt, vocab.encode(raw)


def draw(cfg: EvalConfig, m, params, prompt_ids) -> list:
    """The samples' token ids. Sample i (from 0) is drawn alone with seed --seed + i, so that it can be drawn
    again on its own: in one batch, float rounding would differ from a single sample's and move a draw now
    and then."""
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
        stdout.write(f"=== sample {i + 1} of {len(out)}: {vocab.amount(cfg.sample_steps, text)}, seed {cfg.seed + i} "
                     "===\n".encode())
        stdout.write(text + b"\n")
    stdout.flush()


def windows(cfg: EvalConfig, m: ModelConfig) -> tuple[int, int]:
    """(L, S): the scoring window and stride; a UserError for what this model cannot score."""
    length = m.seq_len if cfg.eval_seq_len is None else cfg.eval_seq_len
    stride = length if cfg.stride is None else cfg.stride
    named = f"--eval-seq-len {length}" if cfg.eval_seq_len is not None else f"the window (the model's seq_len, {length})"
    if stride > length:
        raise UserError(f"--stride {stride} is longer than {named}: windows that advance by more than their length "
                        f"would skip tokens; use --stride {length} or less")
    if (longest := model.max_context(m)) is not None and length > longest:
        raise UserError(f"--eval-seq-len {length}: scoring windows longer than seq_len needs a position scheme that "
                        f"extends (alibi, t5, rotary); this model uses {position_scheme(m)} positions up to {longest}: "
                        f"use --eval-seq-len {longest} or less")
    return length, stride


def require_window(cfg: EvalConfig, train_cfg, split: np.ndarray, length: int, source, unit: str) -> None:
    """The split holds one scoring window: in bytes before the checkpoint is read (every token covers at
    least one), in tokens once they are encoded."""
    other = "test" if cfg.split == "val" else "val"
    fixed = (f"the split was fixed when the experiment was trained (its {cfg.split} fraction: "
             f"{getattr(train_cfg.data, f'{cfg.split}_fraction')}); " if cfg.eval_seq_len is None else
             "use a smaller --eval-seq-len, or ")
    data.require_windows(split, cfg.split, length, source, f"{fixed}score --split {other} instead", unit,
                         window="block size" if cfg.eval_seq_len is None else "--eval-seq-len")


def score(cfg: EvalConfig, exp, train_cfg, vocab, params, step, corpus) -> None:
    """Score the whole split with windows of L tokens advancing by S; print and write the report."""
    m, split = train_cfg.model, corpus.split(cfg.split)
    length, stride = windows(cfg, m)
    ids = vocab.encode(split)
    require_window(cfg, train_cfg, ids, length, corpus.path, "tokens")
    tokens, weights = data.scoring_windows(ids, length, stride)
    # Past seq_len every query attends over its whole window, not the training length's sliding one.
    p_eval = evaluate.make_eval_step(build(train_cfg).model, context=length if length > m.seq_len else None)
    with Progress(f"scoring {cfg.split}", len(tokens), "windows") as shown:
        result = evaluate.score(p_eval, parallel.replicate(params), tokens, weights, cfg.batch_size,
                                vocab.byte_lengths, progress=shown)
    report = {
        "split": cfg.split, "checkpoint_step": step, "eval_seq_len": length, "stride": stride,
        "loss_nats": result["loss"], "bits_per_token": result["bits_per_token"],
        "bits_per_byte": result["bits_per_byte"],
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
        print(f"    {report['unknown_bytes']:,} scored bytes are outside the {vocab.kind} vocabulary (scored as the "
              "unknown id)")


def run(cfg: EvalConfig) -> int:
    jax.devices()
    errors.sigint_raises()  # the backend is up: Ctrl-C raises again, and main() makes it one line
    validate_eval(cfg)
    exp, train_cfg, vocab = open_experiment(cfg)
    need_corpus = cfg.split != "none" or (cfg.sample_steps and cfg.prompt is None and cfg.prompt_file is None)
    corpus = data.load_corpus(train_cfg.dataset_path, train_cfg.data, progress=True, expect=exp.read_corpus(),
                              owner=str(exp.path)) if need_corpus else None
    if cfg.split != "none":  # before the checkpoint is read
        require_window(cfg, train_cfg, corpus.split(cfg.split), windows(cfg, train_cfg.model)[0], corpus.path, "bytes")
    restored = checkpoints.restore(exp.checkpoint_dir, build(train_cfg).abstract, cfg.checkpoint_step,
                                   live=exp.lock.holder(), warn=warn)
    if cfg.split != "none":
        exp.check_reports_writable()  # before sampling and scoring, which may take long
    print(f"experiment {exp.path}: checkpoint step {restored.step}, {train_cfg.dataset_path}", file=sys.stderr)
    if cfg.sample_steps:
        sample(cfg, train_cfg, vocab, restored.state.params, corpus)
    if cfg.split != "none":
        score(cfg, exp, train_cfg, vocab, restored.state.params, restored.step, corpus)
    return 0


def main() -> int:
    cfg = tyro.cli(EvalConfig)
    errors.install()
    # Evaluation writes only its report, at the very end and atomically: Ctrl-C can leave at once.
    return errors.main(run, cfg, interrupted="interrupted by Ctrl-C; nothing was written", exit_at_once=True)


if __name__ == "__main__":
    sys.exit(main())
