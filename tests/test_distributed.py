"""torch.distributed data parallelism over tasks: 2 gloo processes equal 1 process on the same tasks."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bilevel_maml import ALGORITHMS, EpisodicEnv, MetaEngine

TESTS = Path(__file__).resolve().parent
DRIVER = TESTS / "distributed_driver.py"
RUNS = ["maml:per-task", "maml:vectorized", "fomaml:per-task", "fomaml:vectorized", "imaml:per-task",
        "imaml:vectorized", "maml++:vectorized", "reptile:per-task", "boil:vectorized"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def torchrun():
    found = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert found, "torchrun is installed with torch"
    return found


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [torchrun(), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(DRIVER), "--out", str(out), "--iterations", "3", "--meta-batch-size", "8", "--runs", *RUNS],
        capture_output=True, text=True, timeout=600, env=environment())
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


class Replay:
    """A task source handing out given pre-split tasks in order."""

    def __init__(self, tasks):
        self.tasks, self.served = tasks, 0

    def __call__(self):
        task = self.tasks[self.served % len(self.tasks)]
        self.served += 1
        return task


def driver_model(algorithm):
    torch.manual_seed(0)
    if algorithm == "maml++":
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16, track_running_stats=False),
                                   torch.nn.Tanh(), torch.nn.Linear(16, 5)).double()
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).double()


def single_process_theta(algorithm, vectorize, tasks, iterations):
    model = driver_model(algorithm)
    upper_cls, lower_cls = ALGORITHMS[algorithm]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    upper = upper_cls(model, optimizer, meta_batch_size=8)
    lower = lower_cls(model, inner_lr=0.3, inner_steps=2,
                      **({"per_step_bn_statistics": True} if algorithm == "maml++" else {}))
    replay = Replay(tasks)
    engine = MetaEngine(upper, lower, EpisodicEnv(replay, ways=5, shots=1), meta_iterations=iterations,
                        vectorize=vectorize)
    replay.served = 0  # the vectorization probe drew two tasks
    engine.run()
    assert replay.served == len(tasks)
    return [p.detach() for p in engine.meta_learner.trainable_parameters()], list(model.buffers())


@pytest.mark.parametrize("run", RUNS)
def test_two_gloo_ranks_end_with_the_theta_of_one_process_on_the_same_tasks(two_rank_run, run):
    rank0, rank1 = two_rank_run[0][run], two_rank_run[1][run]
    assert rank0["local_meta_batch"] == rank1["local_meta_batch"] == 4
    # every rank holds exactly the same θ
    for a, b in zip(rank0["theta"], rank1["theta"]):
        assert torch.equal(a, b)
    # each rank drew its own tasks
    assert not torch.equal(rank0["tasks"][0]["support"][0], rank1["tasks"][0]["support"][0])
    # one process, meta-batch 8, the same 8 tasks per meta-iteration (rank 0's four, then rank 1's)
    iterations = len(rank0["tasks"]) // 4
    assert iterations == 3
    order = []
    for i in range(iterations):
        order += rank0["tasks"][4 * i:4 * i + 4] + rank1["tasks"][4 * i:4 * i + 4]
    algorithm, path = run.split(":")
    reference, buffers = single_process_theta(algorithm, path == "vectorized", order, iterations)
    start = driver_model(algorithm)
    moved = max((a - b).abs().max().item() for a, b in zip(reference, start.parameters()) if a.shape == b.shape)
    assert moved > 1e-3  # θ really trained
    for a, b in zip(rank0["theta"], reference):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    assert len(rank0["buffers"]) == len(buffers) == (3 if algorithm == "maml++" else 0)
    for a, b, c in zip(rank0["buffers"], rank1["buffers"], buffers):  # MAML++'s per-step statistics of all 8 tasks
        assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-10, rtol=0), (a - c).abs().max()


def rank_processes(out, misbehave, timeout):
    """Two ranks started by hand (torchrun's environment variables, no torchrun agent to kill the
    survivors), so what the surviving rank does on its own is visible."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(environment(), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen(
            [sys.executable, str(DRIVER), "--out", str(out), "--iterations", "50", "--meta-batch-size", "2",
             "--misbehave", misbehave, "--timeout", str(timeout)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("misbehave", ["die", "hang"])
def test_a_rank_that_dies_or_hangs_makes_the_other_exit_with_a_clear_error(tmp_path, misbehave):
    survivor, culprit = rank_processes(tmp_path, misbehave, timeout=8.0)
    started = time.monotonic()
    try:
        _, stderr = survivor.communicate(timeout=120)
    finally:
        culprit.kill()
        culprit.wait()
    waited = time.monotonic() - started
    assert survivor.returncode != 0
    # the culprit misbehaves as an iteration ends, so the first collective left waiting is the stop agreement
    assert "RankFailure: rank 0 of 2: agreeing on whether to stop failed" in stderr, stderr[-3000:]
    assert "another rank has most likely died or stopped answering" in stderr
    assert waited < 100


def cli_command(output, *extra, command="train", processes=2, iterations=None, wandb="disabled",
                entry=("-m", "bilevel_maml")):
    """torchrun running the console script (``entry``) on a small float64 sinusoid run in ``output``."""
    argv = [command, "--output", str(output), "--wandb", wandb]
    if command == "train":
        argv += ["--dataset", "sinusoid", "--dtype", "float64", "--width", "16", "--meta-batch-size", "4",
                 "--inner-steps", "2", "--valid-every", "3", "--valid-tasks", "5", "--test-tasks", "10",
                 "--checkpoint-every", "1", "--seed", "3"]
    if iterations is not None:
        argv += ["--iterations", str(iterations)]
    return [torchrun(), "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1", "--master_port",
            str(free_port()), *entry, *argv, *extra]


def cli_run(output, *extra, **options):
    return subprocess.run(cli_command(output, *extra, **options), capture_output=True, text=True, timeout=600,
                          env=environment())


STRAIGHT_ITERATIONS = 9


@pytest.fixture(scope="module")
def straight_cli_run(tmp_path_factory):
    """The uninterrupted run (logged to W&B offline) that the split and the stopped runs must equal."""
    output = tmp_path_factory.mktemp("straight")
    done = cli_run(output, iterations=STRAIGHT_ITERATIONS, wandb="offline")
    assert done.returncode == 0, done.stderr[-3000:]
    return output, done


@pytest.mark.slow
def test_the_cli_under_torchrun_trains_checkpoints_and_resumes_exactly(tmp_path, straight_cli_run):
    straight_output, straight = straight_cli_run
    assert "4 tasks on 2 processes" in straight.stdout and straight.stdout.count("held-out test") == 1
    # rank 0 alone logs: one offline W&B run, with one history row per meta-iteration
    from bilevel_maml.logging import read_offline_run

    runs = list((straight_output / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert [row["_step"] for row in read_offline_run(runs[0])["history"] if "train/loss" in row] == \
        list(range(1, STRAIGHT_ITERATIONS + 1))
    first_half = cli_run(tmp_path / "split", iterations=4)
    assert first_half.returncode == 0, first_half.stderr[-3000:]
    second_half = cli_run(tmp_path / "split", command="resume", iterations=STRAIGHT_ITERATIONS)
    assert second_half.returncode == 0, second_half.stderr[-3000:]
    assert "(from iteration 4)" in second_half.stdout
    a = torch.load(straight_output / "checkpoints" / "last.pt", weights_only=False)["engine"]
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=False)["engine"]
    assert a["meta_iteration"] == b["meta_iteration"] == STRAIGHT_ITERATIONS and len(a["ranks"]) == 2
    for name, value in a["theta"].items():
        assert torch.equal(value, b["theta"][name]), name
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    # a checkpoint of 2 ranks is not resumed by 1 process
    one = subprocess.run([sys.executable, "-m", "bilevel_maml", "resume", "--output", str(tmp_path / "split"),
                          "--iterations", "10", "--wandb", "disabled"], capture_output=True, text=True,
                         timeout=300, env=environment())
    assert one.returncode != 0
    assert "written by 2 process(es) and this run has 1: resume with the same number of processes" in one.stderr


def test_a_meta_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path):
    done = cli_run(tmp_path / "odd", "--meta-batch-size", "3", iterations=2)
    assert done.returncode != 0
    assert "meta_batch_size=3 must be divisible by the number of processes (2)" in done.stderr


@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_every_rank_after_one_iteration_and_resume_is_exact(tmp_path, straight_cli_run):
    """Ctrl-C in a terminal reaches torchrun (its process group; torchrun starts each worker in a session of
    its own) and torchrun forwards it to both workers: they stop after the same iteration and say how to resume."""
    iterations = STRAIGHT_ITERATIONS

    # every rank pauses as iteration 3 ends until the forwarded signal has reached it: neither a slow poll
    # here nor a slow forward by torchrun can let the run go on past iteration 3
    output, pause = tmp_path / "stopped", tmp_path / "pause"
    pause.mkdir()
    argv = cli_command(output, iterations=iterations, entry=(str(TESTS / "pause_at.py"), "3", str(pause), "--"))
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env=environment())
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and not all(
            (pause / f"paused.{rank}").exists() for rank in (0, 1)):
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be stopped"
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=240)
    last = output / "checkpoints" / "last.pt"
    stopped_at = torch.load(last, weights_only=True)["engine"]
    assert stopped_at["meta_iteration"] == 3 and len(stopped_at["ranks"]) == 2, \
        (stopped_at["meta_iteration"], [line for line in stderr.splitlines() if "bilevel-maml" in line])
    assert (f"stopped by SIGINT after meta-iteration {stopped_at['meta_iteration']} of {iterations}; checkpoint "
            f"written to {last}; continue with `torchrun --nproc_per_node 2 -m bilevel_maml resume") in stderr, \
        stderr[-3000:]
    assert "stopped at once" not in stderr

    resumed = cli_run(output, command="resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(from iteration {stopped_at['meta_iteration']})" in resumed.stdout
    a = torch.load(straight_cli_run[0] / "checkpoints" / "last.pt", weights_only=True)["engine"]
    b = torch.load(last, weights_only=True)["engine"]
    assert a["meta_iteration"] == b["meta_iteration"] == iterations
    for name, value in a["theta"].items():
        assert torch.equal(value, b["theta"][name]), name
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["best_valid"] == b["best_valid"]
