"""One compiled call for a whole collection update (``ScorerCollection(..., compile=True)``).

On small batches an eager update is op dispatch, not arithmetic: a collection of six scorers is
~100 ATen calls of a few µs each. When every scorer of the collection is a built-in one (the
types in :data:`FUSABLE`, plain means, ``nonfinite="raise"``, ``validate=True``; checked at
every update, as these can be changed) and the batch allows it (see
:meth:`ScorerCollection._update_fused`), the shared statistics (:func:`~sampleweights.scorers.
rowstats._fused`), every scorer's values (its own ``_values_from``) and every scorer's state update
(its own ``_scatter_distinct``, the one its eager ``_scatter`` uses for distinct indices) run as
one ``torch.compile`` call: the same functions, traced together, so there is one definition of
each and the compiler only fuses them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from sampleweights.scorers.aum import AUM
from sampleweights.scorers.base import RunningMeanScorer, Scorer
from sampleweights.scorers.datamaps import DataMaps
from sampleweights.scorers.el2n import EL2N
from sampleweights.scorers.forgetting import ForgettingTracker
from sampleweights.scorers.misclassified import Misclassified
from sampleweights.scorers.rowstats import _fused
from sampleweights.scorers.stats import Confidence, Entropy, Loss, Margin

__all__ = ["FUSABLE", "CompiledUpdate", "compile_error", "compiled_update", "fusable"]

#: the scorer types whose ``_values_from`` reads only the shared statistics and whose
#: ``_scatter_distinct`` is their whole distinct-index update (exact types: a subclass may
#: override either, so it is never fused)
FUSABLE: tuple[type[Scorer], ...] = (
    EL2N,
    AUM,
    DataMaps,
    ForgettingTracker,
    Misclassified,
    Loss,
    Margin,
    Entropy,
    Confidence,
)


def fusable(scorer: Scorer) -> bool:
    """Whether ``scorer``'s update can join a fused call: a :data:`FUSABLE` type, a plain mean
    (an EMA's update depends on the order of presentations), ``nonfinite="raise"`` (every
    row then reaches the state, with no mask) and ``validate=True`` (the compiled kernel's
    scatters must never see an index out of range: a failure inside it could leave some
    scorers updated, or on CUDA end in a device-side assert)."""
    if type(scorer) not in FUSABLE or scorer.nonfinite != "raise" or not scorer.validate:
        return False
    if _OVERRIDABLE & vars(scorer).keys():  # a method or statistic replaced on the instance
        return False
    return not (isinstance(scorer, RunningMeanScorer) and scorer.ema is not None)


#: what a fused call reads from the scorer's class, never from the instance
_OVERRIDABLE = frozenset({"_values_from", "_values", "_scatter", "_scatter_distinct", "_stat"})


class FusedStats(NamedTuple):
    """The shared statistics by the names :class:`~sampleweights.scorers.rowstats.RowStats`
    gives them, so a scorer's ``_values_from`` reads them unchanged inside the compiled call."""

    correct: Tensor
    p_target: Tensor
    wrong_mass: Tensor
    log_norm: Tensor
    loss: Tensor
    logit_margin: Tensor
    prob_margin: Tensor
    el2n: Tensor
    entropy: Tensor | None


def whole_update(
    logits: Tensor,
    targets: Tensor,
    indices: Tensor,
    steps: Tensor,
    kinds: tuple[type[Scorer], ...],
    states: list[dict[str, Tensor]],
    entropy: bool,
) -> Tensor:
    """Statistics, values and state updates of one batch of distinct ``indices`` (B,) int64 on
    the logits' device; ``steps`` (K,) int64: each scorer's update number; ``kinds`` and
    ``states``: each scorer's type and state dict, in order.

    Returns whether every logit is finite (0-d bool). If one is not, every row goes to the trash
    slot (each state's last entry), so the states are as they were and the caller raises
    (validation before any change, as the eager path, without a pass of its own)."""
    # not the eager path's x·0 sum: a compiler may fold x·0 to 0 (inductor does)
    finite = torch.isfinite(logits).all()
    trash = next(iter(states[0].values())).shape[0] - 1
    indices = torch.where(finite, indices, trash)
    fused = _fused(logits, targets, entropy)
    stats = FusedStats(*(fused if entropy else (*fused, None)))  # type: ignore[arg-type]
    for k, (kind, state) in enumerate(zip(kinds, states, strict=True)):
        # the built-in scorers' _values_from read only the statistics (and, for the running
        # means, the class attribute naming one): the class stands in for the instance
        values = kind._values_from(kind, stats)  # type: ignore[arg-type]
        kind._scatter_distinct(state, indices, values, steps[k])
    return finite


def _whole_update_any_shape(*args: Any) -> Tensor:
    """:func:`whole_update` under another name: its dynamic-shape compiled form keeps a cache of
    its own, apart from the static-shape one."""
    return whole_update(*args)


class CompiledUpdate:
    """:func:`whole_update` under ``torch.compile``: static-shape kernels for the first
    ``STATIC_KINDS`` kinds of call (batch shape, dtype, device, scorer types, dataset size),
    then one dynamic-shape kernel for any further kind, so varying batch sizes stop
    recompiling."""

    STATIC_KINDS = 4

    def __init__(self) -> None:
        # fullgraph: one graph or a compile error, raised before any of it runs (no part of
        # the update can have run eagerly when compilation fails)
        self.static = torch.compile(whole_update, dynamic=False, fullgraph=True)
        self.dynamic = torch.compile(_whole_update_any_shape, dynamic=True, fullgraph=True)
        self.kinds: set[tuple[Any, ...]] = set()

    def __call__(
        self,
        logits: Tensor,
        targets: Tensor,
        indices: Tensor,
        steps: Tensor,
        kinds: tuple[type[Scorer], ...],
        states: list[dict[str, Tensor]],
        entropy: bool,
    ) -> Tensor:
        """:func:`whole_update` compiled; returns whether every logit was finite."""
        size = len(next(iter(states[0].values())))
        kind = (tuple(logits.shape), logits.dtype, logits.device, kinds, size, entropy)
        args = (logits, targets, indices, steps, kinds, states, entropy)
        # one grad mode for every call: dynamo guards on it, and a loop that scores both inside
        # and outside no_grad would otherwise compile everything twice
        with torch.no_grad():
            if kind in self.kinds or len(self.kinds) < self.STATIC_KINDS:
                self.kinds.add(kind)
                finite: Tensor = self.static(*args)
            else:
                finite = self.dynamic(*args)
        return finite


def compile_error(err: Exception) -> bool:
    """Whether ``err`` came from compiling (dynamo's and inductor's errors, raised before the
    compiled update runs) rather than from running the compiled update. Dynamo's recompile
    limit counts too: it is per function and process-wide (8 by default), so a process that
    builds many differently composed collections can exhaust it; under ``fullgraph`` that is
    an error (not a silent eager run), raised before the frame runs."""
    from torch._dynamo import exc  # imported by torch.compile by now

    names = ("TorchDynamoException", "FailOnRecompileLimitHit", "FailOnCacheLimitHit")
    kinds = tuple(getattr(exc, name) for name in (*names, "RecompileError") if hasattr(exc, name))
    return isinstance(err, kinds)


_COMPILED: list[CompiledUpdate] = []  # the one compiled update, made on demand


def compiled_update() -> CompiledUpdate:
    """The compiled update, made once per process and shared by every collection (compilation
    happens at the first batch of each kind, not here)."""
    if not _COMPILED:
        _COMPILED.append(CompiledUpdate())
    return _COMPILED[0]
