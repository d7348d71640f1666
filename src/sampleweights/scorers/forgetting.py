"""Forgetting events (Toneva et al., "An Empirical Study of Example Forgetting during Deep
Neural Network Learning", ICLR 2019), within one training run and aggregated over several.

An example is *forgotten* once each time it is classified correctly at one presentation and
incorrectly at the next presentation of the same example in the same run. Examples never
classified correctly rank as the most forgettable: their score is ``+inf``. Unseen examples are
NaN.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from sampleweights.scorers.base import Scorer, distinct_on_cpu, last_occurrence
from sampleweights.scorers.rowstats import RowStats

__all__ = ["AcrossRuns", "ForgettingTracker"]

AcrossRuns = Literal["mean", "sum"]
_ACROSS_RUNS: tuple[str, ...] = ("mean", "sum")
_MAX_RUNS = torch.iinfo(torch.int16).max  # per-example run counters are int16


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

    **Several runs.** Call :meth:`new_run` before each training run: the first presentation of
    a run is never compared with the end of the previous run (a freshly initialised model). The
    per-run scores combine by ``across_runs``:

    * ``"mean"`` (default) — Data Diet (Paul et al. 2021, ``scripts/get_mean_score.py``): each
      run's score saved with ``never_correct`` examples set to ``inf``, then ``np.mean`` over the
      runs. So an example never learned in *any* run that presented it scores ``+inf``; the
      others score their mean number of events over the runs that presented them (Data Diet
      presents every example in every run: the same divisor).
    * ``"sum"`` — Toneva et al. (``order_examples_by_forgetting.py``,
      ``sort_examples_by_forgetting``): the sum of the runs' counts, where a run that never
      learned the example adds its number of presentations in that run (their code adds
      ``npresentations``, the number of epochs: one presentation per epoch). An example never
      learned in any run scores ``+inf`` (as with one run), which ranks it first just as
      Toneva's maximal count does.

    With one run both equal the single-run counts.

    State: 18 bytes per example — this run's last correctness and "learned" (2 bools),
    presentations and events (2 × int32); over the finished runs a total (int32) and the numbers
    of runs that presented and that never learned the example (2 × int16, so at most 32767
    runs).

    Under ``torch.distributed`` each ``update`` exchanges the batch's ``(index, correct)`` pairs
    packed into one int32 per example (4 bytes per example while ``num_examples < 2**30``, else
    8; one small header all-gather that carries the batch lengths, one data all-gather, one host
    sync), so the state is the same on every rank — and ``compute()`` works even after
    ``destroy_process_group``. Every rank must call ``update`` (and :meth:`new_run`) equally
    often — true with sampleweights' samplers (``pad=True``); a rank with no batch for a step
    calls ``update_indexed`` with an empty batch. Otherwise every rank raises
    :class:`~sampleweights.DistributedMismatchError` at the first collective where the ranks
    disagree, naming each rank's update count, instead of hanging.

    Args:
        num_examples: ``len(dataset)``.
        across_runs: ``"mean"`` or ``"sum"``, see above.
        **kwargs: as :class:`~sampleweights.Scorer` (``device``, ``nonfinite``, ...).

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

    def __init__(self, num_examples: int, *, across_runs: AcrossRuns = "mean", **kwargs: Any):
        if across_runs not in _ACROSS_RUNS:
            raise ValueError(
                f"Expected `across_runs` in {list(_ACROSS_RUNS)} (Data Diet's mean over runs or "
                f"Toneva et al.'s sum), but got {across_runs!r}."
            )
        super().__init__(num_examples, **kwargs)
        self.across_runs: AcrossRuns = across_runs
        # replicated on every rank (each update applies the global batch): no reduction
        # -- the current run
        self.add_state("last_correct", torch.bool, False, reduce=None)
        self.add_state("learned", torch.bool, False, reduce=None)
        self.add_state("presentations", torch.int32, 0, reduce=None)
        self.add_state("events", torch.int32, 0, reduce=None)
        # -- finished runs: Σ (events, or presentations if never learned); runs seen / unlearned
        self.add_state("runs_total", torch.int32, 0, reduce=None)
        self.add_state("runs_seen", torch.int16, 0, reduce=None)
        self.add_state("runs_unlearned", torch.int16, 0, reduce=None)

    def _values(self, logits: Tensor, targets: Tensor) -> Tensor:
        return logits.argmax(dim=1) == targets  # (B,) correct

    def _values_from(self, stats: RowStats) -> Tensor:
        return stats.correct  # the same argmax == targets, shared in a collection

    def _scatter(self, indices: Tensor, values: Tensor, step: int) -> None:
        sorted_idx, order, is_last = last_occurrence(indices)
        if distinct_on_cpu(is_last):
            self._scatter_distinct(self._state, indices, values, step)
            return
        now = values.index_select(0, order)  # correctness in (index, batch position) order
        # The previous presentation: the stored state at a group's first row, else the row
        # before. The last row ends a group (is_last[-1] is True), so rolling is_last by one
        # marks every group's first row, row 0 included; row 0 never reads now's wrap-around.
        first = is_last.roll(1)
        prev = torch.where(
            first, self._state["last_correct"].index_select(0, sorted_idx), now.roll(1)
        )
        # A stored last_correct is False until the first presentation of the run, so no event is
        # counted for a first presentation (nor against the previous run).
        forgotten = prev > now  # prev & ~now, one op on bools
        _add_presentations(self._state, sorted_idx, now, forgotten)
        # only each index's last presentation is remembered; the others go to the trash slot
        last_slot = torch.where(is_last, sorted_idx, self.num_examples)
        self._state["last_correct"].index_copy_(0, last_slot, now)

    @staticmethod
    def _scatter_distinct(
        state: dict[str, Tensor], indices: Tensor, values: Tensor, step: int | Tensor
    ) -> None:
        """Every index once: each row's previous presentation is the stored one and each row is
        its index's last, so no sorted order is needed (the same integer and boolean results
        as the grouped path, with a third fewer ops)."""
        forgotten = state["last_correct"].index_select(0, indices) > values
        _add_presentations(state, indices, values, forgotten)
        state["last_correct"].index_copy_(0, indices, values)

    @staticmethod
    def _with_current_run(state: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(total, runs seen, runs never learned), the current run folded in (int64)."""
        seen_now = state["presentations"] > 0
        unlearned_now = seen_now & ~state["learned"]
        this_run = torch.where(unlearned_now, state["presentations"], state["events"])
        total = state["runs_total"].to(torch.int64) + this_run
        seen = state["runs_seen"].to(torch.int64) + seen_now
        unlearned = state["runs_unlearned"].to(torch.int64) + unlearned_now
        return total, seen, unlearned

    def _end_run(self) -> None:
        if self.num_runs >= _MAX_RUNS:
            raise RuntimeError(
                f"ForgettingTracker counts runs per example in int16: at most {_MAX_RUNS} runs, "
                f"and {self.num_runs} have been tracked. Save the scores and start a new tracker."
            )
        total, seen, unlearned = self._with_current_run(self._state)
        self._state["runs_total"].copy_(total)
        self._state["runs_seen"].copy_(seen)
        self._state["runs_unlearned"].copy_(unlearned)
        for name in ("last_correct", "learned", "presentations", "events"):
            self._state[name].fill_(self._specs[name].fill)

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        total, seen, unlearned = self._with_current_run(state)
        if self.across_runs == "mean":
            never = unlearned > 0  # np.mean over runs with an inf
            score = total.to(torch.float64) / seen.clamp_min(1)
        else:
            never = unlearned == seen  # never learned in any run
            score = total.to(torch.float64)
        score = torch.where(never, torch.inf, score)
        return torch.where(seen > 0, score, torch.nan).to(torch.float32)

    def _check_loaded(
        self, state: dict[str, Tensor], *, num_updates: int, num_runs: int, run_updates: int
    ) -> str | None:
        finished = num_runs - (run_updates > 0)  # runs folded into runs_*
        presentations, learned = state["presentations"], state["learned"]
        checks = (
            (state["runs_unlearned"] > state["runs_seen"], "'runs_unlearned' exceeds 'runs_seen'"),
            (
                state["runs_seen"].to(torch.int64) > finished,
                f"'runs_seen' exceeds the {finished} finished run(s)",
            ),
            ((state["runs_seen"] == 0) & (state["runs_total"] > 0), "'runs_total' counts no run"),
            (learned & (presentations == 0), "'learned' is set without a presentation"),
            (state["last_correct"] & ~learned, "'last_correct' is set but 'learned' is not"),
            (state["events"] >= presentations.clamp_min(1), "'events' lack presentations"),
        )
        for bad, what in checks:
            if bool(bad.any()):
                return f"State {what} for some examples: it is corrupt."
        if run_updates == 0 and bool((presentations > 0).any()):
            return "The state has presentations in the current run but run_updates=0."
        return None


def _add_presentations(
    state: dict[str, Tensor], indices: Tensor, now: Tensor, forgotten: Tensor
) -> None:
    """Count the rows' presentations and events; ``learned |= now``."""
    ones = torch.ones_like(indices, dtype=torch.int32)
    state["events"].index_add_(0, indices, forgotten.to(torch.int32))
    state["presentations"].index_add_(0, indices, ones)
    # correct rows set True, the others go to the trash slot (the state's last entry)
    trash = state["learned"].shape[0] - 1
    state["learned"].index_fill_(0, torch.where(now, indices, trash), True)
