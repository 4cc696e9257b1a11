"""Seconds per meta-iteration, tasks/s and peak memory, side by side, with the compute-bound limit.

One process, one model (conv4, 64 filters, 28×28 Omniglot inputs, 5-way 1-shot, meta-batch 32; with
``--model conv4-strided`` Finn et al.'s stride-2 Omniglot network instead of max-pooling) and
the same task tensors for every implementation:

* ours: MAML (second order), FOMAML and iMAML, vectorized (``torch.func.vmap``) and per task;
* learn2learn 0.2.0's ``l2l.algorithms.MAML`` clone/adapt loop, second and first order;
* a plain per-task loop as in the textbook pseudocode (``torch.autograd.grad(create_graph=True)``).

Each time is the median of ``--repeats`` meta-iterations after a warm-up one, the implementations
taking turns (one meta-iteration each per round) so drift in the machine's speed hits all alike. The FLOPs of a
meta-iteration are counted with ``torch.utils.flop_counter.FlopCounterMode``; the machine's own
throughput is measured on the model's convolutions at their shapes (all images of the meta-batch in
one call, forward and both backward convolutions); FLOPs ÷ throughput is the compute-bound limit,
and ``limit ÷ time`` says how close an implementation gets to it. Peak memory is the high-water mark
of resident memory above the level before the meta-iteration (CPU; allocations of 64 KiB and more
are returned to the system when freed, so freed tensors leave it) or ``max_memory_allocated``
(CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from bilevel_maml.allocator import keep_freed_memory, return_freed_memory
from bilevel_maml.engine import MetaEngine
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.models import Conv4, build_model
from bilevel_maml.problems import ALGORITHMS

INNER_LR, META_LR, LAM, CG_ITERATIONS = 0.4, 1e-3, 1.0, 5


# -- the same tasks for everyone ------------------------------------------------------------------
def omniglot_tasks(data_root, meta_batch, ways, shots, query, device):
    """``meta_batch`` tasks from the local Omniglot subsets, split once: (xs, ys, xq, yq) stacked."""
    from bilevel_maml.data import omniglot_small_tasksets

    tasksets = omniglot_small_tasksets(data_root, ways=ways, samples_per_class=shots + query)
    env = EpisodicEnv(tasksets.train, ways=ways, shots=shots, query_shots=query, seed=0, device=device)
    (xs, ys), (xq, yq) = env.sample_tasks(meta_batch)
    return xs, ys, xq, yq


# -- implementations: each returns a function performing one meta-iteration ----------------------
def ours(algorithm, vectorize, model, tasks, steps, chunk=None):
    xs, ys, xq, yq = tasks
    episodes = itertools.cycle(
        [{"support": (xs[i], ys[i]), "query": (xq[i], yq[i])} for i in range(len(xs))])
    upper_cls, lower_cls = ALGORITHMS[algorithm]
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
    upper_kwargs = {"cg_iterations": CG_ITERATIONS} if algorithm == "imaml" else {}
    lower_kwargs = {"lam": LAM} if algorithm == "imaml" else {}

    def engine(tasks_per_call):
        env = EpisodicEnv(lambda: next(episodes), ways=xs.shape[1], shots=1, device=xs.device)
        upper = upper_cls(model, optimizer, meta_batch_size=len(xs), **upper_kwargs)
        lower = lower_cls(model, inner_lr=INNER_LR, inner_steps=steps, **lower_kwargs)
        return MetaEngine(upper, lower, env, meta_iterations=10**9, vectorize=tasks_per_call)

    built = engine(chunk or vectorize)
    if vectorize and not built.vectorized:
        # The CPU auto rule chose task by task for tasks this large; time the vectorized path with
        # the largest chunk that fits one call all the same.
        built = engine(MetaEngine.largest_cpu_chunk(len(xs), xs.shape[1] + xq.shape[1],
                                                     built.activation_bytes_per_example))
    built.train()
    return built.meta_step


def learn2learn_maml(first_order, model, tasks, steps):
    from bilevel_maml.data._learn2learn import import_learn2learn

    l2l = import_learn2learn()
    xs, ys, xq, yq = tasks
    maml = l2l.algorithms.MAML(model, lr=INNER_LR, first_order=first_order)
    optimizer = torch.optim.Adam(maml.parameters(), lr=META_LR)

    def step():
        optimizer.zero_grad()
        for i in range(len(xs)):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(xs[i]), ys[i]))
            (F.cross_entropy(learner(xq[i]), yq[i]) / len(xs)).backward()
        optimizer.step()

    return step


def functional_loss(model):
    """``loss(params, x, y)``: the model's cross-entropy with ``params`` in place of its parameters."""
    names = [n for n, _ in model.named_parameters()]

    def loss(params, x, y):
        return F.cross_entropy(functional_call(model, dict(zip(names, params)), (x,)), y)

    return loss


def textbook_maml(model, tasks, steps):
    xs, ys, xq, yq = tasks
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
    loss = functional_loss(model)

    def step():
        optimizer.zero_grad()
        for i in range(len(xs)):
            params = list(model.parameters())
            for _ in range(steps):
                grads = torch.autograd.grad(loss(params, xs[i], ys[i]), params, create_graph=True)
                params = [p - INNER_LR * g for p, g in zip(params, grads)]
            (loss(params, xq[i], yq[i]) / len(xs)).backward()
        optimizer.step()

    return step


def torch_func_sketch(model, tasks, steps):
    """MAML in a few lines of torch.func, the whole meta-batch in one vmap with θ unbatched (the
    formulation of the issue's sketch): a reference for how fast plain vmap gets on this machine.
    Its meta-gradient is wrong with training-mode BatchNorm on current PyTorch (vmap over
    torch.func.grad uses a wrong batch_norm backward batching rule); see tests/test_benchmark_script.py."""
    from torch.func import grad, vmap

    xs, ys, xq, yq = tasks
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
    loss = functional_loss(model)

    def query_loss(params, xs_i, ys_i, xq_i, yq_i):
        for _ in range(steps):
            params = tuple(p - INNER_LR * g for p, g in zip(params, grad(loss)(params, xs_i, ys_i)))
        return loss(params, xq_i, yq_i)

    def step():
        optimizer.zero_grad()
        theta = tuple(model.parameters())
        vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(theta, xs, ys, xq, yq).mean().backward()
        optimizer.step()

    return step


# -- other formulations of MAML's exact meta-gradient, timed to see whether any beats ours on CPU ---
def _summed_loss(model):
    """``summed(params, x, y)``: the sum over tasks of each task's loss, ``params`` batched by task. Its
    gradient holds every task's own gradient, and it is taken outside ``vmap`` (BatchNorm-safe)."""
    from torch.func import vmap

    loss = functional_loss(model)
    return lambda params, x, y: vmap(loss)(params, x, y).sum()


def forward_over_reverse_maml(model, tasks, steps):
    """MAML's meta-gradient as (I - αH_k)…(I - αH_1)·∇L_query, each Hessian-vector product taken
    forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``) at the stored inner iterate: no
    graph of the inner loop is kept, only its k parameter sets."""
    from torch.func import grad, jvp

    xs, ys, xq, yq = tasks
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
    summed = _summed_loss(model)
    support_gradient = grad(summed)

    def step():
        optimizer.zero_grad()
        # contiguous: jvp's dual tensors cannot alias one memory location across tasks
        params = tuple(p.detach().expand(len(xs), *p.shape).contiguous() for p in model.parameters())
        iterates = []
        for _ in range(steps):
            iterates.append(params)
            params = tuple(p - INNER_LR * g for p, g in zip(params, support_gradient(params, xs, ys)))
        vector = tuple(g / len(xs) for g in grad(summed)(params, xq, yq))
        for point in reversed(iterates):
            _, hessian_vector = jvp(lambda p: support_gradient(p, xs, ys), (point,), (vector,))
            vector = tuple(v - INNER_LR * h for v, h in zip(vector, hessian_vector))
        for p, g in zip(model.parameters(), vector):
            p.grad = g.sum(0)
        optimizer.step()

    return step


def compiled_maml(model, tasks, steps):
    """The whole meta-loss of the meta-batch (inner steps included) compiled by ``torch.compile``
    (Inductor fuses the element-wise work of forward, backward and double backward); per-task
    gradients are taken outside ``vmap``. The first call compiles (minutes on this CPU)."""
    from torch.func import grad, vmap

    xs, ys, xq, yq = tasks
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
    loss, summed = functional_loss(model), _summed_loss(model)

    def meta_loss(theta, xs, ys, xq, yq):
        params = tuple(t.expand(len(xs), *t.shape) for t in theta)
        for _ in range(steps):
            params = tuple(p - INNER_LR * g for p, g in zip(params, grad(summed)(params, xs, ys)))
        return vmap(loss)(params, xq, yq).mean()

    compiled = torch.compile(meta_loss, fullgraph=True)

    def step():
        optimizer.zero_grad()
        compiled(tuple(model.parameters()), xs, ys, xq, yq).backward()
        optimizer.step()

    return step


class PoolBeforeNorm(torch.nn.Module):
    """A conv–BatchNorm–ReLU–max-pool block computed in another order with the same result: the
    batch statistics come from the convolution's output, but the normalisation and the ReLU run on
    the pooled quarter. Exact because both are monotone per channel (decreasing where γ < 0, so
    those channels are min-pooled)."""

    def __init__(self, block: torch.nn.Sequential):
        super().__init__()
        self.conv, self.norm = block[0], block[1]

    def forward(self, x):
        x = self.conv(x)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        sign = torch.where(self.norm.weight >= 0, 1.0, -1.0).view(1, -1, 1, 1)
        pooled = F.max_pool2d(x * sign, 2) * sign
        scale = self.norm.weight * torch.rsqrt(var + self.norm.eps)
        return torch.relu((pooled - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
                          + self.norm.bias.view(1, -1, 1, 1))


class PrimitiveBatchNorm(torch.nn.Module):
    """Transductive BatchNorm written with mean, variance and arithmetic instead of the fused kernel,
    so that autograd differentiates those primitives twice instead of PyTorch's batch-norm backward."""

    def __init__(self, norm: torch.nn.BatchNorm2d):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x):
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)
        scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias.view(1, -1, 1, 1)


def rewritten(model: Conv4, rewrite: str) -> Conv4:
    """``model`` with its conv blocks rewritten in place (same parameters): ``pool-before-norm`` (max-pool
    conv4 only) or ``primitive-norm``."""
    if rewrite == "pool-before-norm" and model.downsample != "max-pool":
        raise ValueError(f"pool before norm rewrites max-pool blocks; this conv4 has downsample={model.downsample!r}")
    for i, block in enumerate(model.features):
        if rewrite == "pool-before-norm":
            model.features[i] = PoolBeforeNorm(block)
        else:
            block[1] = PrimitiveBatchNorm(block[1])
    return model


IMPLEMENTATIONS = {
    "ours maml vectorized": lambda m, t, k: ours("maml", True, m, t, k),
    "ours maml vectorized x8": lambda m, t, k: ours("maml", True, m, t, k, chunk=8),
    "ours maml per-task": lambda m, t, k: ours("maml", False, m, t, k),
    "ours fomaml vectorized": lambda m, t, k: ours("fomaml", True, m, t, k),
    "ours fomaml per-task": lambda m, t, k: ours("fomaml", False, m, t, k),
    "ours imaml vectorized": lambda m, t, k: ours("imaml", True, m, t, k),
    "ours imaml per-task": lambda m, t, k: ours("imaml", False, m, t, k),
    "learn2learn maml": lambda m, t, k: learn2learn_maml(False, m, t, k),
    "learn2learn fomaml": lambda m, t, k: learn2learn_maml(True, m, t, k),
    "textbook maml loop": textbook_maml,
    "torch.func vmap sketch": torch_func_sketch,
    "forward-over-reverse maml": forward_over_reverse_maml,
    "torch.compile maml": compiled_maml,
    "ours maml vectorized, pool before norm": lambda m, t, k: ours("maml", True, rewritten(m, "pool-before-norm"), t, k),
    "ours maml vectorized, primitive-op norm": lambda m, t, k: ours("maml", True, rewritten(m, "primitive-norm"), t, k),
}
#: what each implementation is compared with: learn2learn at the same order of derivatives
BASELINE = {"maml": "learn2learn maml", "imaml": "learn2learn maml", "fomaml": "learn2learn fomaml"}


BENCHMARK_MODELS = ("conv4", "conv4-strided")


def network(name: str, device) -> Conv4:
    """A fresh 5-way conv4 for 28×28 inputs: ``conv4`` (max-pool) or ``conv4-strided``."""
    return build_model(name, ways=5).to(device)


# -- measurement ----------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_memory(device: torch.device, result: dict):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - base
        return
    return_freed_memory()
    base = _rss_bytes()
    peak = [base]
    running = [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        running[0] = False
        sampler.join()
        result["bytes"] = max(peak[0], _rss_bytes()) - base
        keep_freed_memory()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


#: layer types a profiled op is charged to, by the name of the top-level op or autograd node it ran in
LAYER_TYPES = {"convolution": ("convolution", "conv2d"), "batch norm": ("batchnorm", "batch_norm"),
               "max-pool": ("maxpool", "max_pool"), "relu": ("relu", "threshold")}


def time_by_layer_type(fn) -> dict:
    """Seconds of one call of ``fn`` charged to each layer type (``LAYER_TYPES``, else "other"): every
    op's own CPU time goes to the top-level op or autograd node that ran it, so BatchNorm's double
    backward, mostly element-wise ``mul`` and ``sum``, counts as batch norm."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        fn()
    seconds = dict.fromkeys([*LAYER_TYPES, "other"], 0.0)
    for event in profiled.events():
        top = event
        while top.cpu_parent is not None:
            top = top.cpu_parent
        name = top.name.lower()
        kind = next((k for k, keys in LAYER_TYPES.items() if any(key in name for key in keys)), "other")
        seconds[kind] += event.self_cpu_time_total / 1e6
    return seconds


def conv_throughput(model, images: int, image_size: int, device, repeats: int) -> float:
    """FLOP/s of the model's convolutions at its shapes, forward plus both backward convolutions."""
    convs, shapes = [], []
    x = torch.zeros(images, 1, image_size, image_size, device=device)
    for block in model.features:
        convs.append(block[0])
        shapes.append(x.shape)
        x = block(x)
    inputs = [torch.randn(s, device=device, requires_grad=True) for s in shapes]

    def run():
        for conv, inp in zip(convs, inputs):
            out = F.conv2d(inp, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding)
            torch.autograd.grad(out, (inp, conv.weight), grad_outputs=torch.ones_like(out))

    run()
    return counted_flops(run) / statistics.median(timed(run, device) for _ in range(repeats))


def algorithm_of(name: str) -> str:
    """The algorithm an implementation computes (its FLOPs and its learn2learn baseline)."""
    return "fomaml" if "fomaml" in name else "imaml" if "imaml" in name else "maml"


def measure_round_robin(steps: dict, device, repeats: int) -> dict:
    """Median seconds and peak memory of each step function; the repeats are interleaved
    (every implementation once per round) so that drift in the machine's speed hits all alike."""
    results = {name: {"times": []} for name in steps}
    for name, step in steps.items():
        step()  # warm-up
        memory = {}
        with peak_memory(device, memory):
            step()
        results[name]["bytes"] = memory["bytes"]
    for _ in range(repeats):
        for name, step in steps.items():
            results[name]["times"].append(timed(step, device))
    for result in results.values():
        result["seconds"] = statistics.median(result.pop("times"))
    return results


# -- the report -----------------------------------------------------------------------------------
def run_benchmark(data_root, device="cpu", meta_batch=32, steps=(1, 5), queries=(1, 15), memory_steps=(5, 20),
                  repeats=5, implementations=None, output=None, seed=0, breakdown=False, model="conv4"):
    device = torch.device(device)
    names = implementations or list(IMPLEMENTATIONS)
    # One allocator setting for every implementation: glibc's default mmap threshold moves with
    # the history of frees, which alone changed times here by a third.
    keep_freed_memory()
    rows = []
    print(f"device: {device} ({torch.get_num_threads()} threads)"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
          + f"; {model}-64, 28×28, 5-way 1-shot, meta-batch {meta_batch}; median of {repeats} after warm-up",
          flush=True)
    for query in queries:
        tasks = omniglot_tasks(data_root, meta_batch, 5, 1, query, device)
        images = meta_batch * (5 + 5 * query)
        torch.manual_seed(seed)
        throughput = conv_throughput(network(model, device), images, 28, device, repeats)
        print(f"\nquery {query}/class: conv throughput {throughput / 1e9:.1f} GFLOP/s at the model's shapes "
              f"({images} images per meta-iteration)", flush=True)
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
                           tasks_per_second=meta_batch / seconds, peak_mb=result["bytes"] / 2**20,
                           gflop=flops / 1e9, throughput_gflops=throughput / 1e9, limit_seconds=flops / throughput)
                rows.append(row)
                print(f"  steps {k:2d}  {name:24s} {seconds:7.3f} s/it {row['tasks_per_second']:7.1f} tasks/s "
                      f"{row['peak_mb']:8.1f} MB {row['gflop']:7.1f} GFLOP  limit {row['limit_seconds']:.3f} s "
                      f"({row['limit_seconds'] / seconds:5.1%} of it)", flush=True)
                if breakdown and device.type == "cpu":
                    row["seconds_by_layer"] = by_layer = time_by_layer_type(step_functions[name])
                    total = sum(by_layer.values())
                    print("      profiled: " + ", ".join(f"{kind} {t / total:.0%}" for kind, t in by_layer.items()),
                          flush=True)
    memory_rows = []
    if memory_steps:
        tasks = omniglot_tasks(data_root, meta_batch, 5, 1, queries[0], device)
        print(f"\npeak memory against inner steps (query {queries[0]}/class):", flush=True)
        for name in ("ours imaml vectorized", "ours maml vectorized"):
            for k in memory_steps:
                torch.manual_seed(seed)
                step = IMPLEMENTATIONS[name](network(model, device), tasks, k)
                step()
                memory = {}
                with peak_memory(device, memory):
                    step()
                memory_rows.append(dict(implementation=name, inner_steps=k, peak_mb=memory["bytes"] / 2**20))
                print(f"  steps {k:2d}  {name:24s} {memory['bytes'] / 2**20:8.1f} MB", flush=True)
    summary = summarize(rows, memory_rows)
    print("\n" + "\n".join(summary["lines"]), flush=True)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(dict(device=str(device), model=model, meta_batch=meta_batch, rows=rows,
                                                memory=memory_rows, summary=summary), indent=2))
    return rows, memory_rows, summary


def summarize(rows, memory_rows) -> dict:
    """Ratios to learn2learn and to the compute-bound limit, against the project's targets."""
    lines, ratios = [], {}
    by_key = {(r["implementation"], r["inner_steps"], r["query"]): r for r in rows}
    for (name, k, q), row in sorted(by_key.items(), key=lambda item: (item[0][2], item[0][1], item[0][0])):
        if not name.startswith("ours"):
            continue
        baseline = by_key.get((BASELINE[name.split()[1]], k, q))
        if baseline:
            ratio = baseline["seconds"] / row["seconds"]
            ratios[f"{name} | steps {k} | query {q}"] = ratio
            lines.append(f"{name:24s} steps {k:2d} query {q:2d}: {ratio:5.2f}× the meta-iterations/s of "
                         f"{baseline['implementation']}, {row['limit_seconds'] / row['seconds']:5.1%} of the "
                         f"compute-bound limit")
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
    return {"lines": lines, "ratios": ratios}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/omniglot-small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=BENCHMARK_MODELS, default="conv4",
                        help="conv4: Vinyals et al.'s max-pool network; conv4-strided: Finn et al.'s Omniglot "
                             "network (learn2learn's OmniglotCNN)")
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 15])
    parser.add_argument("--memory-steps", type=int, nargs="*", default=[5, 20])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--implementations", nargs="+", choices=list(IMPLEMENTATIONS))
    parser.add_argument("--breakdown", action="store_true",
                        help="also profile one meta-iteration of each and print its time by layer type (CPU)")
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)
    run_benchmark(args.data_root, args.device, args.meta_batch_size, tuple(args.steps), tuple(args.queries),
                  tuple(args.memory_steps), args.repeats, args.implementations, args.json, breakdown=args.breakdown,
                  model=args.model)


if __name__ == "__main__":
    main()
