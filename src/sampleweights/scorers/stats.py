"""Running means of simple per-example statistics of the logits: loss, margin, entropy,
confidence.

Each is the mean over presentations (or, with ``ema=``, an exponential moving average) of a
per-presentation value computed in fp32 without cancellation (see
:mod:`sampleweights.scorers.rowstats`):

* :class:`Loss` — cross-entropy ``−log p_y``; the "small loss" criterion of noisy-label work
  (Arpit et al., "A Closer Look at Memorization in Deep Networks", ICML 2017; Han et al.,
  "Co-teaching", NeurIPS 2018) and the loss of loss-based pruning;
* :class:`Margin` — ``p_y − max_{j≠y} p_j``, the probability margin (Scheffer et al., "Active
  Hidden Markov Models for Information Extraction", IDA 2001; DeepCore's "Margin");
  :class:`~sampleweights.AUM` is the same margin in logit space;
* :class:`Entropy` — ``−Σ_j p_j log p_j`` of the prediction (label-free uncertainty;
  Coleman et al., "Selection via Proxy", ICLR 2020);
* :class:`Confidence` — ``p_y``, the mean of which is data maps' confidence (Swayamdipta et al.,
  "Dataset Cartography", EMNLP 2020).

Every class keeps 12 bytes of state per example (16 with ``ema=``); see
:class:`~sampleweights.scorers.base.RunningMeanScorer`. Each presentation's value is float32
(the mean accumulates in float64), so its precision is float32's: a loss of logits so far apart
that ``x_y − max x`` overflows float32 (≳ 3.4e38) is ``inf``.
"""

from __future__ import annotations

from torch import Tensor

from sampleweights.scorers.base import RunningMeanScorer
from sampleweights.scorers.rowstats import RowStats

__all__ = ["Confidence", "Entropy", "Loss", "Margin"]


class _StatMean(RunningMeanScorer):
    """A running mean of one :class:`RowStats` statistic, named by ``_stat``."""

    _stat: str

    def _values(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self._values_from(RowStats(logits, targets))

    def _values_from(self, stats: RowStats) -> Tensor:
        values: Tensor = getattr(stats, self._stat)
        return values


class Loss(_StatMean):
    """Mean cross-entropy ``−log softmax(logits)_y`` per example (nats).

    High = hard or mislabelled. Computed as ``log Σ exp(x − max) − (x_y − max)``, two
    non-negative terms, so confident examples keep full relative precision (losses of 1e-20 are
    right, where ``logsumexp(x) − x_y`` gives 0).

    State: 12 bytes per example (16 with ``ema=``). Under ``torch.distributed`` the sums are
    reduced at ``compute()``.

    Args:
        num_examples: ``len(dataset)``.
        ema: ``None`` for the mean over presentations, or a decay in (0, 1) for a bias-corrected
            exponential moving average (see :class:`~sampleweights.scorers.base.RunningMeanScorer`).
        **kwargs: ``device``, ``nonfinite``, ``layout``, ``validate``, ``process_group``.

    Example:
        >>> import torch
        >>> s = Loss(3)
        >>> s.update_indexed(torch.tensor([0, 1]), torch.tensor([[0.0, 0.0], [50.0, 0.0]]),
        ...                  torch.tensor([0, 0]))
        >>> s.compute()   # log 2; e^-50; never seen
        tensor([6.9315e-01, 1.9287e-22,        nan])
    """

    name = "loss"
    _stat = "loss"


class Margin(_StatMean):
    """Mean probability margin ``p_y − max_{j≠y} p_j`` per example, in ``[−1, 1]``.

    Low (negative) = misclassified with confidence, near 0 = on the decision boundary, near 1 =
    easy. :class:`~sampleweights.AUM` is the same margin in logit space (unbounded).

    State: 12 bytes per example (16 with ``ema=``).

    Args:
        num_examples: ``len(dataset)``.
        ema: see :class:`Loss`.
        **kwargs: ``device``, ``nonfinite``, ``layout``, ``validate``, ``process_group``.

    Raises:
        ValueError: from ``update`` for logits of a single class (no other class to compare).

    Example:
        >>> import torch
        >>> s = Margin(2)
        >>> s.update_indexed(torch.tensor([0, 1]), torch.tensor([[0.0, 0.0], [2.0, 0.0]]),
        ...                  torch.tensor([0, 1]))
        >>> s.compute()   # a tie; p = (0.88, 0.12) with the target second
        tensor([ 0.0000, -0.7616])
    """

    name = "margin"
    _stat = "prob_margin"


class Entropy(_StatMean):
    """Mean entropy ``−Σ_j p_j log p_j`` of the predicted distribution per example (nats).

    The target is not used (a label-free uncertainty score); high = uncertain. Computed as
    ``log Σe − Σ e·t / Σe`` with ``t = x − max``, two non-negative terms.

    State: 12 bytes per example (16 with ``ema=``).

    Args:
        num_examples: ``len(dataset)``.
        ema: see :class:`Loss`.
        **kwargs: ``device``, ``nonfinite``, ``layout``, ``validate``, ``process_group``.

    Example:
        >>> import torch
        >>> s = Entropy(2)
        >>> s.update_indexed(torch.tensor([0, 1]), torch.zeros(2, 4), torch.tensor([0, 3]))
        >>> s.compute()   # uniform over 4 classes: log 4
        tensor([1.3863, 1.3863])
    """

    name = "entropy"
    _stat = "entropy"


class Confidence(_StatMean):
    """Mean probability of the labelled class ``softmax(logits)_y`` per example, in ``[0, 1]``.

    Data maps' *confidence* (Swayamdipta et al. 2020); :class:`~sampleweights.DataMaps` keeps
    it together with variability and correctness. Low = hard or mislabelled.

    State: 12 bytes per example (16 with ``ema=``).

    Args:
        num_examples: ``len(dataset)``.
        ema: see :class:`Loss`.
        **kwargs: ``device``, ``nonfinite``, ``layout``, ``validate``, ``process_group``.

    Example:
        >>> import torch
        >>> s = Confidence(1)
        >>> for logits in (torch.tensor([[0.0, 0.0]]), torch.tensor([[9.0, -9.0]])):
        ...     s.update_indexed(torch.tensor([0]), logits, torch.tensor([0]))
        >>> s.compute()   # mean of 0.5 and 1 − 1.5e-8
        tensor([0.7500])
    """

    name = "confidence"
    _stat = "p_target"
