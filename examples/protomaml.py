"""Proto-MAML (Triantafillou et al., 2020) written as a variant of your own: every inner loop starts
its output layer from the task's class prototypes (the mean embedding of each class's support
examples), as a prototypical network would classify, and MAML adapts from there. The meta-gradient
flows through the prototypes into the network's body. Its first-order form, fo-Proto-MAML (Meta-Dataset's
baseline), is one more class. Both are compared here with MAML on the Omniglot subsets at the same
budget (the same training and test tasks, one inner step of 0.4):

    python examples/protomaml.py --data-root ../shared/data/omniglot-small --iterations 300

Imported, the file registers the algorithms ``"protomaml"`` and ``"fo-protomaml"``, so the command
line trains, evaluates, resumes and plots their runs too (from the repository's root):

    python -m bilevel_maml train --plugin examples.protomaml --algorithm protomaml --output runs/protomaml
    python -m bilevel_maml evaluate --output runs/protomaml --per-step
"""

import argparse
import time

import torch
from torch import nn

from bilevel_maml import build_engine, register_algorithm
from bilevel_maml.arguments import OneLineParser, positive_float, positive_int
from bilevel_maml.cli import run_script
from bilevel_maml.data import omniglot_small_tasksets
from bilevel_maml.models import Conv4
from bilevel_maml.problems import MAMLLower, MAMLUpper


class ProtoMAMLLower(MAMLLower):
    """Starts the output layer (a ``nn.Linear``, the module owning the model's last parameter) at
    W = 2c, b = −‖c‖² from the support set's class prototypes c: its scores are then
    −‖x − c‖² + ‖x‖², the prototypical network's. θ's own output layer takes no part."""

    def __init__(self, module: nn.Module, inner_lr: float, **kwargs):
        super().__init__(module, inner_lr, **kwargs)
        self.head_name = self.param_names[-1].rpartition(".")[0]
        self.head = module.get_submodule(self.head_name)
        if not isinstance(self.head, nn.Linear) or self.head.bias is None:
            raise ValueError(f"Proto-MAML sets a linear output layer from prototypes; {type(module).__name__}'s "
                             f"last layer {self.head_name!r} is a {type(self.head).__name__} (with a bias needed)")

    def embed(self, params, inputs):
        """The output layer's input for ``inputs`` under weights ``params``."""
        seen = []
        hook = self.head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            self.forward(inputs, params)
        finally:
            hook.remove()
        return seen[0]

    def start_for_task(self, params, batch):
        inputs, labels = batch
        if labels.is_floating_point():
            raise ValueError("Proto-MAML classifies: its tasks' labels must be class indices, not real-valued targets")
        features = self.embed(params, inputs)
        members = (labels[:, None] == torch.arange(self.head.out_features, device=labels.device)).to(features.dtype)
        prototypes = members.T @ features / members.sum(0).clamp(min=1)[:, None]
        start = dict(zip(self.param_names, params))
        start[f"{self.head_name}.weight"] = 2 * prototypes
        start[f"{self.head_name}.bias"] = -prototypes.pow(2).sum(1)
        return tuple(start[name] for name in self.param_names)


class FirstOrderProtoMAMLLower(ProtoMAMLLower):
    """fo-Proto-MAML, Meta-Dataset's baseline: the inner steps are first order (their gradients are
    constants, so dφ_K/dφ_0 is the identity), but the meta-gradient still flows through the
    prototypes into the network's body, since the updates stay in the graph."""

    second_order = False

    @property
    def keep_update_graph(self):
        return True


register_algorithm("protomaml", MAMLUpper, ProtoMAMLLower)
register_algorithm("fo-protomaml", MAMLUpper, FirstOrderProtoMAMLLower)


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/omniglot-small")
    parser.add_argument("--iterations", type=positive_int, default=300)
    parser.add_argument("--meta-batch-size", type=positive_int, default=8)
    parser.add_argument("--ways", type=positive_int, default=5)
    parser.add_argument("--shots", type=positive_int, default=1)
    parser.add_argument("--inner-lr", type=positive_float, default=0.4)
    parser.add_argument("--width", type=positive_int, default=32, help="conv4's filters (default: 32)")
    parser.add_argument("--test-tasks", type=positive_int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tasksets = omniglot_small_tasksets(args.data_root, ways=args.ways, samples_per_class=2 * args.shots)
    for label, algorithm in (("Proto-MAML", "protomaml"), ("fo-Proto-MAML", "fo-protomaml"), ("MAML", "maml")):
        torch.manual_seed(args.seed)
        engine = build_engine(algorithm, Conv4(args.ways, hidden=args.width), tasksets, ways=args.ways,
                              shots=args.shots, inner_lr=args.inner_lr, meta_batch_size=args.meta_batch_size,
                              meta_iterations=args.iterations, valid_step=max(1, args.iterations // 5),
                              valid_tasks=100, seed=args.seed)
        started = time.perf_counter()
        engine.run()
        seconds = time.perf_counter() - started
        result = engine.test(num_tasks=args.test_tasks, per_step=True)
        means, widths = result["per_step"]["accuracy"], result["per_step"]["accuracy_ci95"]
        print(f"{label:13s} held-out {args.ways}-way {args.shots}-shot accuracy {100 * result['accuracy']:.2f}% "
              f"± {100 * result['accuracy_ci95']:.2f}% ({result['tasks']} test tasks; before the inner step "
              f"{100 * means[0]:.2f}% ± {100 * widths[0]:.2f}%; trained in {seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    run_script(main)  # bad input: one line and exit status 2, as the bilevel-maml command prints it
