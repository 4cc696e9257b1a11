"""Where a meta-iteration's GPU time goes: its kernels grouped by kind, and what cuDNN's autotuner changes.

    python3 benchmarks/gpu_kernels.py --data-root $BILEVEL_MAML_DATA --steps 1 5

For ours (MAML, vectorized, the setting of ``meta_iteration.py``): the number of kernels one eager
meta-iteration launches and the GPU time they take, by kind and the heaviest by name (this is the
floor a CUDA graph can reach: it removes the gaps between kernels, not the kernels), then the
captured meta-iteration's median time with ``torch.backends.cudnn.benchmark`` off and on.
``--grouped-conv-grads`` profiles the network with grouped convolution derivatives
(:func:`bilevel_maml.models.use_grouped_conv_grads`), ``--pytorch-norm-grads`` with PyTorch's BatchNorm
derivatives instead of the closed-form ones (:func:`bilevel_maml.models.use_closed_form_norm_grads`).

``--ops`` counts, on any device (CPU included), the ATen ops one eager meta-iteration dispatches, those
that would launch a kernel on a GPU (all but views and other metadata ops) by name: what a change to
the derivatives removes can be counted here before a GPU measures its time.

    .venv/bin/python benchmarks/gpu_kernels.py --ops --device cpu --steps 1 5
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import network, omniglot_tasks  # noqa: E402
from implementations import PRECISION, ours  # noqa: E402

from bilevel_maml.arguments import OneLineParser, device_name, positive_int
from bilevel_maml.cli import run_script  # noqa: E402
from bilevel_maml.data.omniglot import find_subsets  # noqa: E402
from bilevel_maml.execution import PRECISIONS, precision_scope  # noqa: E402
from bilevel_maml.models import use_closed_form_norm_grads, use_grouped_conv_grads  # noqa: E402

#: kernel kinds, by substrings of the kernel's name (first match wins)
KINDS = {
    "convolution": ("conv", "implicit_gemm", "wgrad", "dgrad", "fprop", "cudnn", "xmma", "sm90_", "cutlass"),
    "matrix product": ("gemm", "gemv", "cublas"),
    "batch norm": ("batch_norm", "batchnorm", "bn_"),
    "max-pool": ("max_pool", "maxpool", "pool"),
    "reduction": ("reduce", "sum", "norm_kernel"),
    "copy": ("copy", "memcpy", "memset", "cat", "index", "gather", "scatter"),
    "element-wise": ("elementwise", "vectorized", "foreach", "unrolled"),
}


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KINDS.items() if any(key in lowered for key in keys)), "other")


def kernel_profile(step) -> list[tuple[str, int, float]]:
    """(name, count, GPU seconds) of every kernel one call of ``step`` launches."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiled:
        step()
        torch.cuda.synchronize()
    totals = defaultdict(lambda: [0, 0.0])
    for event in profiled.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += 1
            totals[event.name][1] += event.device_time_total / 1e6
    return sorted(((name, c, s) for name, (c, s) in totals.items()), key=lambda row: -row[2])


#: ops that only make a new view of a tensor's memory (or record a profiler range): no kernel
METADATA_OPS = {"view", "_unsafe_view", "slice", "select", "permute", "transpose", "t", "expand", "squeeze",
                "unsqueeze", "unflatten", "alias", "as_strided", "detach", "_reshape_alias",
                "_record_function_enter_new", "_record_function_exit"}


def op_counts(step) -> dict[str, int]:
    """How many times one call of ``step`` dispatches each ATen op (by name, metadata ops excluded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[str, int] = defaultdict(int)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return {name: n for name, n in sorted(counts.items(), key=lambda kv: -kv[1]) if name not in METADATA_OPS}


def median_seconds(step, repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = OneLineParser(prog="gpu_kernels.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data/omniglot-small")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="default: tf32 on CUDA, fp32 on CPU")
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[1, 5])
    parser.add_argument("--queries", type=positive_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=30)
    parser.add_argument("--top", type=positive_int, default=15)
    parser.add_argument("--grouped-conv-grads", action="store_true",
                        help="the network's convolution derivatives as whole grouped convolutions")
    parser.add_argument("--pytorch-norm-grads", action="store_true",
                        help="PyTorch's BatchNorm derivatives instead of the closed-form ones")
    parser.add_argument("--ops", action="store_true",
                        help="count the ops one meta-iteration dispatches instead (any device)")
    parser.add_argument("--device", type=device_name, default="cuda", help="with --ops: cpu, cuda, ... (default: cuda)")
    args = parser.parse_args(argv)
    if not args.ops and not args.device.startswith("cuda"):
        parser.error(f"argument --device: {args.device!r} needs --ops (kernel profiles and timings are CUDA's)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(0, "gpu_kernels.py: no CUDA device here; nothing to measure\n")
    find_subsets(args.data_root)
    args.precision = args.precision or ("tf32" if device.type == "cuda" else "fp32")

    def model():
        built = use_grouped_conv_grads(network("conv4", device), args.grouped_conv_grads)
        return use_closed_form_norm_grads(built, not args.pytorch_norm_grads)

    PRECISION["value"] = args.precision
    tasks = omniglot_tasks(args.data_root, 32, 5, 1, args.queries, device)
    variant = (", grouped conv grads" if args.grouped_conv_grads else "") + \
        (", PyTorch's norm grads" if args.pytorch_norm_grads else "")
    summary = []
    for steps in args.steps:
        torch.manual_seed(0)
        # --ops: the whole meta-batch in one vmapped call, as on a GPU (a CPU's own rule may split it)
        eager = ours("maml", True, model(), tasks, steps, chunk=len(tasks[0]) if args.ops else None)
        for _ in range(3):
            eager()
        if args.ops:
            with precision_scope(args.precision, device):
                counts = op_counts(eager)
            summary.append((steps, sum(counts.values())))
            print(f"\n{steps} inner step(s), {device.type}{variant}: one eager meta-iteration dispatches "
                  f"{summary[-1][1]} ops besides views; the most frequent {args.top}:")
            for name, count in list(counts.items())[:args.top]:
                print(f"  {count:6d}  {name}")
            continue
        with precision_scope(args.precision, device):
            kernels = kernel_profile(eager)
        total = sum(s for _, _, s in kernels)
        print(f"\n{steps} inner step(s), {args.precision}{variant}: one eager meta-iteration launches "
              f"{sum(c for _, c, _ in kernels)} kernels, {total * 1e3:.2f} ms of GPU time")
        by_kind = defaultdict(lambda: [0, 0.0])
        for name, count, seconds in kernels:
            by_kind[kind_of(name)][0] += count
            by_kind[kind_of(name)][1] += seconds
        for kind, (count, seconds) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
            print(f"  {kind:<16} {count:5d} kernels {seconds * 1e3:8.2f} ms {100 * seconds / total:5.1f}%")
        print(f"  heaviest {args.top}:")
        for name, count, seconds in kernels[:args.top]:
            print(f"    {seconds * 1e3:7.2f} ms {count:4d}×  {name[:110]}")
        timings = {}
        for autotune in (False, True):
            torch.backends.cudnn.benchmark = autotune
            torch.manual_seed(0)
            captured = ours("maml", True, model(), tasks, steps, cuda_graph=True)
            timings[autotune] = median_seconds(captured, args.repeats)
        torch.backends.cudnn.benchmark = False
        summary.append((steps, total, timings[False], timings[True]))
    if args.ops:
        print(f"\nsteps  ops besides views ({device.type}{variant})")
        for steps, total in summary:
            print(f"{steps:5d}  {total:17d}")
        return
    print("\nsteps  eager kernels' GPU time  captured  captured, cudnn.benchmark")
    for steps, total, plain, tuned in summary:
        print(f"{steps:5d}  {total * 1e3:20.2f} ms  {plain * 1e3:6.2f} ms  {tuned * 1e3:12.2f} ms")


if __name__ == "__main__":
    run_script(lambda: main(sys.argv[1:]))
