"""Scoring passes over a dataset: :func:`score_dataset` and the :func:`eval_mode` it relies on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import Any

import torch
from torch import nn

from sampleweights.data import Forward, default_forward, logits_of
from sampleweights.scorers.base import Scorer
from sampleweights.scorers.collection import ScorerCollection
from sampleweights.validation import as_index_tensor

__all__ = ["eval_mode", "model_mode", "score_dataset", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel``; other models as they are.

    Scoring through the inner module triggers none of DDP's gradient synchronisation.
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module of ``model`` in eval mode; restore each module's own flag afterwards.

    ``model.train()`` after scoring would be wrong for a model with deliberately frozen (eval)
    submodules, so the flags are recorded per module.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
        >>> _ = net[1].eval()
        >>> with eval_mode(net):
        ...     net.training
        False
        >>> net.training, net[1].training
        (True, False)
    """
    with model_mode(model, train=False):
        yield model


@contextlib.contextmanager
def model_mode(model: nn.Module, *, train: bool) -> Iterator[nn.Module]:
    """Put every module of ``model`` in train (``train=True``) or eval mode; restore each
    module's own flag afterwards (GraNd's ``mode``; :func:`eval_mode` is ``train=False``).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).eval()
        >>> with model_mode(net, train=True):
        ...     net[1].training
        True
        >>> net.training, net[1].training
        (False, False)
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(train)
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def score_dataset(
    model: nn.Module,
    loader: Iterable[Any],
    *scorers: Scorer | ScorerCollection,
    forward: Forward | None = None,
    progress: bool = True,
) -> None:
    """Score every batch of ``loader`` with ``scorers``, the model in eval mode (as Data Diet).

    One forward without autograd per batch feeds every scorer that needs only logits (EL2N,
    ForgettingTracker, Misclassified); scorers that need the model itself (``GraNd``) run their
    own grad-enabled pass on the same batch, in their own ``mode`` (``GraNd(mode="train")``
    scores in train mode here too). Afterwards the model is as it was: each module's train/eval
    flag, its parameters, their ``.grad`` and its hooks.

    Call ``compute()`` on the scorers for the scores. Under ``torch.distributed`` give each rank
    its shard (e.g. ``PrunedSampler(range(N), shuffle=False, pad=False)``) and call
    ``compute()`` on every rank. ``ForgettingTracker`` exchanges every update across ranks, so
    with it every rank must see the same number of batches (``pad=True``, the default).

    Args:
        model: the model (a DDP/DataParallel wrapper is unwrapped: no gradient sync happens).
        loader: batches as a DataLoader over :class:`~sampleweights.WithIndex` yields them.
        *scorers: one or more scorers (a :class:`~sampleweights.ScorerCollection` counts as one
            logit scorer: one shared read of each batch).
        forward: ``forward(model, batch) -> output`` (output: logits tensor, or a dict/object
            with ``logits``). Default: ``model(layout.model_input(batch))`` with the scorers'
            :class:`~sampleweights.BatchLayout` (``model(batch[0])`` for ``(input, target,
            index)`` batches), ``model(**inputs)`` for dict batches, inputs moved to the model's
            device. Scorers whose layouts name different inputs are a ValueError.
        progress: show a tqdm progress bar when tqdm is installed.

    Raises:
        TypeError: if an argument is not a scorer or the model is not an ``nn.Module``.
        ValueError: if a scorer's layout cannot read a batch (raised before any scorer changes)
            or, with the default forward, the layouts name different model inputs.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> import sampleweights as sw
        >>> ds = sw.WithIndex(TensorDataset(torch.randn(10, 3), torch.randint(0, 2, (10,))))
        >>> model = torch.nn.Linear(3, 2)
        >>> el2n, wrong = sw.EL2N(len(ds)), sw.Misclassified(len(ds))
        >>> sw.score_dataset(model, DataLoader(ds, batch_size=4), el2n, wrong, progress=False)
        >>> bool(el2n.compute().isfinite().all()), el2n.num_updates
        (True, 3)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}."
        )
    if not scorers:
        raise TypeError("score_dataset needs at least one scorer, e.g. sw.EL2N(len(dataset)).")
    for s in scorers:
        if not isinstance(s, Scorer | ScorerCollection):
            raise TypeError(
                f"Expected scorers (sw.EL2N, sw.GraNd, ...), but got {type(s).__name__}."
            )
    model = unwrap_model(model)
    logit_scorers = [s for s in scorers if not s.requires_model]
    model_scorers = [s for s in scorers if isinstance(s, Scorer) and s.requires_model]
    for s in model_scorers:
        s._check_model(model)

    batches: Iterable[Any] = loader
    if progress:
        batches = _progress(loader)
    # one model call for all logit scorers; the default forward finds the inputs of a dict batch
    # with the first scorer's layout
    fwd = forward or default_forward(logit_scorers[0].layout if logit_scorers else None)
    checked = forward is not None
    with eval_mode(model):
        for batch in batches:
            # read (and range-check) every scorer's indices and targets first: a batch that one
            # of them rejects raises before any scorer has changed
            for s in scorers:
                indices = s.layout.indices(batch)
                s.layout.targets(batch)
                for member in s if isinstance(s, ScorerCollection) else (s,):
                    if member.validate:
                        member._check_indices(as_index_tensor(indices, "indices"))
            if not checked:  # the default forward: every layout must name the same model input
                _check_same_input(batch, scorers)
                checked = True
            if logit_scorers:
                with torch.no_grad():
                    logits = logits_of(fwd(model, batch))
                for s in logit_scorers:
                    s.update(batch, logits)
            for s in model_scorers:
                s._score_batch(batch, forward)


def _check_same_input(batch: Any, scorers: tuple[Scorer | ScorerCollection, ...]) -> None:
    """With the default forward, refuse scorers whose layouts name different model inputs."""
    layouts = list(dict.fromkeys(s.layout for s in scorers))
    if len(layouts) < 2:
        return
    inputs = [layout.model_input(batch) for layout in layouts]
    if isinstance(batch, Mapping):
        same = all(sorted(x) == sorted(inputs[0]) for x in inputs[1:])
    else:
        same = all(x is inputs[0] for x in inputs[1:])
    if not same:
        raise ValueError(
            "The scorers' layouts name different model inputs of the same batch "
            f"({', '.join(repr(layout) for layout in layouts)}); score_dataset calls the model "
            "once per batch. Give every scorer the same BatchLayout(input_pos=...), or pass "
            "forward=lambda model, batch: ... ."
        )


def _progress(loader: Iterable[Any]) -> Iterable[Any]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra
        return loader
    total = len(loader) if isinstance(loader, Sized) else None
    return tqdm(loader, total=total, desc="scoring", leave=False)  # type: ignore[no-any-return]
