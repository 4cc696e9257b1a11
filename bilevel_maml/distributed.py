"""Data parallelism over tasks with ``torch.distributed``.

Launched with ``torchrun``, every process (rank) adapts ``meta_batch_size / world_size`` tasks
from its own reproducible task stream; before the single outer optimizer step the meta-gradients
are averaged across ranks with one all-reduce (as DDP does), so every rank holds the same θ after
every meta-iteration. θ is broadcast from rank 0 when training starts. Validation, logging, the
progress bar and checkpoint files are rank 0's; checkpoints still hold every rank's task-stream
and random state, so a distributed run resumes exactly.

Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os

import torch
import torch.distributed as dist

#: seconds a collective waits for the other ranks before failing (``--dist-timeout``)
DEFAULT_TIMEOUT_SECONDS = 600.0


class RankFailure(RuntimeError):
    """Another rank died or stopped answering: this rank stops instead of waiting forever."""


def launched_distributed() -> bool:
    """Whether this process was started by ``torchrun`` (or an equivalent launcher) with several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: torch.device, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> torch.device:
    """Join the process group ``torchrun`` set up: NCCL on CUDA, gloo on CPU. Returns the device
    this rank should use (``cuda:LOCAL_RANK`` for CUDA).

    :param device: the device asked for (its type picks the backend).
    :param timeout_seconds: how long a collective waits for the other ranks before failing.
    """
    if timeout_seconds <= 0:
        raise ValueError(f"the distributed timeout must be a positive number of seconds, got {timeout_seconds!r}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    return device


def shutdown(wait_for_the_others: bool = False) -> None:
    """Leave the process group (if one was joined).

    :param wait_for_the_others: first wait until every rank has got here, as on a normal end: a rank
        that closes its connections while another still reads its last message makes gloo abort
        that one ("Connection closed by peer", SIGABRT).
    """
    if dist.is_available() and dist.is_initialized():
        if wait_for_the_others:
            barrier("waiting for the other ranks to finish")
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world()[0] == 0


def stream_seed(seed: int, split: int, rank: int) -> int:
    """Seed of a rank's task stream for one split. Rank 0's equals the single-process seed, so a
    one-process run draws the same tasks as rank 0 of a distributed one."""
    if rank == 0:
        return seed * 3 + split
    digest = hashlib.sha256(f"bilevel_maml/{seed}/{split}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


@contextlib.contextmanager
def collective(what: str):
    """Turn a failed collective into a :class:`RankFailure` that says what happened."""
    try:
        yield
    except RuntimeError as error:  # gloo / NCCL report a dead peer or a timeout as RuntimeError subclasses
        rank, size = world()
        raise RankFailure(
            f"rank {rank} of {size}: {what} failed, so another rank has most likely died or stopped "
            f"answering (collectives wait at most the --dist-timeout); stopping this rank too. "
            f"Cause: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
        ) from error


def average_gradients(params) -> None:
    """Replace each ``p.grad`` by its mean over the ranks, in one flattened all-reduce."""
    size = world()[1]
    if size == 1:
        return
    params = [p for p in params if p.requires_grad]  # a frozen parameter has no gradient to average
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    sum_tensors(grads, "averaging the meta-gradient (all-reduce)")
    for p, g in zip(params, grads):
        p.grad = g.div_(size)


def sum_tensors(tensors, what: str) -> None:
    """Replace each tensor (in place) by its sum over the ranks, in one flattened all-reduce."""
    if world()[1] == 1:
        return
    tensors = list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    with collective(what):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_tensors(tensors, source: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``source``'s values."""
    if world()[1] == 1:
        return
    with collective("broadcasting θ from rank 0"), torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=source)


def broadcast_object(obj, source: int = 0, what: str = "receiving rank 0's validation result"):
    """Rank ``source``'s ``obj`` on every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    with collective(what):
        dist.broadcast_object_list(box, src=source)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    with collective("gathering every rank's task-stream state for a checkpoint"):
        dist.all_gather_object(out, obj)
    return out


def barrier(what: str = "waiting for the other ranks") -> None:
    if world()[1] > 1:
        with collective(what):
            dist.barrier()


def largest(value: int, what: str) -> int:
    """The largest ``value`` over the ranks (an agreement every rank reaches at the same point)."""
    if world()[1] == 1:
        return value
    # gloo all-reduces CPU tensors; NCCL wants them on the rank's GPU
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    box = torch.tensor([value], dtype=torch.int64, device=device)
    with collective(what):
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "RankFailure",
    "launched_distributed",
    "init_from_environment",
    "world",
    "is_main_process",
    "shutdown",
]
