"""Data-loader throughput and memory: does a memory-mapped corpus stay out of the process's memory?

What it does:
  1. Writes a --size-mb file of random printable bytes (with newlines) into a temporary directory,
     fsyncs it and asks the kernel to drop it from the page cache (posix_fadvise DONTNEED), so
     the first reads come from disk rather than from the cache our own writing filled.
  2. Loads it with mingpt_palm.data.load_corpus (np.memmap, 90/5/5 split) and builds the vocabulary.
  3. Times --batches calls of data.get_batch + Vocab.encode (exactly what train.py does per step)
     for global batch --batch x --seq-len, then for --large-batch x --seq-len, then repeats the
     first run on the now-cached pages. Reports batches/s, tokens/s and the split between gather
     and encode.
  4. Reads the resident set size from /proc/self/status before loading, after loading, and after
     each run. VmRSS = RssAnon + RssFile (+ RssShmem). Pages of the memory-mapped file that batches
     touch show up in RssFile: they are page-cache pages shared with the kernel, never copied and
     reclaimable under pressure. RssAnon is the memory the process actually owns; for a memmap it
     grows only by the batch arrays, not by the file size.
  The temporary directory is deleted at the end, also on error.

Run from the repository root:
  python benchmarks/bench_loader.py [--size-mb 100] [--batches 1000] [--batch 32] [--seq-len 512]
tests/test_benchmarks.py runs it with tiny arguments on every test run, so that it cannot rot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Run as `python benchmarks/bench_loader.py`, Python puts benchmarks/ (not the repository root) on
# sys.path; the package is not pip-installed, so add the root explicitly.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import loadavg  # noqa: E402  (benchmarks/ is on sys.path)
from mingpt_palm import data  # noqa: E402
from mingpt_palm.config import DataConfig  # noqa: E402
from mingpt_palm.vocab import Vocab  # noqa: E402

MiB = 1024 * 1024


def memory() -> dict[str, int]:
    """Resident memory in bytes: VmRSS and its anonymous / file-backed parts (Linux), else psutil's RSS."""
    fields = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in fields:
                    fields[key] = int(rest.split()[0]) * 1024  # the kernel reports kB
    except OSError:
        import psutil

        fields["VmRSS"] = psutil.Process().memory_info().rss
    return fields


def write_corpus(path: Path, size: int, seed: int) -> None:
    """Random printable ASCII with a newline about every 80 bytes, written in 1 MiB chunks so the
    writer itself never holds much memory (its peak would hide the loader's in VmHWM)."""
    rng = np.random.default_rng(seed)
    chunk = MiB
    with open(path, "wb") as f:
        for start in range(0, size, chunk):
            n = min(chunk, size - start)
            buf = rng.integers(32, 127, size=n, dtype=np.uint8)
            buf[rng.random(n) < 1 / 80] = ord("\n")
            f.write(buf.tobytes())
        f.flush()
        os.fsync(f.fileno())
        # Clean pages only leave the cache once written back, hence the fsync first.
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def time_batches(split, vocab, batch: int, seq_len: int, n: int, seed: int, first_step: int = 0) -> dict:
    t_gather = t_encode = 0.0
    nbytes = 0
    for step in range(first_step, first_step + n):
        t0 = time.perf_counter()
        raw = data.get_batch(split, seed, step, batch, seq_len)
        t1 = time.perf_counter()
        ids = vocab.encode(raw)
        t2 = time.perf_counter()
        t_gather += t1 - t0
        t_encode += t2 - t1
        nbytes = ids.nbytes
    total = t_gather + t_encode
    return {"batches_s": n / total, "tokens_s": n * batch * seq_len / total, "gather_ms": 1e3 * t_gather / n,
            "encode_ms": 1e3 * t_encode / n, "batch_mib": nbytes / MiB}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=100, help="size of the generated corpus in MiB")
    p.add_argument("--batches", type=int, default=1000, help="batches timed per run")
    p.add_argument("--batch", type=int, default=32, help="global batch (sequences) of the first run")
    p.add_argument("--large-batch", type=int, default=256, help="global batch of the second run (0 skips it)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (windows are seq_len + 1 bytes)")
    p.add_argument("--vocab", choices=("byte", "char"), default="byte",
                   help="char builds its table with a bincount over the whole train split (touches every page)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmpdir", default=None, help="where to create the temporary directory (default: system temp)")
    args = p.parse_args()

    print(loadavg())
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_", dir=args.tmpdir))
    try:
        path = tmp / "corpus.txt"
        size = args.size_mb * MiB
        t0 = time.perf_counter()
        write_corpus(path, size, args.seed)
        print(f"wrote {size / MiB:.0f} MiB of random text to {path} in {time.perf_counter() - t0:.1f} s "
              "(then dropped from the page cache)")

        rows = [("before load", memory())]
        t0 = time.perf_counter()
        corpus = data.load_corpus(str(path), DataConfig(datasets_dir=str(tmp)), progress=False)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        vocab = Vocab.build(args.vocab, corpus.train)
        t_vocab = time.perf_counter() - t0
        rows.append((f"after load_corpus + {args.vocab} vocab", memory()))
        print(f"load_corpus: {1e3 * t_load:.2f} ms (train {len(corpus.train):,} / val {len(corpus.val):,} / "
              f"test {len(corpus.test):,} bytes; train is a {type(corpus.train).__name__}); "
              f"Vocab.build({args.vocab!r}): {1e3 * t_vocab:.2f} ms, {vocab.size} ids")

        # One batch far outside the timed steps shows how much a single batch maps: the kernel reads
        # ahead and maps whole neighbourhoods around each faulting window, not just its 513 bytes.
        data.get_batch(corpus.train, args.seed, 10**9, args.batch, args.seq_len)
        rows.append((f"after 1 batch of {args.batch}", memory()))

        # A char vocabulary's bincount has already read every page of the train split.
        first = "cold" if args.vocab == "byte" else "warm"
        runs = [(first, args.batch, 0)]
        if args.large_batch:
            # Later steps, so the large run draws fresh offsets instead of re-reading cached pages.
            runs.append((first, args.large_batch, args.batches))
        runs.append(("warm", args.batch, 0))  # same steps as the first run: same pages, now cached
        results = []
        for cache, batch, first in runs:
            r = time_batches(corpus.train, vocab, batch, args.seq_len, args.batches, args.seed, first)
            results.append((cache, batch, r))
            rows.append((f"after {args.batches} batches of {batch} ({cache})", memory()))

        print(f"\nget_batch + Vocab.encode, seq_len {args.seq_len}, {args.batches} batches per run "
              f"(steps {{0..}} keyed by seed {args.seed})")
        print(f"{'pages':>5} {'batch':>6} {'batches/s':>10} {'Mtokens/s':>10} {'gather ms':>10} {'encode ms':>10} "
              f"{'int32 batch MiB':>16}")
        for cache, batch, r in results:
            print(f"{cache:>5} {batch:>6} {r['batches_s']:>10,.0f} {r['tokens_s'] / 1e6:>10.1f} "
                  f"{r['gather_ms']:>10.3f} {r['encode_ms']:>10.3f} {r['batch_mib']:>16.2f}")
        print("pages: cold = the file was out of the page cache when the run started (its first batches read "
              "the disk); warm = every page already cached (a repeat of the first run's steps, or after a "
              "char vocabulary's bincount read the whole split)")

        base = rows[0][1]
        print(f"\nresident memory, MiB (corpus file {size / MiB:.0f} MiB; delta = change of VmRSS since before "
              "load; VmHWM = peak VmRSS so far, which catches transient copies)")
        print(f"{'':<40} {'VmRSS':>8} {'RssAnon':>8} {'RssFile':>8} {'delta':>8} {'peak VmHWM':>11}")
        for label, m in rows:
            print(f"{label:<40} {m['VmRSS'] / MiB:>8.1f} {m['RssAnon'] / MiB:>8.1f} {m['RssFile'] / MiB:>8.1f} "
                  f"{(m['VmRSS'] - base['VmRSS']) / MiB:>+8.1f} {m['VmHWM'] / MiB:>11.1f}")
        last = rows[-1][1]
        print(f"anonymous memory added by loading and batching: {(last['RssAnon'] - base['RssAnon']) / MiB:+.1f} MiB; "
              f"file pages mapped: {(last['RssFile'] - base['RssFile']) / MiB:+.1f} MiB "
              "(shared page cache, reclaimable, not a copy)")
        del corpus
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"removed {tmp}")


if __name__ == "__main__":
    main()
