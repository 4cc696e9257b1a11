"""What the derivative Functions (:mod:`bilevel_maml.batch_norm`, :mod:`bilevel_maml.grouped_conv`,
:mod:`bilevel_maml.relu_and_max_pool`) share."""

from __future__ import annotations

import inspect

import torch


def with_cached_signature(function_class):
    """Class decorator for a ``torch.autograd.Function`` with ``setup_context``: its ``apply`` binds the
    arguments to ``forward``'s signature on every call, and ``inspect.signature`` rebuilds that signature
    each time (about 60 µs, more than the op itself on one task's small activation, 1,800 times in a
    task-by-task MAML meta-iteration of conv4), unless ``forward`` carries it as ``__signature__``."""
    function_class.forward.__signature__ = inspect.signature(function_class.forward)
    return function_class


def pair(value) -> tuple:
    """An int-or-pair layer argument (``kernel_size``, ``stride``, ...) as a pair."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def sum_terms(terms: list[torch.Tensor]) -> torch.Tensor | None:
    """The sum of a derivative's terms, or None (no contribution) when it has none."""
    return sum(terms[1:], terms[0]) if terms else None
