"""Betty's iMAML walk-through, done with bilevel_maml's Env, Upper/Lower problems and Engine.

The walk-through defines an Env that samples one task and hands its two splits to the problems, an
Upper problem (θ, AdamW + cosine schedule, gradient accumulation over the meta-batch), a Lower
problem (inner SGD with the proximal term, restarted from θ at each inner loop) and an Engine that
steps the Env before each task. Each piece has a class here:

    python examples/imaml_with_betty.py --data-root ../shared/data/omniglot-small
"""

import argparse

import torch

from bilevel_maml import EpisodicEnv, IMAMLLower, IMAMLUpper, MetaEngine
from bilevel_maml.arguments import OneLineParser, positive_float, positive_int
from bilevel_maml.cli import run_script
from bilevel_maml.data import omniglot_small_tasksets
from bilevel_maml.models import Conv4


class PrintValidation:
    """The walk-through's validation printout, as an engine callback."""

    def on_validation_end(self, engine, stats, improved):
        best = " (best so far)" if improved else ""
        print(f"iteration {engine.meta_iteration:4d}  validation accuracy {100 * stats['accuracy']:.1f}%{best}",
              flush=True)


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/omniglot-small")
    parser.add_argument("--ways", type=positive_int, default=5)
    parser.add_argument("--shots", type=positive_int, default=1)
    parser.add_argument("--inner-steps", type=positive_int, default=5)
    parser.add_argument("--lam", type=positive_float, default=1.0, help="proximal strength λ")
    parser.add_argument("--meta-batch-size", type=positive_int, default=8)
    parser.add_argument("--iterations", type=positive_int, default=300)
    parser.add_argument("--test-tasks", type=positive_int, default=600)
    args = parser.parse_args()
    torch.manual_seed(0)

    # Env: the walk-through's MAMLEnv. One task per step, split into support (Lower) and query (Upper).
    tasksets = omniglot_small_tasksets(args.data_root, ways=args.ways, samples_per_class=2 * args.shots)
    env = EpisodicEnv(tasksets.train, ways=args.ways, shots=args.shots, seed=0)
    valid_env = EpisodicEnv(tasksets.validation, ways=args.ways, shots=args.shots, seed=1)
    test_env = EpisodicEnv(tasksets.test, ways=args.ways, shots=args.shots, seed=2)

    # Upper: θ, the outer optimizer and its schedule; meta_batch_size is Betty's gradient_accumulation.
    model = Conv4(args.ways)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.iterations)
    upper = IMAMLUpper(model, optimizer, meta_batch_size=args.meta_batch_size, scheduler=scheduler,
                       cg_iterations=5)

    # Lower: inner SGD on L_support(φ) + λ/2 ‖φ − θ‖², restarted from θ by on_inner_loop_start.
    lower = IMAMLLower(model, inner_lr=0.4, inner_steps=args.inner_steps, lam=args.lam)

    # Engine: Env step before each task's first inner step, meta-update after the meta-batch,
    # validation on the validation split; the test split only for the final report.
    engine = MetaEngine(upper, lower, env, meta_iterations=args.iterations, valid_env=valid_env,
                        test_env=test_env, valid_step=max(1, args.iterations // 4), valid_tasks=100)
    engine.callbacks.append(PrintValidation())
    engine.run()
    result = engine.test(args.test_tasks)
    print(f"iMAML held-out {args.ways}-way {args.shots}-shot accuracy: {100 * result['accuracy']:.1f}% "
          f"± {100 * result['accuracy_ci95']:.1f}% over {result['tasks']} tasks")


if __name__ == "__main__":
    run_script(main)  # bad input: one line and exit status 2, as the bilevel-maml command prints it
