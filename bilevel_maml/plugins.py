"""Variants, networks and task sources from other packages: entry points (the group
``bilevel_maml.algorithms`` and those below) and ``--plugin MODULE``.

A package makes its variant known by itself with an entry point in its metadata, for example in
its ``pyproject.toml``::

    [project.entry-points."bilevel_maml.algorithms"]
    my-variant = "my_package.variant:ALGORITHM"     # a (MetaLearner, TaskLearner) pair

The entry point's name is the algorithm's name; its object is the pair of classes, a callable
returning the pair, or a module that calls :func:`~bilevel_maml.register_algorithm` when
imported. Without packaging, ``--plugin my_module`` imports a module that registers its variant
(installed, on ``PYTHONPATH``, or ``my_module.py`` in the folder the command runs in);
the run's ``config.json`` records it and the folder it was found in, so ``evaluate`` and ``resume``
import it again, from any folder. Such a module
may also register a network of its own for ``--model`` (:func:`bilevel_maml.models.register_model`)
and a task source for ``--dataset`` (:func:`bilevel_maml.data.register_dataset`); a package declares
those in the groups ``bilevel_maml.models`` (the factory) and ``bilevel_maml.datasets`` (a
``(load, spec)`` pair)::

    [project.entry-points."bilevel_maml.models"]
    my-net = "my_package.nets:build_my_net"

    [project.entry-points."bilevel_maml.datasets"]
    my-data = "my_package.data:DATASET"     # DATASET = (load, DatasetSpec(...))
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import traceback
import warnings
from importlib.metadata import entry_points
from pathlib import Path

from bilevel_maml._factories import outside_package
from bilevel_maml.problems import ALGORITHMS, register_algorithm

ENTRY_POINT_GROUP = "bilevel_maml.algorithms"
MODEL_ENTRY_POINT_GROUP = "bilevel_maml.models"
DATASET_ENTRY_POINT_GROUP = "bilevel_maml.datasets"
ENTRY_POINT_GROUPS = (ENTRY_POINT_GROUP, MODEL_ENTRY_POINT_GROUP, DATASET_ENTRY_POINT_GROUP)
_loaded_entry_points = False


def load_plugin(module: str, found_in: str | None = None) -> None:
    """Import ``module`` (which registers its variants), or raise ValueError saying why it could not be.

    :param module: a dotted module name, importable from ``sys.path`` or from the current folder.
    :param found_in: a folder to look in last (a run's: where its plugin was imported from).
    """
    try:
        _import_here_too(module, found_in)
    except Exception as error:  # a plugin's own bug must read as one line, not a traceback
        detail = f"{type(error).__name__}: {' '.join(str(error).split()) or type(error).__name__}"
        if _is_missing(module, error):
            there = f", or be in {found_in}, where the run found it" if found_in else ""
            raise ValueError(f"plugin module {module!r} could not be imported ({detail}); it must be importable "
                             f"from this Python (installed, on PYTHONPATH, or a file in the current folder){there}") \
                from None
        # the plugin's own line that led to the error, not where in the library or Python it was raised
        try:
            source = importlib.util.find_spec(module).origin
        except Exception:
            source = None
        frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == source]
        raised_at = f" at {source}:{frames[-1].lineno}" if frames else ""
        raise ValueError(f"plugin module {module!r} failed while it was imported{raised_at} ({detail})") from None


def _import_here_too(module: str, found_in: str | None = None) -> None:
    """Import ``module``, looking in the current folder after ``sys.path``: ``python -m bilevel_maml``
    finds ``my_variant.py`` in the folder it runs in (Python puts that folder on its path), and so must
    the ``bilevel-maml`` script, whose path starts at the script's own folder. After, not before: a
    file of the current folder named as an installed module does not replace that module. Then in
    ``found_in``, where a run's plugin was, so that its run folder works from any folder."""
    try:
        importlib.import_module(module)
        return
    except ModuleNotFoundError as error:
        if not _is_missing(module, error):
            raise
        missing = error
    for folder in (os.getcwd(), found_in):
        if folder is None or folder in sys.path or not os.path.isdir(folder):
            continue
        sys.path.append(folder)
        importlib.invalidate_caches()
        try:
            importlib.import_module(module)
            return
        except ModuleNotFoundError as error:
            sys.path.remove(folder)
            if not _is_missing(module, error):
                raise
    raise missing


def import_folder(module: str) -> str | None:
    """The folder on ``sys.path`` the imported ``module`` was found in (None for one without a file).

    :param module: a dotted module name, already imported.
    """
    file = getattr(sys.modules.get(module), "__file__", None)
    if file is None:
        return None
    path = Path(file).resolve()
    return str(path.parents[module.count(".") + (path.name == "__init__.py")])


def _is_missing(module: str, error: Exception) -> bool:
    """Whether ``error`` says ``module`` itself (or a package above it) is nowhere to be found, not
    something the module imports."""
    return isinstance(error, ModuleNotFoundError) and error.name is not None and \
        (module == error.name or module.startswith(error.name + "."))


def load_entry_points() -> None:
    """Register every variant, network and task source of the entry-point groups
    ``bilevel_maml.algorithms``, ``bilevel_maml.models`` and ``bilevel_maml.datasets`` (once per
    process). A broken entry point is skipped with a one-line warning: another package's defect must
    not stop the built-in ones."""
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for group in ENTRY_POINT_GROUPS:
        for point in entry_points(group=group):
            try:
                _register(group, point.name, point.load())
            except Exception as error:
                warnings.warn(f"entry point {point.name!r} = {point.value!r} of group {group!r} was skipped: "
                              f"{type(error).__name__}: {' '.join(str(error).split())}", stacklevel=2)


def _register(group: str, name: str, found) -> None:
    """What an entry point names: a module registers by being imported; otherwise an algorithm's
    (Upper, Lower) pair (or a callable returning it), a network's factory, or a dataset's (load, spec)."""
    from bilevel_maml.data.sources import register_dataset
    from bilevel_maml.models import register_model

    if inspect.ismodule(found):
        return
    if group == ENTRY_POINT_GROUP:
        register_algorithm(name, *(found() if callable(found) and not isinstance(found, type) else found))
    elif group == MODEL_ENTRY_POINT_GROUP:
        register_model(name, found)
    else:
        register_dataset(name, *found)


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


__all__ = ["DATASET_ENTRY_POINT_GROUP", "ENTRY_POINT_GROUP", "ENTRY_POINT_GROUPS", "MODEL_ENTRY_POINT_GROUP",
           "load_plugin", "load_entry_points", "unknown_algorithm"]
