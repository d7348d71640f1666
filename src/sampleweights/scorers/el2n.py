"""EL2N: the L2 norm of the error vector ``softmax(logits) − onehot(y)``.

Paul, Ganguli & Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in
Training", NeurIPS 2021. The score is averaged over every update it receives: several seeds (Data
Diet averages 10 runs) or several epochs accumulate into one running mean.

Precision: with ``p = softmax(logits)`` and ``q`` = p with the target entry zeroed,
``‖p − e_y‖² = Σq² + (Σq)²``: both terms are sums of non-negative numbers, so the result is exact
to fp32 rounding (~1e-7 relative) even for confident examples, where the tempting
``Σp² − 2p_y + 1`` cancels catastrophically (absolute error ~1e-4 on scores of ~1e-4: exactly the
easy end that pruning removes). ``√((Σq)² + Σq²) = Σq·√(1 + ‖q / Σq‖²)``, the norm taken after a
power-of-two scaling so tiny entries do not underflow when squared.

One implementation: :func:`el2n`, the :class:`EL2N` scorer and a
:class:`~sampleweights.ScorerCollection` all compute through
:class:`~sampleweights.scorers.rowstats.RowStats` (one ``(B, C)`` fp32 buffer: ``x − max``,
exponentiated in place, one sum, one norm), so the three agree bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sampleweights.scorers.base import RunningMeanScorer
from sampleweights.scorers.rowstats import RowStats

__all__ = ["EL2N", "el2n"]


def el2n(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example EL2N ``‖softmax(logits) − e_y‖₂``, float32, shape ``(B,)``.

    The same bits as the :class:`EL2N` scorer's per-example values (one implementation).
    Not differentiable: the logits are detached.

    Args:
        logits: ``(B, C)`` of any float dtype; the math runs in fp32.
        targets: ``(B,)`` integer class labels in ``[0, C)``.

    Example:
        >>> import torch
        >>> el2n(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))  # p = (.5, .5): √(.25 + .25)
        tensor([0.7071])
    """
    targets = targets.to(logits.device, torch.int64, non_blocking=True)
    return RowStats(logits.detach(), targets, margins=False).el2n


class EL2N(RunningMeanScorer):
    """EL2N scores (Data Diet): the running mean of ``‖softmax(logits) − e_y‖₂`` per example.

    Each update adds to a per-example fp64 sum and count, so ``compute()`` is the mean over every
    presentation the example received (several seeds or epochs are averaged, as in Data Diet).
    Data Diet scores an eval-mode checkpoint early in training (use :func:`score_dataset`); calling
    ``update`` in the training loop scores train-mode logits instead, which is legitimate but a
    different quantity (dropout, augmentation).

    State: 12 bytes per example (fp64 sum + int32 count).

    Args:
        num_examples: ``len(dataset)``.
        **kwargs: ``device``, ``nonfinite``, ``layout``; see :class:`Scorer`.

    Example:
        >>> import torch
        >>> s = EL2N(4)
        >>> s.update_indexed(torch.tensor([0, 2]), torch.tensor([[5.0, 0.0], [0.0, 5.0]]),
        ...                  torch.tensor([0, 0]))
        >>> s.compute()
        tensor([0.0095,    nan, 1.4047,    nan])
    """

    name = "el2n"

    def _values(self, logits: Tensor, targets: Tensor) -> Tensor:
        return el2n(logits, targets)

    def _values_from(self, stats: RowStats) -> Tensor:
        return stats.el2n  # el2n(logits, targets) bit for bit, shared in a collection
