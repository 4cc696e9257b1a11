"""A short training's offline W&B run folder holds exactly what the engine computed."""

import glob
import json
import time
import warnings
from datetime import datetime
from pathlib import Path

import pytest

from bilevel_maml import cli
from bilevel_maml.checkpoint import load_checkpoint
from bilevel_maml.logging import WandbLogger, read_offline_run


def test_offline_run_folder_matches_the_engine(tmp_path, omniglot_root):
    output = tmp_path / "run"
    result = cli.run([
        "train", "--dataset", "omniglot-small", "--data-root", str(omniglot_root), "--width", "8",
        "--iterations", "4", "--meta-batch-size", "2", "--valid-every", "2", "--valid-tasks", "6",
        "--test-tasks", "8", "--checkpoint-every", "2", "--output", str(output), "--wandb", "offline",
        "--wandb-project", "bm-test", "--run-name", "short", "--group", "ci", "--tags", "t1", "t2", "--per-step",
    ])
    (run_dir,) = glob.glob(str(output / "wandb" / "offline-run-*"))
    run = read_offline_run(run_dir)
    assert {k: run["run"][k] for k in ("project", "name", "group", "tags")} == {
        "project": "bm-test", "name": "short", "group": "ci", "tags": ["t1", "t2"]}
    config = json.loads((output / "config.json").read_text())
    assert {k: run["config"][k] for k in config} == config

    engine_state = load_checkpoint(output / "checkpoints" / "last.pt")["engine"]
    rows = {row["_step"]: row for row in run["history"]}
    assert sorted(rows) == [1, 2, 3, 4]  # one row per meta-iteration
    for step, stats in enumerate(engine_state["history"], start=1):
        for key in ("loss", "accuracy", "lr", "tasks_per_second"):
            assert rows[step][f"train/{key}"] == stats[key]
    assert "validation/accuracy" in rows[2] and "validation/accuracy" not in rows[3]
    best = engine_state["best_valid"]
    for key in ("accuracy", "accuracy_ci95", "loss", "loss_ci95"):
        assert rows[best["iteration"]][f"validation/{key}"] == best[key]
    for key in ("accuracy", "accuracy_ci95", "loss", "tasks"):
        assert run["summary"][f"test/{key}"] == result[key]
    for key in ("accuracy", "accuracy_ci95", "loss", "loss_ci95"):  # --per-step: after 0 (θ) and 1 inner step
        assert [run["summary"][f"test/{key}_after_{steps}_steps"] for steps in (0, 1)] == result["per_step"][key]
    assert run["artifacts"] == [{"name": "short-best", "type": "model", "files": ["best.pt"]}]


def test_training_continues_with_a_warning_when_wandb_cannot_start(monkeypatch, tmp_path):
    import wandb

    def refuse(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.warns(UserWarning, match="wandb could not start \\(no network\\); going on without W&B"):
        logger = WandbLogger(mode="online")
    logger.log({"loss": 1.0}, step=1)
    logger.finish()
    with pytest.warns(UserWarning, match="going on without W&B"):
        result = cli.run(["train", "--dataset", "sinusoid", "--iterations", "2", "--meta-batch-size", "2",
                           "--test-tasks", "5", "--output", str(tmp_path / "run"), "--wandb", "online"])
    assert result["tasks"] == 5


def test_unknown_wandb_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown wandb mode 'offlin'; choose one of: offline, online, disabled"):
        WandbLogger(mode="offlin")


def test_the_run_folder_is_complete_as_soon_as_finish_returns(tmp_path):
    """wandb's own finish() can return before its writer flushed (seen: 1 run in 6 had an empty log)."""
    for i in range(8):
        logger = WandbLogger(project="flush", name=f"run{i}", config={"i": i}, dir=str(tmp_path / str(i)))
        for step in (1, 2, 3):
            logger.log({"loss": float(step)}, tag="train", step=step)
        run_dir = logger.run_dir
        logger.finish()
        run = read_offline_run(run_dir)
        assert run["run"]["name"] == f"run{i}" and [r["train/loss"] for r in run["history"]] == [1.0, 2.0, 3.0]


def test_evaluate_puts_its_scores_in_the_summary_of_the_runs_wandb_run(tmp_path):
    """W&B's way to add a score after a run: the same run (id, project, folder) continued, the
    scores in its summary under the name of evaluate's JSON file; training's history is left as is."""
    output = tmp_path / "run"
    cli.run(["train", "--dataset", "sinusoid", "--iterations", "4", "--meta-batch-size", "2", "--valid-every", "2",
             "--valid-tasks", "3", "--test-tasks", "5", "--output", str(output), "--wandb-project", "bm-eval",
             "--run-name", "short", "--no-progress"])
    (trained,) = glob.glob(str(output / "wandb" / "offline-run-*"))
    before = read_offline_run(trained)
    own = cli.run(["evaluate", "--output", str(output), "--test-tasks", "7", "--eval-inner-steps", "2", "--per-step"])
    other = cli.run(["evaluate", "--output", str(output), "--test-tasks", "6", "--split", "validation", "--shots", "3"])
    cli.run(["evaluate", "--output", str(output), "--test-tasks", "4", "--wandb", "disabled",
             "--result", str(tmp_path / "unlogged.json")])

    run = read_offline_run(trained)
    assert len(run["parts"]) == 3 and run["history"] == before["history"]
    assert run["config"] == before["config"] and run["run"] == before["run"]  # project bm-eval, name short
    summary = run["summary"]
    assert {key: summary[key] for key in before["summary"] if not key.startswith("_")} == \
        {key: value for key, value in before["summary"].items() if not key.startswith("_")}
    for key in ("loss", "loss_ci95", "tasks", "iteration", "eval_inner_steps", "split", "shots"):
        assert summary[f"evaluation/{key}"] == own[key]
        assert summary[f"evaluation-validation-sinusoid-3s-10q/{key}"] == other[key]
    assert [summary[f"evaluation/loss_after_{steps}_steps"] for steps in (0, 1, 2)] == own["per_step"]["loss"]
    assert summary["evaluation/tasks"] == 7 and summary["evaluation-validation-sinusoid-3s-10q/shots"] == 3


def test_a_part_started_in_the_second_of_another_is_read_as_a_part_of_the_run(tmp_path):
    """Offline wandb names a part's folder by its start to the second and the run id, and one that
    starts in the second of another part gets "-1" appended: still a part of the run."""
    first = WandbLogger(project="p", name="n", config={"algorithm": "maml"}, dir=str(tmp_path), id="samesec1")
    first.log({"loss": 1.0}, tag="train", step=1)
    first_dir = Path(first.run_dir)
    first.finish()
    # as if it had started this second (its start is a second or more ago by now), early in it
    time.sleep(1 - time.time() % 1)
    first_dir = first_dir.rename(first_dir.with_name(f"offline-run-{datetime.now():%Y%m%d_%H%M%S}-samesec1"))
    second = WandbLogger(project="p", name="n", dir=str(tmp_path), id="samesec1")
    second.summarize({"evaluation/accuracy": 0.75})
    second_dir = Path(second.run_dir)
    second.finish()
    if second_dir.name.split("-")[2] != first_dir.name.split("-")[2]:
        pytest.skip("the clock reached the next second between the two starts")
    assert second_dir.name == f"{first_dir.name}-1"
    for run_dir in (first_dir, second_dir):
        run = read_offline_run(run_dir)
        assert run["parts"] == [str(first_dir), str(second_dir)]
        assert [row["train/loss"] for row in run["history"]] == [1.0]
        assert run["summary"]["evaluation/accuracy"] == 0.75 and run["config"] == {"algorithm": "maml"}


def test_an_engine_built_in_python_logs_to_the_wandb_logger_it_is_given(tmp_path):
    """build_engine(..., logger=WandbLogger(...)): what the CLI does, from Python."""
    import torch
    from torch import nn

    from bilevel_maml import build_engine
    from conftest import random_classification_source

    torch.manual_seed(0)
    logger = WandbLogger(project="api", name="from-python", config={"algorithm": "maml"}, dir=str(tmp_path))
    engine = build_engine("maml", nn.Linear(6, 5).double(), random_classification_source(5, 4, 6), ways=5, shots=1,
                          meta_iterations=4, meta_batch_size=2, valid_step=2, valid_tasks=3, logger=logger)
    engine.run()
    result = engine.test(num_tasks=5)
    run_dir = logger.run_dir
    logger.finish()
    run = read_offline_run(run_dir)
    assert [row["train/loss"] for row in run["history"]] == [stats["loss"] for stats in engine.history]
    assert [row["_step"] for row in run["history"] if "validation/accuracy" in row] == [2, 4]
    assert run["summary"]["test/accuracy"] == result["accuracy"] and run["run"]["name"] == "from-python"


def test_a_run_file_of_many_blocks_is_read_back_exactly(tmp_path):
    """wandb's run file is framed in 32 KiB blocks; a record longer than a block is split into a first,
    middle and last chunk. A long run's file is many blocks (a short test's, one)."""
    import random

    random.seed(0)
    logger = WandbLogger(project="long", name="long", dir=str(tmp_path))
    logged = []
    for step in range(1, 301):
        row = {f"metric_{i}": random.random() for i in range(20)}
        if step % 100 == 0:
            row["note"] = "x" * 70_000  # a record over two blocks long
        logged.append({f"train/{key}": value for key, value in row.items()})
        logger.log(row, tag="train", step=step)
    run_dir = logger.run_dir
    logger.finish()
    (run_file,) = glob.glob(f"{run_dir}/run-*.wandb")
    assert Path(run_file).stat().st_size > 8 * 32768
    history = read_offline_run(run_dir)["history"]
    assert [{key: row[key] for key in want} for row, want in zip(history, logged)] == logged
    assert len(history) == 300


def test_a_run_under_a_wandb_sweep_agent_records_the_agents_run_id(tmp_path, monkeypatch):
    """A sweep agent starts each run with its own id (WANDB_RUN_ID), and wandb ignores the id we pass;
    the run folder records the agent's, so resume and evaluate continue the sweep's run, and the
    default folder is named with it, so the sweep's runs do not all claim one folder."""
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun1")
    monkeypatch.chdir(tmp_path)
    # the agent passes the sweep's values (--inner-lr=0.2), not --output: each run gets a folder of its own
    cli.run(["train", "--dataset", "sinusoid", "--iterations", "2", "--meta-batch-size", "2", "--test-tasks", "3",
             "--checkpoint-every", "1", "--no-progress", "--inner-lr=0.2"])
    output = tmp_path / "runs" / "maml-sinusoid-5w10s-seed0-agentrun1"
    monkeypatch.delenv("WANDB_SWEEP_ID")
    monkeypatch.delenv("WANDB_RUN_ID")
    assert json.loads((output / "config.json").read_text())["wandb_id"] == "agentrun1"
    assert load_checkpoint(output / "checkpoints" / "last.pt")["config"]["wandb_id"] == "agentrun1"
    evaluated = cli.run(["evaluate", "--output", str(output), "--test-tasks", "4"])
    parts = sorted(glob.glob(str(output / "wandb" / "offline-run-*")))
    assert len(parts) == 2 and all("-agentrun1" in part for part in parts)  # training's, evaluate's (maybe "-1")
    run = read_offline_run(parts[0])
    assert run["summary"]["evaluation/loss"] == evaluated["loss"] and run["config"]["wandb_id"] == "agentrun1"


def test_the_command_prints_the_librarys_warnings_as_one_line(tmp_path):
    """As its errors: `bilevel-maml: warning: ...`, not Python's file:line and source line; a warning
    from elsewhere (torch's) keeps Python's format, which says where it came from."""
    import subprocess
    import sys

    import bilevel_maml

    cli.run(["train", "--dataset", "sinusoid", "--iterations", "1", "--meta-batch-size", "2", "--test-tasks", "3",
             "--output", str(tmp_path / "run"), "--wandb", "disabled", "--no-progress"])
    wandb_refuses = ("import sys, wandb\nfrom bilevel_maml import cli\n"
                     "def refuse(*args, **kwargs):\n    raise RuntimeError('no network')\n"
                     "wandb.init = refuse\nsys.exit(cli.main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", wandb_refuses, "evaluate", "--output", str(tmp_path / "run"),
                           "--test-tasks", "3", "--wandb", "online"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "bilevel-maml: warning: wandb could not start (no network); going on without W&B logging"]

    with cli.one_line_warnings("prog"):
        ours = warnings.formatwarning("a note", UserWarning, f"{Path(bilevel_maml.__file__).parent}/builder.py", 9)
        theirs = warnings.formatwarning("a note", UserWarning, "/elsewhere/torch/module.py", 9)
        beside = f"{Path(bilevel_maml.__file__).parent}_extras/module.py"  # a sibling folder, not ours
        neighbours = warnings.formatwarning("a note", UserWarning, beside, 9)
    assert ours == "prog: warning: a note\n"
    assert theirs.startswith("/elsewhere/torch/module.py:9: UserWarning: a note")
    assert neighbours.startswith(f"{beside}:9: UserWarning: a note")
    assert warnings.formatwarning("a note", UserWarning, f"{Path(bilevel_maml.__file__).parent}/builder.py", 9) \
        .startswith(f"{Path(bilevel_maml.__file__).parent}/builder.py:9: UserWarning")  # Python's again after it
