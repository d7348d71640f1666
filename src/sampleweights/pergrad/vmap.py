"""The ``vmap`` engine: per-example gradients with ``torch.func``, reduced to squared norms.

``vmap(grad(loss of one example))`` over the batch, via ``functional_call`` so the model's own
parameters are untouched. General (any differentiable model without batch coupling), exact, but
it materialises ``chunk × parameters`` gradients: ``chunk_size`` bounds that memory.

Also home of what the engines share: how a batch is split into examples
(``_SplitBatch``) and the error an engine raises when it cannot differentiate a model
(:class:`PerExampleGradientError`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["LossFn", "PerExampleGradientError", "auto_chunk_size", "vmap_sq_norms"]

#: ``loss_fn(output, targets) -> (B,)`` per-example losses.
LossFn = Callable[[Any, Tensor], Tensor]

_CHUNK_BYTES = 512 * 2**20  # per-example gradient memory the default chunk size aims for
_SCALARS = (str, bytes, int, float, bool, type(None))


class PerExampleGradientError(RuntimeError):
    """A per-example gradient engine cannot differentiate the model (the message says which
    parameters, why, and which engine to use instead); the original error is its ``__cause__``.
    """


class _Call(nn.Module):
    """Wraps ``forward(model, batch)`` as a module so ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, batch: Any) -> Any:
        return self._forward(self.model, batch)


class _SplitBatch:
    """A batch of ``n`` examples seen as its per-example parts and the rest.

    Per-example parts: tensors whose first dimension is ``n`` (split along it), and lists of ``n``
    strings or numbers (what ``default_collate`` makes of a string field; split by item). Every
    other leaf — a 0-d tensor, a tensor with another first dimension, a flag — is shared by all
    examples and passed whole. Dicts, lists, tuples and named tuples are walked.

    Example:
        >>> import torch
        >>> s = _SplitBatch({"x": torch.zeros(3, 2), "text": ["a", "b", "c"], "k": 1}, 3)
        >>> s.rows(1, 2)["x"].shape, s.rows(1, 2)["text"], s.rows(1, 2)["k"]
        (torch.Size([1, 2]), ['b'], 1)
    """

    def __init__(self, batch: Any, n: int) -> None:
        self.batch = batch
        self.n = n
        self.tensors: list[Tensor] = []  # the batch-first tensors, in walk order
        self.lists: list[str] = []  # where the per-example non-tensor lists are, for messages
        self._walk(batch, "batch")

    def _walk(self, obj: Any, where: str) -> None:
        if isinstance(obj, Tensor):
            if obj.dim() > 0 and obj.shape[0] == self.n:
                self.tensors.append(obj)
        elif self._is_value_list(obj):
            self.lists.append(where)
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                self._walk(v, f"{where}[{k!r}]")
        elif isinstance(obj, tuple | list):
            for i, v in enumerate(obj):
                self._walk(v, f"{where}[{i}]")

    def _is_value_list(self, obj: Any) -> bool:
        return (
            isinstance(obj, list)
            and len(obj) == self.n
            and len(obj) > 0
            and all(isinstance(v, _SCALARS) for v in obj)
        )

    def rebuild(self, tensors: list[Tensor], lists: Callable[[list[Any]], list[Any]]) -> Any:
        """The batch with its batch-first tensors replaced by ``tensors`` (in walk order) and each
        per-example list ``v`` by ``lists(v)``."""
        it = iter(tensors)

        def go(obj: Any) -> Any:
            if isinstance(obj, Tensor):
                return next(it) if obj.dim() > 0 and obj.shape[0] == self.n else obj
            if self._is_value_list(obj):
                return lists(obj)
            if isinstance(obj, Mapping):
                return {k: go(v) for k, v in obj.items()}
            if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
                return type(obj)(*(go(v) for v in obj))
            if isinstance(obj, tuple | list):
                return type(obj)(go(v) for v in obj)
            return obj

        return go(self.batch)

    def rows(self, start: int, stop: int) -> Any:
        """Examples ``start:stop`` as a batch of their own (same structure)."""
        return self.rebuild([t[start:stop] for t in self.tensors], lambda v: v[start:stop])


class _StateGuard:
    """The model's buffers, and the weights ``nn.Embedding(max_norm=…)`` renormalises in place,
    as they were when the guard was made: :meth:`restore` puts back what a forward changed in
    place (a running statistic, a call counter) or reassigned (``self.buf = self.buf + 1``).

    The exact engines restore after every example, so each example meets the model as it was
    (not as the previous examples left it), and GraNd restores after every update.
    """

    def __init__(self, model: nn.Module) -> None:
        self._saved: list[tuple[dict[str, Any], str, Tensor, int, Tensor]] = []
        for module in model.modules():
            for name, t in module._buffers.items():
                if t is not None:
                    self._saved.append((module._buffers, name, t, t._version, t.detach().clone()))
            if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.max_norm is not None:
                w = module.weight
                saved = w.detach().clone()
                self._saved.append((module._parameters, "weight", w, w._version, saved))

    def restore(self, *, compare: bool = False) -> None:
        """Put back what changed: tensors whose version counter moved (in-place ops) or, with
        ``compare``, whose values differ (also changes made through ``.data``)."""
        with torch.no_grad():
            differs = [False] * len(self._saved)
            if compare and self._saved:  # one device sync for all of them
                same = [
                    (t == saved).all()
                    if t.shape == saved.shape
                    else torch.zeros((), dtype=torch.bool, device=t.device)
                    for _, _, t, _, saved in self._saved
                ]
                here = same[0].device
                differs = [not s for s in torch.stack([s.to(here) for s in same]).tolist()]
            for i, (store, name, t, version, saved) in enumerate(self._saved):
                if store.get(name) is not t:  # reassigned in the forward
                    store[name] = t
                if t._version != version or differs[i]:
                    if t.shape != saved.shape:  # resized in place
                        t.resize_(saved.shape)
                    t.copy_(saved)
                    self._saved[i] = (store, name, t, t._version, saved)


# id(model) → the guard of the outermost _state_restored running on it (only while it runs)
_ACTIVE_GUARDS: dict[int, _StateGuard] = {}


@contextlib.contextmanager
def _state_restored(model: nn.Module) -> Iterator[_StateGuard]:
    """:class:`_StateGuard` as a context: everything restored (values compared) on the way out.

    Nested on the same model (GraNd → hooks pass → exact fallback → loop) the inner context
    reuses the outer guard and restores on the way in too, so an engine that runs after
    another (the exact fallback after the hooks pass) meets the state the outermost one saw.
    """
    outer = _ACTIVE_GUARDS.get(id(model))
    if outer is not None:
        outer.restore()
        try:
            yield outer
        finally:
            outer.restore()
        return
    guard = _ACTIVE_GUARDS[id(model)] = _StateGuard(model)
    try:
        yield guard
    finally:
        del _ACTIVE_GUARDS[id(model)]
        guard.restore(compare=True)


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``obj`` with every tensor leaf ``t`` replaced by ``fn(t)`` (dicts, lists, tuples and named
    tuples walked; other leaves as they are)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, tuple | list):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _tensor_leaves(obj: Any) -> list[Tensor]:
    """Every tensor leaf of ``obj``, in walk order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensor_leaves(v)]
    if isinstance(obj, tuple | list):
        return [t for v in obj for t in _tensor_leaves(v)]
    return []


def _without_inference_tensors(obj: Any) -> Any:
    """``obj`` with its inference tensors (made under ``torch.inference_mode()``, which autograd
    cannot save for backward) cloned into normal ones; ``obj`` itself when it has none. Call it
    outside inference mode."""
    if not any(t.is_inference() for t in _tensor_leaves(obj)):
        return obj
    return _map_tensors(obj, lambda t: t.clone() if t.is_inference() else t)


def _describe(model: nn.Module, names: list[str], limit: int | None = 6) -> str:
    """``"name (ModuleType), …"`` for error messages: the first ``limit`` of ``names`` (all of
    them with ``limit=None``)."""
    modules = dict(model.named_modules())
    shown = names if limit is None else names[:limit]
    parts = []
    for n in shown:
        owner = n.rsplit(".", 1)[0] if "." in n else ""
        parts.append(f"{n} ({type(modules.get(owner, model)).__name__})")
    more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    return ", ".join(parts) + more


def _graph_nodes(root: Any) -> Iterator[Any]:
    """Every node of the autograd graph below ``root`` (``root`` included), each once, depth
    first; ``None`` (no graph) yields nothing."""
    seen: set[Any] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(child for child, _ in node.next_functions)


def _norm_dtype(params: Iterable[Tensor]) -> torch.dtype:
    """The dtype squared norms are summed in: fp64 when a scored parameter is fp64, else fp32."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _first_line(err: BaseException) -> str:
    """The first line of an error's message, with its type: ``"RuntimeError: …"``."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def auto_chunk_size(num_params: int, batch: int) -> int:
    """Examples per vmap chunk so that their fp32 gradients take about 512 MiB."""
    return max(1, min(batch, _CHUNK_BYTES // max(1, 4 * num_params)))


def vmap_sq_norms(
    model: nn.Module,
    names: list[str],
    batch: Any,
    targets: Tensor,
    forward: Callable[[nn.Module, Any], Any],
    loss_fn: LossFn,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-example squared gradient norms over the parameters ``names``: fp32/fp64 ``(B,)``.

    Random ops (dropout in train mode) draw independently per example
    (``randomness="different"``). An empty batch gives an empty result. Buffers a forward
    updates are put back afterwards; inference tensors in the batch are copied (so the call
    also works under ``torch.inference_mode()``); the batch itself is never changed.

    Args:
        model: the model (in the mode to score in).
        names: parameter names (as in ``model.named_parameters()``) to differentiate.
        batch: what ``forward(model, batch)`` takes; tensors whose first dimension is ``B`` are
            split into examples, other leaves are shared (see ``_SplitBatch``).
        targets: ``(B, ...)`` targets on the output's device.
        forward: ``forward(model, batch) -> logits``.
        loss_fn: ``loss_fn(logits, targets) -> (B,)``.
        chunk_size: examples per vmap call; ``None``: :func:`auto_chunk_size`.

    Raises:
        PerExampleGradientError: ``torch.func`` cannot transform the model (unsupported ops,
            backward hooks, reentrant checkpointing, data-dependent control flow, in-place
            updates of weights) or the batch has per-example fields that are not tensors. The
            one-example-at-a-time engine (:func:`~sampleweights.pergrad.loop_sq_norms`) covers
            these.
        torch.cuda.OutOfMemoryError: as raised: pass a smaller ``chunk_size``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> ce = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")
        >>> sq = vmap_sq_norms(model, ["weight", "bias"], torch.randn(4, 3),
        ...                    torch.tensor([0, 1, 1, 0]), lambda m, x: m(x), ce)
        >>> sq.shape, sq.dtype
        (torch.Size([4]), torch.float32)
    """
    with torch.inference_mode(False), _state_restored(model):
        batch = _without_inference_tensors(batch)
        targets = _without_inference_tensors(targets)
        return _vmap_sq_norms(model, names, batch, targets, forward, loss_fn, chunk_size)


def _vmap_sq_norms(
    model: nn.Module,
    names: list[str],
    batch: Any,
    targets: Tensor,
    forward: Callable[[nn.Module, Any], Any],
    loss_fn: LossFn,
    chunk_size: int | None,
) -> Tensor:
    b = targets.shape[0]
    params = dict(model.named_parameters())
    scored = {f"model.{n}": params[n].detach() for n in names}
    dtype = _norm_dtype(scored.values())
    if b == 0:
        return torch.zeros(0, dtype=dtype, device=targets.device)
    split = _SplitBatch(batch, b)
    if split.lists:
        raise PerExampleGradientError(
            f"GraNd's vmap engine splits only tensors into examples, but the batch has "
            f"per-example fields that are not tensors: {', '.join(split.lists[:4])}. Use "
            "engine='auto' or engine='loop' (one example at a time), or drop such fields in the "
            "collate_fn."
        )
    wrapper = _Call(model, forward)
    fixed = {f"model.{n}": p.detach() for n, p in params.items() if n not in names}
    fixed.update({f"model.{n}": t for n, t in model.named_buffers()})

    def one_loss(p: dict[str, Tensor], rows: list[Tensor], target: Tensor) -> Tensor:
        example = split.rebuild([t.unsqueeze(0) for t in rows], lambda v: v)
        logits = functional_call(wrapper, {**p, **fixed}, (example,))
        return loss_fn(logits, target.unsqueeze(0)).sum()

    numel = sum(t.numel() for t in scored.values())
    chunk = chunk_size or auto_chunk_size(numel, b)
    per_example_grads = vmap(grad(one_loss), in_dims=(None, 0, 0), randomness="different")
    norms = []
    try:
        # chunks by hand: vmap's own chunk_size would still return all B per-example gradients
        for start in range(0, b, chunk):
            # copies: a forward that changes its input in place must not change the caller's batch
            rows = [t[start : start + chunk].detach().clone() for t in split.tensors]
            grads = per_example_grads(scored, rows, targets[start : start + chunk])
            n = min(chunk, b - start)
            total = torch.zeros(n, dtype=dtype, device=targets.device)
            for g in grads.values():
                total += g.reshape(n, -1).to(dtype).pow(2).sum(dim=1)
            norms.append(total)
    except (RuntimeError, NotImplementedError) as err:
        if isinstance(err, PerExampleGradientError | torch.cuda.OutOfMemoryError):
            raise  # out of memory is no verdict on the model: a smaller chunk_size fits
        raise PerExampleGradientError(
            f"GraNd's vmap engine (torch.func) cannot differentiate "
            f"{_describe(model, names)}: {_first_line(err)}. Use engine='auto' or "
            "engine='loop', which fall back to plain autograd one example at a time."
        ) from err
    return torch.cat(norms)
