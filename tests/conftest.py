from pathlib import Path

import pytest
import torch
from torch.func import functional_call, vmap

from bilevel_maml.env import EpisodicEnv
from bilevel_maml.execution import HostReadWatch

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT_SMALL = REPO.parent / "shared" / "data" / "omniglot-small"


@pytest.fixture(scope="session")
def omniglot_root():
    if not (OMNIGLOT_SMALL / "images_background_small1.zip").is_file():
        pytest.fail(f"the Omniglot subsets are expected in {OMNIGLOT_SMALL} (../shared beside the repo)")
    return OMNIGLOT_SMALL


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("omniglot-cache")


class RecordingSGD(torch.optim.SGD):
    """SGD that remembers the gradient it was handed at each step."""

    def __init__(self, params, lr=0.0):
        super().__init__(params, lr=lr)
        self.seen_grads = []

    def step(self, closure=None):
        self.seen_grads.append([None if p.grad is None else p.grad.detach().clone()
                                for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def tasks_in_batch(env):
    """The tasks of ``env.batch`` as ``((xs, ys), (xq, yq))`` each."""
    (xs, ys), (xq, yq) = env.batch["support"], env.batch["query"]
    if not env.stacked:
        return [((xs, ys), (xq, yq))]
    # the vectorized path stacks the meta-batch along a leading task axis
    return [((xs[i], ys[i]), (xq[i], yq[i])) for i in range(env.tasks_per_step)]


class RecordingEnv(EpisodicEnv):
    """Keeps every task it hands out, so a test can recompute the meta-gradient by hand."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.episodes = []

    def step(self):
        super().step()
        self.episodes += tasks_in_batch(self)


def vmapped_meta_gradient(loss, params, inputs, wrt, inputs_dim=0):
    """What the vectorized inner loop differentiates: one SGD step (0.1) of each task's ``loss(p, x)``
    under vmap, with autograd outside vmap (``params`` per task, e.g. expanded from shared leaves),
    then the gradient of the adapted losses with respect to ``wrt``. ``inputs_dim``: where the tasks
    lie in ``inputs`` (vmap's ``in_dims`` for them)."""
    def losses(p):
        return vmap(loss, in_dims=(0, inputs_dim))(p, inputs).sum()

    grads = torch.autograd.grad(losses(params), params, create_graph=True)
    return torch.autograd.grad(losses(tuple(p - 0.1 * g for p, g in zip(params, grads))), wrt)


def functional(model):
    names = [name for name, _ in model.named_parameters()]

    def forward(params, inputs):
        return functional_call(model, dict(zip(names, params)), (inputs,))

    return forward


def random_classification_source(ways, per_class, features, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(64, features, generator=generator, dtype=dtype)

    def sample():
        classes = torch.randperm(64)[:ways]
        labels = classes.repeat_interleave(per_class)
        inputs = centers[labels] + 0.5 * torch.randn(len(labels), features, dtype=dtype)
        return inputs, labels

    return sample


def write_mini_imagenet_pickles(folder, classes, per_class, seed=0):
    """Files laid out as learn2learn's mini-ImageNet pickles, one per split, of random 84×84 images."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    for split in ("train", "validation", "test"):
        data = {"image_data": rng.integers(0, 256, size=(classes * per_class, 84, 84, 3), dtype=np.uint8),
                "class_dict": {f"{split}{c}": list(range(per_class * c, per_class * (c + 1))) for c in range(classes)}}
        with open(Path(folder) / f"mini-imagenet-cache-{split}.pkl", "wb") as handle:
            pickle.dump(data, handle)


def first_host_read_in_capturable_region(built, warm_up=True):
    """With the non-finite check left on the device, the first host read (one line) while ``built``
    runs a meta-iteration's tasks, after an eager meta-iteration to warm up; None if there is none."""
    built.train()
    if warm_up:
        built.meta_step()
    built.meta_learner.check_on_device = True
    watch = HostReadWatch()
    with watch:
        built.execution.run_tasks()
    return watch.first
