"""What the registries of users' own code (algorithms, models, datasets) share."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable


def defined_as(function) -> tuple[str, str]:
    """Where ``function`` (a class or a callable) is defined: its module and qualified name. The same
    code defined again (a reloaded module, a notebook cell run twice) is defined as before."""
    return getattr(function, "__module__", "") or "", getattr(function, "__qualname__", repr(function))


def call_with_named_keywords(function: Callable, **given):
    """``function`` called with those of ``given`` its signature names (all of them if it takes
    ``**kwargs``), so a user's factory declares only what it uses."""
    return function(**{k: v for k, v in given.items() if takes_keyword(function, k)})


def takes_keyword(function: Callable, name: str) -> bool:
    """Whether :func:`call_with_named_keywords` would pass ``name`` to ``function``."""
    parameters = inspect.signature(function).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def outside_package(function) -> list[str]:
    """The module defining ``function``, in a list, when it is not this package's (a plugin's, or
    ``__main__``); else an empty list."""
    module = getattr(function, "__module__", None) if function is not None else None
    return [module] if module and module != "bilevel_maml" and not module.startswith("bilevel_maml.") else []


def refuse_taken_name(kind: str, name: str, built_in: Iterable[str], held, code, yours: str) -> None:
    """Raise ValueError where ``name`` may not be registered for ``code``: it is built in, or it is
    registered (``held``) with code defined elsewhere. The same code defined again (a reloaded
    module, a notebook cell run twice) may replace itself; anything else would quietly make runs of
    an existing name run other code.

    :param kind: ``"algorithm"``, ``"model"`` or ``"dataset"``, for the message.
    :param held: what the registry holds under ``name`` (None: nothing); a tuple for several pieces
        of code (an algorithm's classes).
    :param code: what is being registered, in the same form as ``held``.
    :param yours: how the message names what is registered ("your network").
    """
    if name in built_in:
        raise ValueError(f"{kind} {name!r} is built in; register {yours} under another name")
    if held is not None and _where(held) != _where(code):
        raise ValueError(f"{kind} {name!r} is already registered ({_where(held)}); register {yours} under another name")


def _where(code) -> str:
    pieces = code if isinstance(code, tuple) else (code,)
    return " and ".join(".".join(defined_as(piece)) for piece in pieces)
