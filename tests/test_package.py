"""The package as a library: pyproject.toml builds a wheel that imports from anywhere, it asks for what
requirements.txt installs, and README's "Use the model from Python" code runs as printed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib


from conftest import ROOT, cli_env


def requirements(name: str = "requirements.txt") -> tuple[list[str], list[str]]:
    """(runtime, tests): the lines above and below the "# Tests." section, comments dropped."""
    parts = (ROOT / name).read_text().split("# Tests.")
    return tuple([line.split("#")[0].strip() for line in part.splitlines() if line.split("#")[0].strip()]
                 for part in parts)


def test_pyproject_asks_for_what_requirements_txt_installs():
    """`pip install -e .[test]` then the README's test command used to fail: the extra lacked pytest-xdist
    and filelock."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, tests = requirements()
    assert project["dependencies"] == runtime
    assert project["optional-dependencies"]["test"] == tests


def test_the_cpu_requirements_are_the_same_but_for_cuda():
    """requirements-cpu.txt is requirements.txt with plain jax: no 4.4 GB of CUDA wheels on a CPU machine."""
    runtime, tests = requirements()
    assert requirements("requirements-cpu.txt") == ([r.replace("jax[cuda12]", "jax") for r in runtime], tests)
    assert any(r.startswith("jax[cuda12]") for r in runtime)


def test_wheel_installs_and_imports_outside_the_repository(tmp_path):
    # requirements.txt installs `wheel`: setuptools before 70.1 cannot build a wheel offline without it.
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mingpt_palm", src / "mingpt_palm", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run = lambda *args, **kw: subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)  # noqa: E731
    built = run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(src))
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next((tmp_path / "dist").glob("mingpt_palm-*.whl"))
    site = tmp_path / "site"
    installed = run(*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # From a directory that is not the repository, with only the installed copy on the path.
    probe = ("import mingpt_palm, mingpt_palm.model, mingpt_palm.presets; "
             "print(mingpt_palm.__file__); print(sorted(mingpt_palm.presets.PRESETS))")
    env = cli_env(1) | {"PYTHONPATH": str(site)}
    out = run(sys.executable, "-c", probe, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == str(site / "mingpt_palm" / "__init__.py")
    assert "palm-540b" in out.stdout


def readme_python_example() -> str:
    """The first ```python block under README's "Use the model from Python" heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use the model from Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no ```python block under 'Use the model from Python'"
    return match.group(1)


def test_readme_python_example_runs_as_printed(tmp_path):
    """Verbatim, in a fresh interpreter outside the repository (the package on the path as an install would
    put it): the README cannot drift from the API."""
    env = cli_env(1) | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", readme_python_example()], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(2, 3, 16, 256)" in proc.stdout


def test_a_machine_without_a_gpu_starts_without_the_cuda_plugins_traceback(tmp_path):
    """jax[cuda12] (requirements.txt, so also CI's environment) installs its CUDA plugin on every machine;
    on one without an NVIDIA GPU, jax tried it and printed a 10-line traceback before falling back to the
    CPU, unless JAX_PLATFORMS=cpu was set. The scripts now keep it from the plugin there themselves."""
    env = {k: v for k, v in cli_env(devices=1).items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run([sys.executable, str(ROOT / "train_char.py"), "--model.dim", "32", "--model.depth", "1",
                           "--print-params"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "parameters:" in proc.stdout
    assert "Traceback" not in proc.stderr and "plugin" not in proc.stderr, proc.stderr
