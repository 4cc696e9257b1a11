"""Argument checks that fail fast, naming the bad value and what is allowed."""

from __future__ import annotations

import math
import sysconfig
import traceback
from numbers import Integral, Real
from pathlib import Path

import torch


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a positive number, got {value!r} ({type(value).__name__})")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def check_non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number >= 0, got {value!r} ({type(value).__name__})")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(sorted(choices))}")
    return value.lower()


def device_problem(value) -> str | None:
    """What is wrong with ``value`` as a device of this machine (``cpu``, ``cuda``, ``cuda:N``, or another
    type torch knows), in words that follow its name, or None."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        return f"must be cpu, cuda or cuda:N, got {value!r}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"{value!r} requested but CUDA is not available here; use cpu"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return (f"{value!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s): "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return None


def check_device(name: str, value) -> torch.device:
    """``value`` as a ``torch.device`` this machine has, or a ValueError naming it and what is allowed."""
    problem = device_problem(value)
    if problem is not None:
        raise ValueError(f"{name} {problem}")
    return torch.device(value)


#: PyTorch's own files: a one-line message names the frame outside them, the user's line.
TORCH_FOLDER = Path(torch.__file__).resolve().parent


def frame_in(frame, places) -> bool:
    """Whether ``frame``'s code is one of the files or inside one of the folders ``places`` (resolved paths)."""
    path = Path(frame.f_code.co_filename).resolve()
    return any(path == place or place in path.parents for place in places)


def code_site(frame, line: int) -> str:
    """``Owner.function (file.py:line)``: where in a user's hook or model a frame is, for a one-line message.

    :param frame: a Python frame.
    :param line: the line in it.
    """
    owner = frame.f_locals.get("self")
    function = f"{type(owner).__name__}.{frame.f_code.co_name}" if owner is not None else frame.f_code.co_name
    return f"{function} ({Path(frame.f_code.co_filename).name}:{line})"


#: this package's own files
PACKAGE_FOLDER = Path(__file__).resolve().parent
#: where no user's code lives: this package, Python's standard library and the installed packages
_NOT_USERS_CODE = (PACKAGE_FOLDER, *{Path(sysconfig.get_paths()[name]).resolve()
                                     for name in ("stdlib", "platstdlib", "purelib", "platlib")})


def innermost_site_outside(error: BaseException, places) -> str | None:
    """:func:`code_site` of the innermost frame on ``error``'s way whose code is outside ``places``
    (resolved files or folders; Python's frozen import machinery never counts), or None.

    :param error: an exception that has been raised.
    :param places: what is not the code being looked for (PyTorch's folder, say).
    """
    sites = [(frame, line) for frame, line in traceback.walk_tb(error.__traceback__)
             if not frame.f_code.co_filename.startswith("<frozen") and not frame_in(frame, places)]
    return code_site(*sites[-1]) if sites else None


def users_line(error: BaseException) -> str | None:
    """``Owner.function (file.py:line)`` of the innermost frame of a user's own code (a variant's
    hook, a model, a script) on ``error``'s way, when something other than this package raised it:
    a slip in a hook that Python or PyTorch reports (``dict + Tensor``) names the hook's line. None
    when this package raised it (its message names the bad value already) or no user's code took part.

    :param error: an exception that has been raised.
    """
    frames = list(traceback.walk_tb(error.__traceback__))
    if not frames or frame_in(frames[-1][0], (PACKAGE_FOLDER,)):
        return None
    return innermost_site_outside(error, _NOT_USERS_CODE)
