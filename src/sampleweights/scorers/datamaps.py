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

from sampleweights.scorers.base import Scorer
from sampleweights.scorers.rowstats import RowStats

__all__ = ["DataMaps"]


class DataMaps(Scorer):
    """Data-map statistics per example: confidence, variability and correctness.

    ``compute()`` returns the primary score, **confidence** (mean ``p_y``), float32
    ``(num_examples,)``, NaN if never seen, so the scorer fits everywhere a scorer does
    (:func:`~sampleweights.select`, :class:`~sampleweights.ScorerCollection`). :meth:`compute_all`
    returns the three statistics from one merge of the state.

    Variance from sums: the state keeps ``Σ p_y`` and ``Σ p_y²`` in fp64 and the variability is
    ``√max(0, Σp²/n − (Σp/n)²)``. The subtraction cancels, but for values in ``[0, 1]`` its
    absolute error is a few fp64 ulps of 1 (~1e-15 for any realistic ``n``), so the standard
    deviation is off by at most ~3e-8 absolutely — below the fp32 resolution of the result near
    1, and a running (Welford) update would need a per-example sequential pass that a vectorised
    scatter with duplicate indices cannot do. Sums also merge across ranks by a plain reduction.

    State: 24 bytes per example (fp64 sum and sum of squares of ``p_y``, int32 counts of
    presentations and of correct ones). Under ``torch.distributed`` the sums are reduced at
    ``compute()``.

    Args:
        num_examples: ``len(dataset)``.
        **kwargs: ``device``, ``nonfinite``, ``layout``, ``validate``, ``process_group``.

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
        self.add_state("sum", torch.float64, 0.0)
        self.add_state("sum_sq", torch.float64, 0.0)
        self.add_state("count", torch.int32, 0)
        self.add_state("correct", torch.int32, 0)
        self._all: dict[str, Tensor] = {}

    def _values(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self._values_from(RowStats(logits, targets))

    def _values_from(self, stats: RowStats) -> Tensor:
        # (B, 2): p_y and correctness (0/1), one row per example
        return torch.stack([stats.p_target, stats.correct.to(torch.float32)], dim=1)

    def _scatter(self, indices: Tensor, values: Tensor, step: int) -> None:
        p = values[:, 0].to(torch.float64)
        self._state["sum"].index_add_(0, indices, p)
        self._state["sum_sq"].index_add_(0, indices, p * p)
        self._state["count"].index_add_(0, indices, torch.ones_like(indices, dtype=torch.int32))
        self._state["correct"].index_add_(0, indices, values[:, 1].to(torch.int32))

    @staticmethod
    def _statistics(state: dict[str, Tensor]) -> dict[str, Tensor]:
        count = state["count"]
        seen = count > 0
        n = count.clamp_min(1).to(torch.float64)
        mean = state["sum"] / n
        variance = (state["sum_sq"] / n - mean * mean).clamp_min(0.0)
        out = {
            "confidence": mean,
            "variability": variance.sqrt(),
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
