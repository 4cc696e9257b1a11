"""The example scripts run on the public API and print their result."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script, *args):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, loop", [("maml", "1 inner step of 0.4"), ("fomaml", "5 inner steps of 0.1")])
def test_omniglot_example(omniglot_root, algorithm, loop):
    out = run("omniglot.py", "--data-root", str(omniglot_root), "--iterations", "4", "--valid-every", "2",
              "--meta-batch-size", "2", "--test-tasks", "10", "--algorithm", algorithm)
    assert f"Omniglot tasks, {loop}" in out  # the algorithm's own inner loop on Omniglot
    assert out.count("validation accuracy") == 2
    assert "held-out 5-way 1-shot accuracy:" in out and "(95% CI over 10 tasks of unseen characters)" in out


def test_sinusoid_example():
    out = run("sinusoid.py", "--iterations", "5", "--meta-batch-size", "2")
    assert "post-adaptation MSE:" in out and "before meta-training" in out


def test_mini_imagenet_example_says_which_files_are_missing(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "mini_imagenet.py"), "--data-root", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"{tmp_path}/mini-imagenet-cache-train.pkl" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


BAD_FLAGS = {  # one per example, each kind of check among them
    "sinusoid.py": ("--inner-lr", "nan", "a positive finite number"),
    "omniglot.py": ("--ways", "0", "an integer >= 1"),
    "mini_imagenet.py": ("--device", "tpu9", None),
    "imaml_with_betty.py": ("--lam", "0", "a positive finite number"),
    "bring_your_own.py": ("--test-tasks", "-5", "an integer >= 1"),
    "cavia.py": ("--contexts", "many", "an integer >= 1"),
    "protomaml.py": ("--width", "0.5", "an integer >= 1"),
}
RUN_EACH_WITH_A_BAD_FLAG = """
import contextlib, io, json, runpy, sys
found = {}
for script, argv in json.loads(sys.argv[1]).items():
    sys.argv, stderr = [script, *argv], io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(script, run_name="__main__")
            found[script] = [0, stderr.getvalue()]
        except SystemExit as stop:
            found[script] = [stop.code, stderr.getvalue()]
print(json.dumps(found))
"""


def test_the_examples_refuse_a_bad_flag_in_one_line_naming_it_before_any_work():
    """As the bilevel-maml command does: argparse's usage block and a check deep in the library
    (which named ``ways``, not ``--ways``, after a torch warning about a zero-width layer) are gone.
    One process runs every example's ``__main__``, to spare six starts of torch."""
    bad = {script: [flag, value] for script, (flag, value, _) in BAD_FLAGS.items()}
    done = subprocess.run([sys.executable, "-c", RUN_EACH_WITH_A_BAD_FLAG, json.dumps(bad)], capture_output=True,
                          text=True, timeout=300, cwd=EXAMPLES)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout)
    for script, (flag, value, allowed) in BAD_FLAGS.items():
        status, stderr = found[script]
        allowed = allowed and f"must be {allowed}, got '{value}'" or f"must be cpu, cuda or cuda:N, got '{value}'"
        assert (status, stderr) == (2, f"{script}: error: argument {flag}: {allowed} (see {script} --help)\n"), script


@pytest.mark.slow
def test_imaml_with_betty_walkthrough_example(omniglot_root):
    out = run("imaml_with_betty.py", "--data-root", str(omniglot_root), "--iterations", "4", "--inner-steps", "2",
              "--meta-batch-size", "2", "--test-tasks", "10")
    assert out.count("validation accuracy") == 4
    assert "iMAML held-out 5-way 1-shot accuracy:" in out and "over 10 tasks" in out


def test_bring_your_own_model_and_task_source_example():
    out = run("bring_your_own.py", "--iterations", "2", "--meta-batch-size", "2", "--test-tasks", "10")
    assert "ResNet-12 + Adafactor, 5-way 1-shot texture tasks: held-out accuracy" in out
    assert "after 2 meta-iterations" in out


def test_cavia_example_compares_with_maml_and_adapts_only_the_context():
    out = run("cavia.py", "--iterations", "3", "--meta-batch-size", "2", "--contexts", "3")
    assert "CAVIA post-adaptation MSE" in out and "(600 test tasks; 3 of 1884 parameters adapted per task)" in out
    assert "MAML  post-adaptation MSE" in out and "1761 of 1761 parameters adapted per task" in out


def test_protomaml_example_compares_both_orders_with_maml_before_and_after_the_inner_step(omniglot_root):
    out = run("protomaml.py", "--data-root", str(omniglot_root), "--iterations", "2", "--meta-batch-size", "2",
              "--width", "8", "--test-tasks", "20")
    for label in ("Proto-MAML   ", "fo-Proto-MAML", "MAML         "):
        assert f"{label} held-out 5-way 1-shot accuracy" in out
    timed = r"\(20 test tasks; before the inner step \d+\.\d\d% ± \d+\.\d\d%; trained in \d+ s\)"
    assert len(re.findall(timed, out)) == 3
