"""eval_char.py's command line (its main(), in process) on one small char-vocabulary experiment: sample headers,
prompt bytes the vocabulary lacks, and an experiment saved with an attention kernel this machine does not have."""

import json
import shutil

import pytest

from conftest import TINY, call_main, main_ok


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A char vocabulary without 'X', 'Y' or 'Z', trained for a moment."""
    root = tmp_path_factory.mktemp("evalcli")
    corpus = root / "tiny.txt"
    corpus.write_bytes((b"It was the best of times, it was the worst of times. " * 400)[:20_000])
    main_ok("train_char.py", "--dataset-path", corpus, "--experiments-dir", root, "--experiment-name", "c",
            *TINY, "--data.tokenizer", "char", "--max-steps", 3, "--eval-interval", 0, cwd=root)
    return root


def _eval(root, *args, name="c"):
    """eval_char.py's main() in this process (tests/conftest.py, call_main), as its command line runs it."""
    return main_ok("eval_char.py", "--experiments-dir", root, "--experiment-name", name, "--batch-size", 4, *args,
                   cwd=root)


def test_sample_headers_show_each_samples_own_seed(experiment):
    out = _eval(experiment, "--split", "none", "--prompt", "It was", "--sample-steps", 8, "--num-samples", 3,
                "--seed", 7).stdout
    headers = [line for line in out.splitlines() if line.startswith("=== sample")]
    assert headers == [f"=== sample {i} of 3: 8 characters, seed {6 + i} ===" for i in (1, 2, 3)]


def test_seed_plus_samples_past_the_limit_is_refused(experiment):
    proc = call_main("eval_char.py", "--experiments-dir", experiment, "--experiment-name", "c", "--split", "none",
                     "--seed", 2**32 - 2, "--num-samples", 3, cwd=experiment)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --seed 4294967294 + --num-samples 3 - 1 must be below 2**32")


def test_prompt_bytes_outside_the_char_vocabulary_are_named(experiment):
    err = _eval(experiment, "--split", "none", "--prompt", "It was XYZ", "--sample-steps", 4).stderr
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [("warning: 3 of the prompt's 10 bytes are outside the char vocabulary (17 ids) and become "
                         "the unknown id")]
    clean = _eval(experiment, "--split", "none", "--prompt", "It was", "--sample-steps", 4).stderr
    assert "warning:" not in clean


def test_eval_runs_the_attention_kernel_of_this_machine(experiment):
    """A GPU run saves --model.attention cudnn; on this CPU eval samples and scores it with auto, since the
    kernel changes how attention is computed, not what."""
    exp = experiment / "gpu"
    shutil.copytree(experiment / "c", exp)
    config = json.loads((exp / "config.json").read_text())
    config["model"]["attention"] = "cudnn"
    (exp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    history = [json.loads(line) for line in (exp / "history.jsonl").read_text().splitlines()]
    history[-1]["config"]["model"]["attention"] = "cudnn"  # as the record of that GPU run would say
    (exp / "history.jsonl").write_text("".join(json.dumps(record) + "\n" for record in history))
    proc = _eval(experiment, "--prompt", "It was", "--sample-steps", 4, name="gpu")
    assert "=== sample 1 of 1: 4 characters" in proc.stdout and "=== val:" in proc.stdout
    assert (experiment / "gpu" / "eval" / "val.json").is_file()


def test_a_refused_evaluation_leaves_no_eval_directory(experiment, tmp_path):
    """A missing --prompt-file is found while sampling, after the checkpoint is read: eval/ used to be made
    before that (so that a long scoring run could not fail at its end) and was left behind empty."""
    work = tmp_path / "experiments"
    shutil.copytree(experiment / "c", work / "c")
    assert not (work / "c" / "eval").exists()
    proc = call_main("eval_char.py", "--experiments-dir", work, "--experiment-name", "c", "--batch-size", 4,
                     "--prompt-file", tmp_path / "nowhere.txt", "--sample-steps", 4, cwd=tmp_path)
    assert proc.returncode == 2 and "error: --prompt-file" in proc.stderr, proc.stderr
    assert not (work / "c" / "eval").exists()
