"""Per-example loss weights: :class:`LossReweighter` and :func:`jtt_weights`."""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from sampleweights.distributed import all_reduce_copy, is_distributed, world
from sampleweights.samplers import error_set
from sampleweights.validation import (
    as_float_vector,
    check_num_examples,
    check_range,
    per_example_ids,
)

__all__ = ["LossReweighter", "Normalize", "jtt_weights"]

Normalize = Literal["mean", "batch", "weights"]
_NORMALIZE: tuple[str, ...] = get_args(Normalize)
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class LossReweighter:
    """Weight each example's loss by a per-example weight, keyed by dataset index.

    ``rw(per_example_loss, indices)`` returns the batch loss

    * ``normalize="mean"`` (default): ``Σᵢ wᵢ·lossᵢ / (B · mean(w))`` with ``mean(w)`` over the
      whole dataset. Unbiased for the weighted dataset loss and on the scale of the unweighted
      loss (all-equal weights give the plain mean). With uniform sampling it equals, in
      expectation, training on a sampler that repeats example i ``wᵢ`` times (JTT's upsampling):
      both minimise ``Σᵢ wᵢ·lossᵢ / Σᵢ wᵢ``.
    * ``"batch"``: ``Σ wᵢ·lossᵢ / B``;
    * ``"weights"``: ``Σ wᵢ·lossᵢ / Σ_batch wᵢ`` (a weighted mean within each batch; biased,
      and changes with the batch split).

    **Batches split across ranks or micro-batches.** DDP averages the ranks' gradients, so the
    step equals the gradient of the global batch's loss only when every rank's loss is its share
    of it. Without ``sync_batch``, ``B`` is the rank's own batch size: exact for ``"mean"`` and
    ``"batch"`` exactly when every rank has the same batch size (our samplers with ``pad=True``
    and a loader with ``drop_last=True``, or equal shards). With uneven batches (``pad=False``
    shards, a short last batch on some ranks) small batches are over-weighted: with 4/4/1 the
    example alone on its rank counts 3× and the others ¾×. ``"weights"`` is exact only on one
    rank. The same holds for gradient accumulation over micro-batches whose losses are averaged.

    With ``sync_batch=True`` each call all-reduces the rank's batch size (and weight sum) over
    ``process_group`` — one collective of two numbers, no host sync — and returns
    ``world_size · Σ_rank wᵢ·lossᵢ / (B_global · mean(w))`` (resp. ``/ B_global``,
    ``/ Σ_global wᵢ``): the DDP-averaged gradient is exactly that of the global batch, however it
    is split, for all three. Every rank must then call it once per step (as DDP's backward
    requires); without an initialised process group it is the single-process loss.

    The weights are copied: editing the tensor passed in changes nothing; build a new
    reweighter to change them.

    Args:
        weights: ``(num_examples,)`` non-negative finite weights, not all zero, stored as
            float32 (weights that float32 rounds to 0 or ∞ are refused).
        normalize: see above.
        sync_batch: all-reduce the batch size across ranks (see above).
        process_group: the ``torch.distributed`` group of the data-parallel ranks for
            ``sync_batch`` (default: the world).

    Example:
        >>> import torch
        >>> rw = LossReweighter(torch.tensor([1.0, 3.0, 1.0, 3.0]))     # mean weight 2
        >>> loss = torch.tensor([0.5, 0.5])
        >>> rw(loss, torch.tensor([0, 1]))                               # (0.5 + 1.5) / (2·2)
        tensor(0.5000)
    """

    def __init__(
        self,
        weights: Tensor,
        normalize: Normalize = "mean",
        *,
        sync_batch: bool = False,
        process_group: Any = None,
    ) -> None:
        weights = as_float_vector(weights, "weights", "one weight per example")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("Expected `weights` to be finite and ≥ 0.")
        if not bool((weights > 0).any()):
            raise ValueError("`weights` are all zero: every loss would vanish.")
        # a private float32 copy: the cached mean must describe exactly these weights, whatever
        # the caller later does to its own tensor (or numpy array, whose memory from_numpy
        # shares). Checked again once float32, which holds neither 1e-50 nor 1e300.
        stored = weights.detach().to(torch.float32, copy=True)
        finite = bool(torch.isfinite(stored).all())
        vanished = (weights > 0) & (stored == 0)  # positive, but below float32's smallest
        if not finite or bool(vanished.any()):
            what = "infinite" if not finite else f"zero at index {int(vanished.nonzero()[0])}"
            raise ValueError(
                f"`weights` are stored as float32, where they become {what} (they range from "
                f"{float(weights.min()):g} to {float(weights.max()):g}); rescale them."
            )
        if normalize not in _NORMALIZE:
            raise ValueError(f"Expected `normalize` in {list(_NORMALIZE)}, but got {normalize!r}.")
        if not isinstance(sync_batch, bool):
            raise TypeError(f"Expected `sync_batch` to be a bool, but got {sync_batch!r}.")
        self._weights = stored
        self.normalize: Normalize = normalize
        self.sync_batch = sync_batch
        self.process_group = process_group
        self.num_examples = self._weights.numel()
        self._mean = float(self._weights.double().mean())

    @property
    def weights(self) -> Tensor:
        """A copy of the weights, float32 ``(num_examples,)``."""
        return self._weights.clone()

    def __call__(self, per_example_loss: Tensor, indices: Any) -> Tensor:
        """The weighted batch loss (a scalar with the loss's dtype and device).

        float16/bfloat16 losses are weighted and summed in float32 and the result rounded once,
        so ``Σ wᵢ·lossᵢ`` cannot overflow float16. An empty batch (``B = 0``, e.g. a rank
        with no data this step) gives a zero loss, never NaN, for every ``normalize``.

        Args:
            per_example_loss: ``(B,)`` float, e.g.
                ``F.cross_entropy(logits, y, reduction="none")``.
            indices: ``(B,)`` dataset indices of the batch.
        """
        idx = per_example_ids(per_example_loss, indices)
        check_range(idx, 0, self.num_examples, "indices", f"num_examples={self.num_examples}")
        if self._weights.device != per_example_loss.device:
            self._weights = self._weights.to(per_example_loss.device)
        # float16/bfloat16 losses are weighted and summed in float32 (Σ wᵢ·lossᵢ overflows
        # float16 long before the normalised loss does), then rounded once to their dtype
        dtype = torch.promote_types(per_example_loss.dtype, torch.float32)
        w = self._weights[idx.to(per_example_loss.device, non_blocking=True)].to(dtype)
        total = (w * per_example_loss.to(dtype)).sum()
        if self.sync_batch and is_distributed(self.process_group):
            # finite in ``dtype``: Σ_global wᵢ = 0 (so total = 0) must give 0, not 0 · ∞
            out = total * self._global_scale(w).clamp_max(torch.finfo(dtype).max).to(dtype)
        elif self.normalize == "mean":
            out = total / (max(per_example_loss.numel(), 1) * self._mean)  # B = 0: 0, not NaN
        elif self.normalize == "batch":
            out = total / max(per_example_loss.numel(), 1)
        else:
            out = total / w.sum().clamp_min(torch.finfo(dtype).tiny)
        return out.to(per_example_loss.dtype)

    def _global_scale(self, w: Tensor) -> Tensor:
        """``world_size / global denominator`` (float64, on ``w``'s device): one all-reduce of
        (batch size, batch weight sum) over the group; constant for autograd."""
        size, _ = world(self.process_group)
        local = torch.stack(
            (
                torch.full((), float(w.numel()), dtype=torch.float64, device=w.device),
                w.detach().sum(dtype=torch.float64),
            )
        )
        batch, weight_sum = all_reduce_copy(local, "sum", self.process_group).unbind()
        batch = batch.clamp_min(1.0)  # every rank empty: a zero loss, not 0 · inf = NaN
        if self.normalize == "mean":
            return size / (batch * self._mean)
        if self.normalize == "batch":
            return size / batch
        return size / weight_sum.clamp_min(torch.finfo(torch.float64).tiny)

    def __repr__(self) -> str:
        sync = ", sync_batch=True" if self.sync_batch else ""
        return (
            f"LossReweighter(num_examples={self.num_examples}, normalize={self.normalize!r}{sync})"
        )


def jtt_weights(error_indices: Any, num_examples: int, upweight: float) -> Tensor:
    """JTT's loss-weight variant: ``upweight`` for error examples, 1.0 for the rest; float32 (N,).

    ``upweight`` is the paper's ``λ_up`` (Liu et al., 2021, "Just Train Twice", Alg. 1: the
    upsampled set holds each error example ``λ_up`` times in total), the same number as
    :class:`~sampleweights.JTTSampler`'s. The authors' code (``run_expt.py --up_weight k``)
    appends ``k`` extra copies of the error set to the dataset, so an error example is seen
    ``1 + k`` times: their ``--up_weight k`` is ``upweight=k + 1`` here (``upweight=1`` is no
    upweighting, their ``0``). The settings the paper reports were run with that code (its
    Waterbirds command is ``--up_weight 100``), so reproduce them with ``upweight=k + 1``.

    Args:
        error_indices: dataset indices of the error set (no duplicates).
        num_examples: ``len(dataset)``.
        upweight: the total weight of an error example, a finite number ≥ 1 (a Python or
            numpy number).

    Example:
        >>> jtt_weights([0, 2], 4, upweight=5.0)
        tensor([5., 1., 5., 1.])
    """
    n = check_num_examples(num_examples)
    if isinstance(upweight, bool | np.bool_) or not isinstance(
        upweight, int | float | np.integer | np.floating
    ):
        raise TypeError(f"Expected `upweight` to be a number ≥ 1, but got {upweight!r}.")
    upweight = float(upweight)
    if not 1 <= upweight <= _FLOAT32_MAX:  # NaN fails too; the weights are float32
        raise ValueError(
            f"Expected `upweight` to be a finite number ≥ 1 (float32), but got {upweight}."
        )
    weights = torch.ones(n, dtype=torch.float32)
    weights[error_set(error_indices, n)] = float(upweight)
    return weights
