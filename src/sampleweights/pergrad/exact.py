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

import contextlib
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sampleweights.pergrad.vmap import (
    _SCALARS,
    LossFn,
    PerExampleGradientError,
    _describe,
    _first_line,
    _graph_nodes,
    _norm_dtype,
    _SplitBatch,
    _state_restored,
    _StateGuard,
    _without_inference_tensors,
    vmap_sq_norms,
)

__all__ = ["exact_sq_norms", "loop_sq_norms"]

# model → {batch signature: why vmap failed}. Weak keys: the entry dies with the model.
_VMAP_FAILED: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, str]] = (
    weakref.WeakKeyDictionary()
)


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
    times (user hooks fire per example; dropout draws a mask per example), except that buffers
    a forward updates (running statistics, counters) and ``nn.Embedding(max_norm=…)`` weights
    are put back after every example: each example meets the model as it was, whatever came
    before it in the batch. The batch itself is never changed (each example is a copy), and
    inference tensors are copied, so the call works under ``torch.inference_mode()``. A forward
    that couples the examples (``x - x.mean(0)``) sees a batch of one: each example alone, which
    is what this engine computes. The model's ``.grad``
    is not touched — except that a graph with reentrant checkpointing
    (``torch.utils.checkpoint(..., use_reentrant=True)``), which ``autograd.grad`` cannot run,
    is differentiated with ``.backward()`` and the ``.grad`` of every parameter of the model is
    put back afterwards (hooks registered with ``register_post_accumulate_grad_hook`` then fire).

    On CUDA, recurrent layers in eval mode are differentiated with cuDNN off for the call
    (cuDNN's RNN backward refuses eval mode). fp32 norms (fp64 when a scored parameter is fp64);
    an empty batch gives an empty result.

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
    with (
        torch.inference_mode(False),
        _cudnn_off_for_eval_rnns(model),
        _state_restored(model) as state,
    ):
        split = _SplitBatch(_without_inference_tensors(batch), b)
        targets = _without_inference_tensors(targets)
        _loop(model, names, params, split, targets, forward, loss_fn, out, state)
    return out


def _loop(
    model: nn.Module,
    names: list[str],
    params: list[nn.Parameter],
    split: _SplitBatch,
    targets: Tensor,
    forward: Callable[[nn.Module, Any], Any],
    loss_fn: LossFn,
    out: Tensor,
    state: _StateGuard,
) -> None:
    dtype = out.dtype
    reentrant: bool | None = None  # decided on the first example's graph
    for i in range(out.shape[0]):  # the point of this engine: one example at a time
        if i:
            state.restore()  # each example meets the model's buffers as they were
        # copies: a forward that changes its input in place must not change the caller's batch
        rows = [t[i : i + 1].detach().clone() for t in split.tensors]
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


@contextlib.contextmanager
def _cudnn_off_for_eval_rnns(model: nn.Module) -> Iterator[None]:
    """cuDNN's RNN backward refuses eval mode ("can only be called in training mode"); plain
    autograd differentiates an eval-mode RNN on CUDA with cuDNN off (same math, no dropout)."""
    needed = torch.backends.cudnn.enabled and any(
        isinstance(m, nn.RNNBase) and not m.training and any(p.is_cuda for p in m.parameters())
        for m in model.modules()
    )
    if not needed:
        yield
        return
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = True


def _has_reentrant_checkpoint(root: Any) -> bool:
    """Whether the graph below ``root`` holds a reentrant-checkpoint node (which refuses
    ``autograd.grad``: it needs ``.backward()``)."""
    return any("CheckpointFunction" in type(node).__name__ for node in _graph_nodes(root))


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
    loop are raised as they are (a :class:`PerExampleGradientError` for autograd's). ``vmap``
    running out of memory is not remembered: that batch goes through the loop (a warning
    suggests a smaller ``chunk_size``) and the next one tries ``vmap`` again.

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
    except torch.cuda.OutOfMemoryError:
        # no verdict on the model: this batch one example at a time, vmap again on the next
        warnings.warn(
            f"GraNd: the vmap engine ran out of memory on {_describe(model, names)} "
            f"(chunk_size={chunk_size}); this batch is scored one example at a time. Pass a "
            "smaller chunk_size to GraNd to keep vmap's speed.",
            UserWarning,
            stacklevel=2,
        )
        return loop_sq_norms(model, names, batch, targets, forward, loss_fn)
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
