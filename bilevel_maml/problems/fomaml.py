"""First-order MAML: the query gradient at the adapted weights is applied to θ."""

from __future__ import annotations

import torch

from bilevel_maml.hypergradient import zeros_for_unused
from bilevel_maml.problems.base import MetaLearner, TaskLearner


class FOMAMLLower(TaskLearner):
    """Plain inner SGD from a graph-free view of θ; no second-order terms are kept."""


class FOMAMLUpper(MetaLearner):
    """θ.grad = ∇_φ L_query(φ_K): the Jacobian dφ_K/dθ is taken to be the identity."""

    def meta_gradient(self, query_loss):
        """∇_φ L_query(φ_K), summed over stacked tasks: dφ_K/dθ is taken as the identity.

        :param query_loss: the query loss of the adapted learner.
        """
        phi = self.task_learner.params
        return self.reduce_over_tasks(zeros_for_unused(torch.autograd.grad(query_loss, phi, allow_unused=True), phi))
