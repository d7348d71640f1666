"""Per-example gradient norms: a ``torch.func`` engine and a hook engine with per-layer rules."""

from sampleweights.pergrad.exact import exact_sq_norms, loop_sq_norms
from sampleweights.pergrad.hooks import UnsupportedLayerError, hooks_sq_norms
from sampleweights.pergrad.rules import (
    BatchCoupledError,
    Rule,
    find_rule,
    register_rule,
    registered_rule,
)
from sampleweights.pergrad.vmap import (
    LossFn,
    PerExampleGradientError,
    auto_chunk_size,
    vmap_sq_norms,
)

__all__ = [
    "BatchCoupledError",
    "LossFn",
    "PerExampleGradientError",
    "Rule",
    "UnsupportedLayerError",
    "auto_chunk_size",
    "exact_sq_norms",
    "find_rule",
    "hooks_sq_norms",
    "loop_sq_norms",
    "register_rule",
    "registered_rule",
    "vmap_sq_norms",
]
