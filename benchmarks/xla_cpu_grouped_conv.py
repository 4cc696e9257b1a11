"""Why the JAX row of ``meta_iteration.py`` is slow on a CPU: one vmapped convolution, XLA against PyTorch.

    PYTHONPATH=/tmp/jax .venv/bin/python benchmarks/xla_cpu_grouped_conv.py

Under ``vmap`` over tasks with per-task filters, both frameworks run a convolution as one grouped
convolution (a group per task). This times conv4's second layer in that form (64 -> 64 channels at
14×14, 5 images per task, ``--tasks`` groups) on the CPU, the forward pass and the filter gradient, in
JAX (XLA's CPU backend) and in PyTorch, after checking that the two compute the same values. XLA:CPU
writes the filter gradient of a grouped convolution as a convolution dilated by the group count over
the groups, which is what makes the JAX MAML row seconds per meta-iteration there; on a GPU XLA calls
cuDNN instead. Needs ``jax`` (not a dependency of the package).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from harness import timed  # noqa: E402

from bilevel_maml.arguments import OneLineParser, positive_int
from bilevel_maml.cli import run_script  # noqa: E402

CPU = torch.device("cpu")


def fastest_ms(fn, repeats: int) -> float:
    fn()  # warm-up (XLA compiles on the first call)
    return 1e3 * min(timed(fn, CPU) for _ in range(repeats))


def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=positive_int, default=32, help="groups: tasks of a meta-batch")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed calls; the fastest is shown")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        import jax
    except ImportError:
        parser.exit(2, "error: jax is not importable: pip install jax (beside the venv, e.g. --target /tmp/jax)\n")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, args.tasks * 64, 14, 14), dtype=np.float32)
    w = rng.standard_normal((args.tasks * 64, 64, 3, 3), dtype=np.float32)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), feature_group_count=args.tasks)

    xla_forward = jax.jit(conv)
    xla_filter_grad = jax.jit(jax.grad(lambda w, x: (conv(x, w) ** 2).sum() / 2))
    xj, wj, xt, wt = jax.device_put(x), jax.device_put(w), torch.from_numpy(x), torch.from_numpy(w)

    def torch_filter_grad():
        weight = wt.detach().requires_grad_()
        return torch.autograd.grad((torch.conv2d(xt, weight, padding=1, groups=args.tasks) ** 2).sum() / 2, weight)[0]

    def torch_forward():
        with torch.no_grad():
            return torch.conv2d(xt, wt, padding=1, groups=args.tasks)

    if not (np.allclose(xla_forward(xj, wj), torch_forward(), rtol=1e-4, atol=1e-3)
            and np.allclose(xla_filter_grad(wj, xj), torch_filter_grad(), rtol=1e-4, atol=1e-1)):
        sys.exit("error: XLA's and PyTorch's grouped convolutions disagree; the timings below would compare "
                 "different computations")
    print(f"{args.tasks} tasks, conv 64->64 at 14x14, 5 images per task (the gradient rows include the forward); "
          f"XLA and PyTorch agree; fastest of "
          f"{args.repeats} calls on the CPU ({torch.get_num_threads()} PyTorch threads)")
    rows = {"forward": (lambda: xla_forward(xj, wj).block_until_ready(), torch_forward),
            "filter gradient": (lambda: xla_filter_grad(wj, xj).block_until_ready(), torch_filter_grad)}
    for name, (xla, pytorch) in rows.items():
        ms_xla, ms_torch = fastest_ms(xla, args.repeats), fastest_ms(pytorch, args.repeats)
        print(f"  {name:16} XLA:CPU {ms_xla:9.1f} ms   PyTorch {ms_torch:7.1f} ms   {ms_xla / ms_torch:6.1f}x")


if __name__ == "__main__":
    run_script(main)
