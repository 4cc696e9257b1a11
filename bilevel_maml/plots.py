"""Learning curves of a run folder as a PNG: ``bilevel-maml plot --output RUN``.

Read from the run's ``metrics.jsonl`` (written by ``train`` and ``resume`` whatever ``--wandb`` says),
else from its offline W&B run; the test point from the same history, else ``result.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from bilevel_maml.history import METRICS_FILE, read_metrics

PLOT_FILE = "curves.png"


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
    and the test result of the final θ as a point with its interval.

    :param run_folder: a folder written by ``bilevel-maml train`` (or ``resume``).
    :param path: the PNG to write; its folder is created if missing.
    :param dpi: dots per inch of the PNG (the figure is 10 × 4 inches, 6 × 4 for regression).
    :returns: ``{"path": the PNG, "source": the history file read, "series": {label: (x, y)}}``,
        the data of every drawn line read back from the figure.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters
    import matplotlib.pyplot as plt

    folder = Path(run_folder)
    rows, source = run_history(folder)
    if not any(key.startswith("train/") for row in rows for key in row):
        raise ValueError(f"{source} holds no training metrics yet; plot a run that has run meta-iterations")
    result = json.loads((folder / "result.json").read_text()) if (folder / "result.json").is_file() else {}
    test = next((row for row in reversed(rows) if "test/loss" in row), None)
    if test is None and result:
        test = {"step": result.get("iteration"), **{f"test/{k}": v for k, v in result.items()}}
    tested = f" (best θ, iteration {result.get('iteration')})" if result.get("checkpoint") == "best" else ""
    metrics = ["loss"] + (["accuracy"] if any("train/accuracy" in row for row in rows) else [])
    config = folder / "config.json"
    title = folder.name
    if config.is_file():
        c = json.loads(config.read_text())
        title = f"{c.get('algorithm')} on {c.get('dataset')} — {folder.name}"

    figure, axes = plt.subplots(1, len(metrics), figsize=(10 if len(metrics) == 2 else 6, 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        scale = 100.0 if metric == "accuracy" else 1.0
        steps, values = _series(rows, f"train/{metric}")
        values = [scale * v for v in values]
        window = max(1, len(values) // 25)
        if window > 1:
            axis.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8, label=f"train {metric}")
        axis.plot(steps, _moving_average(values, window), color="tab:blue", linewidth=1.6,
                  label=f"train, mean of {window}" if window > 1 else f"train {metric}")
        steps, means = _series(rows, f"validation/{metric}")
        if steps:
            _, halves = _series(rows, f"validation/{metric}_ci95")
            means = [scale * v for v in means]
            halves = [scale * v for v in halves] if len(halves) == len(means) else [0.0] * len(means)
            axis.fill_between(steps, [m - h for m, h in zip(means, halves)], [m + h for m, h in zip(means, halves)],
                              color="tab:orange", alpha=0.25, linewidth=0)
            axis.plot(steps, means, color="tab:orange", marker="o", markersize=3, label="validation (95% CI)")
        if test is not None and test.get(f"test/{metric}") is not None:
            value, half = scale * test[f"test/{metric}"], scale * (test.get(f"test/{metric}_ci95") or 0.0)
            shown = f"{value:.1f}% ± {half:.1f}%" if metric == "accuracy" else f"{value:.3f} ± {half:.3f}"
            drawn = axis.errorbar([test["step"]], [value], yerr=[half], color="tab:red", marker="s", capsize=4,
                                  label=f"test{tested}: {shown}")
            drawn.lines[0].set_gid(drawn.get_label())  # the point's own line is unlabelled: name it for the read-back
        axis.set_xlabel("meta-iteration")
        axis.set_ylabel("query accuracy (%)" if metric == "accuracy" else "query loss")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    series = {f"{axis.get_ylabel()}: {line.get_gid() or line.get_label()}": (
                  list(map(float, line.get_xdata())), list(map(float, line.get_ydata())))
              for axis in axes[0] for line in axis.get_lines()
              if line.get_gid() or not line.get_label().startswith("_")}
    target = Path(path) if path is not None else folder / PLOT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=dpi)
    plt.close(figure)
    return {"path": str(target), "source": source, "series": series}


__all__ = ["PLOT_FILE", "plot_run", "run_history"]
