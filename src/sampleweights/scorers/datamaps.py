"""Data maps (Swayamdipta, Schwartz, Lourie, Wang, Hajishirzi, Smith & Choi, "Dataset
Cartography: Mapping and Diagnosing Datasets with Training Dynamics", EMNLP 2020).

Over the presentations of an example during training (the paper: once per epoch, from the
training loop), with ``p_y`` the probability of its label:

* **confidence** — the mean of ``p_y``;
* **variability** — the population standard deviation of ``p_y`` (``np.std``, ``ddof=0``, as the
  paper's code);
* **correctness** — the fraction of presentations classified correctly (``argmax == y``).

High confidence: easy to learn; low confidence and low variability: hard (often mislabelled);
high variability: ambiguous — the region the paper finds most useful to train on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sampleweights.distributed import all_reduce_copy
from sampleweights.scorers.base import (
    Scorer,
    distinct_on_cpu,
    last_occurrence,
    reduce_tokens,
    token_correct,
)
from sampleweights.scorers.rowstats import RowStats

__all__ = ["DataMaps"]


class DataMaps(Scorer):
    """Data-map statistics per example: confidence, variability and correctness.

    ``compute()`` returns the primary score, **confidence** (mean ``p_y``), float32
    ``(num_examples,)``, NaN if never seen, so the scorer fits everywhere a scorer does
    (:func:`~sampleweights.select`, :class:`~sampleweights.ScorerCollection`). :meth:`compute_all`
    returns the three statistics from one merge of the state.

    Variance without cancellation: the state keeps, per example, the fp64 mean of ``p_y`` and
    ``M₂ = Σ (p_y − mean)²`` (Welford), and each update merges the batch's own mean and ``M₂``
    per example (Chan et al.'s pairwise formula, so in-batch duplicates need no sequential
    pass). ``M₂`` is a sum of non-negative terms, so the variability keeps its relative precision
    however small it is next to the mean (confident examples: ``p_y ≈ 1`` varying by 1e-8), and
    a constant ``p_y`` gives exactly 0, where ``Σp²/n − (Σp/n)²`` cancels to noise of ~1e-7.
    Under ``torch.distributed`` the ranks merge the same way at ``compute()`` (two all-reduces).

    State: 24 bytes per example (fp64 mean and ``M₂`` of ``p_y``, int32 counts of presentations
    and of correct ones). Under ``torch.distributed`` the sums are reduced at
    ``compute()``.

    Args:
        num_examples: ``len(dataset)``.
        **kwargs: ``device``, ``nonfinite``, ``layout``, ``validate``, ``process_group``, and
            for sequences ``ignore_index``, ``token_reduce`` (confidence: the mean ``p_y`` over
            valid tokens by default) and ``min_token_accuracy`` (correctness: a sequence is
            correct when at least this fraction of its tokens is).

    Example:
        >>> import torch
        >>> s = DataMaps(2)
        >>> y = torch.tensor([0])
        >>> for logits in ([[0.0, 0.0]], [[-9.0, 9.0]]):   # p_y = 0.5 (argmax 0), then ≈ 0
        ...     s.update_indexed(torch.tensor([0]), torch.tensor(logits), y)
        >>> maps = s.compute_all()
        >>> maps["confidence"], maps["variability"], maps["correctness"]
        (tensor([0.2500,    nan]), tensor([0.2500,    nan]), tensor([0.5000,    nan]))
    """

    name = "datamaps"

    def __init__(self, num_examples: int, **kwargs: Any) -> None:
        super().__init__(num_examples, **kwargs)
        # merged by _merge (Chan et al.), not by a plain reduction
        self.add_state("mean", torch.float64, 0.0, reduce=None)
        self.add_state("m2", torch.float64, 0.0, reduce=None, nonnegative=True)
        self.add_state("count", torch.int32, 0)
        self.add_state("correct", torch.int32, 0)
        self._all: dict[str, Tensor] = {}

    def _values(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self._values_from(RowStats(logits, targets))

    def _values_from(self, stats: RowStats) -> Tensor:
        # (B, 2): p_y and correctness (0/1), one row per example
        return torch.stack([stats.p_target, stats.correct.to(torch.float32)], dim=1)

    def _reduce_tokens(self, values: Tensor, valid: Tensor) -> Tensor:
        # sequences: confidence by token_reduce, correctness 0/1 by min_token_accuracy
        correct = token_correct(values[..., 1] > 0.5, valid, self.min_token_accuracy)
        confidence = reduce_tokens(values[..., 0], valid, self.token_reduce)
        return torch.stack([confidence, correct.to(torch.float32)], dim=1)

    def _scatter(self, indices: Tensor, values: Tensor, step: int) -> None:
        # group the batch by example (batch order kept), then per group its count, mean and M₂
        sorted_idx, order, is_last = last_occurrence(indices)
        if distinct_on_cpu(is_last):
            self._scatter_distinct(self._state, indices, values, step)
            return
        self._scatter_groups(sorted_idx, order, is_last, values)
        _add_counts(self._state, indices, values)

    @staticmethod
    def _scatter_distinct(
        state: dict[str, Tensor], indices: Tensor, values: Tensor, step: int | Tensor
    ) -> None:
        """Every index once: each group is one row, ``n_b = 1``, ``mean_b = p``, ``M₂_b = 0``,
        so the grouped merge reduces to these same operations, bit for bit (``m2_a + 0 =
        m2_a``, ``n_a·1 = n_a``), in batch order, with half the ops."""
        mean, m2 = state["mean"], state["m2"]
        p = values[:, 0].to(torch.float64)
        n_a = state["count"].index_select(0, indices).to(torch.float64)
        mean_a = mean.index_select(0, indices)
        n = n_a + 1.0
        delta = p - mean_a
        mean.index_copy_(0, indices, mean_a + delta * (1.0 / n))
        m2.index_copy_(0, indices, m2.index_select(0, indices) + delta.square() * (n_a / n))
        _add_counts(state, indices, values)

    def _scatter_groups(
        self, sorted_idx: Tensor, order: Tensor, is_last: Tensor, values: Tensor
    ) -> None:
        """The mean and ``M₂`` of a batch whose indices may repeat (see ``_scatter``)."""
        size = len(sorted_idx)
        first = is_last.roll(1)  # a group starts after the previous one's last row (row 0 too)
        group = first.cumsum(0) - 1  # (B,) the group of each sorted row
        # index_select rather than [] indexing: the same gather, half the dispatch cost
        p = values[:, 0].index_select(0, order).to(torch.float64)
        n_b = torch.zeros(size, dtype=torch.float64, device=p.device)
        n_b.index_add_(0, group, torch.ones_like(p))
        mean_b = torch.zeros_like(n_b).index_add_(0, group, p).div_(n_b.clamp_min(1.0))
        nb, mb = n_b.index_select(0, group), mean_b.index_select(0, group)
        m2_b = torch.zeros_like(n_b).index_add_(0, group, (p - mb).square_())
        # Chan et al.: merge (n_a, mean_a, M₂_a) with the group's (n_b, mean_b, M₂_b), written
        # once per example at its last row (the other rows write the spare slot)
        slot = torch.where(is_last, sorted_idx, self.num_examples)
        mean, m2 = self._state["mean"], self._state["m2"]
        n_a = self._state["count"].index_select(0, slot).to(torch.float64)
        mean_a = mean.index_select(0, slot)
        n = n_a + nb
        delta = mb - mean_a
        mean.index_copy_(0, slot, mean_a + delta * (nb / n))
        m2_a = m2.index_select(0, slot)
        m2.index_copy_(
            0, slot, m2_a + m2_b.index_select(0, group) + delta.square() * (n_a * nb / n)
        )

    def _merge(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The ranks' counts summed; means and ``M₂`` merged by Chan et al.'s formula."""
        merged = super()._merge(state)  # count and correct
        n_local = state["count"].to(torch.float64)
        n = merged["count"].to(torch.float64).clamp_min(1.0)
        mean = all_reduce_copy(state["mean"] * n_local, "sum", self.process_group).div_(n)
        spread = state["m2"] + n_local * (state["mean"] - mean).square()
        merged["mean"] = mean
        merged["m2"] = all_reduce_copy(spread, "sum", self.process_group)
        return merged

    @staticmethod
    def _statistics(state: dict[str, Tensor]) -> dict[str, Tensor]:
        count = state["count"]
        seen = count > 0
        n = count.clamp_min(1).to(torch.float64)
        out = {
            "confidence": state["mean"],
            "variability": (state["m2"] / n).clamp_min(0.0).sqrt(),
            "correctness": state["correct"].to(torch.float64) / n,
        }
        return {k: torch.where(seen, v, torch.nan).to(torch.float32) for k, v in out.items()}

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        # keep all three: compute_all() reads them after compute() merged the ranks once
        self._all = self._statistics(state)
        return self._all["confidence"]

    def compute_all(self) -> dict[str, Tensor]:
        """``{"confidence", "variability", "correctness"}``, each float32 ``(num_examples,)``.

        Under ``torch.distributed`` this is a collective (one merge, as ``compute()``).
        """
        self.compute()
        out, self._all = self._all, {}
        return out


def _add_counts(state: dict[str, Tensor], indices: Tensor, values: Tensor) -> None:
    """One more presentation per row, and one more correct one where ``values[:, 1]`` is 1."""
    state["count"].index_add_(0, indices, torch.ones_like(indices, dtype=torch.int32))
    state["correct"].index_add_(0, indices, values[:, 1].to(torch.int32))
