"""The example scripts run on the public API and print their result."""

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
