"""Held-out accuracy after the same wall-clock budget: ours (MAML, FOMAML, iMAML) vs learn2learn MAML.

Same data (the real Omniglot small subsets: meta-train on small1's characters, test on small2's
characters absent from small1), same model (conv4, 64 filters; ``--model conv4-strided`` for Finn et al.'s
Omniglot network), same hyperparameters (5-way 1-shot,
1 query per class, inner SGD step 0.4, Adam 1e-3, meta-batch 32, the same number of inner steps),
the same task distribution and the same 600 test tasks. Each learner draws its training tasks its
own way (learn2learn through its Taskset on the CPU; ours with ``--sampler``, by default held on
``--device``), trains until its budget is spent, then is scored on one shared held-out task stream
with the MAML adaptation rule (iMAML adapts with its proximal term).

    .venv/bin/python benchmarks/equal_budget.py --inner-steps 5 --json benchmarks/results/equal_budget-cpu.json

``--inner-lr`` and ``--lam`` change the shared settings; ``--learners`` runs a subset (e.g. iMAML with its
own settings, compared against an earlier run's learn2learn row). ``--precision`` holds for every learner,
training and test, and is stated in the output and the JSON, with how each ran its meta-iterations (on
CUDA ours replays a CUDA graph where it works, unless ``--no-cuda-graph``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BENCHMARK_MODELS, sync  # noqa: E402

from bilevel_maml import build_engine
from bilevel_maml.allocator import keep_freed_memory
from bilevel_maml.arguments import OneLineParser, device_name, non_negative_int, positive_float, positive_int
from bilevel_maml.cli import run_script
from bilevel_maml.data import omniglot_small_tasksets
from bilevel_maml.data._learn2learn import import_learn2learn
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.execution import PRECISIONS, check_precision, precision_scope
from bilevel_maml.models import build_model, use_closed_form_norm_grads

SETTINGS = dict(ways=5, shots=1, query_shots=1, inner_lr=0.4, meta_lr=1e-3, lam=1.0, cg_iterations=5)
LEARNERS = ("learn2learn maml", "ours maml", "ours fomaml", "ours imaml")


def engine_for(algorithm, tasksets, args, sampler):
    torch.manual_seed(args.seed)
    return build_engine(algorithm, build_model(args.model, ways=5), tasksets, inner_steps=args.inner_steps,
                        meta_batch_size=args.meta_batch_size, meta_iterations=10**9, valid_step=10**9,
                        seed=args.seed, device=args.device, sampler=sampler, precision=args.precision,
                        cuda_graph=False if args.no_cuda_graph else None,
                        **{**SETTINGS, "inner_lr": args.inner_lr, "lam": args.lam})


def train_ours(engine, budget_seconds):
    engine.train()
    started = time.perf_counter()
    while time.perf_counter() - started < budget_seconds:
        engine.meta_step()  # ends by reading the statistics, so the clock sees the device's work
        engine.meta_iteration += 1
    return engine.meta_iteration, time.perf_counter() - started


def train_learn2learn(engine, budget_seconds, inner_steps, inner_lr):
    """learn2learn's clone/adapt MAML on θ of `engine`, drawing tasks one at a time through its Taskset,
    with PyTorch's BatchNorm derivatives (as learn2learn's users have them), at the engine's precision."""
    l2l = import_learn2learn()
    model = use_closed_form_norm_grads(engine.meta_learner.module, False)
    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=False)
    optimizer = torch.optim.Adam(maml.parameters(), lr=SETTINGS["meta_lr"])
    env, tasks = engine.env, engine.meta_batch_size
    iterations, started = 0, time.perf_counter()
    while time.perf_counter() - started < budget_seconds:
        optimizer.zero_grad()
        with precision_scope(engine.precision, engine.device):
            for _ in range(tasks):
                (xs, ys), (xq, yq) = env.sample_task()
                learner = maml.clone()
                for _ in range(inner_steps):
                    learner.adapt(F.cross_entropy(learner(xs), ys))
                (F.cross_entropy(learner(xq), yq) / tasks).backward()
        optimizer.step()
        iterations += 1
    sync(engine.device)
    return iterations, time.perf_counter() - started


def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/omniglot-small")
    parser.add_argument("--budget-minutes", type=positive_float, default=10.0, help="wall-clock training budget of each")
    parser.add_argument("--model", choices=BENCHMARK_MODELS, default="conv4",
                        help="conv4: max-pool network; conv4-strided: Finn et al.'s Omniglot network")
    parser.add_argument("--inner-steps", type=positive_int, default=1)
    parser.add_argument("--inner-lr", type=positive_float, default=SETTINGS["inner_lr"])
    parser.add_argument("--lam", type=positive_float, default=SETTINGS["lam"], help="iMAML proximal strength")
    parser.add_argument("--learners", nargs="+", choices=LEARNERS, default=list(LEARNERS))
    parser.add_argument("--meta-batch-size", type=positive_int, default=32)
    parser.add_argument("--test-tasks", type=positive_int, default=600)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sampler", choices=("auto", "device", "learn2learn"), default="auto",
                        help="how our learners draw training tasks (learn2learn's always uses its Taskset)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="of every learner, training and test (default: tf32 on CUDA, fp32 on CPU)")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="run our meta-iterations eagerly on CUDA (default: a replayed CUDA graph where it works)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.precision = check_precision(args.precision, args.device)
    keep_freed_memory()  # the same allocator setting for every learner (see bilevel_maml.allocator)

    tasksets = omniglot_small_tasksets(args.data_root, ways=5, samples_per_class=2)
    budget = args.budget_minutes * 60
    print(f"equal budget: {args.budget_minutes:g} min each, 5-way 1-shot Omniglot, {args.model}-64, meta-batch "
          f"{args.meta_batch_size}, {args.inner_steps} inner step(s) of {args.inner_lr:g}, iMAML λ {args.lam:g}, "
          f"{args.test_tasks} test tasks; device {args.device}"
          + (f" ({torch.cuda.get_device_name(args.device)})" if torch.device(args.device).type == "cuda"
             else f" ({torch.get_num_threads()} CPU threads)") + f", precision {args.precision}", flush=True)
    # one held-out stream, restarted for every learner: all are scored on the same tasks
    test_env = EpisodicEnv(tasksets.test, ways=5, shots=1, query_shots=1, seed=args.seed * 3 + 2, device=args.device)
    test_start = test_env.state_dict()
    results = []
    for name in args.learners:
        algorithm = name.split()[1]
        learn2learn = name.startswith("learn2learn")
        engine = engine_for(algorithm, tasksets, args, "learn2learn" if learn2learn else args.sampler)
        if learn2learn:
            iterations, seconds = train_learn2learn(engine, budget, args.inner_steps, args.inner_lr)
        else:
            iterations, seconds = train_ours(engine, budget)
        test_env.load_state_dict(test_start)
        test = engine.evaluate(test_env, args.test_tasks)
        results.append(dict(learner=name, execution="eager" if learn2learn else engine.execution.name,
                            meta_iterations=iterations, train_seconds=seconds,
                            tasks_per_second=iterations * args.meta_batch_size / seconds,
                            accuracy=test["accuracy"], accuracy_ci95=test["accuracy_ci95"], tasks=test["tasks"]))
        print(f"  {name:18s} {results[-1]['execution']:10s} {iterations:5d} meta-iterations "
              f"({results[-1]['tasks_per_second']:.1f} tasks/s): "
              f"{100 * test['accuracy']:.2f}% ± {100 * test['accuracy_ci95']:.2f}%", flush=True)
    baseline = next((r for r in results if r["learner"] == "learn2learn maml"), None)
    for row in results if baseline else []:
        if row is baseline:
            continue
        verdict = "at least as accurate as" if row["accuracy"] >= baseline["accuracy"] else "LESS accurate than"
        print(f"{row['learner']}: {verdict} learn2learn MAML "
              f"({100 * (row['accuracy'] - baseline['accuracy']):+.2f} points)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(settings=vars(args), results=results), indent=2))


if __name__ == "__main__":
    run_script(main)
