"""Data-parallel helpers on ``torch.distributed``, set up from the variables ``torchrun`` exports.

Without ``torchrun`` (no ``WORLD_SIZE`` > 1 in the environment) every helper is the identity:
rank 0 of a world of 1, so the same code runs in one process or many. Collectives use gloo for
CPU tensors and NCCL for CUDA tensors (``"cpu:gloo,cuda:nccl"`` when CUDA is present).
See docs/distributed.md.
"""

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist


def launched() -> bool:
    """True in a process started by ``torchrun`` (or anything exporting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> bool:
    """Join the process group that ``torchrun`` describes; True when this call created it.

    Does nothing (False) outside ``torchrun`` or when a group already exists. With CUDA, the
    process's GPU is ``LOCAL_RANK``, so ``device="cuda"`` means this rank's own GPU.
    """
    if not launched() or dist.is_initialized():
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend)
    return True


def teardown() -> None:
    """Leave the process group, if there is one."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session() -> Iterator[None]:
    """``setup()`` on entry and, if that created the group, ``teardown()`` on exit."""
    created = setup()
    try:
        yield
    finally:
        if created:
            teardown()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the process that writes shared files."""
    return get_rank() == 0


def barrier() -> None:
    if get_world() > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the body on rank 0 first and on the other ranks after it (e.g. fill a cache once)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place; returns it."""
    if get_world() > 1:
        dist.all_reduce(t)
    return t


def same_on_all_ranks(value: int) -> bool:
    """Whether every rank passed the same integer."""
    if get_world() == 1:
        return True
    t = torch.tensor([value, -value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == value == -int(t[1])


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values."""
    if get_world() > 1:
        for t in tensors:
            dist.broadcast(t, src)


def reduce_gradients(
    params: Iterable[torch.nn.Parameter], weight: float, group: Any = None
) -> None:
    """Replace each gradient by the sum over ranks (of ``group``, default the world's) of
    ``weight`` x that rank's gradient.

    With ``weight = local rows / global rows`` this is the gradient of a per-row mean over the
    global batch, whatever the shard sizes. Parameters without a gradient are skipped (they
    must lack one on every rank, as they do when the model is the same).
    """
    if get_world() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        g.mul_(weight)
    for work in [dist.all_reduce(g, group=group, async_op=True) for g in grads]:
        work.wait()


def gather_rows(rows: list[Any], key: Callable[[Any], Any] | None = None) -> list[Any]:
    """Every rank's ``rows`` on every rank, concatenated in rank order (or sorted by ``key``)."""
    if get_world() > 1:
        parts: list[list[Any]] = [[] for _ in range(get_world())]
        dist.all_gather_object(parts, rows)
        rows = [row for part in parts for row in part]
    return sorted(rows, key=key) if key is not None else list(rows)
