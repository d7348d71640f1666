"""The exact engines: ``vmap`` where ``torch.func`` can, plain autograd one example at a time
where it cannot.

:func:`loop_sq_norms` is the last resort: for each example, one forward on a batch of that one
example and one backward of its loss — the definition of GraNd, run literally. It fails only
where ordinary training would fail (it is what a training step on a batch of one does), so it
covers what ``torch.func`` cannot transform: recurrent layers (``nn.GRU``/``nn.LSTM``), user
backward hooks, reentrant checkpointing, data-dependent control flow (e.g. ``F.one_hot`` or a
``mask.all()`` check in the forward), weights updated in place during the forward
(``nn.Embedding(max_norm=…)``), non-tensor per-example fields (strings in a dict batch).

Why one example per backward, not a batched backward: ``is_grads_batched`` runs the backward
under ``vmap`` and fails on the same models as the ``vmap`` engine; one batched forward followed
by one backward per example costs a full-batch backward per example (``O(B²)``) and is only
right when examples do not interact. A batch of one is always right, costs ``B`` small
forward/backward pairs, and holds one example's activations and gradients at a time.

:func:`exact_sq_norms` — what the ``hooks`` engine calls for parameters no per-layer rule covers
and what ``GraNd(engine="auto")`` relies on — tries ``vmap`` and, where it fails, runs the loop.
The outcome is remembered per model and batch structure, so a model ``vmap`` cannot transform
pays for one failed attempt, not one per batch.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sampleweights.pergrad.vmap import (
    _SCALARS,
    LossFn,
    PerExampleGradientError,
    _describe,
    _first_line,
    _SplitBatch,
    vmap_sq_norms,
)

__all__ = ["exact_sq_norms", "loop_sq_norms"]

# model → {batch signature: why vmap failed}. Weak keys: the entry dies with the model.
_VMAP_FAILED: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, str]] = (
    weakref.WeakKeyDictionary()
)


def _norm_dtype(params: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def loop_sq_norms(
    model: nn.Module,
    names: list[str],
    batch: Any,
    targets: Tensor,
    forward: Callable[[nn.Module, Any], Any],
    loss_fn: LossFn,
) -> Tensor:
    """Per-example squared gradient norms by plain autograd, one example at a time: ``(B,)``.

    For each example ``b``: ``forward(model, example_b)`` on a batch of one (tensors whose first
    dimension is ``B`` are split, as are lists of ``B`` strings or numbers; other leaves are
    shared), ``loss_fn(output, targets[b:b+1])``, and ``torch.autograd.grad`` with respect to the
    parameters ``names``. The model is called ``B`` times, so forward side effects happen ``B``
    times (user hooks fire per example; dropout draws a mask per example). The model's ``.grad``
    is not touched — except that a graph with reentrant checkpointing
    (``torch.utils.checkpoint(..., use_reentrant=True)``), which ``autograd.grad`` cannot run,
    is differentiated with ``.backward()`` and every ``.grad`` is put back afterwards (hooks
    registered with ``register_post_accumulate_grad_hook`` then fire).

    fp32 norms (fp64 when a scored parameter is fp64); an empty batch gives an empty result.

    Raises:
        PerExampleGradientError: plain autograd cannot differentiate the loss of one example
            (the message names the parameters and the example; the autograd error is its cause).

    Example:
        >>> import torch
        >>> model = torch.nn.GRU(3, 4, batch_first=True)  # torch.func cannot vmap a GRU
        >>> loss = lambda out, y: (out[0][:, -1] - y).pow(2).sum(dim=1)
        >>> sq = loop_sq_norms(model, ["weight_hh_l0"], torch.randn(5, 2, 3), torch.zeros(5, 4),
        ...                    lambda m, x: m(x), loss)
        >>> sq.shape, bool((sq > 0).all())
        (torch.Size([5]), True)
    """
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    b = targets.shape[0]
    dtype = _norm_dtype(params)
    out = torch.zeros(b, dtype=dtype, device=targets.device)
    if b == 0:
        return out
    split = _SplitBatch(batch, b)
    reentrant: bool | None = None  # decided on the first example's graph
    for i in range(b):  # the point of this engine: one example at a time
        rows = [t[i : i + 1].detach() for t in split.tensors]
        example = split.rebuild(rows, lambda v, i=i: v[i : i + 1])  # type: ignore[misc]
        try:
            with torch.enable_grad():
                loss = loss_fn(forward(model, example), targets[i : i + 1]).sum()
                if not loss.requires_grad:  # no scored parameter reaches the loss
                    continue
                if reentrant is None:
                    reentrant = _has_reentrant_checkpoint(loss.grad_fn)
                if reentrant:
                    grads = _grads_by_backward(loss, params, model)
                else:
                    grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        except RuntimeError as err:
            if isinstance(err, PerExampleGradientError):
                raise
            raise PerExampleGradientError(
                f"GraNd cannot differentiate the loss of example {i} of the batch (called alone, "
                f"as a batch of one) with respect to {_describe(model, names)}: "
                f"{_first_line(err)}. This engine is plain autograd, one example at a time: "
                "ordinary training on a batch of one would fail the same way; fix the model, "
                "forward or loss_fn, or score fewer parameters with params=."
            ) from err
        sq = [g.to(dtype).pow(2).sum() for g in grads if g is not None]
        if sq:
            out[i] = torch.stack(sq).sum()
    return out


def _has_reentrant_checkpoint(root: Any) -> bool:
    """Whether the graph below ``root`` holds a reentrant-checkpoint node (which refuses
    ``autograd.grad``: it needs ``.backward()``)."""
    seen: set[Any] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "CheckpointFunction" in type(node).__name__:
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


def _grads_by_backward(loss: Tensor, params: list[nn.Parameter], model: nn.Module) -> list[Any]:
    """``loss.backward()`` into cleared ``.grad`` slots; every parameter's ``.grad`` put back."""
    owned = list(model.parameters())
    saved = [p.grad for p in owned]
    try:
        for p in owned:
            p.grad = None
        loss.backward()  # type: ignore[no-untyped-call]
        return [p.grad for p in params]
    finally:
        for p, g in zip(owned, saved, strict=True):
            p.grad = g


def _signature(obj: Any, n: int) -> Hashable:
    """The structure of a batch of ``n`` examples without ``n`` itself: what decides whether
    ``vmap`` can transform the model on it."""
    if isinstance(obj, Tensor):
        shape = tuple(obj.shape[1:]) if obj.dim() and obj.shape[0] == n else ("shared", *obj.shape)
        return ("tensor", obj.dtype, obj.device.type, shape)
    if isinstance(obj, list) and len(obj) == n and all(isinstance(v, _SCALARS) for v in obj):
        return ("values",)
    if isinstance(obj, Mapping):
        return ("map", tuple((k, _signature(v, n)) for k, v in obj.items()))
    if isinstance(obj, tuple | list):
        return (type(obj).__name__, tuple(_signature(v, n) for v in obj))
    return (type(obj).__name__,)


def exact_sq_norms(
    model: nn.Module,
    names: list[str],
    batch: Any,
    targets: Tensor,
    forward: Callable[[nn.Module, Any], Any],
    loss_fn: LossFn,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-example squared gradient norms over ``names``, exactly, on any model plain autograd
    differentiates: ``(B,)`` fp32 (fp64 for fp64 parameters).

    :func:`~sampleweights.pergrad.vmap_sq_norms` first; if it fails, :func:`loop_sq_norms`, and
    a warning saying why (once). A model whose ``vmap`` failed while the loop succeeded is not
    offered to ``vmap`` again for batches of the same structure (keyed by the model object, the
    parameters, the mode, and the batch's keys, dtypes and per-example shapes). Errors of the
    loop are raised as they are (a :class:`PerExampleGradientError` for autograd's).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> ce = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
        >>> a = exact_sq_norms(model, ["weight"], x, y, lambda m, b: m(b), ce)
        >>> b = loop_sq_norms(model, ["weight"], x, y, lambda m, b: m(b), ce)
        >>> torch.allclose(a, b)
        True
    """
    b = targets.shape[0]
    if b == 0:
        named = dict(model.named_parameters())
        return torch.zeros(0, dtype=_norm_dtype([named[n] for n in names]), device=targets.device)
    key = (
        tuple(names),
        model.training,
        _signature(batch, b),
        targets.dtype,
        tuple(targets.shape[1:]),
    )
    failed = _VMAP_FAILED.get(model)
    if failed is not None and key in failed:
        return loop_sq_norms(model, names, batch, targets, forward, loss_fn)
    try:
        return vmap_sq_norms(model, names, batch, targets, forward, loss_fn, chunk_size)
    except Exception as err:  # any failure: plain autograd, one example at a time, decides
        vmap_error = err
    result = loop_sq_norms(model, names, batch, targets, forward, loss_fn)
    why = _first_line(vmap_error.__cause__ or vmap_error)
    _VMAP_FAILED.setdefault(model, {})[key] = why
    warnings.warn(
        f"GraNd: torch.func cannot differentiate {_describe(model, names)} of this "
        f"{type(model).__name__} ({why}); they are scored with plain autograd one example at a "
        "time (engine='loop'), which is exact but several times slower. Decided once for this "
        "model and batch structure.",
        UserWarning,
        stacklevel=2,
    )
    return result
