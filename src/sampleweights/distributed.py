"""``torch.distributed`` helpers for scorers and samplers.

Scorers merge their per-rank state in one of two ways:

* reducible state (sums, counts, Misclassified's latest step) is all-reduced when ``compute()``
  is called — no communication during training;
* order-dependent state (forgetting events) needs every example's presentations in order across
  ranks: each ``update`` all-gathers the batch's ``(index, correct)`` pairs, packed into one int32
  per example (uneven batch sizes allowed), so every rank applies the same global batch, ordered
  by (step, rank, position).

**What every rank must do.** Make the same collective calls in the same order: ``compute()`` on
every rank, ``new_run()`` on every rank, and — for ``ForgettingTracker`` — ``update`` the same
number of times on every rank. Our samplers give every rank the same number of items by default
(``pad=True``), so a loader with the same ``batch_size`` yields the same number of batches on
every rank. Where the counts can differ (``pad=False`` shards, a rank that skips a step), a rank
with nothing to present calls ``update_indexed`` with an empty batch (0 indices, ``(0, C)``
logits, 0 targets) so the ranks stay in step.

**What happens otherwise: a fast, clear error, not a hang.** Each exchange and each
``compute()`` starts with the same small all-gather, a *header* (scorer, operation, run, number
of updates, batch length): a rank making one update more than the others meets them in this
collective while they are already in ``compute()`` (or in another update), and every rank raises
:class:`DistributedMismatchError` naming what each rank was doing and how
many updates it had made. The header also carries the batch lengths the exchange needs, so it
costs no extra collective. (A rank that leaves the job without calling ``compute()`` cannot be
met; the others then wait for the process group's timeout.)
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import Tensor
from torch import distributed as dist

__all__ = [
    "OP_COMPUTE",
    "OP_UPDATE",
    "DistributedMismatchError",
    "all_gather_uneven",
    "all_reduce_copy",
    "all_reduce_many",
    "collective_device",
    "exchange_header",
    "is_distributed",
    "world",
]

#: Header operation codes (what a rank is doing when it enters a scorer collective).
OP_UPDATE, OP_COMPUTE = 1, 2
_OP_NAMES = {OP_UPDATE: "update()", OP_COMPUTE: "compute()"}
_MAGIC = 0x5357  # "SW": marks a sampleweights header (anything else is another collective)


class DistributedMismatchError(RuntimeError):
    """The ranks of a process group are out of step in a scorer's collectives.

    Raised on every rank, at once, when one rank makes more ``update`` calls than the others
    (``ForgettingTracker``) or the ranks call ``compute()`` of different scorers, instead of
    waiting for the process-group timeout. The message names what each rank was doing.

    Example:
        >>> import sampleweights as sw
        >>> issubclass(sw.DistributedMismatchError, RuntimeError)
        True
    """


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


def all_reduce_many(tensors: list[Tensor], op: str, group: Any = None) -> list[Tensor]:
    """All-reduce copies of several tensors of one dtype in one collective (``op``: "sum",
    "max" or "min"); the inputs are unchanged.

    The tensors travel as one flat buffer on the collective's device (bool as uint8); each
    result comes back with its tensor's shape, device and dtype. Element-wise, so every entry
    gets exactly what :func:`all_reduce_copy` of its own tensor would give.
    """
    if not tensors:
        return []
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        dtypes = sorted({str(t.dtype) for t in tensors})
        raise TypeError(f"all_reduce_many needs tensors of one dtype, but got {dtypes}.")
    comm = collective_device(group, tensors[0].device)
    wire = torch.uint8 if dtype == torch.bool else dtype
    flat = torch.cat([t.reshape(-1).to(comm, wire) for t in tensors])
    dist.all_reduce(flat, op=_REDUCE_OPS[op], group=group)
    out, start = [], 0
    for t in tensors:
        part = flat[start : start + t.numel()].view(t.shape)
        out.append(part.to(t.device, dtype, copy=True))
        start += t.numel()
    return out


def scorer_tag(name: str) -> int:
    """A stable number for a scorer name (the same on every rank and every run)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def exchange_header(
    scorer: str,
    op: int,
    *,
    run: int,
    num_updates: int,
    length: int = 0,
    device: torch.device | None = None,
    group: Any = None,
    require_equal_updates: bool = True,
) -> list[list[int]]:
    """All-gather one small header per rank and check that the ranks are in the same collective.

    The first collective of every scorer exchange and of every distributed ``compute()``: a rank
    that has made one update more than the others meets them here even when they have moved on
    to ``compute()``, so every rank raises the same clear error instead of waiting for the
    process-group timeout.

    Args:
        scorer: the scorer's name (``ForgettingTracker``: ``"forgetting"``).
        op: :data:`OP_UPDATE` or :data:`OP_COMPUTE`.
        run: the scorer's run counter (``num_runs``).
        num_updates: updates made on this rank before this call.
        length: this rank's batch length (exchanges); for ``compute()``, its number of
            updates in the current run (0 right after ``new_run()``).
        device: where the header tensor is built (the collective's device is used for NCCL).
        require_equal_updates: whether ``num_updates`` must agree (order-dependent scorers).

    Returns:
        One ``[magic, tag, op, run, num_updates, length]`` list per rank, in rank order.

    Raises:
        DistributedMismatchError: the ranks are in different scorer collectives, or (with
            ``require_equal_updates``) have made different numbers of updates or runs; raised on
            every rank.
    """
    size, rank = world(group)
    comm = collective_device(group, device or torch.device("cpu"))
    mine = torch.tensor(
        [_MAGIC, scorer_tag(scorer), op, run, num_updates, length], dtype=torch.int64, device=comm
    )
    parts = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine, group=group)
    rows = torch.stack(parts).tolist()  # one host sync: the exchange needs the lengths anyway
    key = 5 if require_equal_updates else 3
    if all(row[:key] == rows[0][:key] for row in rows):
        return [[int(v) for v in row] for row in rows]
    raise DistributedMismatchError(_mismatch_message(scorer, op, rank, rows))


def _mismatch_message(scorer: str, op: int, rank: int, rows: list[list[int]]) -> str:
    def describe(r: int, row: list[int]) -> str:
        if row[0] != _MAGIC:
            return f"rank {r}: in another collective (not a sampleweights scorer)"
        what = _OP_NAMES.get(row[2], f"op {row[2]}")
        other = "" if row[1] == scorer_tag(scorer) else " of another scorer"
        if row[2] == OP_UPDATE:
            return (
                f"rank {r}: update(){other} #{row[4] + 1} (run {max(row[3], 1)}, batch of {row[5]})"
            )
        return f"rank {r}: {what}{other} after {row[4]} update(s) in {row[3]} run(s)"

    ranks = "; ".join(describe(r, row) for r, row in enumerate(rows))
    doing = _OP_NAMES.get(op, "a collective")
    return (
        f"{scorer}: the ranks of the process group are out of step in {doing} on rank {rank}: "
        f"{ranks}. Every rank must call update() the same number of times (and new_run() and "
        "compute() together): use a sampler with equal shard lengths (sw.PrunedSampler's "
        "default pad=True) and the same batch size on every rank, and on a rank that has no "
        "batch for a step call update_indexed with an empty batch (0 indices, (0, C) logits, "
        "0 targets)."
    )


def all_gather_uneven(
    tensors: list[Tensor], group: Any = None, *, counts: list[int] | None = None
) -> list[Tensor]:
    """All-gather 1-D tensors whose length differs per rank; returns the ranks' tensors
    concatenated in rank order (one result per input tensor, same dtype and device).

    ``counts`` (every rank's length, e.g. from :func:`exchange_header`) saves the collective
    that gathers the lengths. The data travel padded to the longest: several integer and bool
    tensors together as one int64 block, a single tensor in its own dtype (bool as uint8).
    """
    size, _ = world(group)
    device = tensors[0].device
    comm = collective_device(group, device)
    if counts is None:
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
