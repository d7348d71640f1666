"""AUM, the area under the margin (Pleiss, Zhang, Elenberg & Weinberger, "Identifying Mislabeled
Data using the Area Under the Margin Ranking", NeurIPS 2020).

At each presentation the margin of an example is its assigned logit minus the largest other
logit, ``x_y − max_{j≠y} x_j``; AUM is its mean over the presentations (the paper averages over
the training epochs, from the training loop's own logits). A correctly labelled example is soon
pushed to a positive margin; a mislabelled one is pulled towards its true class, so its margin
stays negative: low AUM = likely mislabelled. CCS (Zheng et al. 2023) removes the lowest-AUM
examples before stratified selection (``sw.select(..., cutoff_scores=-aum)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sampleweights.scorers.base import RunningMeanScorer
from sampleweights.scorers.rowstats import RowStats

__all__ = ["AUM"]


class AUM(RunningMeanScorer):
    """Area under the margin: the mean over presentations of ``x_y − max_{j≠y} x_j`` per example.

    Call ``update(batch, logits)`` in the training loop (every epoch, as Pleiss et al.).
    ``compute()`` is float32 ``(num_examples,)``: the mean margin in logit units, NaN if never
    seen. Low (negative) = likely mislabelled; note the direction: :func:`~sampleweights.select`
    treats higher as harder, so pass ``-scores`` to remove the lowest AUM. Each presentation's
    margin is a float32 difference (the mean accumulates in float64): it carries float32's
    rounding (``1e8 − 1`` is ``1e8``), and a margin beyond float32's range (logits ≳ 1.7e38
    apart) is ``±inf``, so an example with both an ``inf`` and a ``−inf`` margin averages to NaN.

    Thresholding (the paper's recipe): the AUM of a mislabelled example depends on the model and
    the data, so Pleiss et al. calibrate the cut-off with *threshold examples*: assign
    ``N / (C + 1)`` randomly chosen examples to a fake extra class ``C`` (the model gets
    ``C + 1`` outputs), train, and take the 99th percentile of those examples' AUM
    (:meth:`threshold`); the real examples below it are flagged. The paper repeats this with a
    second disjoint set of threshold examples so every example is assessed once without being
    a threshold example itself.

    State: 12 bytes per example (fp64 sum + int32 count; 16 with ``ema=``). Under
    ``torch.distributed`` the sums are reduced at ``compute()``.

    Args:
        num_examples: ``len(dataset)``.
        ema: ``None`` for the mean, or a decay in (0, 1) for a bias-corrected exponential moving
            average (see :class:`~sampleweights.scorers.base.RunningMeanScorer`).
        **kwargs: ``device``, ``nonfinite``, ``layout``, ``validate``, ``process_group``.

    Raises:
        ValueError: from ``update`` for logits with a single class (no other logit).

    Example:
        >>> import torch
        >>> s = AUM(3)
        >>> y = torch.tensor([0, 1])
        >>> s.update_indexed(torch.tensor([0, 1]), torch.tensor([[3.0, 1.0], [3.0, 1.0]]), y)
        >>> s.update_indexed(torch.tensor([0, 1]), torch.tensor([[5.0, 1.0], [2.0, 1.0]]), y)
        >>> s.compute()   # example 1 keeps a negative margin: likely mislabelled
        tensor([ 3.0000, -1.5000,     nan])
    """

    name = "aum"

    def __init__(self, num_examples: int, **kwargs: Any) -> None:
        super().__init__(num_examples, **kwargs)

    def _values(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self._values_from(RowStats(logits, targets))

    def _values_from(self, stats: RowStats) -> Tensor:
        return stats.logit_margin

    @staticmethod
    def threshold(scores: Tensor, threshold_indices: Any, percentile: float = 99.0) -> float:
        """The AUM below which an example is flagged, from the threshold examples' scores.

        Args:
            scores: ``(N,)`` AUM scores (``compute()``) of a run in which the examples at
                ``threshold_indices`` were assigned to a fake extra class.
            threshold_indices: the indices of those threshold examples (distinct, in
                ``[0, N)``), or a boolean mask of shape ``(N,)``.
            percentile: in (0, 100]; Pleiss et al. use the 99th.

        Raises:
            ValueError: no threshold examples, indices out of range or repeated, a mask of the
                wrong length, a percentile out of range, or NaN scores among the threshold
                examples (never seen).
            TypeError: float indices, or a percentile that is not a number.

        Example:
            >>> import torch
            >>> scores = torch.tensor([2.0, -1.0, -3.0, 1.5, -2.0])
            >>> AUM.threshold(scores, [1, 2, 4], percentile=50.0)   # median of -1, -3, -2
            -2.0
        """
        if isinstance(percentile, bool) or not isinstance(percentile, int | float):
            raise TypeError(
                f"Expected `percentile` to be a number in (0, 100], but got "
                f"{type(percentile).__name__}."
            )
        if not 0.0 < float(percentile) <= 100.0:
            raise ValueError(f"Expected `percentile` in (0, 100], but got {percentile}.")
        values = torch.as_tensor(scores).detach().to("cpu", torch.float64).reshape(-1)
        index = torch.as_tensor(threshold_indices).detach().to("cpu").reshape(-1)
        if index.dtype == torch.bool:  # a mask over the examples, not the indices 0 and 1
            if index.numel() != values.numel():
                raise ValueError(
                    f"A boolean `threshold_indices` is a mask over the {values.numel()} scores, "
                    f"but got {index.numel()} entries."
                )
            index = index.nonzero().view(-1)
        elif index.numel() and (index.is_floating_point() or index.is_complex()):
            raise TypeError(
                f"Expected integer indices or a boolean mask as `threshold_indices`, but got "
                f"{index.dtype}."
            )
        index = index.to(torch.int64)
        if index.numel() == 0:
            raise ValueError("`threshold_indices` is empty: pass the fake-class examples' indices.")
        if bool((index < 0).any()) or bool((index >= values.numel()).any()):
            raise ValueError(
                f"`threshold_indices` must lie in [0, {values.numel()}), but got "
                f"{int(index.min())} … {int(index.max())}."
            )
        if torch.unique(index).numel() != index.numel():
            raise ValueError("`threshold_indices` repeats an example: each one counts once.")
        values = values[index]
        if bool(values.isnan().any()):
            raise ValueError(
                f"{int(values.isnan().sum())} threshold examples have NaN scores (never "
                "updated): score every threshold example before thresholding."
            )
        return float(torch.quantile(values, float(percentile) / 100.0))
