"""Group accuracies for robustness evaluation (JTT reports worst-group accuracy)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sampleweights.validation import as_index_tensor

__all__ = ["group_accuracy", "group_weighted_accuracy", "worst_group_accuracy"]


def _correct_and_groups(preds: Any, targets: Any, groups: Any) -> tuple[Tensor, Tensor]:
    if isinstance(preds, Tensor) and preds.is_floating_point():
        if preds.dim() != 2:
            raise ValueError(
                f"Expected `preds` as (B,) labels or (B, C) logits, but got {tuple(preds.shape)}."
            )
        preds = preds.argmax(dim=1)
    p = as_index_tensor(preds, "preds").cpu()
    t = as_index_tensor(targets, "targets").cpu()
    g = as_index_tensor(groups, "groups").cpu()
    if not p.numel() == t.numel() == g.numel():
        raise ValueError(
            f"Expected equal lengths, but got {p.numel()} preds, {t.numel()} targets and "
            f"{g.numel()} groups."
        )
    if p.numel() == 0:
        raise ValueError("Cannot compute accuracy of zero examples.")
    if int(g.min()) < 0:
        raise ValueError(f"Expected group ids ≥ 0, but got {int(g.min())}.")
    return (p == t), g


def group_accuracy(preds: Any, targets: Any, groups: Any) -> Tensor:
    """Accuracy within each group id: float32 ``(max(groups) + 1,)``, NaN for an empty group.

    ``preds`` are predicted labels ``(B,)`` or logits ``(B, C)``.

    Example:
        >>> import torch
        >>> group_accuracy(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 1, 0]),
        ...                torch.tensor([0, 0, 2, 2]))
        tensor([0.5000,    nan, 0.5000])
    """
    correct, g = _correct_and_groups(preds, targets, groups)
    size = int(g.max()) + 1
    hits = torch.zeros(size, dtype=torch.float64).index_add_(0, g, correct.double())
    count = torch.bincount(g, minlength=size).double()
    return torch.where(count > 0, hits / count.clamp_min(1), torch.nan).float()


def worst_group_accuracy(preds: Any, targets: Any, groups: Any) -> float:
    """The lowest accuracy over the groups present.

    Example:
        >>> import torch
        >>> worst_group_accuracy(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1]),
        ...                      torch.tensor([0, 1, 1]))
        0.5
    """
    acc = group_accuracy(preds, targets, groups)
    return float(acc[~acc.isnan()].min())


def group_weighted_accuracy(preds: Any, targets: Any, groups: Any, group_weights: Any) -> float:
    """``Σ_g w_g · acc_g / Σ_g w_g``: the average accuracy with groups weighted by ``w``.

    JTT reports Waterbirds' average accuracy this way, with ``w`` the groups' proportions in the
    training set (``torch.bincount(train_groups)``), because its test set is group-balanced.

    Example:
        >>> import torch
        >>> preds, targets = torch.tensor([1, 0]), torch.tensor([1, 1])
        >>> groups = torch.tensor([0, 1])
        >>> group_weighted_accuracy(preds, targets, groups, torch.tensor([3.0, 1.0]))
        0.75
    """
    acc = group_accuracy(preds, targets, groups)
    w = torch.as_tensor(group_weights, dtype=torch.float64).cpu()
    if w.dim() != 1 or w.numel() < acc.numel():
        raise ValueError(
            f"Expected `group_weights` of shape (≥ {acc.numel()},), one per group id, but got "
            f"{tuple(w.shape)}."
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("Expected `group_weights` to be finite and ≥ 0.")
    w = w[: acc.numel()]
    present = ~acc.isnan() & (w > 0)
    if not bool(present.any()):
        raise ValueError("No group with a positive weight has examples.")
    return float((acc.double()[present] * w[present]).sum() / w[present].sum())
