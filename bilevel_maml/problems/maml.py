"""MAML (Finn et al., 2017): the meta-gradient flows through the unrolled inner steps."""

from __future__ import annotations

from bilevel_maml.hypergradient import gradients_or_zeros
from bilevel_maml.problems.base import MetaLearner, TaskLearner


class MAMLLower(TaskLearner):
    """Starts from θ itself and keeps every inner step in the autograd graph (second order)."""

    second_order = True

    def start_params(self):
        # θ itself, not a copy: a copy would cut the graph and leave θ without a gradient.
        return tuple(self.meta_learner.initialization())


class MAMLUpper(MetaLearner):
    """θ.grad = d L_query(φ_K(θ)) / dθ, differentiating through all K inner steps."""

    def meta_gradient(self, query_loss):
        """d L_query(φ_K(θ)) / dθ: autograd through the K inner steps kept in the graph.

        :param query_loss: the query loss of the adapted learner.
        """
        theta = self.trainable_parameters()
        return gradients_or_zeros(query_loss, theta)
