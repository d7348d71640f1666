"""The error set of Just Train Twice (Liu et al., "Just Train Twice: Improving Group Robustness
without Training Group Information", ICML 2021): the training examples the ERM model gets wrong.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from sampleweights.distributed import all_reduce_copy, world
from sampleweights.scorers.base import Scorer, last_occurrence

__all__ = ["Misclassified"]


class Misclassified(Scorer):
    """1.0 where the latest presentation of an example was misclassified, 0.0 where correct.

    JTT trains ERM for T epochs, then upsamples the training examples the model gets wrong:
    ``(Misclassified(...).compute() == 1).nonzero()`` is that error set (or
    ``sw.select`` on the scores). Score a finished model with :func:`score_dataset` (eval mode,
    as in JTT) or call ``update`` in the loop (each example's latest training presentation).

    ``compute()`` is float32 ``(num_examples,)``: 1.0 wrong, 0.0 right, NaN never seen. With
    duplicate indices in one update the last occurrence in the batch is the latest.

    State: 5 bytes per example (bool wrong + int32 step of the latest presentation). Under
    ``torch.distributed``, ``compute()`` merges the ranks by the latest (update number, rank):
    no communication during training; every rank should call ``update`` equally often.

    Example:
        >>> import torch
        >>> s = Misclassified(3)
        >>> s.update_indexed(torch.tensor([0, 1]), torch.tensor([[2.0, 0.0], [2.0, 0.0]]),
        ...                  torch.tensor([0, 1]))
        >>> s.compute()
        tensor([0., 1., nan])
    """

    name = "misclassified"

    def __init__(self, num_examples: int, **kwargs: Any) -> None:
        super().__init__(num_examples, **kwargs)
        # update number (1-based) of the latest presentation, 0 = never; orders "latest"
        # across processes under torch.distributed (see _merge)
        self.add_state("wrong", torch.bool, False, reduce=None)
        self.add_state("step", torch.int32, 0, reduce=None)

    def _values(self, logits: Tensor, targets: Tensor) -> Tensor:
        return logits.argmax(dim=1) != targets  # (B,) wrong

    def _scatter(self, indices: Tensor, values: Tensor, step: int) -> None:
        sorted_idx, order, is_last = last_occurrence(indices)
        last_slot = torch.where(is_last, sorted_idx, self.num_examples)
        self._state["wrong"].index_copy_(0, last_slot, values[order])
        self._state["step"].index_fill_(0, last_slot, step)

    def _merge(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The latest presentation over all ranks, ordered by (step, rank)."""
        size, rank = world(self.process_group)
        group = self.process_group
        counts = all_reduce_copy(torch.tensor([self.num_updates, -self.num_updates]), "max", group)
        if int(counts[0]) != -int(counts[1]):
            warnings.warn(
                f"Misclassified: ranks made between {-int(counts[1])} and {int(counts[0])} "
                "updates; 'latest' is ordered by update number, which is only meaningful when "
                "every rank calls update equally often.",
                RuntimeWarning,
                stacklevel=3,
            )
        step = state["step"].to(torch.int64)
        key = torch.where(step > 0, step * size + rank, -1)
        latest = all_reduce_copy(key, "max", group)
        mine = (key == latest) & (step > 0)
        wrong = all_reduce_copy(torch.where(mine, state["wrong"], False), "sum", group)
        return {"wrong": wrong > 0, "step": torch.where(latest >= 0, latest // size, 0)}

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        wrong = state["wrong"].to(torch.float32)
        return torch.where(state["step"] > 0, wrong, torch.nan)
