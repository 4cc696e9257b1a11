"""A run survives Ctrl-C, SIGTERM and damaged checkpoints, and resumes to exactly the uninterrupted run;
a shared checkpoint cannot run code; one process at a time per run folder."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bilevel_maml.checkpoint import (CheckpointError, CheckpointWriteError, Checkpointer, atomic_save,
                                     load_checkpoint, newest_intact)
from bilevel_maml.logging import read_offline_run

TESTS = Path(__file__).resolve().parent
ITERATIONS = 12


def training(output, checkpoint_every=1000, wandb="disabled"):
    return ["train", "--dataset", "sinusoid", "--dtype", "float64", "--width", "16", "--iterations", str(ITERATIONS),
            "--meta-batch-size", "4", "--inner-steps", "2", "--valid-every", "2", "--valid-tasks", "5",
            "--test-tasks", "10", "--checkpoint-every", str(checkpoint_every), "--seed", "3", "--wandb", wandb,
            "--output", str(output)]


def cli(argv, signal_at=None, signals=("SIGINT",), delay=0.0):
    """The console script in a subprocess; with ``signal_at``, sending itself ``signals`` as that
    meta-iteration ends."""
    if signal_at is None:
        command = [sys.executable, "-m", "bilevel_maml", *argv]
    else:
        command = [sys.executable, str(TESTS / "self_signal.py"), str(signal_at), ",".join(signals), str(delay),
                   "--", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def engine_state(path):
    return load_checkpoint(path)["engine"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    output = tmp_path_factory.mktemp("straight") / "run"
    done = cli(training(output))
    assert done.returncode == 0, done.stderr[-2000:]
    return output


def assert_same_run(resumed: Path, straight: Path):
    """θ, the loss history, the best validation and the final test are those of the run that was never stopped."""
    a, b = engine_state(straight / "checkpoints" / "last.pt"), engine_state(resumed / "checkpoints" / "last.pt")
    assert a["meta_iteration"] == b["meta_iteration"] == ITERATIONS
    for name, value in a["theta"].items():
        assert torch.equal(value, b["theta"][name]), name
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["best_valid"] == b["best_valid"]
    best_a, best_b = engine_state(straight / "checkpoints" / "best.pt"), engine_state(resumed / "checkpoints" / "best.pt")
    assert best_a["meta_iteration"] == best_b["meta_iteration"]
    result_a, result_b = (json.loads((run / "result.json").read_text()) for run in (straight, resumed))
    assert (result_a["iteration"], result_a["loss"], result_a["loss_ci95"]) == \
        (result_b["iteration"], result_b["loss"], result_b["loss_ci95"])


@pytest.mark.parametrize("stop, status, wandb", [("SIGINT", 130, "offline"), ("SIGTERM", 143, "disabled")])
def test_a_signal_stops_after_the_iteration_checkpoints_and_resume_continues_exactly(tmp_path, straight, stop, status,
                                                                                     wandb):
    output = tmp_path / "run"
    wandb_identity = ["--wandb-project", "sines", "--group", "stops", "--tags", "a", "b"] if wandb == "offline" else []
    stopped = cli(training(output, wandb=wandb) + wandb_identity, signal_at=5, signals=(stop,))
    assert stopped.returncode == status, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert f"stopped by {stop} after meta-iteration 5 of {ITERATIONS}" in stopped.stderr
    assert f"continue with `bilevel-maml resume --output {output}`" in stopped.stderr
    assert "held-out test" not in stopped.stdout  # a stopped run is not reported as finished
    # --checkpoint-every 1000: the checkpoint at iteration 5 is the stop's own
    assert engine_state(output / "checkpoints" / "last.pt")["meta_iteration"] == 5
    assert not (output / ".lock").exists()

    resumed = cli(["resume", "--output", str(output)])  # the command the stop printed: the run's W&B settings
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(from iteration 5)" in resumed.stdout  # it started where the stop left off
    assert_same_run(output, straight)
    if wandb == "disabled":
        assert not (output / "wandb").exists()
    else:
        runs = sorted((output / "wandb").glob("offline-run-*"))
        assert len(runs) == 2 and runs[0].name.split("-")[-1] == runs[1].name.split("-")[-1]  # one W&B run id
        resumed_part = read_offline_run(runs[1])["run"]  # the W&B run as the resumed part logged it
        assert resumed_part == {"id": runs[0].name.split("-")[-1], "project": "sines", "group": "stops",
                                "tags": ["a", "b"], "name": "run"}
        merged = read_offline_run(runs[0])
        assert read_offline_run(runs[1])["history"] == merged["history"]  # either part's folder reads the whole run
        assert len(merged["parts"]) == 2
        assert [row["_step"] for row in merged["history"] if "train/loss" in row] == list(range(1, ITERATIONS + 1))
        history = engine_state(output / "checkpoints" / "last.pt")["history"]
        assert [row["train/loss"] for row in merged["history"] if "train/loss" in row] == [h["loss"] for h in history]


def test_a_second_ctrl_c_stops_at_once_and_leaves_the_last_checkpoint_intact(tmp_path):
    output = tmp_path / "run"
    stopped = cli(training(output, checkpoint_every=2), signal_at=5, signals=("SIGINT", "SIGINT"), delay=1.2)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert "stopped at once by a second SIGINT" in stopped.stderr
    assert engine_state(output / "checkpoints" / "last.pt")["meta_iteration"] == 4  # iteration 5 was not saved


def test_a_repeated_signal_within_a_second_is_the_same_ctrl_c(tmp_path):
    """torchrun forwards the terminal's Ctrl-C to workers that already received it."""
    output = tmp_path / "run"
    stopped = cli(training(output), signal_at=3, signals=("SIGINT", "SIGINT"), delay=0.0)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "stopped by SIGINT after meta-iteration 3" in stopped.stderr


def test_ctrl_c_during_the_final_test_is_one_line_and_resume_finishes_the_run(tmp_path, straight):
    output = tmp_path / "run"
    stopped = cli(training(output), signal_at="test", signals=("SIGINT",))
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert "stopped by SIGINT outside meta-training" in stopped.stderr
    assert not (output / "result.json").exists()
    resumed = cli(["resume", "--output", str(output)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(output, straight)


def test_resume_skips_damaged_checkpoints_and_still_ends_exactly(tmp_path, straight):
    output = tmp_path / "run"
    stopped = cli(training(output, checkpoint_every=1), signal_at=7, signals=("SIGTERM",))
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    folder = output / "checkpoints"
    assert engine_state(folder / "previous.pt")["meta_iteration"] == 6  # rotation kept the one before
    last = folder / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy cut short
    (folder / "best.pt").write_bytes(b"not a checkpoint at all")

    resumed = cli(["resume", "--output", str(output)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    warning = [line for line in resumed.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1, resumed.stderr[-2000:]
    assert f"{last} is damaged or not a checkpoint" in warning[0]
    assert f"continuing from {folder / 'previous.pt'} (iteration 6)" in warning[0]
    assert "(from iteration 6)" in resumed.stdout
    a = engine_state(straight / "checkpoints" / "last.pt")
    b = engine_state(last)
    for name, value in a["theta"].items():
        assert torch.equal(value, b["theta"][name]), name
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_evaluate_names_a_truncated_checkpoint_in_one_line(tmp_path, straight):
    damaged = tmp_path / "best.pt"
    data = (straight / "checkpoints" / "best.pt").read_bytes()
    damaged.write_bytes(data[: len(data) - 100])
    done = cli(["evaluate", "--checkpoint", str(damaged)])
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert f"{damaged} is damaged or not a checkpoint" in done.stderr


def test_evaluate_of_a_run_with_a_damaged_best_names_last_instead_of_switching_to_it(tmp_path, straight):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "checkpoints/best.pt", "checkpoints/last.pt"):
        (run / name).write_bytes((straight / name).read_bytes())
    best, last = run / "checkpoints" / "best.pt", run / "checkpoints" / "last.pt"
    best.write_bytes(best.read_bytes()[:1000])
    done = cli(["evaluate", "--output", str(run), "--test-tasks", "5"])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"{best} is damaged or not a checkpoint" in done.stderr
    assert done.stderr.strip().endswith(f"to score the last θ instead: --checkpoint {last}")
    assert not (run / "evaluation.json").exists()
    remedy = cli(["evaluate", "--checkpoint", str(last), "--test-tasks", "5", "--wandb", "disabled"])
    assert remedy.returncode == 0, remedy.stderr[-2000:]
    scored = json.loads((run / "evaluation.json").read_text())
    assert scored["checkpoint"] == str(last) and scored["iteration"] == ITERATIONS


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_code_is_refused_and_nothing_runs(tmp_path, straight):
    marker = tmp_path / "code-ran"
    checkpoint = load_checkpoint(straight / "checkpoints" / "best.pt")
    checkpoint["engine"]["history"].append({"loss": RunsCode(marker)})
    hostile = tmp_path / "shared-best.pt"
    torch.save(checkpoint, hostile)
    with pytest.raises(CheckpointError, match="holds more than tensors and plain values .*refused: loading it could run code"):
        load_checkpoint(hostile)
    done = cli(["evaluate", "--checkpoint", str(hostile)])
    assert done.returncode == 2 and "refused: loading it could run code" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists()
    torch.load(hostile, weights_only=False)  # the file really carries code: unsafe loading runs it
    assert marker.exists()


def test_a_failed_write_keeps_the_older_checkpoints_and_leaves_no_partial_file(tmp_path, monkeypatch):
    atomic_save({"v": 1}, tmp_path / "last.pt")
    atomic_save({"v": 2}, tmp_path / "last.pt", keep_previous=tmp_path / "previous.pt")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"last.pt", "previous.pt"}

    def disk_full(obj, handle):
        handle.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"could not write .*last.pt \(No space left on device\); "
                                                   r"the checkpoints written before it are intact"):
        atomic_save({"v": 3}, tmp_path / "last.pt", keep_previous=tmp_path / "previous.pt")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_the_cli_stops_with_one_line_when_a_checkpoint_cannot_be_written(tmp_path, monkeypatch):
    from bilevel_maml import cli as module

    saved = []
    real_save = torch.save

    def save_twice_then_fail(obj, handle):
        if len(saved) == 2:
            raise OSError(28, "No space left on device")
        saved.append(1)
        real_save(obj, handle)

    monkeypatch.setattr(torch, "save", save_twice_then_fail)
    with pytest.raises(SystemExit, match=r"bilevel-maml train: could not write .* \(No space left on device\)"):
        module.run(training(tmp_path / "run", checkpoint_every=1))
    path, checkpoint, problems = newest_intact(tmp_path / "run" / "checkpoints")
    assert problems == [] and checkpoint["engine"]["meta_iteration"] >= 1


def test_rotation_keeps_the_previous_last_checkpoint(tmp_path):
    class Engine:
        meta_iteration = 0

        def state_dict(self):
            return {"meta_iteration": self.meta_iteration, "theta": {}, "optimizer": {}}

    engine, checkpointer = Engine(), Checkpointer(tmp_path, every=1)
    for iteration in (1, 2, 3):
        engine.meta_iteration = iteration
        checkpointer.on_iteration_end(engine, {})
    assert engine_state(tmp_path / "last.pt")["meta_iteration"] == 3
    assert engine_state(tmp_path / "previous.pt")["meta_iteration"] == 2
    checkpointer.on_train_end(engine)  # nothing new since iteration 3: previous.pt stays the one before
    assert engine_state(tmp_path / "previous.pt")["meta_iteration"] == 2


def test_a_run_folder_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path, straight):
    output = tmp_path / "run"
    output.mkdir()
    (output / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    refused = cli(training(output))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"is in use by process {os.getpid()}" in refused.stderr
    assert sorted(p.name for p in output.iterdir()) == [".lock"]  # nothing written

    dead = subprocess.Popen(["true"])
    dead.wait()
    (output / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    taken = cli(training(output))
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert f"taking over the lock on {output} left by process {dead.pid}, which is no longer running" in taken.stderr
    assert not (output / ".lock").exists()  # released at the end


def test_rotation_never_leaves_the_newest_checkpoint_missing(tmp_path, monkeypatch):
    """A kill (or a reader) between the renames still finds last.pt."""
    atomic_save({"v": 1}, tmp_path / "last.pt")
    real_replace, present = os.replace, []

    def watching(source, target):
        present.append((tmp_path / "last.pt").exists())
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", watching)
    atomic_save({"v": 2}, tmp_path / "last.pt", keep_previous=tmp_path / "previous.pt")
    assert len(present) == 2 and all(present)
    assert torch.load(tmp_path / "previous.pt")["v"] == 1 and torch.load(tmp_path / "last.pt")["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]
