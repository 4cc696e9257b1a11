"""CAVIA (Zintgraf et al., 2019) written as a variant of your own: the inner loop adapts only a few
context parameters, which start at zero for every task and enter the network as extra inputs; the
network itself is learned by the outer loop alone. Compared here with MAML on sinusoid regression
at the same budget (K = 10 points, one inner step, the same training and test tasks).

    python examples/cavia.py --iterations 2000

Imported, the file registers the algorithm ``"cavia"`` and the model ``"context-mlp"``, so the
command line trains, evaluates, resumes and plots CAVIA runs too (from the repository's root):

    python -m bilevel_maml train --plugin examples.cavia --algorithm cavia --model context-mlp \
        --dataset sinusoid --inner-lr 1.0 --output runs/cavia

and ``"context-conv4"`` for images (FiLM from 100 context parameters on the last block's input):

    python -m bilevel_maml train --plugin examples.cavia --algorithm cavia --model context-conv4 \
        --inner-lr 10 --inner-steps 2 --output runs/cavia-omniglot
"""

import argparse

import torch
from torch import nn

from bilevel_maml import build_engine, register_algorithm
from bilevel_maml.arguments import OneLineParser, positive_float, positive_int
from bilevel_maml.cli import run_script
from bilevel_maml.data import SinusoidTasks
from bilevel_maml.models import MLP, Conv4, register_model
from bilevel_maml.problems import MAMLLower, MAMLUpper
from bilevel_maml.validation import check_positive_int


class ContextMLP(nn.Module):
    """An MLP whose input is extended with ``contexts`` context parameters, as CAVIA's network is."""

    def __init__(self, inputs, outputs, hidden=40, contexts=4, activation=nn.ReLU):
        super().__init__()
        self.context = nn.Parameter(torch.zeros(check_positive_int("contexts", contexts)))
        self.body = nn.Sequential(nn.Linear(inputs + contexts, hidden), activation(),
                                  nn.Linear(hidden, hidden), activation(), nn.Linear(hidden, outputs))

    def forward(self, x):
        return self.body(torch.cat([x, self.context.expand(*x.shape[:-1], -1)], -1))


class ContextConv4(nn.Module):
    """Conv4 whose last block sees its input modulated by FiLM (a scale and a shift per channel)
    computed from ``contexts`` context parameters: CAVIA's way into a convolutional network."""

    def __init__(self, ways, in_channels=1, image_size=28, hidden=32, contexts=100):
        super().__init__()
        self.context = nn.Parameter(torch.zeros(check_positive_int("contexts", contexts)))
        self.conv = Conv4(ways, in_channels=in_channels, hidden=hidden, image_size=image_size)
        self.film = nn.Linear(contexts, 2 * hidden)

    def forward(self, x):
        *early, last = self.conv.features
        for block in early:
            x = block(x)
        scale, shift = self.film(self.context).chunk(2)
        x = last(x * (1 + scale[:, None, None]) + shift[:, None, None])
        return self.conv.classifier(x.flatten(1))


class CAVIALower(MAMLLower):
    """Adapts only the parameter named ``context``, from zero for every task. MAML's Upper then
    differentiates the query loss through the context's inner steps into the network."""

    def adapts(self, name):
        return name == "context"

    def start_params(self):
        return tuple(torch.zeros_like(p).requires_grad_() if name == "context" else p
                     for name, p in zip(self.param_names, super().start_params()))


def context_mlp(ways, in_features, image_size, width=None):
    """``--model context-mlp``: ContextMLP for vector inputs (sinusoid's points), ``width`` hidden units."""
    if image_size is not None:
        raise ValueError("context-mlp takes vector inputs (sinusoid's points, say), not images")
    return ContextMLP(in_features, ways, hidden=width or 40)


def context_conv4(ways, in_channels, image_size, width=None):
    """``--model context-conv4``: ContextConv4 for images, ``width`` filters (default 32)."""
    if image_size is None:
        raise ValueError("context-conv4 takes images, not vector inputs")
    return ContextConv4(ways, in_channels, image_size, hidden=width or 32)


register_algorithm("cavia", MAMLUpper, CAVIALower)
register_model("context-mlp", context_mlp)
register_model("context-conv4", context_conv4)


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=positive_int, default=2000)
    parser.add_argument("--meta-batch-size", type=positive_int, default=25)
    parser.add_argument("--contexts", type=positive_int, default=4, help="context parameters (default: 4)")
    parser.add_argument("--context-lr", type=positive_float, default=1.0, help="CAVIA's inner step size (default: 1.0)")
    parser.add_argument("--maml-inner-lr", type=positive_float, default=0.01,
                        help="MAML's inner step size (default: 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    runs = {"CAVIA": ("cavia", lambda: ContextMLP(1, 1, contexts=args.contexts), args.context_lr),
            "MAML": ("maml", lambda: MLP(1, 1, (40, 40)), args.maml_inner_lr)}
    for label, (algorithm, model, inner_lr) in runs.items():
        torch.manual_seed(args.seed)
        engine = build_engine(algorithm, model(), SinusoidTasks(points=20), regression=True, shots=10,
                              inner_lr=inner_lr, meta_batch_size=args.meta_batch_size,
                              meta_iterations=args.iterations, valid_step=max(1, args.iterations // 5),
                              seed=args.seed)
        engine.run()
        result = engine.test(num_tasks=600)
        adapted = sum(p.numel() for name, p in engine.meta_learner.module.named_parameters() if engine.task_learner.adapts(name))
        print(f"{label:5s} post-adaptation MSE {result['loss']:.3f} ± {result['loss_ci95']:.3f} "
              f"({result['tasks']} test tasks; {adapted} of {sum(p.numel() for p in engine.meta_learner.module.parameters())} "
              f"parameters adapted per task)", flush=True)


if __name__ == "__main__":
    run_script(main)  # bad input: one line and exit status 2, as the bilevel-maml command prints it
