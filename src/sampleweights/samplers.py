"""Samplers that feed a selection back into the DataLoader: prune, upsample, JTT.

Each sampler holds a *multiset* of dataset indices (``PrunedSampler``: the kept indices once each;
``UpsampleSampler``: index ``i`` ``repeats[i]`` times; ``JTTSampler``: the error set ``upweight``
times, the rest once) and yields one epoch of it per ``iter()``, as ``DistributedSampler`` does:

* **call ``sampler.set_epoch(epoch)`` before each epoch.** The order is a pure function of
  ``(items, seed, epoch, rank)`` — a private CPU ``torch.Generator`` seeded with
  ``(seed + epoch) mod 2**64`` (any int seed; ``DistributedSampler``'s order wherever it has
  one), never the global RNG nor the default device — so without ``set_epoch`` every epoch
  repeats the same order;
* every ``iter()`` yields the whole epoch with its own cursor: peeking at ``next(iter(loader))``,
  breaking out of an epoch early, or two interleaved iterators never lose or shift items;
* across ``num_replicas`` ranks an epoch covers the multiset exactly: rank ``r`` takes positions
  ``r, r + R, …`` of the shuffled epoch, padded with its first items (or cut with ``drop_last``)
  so every rank yields the same length, exactly like ``DistributedSampler``; ``pad=False`` gives
  uneven shards and no duplicates (for scoring passes);
* ``num_replicas``/``rank`` not given are read from the default process group *each time* the
  sampler is iterated or measured (``iter()``, ``len()``, ``state_dict()``), so a sampler built
  before ``init_process_group`` still shards once the group exists; outside a group they are 1/0;
* ``state_dict()`` holds epoch, seed, the position of the most recent iterator, the settings and a
  fingerprint of the multiset; ``load_state_dict`` refuses a state saved with other settings and
  sets a one-shot offset: only the next ``iter()`` resumes mid-epoch, with the identical remaining
  order.

An upsampled epoch is longer than the dataset (JTT with λ=20 and a 5% error set: 1.95 × N
items), so an LR schedule set in steps per epoch must use ``len(loader)`` of the *upsampled*
loader; pass ``num_samples=`` to keep an epoch at a fixed length instead.
"""

from __future__ import annotations

import hashlib
import math
import operator
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


def _is_int(value: Any) -> bool:
    """A Python or numpy integer; ``bool`` and ``np.bool_`` are not."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _as_int(value: Any, name: str, low: int | None = None, hint: str = "") -> int:
    """``value`` as a Python int (numpy integers accepted); TypeError/ValueError naming ``name``."""
    if not _is_int(value):
        raise TypeError(
            f"Expected `{name}` to be an int (Python or numpy integer), but got "
            f"{type(value).__name__} {value!r}.{hint}"
        )
    if low is not None and value < low:
        raise ValueError(f"Expected `{name}` to be an int ≥ {low}, but got {value}.{hint}")
    return int(value)


def _as_bool(value: Any, name: str) -> bool:
    """``value`` as a Python bool (``np.bool_`` accepted); TypeError naming ``name`` otherwise —
    ``shuffle="False"`` or ``pad=None`` would otherwise read as a silent True/False."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(
            f"Expected `{name}` to be a bool, but got {type(value).__name__} {value!r}."
        )
    return bool(value)


def _check_rank(num_replicas: int, rank: int) -> None:
    # the wording of DistributedSampler's error ("Invalid rank …"), with the interval
    if not 0 <= rank < num_replicas:
        raise ValueError(
            f"Invalid rank {rank}: expected `rank` in [0, {num_replicas - 1}] for "
            f"num_replicas={num_replicas}; pass a rank of the process group."
        )


def _same_field(saved: Any, value: Any) -> bool:
    """A saved field equals this sampler's, with the same kind (``True`` is not ``1``)."""
    if isinstance(value, bool):
        return isinstance(saved, bool) and saved == value
    if isinstance(value, int):
        return _is_int(saved) and saved == value
    return bool(saved == value) if isinstance(saved, str | None) else False


class _Cursor:
    """One ``iter()``'s place in its epoch: ``start`` plus the items its list iterator gave out.

    The sampler returns the list iterator itself (no Python code runs per item); the position is
    read back through ``length_hint``, the items the iterator still holds. A copy or pickle keeps
    the position only (a snapshot), not the iterator and the rest of its epoch.
    """

    __slots__ = ("epoch", "items", "start", "total")

    def __init__(
        self, epoch: int, start: int, items: Iterator[int] | None = None, total: int = 0
    ) -> None:
        self.epoch, self.start, self.items, self.total = epoch, start, items, total

    @property
    def position(self) -> int:
        if self.items is None:
            return self.start
        return self.start + self.total - operator.length_hint(self.items)

    def __reduce__(self) -> tuple[type[_Cursor], tuple[int, int]]:
        return (_Cursor, (self.epoch, self.position))


class _MultisetSampler(Sampler[int]):
    """Shared machinery: one shuffled epoch of a multiset, sharded across ranks, resumable.

    Subclasses choose the multiset (``items``); one that changes it per epoch overrides
    :meth:`_epoch_items`.
    """

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
        # validate everything first: nothing is stored from a rejected call
        replicas = None if num_replicas is None else _as_int(num_replicas, "num_replicas", 1)
        own_rank = None if rank is None else _as_int(rank, "rank")
        seed = _as_int(seed, "seed")
        flags = [
            _as_bool(v, k)
            for k, v in (("shuffle", shuffle), ("drop_last", drop_last), ("pad", pad))
        ]
        shuffle, drop_last, pad = flags
        if num_samples is not None:
            num_samples = _as_int(num_samples, "num_samples", 1, " Or pass None (one multiset).")
        if drop_last and not pad:
            raise ValueError("`drop_last=True` and `pad=False` exclude each other; choose one.")
        if items.numel() == 0:
            raise ValueError("The sampler would yield nothing: the selection is empty.")
        self._num_replicas_arg, self._rank_arg = replicas, own_rank
        self._world()  # checks rank against num_replicas (given, or the group's now)
        self._items = items  # (M,) int64 on CPU: the multiset, in a canonical order
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.pad = pad
        self.num_samples = num_samples
        self.epoch = 0
        self._resume: int | None = None  # one-shot offset set by load_state_dict
        self._cursor: _Cursor | None = None  # the most recent iterator's place
        self._fingerprint: str | None = None

    # -- world -------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        """``(num_replicas, rank)``: the arguments given, else the default process group now."""
        group_size, group_rank = world()
        replicas = group_size if self._num_replicas_arg is None else self._num_replicas_arg
        rank = group_rank if self._rank_arg is None else self._rank_arg
        _check_rank(replicas, rank)
        return replicas, rank

    @property
    def num_replicas(self) -> int:
        """Ranks the epoch is split across: the argument, else the process group's size now."""
        return self._world()[0]

    @property
    def rank(self) -> int:
        """This process's shard: the argument, else its rank in the process group now."""
        return self._world()[1]

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def epoch_size(self) -> int:
        """Items in the current epoch over all ranks, before padding or dropping."""
        return self._epoch_size(self.epoch)

    def _epoch_size(self, epoch: int) -> int:
        size = int(self._items_of(epoch).numel())  # checks the epoch, as iter() does
        return size if self.num_samples is None else self.num_samples

    def _shard_length(self, size: int, num_replicas: int, rank: int) -> int:
        if self.drop_last:
            return size // num_replicas
        if self.pad:
            return math.ceil(size / num_replicas)
        return size // num_replicas + (1 if rank < size % num_replicas else 0)

    def __len__(self) -> int:
        """Items this rank yields per epoch (what a full ``iter()`` yields)."""
        return self._shard_length(self.epoch_size, *self._world())

    # -- order -------------------------------------------------------------------------------------
    def _epoch_items(self, epoch: int) -> Tensor:
        """The multiset of epoch ``epoch`` in a canonical order: ``(M,)`` int64 on CPU.

        The one place the items of an epoch come from, and the seam for samplers whose selection
        changes from epoch to epoch (dynamic pruning): override it, and everything else —
        shuffling by ``(seed, epoch)``, ``num_samples``, padding, sharding, ``len()``, resume —
        follows. An override must return the same multiset for the same epoch on every rank and
        at every call (it is called by each ``iter()`` and ``len()``), must not be empty, and
        should be cheap or cached per epoch. The base class returns the multiset it was built
        with, whatever the epoch. ``fingerprint`` (checked on resume) hashes that base multiset:
        an override that depends on other state must restore it before ``load_state_dict``.

        Example:
            >>> class EvenOnOddEpochs(PrunedSampler):
            ...     def _epoch_items(self, epoch):
            ...         return self._items[self._items % 2 == 0] if epoch % 2 else self._items
            >>> s = EvenOnOddEpochs(range(6), shuffle=False)
            >>> s.set_epoch(1)
            >>> list(s), len(s)
            ([0, 2, 4], 3)
        """
        return self._items

    def _items_of(self, epoch: int) -> Tensor:
        """:meth:`_epoch_items`, checked: a non-empty 1-D integer tensor, as int64 on the CPU."""
        items = self._epoch_items(epoch)
        name = f"{type(self).__name__}._epoch_items({epoch})"
        if (
            not isinstance(items, Tensor)
            or items.dim() != 1
            or items.dtype == torch.bool
            or items.is_floating_point()
            or items.is_complex()
        ):
            raise TypeError(
                f"{name} must return a 1-D integer tensor (the epoch's dataset indices), but "
                f"returned {type(items).__name__}"
                + (
                    f" of {items.dtype} and shape {tuple(items.shape)}"
                    if isinstance(items, Tensor)
                    else ""
                )
                + "."
            )
        if items.numel() == 0:
            raise ValueError(f"{name} is empty: an epoch needs at least one item.")
        return items.to("cpu", torch.int64)

    def _epoch_order(self, epoch: int, num_replicas: int, rank: int, start: int = 0) -> Tensor:
        """Rank ``rank``'s items of epoch ``epoch`` from position ``start``: a pure function of
        (items, seed, epoch, rank).

        The shuffle, ``num_samples`` cycling, padding and sharding act on positions into the
        multiset; only this rank's remaining positions are gathered (one ``index_select``).
        """
        items = self._items_of(epoch)
        if self.shuffle:
            # torch.Generator takes a seed in [0, 2**64): a Python int maps there as torch maps
            # a negative one (DistributedSampler's order wherever it has one)
            gen = torch.Generator().manual_seed((self.seed + epoch) % 2**64)
            order = torch.randperm(items.numel(), generator=gen, device="cpu")
        else:
            order = items
        if self.num_samples is not None:  # fixed epoch length: cycle or cut the shuffled multiset
            reps = math.ceil(self.num_samples / order.numel())
            order = order.repeat(reps)[: self.num_samples]
        r = num_replicas
        if self.drop_last:
            order = order[: len(order) // r * r]
        elif self.pad and len(order) % r:
            padding = r - len(order) % r
            order = torch.cat([order, order.repeat(math.ceil(padding / len(order)))[:padding]])
        order = order[rank::r][start:]
        return torch.index_select(items, 0, order) if self.shuffle else order

    def __iter__(self) -> Iterator[int]:
        """A full epoch (``set_epoch``'s), with its own cursor; after ``load_state_dict`` the first
        call resumes at the saved position."""
        num_replicas, rank = self._world()
        start = self._resume or 0
        self._resume = None  # one shot: later iter() calls yield the whole epoch
        # tolist() once per epoch; the plain list iterator is handed out, so per item no Python
        # code of ours runs
        remaining = self._epoch_order(self.epoch, num_replicas, rank, start).tolist()
        items = iter(remaining)
        self._cursor = _Cursor(self.epoch, start, items, len(remaining))
        return items

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch, which seeds the order: call it before every epoch.

        Without it every epoch repeats epoch 0's order (as with ``DistributedSampler``). After
        :meth:`load_state_dict`, the saved epoch keeps the resume position; another epoch
        discards it and starts at 0. Iterators already created are not affected.

        Raises:
            TypeError: ``epoch`` is not an int (numpy integers are accepted).
            ValueError: ``epoch`` < 0.
        """
        epoch = _as_int(epoch, "epoch", 0)
        if epoch != self.epoch:
            # nothing of the new epoch is handed out yet (a cursor left from an earlier visit of
            # that epoch would make state_dict() skip items)
            self._resume = None
            self._cursor = None
        self.epoch = epoch

    # -- resume ------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """A hash of the multiset and its order: equal only for the same selection."""
        if self._fingerprint is None:
            digest = hashlib.sha256(self._items.numpy().tobytes()).hexdigest()
            self._fingerprint = f"{self._items.numel()}:{digest[:16]}"
        return self._fingerprint

    def _consumed(self) -> int:
        """Items of the current epoch handed out: a pending resume offset, else the most recent
        iterator's position (if it belongs to this epoch), else 0."""
        if self._resume is not None:
            return self._resume
        cursor = self._cursor
        return cursor.position if cursor is not None and cursor.epoch == self.epoch else 0

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The position in the current epoch, with the settings it is valid for.

        Args:
            consumed: items of this epoch the training loop really consumed on this rank (after
                a resume, counting the items before it). With a plain DataLoader, which
                prefetches, pass ``batches_done * batch_size``; by default
                the items the most recent iterator handed out (exact with torchdata's
                StatefulDataLoader or ``num_workers=0``). A finished epoch has position
                ``len(sampler)``: resuming it yields nothing until ``set_epoch`` moves on.

        Raises:
            TypeError: ``consumed`` is not an int (numpy integers are accepted).
            ValueError: ``consumed`` is outside ``[0, len(self)]``.
        """
        num_replicas, rank = self._world()
        length = self._shard_length(self.epoch_size, num_replicas, rank)
        if consumed is None:
            position = self._consumed()
        elif not _is_int(consumed):
            raise TypeError(
                f"Expected `consumed` to be an int (items of this epoch the loop consumed on this "
                f"rank), but got {type(consumed).__name__} {consumed!r}."
            )
        elif not 0 <= consumed <= length:
            raise ValueError(
                f"Expected `consumed` to be an int in [0, {length}] (items of this epoch the loop "
                f"consumed on this rank), but got {consumed!r}."
            )
        else:
            position = int(consumed)
        return {
            "sampler": type(self).__name__,
            "epoch": self.epoch,
            "seed": self.seed,
            "position": position,
            "fingerprint": self.fingerprint,
            "num_replicas": num_replicas,
            "rank": rank,
            "shuffle": self.shuffle,
            "pad": self.pad,
            "drop_last": self.drop_last,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: set the epoch, and the next ``iter()`` (only that one) continues it where it
        stopped; later ones yield whole epochs.

        The state must come from a sampler of the same type, selection (fingerprint), seed, world
        (``num_replicas``, ``rank``) and order settings (``shuffle``, ``pad``, ``drop_last``,
        ``num_samples``): anything else would resume a different order.

        Raises:
            TypeError: ``state_dict`` is not a dict.
            StateMismatchError: a field is missing, malformed, or differs from this sampler
                (the message names it); nothing is changed.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"Expected `state_dict` to be a dict from {type(self).__name__}.state_dict(), but "
                f"got {type(state_dict).__name__}."
            )
        name = type(self).__name__
        num_replicas, rank = self._world()
        expected: dict[str, Any] = {
            "sampler": name,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "num_replicas": num_replicas,
            "rank": rank,
            "shuffle": self.shuffle,
            "pad": self.pad,
            "drop_last": self.drop_last,
            "num_samples": self.num_samples,
        }
        for key, value in expected.items():
            if key not in state_dict:
                raise StateMismatchError(
                    f"Cannot resume this {name}: the state has no `{key}` field. Pass the dict "
                    f"that {name}.state_dict() returned."
                )
            saved = state_dict[key]
            if not _same_field(saved, value):
                fix = (
                    "the same selection and sampler type"
                    if key in ("sampler", "fingerprint")
                    else f"{key}={saved!r}"
                )
                raise StateMismatchError(
                    f"Cannot resume this {name} from a state with {key}={saved!r}; this sampler "
                    f"has {key}={value!r}. A state resumes only a sampler built from the same "
                    f"selection, seed, settings and world: rebuild it with {fix}."
                )
        epoch: Any = state_dict.get("epoch")
        if not _is_int(epoch) or epoch < 0:
            raise StateMismatchError(
                f"Cannot resume this {name}: the saved `epoch` must be an int ≥ 0, got {epoch!r}."
            )
        epoch = int(epoch)
        length = self._shard_length(self._epoch_size(epoch), num_replicas, rank)
        position: Any = state_dict.get("position")
        if not _is_int(position) or not 0 <= position <= length:
            raise StateMismatchError(
                f"Cannot resume this {name}: the saved `position` must be an int in "
                f"[0, {length}] (items of epoch {epoch} on this rank), got {position!r}."
            )
        self.epoch = epoch
        self._resume = int(position)
        self._cursor = None

    def __repr__(self) -> str:
        try:
            num_replicas, rank = self._world()
            where = f"{rank}/{num_replicas}"
        except ValueError:  # the rank given does not fit the process group now: say so, not raise
            where = f"{self._rank_arg}/?"
        return (
            f"{type(self).__name__}(items={self._items.numel()}, shuffle={self.shuffle}, "
            f"seed={self.seed}, rank={where}, epoch={self.epoch})"
        )


class PrunedSampler(_MultisetSampler):
    """Yield a subset of the dataset (e.g. ``sw.select(...)``) once per epoch.

    Call ``sampler.set_epoch(epoch)`` before each epoch: the order is seeded by ``seed + epoch``,
    so without it every epoch repeats the same order (as with ``DistributedSampler``).

    Args:
        indices: the kept dataset indices (no duplicates).
        num_examples: ``len(dataset)``, to check the indices are in range (recommended).
        shuffle, seed, num_replicas, rank, drop_last, pad, num_samples: see the module docstring;
            ``num_replicas``/``rank`` not given are read from the process group when the sampler
            is iterated (outside one: 1/0). Integers may be Python or numpy integers; ``shuffle``,
            ``drop_last`` and ``pad`` must be bools (``np.bool_`` too). The indices are copied.

    Example:
        >>> import torch
        >>> s = PrunedSampler(torch.tensor([7, 2, 9]), seed=1)
        >>> sorted(s), len(s)
        ([2, 7, 9], 3)
        >>> s.set_epoch(1)  # before each epoch: a new order
        >>> sorted(s) == [2, 7, 9]
        True
        >>> [list(PrunedSampler(range(5), shuffle=False, num_replicas=2, rank=r)) for r in (0, 1)]
        [[0, 2, 4], [1, 3, 0]]
    """

    def __init__(self, indices: Any, *, num_examples: int | None = None, **kwargs: Any) -> None:
        if isinstance(indices, range):
            indices = torch.arange(indices.start, indices.stop, indices.step, device="cpu")
        # a copy: the caller may reuse or change its tensor, the sampler's multiset stays
        items = as_index_tensor(indices, "indices").to("cpu", torch.int64, copy=True).contiguous()
        if items.numel() == 0:
            raise ValueError(
                "Expected `indices` to select at least one example, but got an empty selection: "
                "the sampler would yield nothing."
            )
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
        items = torch.repeat_interleave(torch.arange(counts.numel(), device="cpu"), counts)
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
    hint = " For a fractional weight use sw.LossReweighter(sw.jtt_weights(...))."
    upweight = _as_int(upweight, "upweight", 1, hint)
    errors = error_set(error_indices, n)
    repeats = torch.ones(n, dtype=torch.int64, device="cpu")
    repeats[errors] = upweight
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
