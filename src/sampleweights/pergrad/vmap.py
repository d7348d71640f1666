"""The ``vmap`` engine: per-example gradients with ``torch.func``, reduced to squared norms.

``vmap(grad(loss of one example))`` over the batch, via ``functional_call`` so the model's own
parameters are untouched. General (any differentiable model without batch coupling), exact, but
it materialises ``chunk × parameters`` gradients: ``chunk_size`` bounds that memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

__all__ = ["LossFn", "auto_chunk_size", "vmap_sq_norms"]

#: ``loss_fn(output, targets) -> (B,)`` per-example losses.
LossFn = Callable[[Any, Tensor], Tensor]

_CHUNK_BYTES = 512 * 2**20  # per-example gradient memory the default chunk size aims for


class _Call(nn.Module):
    """Wraps ``forward(model, batch)`` as a module so ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, batch: Any) -> Any:
        return self._forward(self.model, batch)


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

    Args:
        model: the model (in the mode to score in).
        names: parameter names (as in ``model.named_parameters()``) to differentiate.
        batch: what ``forward(model, batch)`` takes; every tensor leaf has the batch first.
        targets: ``(B,)`` targets on the output's device.
        forward: ``forward(model, batch) -> logits``.
        loss_fn: ``loss_fn(logits, targets) -> (B,)``.
        chunk_size: examples per vmap call; ``None``: :func:`auto_chunk_size`.
    """
    wrapper = _Call(model, forward)
    params = dict(model.named_parameters())
    scored = {f"model.{n}": params[n].detach() for n in names}
    fixed = {f"model.{n}": p.detach() for n, p in params.items() if n not in names}
    fixed.update({f"model.{n}": b for n, b in model.named_buffers()})

    def one_loss(p: dict[str, Tensor], example: Any, target: Tensor) -> Tensor:
        as_batch = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
        logits = functional_call(wrapper, {**p, **fixed}, (as_batch,))
        return loss_fn(logits, target.unsqueeze(0)).sum()

    b = targets.shape[0]
    numel = sum(t.numel() for t in scored.values())
    chunk = chunk_size or auto_chunk_size(numel, b)
    per_example_grads = vmap(grad(one_loss), in_dims=(None, 0, 0))
    dtype = (
        torch.float64 if any(p.dtype == torch.float64 for p in scored.values()) else torch.float32
    )
    norms = []
    # chunks by hand: vmap's own chunk_size would still return all B per-example gradients
    for start in range(0, b, chunk):
        part = tree_map(
            lambda t: t[start : start + chunk] if isinstance(t, Tensor) else t,  # noqa: B023
            batch,
        )
        grads = per_example_grads(scored, part, targets[start : start + chunk])
        n = min(chunk, b - start)
        total = torch.zeros(n, dtype=dtype, device=targets.device)
        for g in grads.values():
            total += g.reshape(n, -1).to(dtype).pow(2).sum(dim=1)
        norms.append(total)
    return torch.cat(norms)
