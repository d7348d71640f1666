"""Forgetting events (Toneva et al., "An Empirical Study of Example Forgetting during Deep
Neural Network Learning", ICLR 2019).

An example is *forgotten* once each time it is classified correctly at one presentation and
incorrectly at the next presentation of the same example. Examples never classified correctly
rank as the most forgettable (the paper counts them as having infinitely many events): their
score is ``+inf``. Unseen examples are NaN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sampleweights.scorers.base import Scorer, last_occurrence

__all__ = ["ForgettingTracker"]


class ForgettingTracker(Scorer):
    """Count forgetting events per example: correct→incorrect between consecutive presentations.

    Call ``update(batch, logits)`` with the training loop's own logits (Toneva et al. track the
    predictions made on each mini-batch during training). A presentation is correct when
    ``argmax(logits) == target``.

    ``compute()`` returns float32 ``(num_examples,)``: the number of events; ``+inf`` for an
    example seen but never classified correctly; NaN for one never seen.

    Two occurrences of one index in a single update (upsampling samplers do this) are two
    consecutive presentations in batch order: the later one is compared with the earlier one,
    and the last one is what the next update is compared with.

    State: 13 bytes per example (last correctness as bool, int32 counts of presentations,
    correct presentations and events).

    Under ``torch.distributed`` each ``update`` exchanges the batch's ``(index, correct)`` pairs
    (≈9 bytes per example, two small all-gathers and one host sync), so every rank must call
    ``update`` equally often — true with sampleweights' samplers; a rank that stops early makes
    the others wait. The state is then the same on every rank.

    Example:
        >>> import torch
        >>> s = ForgettingTracker(3)
        >>> right, wrong = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> y, i0, i1 = torch.tensor([0]), torch.tensor([0]), torch.tensor([1])
        >>> for logits in (right, wrong, right, wrong):   # example 0: learned, forgotten twice
        ...     s.update_indexed(i0, logits, y)
        >>> s.update_indexed(i1, wrong, y)                 # example 1: never learned
        >>> s.compute()
        tensor([2., inf, nan])
    """

    name = "forgetting"
    exchanges_updates = True

    def __init__(self, num_examples: int, **kwargs: Any) -> None:
        super().__init__(num_examples, **kwargs)
        # replicated on every rank (each update applies the global batch): no reduction
        self.add_state("last_correct", torch.bool, False, reduce=None)
        self.add_state("presentations", torch.int32, 0, reduce=None)
        self.add_state("correct", torch.int32, 0, reduce=None)
        self.add_state("events", torch.int32, 0, reduce=None)

    def _values(self, logits: Tensor, targets: Tensor) -> Tensor:
        return logits.argmax(dim=1) == targets  # (B,) correct

    def _scatter(self, indices: Tensor, values: Tensor, step: int) -> None:
        sorted_idx, order, is_last = last_occurrence(indices)
        now = values[order]  # correctness in (index, batch position) order
        # The previous presentation: the row before in the same group, else the stored state.
        same_as_prev = torch.zeros_like(is_last)
        same_as_prev[1:] = ~is_last[:-1]
        prev_in_batch = torch.zeros_like(now)
        prev_in_batch[1:] = now[:-1]
        prev = torch.where(same_as_prev, prev_in_batch, self._state["last_correct"][sorted_idx])
        # A stored last_correct is False until the first presentation, so no event is counted
        # for a first presentation.
        forgotten = prev & ~now
        ones = torch.ones_like(sorted_idx, dtype=torch.int32)
        self._state["events"].index_add_(0, sorted_idx, forgotten.to(torch.int32))
        self._state["correct"].index_add_(0, sorted_idx, now.to(torch.int32))
        self._state["presentations"].index_add_(0, sorted_idx, ones)
        # only each index's last presentation is remembered; the others go to the trash slot
        last_slot = torch.where(is_last, sorted_idx, self.num_examples)
        self._state["last_correct"].index_copy_(0, last_slot, now)

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        events = state["events"].to(torch.float32)
        never_learned = (state["correct"] == 0) & (state["presentations"] > 0)
        events = torch.where(never_learned, torch.inf, events)
        return torch.where(state["presentations"] > 0, events, torch.nan)
