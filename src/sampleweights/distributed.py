"""``torch.distributed`` helpers for scorers and samplers.

Scorers merge their per-rank state in one of two ways (DESIGN.md, "DDP"):

* reducible state (sums, counts) is all-reduced when ``compute()`` is called — no communication
  during training;
* order-dependent state (forgetting events) needs every example's presentations in order across
  ranks: each ``update`` all-gathers the batch's ``(index, correct)`` pairs (uneven batch sizes
  allowed), so every rank applies the same global batch, ordered by (step, rank, position).

Every rank must make the same collective calls: ``compute()`` on every rank, and — for
``ForgettingTracker`` — ``update`` the same number of times on every rank (true with our
samplers, which give every rank the same number of items; with ``pad=False`` shards differ by one
item, so use ``drop_last=False`` loaders that yield equal batch counts, or
``ForgettingTracker(..., process_group=None)`` per rank).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch import distributed as dist

__all__ = [
    "all_gather_uneven",
    "all_reduce_copy",
    "collective_device",
    "is_distributed",
    "world",
]


def is_distributed(group: Any = None) -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world(group: Any = None) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group``, or ``(1, 0)`` without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def collective_device(group: Any, device: torch.device) -> torch.device:
    """Where tensors must be for a collective on ``group``: CUDA for NCCL, else ``device``."""
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce_copy(tensor: Tensor, op: str, group: Any = None) -> Tensor:
    """All-reduce a copy of ``tensor`` (``op``: "sum", "max" or "min"); the input is unchanged.

    Runs on the collective's device (CUDA for NCCL) and returns on the tensor's own device and
    dtype; bool travels as uint8, which every backend reduces.
    """
    device = tensor.device
    comm = collective_device(group, device)
    wire = tensor.to(comm, torch.uint8 if tensor.dtype == torch.bool else tensor.dtype, copy=True)
    dist.all_reduce(wire, op=_REDUCE_OPS[op], group=group)
    return wire.to(device, tensor.dtype)


def all_gather_uneven(tensors: list[Tensor], group: Any = None) -> list[Tensor]:
    """All-gather 1-D tensors whose length differs per rank; returns the ranks' tensors
    concatenated in rank order (one result per input tensor, same dtype and device).

    Two collectives: the lengths (one int per rank), then the data padded to the longest
    (integer and bool tensors in one block; each float tensor in its own).
    """
    size, _ = world(group)
    device = tensors[0].device
    comm = collective_device(group, device)
    length = torch.tensor([tensors[0].numel()], device=comm)
    lengths = [torch.zeros_like(length) for _ in range(size)]
    dist.all_gather(lengths, length, group=group)
    counts = [int(n) for n in lengths]  # one host sync: buffer sizes must be known
    longest = max(counts)
    exact_ints = all(not (t.is_floating_point() or t.is_complex()) for t in tensors)
    if exact_ints and len(tensors) > 1:
        # integer and bool tensors travel together as one int64 (k, B) block: one collective
        block = torch.stack([t.to(comm, torch.int64) for t in tensors])
        gathered = _gather_padded(block, counts, longest, group)
        return [g.to(device, t.dtype) for g, t in zip(gathered, tensors, strict=True)]
    out = []
    for t in tensors:
        wire = torch.uint8 if t.dtype == torch.bool else t.dtype  # not every backend sends bool
        (row,) = _gather_padded(t.to(comm, wire).unsqueeze(0), counts, longest, group)
        out.append(row.to(device, t.dtype))
    return out


def _gather_padded(block: Tensor, counts: list[int], longest: int, group: Any) -> list[Tensor]:
    """All-gather a (k, n_rank) block padded to (k, longest); rows concatenated in rank order."""
    padded = torch.zeros(block.shape[0], longest, dtype=block.dtype, device=block.device)
    padded[:, : block.shape[1]] = block
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    gathered = torch.cat([p[:, :n] for p, n in zip(parts, counts, strict=True)], dim=1)
    return list(gathered)
