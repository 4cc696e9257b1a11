"""The `bilevel-maml` command: every flag reaches the run, config files, evaluate, errors."""

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bilevel_maml import arguments, cli, runs
from bilevel_maml.checkpoint import atomic_save, load_checkpoint
from bilevel_maml.data.sources import DATASETS
from bilevel_maml.history import METRICS_FILE, read_metrics
from bilevel_maml.problems import (ALGORITHMS, IMAMLLower, IMAMLUpper, MAMLLower, MAMLUpper, options_in_use,
                                   split_options)
from conftest import write_mini_imagenet_pickles

VENV_BIN = Path(sys.executable).parent


def test_every_training_flag_reaches_the_run(tmp_path, omniglot_root):
    output = tmp_path / "run"
    result = cli.run([
        "train", "--algorithm", "imaml", "--dataset", "omniglot-small", "--data-root", str(omniglot_root),
        "--ways", "3", "--shots", "2", "--query-shots", "3", "--inner-steps", "2", "--eval-inner-steps", "4", "--inner-lr", "0.2",
        "--meta-lr", "0.005", "--meta-batch-size", "2", "--iterations", "3", "--optimizer", "adafactor",
        "--gradient-clipping", "5.5", "--meta-lr-schedule", "cosine", "--min-meta-lr", "0.0001",
        "--model", "resnet12", "--width", "4", "--lam", "2.0", "--cg-iterations", "2", "--no-vectorize", "--seed", "5",
        "--device", "cpu", "--dtype", "float64", "--valid-every", "3", "--valid-tasks", "2",
        "--test-tasks", "4", "--checkpoint-every", "1", "--output", str(output), "--wandb", "disabled",
        "--no-progress", "--sampler", "learn2learn", "--no-cuda-graph", "--precision", "fp32",
    ])
    config = json.loads((output / "config.json").read_text())
    expected = dict(algorithm="imaml", dataset="omniglot-small", data_root=str(omniglot_root), ways=3, shots=2,
                    query_shots=3, inner_steps=2, eval_inner_steps=4, inner_lr=0.2, meta_lr=0.005, meta_batch_size=2, iterations=3,
                    optimizer="adafactor", gradient_clipping=5.5, meta_lr_schedule="cosine", min_meta_lr=1e-4, model="resnet12", width=4, lam=2.0, cg_iterations=2, vectorize=False, seed=5,
                    device="cpu", dtype="float64", valid_every=3, valid_tasks=2, test_tasks=4,
                    checkpoint_every=1, output=str(output), wandb="disabled", progress=False,
                    sampler="learn2learn", cuda_graph=False, precision="fp32")
    assert {k: config[k] for k in expected} == expected
    assert result["tasks"] == 4 and 0 <= result["accuracy"] <= 1

    # ...and each one took effect in the engine it describes.
    engine = runs.build_from_config(config, torch.device("cpu"))
    lower, upper, env = engine.task_learner, engine.meta_learner, engine.env
    assert type(lower).__name__ == "IMAMLLower" and lower.lam == 2.0 and upper.cg_iterations == 2
    assert (lower.inner_lr, lower.inner_steps, engine.eval_inner_steps, upper.meta_batch_size) == (0.2, 2, 4, 2)
    assert not engine.vectorized and runs.build_from_config({**config, "vectorize": True}, torch.device("cpu")).vectorized
    assert (env.ways, env.shots, env.query_shots, env.seed) == (3, 2, 3, 15)
    assert not env.on_device and runs.build_from_config({**config, "sampler": "device"}, torch.device("cpu")).env.on_device
    assert engine.precision == "fp32" and engine.execution.name == "eager"
    assert isinstance(upper.optimizer, torch.optim.Adafactor) and upper.optimizer.defaults["lr"] == 0.005
    assert upper.gradient_clipping == 5.5 and upper.meta_lr_schedule == "cosine" and upper.min_meta_lr == 1e-4
    assert type(upper.module).__name__ == "ResNet12" and upper.module.classifier.out_features == 3
    assert upper.module.features[0].body[0].out_channels == 4
    assert all(p.dtype == torch.float64 for p in upper.module.parameters())
    state = load_checkpoint(output / "checkpoints" / "last.pt")["engine"]
    assert state["meta_iteration"] == 3 and len(state["history"]) == 3
    # Adafactor's factored second moments: row/column variances for matrices, a variance for vectors.
    kinds = {frozenset(s) for s in state["optimizer"]["state"].values()}
    assert kinds == {frozenset({"step", "row_var", "col_var"}), frozenset({"step", "variance"})}


def test_config_file_yaml_and_toml_with_flags_overriding(tmp_path):
    (tmp_path / "run.yaml").write_text("dataset: sinusoid\nmeta-batch-size: 3\niterations: 9\nmodel: mlp\ntags: [a, b]\n"
                                       "per-step: true\n")
    (tmp_path / "run.toml").write_text('dataset = "sinusoid"\nmeta_batch_size = 3\niterations = 9\nprogress = false\n')
    for name in ("run.yaml", "run.toml"):
        args = cli.parse(["train", "--config", str(tmp_path / name), "--iterations", "2"])
        assert (args.dataset, args.meta_batch_size, args.iterations) == ("sinusoid", 3, 2)
    from_yaml = cli.parse(["train", "--config", str(tmp_path / "run.yaml")])
    assert from_yaml.tags == ["a", "b"] and from_yaml.per_step is True  # an on/off flag
    assert cli.parse(["train", "--config", str(tmp_path / "run.toml")]).per_step is False
    assert cli.parse(["train", "--config", str(tmp_path / "run.toml")]).progress is False
    (tmp_path / "bad.yaml").write_text("waays: 5\n")
    with pytest.raises(SystemExit, match="unknown option 'waays' in .*bad.yaml; allowed: .*ways"):
        cli.parse(["train", "--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "bad2.toml").write_text('optimizer = "lbfgs"\n')
    with pytest.raises(SystemExit):
        cli.parse(["train", "--config", str(tmp_path / "bad2.toml")])


def sinusoid_run(output, *extra):
    return ["train", "--dataset", "sinusoid", "--iterations", "6", "--meta-batch-size", "2", "--valid-every", "3",
            "--valid-tasks", "5", "--test-tasks", "10", "--checkpoint-every", "2", "--output", str(output),
            "--wandb", "disabled", *extra]


def test_evaluate_on_the_validation_split_scores_the_tasks_training_validated_on(tmp_path, capsys):
    """--split validation draws the validation stream from its start: with θ of the run's only
    validation (best.pt, iteration 4), the same number of tasks scores exactly what training logged
    there; the test split scores other tasks, and the test's evaluation.json is not written."""
    cli.run(["train", "--dataset", "sinusoid", "--iterations", "4", "--meta-batch-size", "2", "--valid-every", "4",
             "--valid-tasks", "7", "--test-tasks", "5", "--wandb", "disabled", "--no-progress",
             "--output", str(tmp_path / "run")])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validated = next(row for row in logged if "validation/loss" in row)
    evaluate = ["evaluate", "--output", str(tmp_path / "run"), "--test-tasks", "7"]
    on_validation = cli.run([*evaluate, "--split", "validation"])
    assert (on_validation["loss"], on_validation["loss_ci95"]) == (validated["validation/loss"],
                                                                   validated["validation/loss_ci95"])
    assert on_validation["split"] == "validation" and on_validation["iteration"] == validated["step"] == 4
    assert "(95% CI over 7 validation tasks)" in capsys.readouterr().out
    assert (tmp_path / "run" / "evaluation-validation.json").is_file()
    assert not (tmp_path / "run" / "evaluation.json").exists()
    assert cli.run(evaluate)["loss"] != on_validation["loss"]


def test_evaluate_reports_mean_and_ci_and_writes_json(tmp_path, capsys):
    cli.run(sinusoid_run(tmp_path / "run"))
    assert cli.parse(["evaluate", "--output", "x"]).test_tasks == 600
    result = cli.run(["evaluate", "--output", str(tmp_path / "run"), "--test-tasks", "25",
                       "--result", str(tmp_path / "eval.json")])
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["tasks"] == 25 and written["loss"] == result["loss"] and written["loss_ci95"] > 0
    assert written["checkpoint"].endswith("best.pt")
    by_file = cli.run(["evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "last.pt"),
                       "--test-tasks", "25", "--device", "cpu"])
    assert by_file["iteration"] == 6 and (tmp_path / "run" / "evaluation.json").is_file()
    assert f"MSE {result['loss']:.4f} ± {result['loss_ci95']:.4f} (95% CI over 25 test tasks)" in capsys.readouterr().out
    assert written["eval_inner_steps"] == written["config"]["eval_inner_steps"] == 1  # the run's --inner-steps
    more = cli.run(["evaluate", "--output", str(tmp_path / "run"), "--test-tasks", "25", "--eval-inner-steps", "3",
                    "--per-step", "--result", str(tmp_path / "eval3.json")])
    written = json.loads((tmp_path / "eval3.json").read_text())
    assert written["eval_inner_steps"] == 3
    assert abs(more["loss"] - result["loss"]) > 1e-3 * result["loss"]  # the same 25 tasks, adapted further
    # the curve: after 0 (θ), 1, 2, 3 steps; after 1 step, the same tasks scored as the run's 1-step evaluation did
    curve = written["per_step"]
    assert len(curve["loss"]) == 4 and curve["loss"][3] == more["loss"]
    assert curve["loss"][1] == pytest.approx(result["loss"], rel=1e-9)
    out = capsys.readouterr().out
    assert "(95% CI over 25 test tasks, adapted with 3 inner steps)" in out
    assert f"  after 1 inner step: MSE {curve['loss'][1]:.4f} ± {curve['loss_ci95'][1]:.4f}\n" in out
    # one task has no confidence interval: null in the file, which stays JSON (no NaN) for strict readers
    cli.run(["evaluate", "--output", str(tmp_path / "run"), "--test-tasks", "1", "--result", str(tmp_path / "one.json")])

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    one = json.loads((tmp_path / "one.json").read_text(), parse_constant=refuse)
    assert one["tasks"] == 1 and one["loss"] > 0 and one["loss_ci95"] is None
    assert f"MSE {one['loss']:.4f} ± n/a (95% CI over 1 test tasks" in capsys.readouterr().out  # none from one task


def test_train_per_step_reports_the_final_tests_curve_as_evaluate_does(tmp_path, capsys):
    """train --per-step: result.json's curve, after 0 ... --eval-inner-steps steps, is the one
    `evaluate --per-step` computes for the same θ and test tasks; its last point is the test result."""
    result = cli.run(sinusoid_run(tmp_path / "run", "--eval-inner-steps", "2", "--per-step", "--no-progress"))
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "run" / "result.json").read_text())
    assert written["config"]["per_step"] is True
    curve = written["per_step"]
    assert len(curve["loss"]) == 3 and curve["loss"][2] == pytest.approx(result["loss"], rel=1e-12)
    again = cli.run(["evaluate", "--output", str(tmp_path / "run"), "--test-tasks", "10", "--per-step"])
    assert again["per_step"]["loss"] == pytest.approx(curve["loss"], rel=1e-9)
    for steps in range(3):
        assert (f"  after {steps} inner step{'s' if steps != 1 else ''}: MSE {curve['loss'][steps]:.4f} ± "
                f"{curve['loss_ci95'][steps]:.4f}\n") in out
    capsys.readouterr()
    plain = cli.run(sinusoid_run(tmp_path / "plain", "--no-progress"))
    assert "per_step" not in plain and "after 0 inner steps" not in capsys.readouterr().out


def test_train_resume_if_exists_continues_the_run_as_resume_does(tmp_path, capsys):
    """A requeued job runs its command again: with --resume-if-exists, train on a folder holding the
    same run continues it (here extended from 4 to 6 iterations) to exactly what `resume` reaches, and
    on the finished run it changes nothing; on an empty folder it trains."""
    command = sinusoid_run(tmp_path / "run", "--resume-if-exists", "--no-progress")
    cli.run([*command, "--iterations", "4"])
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    capsys.readouterr()
    cli.run([*command, "--iterations", "6"])
    assert f"{tmp_path / 'run'} holds this run; continuing it" in capsys.readouterr().out
    cli.run(["resume", "--output", str(tmp_path / "resumed"), "--iterations", "6", "--wandb", "disabled",
             "--no-progress"])
    again, resumed = (load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")["engine"]
                      for name in ("run", "resumed"))
    assert again["meta_iteration"] == resumed["meta_iteration"] == 6
    assert all(torch.equal(again["theta"][name], resumed["theta"][name]) for name in resumed["theta"])
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in resumed["history"]]
    files = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()}
    finished = cli.run([*command, "--iterations", "6"])
    assert finished == json.loads((tmp_path / "run" / "result.json").read_text())
    assert f"{tmp_path / 'run'} holds this run; it is finished (iteration 6 of 6" in capsys.readouterr().out
    assert {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()} == files


def test_train_refuses_to_overwrite_a_run_and_resume_extends_it(tmp_path, capsys):
    cli.run(sinusoid_run(tmp_path / "run"))
    first = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["engine"]
    with pytest.raises(SystemExit, match="already holds a run .*bilevel-maml resume --output"):
        cli.run(sinusoid_run(tmp_path / "run"))
    capsys.readouterr()
    cli.run(["resume", "--output", str(tmp_path / "run"), "--iterations", "8", "--wandb", "disabled",
             "--device", "cpu", "--no-progress"])
    assert f"(from iteration {first['meta_iteration']})" in capsys.readouterr().out
    extended = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["engine"]
    assert extended["meta_iteration"] == 8
    # the first iterations were continued, not trained again
    assert extended["history"][: first["meta_iteration"]] == first["history"]
    # a finished run is said to be finished and left as it is (no test run again, no new W&B run)
    files = {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()}
    capsys.readouterr()
    result = cli.run(["resume", "--output", str(tmp_path / "run"), "--wandb", "offline", "--no-progress"])
    assert f"{tmp_path / 'run'} is finished (iteration 8 of 8" in capsys.readouterr().out
    assert result["iteration"] == json.loads((tmp_path / "run" / "result.json").read_text())["iteration"]
    cli.run(["resume", "--output", str(tmp_path / "run"), "--iterations", "5", "--wandb", "offline", "--no-progress"])
    assert f"{tmp_path / 'run'} is finished (iteration 8, more than the 5 asked for;" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()} == files


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda:7"], "CUDA is not available here|invalid --device"),
    (["--dataset", "mini-imagenet", "--data-root", "{tmp}"], "mini-imagenet-cache-train.pkl"),
    (["--dataset", "omniglot-small", "--data-root", "{tmp}/absent"], "absent' does not exist. Place images_background_small1.zip"),
    (["--dataset", "sinusoid", "--model", "conv4"], "--dataset sinusoid has vector inputs: it needs --model mlp"),
    (["--inner-steps", "0", "--dataset", "sinusoid"], "argument --inner-steps: must be an integer >= 1, got '0'"),
])
def test_bad_runs_fail_before_training_with_a_clear_message(tmp_path, argv, message):
    if torch.cuda.device_count() > 7 and "cuda:7" in argv:
        pytest.skip("this machine has a cuda:7")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(cli.BadInput, match=message) as refused:
        cli.run(["train", "--output", str(tmp_path / "run"), "--wandb", "disabled", *argv])
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists()


def test_the_readmes_mini_imagenet_setting_runs_on_mini_imagenets_files(tmp_path, capsys):
    """MAML's paper setting as the README spells it (32 filters, 5 inner steps and 10 at test, 15
    queries per class, 4 tasks) trains and tests on files laid out as learn2learn's mini-ImageNet
    pickles (random 84×84 images: the path, not the accuracy)."""
    write_mini_imagenet_pickles(tmp_path, classes=6, per_class=16)
    result = cli.run(["train", "--dataset", "mini-imagenet", "--data-root", str(tmp_path), "--width", "32",
                      "--inner-steps", "5", "--eval-inner-steps", "10", "--query-shots", "15", "--meta-batch-size", "4",
                      "--iterations", "1", "--valid-tasks", "1", "--test-tasks", "2", "--wandb", "disabled",
                      "--no-progress", "--output", str(tmp_path / "run")])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {key: config[key] for key in ("inner_steps", "eval_inner_steps", "inner_lr", "query_shots", "width")} == \
        {"inner_steps": 5, "eval_inner_steps": 10, "inner_lr": 0.01, "query_shots": 15, "width": 32}
    theta = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["engine"]["theta"]
    assert [tuple(t.shape) for t in theta.values() if t.dim() == 4][0] == (32, 3, 3, 3)
    assert result["tasks"] == 2 and "adapted with 10 inner steps" in capsys.readouterr().out


def test_a_runs_data_folder_is_recorded_whole_so_evaluate_finds_it_from_anywhere(tmp_path, omniglot_root,
                                                                                  monkeypatch, capsys):
    """--data-root given relative to the folder train ran in is recorded as an absolute path (so is
    the dataset's default where none is given), so evaluate from another folder finds the data; a run
    that recorded the relative path is still the same run for train --resume-if-exists."""
    monkeypatch.chdir(omniglot_root.parent)
    run = ["train", "--data-root", "omniglot-small", "--iterations", "1", "--meta-batch-size", "2", "--valid-tasks",
           "2", "--test-tasks", "3", "--wandb", "disabled", "--no-progress", "--output", str(tmp_path / "run")]
    trained = cli.run(run)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data_root"] == str(omniglot_root.resolve())
    monkeypatch.chdir(tmp_path)
    evaluated = cli.run(["evaluate", "--output", "run", "--test-tasks", "3", "--no-progress"])
    assert (evaluated["accuracy"], evaluated["loss"]) == (trained["accuracy"], trained["loss"])

    monkeypatch.chdir(omniglot_root.parent)
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "data_root": "omniglot-small"}))
    capsys.readouterr()
    cli.run([*run, "--resume-if-exists"])
    assert "holds this run; it is finished" in capsys.readouterr().out
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "dataset": "gone", "data_root": None}))
    with pytest.raises(cli.BadInput, match=r"holds another run: dataset \(the run's 'gone', this command's "
                                            r"'omniglot-small'\)"):
        cli.run([*run, "--resume-if-exists"])  # a dataset no plugin of this command registers

    monkeypatch.setattr(runs, "default_data_root", lambda dataset: "omniglot-small")
    cli.run(["train", "--iterations", "1", "--meta-batch-size", "2", "--valid-tasks", "2", "--test-tasks", "3",
             "--wandb", "disabled", "--no-progress", "--output", str(tmp_path / "default")])
    assert json.loads((tmp_path / "default" / "config.json").read_text())["data_root"] == str(omniglot_root.resolve())


def test_download_flag_hands_missing_benchmarks_to_learn2learn(tmp_path, monkeypatch):
    """With --download the real learn2learn get_tasksets path runs (here intercepted: no network)."""
    import learn2learn

    calls = []

    def fake_get_tasksets(name, **kwargs):
        calls.append((name, kwargs))
        raise RuntimeError("offline")

    monkeypatch.setattr(learn2learn.vision.benchmarks, "get_tasksets", fake_get_tasksets)
    with pytest.raises(RuntimeError, match="offline"):
        cli.run(["train", "--dataset", "fc100", "--data-root", str(tmp_path), "--download", "--ways", "5",
                 "--shots", "1", "--query-shots", "2", "--output", str(tmp_path / "run"), "--wandb", "disabled"])
    assert calls == [("fc100", dict(train_ways=5, train_samples=3, test_ways=5, test_samples=3, root=str(tmp_path)))]


def test_console_script_and_module_entry_points():
    for command in ([str(VENV_BIN / "bilevel-maml"), "--help"], [sys.executable, "-m", "bilevel_maml", "train", "--help"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    shown = subprocess.run([str(VENV_BIN / "bilevel-maml"), "--help"], capture_output=True, text=True, timeout=120).stdout
    for command in ("train", "evaluate", "resume", "plot", "bench"):
        assert f"\n    {command} " in shown, shown


def omniglot_run(output, root, *extra):
    return ["train", "--dataset", "omniglot-small", "--data-root", str(root), "--width", "4", "--meta-batch-size", "2",
            "--valid-every", "2", "--valid-tasks", "3", "--test-tasks", "5", "--checkpoint-every", "1",
            "--output", str(output), "--wandb", "disabled", "--dtype", "float64", *extra]


def test_a_device_sampled_run_resumes_to_exactly_the_same_theta(tmp_path, omniglot_root):
    """The device sampler's generator state travels in the checkpoint: stopped at 3 of 6 and resumed,
    the run draws the tasks the straight run drew."""
    cli.run(omniglot_run(tmp_path / "straight", omniglot_root, "--iterations", "6"))
    cli.run(omniglot_run(tmp_path / "stopped", omniglot_root, "--iterations", "3"))
    config = json.loads((tmp_path / "stopped" / "config.json").read_text())
    assert config["sampler"] == "auto" and runs.build_from_config(config, torch.device("cpu")).env.on_device
    cli.run(["resume", "--output", str(tmp_path / "stopped"), "--iterations", "6", "--wandb", "disabled"])
    straight, resumed = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt")["engine"]
                         for run in ("straight", "stopped"))
    assert "generator" in straight["envs"]["train"]
    assert torch.equal(straight["envs"]["train"]["generator"], resumed["envs"]["train"]["generator"])
    for name, value in straight["theta"].items():
        assert torch.equal(value, resumed["theta"][name]), name
    assert [h["loss"] for h in straight["history"]] == [h["loss"] for h in resumed["history"]]


def test_a_run_resumes_drawing_from_the_stream_it_was_drawing_from(tmp_path):
    """Sinusoid runs drew their tasks on the host before 2026-12-06 under --sampler auto (the default),
    which now draws them on the device: such a run, resumed, goes on drawing on the host, exactly."""
    cli.run(sinusoid_run(tmp_path / "straight", "--sampler", "learn2learn", "--checkpoint-every", "1"))
    cli.run(sinusoid_run(tmp_path / "older", "--sampler", "learn2learn", "--iterations", "3", "--checkpoint-every", "1"))
    last = tmp_path / "older" / "checkpoints" / "last.pt"
    checkpoint = load_checkpoint(last)
    checkpoint["config"]["sampler"] = "auto"  # what such a run's configuration said
    atomic_save(checkpoint, last)
    assert runs.build_from_config(checkpoint["config"], torch.device("cpu")).env.on_device  # auto today
    cli.run(["resume", "--output", str(tmp_path / "older"), "--iterations", "6", "--wandb", "disabled"])
    straight, resumed = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt")["engine"]
                         for run in ("straight", "older"))
    assert "generator" not in resumed["envs"]["train"] and resumed["meta_iteration"] == 6
    for name, value in straight["theta"].items():
        assert torch.equal(value, resumed["theta"][name]), name


@pytest.mark.parametrize("flags, message", [
    (["--cuda-graph"], "--cuda-graph needs a CUDA device, got --device cpu"),
    (["--precision", "tf32"], "--precision: precision='tf32' is a CUDA tensor-core mode; on cpu use fp32"),
    (["--precision", "bf16"], "--precision: precision='bf16' is a CUDA mode"),
])
def test_cuda_only_options_on_the_cpu_are_refused_in_one_line(tmp_path, flags, message):
    with pytest.raises(SystemExit) as stop:
        cli.run(sinusoid_run(tmp_path / "run", *flags))
    assert message in str(stop.value) and "\n" not in str(stop.value)
    assert not (tmp_path / "run").exists()


def test_every_option_is_described_and_shows_its_default_in_help():
    parser = arguments.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"train", "evaluate", "resume", "plot", "bench"}
    for name, command in commands.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            shown = formatter._expand_help(action) if action.help else ""
            assert len(shown) >= 6, f"{name} {action.option_strings[0]} has no help"
            if action.default not in (None, False, [], "==SUPPRESS=="):
                assert f"default: {action.default}" in shown, f"{name} {action.option_strings[0]}: {shown!r}"
            else:
                assert "default: None" not in shown and "default: False" not in shown


def test_bench_help_names_itself_and_lists_implementations_one_by_one(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.run(["bench", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: bilevel-maml bench")
    flat = " ".join(text.split())
    assert "--implementations NAME [NAME ...]" in flat and "'ours maml vectorized (cuda graph)'" in flat
    assert "--memory-steps [STEPS ...]" in flat and "peak memory" in flat
    assert "(default: 5)" in flat  # --repeats
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from implementations import IMPLEMENTATIONS

    assert not [name for name in IMPLEMENTATIONS if "," in name], "a name with a comma reads as two in a list"


def test_a_device_must_exist_on_this_machine(monkeypatch):
    """--device (train, evaluate, resume and the benchmarks): a CUDA index past this machine's devices
    is named with the ones it has (as if on a one-GPU machine here), before any work."""
    import argparse

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert arguments.device_name("cuda:0") == "cuda:0" and arguments.device_name("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match=r"'cuda:7' requested but this machine has 1 CUDA device"):
        arguments.device_name("cuda:7")
    with pytest.raises(cli.BadInput, match=r"invalid --device: must be cpu, cuda or cuda:N, got 'gpu'"):
        cli.run(["train", "--dataset", "sinusoid", "--device", "gpu", "--wandb", "disabled"])


def test_a_cosine_meta_lr_schedule_is_continued_over_the_new_total_by_resume(tmp_path):
    run = tmp_path / "run"
    cli.run(sinusoid_run(run, "--meta-lr-schedule", "cosine", "--meta-lr", "0.01", "--iterations", "4",
                         "--no-progress"))
    cli.run(["resume", "--output", str(run), "--iterations", "6", "--wandb", "disabled", "--no-progress"])
    rates = [row["train/lr"] for row in read_metrics(run / METRICS_FILE) if "train/lr" in row]

    def cosine(iteration, total):
        return 0.01 * 0.5 * (1 + math.cos(math.pi * (iteration - 1) / total))

    # four iterations over a total of 4, then the fifth and sixth over the new total of 6 (not the
    # old schedule's last value, 0, for the fifth)
    assert rates == pytest.approx([cosine(i, 4) for i in (1, 2, 3, 4)] + [cosine(5, 6), cosine(6, 6)], rel=1e-9)


@pytest.mark.parametrize("argv, loop", [
    (["--algorithm", "maml"], (1, 0.4, 1.0)),
    (["--algorithm", "anil"], (1, 0.4, 1.0)),
    (["--algorithm", "fomaml"], (5, 0.1, 1.0)),
    (["--algorithm", "imaml"], (5, 0.1, 0.5)),
    (["--algorithm", "Reptile", "--dataset", "omniglot"], (5, 0.1, 1.0)),
    (["--algorithm", "maml++"], (5, 0.1, 1.0)),
    (["--algorithm", "metasgd"], (1, 0.4, 1.0)),
    (["--algorithm", "imaml", "--inner-steps", "2", "--lam", "2"], (2, 0.1, 2.0)),  # a flag wins over its part alone
    (["--algorithm", "fomaml", "--inner-lr", "0.3"], (5, 0.3, 1.0)),
    (["--algorithm", "fomaml", "--dataset", "sinusoid"], (1, 0.1, 1.0)),  # no loop of its own there: MAML's
    (["--algorithm", "fomaml", "--dataset", "mini-imagenet"], (1, 0.01, 1.0)),
])
def test_algorithms_that_want_other_inner_loops_get_theirs_where_no_flag_sets_it(tmp_path, argv, loop):
    args = arguments.build_parser().parse_args(["train", *argv, "--output", str(tmp_path / "run")])
    config = runs._run_config(args)
    assert (config["inner_steps"], config["inner_lr"], config["lam"]) == loop
    assert config["eval_inner_steps"] == loop[0]


class ProximalLower(IMAMLLower):
    """A user's variant on iMAML's classes: iMAML's flags are its flags."""


class ProximalUpper(IMAMLUpper):
    pass


@pytest.mark.parametrize("classes, takes_them", [((ProximalUpper, ProximalLower), True),
                                                 ((MAMLUpper, ProximalLower), "lam"),
                                                 ((ProximalUpper, MAMLLower), "cg_iterations"),
                                                 ((MAMLUpper, MAMLLower), False)])
def test_imaml_flags_go_to_the_classes_that_take_them_and_are_refused_elsewhere(tmp_path, monkeypatch, classes,
                                                                                 takes_them):
    monkeypatch.setitem(ALGORITHMS, "proximal", classes)
    args = arguments.build_parser().parse_args(["train", "--algorithm", "proximal", "--lam", "2", "--cg-iterations",
                                                "3", "--output", str(tmp_path / "run")])
    if takes_them is True:
        config = runs._run_config(args)
        assert (config["lam"], config["cg_iterations"]) == (2.0, 3)
        return
    with pytest.raises(arguments.BadInput) as refused:
        runs._run_config(args)
    named = {"lam": "--lam 2.0", "cg_iterations": "--cg-iterations 3"}
    for name, flag in named.items():
        assert (flag in str(refused.value)) == (name != takes_them), name
    assert "proximal does not use" in str(refused.value)


class LowerWithItsOwnLam(MAMLLower):
    """Not iMAML's: its lam is an option like any other."""

    def __init__(self, *args, lam: float = 3.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.lam = lam


def test_imamls_settings_are_arguments_of_the_builder_not_options(monkeypatch):
    monkeypatch.setitem(ALGORITHMS, "proximal", (ProximalUpper, ProximalLower))
    monkeypatch.setitem(ALGORITHMS, "own-lam", (MAMLUpper, LowerWithItsOwnLam))
    assert options_in_use("imaml", {}) == options_in_use("proximal", {}) == {"cg_tolerance": 0.0}
    for name, flag in (("lam", "--lam"), ("cg_iterations", "--cg-iterations")):
        with pytest.raises(ValueError, match=rf"^proximal's {name} is not an option: {flag} sets it "
                                             rf"\(build_engine\({name}=...\) in Python\)$"):
            split_options("proximal", {name: 2})
    assert split_options("own-lam", {"lam": 0.5}) == ({}, {"lam": 0.5})


def tasks_from_files(data_root, ways, shots):
    raise AssertionError("not loaded: the flags are checked first")


def tasks_fetched_when_asked(data_root, download):
    raise AssertionError("not loaded: the flags are checked first")


@pytest.mark.parametrize("loader, refused", [(tasks_from_files, True), (tasks_fetched_when_asked, False),
                                             (lambda **given: None, False)])
def test_download_is_refused_for_a_registered_loader_that_takes_no_download(tmp_path, monkeypatch, loader, refused):
    monkeypatch.setitem(DATASETS, "own", replace(DATASETS["sinusoid"], load=loader))
    args = arguments.build_parser().parse_args(["train", "--dataset", "own", "--download", "--output",
                                                str(tmp_path / "run")])
    if not refused:
        assert runs._run_config(args)["download"] is True
        return
    with pytest.raises(arguments.BadInput, match=r"--download with --dataset own: the loader registered for it "
                                                 r"\(test_cli.tasks_from_files\) takes no download; drop --download"):
        runs._run_config(args)
