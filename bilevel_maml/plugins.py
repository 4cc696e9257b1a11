"""Variants from other packages: entry points of the group ``bilevel_maml.algorithms`` and ``--plugin MODULE``.

A package makes its variant known by itself with an entry point in its metadata, for example in
its ``pyproject.toml``::

    [project.entry-points."bilevel_maml.algorithms"]
    my-variant = "my_package.variant:ALGORITHM"     # a (MetaLearner, TaskLearner) pair

The entry point's name is the algorithm's name; its object is the pair of classes, a callable
returning the pair, or a module that calls :func:`~bilevel_maml.register_algorithm` when
imported. Without packaging, ``--plugin my_module`` imports a module that registers its variant;
the run's ``config.json`` records it, so ``evaluate`` and ``resume`` import it again. Such a module
may also register a network of its own for ``--model`` (:func:`bilevel_maml.models.register_model`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import traceback
import warnings
from importlib.metadata import entry_points

from bilevel_maml._factories import outside_package
from bilevel_maml.problems import ALGORITHMS, register_algorithm

ENTRY_POINT_GROUP = "bilevel_maml.algorithms"
_loaded_entry_points = False


def load_plugin(module: str) -> None:
    """Import ``module`` (which registers its variants), or raise ValueError saying why it could not be.

    :param module: a dotted module name, importable from ``sys.path``.
    """
    try:
        importlib.import_module(module)
    except Exception as error:  # a plugin's own bug must read as one line, not a traceback
        detail = f"{type(error).__name__}: {' '.join(str(error).split()) or type(error).__name__}"
        missing = isinstance(error, ModuleNotFoundError) and error.name is not None and \
            (module == error.name or module.startswith(error.name + "."))
        if missing:
            raise ValueError(f"plugin module {module!r} could not be imported ({detail}); it must be importable "
                             f"from this Python (installed, or on PYTHONPATH)") from None
        # the plugin's own line that led to the error, not where in the library or Python it was raised
        try:
            source = importlib.util.find_spec(module).origin
        except Exception:
            source = None
        frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == source]
        raised_at = f" at {source}:{frames[-1].lineno}" if frames else ""
        raise ValueError(f"plugin module {module!r} failed while it was imported{raised_at} ({detail})") from None


def load_entry_points() -> None:
    """Register every variant of the ``bilevel_maml.algorithms`` entry-point group (once per process).
    A broken entry point is skipped with a one-line warning: another package's defect must not stop
    the built-in algorithms."""
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found = point.load()
            if inspect.ismodule(found):
                continue  # importing it registered its variants
            pair = found() if callable(found) and not isinstance(found, type) else found
            register_algorithm(point.name, *pair)
        except Exception as error:
            warnings.warn(f"entry point {point.name!r} = {point.value!r} of group {ENTRY_POINT_GROUP!r} was "
                          f"skipped: {type(error).__name__}: {' '.join(str(error).split())}", stacklevel=2)


def unknown_algorithm(name: str) -> str:
    """The one-line message for an algorithm name nobody registered: the known names and how to register one.

    :param name: the name asked for.
    """
    return (f"unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}. A variant of your own is "
            f"registered with bilevel_maml.register_algorithm(name, Upper, Lower) in a module loaded with "
            f"--plugin MODULE, or by an entry point of the group {ENTRY_POINT_GROUP!r} in its package's metadata")


def defining_modules(name: str) -> list[str]:
    """The modules that define algorithm ``name``'s classes, when they are not this package's.

    :param name: a registered algorithm's name.
    """
    return list(dict.fromkeys(module for cls in ALGORITHMS[name] for module in outside_package(cls)))


__all__ = ["ENTRY_POINT_GROUP", "load_plugin", "load_entry_points", "unknown_algorithm"]
