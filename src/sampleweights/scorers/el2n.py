"""EL2N: the L2 norm of the error vector ``softmax(logits) − onehot(y)``.

Paul, Ganguli & Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in
Training", NeurIPS 2021. The score is averaged over every update it receives: several seeds (Data
Diet averages 10 runs) or several epochs accumulate into one running mean.

Precision: with ``p = softmax(logits)`` and ``q`` = p with the target entry zeroed,
``‖p − e_y‖² = Σ_{j≠y} p_j² + (1 − p_y)² = Σq² + (Σq)²``. Both terms are sums of non-negative
numbers, so the result is exact to fp32 rounding (~1e-7 relative) even for confident examples,
where the tempting ``Σp² − 2p_y + 1`` cancels catastrophically (absolute error ~1e-4 on scores of
~1e-4: exactly the easy end that pruning removes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sampleweights.scorers.base import RunningMeanScorer

if TYPE_CHECKING:
    from sampleweights.scorers.rowstats import RowStats

__all__ = ["EL2N", "el2n"]

_TINY = torch.finfo(torch.float32).tiny  # smallest normal fp32
_SMALL_C = 32  # up to this many classes the softmax is computed by hand (see el2n)


def el2n(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example EL2N ``‖softmax(logits) − e_y‖₂``, float32, shape ``(B,)``.

    Args:
        logits: ``(B, C)`` of any float dtype; the math runs in fp32.
        targets: ``(B,)`` integer class labels in ``[0, C)``.

    Example:
        >>> import torch
        >>> el2n(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))  # p = (.5, .5): √(.25 + .25)
        tensor([0.7071])
    """
    if logits.shape[1] <= _SMALL_C:
        # torch.softmax pays a large per-row overhead on CPU for short rows (~99 µs for 512 × 10
        # on one thread, against ~25 µs by hand): exponentiate by hand and normalise the sums
        q = torch.exp(logits.float() - logits.amax(dim=1, keepdim=True).float())  # (B, C)
        total = q.sum(dim=1, keepdim=True)  # (B, 1)
    else:
        q = torch.softmax(logits, dim=1, dtype=torch.float32)  # (B, C), a fresh buffer
        total = None
    q.scatter_(1, targets.view(-1, 1), 0.0)  # p (up to scale) with the target entry zeroed
    mass = q.sum(dim=1, keepdim=True)  # Σq = 1 − p_y, without cancellation (up to scale)
    # √Σq² underflows in fp32 for confident examples (q ~ 1e-23 → q² < 1e-45), so take the norm
    # of q / Σq, whose entries lie in [0, 1], and scale back:
    # √((Σq)² + Σq²) = Σq · √(1 + ‖q / Σq‖²), with ‖q / Σq‖ ≤ 1.
    spread = torch.linalg.vector_norm(q.div_(mass.clamp_min(_TINY)), dim=1)
    wrong_mass = (mass if total is None else mass.div_(total)).squeeze(1)
    scores: Tensor = wrong_mass.mul_(spread.square_().add_(1.0).sqrt_())
    return scores


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
        return stats.el2n  # el2n(logits, targets), computed once per batch in a collection
