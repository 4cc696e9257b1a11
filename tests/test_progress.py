"""The progress bar shows loss, accuracy, tasks/s and ETA on a terminal and stays quiet otherwise; a
second bar follows the tasks of each validation and test."""

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
import threading

import pytest

from bilevel_maml import build_engine, cli
from bilevel_maml.data import SinusoidTasks
from bilevel_maml.models import MLP
from bilevel_maml.progress import ProgressBar

RUN = ["-m", "bilevel_maml", "train", "--dataset", "sinusoid", "--iterations", "30", "--meta-batch-size", "2",
       "--valid-every", "100", "--test-tasks", "5", "--wandb", "disabled"]


@pytest.mark.parametrize("rows, columns", [pytest.param(40, 160, id="160-columns"),
                                           pytest.param(0, 0, id="unsized-like-script", marks=pytest.mark.slow)])
def test_bar_on_a_terminal(tmp_path, rows, columns):
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(primary, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    done = subprocess.run([sys.executable, *RUN, "--output", str(tmp_path / "tty")], stdout=subprocess.PIPE,
                          stderr=secondary, timeout=300)
    os.close(secondary)
    reader.join(timeout=10)
    os.close(primary)
    assert done.returncode == 0
    shown = b"".join(chunks).decode(errors="replace")
    assert "meta-training" in shown and "30/30" in shown
    for field in ("loss=", "tasks/s=", "<00:00"):  # "<" precedes the ETA in tqdm's bar
        assert field in shown, shown[-500:]


def test_quiet_when_not_a_terminal(tmp_path):
    done = subprocess.run([sys.executable, *RUN, "--output", str(tmp_path / "pipe")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0
    assert "meta-training" not in done.stderr and "it/s" not in done.stderr
    assert "held-out test" in done.stdout


def test_progress_flag_forces_the_bar(tmp_path, capsys):
    cli.run(["train", "--dataset", "omniglot-small", "--model", "mlp", "--width", "8", "--iterations", "3",
              "--meta-batch-size", "2", "--test-tasks", "5", "--valid-every", "1", "--valid-tasks", "3",
              "--wandb", "disabled", "--progress", "--output", str(tmp_path / "forced")])
    shown = capsys.readouterr().err
    assert "meta-training" in shown and "acc=" in shown and "val=" in shown


def test_validation_and_test_report_the_tasks_scored_and_a_bar_follows_them(tmp_path, capsys):
    class Record:
        def on_tasks_scored(self, engine, split, scored, total):
            calls.append((split, scored, total))

    calls = []
    engine = build_engine("maml", MLP(1, 1, (8, 8)), SinusoidTasks(points=20), regression=True, shots=10,
                          meta_batch_size=2, meta_iterations=2, inner_lr=0.01, valid_step=100)
    engine.callbacks.append(Record())
    start = engine.test_env.state_dict()
    quiet = engine.test(120)
    engine.validation()
    assert calls[:3] == [("test", 50, 120), ("test", 100, 120), ("test", 120, 120)]  # a batch of draws at a time
    assert calls[3:] == [("validation", scored, 100) for scored in (50, 100)]
    shown = io.StringIO()
    engine.callbacks.append(ProgressBar(enabled=True, file=shown))
    engine.test_env.load_state_dict(start)
    assert engine.test(120) == quiet  # the bar changes nothing it scores
    assert "test:" in shown.getvalue() and "/120" in shown.getvalue()

    cli.run(["train", "--dataset", "sinusoid", "--iterations", "2", "--test-tasks", "5", "--wandb", "disabled",
             "--no-progress", "--output", str(tmp_path / "run")])
    capsys.readouterr()
    cli.run(["evaluate", "--output", str(tmp_path / "run"), "--test-tasks", "60", "--progress"])
    assert "test:" in capsys.readouterr().err
    cli.run(["evaluate", "--output", str(tmp_path / "run"), "--test-tasks", "60", "--no-progress"])
    assert "test:" not in capsys.readouterr().err
