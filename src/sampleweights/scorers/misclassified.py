"""The error set of Just Train Twice (Liu et al., "Just Train Twice: Improving Group Robustness
without Training Group Information", ICML 2021): the training examples the ERM model gets wrong.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from sampleweights.distributed import all_reduce_copy, world
from sampleweights.scorers.base import Scorer, distinct_on_cpu, last_occurrence, token_correct
from sampleweights.scorers.rowstats import RowStats

__all__ = ["Misclassified"]


class Misclassified(Scorer):
    """1.0 where the latest presentation of an example was misclassified, 0.0 where correct.

    JTT (Liu et al. 2021) trains ERM for T epochs, then upsamples the training examples that
    model gets wrong: ``(Misclassified(...).compute() == 1).nonzero()`` is that error set (or
    ``sw.select`` on the scores). In the authors' code the error set comes from the predictions
    recorded during the training pass of epoch T — train-mode predictions (dropout on,
    BatchNorm batch statistics, augmentation) made while the model was still being updated:
    that is what ``update(batch, logits)`` called in the loop gives (each example's latest
    training presentation). :func:`~sampleweights.score_dataset` on the ERM checkpoint gives
    instead the eval-mode predictions of that one fixed model — a cleaner error set, but not
    the one the paper used.

    ``compute()`` is float32 ``(num_examples,)``: 1.0 wrong, 0.0 right, NaN never seen. With
    duplicate indices in one update the last occurrence in the batch is the latest.

    **Runs.** An error set belongs to one model: after :meth:`new_run`, the first update of the
    new run forgets the previous run, so the scores are the latest run's latest presentations
    (NaN for examples that run has not presented yet; until its first update, the previous
    run's). Under ``torch.distributed`` the new run begins at the first update on any rank: a
    rank without an update since ``new_run()`` contributes nothing from the previous run.

    State: 5 bytes per example (bool wrong + int32 update number of the latest presentation).
    Under ``torch.distributed``, ``compute()`` merges the ranks by the latest (update number,
    rank): no communication during training. That order is exact when every rank calls
    ``update`` equally often. When the ranks' update counts differ by ``d`` (a rank skipped a
    step, uneven shards), an example presented on two ranks within ``d`` updates of each other
    cannot be ordered: ``compute()`` warns with the number of such examples (and only then —
    one presentation per example, as in a ``pad=False`` scoring pass, is always exact). A rank
    that skips a step mid-run and makes it up later is not detectable: keep the counts equal
    (an empty ``update_indexed`` on a rank without a batch).

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

    def _values_from(self, stats: RowStats) -> Tensor:
        return ~stats.correct  # the same argmax != targets, shared in a collection

    def _reduce_tokens(self, values: Tensor, valid: Tensor) -> Tensor:
        # sequences: wrong unless at least min_token_accuracy of the valid tokens are right
        return ~token_correct(~values, valid, self.min_token_accuracy)

    def _scatter(self, indices: Tensor, values: Tensor, step: int) -> None:
        sorted_idx, order, is_last = last_occurrence(indices)
        if distinct_on_cpu(is_last):
            self._scatter_distinct(self._state, indices, values, step)
            return
        last_slot = torch.where(is_last, sorted_idx, self.num_examples)
        self._state["wrong"].index_copy_(0, last_slot, values.index_select(0, order))
        self._state["step"].index_fill_(0, last_slot, step)

    @staticmethod
    def _scatter_distinct(
        state: dict[str, Tensor], indices: Tensor, values: Tensor, step: int | Tensor
    ) -> None:
        """Every index once: every row is its index's latest presentation."""
        state["wrong"].index_copy_(0, indices, values)
        state["step"].index_fill_(0, indices, step)

    def _begin_run(self) -> None:
        self._state["wrong"].fill_(False)
        self._state["step"].fill_(0)

    def _merge(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The latest presentation over all ranks, ordered by (step, rank)."""
        size, rank = world(self.process_group)
        group = self.process_group
        step = state["step"].to(torch.int64)
        if self._run_updates == 0 and any(self._rank_run_updates):
            # this rank has had no update since new_run() while another rank has: its state is
            # the previous run's, which the current run forgets
            step = torch.zeros_like(step)
        seen = step > 0
        key = torch.where(seen, step * size + rank, -1)
        latest = all_reduce_copy(key, "max", group)
        mine = (key == latest) & seen
        wrong = all_reduce_copy(torch.where(mine, state["wrong"], False), "sum", group)
        latest_step = torch.where(latest >= 0, latest // size, 0)
        counts = self._rank_updates  # every rank's num_updates, from compute()'s header
        slack = max(counts) - min(counts)
        if slack:
            # only examples whose presentations on two ranks are within `slack` updates of each
            # other can be misordered by a rank's missing updates
            far = torch.iinfo(torch.int64).max
            gap = torch.where(seen & ~mine, latest_step - step, far)
            closest = all_reduce_copy(gap, "min", group)
            ambiguous = int((closest <= slack).sum())
            if ambiguous:
                per_rank = ", ".join(f"rank {r}: {n}" for r, n in enumerate(counts))
                warnings.warn(
                    f"Misclassified: the ranks made different numbers of updates ({per_rank}); "
                    f"'latest' is ordered by update number, so for {ambiguous} example(s) "
                    f"presented on two ranks within {slack} update(s) of each other the latest "
                    "presentation is ambiguous (the other scores are exact). Make every rank "
                    "call update() equally often (update_indexed with an empty batch on a rank "
                    "that has none), or present each example once (a pad=False scoring pass).",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return {"wrong": wrong > 0, "step": latest_step}

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        wrong = state["wrong"].to(torch.float32)
        return torch.where(state["step"] > 0, wrong, torch.nan)

    def _check_loaded(
        self, state: dict[str, Tensor], *, num_updates: int, num_runs: int, run_updates: int
    ) -> str | None:
        step = state["step"]
        if step.numel() and int(step.max()) > num_updates:
            return (
                f"State 'step' holds update number {int(step.max())}, beyond "
                f"num_updates={num_updates}: the state is corrupt."
            )
        first = num_updates - run_updates  # updates before the current run
        if run_updates and num_runs > 1 and bool(((step > 0) & (step <= first)).any()):
            return (
                f"State 'step' holds update numbers <= {first}, from a run before the current "
                f"one (which began at update {first + 1} and forgets earlier runs): the state "
                "is corrupt."
            )
        return None
