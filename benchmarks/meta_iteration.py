"""Seconds per meta-iteration, end-to-end training and evaluation throughput: ours against learn2learn,
a textbook loop and JAX, with the compute-bound limit.

    .venv/bin/python benchmarks/meta_iteration.py --json benchmarks/results/meta_iteration-cpu.json
    python3 benchmarks/meta_iteration.py --device cuda --data-root $BILEVEL_MAML_DATA --json gpu.json

One process, one model (conv4, 64 filters, 28×28 Omniglot inputs, 5-way 1-shot, meta-batch 32; with
``--model conv4-strided`` Finn et al.'s stride-2 Omniglot network instead of max-pooling), one
precision for every row (``--precision``; fp32 on CPU, tf32 by default on CUDA). Sections
(``--sections``):

* ``meta-iteration``: one meta-iteration of every implementation in ``implementations.py`` on the same
  task tensors (ours eager and, on CUDA, captured as a CUDA graph; learn2learn; a textbook loop; JAX
  when importable), with FLOPs, the compute-bound limit and peak memory (see ``harness.py``);
* ``end-to-end``: ``engine.meta_step()`` in a loop as training runs it (tasks drawn from the Omniglot
  subsets, the meta-step, the statistics read back), tasks per second, against learn2learn's own loop;
* ``evaluation``: seconds to score ``--eval-tasks`` held-out tasks, vectorized and task by task;
* ``sampling``: milliseconds to draw one meta-batch of tasks, on the device and through learn2learn;
* ``replay-check``: microseconds the CUDA-graph strategy spends on the host before each replay to
  check that the graph still computes what an eager iteration would (``RecordedState``), against
  comparing every setting, and the host's whole part of a replayed meta-iteration (``engine.run()``
  with a recorded graph that runs nothing); host work only, so any device measures it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (BENCHMARK_MODELS, conv_throughput, counted_flops, measure_round_robin, network,  # noqa: E402
                     omniglot_tasks, peak_memory, sync, time_by_layer_type, timed)
from implementations import (BASELINE, CUDA_ONLY, IMPLEMENTATIONS, INNER_LR, META_LR, PRECISION,  # noqa: E402
                             algorithm_of, jax_available, ours)

from bilevel_maml import build_engine  # noqa: E402
from bilevel_maml.allocator import keep_freed_memory  # noqa: E402
from bilevel_maml.arguments import DefaultsHelpFormatter, OneLineParser, device_name, positive_int
from bilevel_maml.cli import run_script  # noqa: E402
from bilevel_maml.data.omniglot import find_subsets  # noqa: E402
from bilevel_maml.execution import PRECISIONS, CapturedExecution, check_precision, precision_scope  # noqa: E402

SECTIONS = ("meta-iteration", "end-to-end", "evaluation", "sampling", "replay-check")


def applicable(names, device) -> tuple[list[str], list[str]]:
    """The implementations that can run here, and a note for each left out."""
    kept, notes = [], []
    for name in names:
        if name in CUDA_ONLY and device.type != "cuda":
            notes.append(f"{name}: skipped, CUDA graphs need a CUDA device")
        elif name.startswith("jax") and not jax_available():
            notes.append(f"{name}: skipped, jax is not importable here (pip install jax optax; not a dependency)")
        else:
            kept.append(name)
    return kept, notes


def mb(value) -> float | None:
    return None if value is None else value / 2**20


# -- one meta-iteration on fixed tasks ---------------------------------------------------------------
def meta_iteration_rows(data_root, device, meta_batch, steps, queries, repeats, names, seed, breakdown, model):
    rows = []
    for query in queries:
        tasks = omniglot_tasks(data_root, meta_batch, 5, 1, query, device)
        images = meta_batch * (5 + 5 * query)
        torch.manual_seed(seed)
        throughput = conv_throughput(network(model, device), images, 28, device, repeats)
        print(f"\nquery {query}/class: conv throughput {throughput / 1e9:.1f} GFLOP/s at the model's shapes "
              f"({images} images per meta-iteration)", flush=True)
        if any(n.startswith("jax") for n in names):
            check_jax(model, tasks, device, seed)
        for k in steps:
            step_functions = {}
            for name in names:
                torch.manual_seed(seed)
                step_functions[name] = IMPLEMENTATIONS[name](network(model, device), tasks, k)
            results = measure_round_robin(step_functions, device, repeats)
            # FlopCounterMode overcounts vmapped convolution backward, so each algorithm's FLOPs are
            # counted on a per-task twin (for MAML this equals the textbook loop's count).
            algorithm_flops = {}
            for algorithm in sorted({algorithm_of(n) for n in names}):
                torch.manual_seed(seed)
                twin = ours(algorithm, False, network(model, device), tasks, k)
                twin()
                algorithm_flops[algorithm] = counted_flops(twin)
            for name, result in results.items():
                flops = algorithm_flops[algorithm_of(name)]
                seconds = result["seconds"]
                row = dict(implementation=name, inner_steps=k, query=query, seconds=seconds,
                           tasks_per_second=meta_batch / seconds, peak_mb=mb(result["bytes"]),
                           gflop=flops / 1e9, throughput_gflops=throughput / 1e9, limit_seconds=flops / throughput,
                           precision=PRECISION["value"])
                rows.append(row)
                memory = "      — MB" if row["peak_mb"] is None else f"{row['peak_mb']:8.1f} MB"
                print(f"  steps {k:2d}  {name:34s} {seconds:8.4f} s/it {row['tasks_per_second']:8.1f} tasks/s "
                      f"{memory} {row['gflop']:7.1f} GFLOP  limit {row['limit_seconds']:.4f} s "
                      f"({row['limit_seconds'] / seconds:5.1%} of it)", flush=True)
                if breakdown and device.type == "cpu" and not name.startswith("jax"):
                    row["seconds_by_layer"] = by_layer = time_by_layer_type(step_functions[name])
                    total = sum(by_layer.values())
                    print("      profiled: " + ", ".join(f"{kind} {t / total:.0%}" for kind, t in by_layer.items()),
                          flush=True)
    return rows


def check_jax(model, tasks, device, seed):
    """The JAX row computes the same meta-gradient as the textbook loop (printed, not assumed)."""
    import jax_maml
    from implementations import functional_loss

    torch.manual_seed(seed)
    net = network(model, device)
    xs, ys, xq, yq = tasks
    loss = functional_loss(net)
    total = 0
    for i in range(len(xs)):
        params = list(net.parameters())
        grads = torch.autograd.grad(loss(params, xs[i], ys[i]), params, create_graph=True)
        params = [p - INNER_LR * g for p, g in zip(params, grads)]
        total = total + loss(params, xq[i], yq[i]) / len(xs)
    reference = torch.autograd.grad(total, list(net.parameters()))
    theirs = jax_maml.meta_gradient(net, tasks, 1, INNER_LR, PRECISION["value"])
    names = [n for n, _ in net.named_parameters()]
    error = max(float((torch.as_tensor(theirs[n]) - r.cpu()).abs().max()) for n, r in zip(names, reference))
    scale = max(float(r.abs().max()) for r in reference)
    why = (" — ties in max-pooling, which float32 rounding creates, are routed differently by XLA and PyTorch "
           "(both valid subgradients; in float64 the two agree to 1e-14, tests/test_benchmark_script.py)"
           if model == "conv4" else "")
    print(f"  JAX ({jax_maml.device_name()}): meta-gradient at 1 inner step within {error:.1e} of the textbook "
          f"loop's (largest entry {scale:.2f}){why}", flush=True)


# -- end to end: sampling, meta-step, statistics ------------------------------------------------------
def omniglot_engine(data_root, device, meta_batch, steps, sampler, cuda_graph, model, seed=0, **options):
    from bilevel_maml.data import omniglot_small_tasksets
    from bilevel_maml.models import build_model

    tasksets = omniglot_small_tasksets(data_root, ways=5, samples_per_class=2)
    torch.manual_seed(seed)
    return build_engine("maml", build_model(model, ways=5), tasksets, ways=5, shots=1, query_shots=1,
                        inner_steps=steps, inner_lr=INNER_LR, meta_lr=META_LR, meta_batch_size=meta_batch,
                        meta_iterations=10**9, valid_step=10**9, seed=seed, device=device, sampler=sampler,
                        cuda_graph=cuda_graph, precision=PRECISION["value"], **options)


def learn2learn_loop(engine, steps):
    """learn2learn's own MAML loop: tasks drawn one at a time through its Taskset, clone/adapt."""
    from bilevel_maml.data._learn2learn import import_learn2learn

    l2l = import_learn2learn()
    maml = l2l.algorithms.MAML(engine.meta_learner.module, lr=INNER_LR, first_order=False)
    optimizer = torch.optim.Adam(maml.parameters(), lr=META_LR)
    env, tasks = engine.env, engine.meta_batch_size

    def step():
        optimizer.zero_grad()
        total = 0.0
        with precision_scope(PRECISION["value"], env.device):
            for _ in range(tasks):
                (xs, ys), (xq, yq) = env.sample_task()
                learner = maml.clone()
                for _ in range(steps):
                    learner.adapt(F.cross_entropy(learner(xs), ys))
                loss = F.cross_entropy(learner(xq), yq) / tasks
                loss.backward()
                total += loss.item()  # as a training loop reports its loss
        optimizer.step()
        return total

    return step


def end_to_end_rows(data_root, device, meta_batch, steps, iterations, model):
    setups = [("ours, device sampler, cuda graph", "device", True), ("ours, device sampler, eager", "device", False),
              ("ours, learn2learn sampler, eager", "learn2learn", False), ("learn2learn (its own loop)", "learn2learn", False)]
    rows = []
    print(f"\nend to end (sampling + meta-step + statistics), {iterations} meta-iterations each after warm-up:", flush=True)
    for k in steps:
        for name, sampler, cuda_graph in setups:
            if cuda_graph and device.type != "cuda":
                continue
            engine = omniglot_engine(data_root, device, meta_batch, k, sampler, cuda_graph, model)
            engine.train()
            step = learn2learn_loop(engine, k) if name.startswith("learn2learn") else engine.meta_step
            for _ in range(CapturedExecution.WARMUP_ITERATIONS + 2 if cuda_graph else 2):
                step()
            sync(device)
            started = time.perf_counter()
            for _ in range(iterations):
                step()
            sync(device)
            seconds = (time.perf_counter() - started) / iterations
            row = dict(setup=name, inner_steps=k, seconds=seconds, tasks_per_second=meta_batch / seconds,
                       execution=engine.execution.name if name.startswith("ours") else "eager",
                       precision=PRECISION["value"])
            rows.append(row)
            print(f"  steps {k:2d}  {name:34s} {seconds:8.4f} s/it {row['tasks_per_second']:9.1f} tasks/s", flush=True)
    return rows


# -- evaluation ----------------------------------------------------------------------------------------
def evaluation_rows(data_root, device, steps, tasks, model):
    setups = [("vectorized, device sampler", "device", None), ("task by task, device sampler", "device", 1),
              ("task by task, learn2learn sampler", "learn2learn", 1)]
    rows = []
    print(f"\nevaluation of {tasks} held-out tasks:", flush=True)
    for k in steps:
        for name, sampler, per_call in setups:
            engine = omniglot_engine(data_root, device, 32, k, sampler, False, model)
            if per_call is not None:
                engine.evaluation_tasks_per_call = per_call
            engine.evaluate(engine.test_env, min(tasks, 50))  # warm-up
            sync(device)
            started = time.perf_counter()
            report = engine.evaluate(engine.test_env, tasks)
            sync(device)
            seconds = time.perf_counter() - started
            rows.append(dict(setup=name, inner_steps=k, tasks=tasks, seconds=seconds,
                             tasks_per_call=engine.evaluation_tasks_per_call, accuracy=report["accuracy"],
                             precision=PRECISION["value"]))
            print(f"  steps {k:2d}  {name:34s} {seconds:8.3f} s ({engine.evaluation_tasks_per_call} tasks a call)",
                  flush=True)
    return rows


# -- sampling ------------------------------------------------------------------------------------------
def sampling_rows(data_root, device, meta_batch, repeats):
    from bilevel_maml.data import omniglot_small_tasksets
    from bilevel_maml.data.device_sampler import sampler_from_taskset
    from bilevel_maml.env import EpisodicEnv

    tasksets = omniglot_small_tasksets(data_root, ways=5, samples_per_class=2)
    sources = {"device sampler": sampler_from_taskset(tasksets.train, 5, 1, 1, device),
               "learn2learn sampler": tasksets.train}
    rows = []
    print(f"\ndrawing a meta-batch of {meta_batch} tasks onto {device}:", flush=True)
    for name, source in sources.items():
        env = EpisodicEnv(source, ways=5, shots=1, query_shots=1, device=device)
        env.sample_tasks(meta_batch)
        times = [timed(lambda: env.sample_tasks(meta_batch), device) for _ in range(repeats)]
        rows.append(dict(sampler=name, tasks=meta_batch, milliseconds=1e3 * statistics.median(times)))
        print(f"  {name:20s} {rows[-1]['milliseconds']:8.2f} ms", flush=True)
    return rows


class NothingReplayed(CapturedExecution):
    """The CUDA-graph strategy with a recorded graph that runs nothing: what is left of a replayed
    meta-iteration is the host's part (the check, the counters, the statistics, the engine's loop)."""

    def _on_side_stream(self):
        return contextlib.nullcontext()

    def _record(self, run):
        run()
        return SimpleNamespace(replay=lambda: None)


def replay_check_rows(data_root, device, meta_batch, repeats, model):
    from bilevel_maml.execution import RecordedState, settings, structure

    # SGD: Adam's capturable mode, which the strategy switches on, refuses CPU tensors
    engine = omniglot_engine(data_root, device, meta_batch, 1, "auto", False, model, optimizer="sgd")
    engine.train()
    engine.meta_step()
    recorded = RecordedState(engine)
    checks = {"RecordedState": lambda: recorded.structure_changed(engine) or recorded.settings_changed(engine),
              "every setting compared": lambda: (structure(engine) != recorded.structure
                                                 or settings(engine) != recorded.settings)}
    calls, rows = 1000, []
    print("\nchecking before a replay that nothing a graph took as given changed:", flush=True)
    for name, check in checks.items():
        assert not check()
        times = []
        for _ in range(max(repeats, 5)):
            started = time.perf_counter()
            for _ in range(calls):
                check()
            times.append((time.perf_counter() - started) / calls)
        rows.append(dict(measured=name, microseconds=1e6 * min(times)))
        print(f"  {name:24s} {rows[-1]['microseconds']:8.1f} µs", flush=True)

    replays = NothingReplayed(engine)
    engine.use_execution(replays)
    engine.meta_iterations = engine.meta_iteration + CapturedExecution.WARMUP_ITERATIONS + 1
    engine.run()  # warmed up and recorded
    assert engine.execution is replays, engine.eager_reason
    times = []
    for _ in range(max(repeats, 5)):
        engine.meta_iterations = engine.meta_iteration + calls
        started = time.perf_counter()
        engine.run()
        times.append((time.perf_counter() - started) / calls)
    rows.append(dict(measured="a replayed meta-iteration on the host", microseconds=1e6 * min(times)))
    print(f"  {rows[-1]['measured']} (engine.run(), a graph that runs nothing) {rows[-1]['microseconds']:8.1f} µs",
          flush=True)
    return rows


# -- the report ----------------------------------------------------------------------------------------
def memory_rows_against_steps(data_root, device, meta_batch, query, memory_steps, model, seed):
    tasks = omniglot_tasks(data_root, meta_batch, 5, 1, query, device)
    rows = []
    print(f"\npeak memory against inner steps (query {query}/class):", flush=True)
    for name in ("ours imaml vectorized", "ours maml vectorized"):
        for k in memory_steps:
            torch.manual_seed(seed)
            step = IMPLEMENTATIONS[name](network(model, device), tasks, k)
            step()
            memory = {}
            with peak_memory(device, memory):
                step()
            rows.append(dict(implementation=name, inner_steps=k, peak_mb=memory["bytes"] / 2**20))
            print(f"  steps {k:2d}  {name:24s} {memory['bytes'] / 2**20:8.1f} MB", flush=True)
    return rows


def run_benchmark(data_root, device="cpu", meta_batch=32, steps=(1, 5), queries=(1, 15), memory_steps=(5, 20),
                  repeats=5, implementations=None, output=None, seed=0, breakdown=False, model="conv4",
                  precision=None, sections=SECTIONS, end_to_end_iterations=20, eval_tasks=600):
    device = torch.device(device)
    PRECISION["value"] = check_precision(precision, device)
    names, notes = applicable(implementations or list(IMPLEMENTATIONS), device)
    # One allocator setting for every implementation: glibc's default mmap threshold moves with
    # the history of frees, which alone changed times here by a third.
    keep_freed_memory()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"device: {device} ({device_name}); {model}-64, 28×28, 5-way 1-shot, meta-batch {meta_batch}; "
          f"precision {PRECISION['value']}; median of {repeats} after warm-up", flush=True)
    for note in notes:
        print(f"  {note}", flush=True)
    report = dict(device=str(device), device_name=device_name, model=model, meta_batch=meta_batch,
                  precision=PRECISION["value"], notes=notes, rows=[], memory=[])
    if "meta-iteration" in sections:
        report["rows"] = meta_iteration_rows(data_root, device, meta_batch, steps, queries, repeats, names, seed,
                                             breakdown, model)
        if memory_steps:
            report["memory"] = memory_rows_against_steps(data_root, device, meta_batch, queries[0], memory_steps,
                                                         model, seed)
    if "end-to-end" in sections:
        report["end_to_end"] = end_to_end_rows(data_root, device, meta_batch, steps, end_to_end_iterations, model)
    if "evaluation" in sections:
        report["evaluation"] = evaluation_rows(data_root, device, steps, eval_tasks, model)
    if "sampling" in sections:
        report["sampling"] = sampling_rows(data_root, device, meta_batch, max(repeats, 20))
    if "replay-check" in sections:
        report["replay_check"] = replay_check_rows(data_root, device, meta_batch, repeats, model)
    report["summary"] = summarize(report)
    print("\n" + "\n".join(report["summary"]["lines"]), flush=True)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2))
    return report


def summarize(report: dict) -> dict:
    """Ratios to learn2learn, JAX and the compute-bound limit, against the project's targets."""
    rows, memory_rows = report["rows"], report["memory"]
    lines, ratios = [], {}
    by_key = {(r["implementation"], r["inner_steps"], r["query"]): r for r in rows}
    for (name, k, q), row in sorted(by_key.items(), key=lambda item: (item[0][2], item[0][1], item[0][0])):
        if not name.startswith("ours"):
            continue
        baseline = by_key.get((BASELINE[algorithm_of(name)], k, q))
        if baseline:
            ratio = baseline["seconds"] / row["seconds"]
            ratios[f"{name} | steps {k} | query {q}"] = ratio
            lines.append(f"{name:34s} steps {k:2d} query {q:2d}: {ratio:6.2f}× the meta-iterations/s of "
                         f"{baseline['implementation']}, {row['limit_seconds'] / row['seconds']:5.1%} of the "
                         f"compute-bound limit")
        jax = by_key.get(("jax maml (jit + vmap)", k, q))
        if jax and algorithm_of(name) == "maml":
            lines.append(f"{name:34s} steps {k:2d} query {q:2d}: {row['seconds'] / jax['seconds']:6.2f}× JAX's time "
                         f"per meta-iteration ({row['seconds'] * 1e3:.1f} ms against {jax['seconds'] * 1e3:.1f} ms)")
    for k_q in sorted({(k, q) for _, k, q in by_key}):
        fo, so = by_key.get(("ours fomaml vectorized", *k_q)), by_key.get(("ours maml vectorized", *k_q))
        if fo and so:
            lines.append(f"FOMAML vs MAML (vectorized) steps {k_q[0]} query {k_q[1]}: "
                         f"{so['seconds'] / fo['seconds']:.2f}× faster")
    memory = {(m["implementation"], m["inner_steps"]): m["peak_mb"] for m in memory_rows}
    steps = sorted({k for _, k in memory})
    if len(steps) >= 2:
        low, high = steps[0], steps[-1]
        for name in ("ours imaml vectorized", "ours maml vectorized"):
            if (name, low) in memory and (name, high) in memory:
                lines.append(f"{name}: peak memory at {high} inner steps is "
                             f"{memory[(name, high)] / max(memory[(name, low)], 1e-9):.2f}× its peak at {low}")
    for row in report.get("end_to_end", []):
        lines.append(f"end to end, {row['setup']}, {row['inner_steps']} inner step(s): "
                     f"{row['tasks_per_second']:.0f} tasks/s")
    for row in report.get("evaluation", []):
        lines.append(f"evaluation, {row['setup']}, {row['inner_steps']} inner step(s): {row['tasks']} tasks in "
                     f"{row['seconds']:.2f} s")
    for row in report.get("sampling", []):
        lines.append(f"sampling {row['tasks']} tasks, {row['sampler']}: {row['milliseconds']:.2f} ms")
    host = {row["measured"]: row["microseconds"] for row in report.get("replay_check", [])}
    if host:
        lines.append(f"check before a replay: {host['RecordedState']:.1f} µs, "
                     f"{host['every setting compared'] / host['RecordedState']:.1f}× less than comparing every "
                     f"setting ({host['every setting compared']:.1f} µs); a replayed meta-iteration on the host: "
                     f"{host['a replayed meta-iteration on the host']:.1f} µs")
    return {"lines": lines, "ratios": ratios}


def build_parser(prog=None) -> argparse.ArgumentParser:
    """This script's options (also ``bilevel-maml bench``'s; the docs' CLI page is generated from it)."""
    parser = OneLineParser(prog=prog, description=__doc__, formatter_class=DefaultsHelpFormatter)
    add = parser.add_argument
    add("--data-root", default="../shared/data/omniglot-small", metavar="FOLDER",
        help="the Omniglot subsets the end-to-end, evaluation and sampling sections draw tasks from")
    add("--device", type=device_name, help="cpu, cuda, cuda:1, ... (default: cuda where available, else cpu)")
    add("--precision", choices=PRECISIONS, help="of every row (default: tf32 on CUDA, fp32 on CPU)")
    add("--model", choices=BENCHMARK_MODELS, default="conv4",
        help="conv4: Vinyals et al.'s max-pool network; conv4-strided: Finn et al.'s Omniglot network "
             "(learn2learn's OmniglotCNN)")
    add("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure")
    add("--meta-batch-size", type=positive_int, default=32, help="tasks per meta-iteration")
    add("--steps", type=positive_int, nargs="+", default=[1, 5],
        help="inner-step counts to measure, one table block each")
    add("--queries", type=positive_int, nargs="+", default=[1, 15],
        help="query examples per class to measure (the meta-iteration section)")
    add("--memory-steps", type=positive_int, nargs="*", default=[5, 20], metavar="STEPS",
        help="inner-step counts at which the peak memory of vectorized MAML (which keeps every step's graph) "
             "and iMAML (which keeps none) is measured, at the first --queries; none to skip")
    add("--repeats", type=positive_int, default=5, help="timed meta-iterations per row (the median is reported)")
    add("--implementations", nargs="+", choices=list(IMPLEMENTATIONS), metavar="NAME",
        help="rows to measure, each name quoted: " + "; ".join(f"'{name}'" for name in IMPLEMENTATIONS)
             + " (default: every one this device can run)")
    add("--end-to-end-iterations", type=positive_int, default=20,
        help="meta-iterations timed in the end-to-end section")
    add("--eval-tasks", type=positive_int, default=600, help="held-out tasks scored in the evaluation section")
    add("--breakdown", action="store_true",
        help="also profile one meta-iteration of each and print its time by layer type (CPU)")
    add("--json", metavar="FILE", help="also write the measurements to this JSON file")
    return parser


def main(argv=None, prog=None):
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    find_subsets(args.data_root)  # every section draws its tasks from there: a missing folder says so before any work
    return run_benchmark(args.data_root, args.device, args.meta_batch_size, tuple(args.steps), tuple(args.queries),
                         tuple(args.memory_steps), args.repeats, args.implementations, args.json,
                         breakdown=args.breakdown, model=args.model, precision=args.precision,
                         sections=tuple(args.sections), end_to_end_iterations=args.end_to_end_iterations,
                         eval_tasks=args.eval_tasks)


if __name__ == "__main__":
    run_script(main)
