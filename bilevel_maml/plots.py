"""Learning curves of a run folder as a PNG: ``bilevel-maml plot --output RUN``; several runs
compared in one figure, with a table of their results: ``bilevel-maml plot --output RUN RUN ...``.

Read from the run's ``metrics.jsonl`` (written by ``train`` and ``resume`` whatever ``--wandb`` says),
else from its offline W&B run; the test point from the same history, else ``result.json``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from bilevel_maml.history import METRICS_FILE, RUN_PLACEMENT_KEYS, read_metrics

PLOT_FILE = "curves.png"
#: what ``bilevel-maml plot`` with several runs writes, in their common parent folder
COMPARISON_FILE = "comparison.png"


def run_history(run_folder) -> tuple[list[dict], str]:
    """The per-step metric rows of a run folder and the file they came from.

    :param run_folder: a folder written by ``bilevel-maml train``.
    """
    folder = Path(run_folder)
    metrics = folder / METRICS_FILE
    if metrics.is_file():
        return read_metrics(metrics), str(metrics)
    offline = sorted((folder / "wandb").glob("offline-run-*"))
    if offline:
        from bilevel_maml.logging import read_offline_run

        rows = read_offline_run(offline[-1])["history"]
        return [{"step": row["_step"], **row} for row in rows if "_step" in row], str(offline[-1])
    raise FileNotFoundError(f"{folder} holds no {METRICS_FILE} and no offline W&B run (wandb/offline-run-*); "
                            f"pass the folder of a `bilevel-maml train` run")


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_run(run_folder, path=None, dpi: int = 120) -> dict:
    """Write the learning curves of ``run_folder`` to ``path`` (default ``<run folder>/curves.png``).

    One panel per metric (query loss, and accuracy for classification): the training value of every
    meta-iteration (faint) and its moving average, the validation mean with its 95% confidence band,
    and the test result of the final θ as a point with its interval. Where the run's test (or its
    ``evaluate``) was run with ``--per-step``, one more panel: the test accuracy (or loss) after 0,
    1, ... inner steps, with their intervals.

    :param run_folder: a folder written by ``bilevel-maml train`` (or ``resume``).
    :param path: the PNG to write; its folder is created if missing.
    :param dpi: dots per inch of the PNG (the figure is 10 × 4 inches, 6 × 4 for regression; 5
        inches wider with the per-step panel).
    :returns: ``{"path": the PNG, "source": the history file read, "series": {label: (x, y)}}``,
        the data of every drawn line read back from the figure.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters
    import matplotlib.pyplot as plt

    folder = Path(run_folder)
    rows, source = run_history(folder)
    test, tested = _test_point(folder, rows, source)
    metrics = _metrics(rows)
    config = _config(folder)
    title = f"{config.get('algorithm')} on {config.get('dataset')} — {folder.name}" if config else folder.name

    curve, curve_source = _adaptation_curve(folder)
    panels = len(metrics) + (curve is not None)
    width = (10 if len(metrics) == 2 else 6) + (5 if curve is not None else 0)
    figure, axes = plt.subplots(1, panels, figsize=(width, 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        scale = _percent_scale(metric)
        steps, values = _series(rows, f"train/{metric}")
        values = [scale * v for v in values]
        window = max(1, len(values) // 25)
        if window > 1:
            axis.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8, label=f"train {metric}")
        axis.plot(steps, _moving_average(values, window), color="tab:blue", linewidth=1.6,
                  label=f"train, mean of {window}" if window > 1 else f"train {metric}")
        _draw_validation(axis, rows, metric, scale, "tab:orange", "validation (95% CI)", band=0.25, width=1.5)
        if test is not None and test.get(f"test/{metric}") is not None:
            value, half = _scaled(test, f"test/{metric}", scale)
            _draw_test_points(axis, [test["step"]], [value], [half], "tab:red",
                              f"test{tested}: {_shown(metric, value, half)}")
        _label_axes(axis, metric)
    if curve is not None:
        metric = metrics[-1]
        scale = _percent_scale(metric)
        axis = axes[0][-1]
        means = [scale * value for value in curve[metric]]
        halves = [scale * half if half is not None else math.nan for half in curve[f"{metric}_ci95"]]
        _draw_test_points(axis, range(len(means)), means, halves, "tab:red",
                          f"test, after k inner steps ({curve_source})")
        _label_axes(axis, metric)
        axis.set_xlabel("inner steps on the support set (0: θ itself)")
        axis.set_xticks(range(len(means)))
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, axes, plt, Path(path) if path is not None else folder / PLOT_FILE, dpi, {"source": source})


def _adaptation_curve(folder: Path) -> tuple[dict | None, str]:
    """The scores after 0, 1, ... inner steps of the run's final test (``train --per-step``), else
    of its latest ``evaluate --per-step``, and the file they came from."""
    for name in ("result.json", "evaluation.json"):
        curve = _read_json(folder / name).get("per_step")
        if curve:
            return curve, name
    return None, ""


def compare_runs(run_folders, path=None, dpi: int = 120) -> dict:
    """Write one figure comparing several runs to ``path`` (default ``comparison.png`` in their
    common parent folder) and return a row of results per run.

    One panel per metric (query loss, and accuracy for classification), one colour per run: its
    validation mean with the 95% confidence band, the moving average of its training value (thin),
    and the test result of its final θ as a point with its interval. Runs are named by their
    folders (with the parent folders that tell apart two of the same name).

    :param run_folders: folders written by ``bilevel-maml train`` (or ``resume``), all
        classification or all regression.
    :param path: the PNG to write; its folder is created if missing.
    :param dpi: dots per inch of the PNG (the figure is 12 × 4 inches, 8 × 4 for regression).
    :returns: ``{"path": the PNG, "sources": {run: history file}, "series": {label: (x, y)}, "rows":
        [{"run", "algorithm", "dataset", "iterations", "metric", "test", "test_ci95", "tested",
        "best_validation", "best_validation_ci95", "best_validation_iteration"}, ...]}``: the drawn
        lines read back from the figure and the results table, one row per run (``metric`` is
        ``"accuracy"`` for classification and ``"loss"`` for regression; None where a run has no
        such result yet); and ``"seed_groups"``: for each set of two or more tested runs whose
        config.json differ in the seed alone (and where they ran), ``{"runs", "seeds", "repeats",
        "algorithm", "dataset", "iterations", "metric", "test_mean", "test_std",
        "best_validation_mean", "best_validation_std"}`` over those seeds (a mean is None where no
        run of the group has that result); a run whose seed an earlier run of the group has is a
        repeat of it, in ``repeats`` (``{run: seed}``) and left out of the mean (two runs of one seed
        make no group).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folders = list(dict.fromkeys(Path(folder).resolve() for folder in run_folders))
    if len(folders) < 2:
        raise ValueError(f"compare_runs needs two or more run folders, got {len(folders)}")
    runs = [_Run.read(folder, name) for folder, name in zip(folders, _run_names(folders))]
    kinds = {run.name: "classification" if "accuracy" in run.metrics else "regression" for run in runs}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{name} ({kind})" for name, kind in kinds.items())
        raise ValueError(f"these runs measure different things: {listed}; compare runs of one kind")
    metrics = runs[0].metrics

    from matplotlib.lines import Line2D

    figure, axes = plt.subplots(1, len(metrics), figsize=(12 if len(metrics) == 2 else 8, 4), squeeze=False)
    named = {run.name: run.name for run in runs}  # the legend's entry of each run: its name and last test result
    colours = _run_colours(len(runs))
    for axis, metric in zip(axes[0], metrics):
        scale = _percent_scale(metric)
        for run, colour in zip(runs, colours):
            steps, values = _series(run.rows, f"train/{metric}")
            window = max(1, len(values) // 25)
            trained, = axis.plot(steps, _moving_average([scale * v for v in values], window), color=colour,
                                 linewidth=0.9, alpha=0.6)
            trained.set_gid(f"{run.name}: train")
            _draw_validation(axis, run.rows, metric, scale, colour, f"{run.name}: validation (95% CI)", band=0.15,
                             width=1.8, in_legend=False)
            if run.test is not None and run.test.get(f"test/{metric}") is not None:
                value, half = _scaled(run.test, f"test/{metric}", scale)
                named[run.name] = f"{run.name}: test {_shown(metric, value, half)}"
                _draw_test_points(axis, [run.test["step"]], [value], [half], colour, named[run.name], in_legend=False)
        _label_axes(axis, metric, legend=False)
    # one legend for the figure: a colour per run, then what each mark means
    handles = [Line2D([], [], color=colour, linewidth=2.5, label=named[run.name]) for run, colour in zip(runs, colours)]
    handles += [Line2D([], [], color="grey", linewidth=0.9, alpha=0.6, label="train (moving mean)"),
                Line2D([], [], color="grey", linewidth=1.8, marker="o", markersize=3, label="validation (95% CI)"),
                Line2D([], [], color="grey", linestyle="none", marker="s", label="test (95% CI)")]
    figure.suptitle(" vs ".join(run.name for run in runs), fontsize=10)
    plotted = 0.76 if len(metrics) == 2 else 0.66  # of the width; the legend takes the rest
    figure.tight_layout(rect=(0, 0, plotted, 1))
    figure.legend(handles=handles, loc="center left", bbox_to_anchor=(plotted, 0.5), fontsize=8, frameon=False)
    target = Path(path) if path is not None else Path(os.path.commonpath(folders)) / COMPARISON_FILE
    drawn = _save(figure, axes, plt, target, dpi, {"sources": {run.name: run.source for run in runs}})
    drawn["rows"] = [run.summary(metrics[-1]) for run in runs]
    drawn["seed_groups"] = _seed_groups(runs, drawn["rows"])
    return drawn


def _seed_groups(runs: list[_Run], rows: list[dict]) -> list[dict]:
    """The runs that differ in their seed alone (and where they ran), two or more to a group, with
    the mean and standard deviation over seeds of their test and best validation results."""
    settings = {}
    for run, row in zip(runs, rows):
        if run.config and row["test"] is not None:
            key = json.dumps({k: v for k, v in run.config.items() if k not in RUN_PLACEMENT_KEYS | {"seed"}},
                             sort_keys=True, default=str)
            settings.setdefault(key, []).append((run.config.get("seed"), row))
    groups = []
    for listed in settings.values():
        # a second run of a seed repeats the first (the same tasks and θ), so it is not another sample
        members, repeats, seen = [], [], set()
        for seed, row in listed:
            (repeats if seed in seen else members).append((seed, row))
            seen.add(seed)
        if len(members) < 2:
            continue
        first = members[0][1]
        group = {"runs": [row["run"] for _, row in members], "seeds": [seed for seed, _ in members],
                 "repeats": {row["run"]: seed for seed, row in repeats},
                 **{key: first[key] for key in ("algorithm", "dataset", "iterations", "metric")}}
        for key in ("test", "best_validation"):  # a run validated never (--valid-every past its end) has no best
            values = [row[key] for _, row in members if row[key] is not None]
            mean = sum(values) / len(values) if values else None
            group[f"{key}_mean"] = mean
            group[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) \
                if len(values) > 1 else math.nan
        groups.append(group)
    return groups


def results_table(rows: list[dict], seed_groups: list[dict] = ()) -> str:
    """The rows of :func:`compare_runs` as a Markdown table (accuracies in %), then a row per group
    of runs that differ in their seed alone: the mean ± standard deviation over those seeds.

    :param rows: ``compare_runs(...)["rows"]``.
    :param seed_groups: ``compare_runs(...)["seed_groups"]``.
    """
    unit = "accuracy" if rows[0]["metric"] == "accuracy" else "MSE"
    lines = [f"| run | algorithm | dataset | meta-iterations | test {unit} (95% CI) | best validation {unit} |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        scale = _percent_scale(row["metric"])
        test = "—" if row["test"] is None else _shown(row["metric"], *_scaled(row, "test", scale))
        if row["test"] is not None and row["tested"]:
            test += f" ({row['tested']})"
        best = "—" if row["best_validation"] is None else (
            f"{_shown(row['metric'], *_scaled(row, 'best_validation', scale))} (iteration {row['best_validation_iteration']})")
        lines.append(f"| {row['run']} | {row['algorithm'] or '?'} | {row['dataset'] or '?'} | {row['iterations']} | "
                     f"{test} | {best} |")
    for group in seed_groups:
        scale = _percent_scale(group["metric"])
        over = f"std over {len(group['runs'])} seeds"
        test, best = ("—" if group[f"{key}_mean"] is None else
                      f"{_shown(group['metric'], scale * group[f'{key}_mean'], scale * group[f'{key}_std'])} ({over})"
                      for key in ("test", "best_validation"))
        repeats = "".join(f"; {run} repeats seed {seed}, left out" for run, seed in group.get("repeats", {}).items())
        lines.append(f"| mean of {', '.join(group['runs'])} (seeds {', '.join(map(str, group['seeds']))}{repeats}) | "
                     f"{group['algorithm']} | {group['dataset']} | {group['iterations']} | {test} | {best} |")
    return "\n".join(lines)


def _percent_scale(metric: str) -> float:
    """Accuracies are drawn and tabulated in percent; losses as they are."""
    return 100.0 if metric == "accuracy" else 1.0


def _scaled(row: dict, key: str, scale: float) -> tuple[float, float]:
    """``row[key]`` and its 95% half-width (NaN where there is none: a single task) times ``scale``."""
    half = row.get(f"{key}_ci95")
    return scale * row[key], scale * half if half is not None else math.nan


@dataclass
class _Run:
    """One run folder's history, as :func:`compare_runs` draws and tabulates it."""

    folder: Path
    name: str
    rows: list[dict]
    source: str
    test: dict | None
    tested: str
    config: dict

    @classmethod
    def read(cls, folder: Path, name: str) -> _Run:
        rows, source = run_history(folder)
        return cls(folder, name, rows, source, *_test_point(folder, rows, source), _config(folder))

    @property
    def metrics(self) -> list[str]:
        return _metrics(self.rows)

    def summary(self, metric: str) -> dict:
        validation = [(row[f"validation/{metric}"], row["step"], row.get(f"validation/{metric}_ci95"))
                      for row in self.rows if row.get(f"validation/{metric}") is not None]
        better = max if metric == "accuracy" else min
        best = better(validation, key=lambda entry: entry[0]) if validation else (None, None, None)
        trained = [row["step"] for row in self.rows if any(key.startswith("train/") for key in row)]
        test = self.test or {}
        return {"run": self.name, "algorithm": self.config.get("algorithm"), "dataset": self.config.get("dataset"),
                "iterations": max(trained), "metric": metric, "test": test.get(f"test/{metric}"),
                "test_ci95": test.get(f"test/{metric}_ci95"), "tested": self.tested.strip(" ()"),
                "best_validation": best[0], "best_validation_ci95": best[2], "best_validation_iteration": best[1]}


def _run_names(folders: list[Path]) -> list[str]:
    """Each folder's name, with as many parent folders as tell apart two of the same name."""
    depth = 1
    while True:
        names = ["/".join(folder.parts[-depth:]) for folder in folders]
        if len(set(names)) == len(names) or depth >= max(len(folder.parts) for folder in folders):
            return names
        depth += 1


def _config(folder: Path) -> dict:
    return _read_json(folder / "config.json")


def _read_json(file: Path) -> dict:
    """The file's JSON object; empty where the run has no such file (yet)."""
    return json.loads(file.read_text()) if file.is_file() else {}


def _metrics(rows: list[dict]) -> list[str]:
    return ["loss"] + (["accuracy"] if any("train/accuracy" in row for row in rows) else [])


def _test_point(folder: Path, rows: list[dict], source: str) -> tuple[dict | None, str]:
    """The run's test result as a history row (from its history, else ``result.json``) and which θ
    it tested, in words for a label."""
    if not any(key.startswith("train/") for row in rows for key in row):
        raise ValueError(f"{source} holds no training metrics yet; plot a run that has run meta-iterations")
    result = _read_json(folder / "result.json")
    test = next((row for row in reversed(rows) if "test/loss" in row), None)
    if test is None and result:
        test = {"step": result.get("iteration"), **{f"test/{k}": v for k, v in result.items()}}
    tested = f" (best θ, iteration {result.get('iteration')})" if result.get("checkpoint") == "best" else ""
    return test, tested


def _shown(metric: str, value: float, half: float) -> str:
    if metric == "accuracy":
        return f"{value:.1f}% ± {half:.1f}%" if math.isfinite(half) else f"{value:.1f}% ± n/a"
    return f"{value:.3f} ± {half:.3f}" if math.isfinite(half) else f"{value:.3f} ± n/a"


def _run_colours(count: int) -> list:
    """A distinct colour for each of ``count`` runs: matplotlib's ten default colours, which repeat
    after ten; then tab20 (its dark shades first, so neighbours differ in hue); past twenty, turbo."""
    import matplotlib

    if count <= 10:
        return [f"C{i}" for i in range(count)]
    if count <= 20:
        shades = matplotlib.colormaps["tab20"].colors
        return [*shades[0::2], *shades[1::2]][:count]
    turbo = matplotlib.colormaps["turbo"]
    return [turbo(0.05 + 0.9 * i / (count - 1)) for i in range(count)]


def _draw_validation(axis, rows: list[dict], metric: str, scale: float, colour: str, label: str, band: float,
                     width: float, in_legend: bool = True) -> None:
    """The validation means with their 95% confidence band (none where a half-width is missing),
    named ``label`` in the legend, or only for the read-back."""
    steps, means = _series(rows, f"validation/{metric}")
    if not steps:
        return
    _, halves = _series(rows, f"validation/{metric}_ci95")
    means = [scale * v for v in means]
    halves = [scale * v for v in halves] if len(halves) == len(means) else [0.0] * len(means)
    axis.fill_between(steps, [m - h for m, h in zip(means, halves)], [m + h for m, h in zip(means, halves)],
                      color=colour, alpha=band, linewidth=0)
    line, = axis.plot(steps, means, color=colour, marker="o", markersize=3, linewidth=width,
                      label=label if in_legend else None)
    line.set_gid(label)


def _draw_test_points(axis, steps, values: list[float], halves: list[float], colour: str, label: str,
                      in_legend: bool = True) -> None:
    """Test results as squares with their 95% intervals (none where a half-width is NaN)."""
    drawn = axis.errorbar(list(steps), values, yerr=[half if math.isfinite(half) else 0.0 for half in halves],
                          color=colour, marker="s", capsize=4, label=label if in_legend else None)
    drawn.lines[0].set_gid(label)  # the points' own line is unlabelled: name it for the read-back


def _label_axes(axis, metric: str, legend: bool = True) -> None:
    axis.set_xlabel("meta-iteration")
    axis.set_ylabel("query accuracy (%)" if metric == "accuracy" else "query loss")
    axis.grid(alpha=0.3)
    if legend:
        axis.legend(fontsize=8)


def _save(figure, axes, plt, target: Path, dpi: int, extra: dict) -> dict:
    """Write the figure (laid out already); the data of every named line, read back from it."""
    series = {f"{axis.get_ylabel()}: {line.get_gid() or line.get_label()}": (
                  list(map(float, line.get_xdata())), list(map(float, line.get_ydata())))
              for axis in axes[0] for line in axis.get_lines()
              if line.get_gid() or not line.get_label().startswith("_")}
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=dpi)
    plt.close(figure)
    return {"path": str(target), **extra, "series": series}


__all__ = ["COMPARISON_FILE", "PLOT_FILE", "compare_runs", "plot_run", "results_table", "run_history"]
