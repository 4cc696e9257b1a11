"""Markdown tables from the benchmark scripts' JSON files (for the README and docs).

    .venv/bin/python benchmarks/render_tables.py benchmarks/results/meta_iteration-cpu.json \
        benchmarks/results/equal_budget-cpu.json
"""

import json
import sys

from bilevel_maml.bench import BASELINE, algorithm_of


def meta_iteration_table(report: dict) -> str:
    rows = report["rows"]
    baseline = {(r["inner_steps"], r["query"], r["implementation"]): r["seconds"] for r in rows}
    lines = [f"Device: {report['device']}, meta-batch {report['meta_batch']}.", "",
             "| inner steps | query/class | implementation | s / meta-iteration | tasks/s | peak MB | vs learn2learn | of compute-bound limit |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        reference = BASELINE[algorithm_of(r["implementation"])]
        ratio = baseline[(r["inner_steps"], r["query"], reference)] / r["seconds"]
        lines.append(f"| {r['inner_steps']} | {r['query']} | {r['implementation']} | {r['seconds']:.3f} | "
                     f"{r['tasks_per_second']:.1f} | {r['peak_mb']:.0f} | {ratio:.2f}× | "
                     f"{r['limit_seconds'] / r['seconds']:.0%} |")
    if report.get("memory"):
        lines += ["", "| implementation | inner steps | peak MB |", "|---|---:|---:|"]
        lines += [f"| {m['implementation']} | {m['inner_steps']} | {m['peak_mb']:.0f} |" for m in report["memory"]]
    return "\n".join(lines)


def equal_budget_table(report: dict) -> str:
    settings = report["settings"]
    lines = [f"Budget {settings['budget_minutes']:g} min each, meta-batch {settings['meta_batch_size']}, "
             f"{settings['inner_steps']} inner step(s), {settings['test_tasks']} test tasks.", "",
             "| learner | meta-iterations | tasks/s | held-out accuracy |", "|---|---:|---:|---:|"]
    lines += [f"| {r['learner']} | {r['meta_iterations']} | {r['tasks_per_second']:.1f} | "
              f"{100 * r['accuracy']:.2f}% ± {100 * r['accuracy_ci95']:.2f}% |" for r in report["results"]]
    return "\n".join(lines)


def main(paths):
    for path in paths:
        report = json.load(open(path))
        print(meta_iteration_table(report) if "rows" in report else equal_budget_table(report))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
