"""The exact fallback for parameters no per-layer rule covers: ``vmap``, then per-example autograd.

:func:`exact_sq_norms` is what the ``hooks`` engine calls for the parameters it cannot cover and
what ``GraNd(engine="auto")`` relies on for exactness on any model plain autograd differentiates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from sampleweights.pergrad.vmap import LossFn, vmap_sq_norms

__all__ = ["exact_sq_norms"]


def exact_sq_norms(
    model: nn.Module,
    names: list[str],
    batch: Any,
    targets: Tensor,
    forward: Callable[[nn.Module, Any], Any],
    loss_fn: LossFn,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-example squared gradient norms over ``names``, exactly: ``(B,)`` fp32 (fp64 models)."""
    return vmap_sq_norms(model, names, batch, targets, forward, loss_fn, chunk_size)
