"""Markdown tables from the benchmark scripts' JSON files (for the README and docs).

    .venv/bin/python benchmarks/render_tables.py benchmarks/results/meta_iteration-cpu.json \
        benchmarks/results/equal_budget-cpu.json
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from implementations import BASELINE, algorithm_of  # noqa: E402

from bilevel_maml.cli import run_script  # noqa: E402


def _mb(value) -> str:
    return "—" if value is None else f"{value:.0f}"


def meta_iteration_table(report: dict) -> str:
    rows = report["rows"]
    baseline = {(r["inner_steps"], r["query"], r["implementation"]): r["seconds"] for r in rows}
    model = f", model {report['model']}" if "model" in report else ""
    named = f" ({report['device_name']})" if report.get("device_name") else ""
    precision = f", precision {report['precision']}" if "precision" in report else ""
    lines = [f"Device: {report['device']}{named}{model}, meta-batch {report['meta_batch']}{precision}.", ""]
    lines += [f"Note: {note}." for note in report.get("notes", [])]
    if rows:
        lines += ["" if report.get("notes") else None,
                  "| inner steps | query/class | implementation | s / meta-iteration | tasks/s | peak MB | vs learn2learn | of compute-bound limit |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|"]
        lines = [line for line in lines if line is not None]
    for r in rows:
        reference = baseline.get((r["inner_steps"], r["query"], BASELINE[algorithm_of(r["implementation"])]))
        ratio = f"{reference / r['seconds']:.2f}×" if reference else "—"
        seconds = f"{r['seconds']:.3f}" if r["seconds"] >= 0.1 else f"{r['seconds']:.4f}"
        lines.append(f"| {r['inner_steps']} | {r['query']} | {r['implementation']} | {seconds} | "
                     f"{r['tasks_per_second']:.1f} | {_mb(r['peak_mb'])} | {ratio} | "
                     f"{r['limit_seconds'] / r['seconds']:.0%} |")
    profiled = [r for r in rows if r.get("seconds_by_layer")]
    if profiled:
        kinds = list(profiled[0]["seconds_by_layer"])
        lines += ["", "Share of one profiled meta-iteration by layer type (`--breakdown`):", "",
                  "| inner steps | query/class | implementation | " + " | ".join(kinds) + " |",
                  "|---:|---:|---|" + "---:|" * len(kinds)]
        for r in profiled:
            total = sum(r["seconds_by_layer"].values())
            lines.append(f"| {r['inner_steps']} | {r['query']} | {r['implementation']} | "
                         + " | ".join(f"{r['seconds_by_layer'][k] / total:.0%}" for k in kinds) + " |")
    if report.get("memory"):
        lines += ["", "| implementation | inner steps | peak MB |", "|---|---:|---:|"]
        lines += [f"| {m['implementation']} | {m['inner_steps']} | {m['peak_mb']:.0f} |" for m in report["memory"]]
    if report.get("end_to_end"):
        lines += ["", "End to end (tasks drawn from the Omniglot subsets, meta-step, statistics read back):", "",
                  "| inner steps | setup | s / meta-iteration | tasks/s |", "|---:|---|---:|---:|"]
        lines += [f"| {r['inner_steps']} | {r['setup']} | {r['seconds']:.4f} | {r['tasks_per_second']:.0f} |"
                  for r in report["end_to_end"]]
    if report.get("evaluation"):
        lines += ["", "Evaluation on held-out tasks:", "",
                  "| inner steps | setup | tasks | seconds | tasks per call |", "|---:|---|---:|---:|---:|"]
        lines += [f"| {r['inner_steps']} | {r['setup']} | {r['tasks']} | {r['seconds']:.2f} | {r['tasks_per_call']} |"
                  for r in report["evaluation"]]
    if report.get("sampling"):
        lines += ["", f"Drawing one meta-batch of {report['sampling'][0]['tasks']} tasks:", "",
                  "| sampler | ms |", "|---|---:|"]
        lines += [f"| {r['sampler']} | {r['milliseconds']:.2f} |" for r in report["sampling"]]
    if report.get("replay_check"):
        lines += ["", "The host's part of a replayed (captured) meta-iteration:", "",
                  "| measured | µs |", "|---|---:|"]
        lines += [f"| {r['measured']} | {r['microseconds']:.1f} |" for r in report["replay_check"]]
    return "\n".join(lines)


def equal_budget_table(report: dict) -> str:
    settings = report["settings"]
    inner = f" of {settings['inner_lr']:g}, iMAML λ {settings['lam']:g}" if "inner_lr" in settings else ""
    model = f", model {settings['model']}" if "model" in settings else ""
    where = f", device {settings['device']}, precision {settings['precision']}" if "precision" in settings else ""
    execution = all("execution" in r for r in report["results"])
    run_as = "meta-iteration | " if execution else ""
    lines = [f"Budget {settings['budget_minutes']:g} min each{model}, meta-batch {settings['meta_batch_size']}, "
             f"{settings['inner_steps']} inner step(s){inner}, {settings['test_tasks']} test tasks{where}.", "",
             f"| learner | {run_as}meta-iterations | tasks/s | held-out accuracy |",
             "|---|" + ("---|" if execution else "") + "---:|---:|---:|"]
    lines += [f"| {r['learner']} | " + (f"{r['execution']} | " if execution else "") + f"{r['meta_iterations']} | "
              f"{r['tasks_per_second']:.1f} | {100 * r['accuracy']:.2f}% ± {100 * r['accuracy_ci95']:.2f}% |"
              for r in report["results"]]
    return "\n".join(lines)


def scaling_table(report: dict) -> str:
    settings, rows = report["settings"], report["rows"]
    lines = [f"{settings['algorithm']}, global meta-batch {settings['meta_batch_size']}, "
             f"{settings['inner_steps']} inner step(s), {settings['query']} query/class, device {settings['device']}"
             + (f", precision {settings['precision']}" if "precision" in settings else "")
             + f"; median of {settings['iterations']} meta-iterations after {settings['warmup']} warm-up.", ""]
    execution = all("execution" in r for r in rows)  # older JSON has neither column
    lines += ["| processes | threads each | backend | tasks per rank |" + (" execution |" if execution else "")
              + " s / meta-iteration | tasks/s | vs 1 process |",
              "|---:|---:|---|---:|" + ("---|" if execution else "") + "---:|---:|---:|"]
    base = rows[0]["tasks_per_second"]
    lines += [f"| {r['processes']} | {r['threads_per_process']} | {r['backend']} | {r['tasks_per_rank']} | "
              + (f"{r['execution']} | " if execution else "")
              + f"{r['seconds_per_iteration']:.3f} | {r['tasks_per_second']:.1f} | {r['tasks_per_second'] / base:.2f}× |"
              for r in rows]
    return "\n".join(lines)


def equal_iterations_table(report: dict) -> str:
    settings = report["settings"]
    lines = [f"{settings['iterations']} meta-iterations of {settings['meta_batch_size']} tasks each, conv4 with "
             f"{settings['width']} filters, {settings['inner_steps']} inner step(s) of {settings['inner_lr']:g}, "
             f"outer lr {settings['meta_lr']:g}, seed {settings['seed']}, device {settings['device']}, "
             + (f"precision {settings['precision']}, " if "precision" in settings else "")
             + f"{settings['test_tasks']} test tasks.", "",
             "| algorithm | held-out accuracy | training time |", "|---|---:|---:|"]
    lines += [f"| {r['algorithm']} | {100 * r['accuracy']:.1f}% ± {100 * r['accuracy_ci95']:.1f}% | "
              f"{r['training_seconds']:.0f} s |" for r in report["rows"]]
    return "\n".join(lines)


def render(report: dict) -> str:
    kind = report.get("kind") or ("meta_iteration" if "rows" in report else "equal_budget")
    return {"meta_iteration": meta_iteration_table, "equal_budget": equal_budget_table, "scaling": scaling_table,
            "equal_iterations": equal_iterations_table}[kind](report)


def main(paths):
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON ({error}); pass the --json file of a benchmark script") from None
        print(render(report))
        print()


if __name__ == "__main__":
    run_script(lambda: main(sys.argv[1:]))
