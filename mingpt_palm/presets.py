"""Named sizes from the papers: `--preset NAME` takes a row of this table as the model's defaults.

Each preset is a set of ModelConfig field values and where they come from. A preset only supplies
defaults: any `--model.X` flag given beside it wins, and a run still sets num_tokens from its corpus's
vocabulary (the paper's vocabulary size here is what `--print-params` counts with). The name is a
TrainConfig setting, not a ModelConfig one: the model saved with an experiment is its fields alone.

This module imports nothing of the package, so that config.py (the bottom) can offer the names on
the command line.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
    source: str  # where every number comes from
    model: dict  # ModelConfig field -> value
    reported_params: float | None = None  # the parameter count the source reports, to compare against


# PaLM, Chowdhery et al. 2022 (arXiv 2204.02311), Table 1: layers, heads, d_model and parameters; section
# 2: "the feed-forward size d_ff is always 4 x d_model and attention head size is always 256", SwiGLU,
# a 256k SentencePiece vocabulary; section 5: "a sequence length of 2048 was used for all models".
_PALM = "PaLM (Chowdhery et al. 2022), Table 1 and sections 2 and 5"
# GPT-2 small, Radford et al. 2019, Table 2 (12 layers, d_model 768) and section 2.3 (vocabulary
# 50,257, context 1024 tokens); 12 heads of 64 as in GPT-1 (Radford et al. 2018, section 4.1) and the
# released checkpoint, whose 124,439,808 parameters are the paper's "117M" counted exactly.
_GPT2 = "GPT-2 small (Radford et al. 2019, Table 2 and section 2.3; the released checkpoint)"

# LaMDA 2B, Thoppilan et al. 2022 (arXiv 2201.08239): decoder-only, gated-GELU, T5 relative bias, a 32k
# SentencePiece vocabulary (section 3). Its table of pre-training hyper-parameters could not be opened
# where this was written: depth 10 and 40 heads of 64 are the reference code's example
# (conceptofmind/LaMDA-rlhf-pytorch, lamda_pytorch.py `__main__`, built for "the 2B parameter
# implementation"), dim = 40 x 64, and ff_mult 8 (two GeGLU halves of 20,480, 40,960 in all) is our
# reading of the paper's d_ff. It counts 1.8B: check it against the paper before relying on it.
_LAMDA = ("LaMDA 2B (Thoppilan et al. 2022, section 3; depth and heads from the LaMDA-rlhf-pytorch example; "
          "not checked against the paper's table)")

PRESETS: dict[str, Preset] = {
    "palm-8b": Preset(_PALM, dict(variant="palm", dim=4096, depth=32, heads=16, dim_head=256, ff_mult=4,
                                  seq_len=2048, num_tokens=256_000), reported_params=8.63e9),
    "palm-62b": Preset(_PALM, dict(variant="palm", dim=8192, depth=64, heads=32, dim_head=256, ff_mult=4,
                                   seq_len=2048, num_tokens=256_000), reported_params=62.50e9),
    "palm-540b": Preset(_PALM, dict(variant="palm", dim=18432, depth=118, heads=48, dim_head=256, ff_mult=4,
                                    seq_len=2048, num_tokens=256_000), reported_params=540.35e9),
    "lamda-2b": Preset(_LAMDA, dict(variant="lamda", dim=2560, depth=10, heads=40, dim_head=64, ff_mult=8,
                                    seq_len=2048, num_tokens=32_000)),  # "2B" is a name, not a count
    "gpt2-small": Preset(_GPT2, dict(variant="gpt", dim=768, depth=12, heads=12, dim_head=64, ff_mult=4,
                                     seq_len=1024, num_tokens=50_257), reported_params=124_439_808),
}

NAMES = tuple(PRESETS)
