"""The progress bar shows loss, accuracy, tasks/s and ETA on a terminal and stays quiet otherwise."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading

import pytest

from bilevel_maml import cli

RUN = ["-m", "bilevel_maml", "train", "--dataset", "sinusoid", "--iterations", "30", "--meta-batch-size", "2",
       "--valid-every", "100", "--test-tasks", "5", "--wandb", "disabled"]


@pytest.mark.parametrize("rows, columns", [(40, 160), (0, 0)], ids=["160-columns", "unsized-like-script"])
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
