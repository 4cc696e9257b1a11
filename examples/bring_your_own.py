"""Your own model, outer optimizer and task source: ResNet-12 meta-trained with Adafactor on a
task source written from scratch.

The task source is any object with ``sample()`` (or a plain function) returning one task's
``(inputs, labels)`` with at least ``shots + query_shots`` examples of each of ``ways`` classes;
the env splits it into support and query. Here every class is a random 3-channel texture and its
examples are noisy, randomly shifted crops of it, so tasks need adaptation: a class's texture is
new to the learner at test time.

    python examples/bring_your_own.py --iterations 100

Imported, the file registers the task source as ``--dataset textures``, so the command line trains,
evaluates, resumes and plots on it (from the repository's root):

    python -m bilevel_maml train --plugin examples.bring_your_own --dataset textures --model resnet12 \
        --width 16 --optimizer adafactor --meta-lr 1e-2 --output runs/textures
"""

import argparse

import torch
import torch.nn.functional as F

from bilevel_maml import build_engine
from bilevel_maml.arguments import OneLineParser, positive_int
from bilevel_maml.cli import run_script
from bilevel_maml.data import DatasetSpec, register_dataset
from bilevel_maml.models import ResNet12


class TextureTasks:
    """``ways`` fresh random textures per task; ``per_class`` noisy shifted 32×32 crops of each.

    It draws from torch's global random stream: each split's env switches to a seeded stream of its
    own around every draw (and checkpoints it), so the splits differ and a resumed run continues
    exactly where it stopped."""

    def __init__(self, ways: int, per_class: int, size: int = 32):
        self.ways, self.per_class, self.size = ways, per_class, size

    def sample(self):
        n, s = self.ways * self.per_class, self.size
        textures = F.avg_pool2d(torch.randn(self.ways, 3, s + 8, s + 8), 3, 1, 1)
        labels = torch.arange(self.ways).repeat_interleave(self.per_class)
        dx, dy = torch.randint(0, 9, (2, n))
        crops = torch.stack([textures[c, :, y:y + s, x:x + s] for c, x, y in zip(labels, dx, dy)])
        return crops + 0.5 * torch.randn(crops.shape), labels


def texture_tasksets(ways, samples_per_class):
    """``--dataset textures``: fresh textures in every split (each split's env has its own stream)."""
    return {split: TextureTasks(ways, samples_per_class) for split in ("train", "validation", "test")}


register_dataset("textures", texture_tasksets, DatasetSpec(in_channels=3, image_size=32, model="resnet12",
                                                           inner_lr=0.1))


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ways", type=positive_int, default=5)
    parser.add_argument("--shots", type=positive_int, default=1)
    parser.add_argument("--iterations", type=positive_int, default=100)
    parser.add_argument("--meta-batch-size", type=positive_int, default=4)
    parser.add_argument("--test-tasks", type=positive_int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)

    tasksets = texture_tasksets(args.ways, samples_per_class=2 * args.shots)  # shots support + shots query
    model = ResNet12(args.ways, in_channels=3, channels=(16, 32, 64, 128))  # a CPU-sized ResNet-12
    engine = build_engine(
        "maml", model, tasksets, ways=args.ways, shots=args.shots,
        inner_steps=1, inner_lr=0.1, meta_batch_size=args.meta_batch_size, meta_iterations=args.iterations,
        optimizer=torch.optim.Adafactor, meta_lr=1e-2,  # any torch.optim class, a name, or factory(params, lr)
        valid_step=max(1, args.iterations // 2), valid_tasks=50,
    )
    before = engine.test(args.test_tasks)
    engine.run()
    after = engine.test(args.test_tasks)
    print(f"ResNet-12 + Adafactor, {args.ways}-way {args.shots}-shot texture tasks: held-out accuracy "
          f"{100 * before['accuracy']:.1f}% before meta-training, {100 * after['accuracy']:.1f}% "
          f"± {100 * after['accuracy_ci95']:.1f}% after {args.iterations} meta-iterations")


if __name__ == "__main__":
    run_script(main)  # bad input: one line and exit status 2, as the bilevel-maml command prints it
