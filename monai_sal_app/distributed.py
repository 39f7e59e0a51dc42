"""One process or many: the rank, the device and the collective calls the batch commands use.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`setup` joins the process group
(NCCL when every rank has a GPU, gloo otherwise) and each rank uses ``cuda:<LOCAL_RANK>`` or the
CPU; in a plain process it does nothing and the calls below are the identity. Work is split into
fixed blocks of items that are dealt to the ranks in turn (:func:`shard`), so a block holds the
same items, batched the same way, whatever the number of processes: one process and N processes
compute the same numbers. Results travel as Python objects (:func:`all_gather`, :func:`broadcast`);
files written by one rank (checkpoints, generated data) must be on a folder every rank sees. A
rank's blocks are read by worker processes ahead of its computation (:func:`read_ahead`).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from monai_sal_app.arguments import check_integer

__all__ = [
    "all_gather",
    "barrier",
    "broadcast",
    "device",
    "gather_blocks",
    "is_main",
    "local",
    "rank",
    "read_ahead",
    "setup",
    "shard",
    "world_size",
]

T = TypeVar("T")


def setup() -> None:
    """Join the process group when started by ``torchrun`` with more than one process (idempotent)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > _local_rank() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_local_rank())
    dist.init_process_group(backend)


_local_depth = 0  # > 0 inside `local()`: this process works alone


def _active() -> bool:
    return _local_depth == 0 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def local() -> Iterator[None]:
    """Inside it this process works alone: rank 0 of 1, no collective calls. For the work of one
    block that a rank already got from :func:`shard`: code it calls that would itself share work
    out (``explain_items``, ``trust_card``) then runs whole in this process instead of waiting
    for ranks that are busy with other blocks."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """The number of processes (1 without torchrun)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0, the process that writes the tables and the report."""
    return rank() == 0


def device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when this rank has a GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", _local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def shard(n_blocks: int) -> list[int]:
    """The block indices this rank computes: ``rank, rank + world_size, ...`` below ``n_blocks``."""
    return list(range(rank(), n_blocks, world_size()))


def barrier() -> None:
    """Wait until every rank gets here."""
    if _active():
        dist.barrier()


def all_gather(value: T) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not _active():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast(value: T | None) -> T:
    """Rank 0's ``value`` (picklable) on every rank; the other ranks pass anything (e.g. None)."""
    if not _active():
        return value  # type: ignore[return-value]
    box: Sequence[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_blocks(
    n_items: int, block_size: int, compute: Callable[[int, int], list[T]], desc: str = "", progress: bool = False
) -> list[T]:
    """Results of ``compute(start, stop)`` over the items ``[start, stop)`` of every block of
    ``block_size`` consecutive items: each rank computes its blocks (:func:`shard`, a progress bar
    on rank 0 when ``progress``), and every rank gets every block's results, in item order."""
    n_blocks = (n_items + block_size - 1) // block_size
    mine = {}
    for block in tqdm(shard(n_blocks), desc=desc, disable=not progress or not is_main(), leave=False):
        with local():
            mine[block] = compute(block * block_size, min(n_items, (block + 1) * block_size))
    merged: dict[int, list[T]] = {}
    for part in all_gather(mine):
        merged.update(part)
    return [result for block in range(n_blocks) for result in merged[block]]


def read_ahead(
    blocks: Sequence[int], read_block: Callable[[int], T], workers: int = 2, prefetch: int = 2
) -> Iterator[tuple[int, T]]:
    """``(block, read_block(block))`` for each of ``blocks``, in order, read ahead by ``workers``
    processes of a ``torch.utils.data.DataLoader`` (each holding up to ``prefetch`` blocks) while
    the caller computes on the blocks already read; ``workers=0`` reads each block in this process
    when its turn comes. ``read_block`` returns picklable data and turns what it cannot read into
    data too (an exception in a worker ends the loop). Workers are forked, so ``read_block`` may
    be a closure over this process's objects; where fork is unavailable the blocks are read here."""
    workers = check_integer(workers, "workers", 0) if "fork" in multiprocessing.get_all_start_methods() else 0
    if not blocks:  # no worker processes started for nothing
        return
    loader = DataLoader(
        _Blocks(list(blocks), read_block),
        batch_size=None,
        collate_fn=_unchanged,
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        multiprocessing_context="fork" if workers else None,
    )
    # The workers start with iter(). Objects frozen then are left alone by the workers' garbage
    # collections, so the pages they share with this process stay shared instead of being copied.
    gc.freeze()
    try:
        batches = iter(loader)
    finally:
        gc.unfreeze()
    yield from batches


class _Blocks(Dataset):
    def __init__(self, blocks: list[int], read_block: Callable[[int], Any]) -> None:
        self.blocks, self.read_block = blocks, read_block

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return self.blocks[index], self.read_block(self.blocks[index])


def _unchanged(sample: Any) -> Any:
    """A DataLoader's sample as the dataset gave it (no conversion of arrays to tensors)."""
    return sample
