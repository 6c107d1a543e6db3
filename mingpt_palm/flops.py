"""How big a model is, from its shapes alone: parameters, the bytes they and Adam's state take, and
the training FLOPs per token. `python train_char.py --preset palm-540b --print-params` prints them.

FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6 N + 12 L H Q T, where N counts the
parameters of every matmul a token goes through: every dense kernel plus vocab x dim for the tied
head (the input lookup, position tables, norms and biases are no matmul); L depth, H heads, Q
dim_head, T seq_len, attention counted over the whole T x T square as in the paper. Model FLOPs,
not hardware FLOPs: rematerialisation is not counted. benchmarks/bench_train.py uses the same count.

It also prints the memory plan per device (memory.py) for --parallel over --plan-devices or the visible
devices, and whether it fits a known device memory (--device-memory-gb, a GPU's).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mingpt_palm import memory, presets
from mingpt_palm.config import ModelConfig, TrainConfig
from mingpt_palm.errors import UserError
from mingpt_palm.model import compute_dtype
from mingpt_palm.settings import validate_train
from mingpt_palm.state import build


def matmul_params(params) -> tuple[int, int, int]:
    """(dense kernel, tied head, other) parameter counts of a parameter tree (arrays or shapes).

    By leaf name: `kernel` is a dense projection, embed/embedding the token table that the tied head
    multiplies by (its matmul is real work); anything else (norm scales, biases, position tables) is no
    matmul."""
    sizes = {"kernel": 0, "head": 0, "other": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = tuple(getattr(k, "key", None) for k in path)
        kind = "kernel" if keys[-1] == "kernel" else "head" if keys == ("embed", "embedding") else "other"
        sizes[kind] += int(np.prod(leaf.shape))
    return sizes["kernel"], sizes["head"], sizes["other"]


def attention_flops(m: ModelConfig) -> int:
    """12 L H Q T: the score and value matmuls of one token over a whole window, forward and backward."""
    return 12 * m.depth * m.heads * m.dim_head * m.seq_len


def flops_per_token(params, m: ModelConfig) -> int:
    dense, head, _ = matmul_params(params)
    return 6 * (dense + head) + attention_flops(m)


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


COUNT_UNITS, SI_UNITS = ("", "K", "M", "B", "T"), ("", "K", "M", "G", "T", "P")


def human(n: float, sep: str = "", units=COUNT_UNITS) -> str:
    """540354281472 -> '540.35B': two decimals in the largest unit (thousands) it reaches."""
    i = 0
    while abs(n) >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.2f}{sep}{units[i]}" if i else f"{n:g}{sep}"


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024


def sizes(cfg: TrainConfig, abstract=None) -> dict:
    """The figures of cfg's model and optimizer, from jax.eval_shape of their initialisation (`abstract`:
    state.build(cfg).abstract, if at hand)."""
    abstract = build(cfg).abstract if abstract is None else abstract
    dense, head, other = matmul_params(abstract.params)
    param_bytes, adam_bytes = nbytes(abstract.params), nbytes(abstract.opt_state)
    return {"params": dense + head + other, "matmul_params": dense + head, "param_bytes": param_bytes,
            "adam_bytes": adam_bytes, "attention_flops": attention_flops(cfg.model),
            "flops_per_token": 6 * (dense + head) + attention_flops(cfg.model)}


def dry_run_vocabulary(cfg: TrainConfig, continued: bool = False) -> tuple[TrainConfig, str]:
    """cfg with the vocabulary size a dry run counts with (it reads no corpus), and where that size comes
    from. A run sets num_tokens from its corpus's vocabulary instead."""
    m, d = cfg.model, cfg.data
    later = "a run sets it from its corpus"
    if continued:  # cfg holds the experiment's saved settings
        return cfg, f"{m.num_tokens:,} tokens (the experiment's vocabulary)"
    if cfg.init_from is not None:
        return cfg, f"{m.num_tokens:,} tokens ({cfg.init_from}'s vocabulary)"
    if d.tokenizer == "sentencepiece":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, num_tokens=d.vocab_size))
        return cfg, f"{d.vocab_size:,} tokens (--data.vocab-size of the sentencepiece tokenizer)"
    preset = presets.PRESETS.get(cfg.preset)
    if preset is not None and m.num_tokens == preset.model.get("num_tokens"):
        return cfg, f"{m.num_tokens:,} tokens (the preset's; {later}: 256 for --data.tokenizer byte)"
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, num_tokens=256))
    if d.tokenizer == "char":
        return cfg, ("256 tokens (a guess: --data.tokenizer char has one per distinct byte of the corpus, plus "
                     "one, which a dry run does not read)")
    return cfg, f"256 tokens (the byte tokenizer's; {later})"


def print_params(cfg: TrainConfig, continued: bool = False) -> int:
    """--print-params: what cfg's model would be, said from shapes, before anything is read or written.
    `continued`: cfg is a saved experiment's (its vocabulary size is known)."""
    validate_train(cfg)
    cfg, vocab = dry_run_vocabulary(cfg, continued)
    m, preset = cfg.model, presets.PRESETS.get(cfg.preset)
    abstract = build(cfg).abstract
    s = sizes(cfg, abstract)
    name = f"preset {cfg.preset}: {preset.source}; " if preset else ""
    print(f"model: {name}variant {m.variant}, dim {m.dim:,}, depth {m.depth}, heads {m.heads} x {m.dim_head}, "
          f"ff_mult {m.ff_mult}, seq_len {m.seq_len:,}, vocabulary {vocab}")
    reported = ""
    if preset is not None and preset.reported_params and dataclasses.replace(m, **preset.model) == m:
        ratio = s["params"] / preset.reported_params - 1
        reported = f"; reported: {human(preset.reported_params)} ({100 * ratio:+.2f}%)"
    print(f"parameters: {s['params']:,} ({human(s['params'])}){reported}")
    total = s["param_bytes"] + s["adam_bytes"]
    print(f"memory: parameters {s['param_bytes']:,} bytes ({human_bytes(s['param_bytes'])}, float32) + Adam state "
          f"{s['adam_bytes']:,} bytes ({human_bytes(s['adam_bytes'])}, two float32 moments) = {total:,} bytes "
          f"({human_bytes(total)}), before activations")
    print(f"FLOPs per token (training, 6N + 12*L*H*Q*T): 6 x {s['matmul_params']:,} matmul parameters + "
          f"{s['attention_flops']:,} attention = {s['flops_per_token']:,} ({human(s['flops_per_token'], ' ', SI_UNITS)}FLOP)")
    for line in plan_lines(cfg, abstract):
        print(line)
    print("dry run: shapes from jax.eval_shape; nothing was allocated, read or written")
    return 0


def plan_lines(cfg: TrainConfig, abstract) -> list[str]:
    """The memory plan per device (memory.py) for cfg.parallel over --plan-devices or the visible devices,
    and whether it fits the device's memory when that is known (--device-memory-gb, a GPU)."""
    devices = cfg.plan_devices or jax.device_count()
    source = "--plan-devices" if cfg.plan_devices else "visible"
    head = f"plan: --parallel {cfg.parallel} over {devices:,} device{'s' if devices > 1 else ''} ({source})"
    try:
        p = memory.plan(cfg, devices, abstract)
    except UserError as e:  # fsdp over a device count that does not divide the width: said, not raised
        return [f"{head}: cannot: {e}"]
    m, dtype = cfg.model, compute_dtype(cfg.model).name
    state = (f"{head}: per device parameters {human_bytes(p.params)}, gradients {human_bytes(p.grads)}, "
             f"Adam {human_bytes(p.adam)} = {human_bytes(p.state)}; activations per sequence of {m.seq_len:,} tokens "
             f"~{human_bytes(p.per_sequence['none'])} (remat none), ~{human_bytes(p.per_sequence['block'])} (remat "
             f"block), {dtype} compute (--model.dtype {m.dtype}{', bfloat16 on a GPU' if m.dtype == 'auto' else ''})")
    run = (f"plan: --batch-size {cfg.batch_size:,} / {devices:,} device(s) / --grad-accum-steps {cfg.grad_accum_steps} "
           f"= {p.sequences:,} sequence(s) per device per micro-batch: activations ~{human_bytes(p.activations)} "
           f"(remat {m.remat}); in all ~{human_bytes(p.total)} per device, a lower bound")
    lines = [state, run]
    known = memory.device_limit(cfg)
    if known is not None:
        limit, where = known
        verdict = "fits" if p.total <= limit else f"does not fit; {memory.advice(cfg, p, abstract, limit)}"
        lines.append(f"plan: {where} = {human_bytes(limit)}: {verdict}")
    return lines
