"""Per-example gradient norms: a ``torch.func`` engine and a hook engine with per-layer rules."""

from sampleweights.pergrad.hooks import UnsupportedLayerError, hooks_sq_norms
from sampleweights.pergrad.rules import BatchCoupledError, Rule, find_rule, register_rule
from sampleweights.pergrad.vmap import LossFn, auto_chunk_size, vmap_sq_norms

__all__ = [
    "BatchCoupledError",
    "LossFn",
    "Rule",
    "UnsupportedLayerError",
    "auto_chunk_size",
    "find_rule",
    "hooks_sq_norms",
    "register_rule",
    "vmap_sq_norms",
]
