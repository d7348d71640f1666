"""PyTorch Lightning: score examples from ``training_step``, checkpoint the scores, guard samplers.

``pip install "sampleweights[lightning]"``. One callback, :class:`ScoringCallback`:

* **In-loop scores.** The contract: ``training_step`` returns ``{"loss": loss, "logits": logits}``
  (the key is ``logits_key``), and the batch comes from a loader over
  :class:`~sampleweights.WithIndex`.
  In ``on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)`` the callback calls
  ``scorer.update(batch, outputs["logits"].detach())`` — EL2N, forgetting, AUM… or a
  :class:`~sampleweights.ScorerCollection` of several, on every rank.
* **A scoring pass at an epoch.** ``score_at_epoch=k`` runs
  :func:`~sampleweights.score_dataset` over ``score_loader`` with ``score_with`` after ``k``
  training epochs (Data Diet's EL2N of an early checkpoint; JTT's error set with
  ``sw.Misclassified`` after T epochs) and keeps the result in ``callback.scores``.
* **Checkpoints carry the state.** Lightning saves a callback's ``state_dict()`` in every
  checkpoint and gives it back through ``load_state_dict`` on ``fit(ckpt_path=...)``; this
  callback's state is every rank's scorer state (gathered to rank 0, which writes the file) and
  the position of each of our samplers in the training loaders, so a resumed run continues the
  scores and the sampler order with no user code. The scorers' own checks (scorer, dataset size,
  world size, rank) run on the restored part.
* **No double split.** Our samplers split an epoch by rank themselves. With
  ``Trainer(use_distributed_sampler=True)`` (the default) Lightning wraps a custom sampler in a
  ``DistributedSampler`` that splits it again, so the ranks together would see ``1/R`` of the
  selection. The callback refuses that at the start of training (and of every epoch, for reloaded
  loaders) with an error that says to pass ``use_distributed_sampler=False``; a sampler built
  with ``num_replicas=1`` (not splitting itself) may be wrapped, since then Lightning's split is
  the only one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from sampleweights.data import BatchLayout
from sampleweights.errors import StateMismatchError
from sampleweights.integrations._state import (
    AnyScorer,
    check_scorer,
    gather_rank_states,
    is_sw_sampler,
    own_rank_state,
)
from sampleweights.scorers.passes import score_dataset

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "sampleweights.integrations.lightning needs PyTorch Lightning: "
        'pip install "sampleweights[lightning]" (lightning>=2.2).'
    ) from err

__all__ = ["ScoringCallback", "training_samplers"]


def _loaders(obj: Any) -> Iterator[DataLoader[Any]]:
    """The DataLoaders in Lightning's ``train_dataloader`` (a loader, or a dict/list of them)."""
    if isinstance(obj, DataLoader):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _loaders(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _loaders(value)


def _wrapped(sampler: Any) -> Any:
    """The sampler Lightning's ``DistributedSamplerWrapper`` wraps, or None."""
    return getattr(getattr(sampler, "dataset", None), "_sampler", None)


def training_samplers(trainer: Trainer) -> list[Any]:
    """Our samplers (PrunedSampler, UpsampleSampler, JTTSampler…) in ``trainer``'s training loaders.

    Raises:
        ValueError: Lightning wrapped one of them in a ``DistributedSampler`` (the default
            ``use_distributed_sampler=True`` under several processes) while it splits by rank
            itself: the epoch would be split twice.

    Example:
        >>> import lightning.pytorch as pl
        >>> training_samplers(pl.Trainer(logger=False, enable_progress_bar=False))
        []
    """
    found: list[Any] = []
    for loader in _loaders(getattr(trainer, "train_dataloader", None)):
        candidates = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
        for sampler in candidates:
            inner = _wrapped(sampler)
            if is_sw_sampler(inner) and not is_sw_sampler(sampler):
                if inner.num_replicas > 1:
                    raise ValueError(
                        f"Lightning wrapped the training loader's {type(inner).__name__} "
                        f"(which already gives this rank 1/{inner.num_replicas} of the epoch) in a "
                        f"DistributedSampler that splits it again: the {inner.num_replicas} "
                        "ranks together would see only a fraction of the selection. Pass "
                        "Trainer(use_distributed_sampler=False): sampleweights' samplers split "
                        "by rank themselves."
                    )
                found.append(inner)
            elif is_sw_sampler(sampler):
                found.append(sampler)
    unique: list[Any] = []
    for s in found:
        if all(s is not u for u in unique):
            unique.append(s)
    return unique


class ScoringCallback(Callback):
    """Update a scorer from ``training_step``'s logits; checkpoint scorers and samplers.

    Args:
        scorer: a logit scorer (``sw.EL2N(n)``, ``sw.ForgettingTracker(n)``…) or a
            :class:`~sampleweights.ScorerCollection`, updated after every training batch with
            ``scorer.update(batch, outputs[logits_key])``; None for none.
        logits_key: where ``training_step``'s returned dict holds the ``(B, C)`` logits.
        score_at_epoch: run a scoring pass after this many training epochs (≥ 1); None: never.
        score_loader: the loader of that pass (e.g. the training set over ``sw.WithIndex``, in
            order, with ``sw.PrunedSampler(range(n), shuffle=False, pad=False)`` under DDP so
            each example is scored once).
        score_with: the scorer(s) of that pass (``sw.EL2N(n)`` for Data Diet,
            ``sw.Misclassified(n)`` for JTT's error set, ``sw.GraNd(model, n)``); its scores
            (``compute()``, a collective: every rank runs the pass) land in ``self.scores``.
        forward: ``forward(model, batch) -> logits`` for the pass (default: ``model(batch[0])``
            for tuple batches, ``model(**inputs)`` for dict batches).

    Raises:
        TypeError: ``scorer``/``score_with`` are not scorers, or ``scorer`` runs the model itself.
        ValueError: ``score_at_epoch`` is not an int ≥ 1, or is given without ``score_loader``
            and ``score_with`` (or they without it).

    Example:
        >>> import sampleweights as sw
        >>> from sampleweights.integrations.lightning import ScoringCallback
        >>> cb = ScoringCallback(sw.ScorerCollection(sw.EL2N(8), sw.ForgettingTracker(8)))
        >>> cb.state_key
        'ScoringCallback[el2n,forgetting]'
    """

    def __init__(
        self,
        scorer: AnyScorer | None = None,
        *,
        logits_key: str = "logits",
        score_at_epoch: int | None = None,
        score_loader: Any = None,
        score_with: AnyScorer | None = None,
        forward: Callable[[torch.nn.Module, Any], Any] | None = None,
    ) -> None:
        if scorer is not None:
            check_scorer(scorer, "scorer")
        if not isinstance(logits_key, str):
            raise TypeError(
                f"Expected `logits_key` to be a str (the key of the logits in training_step's "
                f"returned dict), but got {type(logits_key).__name__}."
            )
        if score_at_epoch is not None:
            if isinstance(score_at_epoch, bool) or not isinstance(score_at_epoch, int):
                raise TypeError(
                    f"Expected `score_at_epoch` to be an int (training epochs before the scoring "
                    f"pass), but got {type(score_at_epoch).__name__}."
                )
            if score_at_epoch < 1:
                raise ValueError(
                    f"Expected `score_at_epoch` ≥ 1 (training epochs before the scoring pass), "
                    f"but got {score_at_epoch}."
                )
        if (score_at_epoch is None) != (score_loader is None) or (score_at_epoch is None) != (
            score_with is None
        ):
            raise ValueError(
                "`score_at_epoch`, `score_loader` and `score_with` go together: pass all three "
                "(a scoring pass after that many epochs) or none."
            )
        if score_with is not None:
            check_scorer(score_with, "score_with", logits=False)
        self.scorer = scorer
        self.logits_key = logits_key
        self.score_at_epoch = score_at_epoch
        self.score_loader = score_loader
        self.score_with = score_with
        self.forward = forward
        #: the scoring pass's result (``score_with.compute()``), once it has run
        self.scores: Tensor | dict[str, Tensor] | None = None
        self._samplers: list[Any] = []
        # items this rank's training loader yielded this epoch (one loader; None: not countable)
        self._consumed: int | None = 0
        self._pending: dict[str, Any] | None = None  # restored sampler states, applied at start

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint: the class and its scorers' names."""
        names: list[str] = []
        for s in (self.scorer, self.score_with):
            if isinstance(s, Mapping) or hasattr(s, "keys"):
                names += list(s.keys())  # type: ignore[union-attr]
            elif s is not None:
                names.append(s.name)
        return f"{type(self).__name__}[{','.join(names)}]"

    # -- samplers ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._samplers = training_samplers(trainer)
        self._consumed = 0
        if self._pending is not None:
            states = self._pending["samplers"]
            if len(states) != len(self._samplers):
                raise StateMismatchError(
                    f"The checkpoint holds the state of {len(states)} sampleweights sampler(s) "
                    f"in the training loaders, but this run's loaders have "
                    f"{len(self._samplers)}: resume with the loaders of the saved run."
                )
            for sampler, state in zip(self._samplers, states, strict=True):
                sampler.load_state_dict(state)
            if len(self._samplers) == 1 and states:
                self._consumed = int(states[0]["position"])
            self._pending = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # loaders may be rebuilt every epoch (reload_dataloaders_every_n_epochs)
        self._samplers = training_samplers(trainer)
        self._consumed = 0

    # -- in-loop updates --------------------------------------------------------------------------
    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if len(self._samplers) == 1 and self._consumed is not None:
            self._consumed = _add_length(self._consumed, batch, self.scorer)
        if self.scorer is None:
            return
        if not isinstance(outputs, Mapping) or self.logits_key not in outputs:
            got = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise ValueError(
                f"ScoringCallback needs the logits: return {{'loss': loss, "
                f"'{self.logits_key}': logits}} from training_step (or set logits_key=); got "
                f"{got}."
            )
        logits = outputs[self.logits_key]
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"Expected training_step's outputs[{self.logits_key!r}] to be a (B, C) logits "
                f"tensor, but got {type(logits).__name__}."
            )
        self.scorer.update(batch, logits.detach())

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.score_at_epoch is None or trainer.current_epoch + 1 != self.score_at_epoch:
            return
        if self.score_with is None:  # set together with score_at_epoch (checked in __init__)
            return
        score_dataset(
            pl_module, self.score_loader, self.score_with, forward=self.forward, progress=False
        )
        self.scores = self.score_with.compute()

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every rank's scorer and sampler state (a collective: Lightning calls it on every rank
        when it saves a checkpoint, and rank 0 writes the file)."""
        local = {
            "scorer": None if self.scorer is None else self.scorer.state_dict(),
            "score_with": None if self.score_with is None else self.score_with.state_dict(),
            "samplers": [s.state_dict(consumed=self._consumed_for(s)) for s in self._samplers],
        }
        return {"sampleweights": gather_rank_states(local), "scores": self.scores}

    def _consumed_for(self, sampler: Any) -> int | None:
        # with one training loader the callback counts the items the loop really consumed;
        # the sampler's own count would include the batch Lightning prefetches
        if len(self._samplers) != 1 or self._consumed is None:
            return None
        return min(self._consumed, len(sampler))

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse a checkpoint without this callback's state: Lightning would skip
        :meth:`load_state_dict` and the scores would restart from nothing, silently.

        Raises:
            StateMismatchError: the checkpoint holds no state under :attr:`state_key` (it was
                saved with other scorers, or without a ScoringCallback).
        """
        callbacks = checkpoint.get("callbacks") or {}
        if self.state_key in callbacks or (self.scorer is None and self.score_with is None):
            return
        others = sorted(k for k in callbacks if str(k).startswith(f"{type(self).__name__}["))
        saved = f"with {', '.join(others)}" if others else "without a ScoringCallback"
        raise StateMismatchError(
            f"Cannot resume {self.state_key}: the checkpoint was saved {saved}, so its scores "
            "would restart from nothing. Build the callback with the saved run's scorers, or "
            "load only the weights (LightningModule.load_from_checkpoint, no ckpt_path) to "
            "start scoring afresh."
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore this rank's part of a checkpoint (scorers now; samplers at train start).

        Raises:
            StateMismatchError: the checkpoint was saved by another number of processes, holds
                other scorers, or a scorer rejects its state (its own checks); nothing changes.
        """
        own = own_rank_state(state_dict.get("sampleweights"), "ScoringCallback")
        pairs = [
            (self.scorer, own.get("scorer"), "scorer"),
            (self.score_with, own.get("score_with"), "score_with"),
        ]
        for scorer, saved, name in pairs:
            if (scorer is None) != (saved is None):
                saved_has = "has" if saved is not None else "has no"
                has = "has" if scorer is not None else "has no"
                raise StateMismatchError(
                    f"The checkpoint's ScoringCallback {saved_has} `{name}` state, but this "
                    f"callback {has} `{name}`: build the callback as in the saved run."
                )
        before = [s.state_dict() if s is not None else None for s, _, _ in pairs]
        done: list[int] = []
        try:
            for i, (scorer, saved, _) in enumerate(pairs):
                if scorer is not None:
                    scorer.load_state_dict(saved)
                    done.append(i)
        except Exception:
            for i in done:
                pairs[i][0].load_state_dict(before[i])  # type: ignore[union-attr,arg-type]
            raise
        self.scores = state_dict.get("scores")
        self._pending = {"samplers": list(own.get("samplers", []))}


def _add_length(consumed: int, batch: Any, scorer: AnyScorer | None) -> int | None:
    """``consumed`` plus the examples in ``batch`` (the length of its index tensor: a shape, no
    sync); None when the batch has no index to count."""
    layout = scorer.layout if scorer is not None else BatchLayout()
    try:
        return consumed + len(layout.indices(batch))
    except (TypeError, ValueError, KeyError, IndexError):
        return None
