"""End to end through the command line, as a user runs it (tiny model, simulated devices): train_char.py's and
eval_char.py's main() in this process (tests/conftest.py, call_main), and as processes where a run needs
another device count than this process's 4."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from conftest import TINY, cli_env, free_port, leaves, load_state, main_ok, read_scalars, run_cli, xml_text


def test_train_then_eval(shakespeare, tmp_path):
    exps = tmp_path / "experiments"
    proc = main_ok("train_char.py", "--dataset-path", shakespeare, "--experiment-name", "shakes",
                   "--experiments-dir", exps, *TINY, "--max-steps", 40, "--log-interval", 5,
                   "--checkpoint-interval", 20, "--eval-interval", 20, "--sample-length", 16, cwd=tmp_path)
    assert "4 x cpu" in proc.stdout and "weight decay on 6 kernels" in proc.stdout
    # Not a terminal: one greppable line per --log-interval steps, and the hint names the experiments dir.
    lines = [line for line in proc.stdout.splitlines() if re.fullmatch(
        r"step \d+/40: loss \d+\.\d{4}, lr \d\.\d{3}e-\d\d, [\d,]+ tokens/s, \d+\.\d ms/step", line)]
    assert [int(line.split()[1].split("/")[0]) for line in lines] == list(range(5, 41, 5)), proc.stdout
    assert f"evaluate with: python eval_char.py --experiments-dir {exps} --experiment-name shakes" in proc.stdout
    exp = exps / "shakes"
    assert json.loads((exp / "config.json").read_text())["model"]["seq_len"] == 64
    assert sorted(int(p.name) for p in (exp / "checkpoints").iterdir()) == [20, 40]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(exp / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/bpc", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
            "val/loss", "val/bpc"} <= tags
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(5, 41, 5))
    assert loss[-1] < loss[0] - 0.5, loss  # from ~5.5 (uniform over 256) towards unigram entropy
    assert "samples/val_prompt" in acc.Tags()["tensors"]

    out = main_ok("eval_char.py", "--experiment-name", "shakes", "--experiments-dir", exps,
                  "--sample-steps", 37, "--sample-from-top-k", 10, "--split", "none", cwd=tmp_path)
    raw = out.stdout.encode("utf-8", "surrogateescape")  # the sample is raw bytes: a byte model
    head = b"=== sample 1 of 1: 37 characters, seed 0 ===\n"
    assert head in raw
    sample = raw.split(head, 1)[1]
    assert len(sample) == 38 and sample.endswith(b"\n")


@pytest.mark.parametrize("clip", [1.0, 0.0], ids=["clip", "noclip"])
def test_data_parallel_parity(shakespeare, tmp_path, clip):
    """4 devices x 2 sequences == 1 device x 8 sequences, same global batch, 20 steps.

    Only the order of floating-point additions differs (pmean of 4 partial means vs one mean), so
    parameters and Adam moments agree to float32 rounding accumulated over 20 Adam steps: atol 2e-5 on
    values of order 0.1-1 (measured differences are ~1e-6), and every logged loss, gradient norm and
    learning rate to rel 1e-4. Real bugs move them by far more: a wrong batch split or different data
    changes the losses at once, and a psum in place of the pmean scales gradients by 4, which Adam's
    update hides (it is scale-invariant) but its moments and the logged gradient norm do not, with
    clipping on or off.
    """
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *TINY, "--max-steps", 20,
            "--eval-interval", 0, "--log-interval", 1, "--optim.grad-clip", clip]
    main_ok("train_char.py", *args, "--experiment-name", "four", cwd=tmp_path)  # this process's 4 devices
    run_cli("train_char.py", *args, "--experiment-name", "one", devices=1)
    four, one = load_state(tmp_path / "four"), load_state(tmp_path / "one")
    for a, b in zip(leaves((four["params"], four["opt_state"])), leaves((one["params"], one["opt_state"])),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    four, one = read_scalars(tmp_path / "four" / "tb"), read_scalars(tmp_path / "one" / "tb")
    for tag in ("train/loss", "train/grad_norm", "train/learning_rate"):
        assert [s for s, _ in four[tag]] == [s for s, _ in one[tag]] == list(range(1, 21)), tag
        np.testing.assert_allclose([v for _, v in four[tag]], [v for _, v in one[tag]], rtol=1e-4, err_msg=tag)


def test_grad_accumulation_through_the_cli(shakespeare, tmp_path):
    """--grad-accum-steps 2 says how it splits the batch and trains like 1 micro-batch: 10 steps, the same
    sequences per update, so parameters and moments agree to float32 rounding (atol 2e-5, as above), and
    the logged losses to rel 1e-4. A micro-batch dropped or counted twice changes the losses at once."""
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *TINY, "--max-steps", 10,
            "--eval-interval", 0, "--log-interval", 1]
    two = main_ok("train_char.py", *args, "--experiment-name", "two", "--grad-accum-steps", 2, cwd=tmp_path)
    assert "global batch 8 = 2 micro-batches of 1 per device x 4 devices, accumulated; 512 tokens/step" in two.stdout
    main_ok("train_char.py", *args, "--experiment-name", "one", cwd=tmp_path)
    a, b = load_state(tmp_path / "two"), load_state(tmp_path / "one")
    for x, y in zip(leaves((a["params"], a["opt_state"])), leaves((b["params"], b["opt_state"])), strict=True):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=0)
    np.testing.assert_allclose([v for _, v in read_scalars(tmp_path / "two" / "tb")["train/loss"]],
                               [v for _, v in read_scalars(tmp_path / "one" / "tb")["train/loss"]], rtol=1e-4)


def test_resume_continues_from_saved_step(shakespeare, tmp_path):
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, "--experiment-name", "r", *TINY,
            "--eval-interval", 0, "--checkpoint-interval", 10, "--log-interval", 1]
    main_ok("train_char.py", *args, "--max-steps", 20, cwd=tmp_path)
    proc = main_ok("train_char.py", *args, "--max-steps", 30, "--restore-checkpoint", cwd=tmp_path)
    assert "restored from step 20" in proc.stdout and "steps 20 -> 30" in proc.stdout
    assert sorted(int(p.name) for p in (tmp_path / "r" / "checkpoints").iterdir()) == [10, 20, 30]
    steps = [s for s, _ in read_scalars(tmp_path / "r" / "tb")["train/loss"]]
    assert steps == list(range(1, 31))


def test_max_epochs_and_block_size_flags(shakespeare, tmp_path):
    # 0.005 epochs of the fixture's 89,859 training bytes in windows of 64 with batch 8 -> ceil(0.88) = 1 step
    # (tests/test_resume.py counts steps exactly); block size 32 -> ceil(1.75) = 2.
    exps = tmp_path / "experiments"
    proc = main_ok("train_char.py", "--dataset-path", shakespeare, "--experiments-dir", exps, *TINY,
                   "--max-epochs", 0.005, "--eval-interval", 0, cwd=tmp_path)
    assert "steps 0 -> 1" in proc.stdout
    (exp,) = exps.iterdir()
    assert exp.name.startswith("shakespeare_")  # default name: <dataset>_<timestamp>
    proc = main_ok("train_char.py", "--dataset-path", shakespeare, "--experiments-dir", exps, *TINY,
                   "--max-epochs", 0.005, "--block-size", 32, "--eval-interval", 0, cwd=tmp_path)
    assert "steps 0 -> 2" in proc.stdout


def test_tensorboard_serves_train_loss(shakespeare, tmp_path):
    main_ok("train_char.py", "--dataset-path", shakespeare, "--experiments-dir", tmp_path,
            "--experiment-name", "tb", *TINY, "--max-steps", 6, "--log-interval", 2, "--eval-interval", 0, cwd=tmp_path)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path),
                               "--host", "127.0.0.1", "--port", str(port)],
                              env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=tb%2Ftb&tag=train%2Floss"
        deadline, body = time.time() + 60, None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    body = json.loads(r.read())
                if body:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert body, "tensorboard did not serve train/loss within 60 s"
        assert [row[1] for row in body] == [2, 4, 6]  # rows are [wall_time, step, value]
    finally:
        server.kill()  # by its own process id
        server.wait(timeout=30)


def test_trains_on_xml_given_a_relative_path(tmp_path):
    """Markup and multi-byte UTF-8 (generated MediaWiki-like XML, as enwik8 is) at the relative path a user
    would type from the directory they run in."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "wiki.xml").write_bytes(xml_text())  # 407,553 bytes
    proc = main_ok("train_char.py", "--dataset-path", "data/wiki.xml", "--experiments-dir", "runs",
                   "--experiment-name", "wiki", *TINY, "--max-steps", 8, "--log-interval", 4, "--eval-interval", 8,
                   cwd=tmp_path)
    assert "train 366,799 / val 20,377 / test 20,377 bytes" in proc.stdout
    scalars = read_scalars(tmp_path / "runs" / "wiki" / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [4, 8] and "val/bpc" in scalars


def test_char_vocab_with_unknown_bytes(tmp_path):
    corpus = tmp_path / "c.txt"
    # The last 10% (val + test) holds characters the training split never has.
    corpus.write_bytes(b"abcd efgh. " * 900 + b"XYZ!" * 275)
    main_ok("train_char.py", "--dataset-path", corpus, "--experiments-dir", tmp_path, "--experiment-name", "v",
            *TINY, "--data.tokenizer", "char", "--max-steps", 3, "--eval-interval", 0, cwd=tmp_path)
    vocab = json.loads((tmp_path / "v" / "vocab.json").read_text())
    assert vocab["kind"] == "char" and bytes(vocab["symbols"]) == b" .abcdefgh"
    out = main_ok("eval_char.py", "--experiments-dir", tmp_path, "--experiment-name", "v", "--split", "val",
                  "--prompt", "abc", "--sample-steps", 5, "--batch-size", 4, cwd=tmp_path)
    report = json.loads((tmp_path / "v" / "eval" / "val.json").read_text())
    assert report["unknown_bytes"] == report["bytes_scored"] == 549  # val = 550 bytes of "XYZ!"
    assert "outside the char vocabulary" in out.stdout
