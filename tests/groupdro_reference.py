"""A port of the online Group DRO loss of the authors' code, to test ``GroupDROLoss`` against.

Source: github.com/kohpangwei/group_DRO, ``loss.py``, class ``LossComputer`` (Sagawa et al.,
ICLR 2020): ``compute_group_avg`` and ``compute_robust_loss`` — the path ``loss()`` takes with
``is_robust=True, btl=False`` — line for line, on the CPU, in a chosen dtype (theirs is float32
on CUDA). Only ``normalize_loss`` (off by default, ``--use_normalized_loss``) and the running
statistics, which do not feed the loss, are left out. Kept as it is there, on purpose:

* ``adjusted_loss = group_loss`` then ``adjusted_loss += …`` is an in-place add on the *same*
  tensor, so the returned loss includes the adjustment too;
* the adjustment applies only when every entry of ``adj`` is > 0;
* the weights are updated by a product ``q · exp(η·ℓ)`` and normalised by their sum.
"""

from __future__ import annotations

import torch


class ReferenceLossComputer:
    """``LossComputer(criterion, is_robust=True, dataset, adj=adj, step_size=η, btl=False)``."""

    def __init__(
        self,
        n_groups: int,
        group_counts: torch.Tensor,
        adj: torch.Tensor | None = None,
        step_size: float = 0.01,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.n_groups = n_groups
        self.dtype = dtype
        self.step_size = step_size
        self.group_counts = group_counts.to(dtype)
        if adj is not None:
            self.adj = adj.to(dtype)
        else:
            self.adj = torch.zeros(self.n_groups, dtype=dtype)
        self.adv_probs = torch.ones(self.n_groups, dtype=dtype) / self.n_groups

    def loss(self, per_sample_losses: torch.Tensor, group_idx: torch.Tensor) -> torch.Tensor:
        """``LossComputer.loss`` for ``is_robust=True, btl=False``, from per-sample losses."""
        group_loss, group_count = self.compute_group_avg(per_sample_losses, group_idx)
        actual_loss, _ = self.compute_robust_loss(group_loss, group_count)
        return actual_loss

    def compute_robust_loss(self, group_loss, group_count):
        adjusted_loss = group_loss
        if torch.all(self.adj > 0):
            adjusted_loss += self.adj / torch.sqrt(self.group_counts)
        self.adv_probs = self.adv_probs * torch.exp(self.step_size * adjusted_loss.data)
        self.adv_probs = self.adv_probs / (self.adv_probs.sum())

        robust_loss = group_loss @ self.adv_probs
        return robust_loss, self.adv_probs

    def compute_group_avg(self, losses, group_idx):
        # compute observed counts and mean loss for each group
        group_map = (group_idx == torch.arange(self.n_groups).unsqueeze(1).long()).to(self.dtype)
        group_count = group_map.sum(1)
        group_denom = group_count + (group_count == 0).to(self.dtype)  # avoid nans
        group_loss = (group_map @ losses.view(-1).to(self.dtype)) / group_denom
        return group_loss, group_count
