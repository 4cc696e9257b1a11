"""5-way 1-shot mini-ImageNet (MAML paper: conv4 with 32 filters, α = 0.01, 5 inner steps,
10 on the validation and test tasks).

Uses learn2learn's get_tasksets; place mini-imagenet-cache-{train,validation,test}.pkl in
--data-root (or pass --download on a machine with internet access).

    python examples/mini_imagenet.py --data-root ~/data --algorithm fomaml
"""

import argparse

import torch

from bilevel_maml import ALGORITHMS, build_engine
from bilevel_maml.arguments import OneLineParser, device_name, positive_int
from bilevel_maml.cli import run_script
from bilevel_maml.data.benchmarks import benchmark_tasksets
from bilevel_maml.models import Conv4


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="~/data")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--algorithm", default="maml", choices=sorted(ALGORITHMS))
    parser.add_argument("--ways", type=positive_int, default=5)
    parser.add_argument("--shots", type=positive_int, default=1)
    parser.add_argument("--query-shots", type=positive_int, default=15)
    parser.add_argument("--inner-steps", type=positive_int, default=5)
    parser.add_argument("--eval-inner-steps", type=positive_int, default=10)
    parser.add_argument("--iterations", type=positive_int, default=60000)
    parser.add_argument("--meta-batch-size", type=positive_int, default=4)
    parser.add_argument("--test-tasks", type=positive_int, default=600)
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tasksets = benchmark_tasksets("mini-imagenet", args.data_root, ways=args.ways,
                                  samples_per_class=args.shots + args.query_shots,
                                  download=args.download, data_augmentation="normalize")
    engine = build_engine(
        args.algorithm, Conv4(args.ways, in_channels=3, hidden=32, image_size=84), tasksets,
        ways=args.ways, shots=args.shots, query_shots=args.query_shots, inner_steps=args.inner_steps,
        eval_inner_steps=args.eval_inner_steps, inner_lr=0.01, meta_lr=1e-3, meta_batch_size=args.meta_batch_size,
        meta_iterations=args.iterations, valid_step=max(1, min(500, args.iterations)), seed=args.seed,
        device=args.device,
    )
    engine.run()
    result = engine.test(args.test_tasks)
    print(f"mini-ImageNet {args.ways}-way {args.shots}-shot test accuracy: {100 * result['accuracy']:.2f}% "
          f"± {100 * result['accuracy_ci95']:.2f}% (95% CI over {result['tasks']} tasks)")


if __name__ == "__main__":
    run_script(main)  # bad input: one line and exit status 2, as the bilevel-maml command prints it
