"""Samplers that feed a selection back into the DataLoader: prune, upsample, JTT.

Each sampler holds a *multiset* of dataset indices (``PrunedSampler``: the kept indices once each;
``UpsampleSampler``: index ``i`` ``repeats[i]`` times; ``JTTSampler``: the error set ``upweight``
times, the rest once) and yields one epoch of it per iteration:

* the order is a function of ``(seed, epoch)`` only — a private ``torch.Generator`` seeded with
  ``seed + epoch`` (as ``DistributedSampler``), never the global RNG;
* across ``num_replicas`` ranks an epoch covers the multiset exactly: rank ``r`` takes positions
  ``r, r + R, …`` of the shuffled epoch, padded with its first items (or cut with ``drop_last``)
  so every rank yields the same length, exactly like ``DistributedSampler``; ``pad=False`` gives
  uneven shards and no duplicates (for scoring passes);
* ``state_dict()`` holds epoch, seed, position and a fingerprint of the multiset, and
  ``load_state_dict`` resumes mid-epoch with the identical remaining order.

An upsampled epoch is longer than the dataset (JTT with λ=20 and a 5% error set: 1.95 × N
items), so an LR schedule set in steps per epoch must use ``len(loader)`` of the *upsampled*
loader; pass ``num_samples=`` to keep an epoch at a fixed length instead.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from sampleweights.distributed import world
from sampleweights.errors import StateMismatchError
from sampleweights.validation import as_index_tensor, check_num_examples, check_range

__all__ = ["JTTSampler", "PrunedSampler", "UpsampleSampler"]


def _replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """``(num_replicas, rank)``: the arguments, else the initialised process group, else (1, 0)."""
    group_size, group_rank = world()
    num_replicas = group_size if num_replicas is None else num_replicas
    rank = group_rank if rank is None else rank
    for name, value in (("num_replicas", num_replicas), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"Expected `{name}` to be an int, but got {type(value).__name__}.")
    if num_replicas < 1:
        raise ValueError(f"Expected `num_replicas` ≥ 1, but got {num_replicas}.")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"Invalid `rank` {rank}: expected a value in [0, {num_replicas - 1}].")
    return num_replicas, rank


class _MultisetSampler(Sampler[int]):
    """Shared machinery: one shuffled epoch of a multiset, sharded across ranks, resumable."""

    def __init__(
        self,
        items: Tensor,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        pad: bool = True,
        num_samples: int | None = None,
    ) -> None:
        self.num_replicas, self.rank = _replicas(num_replicas, rank)
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise TypeError(f"Expected `seed` to be an int, but got {type(seed).__name__}.")
        if num_samples is not None and (
            isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
        ):
            raise ValueError(
                f"Expected `num_samples` to be an int ≥ 1 or None, got {num_samples!r}."
            )
        if drop_last and not pad:
            raise ValueError("`drop_last=True` and `pad=False` exclude each other; choose one.")
        if items.numel() == 0:
            raise ValueError("The sampler would yield nothing: the selection is empty.")
        self._items = items  # (M,) int64 on CPU: the multiset, in a canonical order
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.pad = bool(pad)
        self.num_samples = num_samples
        self.epoch = 0
        self._position = 0
        self._fingerprint: str | None = None

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def epoch_size(self) -> int:
        """Items in one epoch over all ranks, before padding or dropping."""
        return self.num_samples if self.num_samples is not None else self._items.numel()

    def __len__(self) -> int:
        """Items this rank yields per epoch."""
        size, r = self.epoch_size, self.num_replicas
        if self.drop_last:
            return size // r
        if self.pad:
            return math.ceil(size / r)
        return size // r + (1 if self.rank < size % r else 0)

    # -- order -------------------------------------------------------------------------------------
    def _epoch_order(self) -> Tensor:
        """This rank's items for the current epoch, as a tensor."""
        items = self._items
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = items[torch.randperm(items.numel(), generator=gen)]
        else:
            order = items
        if self.num_samples is not None:  # fixed epoch length: cycle or cut the shuffled multiset
            reps = math.ceil(self.num_samples / order.numel())
            order = order.repeat(reps)[: self.num_samples]
        r = self.num_replicas
        if self.drop_last:
            order = order[: len(order) // r * r]
        elif self.pad and len(order) % r:
            padding = r - len(order) % r
            order = torch.cat([order, order.repeat(math.ceil(padding / len(order)))[:padding]])
        return order[self.rank :: r]

    def __iter__(self) -> Iterator[int]:
        order = self._epoch_order()
        start = self._position
        # tolist() once per epoch: per-item iteration stays a plain Python list walk
        for index in order[start:].tolist():
            self._position += 1
            yield index
        self._position = 0  # the epoch is complete; the next iter() replays it unless set_epoch

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (seeds the order); the same epoch keeps the position, another restarts."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"Expected `epoch` to be an int ≥ 0, but got {epoch!r}.")
        if epoch != self.epoch:
            self._position = 0
        self.epoch = epoch

    # -- resume ------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """A hash of the multiset and its order: equal only for the same selection."""
        if self._fingerprint is None:
            digest = hashlib.sha256(self._items.numpy().tobytes()).hexdigest()
            self._fingerprint = f"{self._items.numel()}:{digest[:16]}"
        return self._fingerprint

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The position in the current epoch, for :meth:`load_state_dict`.

        Args:
            consumed: items of this epoch the training loop really consumed on this rank. With a
                plain DataLoader, which prefetches, pass ``batches_done * batch_size``; by default
                the items the iterator handed out (exact with torchdata's StatefulDataLoader or
                ``num_workers=0``).
        """
        position = self._position if consumed is None else consumed
        if (
            isinstance(position, bool)
            or not isinstance(position, int)
            or not (0 <= position <= len(self))
        ):
            raise ValueError(f"Expected `consumed` in [0, {len(self)}], but got {consumed!r}.")
        return {
            "sampler": type(self).__name__,
            "epoch": self.epoch,
            "seed": self.seed,
            "position": position,
            "fingerprint": self.fingerprint,
            "num_replicas": self.num_replicas,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the next ``iter()`` continues the saved epoch where it stopped.

        Raises:
            StateMismatchError: the state belongs to another sampler type, selection, world size,
                or order settings; nothing is changed.
        """
        expected = {
            "sampler": type(self).__name__,
            "fingerprint": self.fingerprint,
            "num_replicas": self.num_replicas,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
        }
        for key, value in expected.items():
            if state_dict.get(key) != value:
                raise StateMismatchError(
                    f"Cannot resume this {type(self).__name__} from a state with {key}="
                    f"{state_dict.get(key)!r}; this sampler has {key}={value!r}. A state resumes "
                    "only a sampler built from the same selection, settings and world size."
                )
        position = state_dict.get("position")
        if not isinstance(position, int) or not 0 <= position <= len(self):
            raise StateMismatchError(f"Saved position {position!r} is outside [0, {len(self)}].")
        self.seed = int(state_dict["seed"])
        self.epoch = int(state_dict["epoch"])
        self._position = position

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(items={self._items.numel()}, shuffle={self.shuffle}, "
            f"seed={self.seed}, rank={self.rank}/{self.num_replicas}, epoch={self.epoch})"
        )


class PrunedSampler(_MultisetSampler):
    """Yield a subset of the dataset (e.g. ``sw.select(...)``) once per epoch.

    Args:
        indices: the kept dataset indices (no duplicates).
        num_examples: ``len(dataset)``, to check the indices are in range (recommended).
        shuffle, seed, num_replicas, rank, drop_last, pad, num_samples: see the module docstring;
            ``num_replicas``/``rank`` default to the initialised process group, else 1/0.

    Example:
        >>> import torch
        >>> s = PrunedSampler(torch.tensor([7, 2, 9]), seed=1)
        >>> sorted(s), len(s)
        ([2, 7, 9], 3)
        >>> [list(PrunedSampler(range(5), shuffle=False, num_replicas=2, rank=r)) for r in (0, 1)]
        [[0, 2, 4], [1, 3, 0]]
    """

    def __init__(self, indices: Any, *, num_examples: int | None = None, **kwargs: Any) -> None:
        if isinstance(indices, range):
            indices = torch.arange(indices.start, indices.stop, indices.step)
        items = as_index_tensor(indices, "indices").to("cpu", torch.int64)
        high = check_num_examples(num_examples) if num_examples is not None else 2**62
        check_range(items, 0, high, "indices", "dataset indices")
        duplicates = _num_duplicates(items)
        if duplicates:
            raise ValueError(
                f"`indices` contains {duplicates} duplicates; a pruned subset lists each index "
                "once (use UpsampleSampler to repeat examples)."
            )
        super().__init__(items, **kwargs)


class UpsampleSampler(_MultisetSampler):
    """Yield dataset index ``i`` exactly ``repeats[i]`` times per epoch (0 drops it).

    Example:
        >>> import torch
        >>> s = UpsampleSampler(torch.tensor([1, 0, 3]), shuffle=False)
        >>> list(s)
        [0, 2, 2, 2]
    """

    def __init__(self, repeats: Any, **kwargs: Any) -> None:
        counts = as_index_tensor(repeats, "repeats").to("cpu", torch.int64)
        if counts.numel() and int(counts.min()) < 0:
            raise ValueError(
                f"Expected `repeats` ≥ 0 (times each example appears per epoch), but got "
                f"{int(counts.min())} at index {int(counts.argmin())}."
            )
        if int(counts.sum()) == 0:
            raise ValueError("`repeats` is all zeros: the epoch would be empty.")
        items = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        super().__init__(items, **kwargs)


class JTTSampler(UpsampleSampler):
    """Just Train Twice's upsampling: error examples ``upweight`` times per epoch, the rest once.

    Liu et al. (ICML 2021) retrain on the training set with the ERM model's error set upsampled by
    ``λ_up``; this sampler does that without copying the dataset. For a non-integer weight use
    loss weights instead: ``sw.LossReweighter(sw.jtt_weights(...))``.

    Args:
        error_indices: dataset indices of the error set (e.g. from ``sw.Misclassified``).
        num_examples: ``len(dataset)``.
        upweight: ``λ_up``, an int ≥ 1.

    Example:
        >>> import torch
        >>> s = JTTSampler(torch.tensor([1]), 3, upweight=4, shuffle=False)
        >>> list(s)
        [0, 1, 1, 1, 1, 2]
    """

    def __init__(self, error_indices: Any, num_examples: int, upweight: int, **kwargs: Any) -> None:
        super().__init__(_jtt_repeats(error_indices, num_examples, upweight), **kwargs)


def _jtt_repeats(error_indices: Any, num_examples: int, upweight: int) -> Tensor:
    n = check_num_examples(num_examples)
    if isinstance(upweight, bool) or not isinstance(upweight, int | np.integer):
        raise TypeError(
            f"Expected `upweight` to be an int ≥ 1 for upsampling, but got {upweight!r}; for a "
            "fractional weight use sw.LossReweighter(sw.jtt_weights(...))."
        )
    if upweight < 1:
        raise ValueError(f"Expected `upweight` ≥ 1, but got {upweight}.")
    errors = error_set(error_indices, n)
    repeats = torch.ones(n, dtype=torch.int64)
    repeats[errors] = int(upweight)
    return repeats


def error_set(error_indices: Any, num_examples: int) -> Tensor:
    """Validate an error set: unique dataset indices in ``[0, num_examples)``."""
    errors = as_index_tensor(error_indices, "error_indices").to("cpu", torch.int64)
    check_range(errors, 0, num_examples, "error_indices", f"num_examples={num_examples}")
    if _num_duplicates(errors):
        raise ValueError("`error_indices` contains duplicates; list each error example once.")
    return errors


def _num_duplicates(values: Tensor) -> int:
    """Entries that repeat an earlier one; O(n) for sorted input (what ``select`` returns)."""
    if values.numel() < 2:
        return 0
    if not bool((values[1:] >= values[:-1]).all()):
        values = torch.sort(values).values
    return int((values[1:] == values[:-1]).sum())
