"""Several logit scorers fed by one call: :class:`ScorerCollection`.

After torchmetrics' ``MetricCollection``: one ``update(batch, logits)`` reads and validates the
batch once, computes the per-row statistics the scorers share once (a
:class:`~sampleweights.scorers.rowstats.RowStats`: argmax, ``p_y``, log-normaliser, loss, entropy,
margins, EL2N — each on first use), and hands every scorer its values. Each scorer keeps its own
state, reductions and persistence, so the scores are bit for bit those of the same scorers
updated separately.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor

from sampleweights.data import BatchLayout
from sampleweights.errors import StateMismatchError
from sampleweights.scorers.base import Scorer
from sampleweights.scorers.rowstats import RowStats
from sampleweights.validation import finite_rows

__all__ = ["ScorerCollection"]


class ScorerCollection:
    """Update several logit scorers with one call; ``compute()`` gives ``{name: scores}``.

    Accepts scorers that take logits (EL2N, AUM, DataMaps, Loss, Margin, Entropy, Confidence,
    ForgettingTracker, Misclassified, your own :class:`~sampleweights.Scorer` subclasses);
    each must have a distinct ``name`` and the same ``num_examples``. The batch is read with the
    first scorer's ``layout`` (or ``layout=``) and checked once for every distinct
    ``(validate, nonfinite)`` policy among the scorers; every scorer's values are computed before
    any state changes, so a rejected batch leaves every scorer as it was.
    :func:`~sampleweights.score_dataset` accepts a collection like a scorer.

    Under ``torch.distributed`` each scorer does its own reductions (at ``compute()``) and, for
    order-dependent ones, its own per-update exchange; ``compute()`` calls them in the
    collection's order, the same on every rank.

    Args:
        *scorers: logit scorers (at least one).
        layout: where ``update(batch, logits)`` finds index and target; default: the first
            scorer's.

    Raises:
        TypeError: an argument is not a scorer, or is a scorer that runs the model itself
            (``GraNd``): update that one separately (``g.update(batch)``), or pass both the
            collection and it to ``score_dataset``.
        ValueError: no scorers, duplicate names, or different ``num_examples``.

    Example:
        >>> import torch, sampleweights as sw
        >>> scorers = sw.ScorerCollection(sw.EL2N(4), sw.AUM(4), sw.Misclassified(4))
        >>> scorers.update_indexed(torch.tensor([0, 1]), torch.tensor([[2.0, 0.0], [2.0, 0.0]]),
        ...                        torch.tensor([0, 1]))
        >>> scores = scorers.compute()
        >>> sorted(scores), scores["aum"]
        (['aum', 'el2n', 'misclassified'], tensor([ 2., -2., nan, nan]))
    """

    #: a collection holds logit scorers only (see :func:`~sampleweights.score_dataset`)
    requires_model: ClassVar[bool] = False

    def __init__(self, *scorers: Scorer, layout: BatchLayout | None = None) -> None:
        if not scorers:
            raise ValueError("ScorerCollection needs at least one scorer, e.g. sw.EL2N(n).")
        for s in scorers:
            if not isinstance(s, Scorer):
                raise TypeError(
                    f"Expected scorers (sw.EL2N, sw.AUM, ...), but got {type(s).__name__}."
                )
            if s.requires_model:
                raise TypeError(
                    f"{type(s).__name__} runs the model itself (update(batch), no logits), so it "
                    "cannot share a collection's logits: update it separately, or pass the "
                    "collection and it to sw.score_dataset(model, loader, collection, scorer)."
                )
        names = [s.name for s in scorers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"Scorer names must be distinct (compute() returns name → scores), but "
                f"{duplicates} appear more than once. Use one collection per configuration."
            )
        sizes = sorted({s.num_examples for s in scorers})
        if len(sizes) > 1:
            raise ValueError(
                f"Expected every scorer to have the same num_examples (one dataset), but got "
                f"{sizes}."
            )
        if layout is not None and not isinstance(layout, BatchLayout):
            raise TypeError(
                f"Expected `layout` to be a sw.BatchLayout, but got {type(layout).__name__}."
            )
        self._scorers: dict[str, Scorer] = dict(zip(names, scorers, strict=True))
        self.layout = layout or scorers[0].layout
        self.num_examples = sizes[0]

    # -- container -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._scorers)

    def __iter__(self) -> Iterator[Scorer]:
        return iter(self._scorers.values())

    def __getitem__(self, name: str) -> Scorer:
        return self._scorers[name]

    def keys(self) -> list[str]:
        """The scorers' names, in order."""
        return list(self._scorers)

    # -- updates ---------------------------------------------------------------------------------
    def update(self, batch: Any, logits: Tensor) -> None:
        """Score one batch with every scorer (see :meth:`Scorer.update`)."""
        self.update_indexed(self.layout.indices(batch), logits, self.layout.targets(batch))

    def update_indexed(self, indices: Any, logits: Tensor, targets: Any) -> None:
        """Score one batch given explicitly (see :meth:`Scorer.update_indexed`).

        Every check and every scorer's values come before any state changes.
        """
        checked: dict[tuple[bool, str], tuple[Tensor, Tensor, Tensor]] = {}
        for s in self._scorers.values():
            policy = (s.validate, s.nonfinite)
            if policy not in checked:
                checked[policy] = s._validate(indices, logits, targets)
        index_t, logits_t, target_t = next(iter(checked.values()))
        target_t = target_t.to(logits_t.device, torch.int64, non_blocking=True)
        skip = any(s.nonfinite == "skip" for s in self._scorers.values())
        finite = finite_rows(logits_t) if skip else None
        stats = RowStats(logits_t, target_t)
        values = [s._values_from(stats) for s in self._scorers.values()]
        for s, v in zip(self._scorers.values(), values, strict=True):
            s._ingest(index_t, v, finite if s.nonfinite == "skip" else None)

    def new_run(self) -> None:
        """Start a new training run on every scorer (see :meth:`Scorer.new_run`)."""
        for s in self._scorers.values():
            s.new_run()

    # -- results ---------------------------------------------------------------------------------
    def compute(self) -> dict[str, Tensor]:
        """``{name: scores}``, each a scorer's ``compute()`` (a collective under DDP)."""
        return {name: s.compute() for name, s in self._scorers.items()}

    def reset(self) -> None:
        """Reset every scorer."""
        for s in self._scorers.values():
            s.reset()

    def to(self, device: torch.device | str) -> ScorerCollection:
        """Move every scorer's state to ``device``; returns self."""
        for s in self._scorers.values():
            s.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """``{"collection": [names], "scorers": {name: scorer.state_dict()}}``."""
        return {
            "collection": list(self._scorers),
            "scorers": {name: s.state_dict() for name, s in self._scorers.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: all scorers or none.

        Raises:
            StateMismatchError: the state holds other scorers, or a scorer rejects its part (the
                scorers already loaded are restored, so nothing changes).
        """
        if (
            not isinstance(state_dict, dict)
            or not isinstance(state_dict.get("scorers"), dict)
            or set(state_dict["scorers"]) != set(self._scorers)
        ):
            got = (
                sorted(state_dict["scorers"])
                if isinstance(state_dict, dict) and isinstance(state_dict.get("scorers"), dict)
                else type(state_dict).__name__
            )
            raise StateMismatchError(
                f"Expected the state_dict of a ScorerCollection of {sorted(self._scorers)}, but "
                f"got {got}."
            )
        before = {name: s.state_dict() for name, s in self._scorers.items()}
        loaded: list[str] = []
        try:
            for name, s in self._scorers.items():
                s.load_state_dict(state_dict["scorers"][name])
                loaded.append(name)
        except Exception:
            for name in loaded:
                self._scorers[name].load_state_dict(before[name])
            raise

    def __repr__(self) -> str:
        return f"ScorerCollection({', '.join(repr(s) for s in self._scorers.values())})"
