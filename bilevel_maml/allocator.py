"""CPU allocator settings for meta-training.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves blocks above its mmap
threshold (at most 32 MB, and moving with the history of frees) with a fresh ``mmap`` and returns
them to the system on free, so every large activation is page-faulted in again at every step. A
vectorized meta-batch allocates many such blocks: on a 2-core CPU the first conv4 convolution of
320 images took 40 ms with a fresh 64 MB output against 8 ms with reused memory, and one vectorized
conv4 meta-iteration ran about 10% faster with freed memory kept for reuse (``benchmarks/meta_iteration.py`` runs every
implementation under the same setting).

:func:`keep_freed_memory` is applied by the ``bilevel-maml`` command; scripts that build their own
engine can call it once at start-up. It changes nothing off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_TRIM_DEFAULT = 128 * 1024


@functools.lru_cache(maxsize=1)
def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist (glibc)
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(mmap_threshold: int = 2**30) -> bool:
    """Serve blocks below ``mmap_threshold`` bytes from the heap and keep freed heap memory for
    reuse instead of returning it. Returns whether the setting took effect (glibc only).

    :param mmap_threshold: bytes; smaller blocks come from the heap (glibc's ``M_MMAP_THRESHOLD``).
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))
                and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def return_freed_memory(mmap_threshold: int = 64 * 1024) -> bool:
    """The opposite, for memory readings: large blocks by ``mmap``, freed memory handed back (also
    what is free now), so the resident size follows the memory in use."""
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))
              and libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_DEFAULT))
    libc.malloc_trim(0)
    return ok


__all__ = ["keep_freed_memory"]
