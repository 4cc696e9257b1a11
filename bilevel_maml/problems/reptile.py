"""Reptile (Nichol et al., 2018): move θ toward the weights each task's inner loop reached.

The inner loop trains on the whole task (support and query examples together) from a graph-free
copy of θ; the meta-gradient is θ − φ_K, averaged over the meta-batch, so an outer SGD step of
size ε gives θ ← θ + ε·mean(φ_K − θ). No second-order term is taken: with one inner step it is
joint training's gradient; the meta-learning signal needs ``inner_steps`` > 1.
"""

from __future__ import annotations

import torch

from bilevel_maml.problems.base import MetaLearner, TaskLearner


class ReptileLower(TaskLearner):
    """Inner SGD on the support and query examples of the task together."""

    def get_batch(self):
        support, query = self.env.batch["support"], self.env.batch["query"]
        examples = 1 if self.tasks_in_batch else 0  # after the task axis, when vectorized
        return tuple(torch.cat([s, q], dim=examples) for s, q in zip(support, query))


class ReptileUpper(MetaLearner):
    """θ.grad = mean over the meta-batch of θ − φ_K. The query loss it reports is measured after
    the inner loop trained on those examples too."""

    def training_step(self, batch):
        with torch.no_grad():  # reported only: the meta-gradient does not differentiate it
            return super().training_step(batch)

    def meta_gradient(self, query_loss):
        """This task's share of mean(θ − φ_K) (the query loss is not differentiated).

        :param query_loss: the query loss of the adapted learner (unused).
        """
        theta, phi = self.initialization(), self.task_learner.params
        # one task (or one vmapped chunk) of the meta-batch: its share of the mean
        return tuple(g / self.meta_batch_size for g in self.reduce_over_tasks([t - p for t, p in zip(theta, phi)]))
