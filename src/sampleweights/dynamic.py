"""Dynamic pruning (InfoBatch's rule): skip part of the well-learned examples each epoch, rescale
the loss of the rest so the expected gradient is unchanged.

InfoBatch (Qin et al., ICLR 2024, "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data
Pruning") keeps each example's latest loss. Before each epoch, among the examples whose latest
loss is below the mean, a random fraction ``prune`` is skipped for that epoch and the loss of the
kept ones among them is multiplied by about ``1/(1 − prune)``; the last ``anneal`` fraction of the
epochs trains on the full data with weight 1. :class:`DynamicPruner` is that rule as one object:

* a ``Sampler[int]`` for the DataLoader, on the same machinery as
  :class:`~sampleweights.PrunedSampler` — deterministic in ``(seed, epoch, rank)`` and the recorded
  losses, one cursor per ``iter()``, DDP sharding with ``pad``/``drop_last``, mid-epoch resume;
* the loss side: ``loss = pruner.reweight(per_example_loss, indices)`` records the batch's losses
  (a vectorised scatter, no host sync) and returns the rescaled batch loss.

**The rule, exactly.** Before epoch ``e`` (at ``set_epoch(e)``) with ``L`` the latest recorded
losses:

* examples never recorded are kept with weight 1 (so epoch 0 is the full data, unless losses
  were recorded before its ``set_epoch``);
* the threshold is the mean of ``L`` over the recorded examples. (InfoBatch starts every score at
  3.0 and averages over the whole dataset, so never-seen examples count as a loss of 3 in its
  mean; here they count in neither the mean nor the pruning);
* of the ``n`` recorded examples with ``L < threshold``, ``s = ⌊prune · n⌋`` chosen uniformly at
  random are skipped, the other ``k = n − s`` kept with weight ``n / k`` — ``1/(1 − prune)`` up to
  rounding, and *exactly* the inverse of their inclusion probability ``k / n``, so the expected
  epoch loss equals the full-data one (InfoBatch keeps ``int((1 − prune)·n)`` and weighs them
  ``1/(1 − prune)``, slightly biased). ``prune`` is therefore the fraction of the below-mean
  examples skipped per epoch; the epoch saves ``s / N`` of the data (:attr:`saving`);
* in epochs ``e ≥ epochs − ⌈anneal · epochs⌉`` every example is kept with weight 1;
* the random subset comes from a private ``torch.Generator`` seeded from ``(seed, epoch)`` (a
  stream apart from the shuffle's), never the global RNG: the decision is a pure function of
  ``(seed, epoch, L)``, the same on every rank once ``L`` is merged.

**Call ``pruner.set_epoch(epoch)`` before each epoch**: it takes the epoch's decision (so
``len(pruner)`` and ``len(loader)`` are known before the epoch starts). Calling it again for the
epoch already decided changes nothing (so a resumed epoch keeps its saved decision).

**DDP.** Each rank records the losses of its own batches. ``set_epoch`` merges them: one
all-reduce of ``2 × num_examples`` float32 over ``process_group``, so *``set_epoch`` is a collective
that every rank must call* (as ``DistributedSampler``'s users already do, each epoch). An example
recorded by several ranks in one epoch (a padding duplicate) gets the mean of their values. Ranks
need not see equal batches: nothing is exchanged per step (InfoBatch all-gathers every batch,
which requires equal batch sizes). For the exact DDP gradient with uneven batches, compose with
``LossReweighter(torch.ones(N), sync_batch=True)`` (see :meth:`DynamicPruner.reweight`).

**Schedulers.** The length of epoch ``e`` depends on the losses, so the total number of
optimizer steps is known only epoch by epoch (``len(loader)`` after ``set_epoch``), bounded by the
full-data count ``epochs · ⌈N / (B · R)⌉``. A schedule built on a step total (``OneCycleLR``)
would stop short or overrun; schedule by the fraction of the run done instead —
:meth:`DynamicPruner.progress` — e.g. ``LambdaLR`` with a cosine of it (docs/recipes/
dynamic_pruning.md).

**Memory.** 4 bytes (latest loss) + 4 × 1 byte (masks) per example, plus the sampler's index
tensor (8 bytes) and the epoch's kept indices (≤ 8 bytes).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sampleweights.distributed import all_reduce_copy, is_distributed
from sampleweights.errors import StateMismatchError
from sampleweights.reweight import LossReweighter
from sampleweights.samplers import _as_int, _is_int, _MultisetSampler
from sampleweights.scorers.base import last_occurrence
from sampleweights.validation import (
    as_index_tensor,
    check_num_examples,
    check_range,
    per_example_ids,
)

__all__ = ["DynamicPruner"]

_MASK64 = 2**64 - 1


def _prune_seed(seed: int, epoch: int) -> int:
    """A seed in ``[0, 2**64)`` for epoch ``epoch``'s pruning draw: splitmix64 of ``seed + epoch``
    offset by a constant, so the stream is apart from the shuffle's (seeded ``seed + epoch``)."""
    z = (seed + epoch + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _as_fraction(value: Any, name: str, high: float, closed: bool, what: str) -> float:
    """A real number in ``[0, high)`` (``closed``: ``[0, high]``); TypeError/ValueError else."""
    if isinstance(value, bool) or not (isinstance(value, int | float) or _is_numpy_real(value)):
        raise TypeError(f"Expected `{name}` to be a number ({what}), but got {value!r}.")
    out = float(value)
    interval = f"[0, {high:g}{']' if closed else ')'}"
    if not (0.0 <= out <= high if closed else 0.0 <= out < high):  # NaN fails too
        raise ValueError(f"Expected `{name}` in {interval} ({what}), but got {value!r}.")
    return out


def _is_numpy_real(value: Any) -> bool:
    return isinstance(value, np.integer | np.floating) and not isinstance(value, np.bool_)


class _Decision:
    """One epoch's pruning decision: which examples are kept and which of them are upweighted."""

    __slots__ = ("epoch", "items", "kept", "low", "scale", "threshold")

    def __init__(
        self, epoch: int, kept: Tensor, low: Tensor, scale: float, threshold: float | None
    ) -> None:
        self.epoch = epoch
        self.kept = kept  # (N,) bool, CPU: in this epoch
        self.low = low  # (N,) bool, CPU: below the threshold (pruning candidates)
        self.scale = scale  # the weight of a kept below-threshold example: n / k
        self.threshold = threshold  # the mean latest loss; None when nothing was pruned by it
        self.items = kept.nonzero().squeeze(1)  # (M,) int64: the kept indices, ascending


class DynamicPruner(_MultisetSampler):
    """InfoBatch's dynamic pruning: a sampler skipping well-learned examples, and loss rescaling.

    Each epoch, of the recorded examples whose latest loss is below the mean, ``⌊prune · n⌋``
    chosen at random are skipped and the rest weigh ``n / k`` (about ``1/(1 − prune)``); the last
    ``⌈anneal · epochs⌉`` epochs use the full data. See the module docstring for the exact rule,
    DDP and schedulers.

    Use it as the DataLoader's sampler over :class:`~sampleweights.WithIndex` data, call
    :meth:`set_epoch` before each epoch, and compute the loss with :meth:`reweight` from the
    per-example losses (``reduction="none"``).

    Args:
        num_examples: ``len(dataset)``.
        prune: the fraction of the below-mean examples skipped per epoch, in ``[0, 1)``
            (InfoBatch's ``prune_ratio``; 0 never prunes).
        anneal: the fraction of the epochs, at the end, trained on the full data, in ``[0, 1]``
            (InfoBatch's ``1 − delta``).
        epochs: the number of epochs of the run (the anneal phase is counted from it).
        seed, shuffle, num_replicas, rank, drop_last, pad: as for
            :class:`~sampleweights.PrunedSampler` (the order of an epoch is a pure function of
            ``(seed, epoch, rank)`` and the epoch's kept set).
        process_group: the ``torch.distributed`` group of the data-parallel ranks whose losses
            :meth:`set_epoch` merges (default: the world).

    Example:
        >>> import torch
        >>> pruner = DynamicPruner(8, prune=0.5, anneal=0.25, epochs=4, shuffle=False)
        >>> pruner.set_epoch(0)
        >>> list(pruner)                           # nothing recorded yet: the full data
        [0, 1, 2, 3, 4, 5, 6, 7]
        >>> losses = torch.tensor([0.1, 0.2, 0.1, 0.2, 2.0, 2.0, 2.0, 2.0])
        >>> pruner.reweight(losses, torch.arange(8))
        tensor(1.0750)
        >>> pruner.set_epoch(1)                    # 2 of the 4 below-mean examples skipped
        >>> len(pruner), pruner.saving
        (6, 0.25)
        >>> list(pruner)                           # examples 1 and 3 skipped this epoch
        [0, 2, 4, 5, 6, 7]
        >>> pruner.weights(torch.arange(8)).tolist()  # kept below-mean examples weigh 4 / 2
        [2.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    """

    def __init__(
        self,
        num_examples: int,
        prune: float = 0.5,
        anneal: float = 0.125,
        *,
        epochs: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        pad: bool = True,
        process_group: Any = None,
    ) -> None:
        n = check_num_examples(num_examples)
        self.prune = _as_fraction(prune, "prune", 1.0, False, "fraction of the below-mean examples")
        self.anneal = _as_fraction(
            anneal, "anneal", 1.0, True, "fraction of the epochs, at the end"
        )
        self.epochs = _as_int(epochs, "epochs", 1, " Pass the number of epochs of the run.")
        super().__init__(
            torch.arange(n, dtype=torch.int64),
            shuffle=shuffle,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
            drop_last=drop_last,
            pad=pad,
        )
        self.num_examples = n
        self.process_group = process_group
        # the last slot of the per-example state is a trash slot: non-final duplicates and
        # non-finite losses are written there, so recording stays a branch-free, sync-free scatter
        self._scores = torch.full((n + 1,), math.nan, dtype=torch.float32)  # NaN: never recorded
        self._fresh = torch.zeros(n + 1, dtype=torch.bool)  # recorded since the last merge
        self._decision = self._full(0)  # provisional: set_epoch(0) takes epoch 0's decision
        self._taken = False  # whether set_epoch (or load_state_dict) took self._decision
        self._upweighted = torch.zeros(n, dtype=torch.bool)  # kept & low, where the losses are

    # -- the rule ----------------------------------------------------------------------------------
    @property
    def pruning_epochs(self) -> int:
        """Epochs ``0 … pruning_epochs − 1`` may prune; the ``⌈anneal · epochs⌉`` after use all.

        Example:
            >>> DynamicPruner(10, anneal=0.125, epochs=200).pruning_epochs
            175
        """
        full = math.ceil(round(self.anneal * self.epochs, 9))  # 0.1 · 30 is 3, not 3.0000000004
        return self.epochs - full

    def _full(self, epoch: int) -> _Decision:
        n = self.num_examples
        return _Decision(
            epoch, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool), 1.0, None
        )

    def _decide(self, epoch: int, scores: Tensor) -> _Decision:
        """Epoch ``epoch``'s decision from the latest losses ``scores`` ((N,) float32 on the CPU,
        NaN = never recorded): a pure function of ``(seed, epoch, scores)``."""
        if epoch >= self.pruning_epochs or self.prune == 0.0:
            return self._full(epoch)
        seen = ~torch.isnan(scores)
        num_seen = int(seen.sum())
        if num_seen == 0:
            return self._full(epoch)
        threshold = float(torch.nansum(scores, dtype=torch.float64)) / num_seen
        low = scores.double() < threshold  # NaN < t is False: never-recorded examples are kept
        candidates = low.nonzero().squeeze(1)
        n = candidates.numel()
        # k = n − s ≥ 1 whenever n ≥ 1: prune < 1, but round() can lift prune · n to n when
        # prune is within 1e-6 / n of 1
        skip = min(math.floor(round(self.prune * n, 6)), max(n - 1, 0))
        kept = ~low
        if n:
            gen = torch.Generator().manual_seed(_prune_seed(self.seed, epoch))
            chosen = torch.randperm(n, generator=gen, device="cpu")[: n - skip]
            kept[candidates[chosen]] = True
        return _Decision(epoch, kept, low, n / (n - skip) if n else 1.0, threshold)

    def _install(self, decision: _Decision) -> None:
        self._decision, self._taken = decision, True
        self._upweighted = (decision.kept & decision.low).to(self._scores.device)

    def _epoch_items(self, epoch: int) -> Tensor:
        if epoch != self._decision.epoch:
            raise RuntimeError(
                f"DynamicPruner has decided epoch {self._decision.epoch}, not {epoch}: call "
                f"set_epoch({epoch}) before iterating or measuring that epoch."
            )
        return self._decision.items

    def set_epoch(self, epoch: int) -> None:
        """Take epoch ``epoch``'s pruning decision (and seed its order): call it before every epoch.

        Merges the ranks' recorded losses first — a collective: under ``torch.distributed`` every
        rank of ``process_group`` must call it, with the same epochs. Calling it with the epoch
        already decided (e.g. after :meth:`load_state_dict`) keeps that decision and its resume
        position, and communicates nothing. After it, ``len(self)`` is the epoch's length.

        Raises:
            TypeError: ``epoch`` is not an int (numpy integers are accepted).
            ValueError: ``epoch`` < 0.
        """
        epoch = _as_int(epoch, "epoch", 0)
        if not self._taken or epoch != self._decision.epoch:
            self._merge()
            self._install(self._decide(epoch, self._scores[:-1].cpu()))
        super().set_epoch(epoch)

    def _merge(self) -> None:
        """Make every rank's latest losses the same: the mean of the values the ranks recorded
        since the last merge, where any did; else the common value from before."""
        n = self.num_examples
        if is_distributed(self.process_group):
            fresh = self._fresh[:n]
            scores = self._scores[:n]
            wire = torch.stack((torch.where(fresh, scores, 0.0), fresh.to(torch.float32)))
            total, count = all_reduce_copy(wire, "sum", self.process_group).unbind()
            merged = torch.where(count > 0, total / count.clamp_min(1.0), scores)
            self._scores[:n] = merged
        self._fresh.zero_()

    # -- the loss side -----------------------------------------------------------------------------
    def _indices(self, per_example_loss: Tensor, indices: Any) -> Tensor:
        """Validate a batch (before anything changes); its indices as int64, where they were
        given (the host, from a DataLoader)."""
        idx = per_example_ids(per_example_loss, indices)
        check_range(idx, 0, self.num_examples, "indices", f"num_examples={self.num_examples}")
        return idx

    def _follow(self, device: torch.device) -> None:
        """Keep the per-example state where the losses are (moved once, on the first batch)."""
        if self._scores.device != device:
            self._scores = self._scores.to(device)
            self._fresh = self._fresh.to(device)
            self._upweighted = self._upweighted.to(device)

    def update(self, per_example_loss: Tensor, indices: Any) -> None:
        """Record the batch's losses as the examples' latest (detached; no host sync).

        Of several rows of one index the last counts (batch order); non-finite losses (an fp16
        overflow step) are not recorded, the example keeps its previous loss.

        Args:
            per_example_loss: ``(B,)`` float, e.g. ``F.cross_entropy(..., reduction="none")``.
            indices: ``(B,)`` dataset indices of the batch.

        Raises:
            ValueError, TypeError: a malformed batch or an index out of range; nothing is recorded.
        """
        idx = self._indices(per_example_loss, indices)
        self._record(per_example_loss, idx.to(per_example_loss.device, non_blocking=True))

    def _record(self, per_example_loss: Tensor, idx: Tensor) -> None:
        self._follow(per_example_loss.device)
        if idx.numel() == 0:
            return
        values = per_example_loss.detach().to(torch.float32)
        sorted_idx, order, is_last = last_occurrence(idx)
        values = values[order]
        slot = torch.where(is_last & torch.isfinite(values), sorted_idx, self.num_examples)
        self._scores.index_copy_(0, slot, values)
        self._fresh.index_fill_(0, slot, True)

    def weights(self, indices: Any) -> Tensor:
        """This epoch's pruning weights of ``indices``: ``n / k`` for kept below-mean examples,
        1.0 otherwise; float32 ``(B,)`` on the device of the recorded losses.

        Multiply them into any other per-example weighting (see :meth:`reweight`).
        """
        idx = as_index_tensor(indices, "indices")
        check_range(idx, 0, self.num_examples, "indices", f"num_examples={self.num_examples}")
        return self._weights_of(idx.to(self._upweighted.device, non_blocking=True), torch.float32)

    def _weights_of(self, idx: Tensor, dtype: torch.dtype) -> Tensor:
        # Python scalars, not tensors: no host-to-device copy (and no sync) per batch on CUDA
        return torch.where(self._upweighted[idx], self._decision.scale, 1.0).to(dtype)

    def reweight(
        self,
        per_example_loss: Tensor,
        indices: Any,
        *,
        reweighter: LossReweighter | None = None,
    ) -> Tensor:
        """Record the batch's losses and return the rescaled batch loss.

        Without ``reweighter``: ``Σᵢ pᵢ·lossᵢ / B`` with ``pᵢ`` = :meth:`weights` (``B`` = the
        rank's batch; an empty batch gives 0). Summed over an epoch, its expectation over the
        pruning draw is the full-data epoch's ``Σᵢ lossᵢ / B``.

        With ``reweighter`` (e.g. JTT's ``LossReweighter(jtt_weights(...))``):
        ``reweighter(p · loss, indices)`` = ``Σᵢ pᵢ·uᵢ·lossᵢ / (B · mean(u))``, whose expectation
        over the pruning draw is the ``u``-weighted full-data loss: the two weightings compose by
        product (``p · loss`` in at least float32, rounded once to the loss's dtype). That holds
        for ``normalize="mean"`` and ``"batch"``; ``"weights"`` divides by the batch's ``Σ uᵢ``,
        a ratio that no weighting keeps unbiased. The pruning rule itself always sees the raw
        losses. A reweighter with ``sync_batch=True`` makes the DDP gradient exact with uneven
        per-rank batches.

        Unbiased means over the kept set itself: ``pad=True`` adds up to ``R − 1`` repeated
        items to an epoch of ``R`` ranks (as ``DistributedSampler`` does), and the kept set's
        size, not ``N``, sets how many, so a padded epoch carries up to ``R − 1`` extra draws of
        the mean loss (shuffled, a relative excess below ``R / kept``); ``pad=False`` with
        ``sync_batch=True`` is exact.

        Args:
            per_example_loss: ``(B,)`` float, with ``reduction="none"``.
            indices: ``(B,)`` dataset indices of the batch.
            reweighter: a :class:`~sampleweights.LossReweighter` for the same ``num_examples``.

        Raises:
            ValueError, TypeError: a malformed batch, an index out of range, or a reweighter of
                another size; nothing is recorded.
        """
        if reweighter is not None:
            if not isinstance(reweighter, LossReweighter):
                raise TypeError(
                    f"Expected `reweighter` to be a sampleweights.LossReweighter or None, but got "
                    f"{type(reweighter).__name__}."
                )
            if reweighter.num_examples != self.num_examples:
                raise ValueError(
                    f"Expected `reweighter` for num_examples={self.num_examples}, but it has "
                    f"{reweighter.num_examples} weights; build it for the same dataset."
                )
        idx = self._indices(per_example_loss, indices)
        on_device = idx.to(per_example_loss.device, non_blocking=True)  # host → GPU: no wait
        self._record(per_example_loss, on_device)
        # weighted in at least float32 and rounded once: n / k in bf16 would be biased (5/3 is
        # 1.664 there) and p · loss can overflow float16
        dtype = torch.promote_types(per_example_loss.dtype, torch.float32)
        weighted = self._weights_of(on_device, dtype) * per_example_loss.to(dtype)
        if reweighter is not None:
            # the host-side indices: the reweighter's range check of device indices would be a
            # host sync per step
            return reweighter(weighted, idx).to(per_example_loss.dtype)
        out = weighted.sum() / max(per_example_loss.numel(), 1)
        return out.to(per_example_loss.dtype)

    # -- reporting ---------------------------------------------------------------------------------
    @property
    def scores(self) -> Tensor:
        """A copy of the latest recorded losses, float32 ``(num_examples,)``; NaN = never recorded
        (on this rank, until the next :meth:`set_epoch` merges the ranks)."""
        return self._scores[:-1].clone()

    @property
    def saving(self) -> float:
        """The fraction of the dataset this epoch skips: ``1 − kept / num_examples``."""
        return 1.0 - self._decision.items.numel() / self.num_examples

    def inclusion_probabilities(self) -> Tensor:
        """Each example's probability to be in this epoch, over the pruning draw: ``k / n`` for
        the below-mean examples, 1 for the others; float64 ``(num_examples,)``.

        Times the weight an example gets when kept (:meth:`weights` of a kept example: ``n / k``
        below the mean, else 1) it is 1 for every example: the rescaling is unbiased.

        Example:
            >>> import torch
            >>> p = DynamicPruner(4, prune=0.5, epochs=8)
            >>> p.update(torch.tensor([0.1, 0.1, 1.0, 1.0]), torch.arange(4))
            >>> p.set_epoch(1)
            >>> p.inclusion_probabilities().tolist()
            [0.5, 0.5, 1.0, 1.0]
        """
        d = self._decision
        return torch.where(d.low, 1.0 / d.scale, 1.0).to(torch.float64)

    def summary(self) -> dict[str, Any]:
        """This epoch's decision in numbers: ``epoch``, ``pruning`` (in the pruning phase),
        ``threshold`` (the mean latest loss, None if nothing was compared), ``below_mean``,
        ``kept``, ``skipped``, ``scale`` (the weight of kept below-mean examples), ``saving``.

        Example:
            >>> DynamicPruner(10, epochs=4).summary()["saving"]
            0.0
        """
        d = self._decision
        kept = d.items.numel()
        return {
            "epoch": d.epoch,
            "pruning": d.epoch < self.pruning_epochs,
            "threshold": d.threshold,
            "below_mean": int(d.low.sum()),
            "kept": kept,
            "skipped": self.num_examples - kept,
            "scale": d.scale,
            "saving": self.saving,
        }

    def progress(self, batches_done: int, batches_in_epoch: int) -> float:
        """The fraction of the run done after ``batches_done`` of this epoch's
        ``batches_in_epoch`` (``len(loader)``): ``(epoch + batches_done / batches_in_epoch) /
        epochs``. Schedule the learning rate by it (not by a step total, which pruning makes
        unknown in advance): every epoch spans the same 1/``epochs`` of the schedule, however
        many steps it has. Clamped to 1 for epochs trained past ``epochs`` (a schedule stays
        at its end rather than starting over).

        Raises:
            TypeError: an argument is not an int.
            ValueError: ``batches_in_epoch`` < 1, or ``batches_done`` outside
                ``[0, batches_in_epoch]``.

        Example:
            >>> p = DynamicPruner(100, epochs=10)
            >>> p.set_epoch(3)
            >>> p.progress(5, 20)
            0.325
        """
        total = _as_int(batches_in_epoch, "batches_in_epoch", 1, " Pass len(loader).")
        done = _as_int(batches_done, "batches_done", 0)
        if done > total:
            raise ValueError(
                f"Expected `batches_done` in [0, {total}] (batches of this epoch done), but got "
                f"{done}."
            )
        return min(1.0, (self.epoch + done / total) / self.epochs)

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The sampler's position (see :class:`~sampleweights.PrunedSampler`) plus the pruning
        state: the settings, this rank's latest losses and the current epoch's decision (CPU
        tensors), so a resumed epoch keeps its kept set and weights, and the next decisions follow
        from the same losses."""
        state = super().state_dict(consumed)
        d = self._decision
        state["dynamic"] = {
            "num_examples": self.num_examples,
            "prune": self.prune,
            "anneal": self.anneal,
            "epochs": self.epochs,
            "scores": self._scores[:-1].cpu().clone(),
            "fresh": self._fresh[:-1].cpu().clone(),
            "decision_epoch": d.epoch,
            "taken": self._taken,
            "kept": d.kept.clone(),
            "low": d.low.clone(),
            "scale": d.scale,
            "threshold": d.threshold,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the losses, the saved epoch's decision and the position (see
        :class:`~sampleweights.PrunedSampler`); the next ``iter()`` continues the saved epoch.

        Raises:
            TypeError: ``state_dict`` is not a dict.
            StateMismatchError: the state was saved with other settings (``num_examples``,
                ``prune``, ``anneal``, ``epochs``, seed, world, order settings) or is malformed;
                nothing is changed.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"Expected `state_dict` to be a dict from DynamicPruner.state_dict(), but got "
                f"{type(state_dict).__name__}."
            )
        decision, scores, fresh = self._saved_decision(state_dict.get("dynamic"), state_dict)
        taken = state_dict["dynamic"].get("taken", True)
        if not isinstance(taken, bool):
            raise StateMismatchError(
                f"Cannot resume this DynamicPruner: `dynamic.taken` must be a bool, got {taken!r}."
            )
        old = (self._decision, self._taken, self._upweighted)
        self._install(decision)
        try:
            super().load_state_dict(state_dict)
        except BaseException:
            self._decision, self._taken, self._upweighted = old
            raise
        # a state saved before the first set_epoch holds a provisional decision: set_epoch of its
        # epoch must still take the real one, from the losses recorded so far
        self._taken = taken
        device = self._scores.device
        self._scores = torch.cat((scores, scores.new_full((1,), math.nan))).to(device)
        self._fresh = torch.cat((fresh, fresh.new_zeros(1))).to(device)

    def _saved_decision(
        self, saved: Any, state_dict: dict[str, Any]
    ) -> tuple[_Decision, Tensor, Tensor]:
        """The pruning part of a state, checked against this pruner (nothing is changed)."""

        def mismatch(what: str) -> StateMismatchError:
            return StateMismatchError(
                f"Cannot resume this DynamicPruner: {what}. Pass the dict that "
                "DynamicPruner.state_dict() returned, to a pruner built with the same settings."
            )

        if not isinstance(saved, dict):
            raise mismatch("the state has no `dynamic` field (the losses and the decision)")
        n = self.num_examples
        for key, value in (
            ("num_examples", n),
            ("prune", self.prune),
            ("anneal", self.anneal),
            ("epochs", self.epochs),
        ):
            if key not in saved:
                raise mismatch(f"the state has no `dynamic.{key}` field")
            got = saved[key]
            if isinstance(got, bool) or not isinstance(got, int | float) or got != value:
                raise mismatch(f"it was saved with {key}={got!r}, this pruner has {key}={value!r}")
        tensors = {}
        for key, dtype in (
            ("scores", torch.float32),
            ("fresh", torch.bool),
            ("kept", torch.bool),
            ("low", torch.bool),
        ):
            t = saved.get(key)
            if not isinstance(t, Tensor) or t.dtype != dtype or tuple(t.shape) != (n,):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else repr(type(t))
                raise mismatch(
                    f"`dynamic.{key}` must be a {dtype} tensor of shape ({n},), got {got}"
                )
            tensors[key] = t.detach().to("cpu", copy=True)
        epoch: Any = saved.get("decision_epoch")
        scale: Any = saved.get("scale")
        if not _is_int(epoch) or epoch != state_dict.get("epoch"):
            raise mismatch(
                f"`dynamic.decision_epoch` ({epoch!r}) must be the saved epoch "
                f"({state_dict.get('epoch')!r})"
            )
        if bool(tensors["scores"].isinf().any()):  # update() records finite losses only
            raise mismatch("`dynamic.scores` holds an infinite loss, which no update records")
        kept, low = tensors["kept"], tensors["low"]
        n_low = int(low.sum())
        k = int((kept & low).sum())
        if not bool(kept[~low].all()) or not kept.any() or (n_low and k == 0):
            raise mismatch(
                "`dynamic.kept` keeps no example, or skips an example not below the mean"
            )
        expected = n_low / k if n_low else 1.0
        if isinstance(scale, bool) or not isinstance(scale, int | float) or scale != expected:
            raise mismatch(
                f"`dynamic.scale` must be {expected!r} for the saved decision, got {scale!r}"
            )
        threshold = saved.get("threshold")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, float)
        ):
            raise mismatch(f"`dynamic.threshold` must be a float or None, got {threshold!r}")
        decision = _Decision(int(epoch), kept, low, float(expected), threshold)
        return decision, tensors["scores"], tensors["fresh"]

    def __repr__(self) -> str:
        base = super().__repr__()
        return (
            f"{base[:-1]}, num_examples={self.num_examples}, prune={self.prune}, "
            f"anneal={self.anneal}, epochs={self.epochs})"
        )
