"""Checkpoints: exact resume after SIGKILL, atomic writes, non-finite stops."""

import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from bilevel_maml import build_engine, cli, runs
from bilevel_maml.checkpoint import Checkpointer, atomic_save, load_checkpoint, save_checkpoint
from bilevel_maml.data import SinusoidTasks
from bilevel_maml.engine import NonFiniteError
from bilevel_maml.models import MLP
from bilevel_maml.problems import ALGORITHMS, MAMLLower, MAMLUpper

ITERATIONS = 150


def float64_run(output):
    return [sys.executable, "-m", "bilevel_maml", "train", "--dataset", "sinusoid", "--dtype", "float64",
            "--width", "16", "--iterations", str(ITERATIONS), "--meta-batch-size", "4", "--inner-steps", "2",
            "--optimizer", "adam", "--meta-lr-schedule", "cosine", "--valid-every", "40", "--valid-tasks", "5", "--test-tasks", "10",
            "--checkpoint-every", "1", "--seed", "3", "--wandb", "disabled", "--output", str(output)]


def final_state(output):
    return load_checkpoint(output / "checkpoints" / "last.pt")["engine"]


@pytest.mark.slow
def test_a_run_killed_midway_and_resumed_ends_with_exactly_the_same_theta(tmp_path):
    subprocess.run(float64_run(tmp_path / "straight"), check=True, capture_output=True, timeout=300)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(float64_run(interrupted), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = interrupted / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline:
        if last.exists() and load_checkpoint(last)["engine"]["meta_iteration"] >= 40:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = final_state(interrupted)["meta_iteration"]
    assert 40 <= killed_at < ITERATIONS, killed_at

    resumed = subprocess.run([sys.executable, "-m", "bilevel_maml", "resume", "--output", str(interrupted),
                              "--wandb", "disabled"], check=True, capture_output=True, text=True, timeout=300)
    assert f"(from iteration {killed_at})" in resumed.stdout  # started at the checkpoint, not from scratch
    straight, resumed = final_state(tmp_path / "straight"), final_state(interrupted)
    assert resumed["meta_iteration"] == straight["meta_iteration"] == ITERATIONS
    for name, value in straight["theta"].items():
        assert value.dtype == torch.float64
        assert torch.equal(value, resumed["theta"][name]), name
    assert [h["loss"] for h in straight["history"]] == [h["loss"] for h in resumed["history"]]
    # the cosine schedule went on from where it was: every iteration's rate as in the straight run
    assert [h["lr"] for h in resumed["history"]] == [h["lr"] for h in straight["history"]] == [
        pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * i / ITERATIONS)), rel=1e-12) for i in range(ITERATIONS)]


class JitteredWithoutItsState(MAMLLower):
    """A variant whose inner step size is drawn anew each meta-iteration from a generator of its
    own: state that is neither θ nor a function of the iteration."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.base_lr, self.jitter = self.inner_lr, torch.Generator().manual_seed(0)

    def on_meta_iteration_start(self, iteration, iterations):
        self.inner_lr = self.base_lr * (0.5 + torch.rand((), generator=self.jitter, dtype=torch.float64).item())


class JitteredLower(JitteredWithoutItsState):
    def get_extra_state(self):
        return {"jitter": self.jitter.get_state()}

    def set_extra_state(self, state):
        self.jitter.set_state(state["jitter"])


def jittered_engine(lower_cls, iterations):
    torch.manual_seed(0)
    return build_engine("jittered", MLP(1, 1, (8, 8)), SinusoidTasks(points=10), regression=True, shots=5,
                        inner_lr=0.1, inner_steps=2, meta_lr=1e-2, meta_batch_size=2, meta_iterations=iterations,
                        valid_step=2, valid_tasks=3, dtype=torch.float64, verbose=False)


@pytest.mark.parametrize("lower_cls", [JitteredLower, JitteredWithoutItsState])
def test_a_variants_own_state_is_checkpointed_through_get_extra_state(tmp_path, monkeypatch, lower_cls):
    """What ``get_extra_state`` returns is in every checkpoint and handed back to
    ``set_extra_state`` on resume, so a run stopped after 3 meta-iterations and resumed from the
    file ends where a straight one does; a variant without the two hooks does not (its step sizes
    are drawn again from the start of its generator)."""
    monkeypatch.setitem(ALGORITHMS, "jittered", (MAMLUpper, lower_cls))
    straight = jittered_engine(lower_cls, 6)
    straight.run()
    stopped = jittered_engine(lower_cls, 3)
    stopped.run()
    save_checkpoint(tmp_path / "last.pt", stopped)
    resumed = jittered_engine(lower_cls, 6)
    resumed.load_state_dict(load_checkpoint(tmp_path / "last.pt")["engine"])
    resumed.run()
    same = [torch.equal(a, b) for a, b in zip(straight.meta_learner.module.parameters(),
                                               resumed.meta_learner.module.parameters())]
    assert all(same) if lower_cls is JitteredLower else not any(same)


def sinusoid_engine(iterations, vectorize, sampler="learn2learn"):
    torch.manual_seed(0)
    return build_engine("maml", MLP(1, 1, (8, 8)), SinusoidTasks(points=10, dtype=torch.float64), regression=True,
                        shots=5, inner_lr=0.1, inner_steps=2, meta_lr=1e-2, meta_batch_size=4,
                        meta_iterations=iterations, valid_step=100, dtype=torch.float64, verbose=False,
                        vectorize=vectorize, sampler=sampler)


@pytest.mark.parametrize("sampler", ["learn2learn", "device"])
@pytest.mark.parametrize("saved_by, resumed_by", [(True, False), (False, True), (True, 2)])
def test_a_run_resumes_exactly_with_another_number_of_tasks_per_step(tmp_path, saved_by, resumed_by, sampler):
    """Betty's step counters count tasks, or sets of stacked tasks, and the outer step comes when
    the Upper's count reaches a multiple of the steps per meta-batch: a checkpoint of a run that
    stacked 4 tasks per step, resumed one task at a time (or the other way, or 2 at a time), ends
    where a straight run of the resumed kind does, each outer step after a whole meta-batch, on
    the same tasks (a device-resident source draws the meta-batch at once however it is adapted)."""
    straight = sinusoid_engine(6, resumed_by, sampler)
    expected = straight.run()
    stopped = sinusoid_engine(3, saved_by, sampler)
    stopped.run()
    save_checkpoint(tmp_path / "last.pt", stopped)
    resumed = sinusoid_engine(6, resumed_by, sampler)
    resumed.load_state_dict(load_checkpoint(tmp_path / "last.pt")["engine"])
    history = resumed.run()
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in expected], rel=1e-10)
    for a, b in zip(straight.meta_learner.module.parameters(), resumed.meta_learner.module.parameters()):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert ([resumed.global_step, resumed.meta_learner._count, resumed.task_learner._count]
            == [straight.global_step, straight.meta_learner._count, straight.task_learner._count])


def test_a_crash_during_a_write_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"format": 1, "value": 1}, path)

    def dies_halfway(obj, handle):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed during write")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"format": 1, "value": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no partial file left behind


def nan_after(tasks):
    sinusoid = SinusoidTasks(points=20, dtype=torch.float64)
    calls = []

    def sample():
        calls.append(1)
        x, y = sinusoid.sample()
        return x, (y * math.nan if len(calls) > tasks else y)

    return sample


def test_non_finite_loss_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path):
    clean = SinusoidTasks(points=20, dtype=torch.float64)
    # At build time the train env draws 1 task to check its shape and 2 to probe vmap (its random
    # stream is restored, but this counter sees them); then 4 tasks per meta-iteration, so
    # tasks 13-16 (meta-iteration 4) are the first with NaN targets.
    sources = {"train": nan_after(1 + 2 + 12), "validation": clean, "test": clean}
    engine = build_engine("maml", MLP(1, 1, (8, 8)).double(), sources, regression=True, shots=10,
                          meta_batch_size=4, meta_iterations=10, inner_lr=0.01, valid_step=100)
    checkpointer = Checkpointer(tmp_path, every=1)
    engine.callbacks.append(checkpointer)
    with pytest.raises(NonFiniteError, match="meta-iteration 4: the query loss is nan; θ was not updated"):
        engine.run()
    kept = load_checkpoint(tmp_path / "last.pt")["engine"]
    assert kept["meta_iteration"] == 3
    for name, value in engine.meta_learner.module.state_dict().items():
        assert torch.isfinite(kept["theta"][name]).all() and torch.equal(value, kept["theta"][name])


def test_the_cli_reports_the_stop_and_the_checkpoint_kept(tmp_path, monkeypatch):
    clean = SinusoidTasks(points=20)
    monkeypatch.setattr(runs, "load_tasksets", lambda *a, **k: {"train": nan_after(1 + 2 + 10), "validation": clean,
                                                               "test": clean})
    with pytest.raises(SystemExit) as stop:
        cli.run(["train", "--dataset", "sinusoid", "--meta-batch-size", "2", "--iterations", "10",
                  "--checkpoint-every", "1", "--output", str(tmp_path / "run"), "--wandb", "disabled"])
    message = str(stop.value)
    assert "meta-iteration 6: the query loss is nan" in message
    assert f"Last good checkpoint: {tmp_path / 'run' / 'checkpoints' / 'last.pt'}" in message
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["engine"]["meta_iteration"] == 5
