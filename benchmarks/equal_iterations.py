"""Held-out accuracy after the same number of meta-iterations: one algorithm against another (MAML++ vs MAML, say).

An algorithm of your own is compared the same way: ``--plugin examples.protomaml --algorithms maml protomaml``
(from the repository's root).

Same data (the real Omniglot small subsets: meta-train on small1's characters, test on small2's characters
absent from small1), same model (conv4), same hyperparameters, same precision, same seed and the same 600 test
tasks for every algorithm; each algorithm's own options at their defaults. Reports the mean accuracy with its 95%
confidence interval over test tasks; nothing is asserted.

    .venv/bin/python benchmarks/equal_iterations.py --algorithms maml maml++ --iterations 300 --inner-steps 2 \\
        --json benchmarks/results/equal_iterations-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bilevel_maml import ALGORITHMS, build_engine
from bilevel_maml.allocator import keep_freed_memory
from bilevel_maml.arguments import (OneLineParser, device_name, non_negative_int, plugins_named, positive_float,
                                    positive_int)
from bilevel_maml.cli import run_script
from bilevel_maml.data import omniglot_small_tasksets
from bilevel_maml.execution import PRECISIONS, check_precision
from bilevel_maml.models import build_model
from bilevel_maml.plugins import load_entry_points, load_plugin


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    load_entry_points()
    for module in plugins_named(argv):  # first: the algorithms they register are choices of --algorithms
        load_plugin(module)
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                        help="import MODULE first, a module that registers an algorithm of your own "
                             "(examples.protomaml, say); repeatable")
    parser.add_argument("--algorithms", nargs="+", choices=sorted(ALGORITHMS), default=["maml", "maml++"])
    parser.add_argument("--data-root", default="../shared/data/omniglot-small")
    parser.add_argument("--iterations", type=positive_int, default=300, help="meta-iterations of every algorithm")
    parser.add_argument("--inner-steps", type=positive_int, default=2)
    parser.add_argument("--inner-lr", type=positive_float, default=0.4)
    parser.add_argument("--meta-lr", type=positive_float, default=1e-3)
    parser.add_argument("--meta-batch-size", type=positive_int, default=8)
    parser.add_argument("--width", type=positive_int, default=64, help="conv4 filters")
    parser.add_argument("--test-tasks", type=positive_int, default=600)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="of every algorithm, training and test (default: tf32 on CUDA, fp32 on CPU)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.precision = check_precision(args.precision, args.device)
    keep_freed_memory()
    tasksets = omniglot_small_tasksets(args.data_root, ways=5, samples_per_class=2)
    rows = []
    for algorithm in args.algorithms:
        torch.manual_seed(args.seed)
        engine = build_engine(
            algorithm, build_model("conv4", 5, width=args.width), tasksets, ways=5, shots=1, query_shots=1,
            inner_steps=args.inner_steps, inner_lr=args.inner_lr, meta_lr=args.meta_lr,
            meta_batch_size=args.meta_batch_size, meta_iterations=args.iterations, valid_step=args.iterations,
            valid_tasks=100, seed=args.seed, device=args.device, precision=args.precision)
        started = time.perf_counter()
        engine.run()
        seconds = time.perf_counter() - started
        result = engine.test(args.test_tasks)
        rows.append({"algorithm": algorithm, "accuracy": result["accuracy"], "accuracy_ci95": result["accuracy_ci95"],
                     "training_seconds": seconds})
        print(f"{algorithm:>10}: {100 * result['accuracy']:.1f}% ± {100 * result['accuracy_ci95']:.1f}% "
              f"after {args.iterations} meta-iterations ({seconds:.0f} s of training)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"kind": "equal_iterations", "settings": vars(args), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    run_script(lambda: main(sys.argv[1:]))
