"""Learning curves without W&B: metrics.jsonl written during training, `bilevel-maml plot` drawing
it to a PNG whose lines hold exactly the run's history, and `engine.run(progress=True)`."""

import json
import struct
from types import SimpleNamespace

import numpy as np
import pytest

from bilevel_maml import build_engine, cli
from bilevel_maml.data import SinusoidTasks
from bilevel_maml.history import MetricsFile, read_metrics
from bilevel_maml.models import MLP
from bilevel_maml.plots import compare_runs, plot_run, results_table

SINUSOID = ["train", "--dataset", "sinusoid", "--iterations", "6", "--meta-batch-size", "2", "--valid-every", "3",
            "--valid-tasks", "5", "--test-tasks", "5", "--wandb", "disabled", "--no-progress"]


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def classification_run(folder, iterations=40, better_by=0.0):
    """A run folder whose metrics.jsonl the callback writes, as `train` would, with accuracy."""
    rng = np.random.default_rng(0)
    file, engine = MetricsFile(folder / "metrics.jsonl"), SimpleNamespace(meta_iteration=0)
    file.on_train_start(engine)
    for i in range(1, iterations + 1):
        engine.meta_iteration = i
        metrics = {"train/loss": float(1.6 / i + 0.1 * rng.random()), "train/accuracy": float(min(1, i / 50)),
                   "train/lr": 1e-3, "train/tasks_per_second": 50.0}
        if i % 10 == 0:
            metrics.update({"validation/loss": 1.0 / i, "validation/loss_ci95": 0.05,
                            "validation/accuracy": i / 60 + better_by, "validation/accuracy_ci95": 0.03})
        file.on_iteration_end(engine, metrics)
    file.on_test_end(engine, {"loss": 0.4, "loss_ci95": 0.02, "accuracy": 0.71, "accuracy_ci95": 0.021, "tasks": 50})
    return read_metrics(folder / "metrics.jsonl")


def test_the_png_shows_exactly_the_runs_history(tmp_path):
    rows = classification_run(tmp_path)
    drawn = plot_run(tmp_path, dpi=80)
    assert png_size(tmp_path / "curves.png") == (800, 320)  # 10 × 4 inches
    series = drawn["series"]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert series["query loss: train loss"] == (steps, [r["train/loss"] for r in rows if "train/loss" in r])
    assert series["query accuracy (%): train accuracy"][1] == pytest.approx(
        [100 * r["train/accuracy"] for r in rows if "train/accuracy" in r])
    validation = [r for r in rows if "validation/accuracy" in r]
    assert series["query accuracy (%): validation (95% CI)"] == (
        [r["step"] for r in validation], pytest.approx([100 * r["validation/accuracy"] for r in validation]))
    test_point = next(v for k, v in series.items() if k.startswith("query accuracy (%): test"))
    assert test_point == ([40.0], [pytest.approx(71.0)])
    assert "71.0% ± 2.1%" in " ".join(series)
    # the lines are in the picture: the training colour (tab:blue) and the validation band's orange
    import matplotlib.image

    pixels = (matplotlib.image.imread(tmp_path / "curves.png")[..., :3] * 255).round().astype(int)
    blue = np.abs(pixels - [31, 119, 180]).sum(axis=-1) < 30
    orange = np.abs(pixels - [255, 127, 14]).sum(axis=-1) < 30
    assert blue.sum() > 300 and orange.sum() > 100


def test_a_per_step_test_adds_the_adaptation_curve(tmp_path):
    """train --per-step's curve (result.json) is drawn as a third panel, before a later evaluate
    --per-step's (evaluation.json), which is drawn where the run's own test has none."""
    classification_run(tmp_path)
    curve = {"accuracy": [0.2, 0.6, 0.7], "accuracy_ci95": [0.01, None, 0.02], "loss": [1.6, 0.9, 0.7],
             "loss_ci95": [0.1, 0.1, 0.1]}
    (tmp_path / "evaluation.json").write_text(json.dumps({"per_step": {**curve, "accuracy": [0.2, 0.65, 0.75, 0.8],
                                                                      "accuracy_ci95": [0.01] * 4}}))
    drawn = plot_run(tmp_path, dpi=80)
    assert png_size(tmp_path / "curves.png") == (1200, 320)  # 15 × 4 inches
    assert drawn["series"]["query accuracy (%): test, after k inner steps (evaluation.json)"] == (
        [0.0, 1.0, 2.0, 3.0], pytest.approx([20.0, 65.0, 75.0, 80.0]))
    (tmp_path / "result.json").write_text(json.dumps({"accuracy": 0.7, "accuracy_ci95": 0.02, "loss": 0.7,
                                                      "loss_ci95": 0.1, "per_step": curve}))
    drawn = plot_run(tmp_path, dpi=80)
    assert drawn["series"]["query accuracy (%): test, after k inner steps (result.json)"] == (
        [0.0, 1.0, 2.0], pytest.approx([20.0, 60.0, 70.0]))


def test_a_resumed_run_drops_the_lines_it_redoes(tmp_path):
    classification_run(tmp_path, iterations=12)
    MetricsFile(tmp_path / "metrics.jsonl").on_train_start(SimpleNamespace(meta_iteration=10))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 11))
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 11, "train/lo')  # a kill mid-line
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 11))


def test_plot_command_draws_a_trained_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main([*SINUSOID, "--output", str(run)]) == 0
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert "validation/loss" in rows[2] and "validation/loss" in rows[5] and "test/loss" in rows[5]
    result = json.loads((run / "result.json").read_text())
    assert rows[5]["test/loss"] == pytest.approx(result["loss"])
    assert cli.main(["plot", "--output", str(run), "--file", str(tmp_path / "out" / "c.png"), "--dpi", "40"]) == 0
    assert "written to" in capsys.readouterr().out
    assert png_size(tmp_path / "out" / "c.png") == (240, 160)  # regression: one 6 × 4 inch panel



def test_a_run_without_metrics_jsonl_is_drawn_from_its_offline_wandb_run(tmp_path):
    """A folder from before metrics.jsonl (or one copied without it) is drawn from its W&B run, which
    evaluate continued: the same lines as from metrics.jsonl."""
    run = tmp_path / "run"
    assert cli.main([*SINUSOID[:-3], "--no-progress", "--output", str(run)]) == 0  # --wandb offline
    assert cli.main(["evaluate", "--output", str(run), "--test-tasks", "3"]) == 0  # one more part of the W&B run
    from_metrics = plot_run(run, tmp_path / "a.png")
    (run / "metrics.jsonl").unlink()
    from_wandb = plot_run(run, tmp_path / "b.png")
    assert "/wandb/offline-run-" in from_wandb["source"]
    assert from_wandb["series"] == from_metrics["series"] and len(from_metrics["series"]) >= 3

def test_plot_command_bad_input_is_one_line(tmp_path, capsys):
    assert cli.main(["plot", "--output", str(tmp_path / "nowhere")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert cli.main(["plot", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no metrics.jsonl" in err and len(err.splitlines()) == 1
    classification_run(tmp_path)
    assert cli.main(["plot", "--output", str(tmp_path), "--file", str(tmp_path / "c.jpg")]) == 2
    assert "must end in .png" in capsys.readouterr().err


def test_runs_compared_in_one_figure_show_each_runs_history_and_a_table_of_results(tmp_path):
    """Two runs of the same folder name (told apart by their parents), the second one tested with its
    best θ (result.json, not in its history): each line is that run's own history, and the table
    holds each run's test result and best validation accuracy."""
    first = classification_run(tmp_path / "a" / "maml")
    second = classification_run(tmp_path / "b" / "maml", iterations=30, better_by=0.1)
    history = tmp_path / "b" / "maml" / "metrics.jsonl"
    history.write_text("".join(line + "\n" for line in history.read_text().splitlines() if '"test/' not in line))
    (tmp_path / "b" / "maml" / "result.json").write_text(json.dumps(
        {"loss": 0.3, "loss_ci95": 0.01, "accuracy": 0.8, "accuracy_ci95": None, "tasks": 1,
         "checkpoint": "best", "iteration": 20}))
    (tmp_path / "b" / "maml" / "config.json").write_text(json.dumps({"algorithm": "fomaml", "dataset": "omniglot"}))

    drawn = compare_runs([tmp_path / "a" / "maml", tmp_path / "b" / "maml", tmp_path / "a" / "maml"], dpi=80)
    assert drawn["path"] == str(tmp_path / "comparison.png") and png_size(tmp_path / "comparison.png") == (960, 320)
    series = drawn["series"]
    for name, rows in (("a/maml", first), ("b/maml", second)):
        validation = [r for r in rows if "validation/accuracy" in r]
        assert series[f"query accuracy (%): {name}: validation (95% CI)"] == (
            [r["step"] for r in validation], pytest.approx([100 * r["validation/accuracy"] for r in validation]))
        assert series[f"query loss: {name}: train"][0] == [r["step"] for r in rows if "train/loss" in r]
    assert series["query accuracy (%): a/maml: test 71.0% ± 2.1%"] == ([40.0], [pytest.approx(71.0)])
    assert series["query accuracy (%): b/maml: test 80.0% ± n/a"] == ([20.0], [pytest.approx(80.0)])

    a, b = drawn["rows"]
    assert (a["run"], a["algorithm"], a["iterations"], a["test"], a["tested"]) == ("a/maml", None, 40, 0.71, "")
    assert (a["best_validation"], a["best_validation_iteration"]) == (pytest.approx(40 / 60), 40)
    assert (b["run"], b["algorithm"], b["iterations"], b["test"], b["tested"]) == (
        "b/maml", "fomaml", 30, 0.8, "best θ, iteration 20")
    assert (b["best_validation"], b["best_validation_iteration"]) == (pytest.approx(30 / 60 + 0.1), 30)
    table = results_table(drawn["rows"]).splitlines()
    assert table[0] == ("| run | algorithm | dataset | meta-iterations | test accuracy (95% CI) | "
                        "best validation accuracy |")
    assert table[2] == "| a/maml | ? | ? | 40 | 71.0% ± 2.1% | 66.7% ± 3.0% (iteration 40) |"
    assert table[3] == "| b/maml | fomaml | omniglot | 30 | 80.0% ± n/a (best θ, iteration 20) | 60.0% ± 3.0% (iteration 30) |"


@pytest.mark.parametrize("count", [12, 25])
def test_more_than_ten_runs_compared_get_a_colour_each(tmp_path, monkeypatch, count):
    """Past matplotlib's ten default colours, each run's lines still have a colour of their own."""
    from matplotlib.colors import to_rgb

    from bilevel_maml import plots

    folders = [tmp_path / f"run{i:02d}" for i in range(count)]
    for i, folder in enumerate(folders):
        classification_run(folder, iterations=10, better_by=i / 100)
    colours = {}

    def keep_colours(figure, axes, *args):
        colours.update({line.get_gid(): to_rgb(line.get_color()) for line in axes[0][0].get_lines()
                        if (line.get_gid() or "").endswith(": train")})
        return saved(figure, axes, *args)

    saved = plots._save
    monkeypatch.setattr(plots, "_save", keep_colours)
    compare_runs(folders, dpi=40)
    assert len(colours) == count and len(set(colours.values())) == count


def test_runs_that_differ_in_their_seed_alone_are_summarised_over_seeds(tmp_path):
    """Three seeds of one setting (in folders of their own, one on another device and W&B project)
    get a row of mean ± standard deviation over seeds; a run with another meta_lr, and an untested
    run, stay out of it."""
    settings = {"algorithm": "maml", "dataset": "omniglot-small", "meta_lr": 0.001, "iterations": 40}
    tests = {"s0": 0.70, "s1": 0.74, "s2": 0.78, "lr": 0.9, "untested": None}
    for name, (seed, extra) in {"s0": (0, {}), "s1": (1, {"device": "cuda", "wandb_project": "other"}),
                                "s2": (2, {}), "lr": (3, {"meta_lr": 0.01}), "untested": (4, {})}.items():
        folder = tmp_path / name
        classification_run(folder, better_by=0.01 * seed)
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if '"test/' not in line))
        (folder / "config.json").write_text(json.dumps({**settings, "seed": seed, "output": str(folder),
                                                        "device": "cpu", "wandb_project": "p", **extra}))
        if tests[name] is not None:
            (folder / "result.json").write_text(json.dumps({"accuracy": tests[name], "accuracy_ci95": 0.01,
                                                            "loss": 0.5, "loss_ci95": 0.01, "checkpoint": "last",
                                                            "iteration": 40}))
    drawn = compare_runs([tmp_path / name for name in tests], dpi=40)
    (group,) = drawn["seed_groups"]
    assert (group["runs"], group["seeds"], group["algorithm"], group["iterations"]) == (["s0", "s1", "s2"],
                                                                                       [0, 1, 2], "maml", 40)
    assert group["test_mean"] == pytest.approx(0.74) and group["test_std"] == pytest.approx(0.04)
    best = [40 / 60 + 0.01 * seed for seed in (0, 1, 2)]  # each run's best validation accuracy
    assert group["best_validation_mean"] == pytest.approx(sum(best) / 3)
    assert group["best_validation_std"] == pytest.approx(0.01)
    table = results_table(drawn["rows"], drawn["seed_groups"]).splitlines()
    assert len(table) == 2 + 5 + 1
    assert table[-1] == ("| mean of s0, s1, s2 (seeds 0, 1, 2) | maml | omniglot-small | 40 | 74.0% ± 4.0% (std over 3 "
                         "seeds) | 67.7% ± 1.0% (std over 3 seeds) |")


def test_a_second_run_of_a_seed_is_a_repeat_not_another_seed(tmp_path):
    """Two runs of one seed (a run and its resumed twin, say) are one sample: no mean ± 0 "over 2
    seeds"; beside other seeds the repeat is named and left out of the mean and std."""
    tests = {"s0": (0, 0.70), "s0again": (0, 0.70), "s1": (1, 0.74), "t0": (0, 0.80), "t0again": (0, 0.80)}
    for name, (seed, accuracy) in tests.items():
        folder = tmp_path / name
        classification_run(folder)
        lines = (folder / "metrics.jsonl").read_text().splitlines()  # the test is result.json's
        (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if '"test/' not in line))
        (folder / "config.json").write_text(json.dumps({"algorithm": "maml", "dataset": "omniglot-small",
                                                        "iterations": 40, "seed": seed,
                                                        "meta_lr": 0.01 if name.startswith("t") else 0.001}))
        (folder / "result.json").write_text(json.dumps({"accuracy": accuracy, "accuracy_ci95": 0.01, "loss": 0.5,
                                                        "loss_ci95": 0.01, "checkpoint": "last", "iteration": 40}))
    drawn = compare_runs([tmp_path / name for name in tests], dpi=40)
    (group,) = drawn["seed_groups"]
    assert (group["runs"], group["seeds"], group["repeats"]) == (["s0", "s1"], [0, 1], {"s0again": 0})
    assert group["test_mean"] == pytest.approx(0.72) and group["test_std"] == pytest.approx(0.04 / 2 ** 0.5)
    assert results_table(drawn["rows"], drawn["seed_groups"]).splitlines()[-1].startswith(
        "| mean of s0, s1 (seeds 0, 1; s0again repeats seed 0, left out) | maml | omniglot-small | 40 | 72.0% ± 2.8% "
        "(std over 2 seeds) |")


def test_seeds_that_never_validated_are_summarised_by_their_test_alone(tmp_path, capsys):
    """--valid-every past the run's end: no best validation to average (it divided by zero)."""
    for seed in (0, 1):
        assert cli.main(["train", "--dataset", "sinusoid", "--iterations", "3", "--valid-every", "10",
                         "--test-tasks", "5", "--seed", str(seed), "--wandb", "disabled", "--no-progress",
                         "--output", str(tmp_path / f"s{seed}")]) == 0
    capsys.readouterr()
    assert cli.main(["plot", "--output", str(tmp_path / "s0"), str(tmp_path / "s1"), "--dpi", "40"]) == 0
    tests = [json.loads((tmp_path / f"s{seed}" / "result.json").read_text())["loss"] for seed in (0, 1)]
    mean, std = sum(tests) / 2, abs(tests[0] - tests[1]) / 2 ** 0.5
    assert (f"| mean of s0, s1 (seeds 0, 1) | maml | sinusoid | 3 | {mean:.3f} ± {std:.3f} (std over 2 seeds) | — |"
            in capsys.readouterr().out.splitlines())


def test_plot_command_compares_several_runs_and_refuses_runs_of_different_kinds(tmp_path, capsys):
    for name in ("maml", "fomaml"):
        assert cli.main([*SINUSOID, "--algorithm", name, "--output", str(tmp_path / name)]) == 0
    capsys.readouterr()
    assert cli.main(["plot", "--output", str(tmp_path / "maml"), str(tmp_path / "fomaml"), "--dpi", "40"]) == 0
    out = capsys.readouterr().out.splitlines()
    for name in ("maml", "fomaml"):
        result = json.loads((tmp_path / name / "result.json").read_text())
        assert any(line.startswith(f"| {name} | {name} | sinusoid | 6 | {result['loss']:.3f} ± ") for line in out)
    assert out[-1] == f"learning curves of 2 runs written to {tmp_path / 'comparison.png'}"
    assert png_size(tmp_path / "comparison.png") == (320, 160)
    classification_run(tmp_path / "images")
    assert cli.main(["plot", "--output", str(tmp_path / "maml"), str(tmp_path / "images")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("bilevel-maml plot: these runs measure different things: maml (regression), images "
                   "(classification); compare runs of one kind")
    assert cli.main(["plot", "--output", str(tmp_path / "maml"), str(tmp_path / "nowhere")]) == 2
    assert "--output '" + str(tmp_path / "nowhere") + "' is not a run folder" in capsys.readouterr().err


def test_engine_run_progress_shows_the_cli_bar(capsys):
    engine = build_engine("maml", MLP(1, 1, (8,)), SinusoidTasks(points=10), regression=True, shots=5,
                          inner_lr=0.01, meta_batch_size=2, meta_iterations=3, valid_step=100)
    before = list(engine.callbacks)
    engine.run(progress=True)
    err = capsys.readouterr().err
    assert "meta-training" in err and "3/3" in err and "loss=" in err and "tasks/s=" in err
    assert engine.callbacks == before  # the bar was for that call only
    engine.meta_iterations = 3
    engine.run()
    assert "meta-training" not in capsys.readouterr().err
