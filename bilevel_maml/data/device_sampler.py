"""Device-resident episodic sampling: a whole split as one tensor, every task of a draw at once.

learn2learn's ``Taskset`` builds each task on the CPU in Python, one at a time: on a GPU, drawing a
meta-batch of 32 Omniglot tasks took as long as the whole meta-step. :class:`DeviceTaskSampler`
holds the split's images on the engine's device and draws ``count`` tasks with a handful of tensor
operations:

* classes without replacement per task: the ``ways`` smallest of one uniform key per class (so the
  classes come in uniformly random order, and label ``k`` is the ``k``-th class drawn, which is
  what learn2learn's ``RemapLabels`` gives: a uniformly random labelling);
* examples without replacement per class: the ``shots + query_shots`` smallest keys of that class's
  examples, the first ``shots`` the support set and the rest the query set (disjoint);
* optionally a random multiple of 90° per class and task (learn2learn's ``RandomClassRotation``).

The draw is the same task *distribution* as the learn2learn path, not the same stream: its random
numbers come from a ``torch.Generator`` on the device (the env saves its state in checkpoints).
:func:`sampler_from_taskset` turns a learn2learn ``Taskset`` into a sampler when every one of its
task transforms has an exact equivalent here, and says why not otherwise.
"""

from __future__ import annotations

import os

import torch

from bilevel_maml.validation import check_positive_int

#: the sampler's share of a device's memory, for all splits together, when none is given
DEFAULT_MEMORY_FRACTION = 0.25
#: under ``sampler="auto"``, larger splits stay on learn2learn's path: every example is loaded when
#: the engine is built (mini-ImageNet's 38,400 training images take seconds; tiered-ImageNet's
#: 448,695 PNGs would take minutes at every start)
AUTO_MAX_EXAMPLES = 100_000
#: examples loaded twice to tell an item transform that draws at random from a fixed one (a
#: horizontal flip half the time escapes 16 probes with probability 2**-16)
TRANSFORM_PROBES = 16


class UnsupportedTaskSource(ValueError):
    """A task source with no exact device-resident equivalent; the message says which part."""


class DeviceTaskSource:
    """A task source that draws whole meta-batches on its device from a ``torch.Generator`` there,
    without a host synchronisation, so a captured CUDA graph can draw its own tasks.
    :class:`~bilevel_maml.env.EpisodicEnv` takes one as it is (its generator state goes into
    checkpoints). Subclasses set ``ways`` (None for regression), ``shots``, ``query_shots`` and
    ``regression``, and implement :attr:`device`, :meth:`to` and :meth:`sample`.
    """

    regression = False
    ways: int | None = None
    shots: int | None = None
    query_shots: int | None = None

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def to(self, device) -> "DeviceTaskSource":
        """Moves what the source holds to ``device`` (in place; returns self).

        :param device: the target device.
        """
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes the source holds on its device."""
        return 0

    def generator(self, seed: int) -> torch.Generator:
        """A new random stream on this source's device.

        :param seed: the stream's seed.
        """
        return torch.Generator(device=self.device).manual_seed(seed)

    def sample(self, count: int, generator: torch.Generator, dtype: torch.dtype | None = None):
        """``count`` tasks as ``((xs, ys), (xq, yq))``, stacked along a leading task axis.

        :param count: tasks to draw.
        :param generator: the random stream (from :meth:`generator`), advanced by the draw.
        :param dtype: dtype of the inputs (default: the source's own).
        """
        raise NotImplementedError


class DeviceTaskSampler(DeviceTaskSource):
    """Draws few-shot classification tasks from tensors held on one device.

    :param images: every example of the split, stacked: ``(examples, *shape)``. ``uint8`` images
        are divided by ``denominator`` after gathering (a split of 8-bit images then takes a
        quarter of the memory).
    :param class_members: per class, the indices of its examples in ``images``.
    :param ways: classes per task.
    :param shots: support examples per class.
    :param query_shots: query examples per class (disjoint from the support examples).
    :param rotations: quarter turns to choose from, uniformly and independently for each class of
        each task (``(0, 1, 2, 3)`` is learn2learn's ``RandomClassRotation`` by 0/90/180/270°);
        ``(0,)`` rotates nothing.
    :param denominator: what ``uint8`` images are divided by.
    """

    def __init__(self, images: torch.Tensor, class_members: list[torch.Tensor] | list[list[int]], ways: int,
                 shots: int, query_shots: int, *, rotations=(0,), denominator: float = 255.0):
        self.ways = check_positive_int("ways", ways)
        self.shots = check_positive_int("shots", shots)
        self.query_shots = check_positive_int("query_shots", query_shots)
        self.rotations = tuple(int(r) % 4 for r in rotations)
        if not self.rotations:
            raise ValueError("rotations must name at least one quarter turn, e.g. (0,)")
        if len(class_members) < ways:
            raise ValueError(f"ways={ways} is more than its {len(class_members)} classes; "
                             f"choose ways <= {len(class_members)}")
        counts = [len(m) for m in class_members]
        per_class = shots + query_shots
        if min(counts) < per_class:
            raise ValueError(f"shots + query_shots = {shots} + {query_shots} = {per_class} is more than the "
                             f"{min(counts)} examples of the smallest class; choose shots + query_shots <= {min(counts)}")
        if any(r and images.shape[-1] != images.shape[-2] for r in self.rotations):
            raise ValueError(f"rotating by quarter turns needs square images, got {tuple(images.shape[1:])}")
        self.images = images
        self.denominator = denominator
        # Classes padded to the largest one; a padded slot gets a key above every real one.
        widest = max(counts)
        members = torch.zeros(len(counts), widest, dtype=torch.long)
        for c, m in enumerate(class_members):
            members[c, :len(m)] = torch.as_tensor(m, dtype=torch.long)
        self.members = members.to(images.device)
        self.padding = (torch.arange(widest) >= torch.tensor(counts).unsqueeze(1)).to(images.device)
        self.uneven = bool(self.padding.any())
        # on the device already: a copy from the host while drawing would break a CUDA-graph capture
        self.turns = torch.tensor(self.rotations, device=images.device)

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def num_classes(self) -> int:
        return len(self.members)

    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size() + self.members.numel() * 8

    def to(self, device) -> "DeviceTaskSampler":
        """Moves the split's tensors to ``device`` (in place; returns self).

        :param device: the target device.
        """
        device = torch.device(device)
        if device != self.device:
            self.images, self.members, self.padding, self.turns = (
                t.to(device) for t in (self.images, self.members, self.padding, self.turns))
        return self

    def sample(self, count: int, generator: torch.Generator, dtype: torch.dtype | None = None):
        """``count`` tasks as ``((xs, ys), (xq, yq))``, stacked along a leading task axis: support
        ``(count, ways * shots, *shape)``, query ``(count, ways * query_shots, *shape)``, labels
        ``0..ways-1`` grouped by class. No host synchronisation, so it can run inside a CUDA graph.

        :param count: tasks to draw.
        :param generator: the random stream (from :meth:`generator`), advanced by the draw.
        :param dtype: dtype of the inputs (default: the split's own).
        """
        device, ways, shots = self.device, self.ways, self.shots
        per_class = shots + self.query_shots
        class_keys = torch.rand(count, self.num_classes, generator=generator, device=device)
        classes = class_keys.topk(ways, dim=1, largest=False).indices                     # (count, ways)
        example_keys = torch.rand(count, ways, self.members.shape[1], generator=generator, device=device)
        if self.uneven:
            example_keys = example_keys.masked_fill(self.padding[classes], 2.0)
        slots = example_keys.topk(per_class, dim=2, largest=False).indices                # (count, ways, per_class)
        picked = self.members[classes.unsqueeze(-1), slots]
        images = self.images[picked]                                                      # (count, ways, per_class, *shape)
        if self.rotations != (0,):
            images = self._rotate(images, count, generator)
        if images.dtype == torch.uint8:
            images = images.to(dtype or torch.float32) / self.denominator
        elif dtype is not None:
            images = images.to(dtype)
        labels = torch.arange(ways, device=device).view(1, ways, 1)
        shape = images.shape[3:]
        support = images[:, :, :shots].reshape(count, ways * shots, *shape)
        query = images[:, :, shots:].reshape(count, ways * self.query_shots, *shape)
        return ((support, labels.expand(count, ways, shots).reshape(count, -1)),
                (query, labels.expand(count, ways, self.query_shots).reshape(count, -1)))

    def _rotate(self, images, count, generator):
        choice = torch.randint(len(self.rotations), (count, self.ways), generator=generator, device=self.device)
        turns = self.turns[choice].view(count, self.ways, 1, *(1,) * (images.dim() - 3))
        rotated = images
        for k in sorted(set(self.rotations) - {0}):
            rotated = torch.where(turns == k, torch.rot90(images, k, dims=(-2, -1)), rotated)
        return rotated


# -- from a learn2learn Taskset ---------------------------------------------------------------------
def _transform_settings(taskset, ways: int, samples: int) -> tuple[tuple[int, ...], list | None]:
    """The rotations and class filter of ``taskset``'s transforms; raises if one has no exact
    equivalent here."""
    from bilevel_maml.data._learn2learn import import_learn2learn

    l2l = import_learn2learn()
    t = l2l.data.transforms
    rotations, filter_labels, drew_ways, drew_shots = (0,), None, False, False
    for transform in taskset.task_transforms:
        name = type(transform).__name__
        if isinstance(transform, (t.NWays, t.FusedNWaysKShots)):
            drew_ways = True
            if transform.n != ways:
                raise UnsupportedTaskSource(f"its {name} draws {transform.n} classes, not ways={ways}")
        if isinstance(transform, (t.KShots, t.FusedNWaysKShots)):
            drew_shots = True
            # k examples without replacement, of which the split keeps a random `samples`: the same
            # as drawing `samples` directly
            if transform.k < samples:
                raise UnsupportedTaskSource(f"its {name} draws {transform.k} examples per class, fewer than "
                                            f"shots + query_shots = {samples}")
            if transform.replacement:
                raise UnsupportedTaskSource(f"its {name} draws examples with replacement")
        if isinstance(transform, t.FusedNWaysKShots):
            filter_labels = transform.filter_labels
        elif isinstance(transform, l2l.vision.transforms.RandomClassRotation):
            quarters = [d / 90 for d in transform.degrees]
            if any(q != int(q) for q in quarters):
                raise UnsupportedTaskSource(f"its RandomClassRotation turns by {transform.degrees}°, not multiples of 90")
            rotations = tuple(int(q) % 4 for q in quarters)
        elif not isinstance(transform, (t.NWays, t.KShots, t.LoadData, t.RemapLabels, t.ConsecutiveLabels)):
            raise UnsupportedTaskSource(f"its task transform {name} has no device-resident equivalent")
    if not (drew_ways and drew_shots):
        raise UnsupportedTaskSource("its transforms do not draw both classes (NWays) and examples (KShots)")
    return rotations, filter_labels


def _refuse_random_item_transform(dataset, order: list[int]) -> None:
    """learn2learn's ``LoadData`` loads an example again at every draw, through the dataset's item
    transform; the device holds one loaded copy of each. So an item transform that draws at random
    (data augmentation) has no device equivalent. Told apart by loading :data:`TRANSFORM_PROBES`
    examples twice; the global random streams the loads draw from are put back."""
    from bilevel_maml.env import global_rng_state, set_global_rng_state  # env imports this module

    probes = order[::max(1, len(order) // TRANSFORM_PROBES)][:TRANSFORM_PROBES]
    outside = global_rng_state(cuda=False)
    try:
        for index in probes:
            if not torch.equal(torch.as_tensor(dataset[index][0]), torch.as_tensor(dataset[index][0])):
                raise UnsupportedTaskSource(
                    f"its dataset's item transform draws at random (data augmentation: example {index} loaded "
                    f"twice differs), and the device holds one loaded copy of each example")
    finally:
        set_global_rng_state(outside)


def _quantized(images: torch.Tensor, denominator: float) -> torch.Tensor | None:
    """``images`` as uint8 if they are exactly ``k / denominator`` for integers 0..255, else None."""
    if not images.is_floating_point():
        return None
    steps = torch.round(images * denominator)
    if steps.min() < 0 or steps.max() > 255 or not torch.equal(steps.to(torch.uint8).to(images.dtype) / denominator, images):
        return None
    return steps.to(torch.uint8)


def sampler_from_taskset(taskset, ways: int, shots: int, query_shots: int, device, max_bytes: int | None = None,
                         max_examples: int | None = None) -> DeviceTaskSampler:
    """The :class:`DeviceTaskSampler` drawing the same task distribution as learn2learn ``taskset``.

    Every example of the split is loaded once through the taskset's dataset (its item transform
    applied, as ``LoadData`` would) and kept on ``device``; 8-bit images divided by 255 are kept as
    ``uint8``. Raises :class:`UnsupportedTaskSource` naming the reason when there is no exact
    equivalent (a task transform without one, an item transform that draws at random such as data
    augmentation, a fixed pool of tasks) or the split is larger than ``max_bytes`` or ``max_examples``.

    :param taskset: a learn2learn ``Taskset`` whose transforms are the built-in datasets' (``NWays``, ``KShots``, ``LoadData``, ``RemapLabels``, ``ConsecutiveLabels``, rotations).
    :param ways: classes per task.
    :param shots: support examples per class.
    :param query_shots: query examples per class.
    :param device: where the split is held and tasks are drawn.
    :param max_bytes: refuse (:class:`UnsupportedTaskSource`) a split larger than this many bytes on the device.
    :param max_examples: refuse a split with more examples than this (None: no limit).
    """
    dataset = getattr(taskset, "dataset", None)
    by_class = getattr(dataset, "labels_to_indices", None)
    if not hasattr(taskset, "task_transforms") or not by_class:
        raise UnsupportedTaskSource(f"{type(taskset).__name__} is not a learn2learn Taskset over a MetaDataset")
    if getattr(taskset, "num_tasks", -1) != -1:
        raise UnsupportedTaskSource(f"it cycles through a fixed pool of {taskset.num_tasks} tasks (num_tasks)")
    rotations, filter_labels = _transform_settings(taskset, ways, shots + query_shots)
    labels = sorted(by_class) if filter_labels is None else [c for c in sorted(by_class) if c in set(filter_labels)]
    order = [i for c in labels for i in by_class[c]]
    if max_examples is not None and len(order) > max_examples:
        raise UnsupportedTaskSource(f"its {len(order)} examples are more than the {max_examples} loaded up front by "
                                    f"default (--sampler device / sampler='device' loads them all)")
    _refuse_random_item_transform(dataset, order)
    first = torch.as_tensor(dataset[order[0]][0])
    eight_bit = _quantized(first, 255.0) is not None
    bytes_each = first.numel() * (1 if eight_bit else first.element_size())
    if max_bytes is not None and len(order) * bytes_each > max_bytes:
        raise UnsupportedTaskSource(f"its {len(order)} examples need {len(order) * bytes_each / 2**20:.0f} MB on "
                                    f"{device}, over the {max_bytes / 2**20:.0f} MB left for device-resident splits")
    images = torch.empty((len(order), *first.shape), dtype=torch.uint8 if eight_bit else first.dtype)
    for slot, index in enumerate(order):
        image = torch.as_tensor(dataset[index][0])
        if images.dtype == torch.uint8:
            steps = _quantized(image, 255.0)
            if steps is None:  # not 8-bit after all: keep what was loaded, as floats
                images = images.to(image.dtype) / 255.0
            else:
                image = steps
        images[slot] = image
    members, start = [], 0
    for c in labels:
        members.append(range(start, start + len(by_class[c])))
        start += len(by_class[c])
    return DeviceTaskSampler(images.to(device), members, ways, shots, query_shots, rotations=rotations)


def device_memory_budget(device) -> int:
    """:data:`DEFAULT_MEMORY_FRACTION` of ``device``'s memory (of the host's RAM for the CPU).

    :param device: a ``torch.device`` or its name.
    """
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * DEFAULT_MEMORY_FRACTION)


__all__ = ["DeviceTaskSampler", "DeviceTaskSource", "UnsupportedTaskSource", "device_memory_budget",
           "sampler_from_taskset"]
