"""Continuing an experiment from its directory alone, and what a continued run may and may not change."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import TINY, call_main, leaves, load_state, main_ok, read_scalars, run_cli

# Deliberately far from every default: a resume that fell back to a default would fail at once.
SETTINGS = [*TINY, "--seed", 7, "--optim.weight-decay", 0.05, "--optim.b2", 0.99, "--data.val-fraction", 0.04,
            "--eval-interval", 0, "--checkpoint-interval", 5, "--keep-checkpoints", 10, "--log-interval", 1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """experiments/ref: 12 uninterrupted steps of a run on the Shakespeare fixture with non-default settings."""
    from conftest import SHAKESPEARE

    root = tmp_path_factory.mktemp("resume")
    main_ok("train_char.py", "--dataset-path", SHAKESPEARE, "--experiment-name", "ref", *SETTINGS, "--max-steps", 12,
            cwd=root)
    return root


def copy_of(reference, tmp_path):
    """experiments/ref copied into tmp_path, under its own name (config.json names it)."""
    shutil.copytree(reference / "experiments" / "ref", tmp_path / "experiments" / "ref")
    return tmp_path / "experiments" / "ref"


def test_resume_from_the_experiment_alone_is_bit_exact(reference, tmp_path):
    """--restore-step 5 with no other flag: the saved settings come back, steps 6-12 are recomputed
    with them, and the result is the uninterrupted run's, bit for bit (same device count)."""
    exp = copy_of(reference, tmp_path)
    first_config = (exp / "config.json").read_text()
    proc = main_ok("train_char.py", "--experiment-name", "ref", "--restore-step", 5, cwd=tmp_path)
    assert "restored from step 5" in proc.stdout and "steps 5 -> 12" in proc.stdout
    # The newer checkpoints are superseded, not deleted.
    assert sorted(p.name.split("_")[0] for p in (exp / "superseded_checkpoints").iterdir()) == ["10", "12"]
    assert "moved the newer checkpoint step 10" in proc.stderr

    ref, cut = load_state(reference / "experiments" / "ref", 12), load_state(exp, 12)
    for a, b in zip(leaves(ref), leaves(cut), strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    ref_loss = dict(read_scalars(reference / "experiments" / "ref" / "tb")["train/loss"])
    for step, loss in read_scalars(exp / "tb")["train/loss"]:
        assert loss == ref_loss[step], step

    # Counts stay right across the resume: tokens seen is steps x batch x block size.
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as c:
        meta = c.restore((exp / "checkpoints" / "12" / "meta").absolute())
    assert meta["tokens_seen"] == 12 * 8 * 64 and meta["step"] == 12
    assert dict(read_scalars(exp / "tb")["train/tokens_seen"])[12] == 12 * 8 * 64

    # config.json is unchanged (nothing was changed) but for --no-progress, which was given to the first run
    # only; history.jsonl keeps the first config and the resume.
    assert json.loads((exp / "config.json").read_text()) == json.loads(first_config) | {"progress": True}
    history = [json.loads(line) for line in (exp / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["new", "resume"] and history[1]["step"] == 5
    assert history[0]["config"] == json.loads(first_config) and history[1]["changed"] == {}


def test_max_steps_on_resume_replans_the_schedule_and_says_so(reference, tmp_path):
    from mingpt_palm.config import OptimizerConfig
    from mingpt_palm.optim import lr_schedule

    exp = copy_of(reference, tmp_path)
    proc = main_ok("train_char.py", "--experiment-name", "ref", "--restore-checkpoint", "--max-steps", 30,
                   "--log-interval", 6, cwd=tmp_path)
    optim = OptimizerConfig(learning_rate=3e-3, warmup_steps=5, weight_decay=0.05, b2=0.99)
    before, after = float(lr_schedule(optim, 12)(12)), float(lr_schedule(optim, 30)(12))
    assert f"schedule: re-planned from step 12 for 30 steps instead of 12; learning rate of the next step " \
           f"{before:.4g} -> {after:.4g}" in proc.stdout
    saved = json.loads((exp / "config.json").read_text())
    assert saved["max_steps"] == 30 and saved["log_interval"] == 6 and saved["seed"] == 7
    history = [json.loads(line) for line in (exp / "history.jsonl").read_text().splitlines()]
    assert history[-1]["changed"] == {"max_steps": [12, 30], "log_interval": [1, 6]}
    assert history[0]["config"]["max_steps"] == 12  # the first config is never lost
    # The logged learning rate of step 13 is the new plan's.
    lr = dict(read_scalars(exp / "tb")["train/learning_rate"])
    assert lr[18] == pytest.approx(float(lr_schedule(optim, 30)(17)), rel=1e-6)


def test_another_device_count_is_allowed_and_said(reference, tmp_path):
    copy_of(reference, tmp_path)
    proc = run_cli("train_char.py", "--experiment-name", "ref", "--restore-checkpoint", "--max-steps", 14,
                   cwd=tmp_path, devices=1)
    assert ("devices: 1 under --parallel dp now, 4 under dp when step 12 was saved: the data order is unchanged (a "
            "batch depends only on seed and step), but gradients are summed in another order, so numbers agree with an uninterrupted run to "
            "float rounding, not bit for bit") in proc.stdout


def test_a_moved_corpus_with_the_same_bytes_is_the_same_corpus(reference, tmp_path):
    from conftest import SHAKESPEARE

    copy_of(reference, tmp_path)
    moved = tmp_path / "moved.txt"
    shutil.copy(SHAKESPEARE, moved)
    proc = main_ok("train_char.py", "--experiment-name", "ref", "--restore-checkpoint", "--max-steps", 13,
                   "--dataset-path", moved, cwd=tmp_path)
    assert f"corpus: {moved} (moved from {SHAKESPEARE.resolve()}; same size and sha256)" in proc.stdout


def test_max_epochs_gives_the_exact_step_count(tmp_path, in_process):
    """An epoch of the suite's corpus (tests/data/shakespeare.txt, 99,843 bytes: val 4% = 3,993, test 5% =
    4,992, train 90,858) in windows of 64, batch 8, is 90858 / 512 = 177.46 steps; a run takes the ceiling of
    epochs times that:

        --max-epochs 0.0057: 1.012 -> 2 steps (floor and round: 1; windows of 65 bytes: 1; batches of 2
                             per device: 5)
        --max-epochs 0.0158: 2.804 -> 3 steps (floor: 2; round: 3; the whole file's 99,843 bytes: 4;
                             batches of 2 per device: 12)

    so the pair is (2, 3) for the ceiling and (1, 2), (1, 3), (2, 4), (1, 3), (5, 12) for each mistake. Run in
    this process (two short runs of 2 and 3 steps), as the command line would run them."""
    import json

    from conftest import SHAKESPEARE, need_data

    for epochs, steps in ((0.0057, 2), (0.0158, 3)):
        proc = in_process("train_char.py", "--dataset-path", need_data(SHAKESPEARE), "--experiments-dir", tmp_path,
                          *SETTINGS, "--max-epochs", epochs, "--experiment-name", f"epochs{steps}",
                          "--checkpoint-interval", 1000, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        planned = next((line for line in proc.stdout.splitlines() if line.startswith("experiment: ")), proc.stdout)
        assert planned.endswith(f"; steps 0 -> {steps}"), (epochs, planned)
        saved = json.loads((tmp_path / f"epochs{steps}" / "config.json").read_text())
        assert (saved["max_epochs"], saved["max_steps"]) == (epochs, steps)


def test_how_but_not_what_may_change_on_resume(reference, tmp_path):
    """Remat, the attention kernel and gradient accumulation change how the step computes, not what: a
    resume may change them (recorded in history.jsonl). The compute dtype changes the numbers: refused."""
    exp = copy_of(reference, tmp_path)
    main_ok("train_char.py", "--experiment-name", "ref", "--restore-checkpoint", "--max-steps", 14,
            "--model.remat", "dots", "--model.attention", "xla", "--grad-accum-steps", 2, cwd=tmp_path)
    history = [json.loads(line) for line in (exp / "history.jsonl").read_text().splitlines()]
    assert history[-1]["changed"] == {"max_steps": [12, 14], "grad_accum_steps": [1, 2],
                                      "model.attention": ["auto", "xla"], "model.remat": ["none", "dots"]}
    proc = call_main("train_char.py", "--experiment-name", "ref", "--restore-checkpoint", "--max-steps", 16,
                     "--model.dtype", "bfloat16", cwd=tmp_path)
    assert proc.returncode == 2 and "model.dtype: 'float32' saved vs 'bfloat16' given" in proc.stderr, proc.stderr
