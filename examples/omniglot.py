"""Few-shot Omniglot with any registered algorithm (maml, fomaml, imaml, metasgd, anil, maml++, reptile, boil)
on the local official subsets.

Meta-trains on the characters of images_background_small1, validates on held-out small1
characters, and reports accuracy on the small2 characters never seen in meta-training.

    python examples/omniglot.py --data-root ../shared/data/omniglot-small --algorithm maml
"""

import argparse

import torch

from bilevel_maml import ALGORITHMS, build_engine
from bilevel_maml.arguments import OneLineParser, positive_float, positive_int
from bilevel_maml.cli import run_script
from bilevel_maml.data import omniglot_small_tasksets
from bilevel_maml.data.sources import inner_loop_defaults
from bilevel_maml.models import Conv4


class PrintValidation:
    """An engine callback: one line per validation."""

    def on_validation_end(self, engine, stats, improved):
        print(f"  iteration {engine.meta_iteration:4d}  validation accuracy "
              f"{100 * stats['accuracy']:.1f}% ± {100 * stats['accuracy_ci95']:.1f}%", flush=True)


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/omniglot-small")
    parser.add_argument("--algorithm", default="maml", choices=sorted(ALGORITHMS))
    parser.add_argument("--ways", type=positive_int, default=5)
    parser.add_argument("--shots", type=positive_int, default=1)
    parser.add_argument("--inner-steps", type=positive_int, help="default: the algorithm's on Omniglot (MAML's: 1)")
    parser.add_argument("--inner-lr", type=positive_float, help="default: the algorithm's on Omniglot (MAML's: 0.4)")
    parser.add_argument("--iterations", type=positive_int, default=200)
    parser.add_argument("--meta-batch-size", type=positive_int, default=8)
    parser.add_argument("--valid-every", type=positive_int, default=50)
    parser.add_argument("--test-tasks", type=positive_int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # FOMAML, iMAML, Reptile and MAML++ want several smaller inner steps than MAML's one of 0.4 (iMAML a smaller λ)
    loop = inner_loop_defaults("omniglot-small", args.algorithm)
    inner_steps = loop["inner_steps"] if args.inner_steps is None else args.inner_steps
    inner_lr = loop["inner_lr"] if args.inner_lr is None else args.inner_lr
    torch.manual_seed(args.seed)
    tasksets = omniglot_small_tasksets(args.data_root, ways=args.ways, samples_per_class=2 * args.shots)
    engine = build_engine(
        args.algorithm, Conv4(args.ways), tasksets,
        ways=args.ways, shots=args.shots, inner_steps=inner_steps, inner_lr=inner_lr, lam=loop["lam"],
        meta_lr=1e-3, meta_batch_size=args.meta_batch_size, meta_iterations=args.iterations,
        valid_step=args.valid_every, valid_tasks=100, seed=args.seed,
    )
    engine.callbacks.append(PrintValidation())
    print(f"{args.algorithm}: {args.iterations} meta-iterations of {args.meta_batch_size} "
          f"{args.ways}-way {args.shots}-shot Omniglot tasks, {inner_steps} inner step{'s' * (inner_steps > 1)} of {inner_lr}")
    engine.run()
    result = engine.test(args.test_tasks)
    print(f"held-out {args.ways}-way {args.shots}-shot accuracy: {100 * result['accuracy']:.1f}% "
          f"± {100 * result['accuracy_ci95']:.1f}% (95% CI over {result['tasks']} tasks of unseen characters)")


if __name__ == "__main__":
    run_script(main)  # bad input: one line and exit status 2, as the bilevel-maml command prints it
