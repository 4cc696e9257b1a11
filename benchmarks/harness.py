"""What the benchmarks here share: the tasks, the networks, and how time, memory and FLOPs are measured.

Each time is the median of repeated calls after a warm-up one, the implementations taking turns
(one call each per round) so drift in the machine's speed hits all alike. Peak memory is the
high-water mark of resident memory above the level before the call (CPU; allocations of 64 KiB and
more are returned to the system when freed, so freed tensors leave it) or ``max_memory_allocated``
(CUDA). FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode``; the machine's own
throughput is measured on the model's convolutions at their shapes (forward and both backward
convolutions), and FLOPs ÷ throughput is the compute-bound limit of a meta-iteration.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bilevel_maml.allocator import keep_freed_memory, return_freed_memory
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.models import Conv4, build_model

BENCHMARK_MODELS = ("conv4", "conv4-strided")


def omniglot_tasks(data_root, meta_batch, ways, shots, query, device):
    """``meta_batch`` tasks from the local Omniglot subsets, split once: (xs, ys, xq, yq) stacked."""
    from bilevel_maml.data import omniglot_small_tasksets

    tasksets = omniglot_small_tasksets(data_root, ways=ways, samples_per_class=shots + query)
    env = EpisodicEnv(tasksets.train, ways=ways, shots=shots, query_shots=query, seed=0, device=device)
    (xs, ys), (xq, yq) = env.sample_tasks(meta_batch)
    return xs, ys, xq, yq


def network(name: str, device) -> Conv4:
    """A fresh 5-way conv4 for 28×28 inputs: ``conv4`` (max-pool) or ``conv4-strided``."""
    return build_model(name, ways=5).to(device)


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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


#: layer types a profiled op is charged to, by the name of the top-level op or autograd node it ran in
#: ("conv" also names the grouped convolution Functions and their nodes: Conv, ConvBackward, ...)
LAYER_TYPES = {"convolution": ("conv",), "batch norm": ("batchnorm", "batch_norm", "var_mean"),
               "max-pool": ("maxpool", "max_pool"), "relu": ("relu", "threshold")}


def time_by_layer_type(fn) -> dict:
    """Seconds of one call of ``fn`` charged to each layer type (``LAYER_TYPES``, else "other"): every
    op's own CPU time goes to the top-level op or autograd node that ran it, so BatchNorm's double
    backward, mostly element-wise ``mul`` and ``sum``, counts as batch norm (so do the batch statistics
    of a block computed pool before norm, ``var_mean``; its normalisation of the pooled quarter is
    element-wise arithmetic, "other")."""
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


def measure_round_robin(steps: dict, device, repeats: int) -> dict:
    """Median seconds and peak memory of each step function; the repeats are interleaved
    (every implementation once per round) so that drift in the machine's speed hits all alike."""
    results = {name: {"times": []} for name in steps}
    for name, step in steps.items():
        step()  # warm-up
        memory = {}
        with peak_memory(device, memory):
            step()
        # A replayed CUDA graph allocates nothing (its memory was taken at capture) and JAX's
        # allocations are its own: such steps say their peak themselves (None: not known).
        results[name]["bytes"] = step.peak_bytes if hasattr(step, "peak_bytes") else memory["bytes"]
    for _ in range(repeats):
        for name, step in steps.items():
            results[name]["times"].append(timed(step, device))
    for result in results.values():
        result["seconds"] = statistics.median(result.pop("times"))
    return results


