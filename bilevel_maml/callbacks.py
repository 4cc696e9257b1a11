"""The hooks :class:`~bilevel_maml.engine.MetaEngine` calls on each object in its ``callbacks``.

Subclassing :class:`Callback` is optional: the engine calls whichever of these methods an object
has. The built-in ones (:class:`~bilevel_maml.progress.ProgressBar`,
:class:`~bilevel_maml.checkpoint.Checkpointer`, :class:`~bilevel_maml.history.MetricsFile`) are
written this way.
"""

from __future__ import annotations


class Callback:
    """Base class of engine callbacks; every hook does nothing unless overridden."""

    def on_train_start(self, engine) -> None:
        """Called by :meth:`~bilevel_maml.engine.MetaEngine.run` before its first meta-iteration
        (also when a resumed run continues).

        :param engine: the :class:`~bilevel_maml.engine.MetaEngine`; ``engine.meta_iteration``
            is the iteration training starts after (0 for a new run).
        """

    def on_iteration_end(self, engine, metrics: dict) -> None:
        """Called after each meta-iteration (and its validation, when one was due).

        :param engine: the :class:`~bilevel_maml.engine.MetaEngine`; ``engine.meta_iteration``
            is the iteration just finished.
        :param metrics: ``train/*`` (``loss``, ``accuracy`` for classification, ``lr``,
            ``tasks_per_second``) and, on validation iterations, ``validation/*`` values, as logged.
        """

    def on_validation_end(self, engine, stats: dict, improved: bool) -> None:
        """Called after each validation.

        :param engine: the :class:`~bilevel_maml.engine.MetaEngine`.
        :param stats: the validation result (mean loss, accuracy and their 95% half-widths, tasks).
        :param improved: whether it beat every earlier validation of the run (``engine.best_valid``
            now holds it).
        """

    def on_tasks_scored(self, engine, split: str, scored: int, total: int) -> None:
        """Called during an evaluation each time a batch of tasks has been adapted and scored.

        :param engine: the :class:`~bilevel_maml.engine.MetaEngine`.
        :param split: ``"validation"``, ``"test"``, or ``"evaluation"`` for another env.
        :param scored: tasks scored so far.
        :param total: tasks the evaluation scores.
        """

    def on_test_end(self, engine, stats: dict) -> None:
        """Called after :meth:`~bilevel_maml.engine.MetaEngine.test`.

        :param engine: the :class:`~bilevel_maml.engine.MetaEngine`.
        :param stats: the test result, as :meth:`~bilevel_maml.engine.MetaEngine.evaluate` returns it.
        """

    def on_train_end(self, engine) -> None:
        """Called when :meth:`~bilevel_maml.engine.MetaEngine.run` ends: all iterations done, or
        stopped by a signal after the iteration under way.

        :param engine: the :class:`~bilevel_maml.engine.MetaEngine`.
        """


__all__ = ["Callback"]
