"""Sinusoid regression (MAML paper, section 5.1): meta-learn an initialisation that fits a new
sine wave from K = 10 points after one gradient step.

    python examples/sinusoid.py --algorithm maml --iterations 1500
"""

import argparse

import torch

from bilevel_maml import ALGORITHMS, build_engine
from bilevel_maml.arguments import OneLineParser, positive_float, positive_int
from bilevel_maml.cli import run_script
from bilevel_maml.data import SinusoidTasks
from bilevel_maml.models import MLP


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", default="maml", choices=sorted(ALGORITHMS))
    parser.add_argument("--shots", type=positive_int, default=10)
    parser.add_argument("--inner-steps", type=positive_int, default=1)
    parser.add_argument("--inner-lr", type=positive_float, default=0.1)
    parser.add_argument("--iterations", type=positive_int, default=1500)
    parser.add_argument("--meta-batch-size", type=positive_int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    engine = build_engine(
        args.algorithm, MLP(1, 1, (40, 40)), SinusoidTasks(points=2 * args.shots), regression=True,
        shots=args.shots, inner_steps=args.inner_steps, inner_lr=args.inner_lr, meta_lr=3e-3,
        meta_batch_size=args.meta_batch_size, meta_iterations=args.iterations,
        valid_step=max(1, args.iterations // 5), valid_tasks=100, seed=args.seed,
    )
    before = engine.test(num_tasks=600)
    engine.run()
    after = engine.test(num_tasks=600)
    print(f"post-adaptation MSE: {before['loss']:.3f} ± {before['loss_ci95']:.3f} before meta-training, "
          f"{after['loss']:.3f} ± {after['loss_ci95']:.3f} after ({before['loss'] / after['loss']:.1f}× lower)")


if __name__ == "__main__":
    run_script(main)  # bad input: one line and exit status 2, as the bilevel-maml command prints it
