"""Per-layer rules: per-example squared gradient norms of a layer's parameters, by formula.

A rule gets the layer, its input activation ``a`` and the gradient ``g`` of the summed
per-example losses with respect to its output. In eval mode examples do not interact, so ``g[b]``
is exactly the gradient of example ``b``'s own loss, and each parameter's per-example gradient is
a function of ``a[b]`` and ``g[b]`` alone. The rules compute its squared L2 norm without building
it where that is cheaper (the "ghost norm" trick: Goodfellow 2015, Li et al. 2022; BackPACK's
``batch_l2_grad`` computes the same quantities):

* Linear without a sequence dimension: ``‖∇W_b‖² = ‖a_b‖² · ‖g_b‖²``;
* Linear over a sequence (and Conv via unfold): ``∇W_b = Σ_t g_bt a_btᵀ``; either the Gram form
  ``Σ_{t,s} (a_t·a_s)(g_t·g_s)`` (cost T²·(I + O)) or the materialised ``‖Σ_t g_t a_tᵀ‖²`` (cost
  T·I·O), whichever is cheaper for the layer's shapes;
* Embedding: ``Σ_{t,s} [i_t = i_s] (g_t·g_s)``;
* LayerNorm / GroupNorm / BatchNorm (eval): the affine parameters' gradients are
  ``Σ g ∘ x̂`` and ``Σ g`` over the non-channel positions, with ``x̂`` recomputed from ``a``.

Rules compute in fp32 (fp64 for fp64 inputs). A rule returns ``None`` when a configuration of a
supported type is not covered (e.g. a Conv with ``padding_mode="reflect"``): the parameters then
go to the ``vmap`` fallback — never silently skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import grad as conv_grad

__all__ = ["Rule", "find_rule", "register_rule"]

#: ``rule(module, a, g) -> {param_name: (B,) squared norms}`` or ``None`` (not covered).
Rule = Callable[[nn.Module, Tensor, Tensor], "dict[str, Tensor] | None"]

_RULES: dict[type[nn.Module], Rule] = {}


def register_rule(module_type: type[nn.Module], rule: Rule, *, replace: bool = False) -> None:
    """Register the rule for ``module_type`` (exact type; subclasses are not matched).

    Raises:
        ValueError: a rule for that type exists and ``replace`` is False (no silent overwrite).
    """
    if module_type in _RULES and not replace:
        raise ValueError(
            f"A per-example norm rule for {module_type.__name__} is already registered; pass "
            "replace=True to override it."
        )
    _RULES[module_type] = rule


def find_rule(module: nn.Module) -> Rule | None:
    """The rule for ``type(module)`` exactly (a subclass may change ``forward``), or None."""
    return _RULES.get(type(module))


def _math_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _sq(x: Tensor) -> Tensor:
    """Per-example squared norm over every dimension but the first."""
    norms: Tensor = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)
    return norms.square_()


def _outer_sq_norm(a: Tensor, g: Tensor) -> Tensor:
    """``‖Σ_t g_t a_tᵀ‖²_F`` per example for ``a`` (B, T, I), ``g`` (B, T, O)."""
    t, i = a.shape[1:]
    o = g.shape[2]
    if t == 1:
        return _sq(a) * _sq(g)
    # the Gram form costs ~T²(I + O) per example, the materialised outer product ~T·I·O
    if t * (i + o) <= i * o:
        gram_a = torch.bmm(a, a.transpose(1, 2))  # (B, T, T)
        gram_g = torch.bmm(g, g.transpose(1, 2))
        return (gram_a * gram_g).sum(dim=(1, 2))
    return _sq(torch.bmm(g.transpose(1, 2), a))  # (B, O, I)


def _linear(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    dt = _math_dtype(a)
    has_bias = getattr(module, "bias", None) is not None
    if a.dim() == 2:  # no sequence: ‖∇W_b‖² = ‖a_b‖²‖g_b‖², ‖∇bias_b‖² = ‖g_b‖²
        g_sq = _sq(g.to(dt))
        out = {"weight": _sq(a.to(dt)) * g_sq}
        if has_bias:
            out["bias"] = g_sq
        return out
    b = a.shape[0]
    a3 = a.reshape(b, -1, a.shape[-1]).to(dt)  # (B, T, I)
    g3 = g.reshape(b, -1, g.shape[-1]).to(dt)  # (B, T, O)
    out = {"weight": _outer_sq_norm(a3, g3)}
    if has_bias:
        out["bias"] = _sq(g3.sum(dim=1))
    return out


def _conv(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor] | None:
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    if module.padding_mode != "zeros" or (
        isinstance(module.padding, str) and module.padding != "valid"
    ):
        return None  # non-zero padding modes and padding="same" go to the fallback
    dt = _math_dtype(a)
    a, g = a.to(dt), g.to(dt)
    b, groups = a.shape[0], module.groups
    padding = (0,) * len(module.kernel_size) if isinstance(module.padding, str) else module.padding
    positions = g[0, 0].numel()  # T: output positions per example
    fan_in = module.in_channels // groups * math.prod(module.kernel_size)  # I
    fan_out = module.out_channels // groups  # O
    out: dict[str, Tensor] = {}
    if module.bias is not None:
        out["bias"] = _sq(g.reshape(b, module.out_channels, -1).sum(dim=2))
    if positions * (fan_in + fan_out) >= fan_in * fan_out:
        # Few channels, many positions: materialise the per-example weight gradients with the
        # conv weight-gradient kernel, the batch folded into the groups (no unfold needed).
        weight_grad = _CONV_WEIGHT[
            type(module)
        ](  # type: ignore[no-untyped-call]
            a.reshape(1, b * module.in_channels, *a.shape[2:]),
            (b * module.out_channels, module.in_channels // groups, *module.kernel_size),
            g.reshape(1, b * module.out_channels, *g.shape[2:]),
            stride=module.stride,
            padding=padding,
            dilation=module.dilation,
            groups=b * groups,
        )  # (B·C_out, C_in/G, *k)
        out["weight"] = _sq(weight_grad.reshape(b, -1))
        return out
    # Many channels, few positions: the Gram form on unfolded patches.
    if isinstance(module, nn.Conv1d):  # treat as a 2-D conv of height 1
        a, g = a.unsqueeze(2), g.unsqueeze(2)
        kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
        pad, stride = (0, *padding), (1, *module.stride)
    else:
        kernel, dilation, pad, stride = module.kernel_size, module.dilation, padding, module.stride
    cols = F.unfold(a, kernel, dilation=dilation, padding=pad, stride=stride)  # (B, C·k, T)
    bg = b * groups
    out["weight"] = (
        _outer_sq_norm(
            cols.reshape(bg, fan_in, positions).transpose(1, 2),  # (B·G, T, I)
            g.reshape(bg, fan_out, positions).transpose(1, 2),  # (B·G, T, O)
        )
        .reshape(b, groups)
        .sum(dim=1)
    )
    return out


_CONV_WEIGHT = {nn.Conv1d: conv_grad.conv1d_weight, nn.Conv2d: conv_grad.conv2d_weight}


def _embedding(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor] | None:
    assert isinstance(module, nn.Embedding)
    if module.scale_grad_by_freq:
        return None
    dt = torch.float64 if g.dtype == torch.float64 else torch.float32
    b = a.shape[0]
    idx = a.reshape(b, -1)  # (B, T)
    g2 = g.reshape(b, idx.shape[1], -1).to(dt)  # (B, T, D)
    if module.padding_idx is not None:  # no gradient flows to the padding row
        g2 = g2 * (idx != module.padding_idx).unsqueeze(2).to(dt)
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(dt)  # (B, T, T)
    return {"weight": (same * torch.bmm(g2, g2.transpose(1, 2))).sum(dim=(1, 2))}


def _affine(
    module: nn.Module, xhat: Tensor, g: Tensor, channel_dims: tuple[int, ...]
) -> dict[str, Tensor]:
    """Affine-parameter norms: sum ``g ∘ x̂`` and ``g`` over every dim but batch and channels."""
    reduce = tuple(d for d in range(1, g.dim()) if d not in channel_dims)
    out = {}
    if getattr(module, "weight", None) is not None:
        prod = g * xhat
        out["weight"] = _sq(prod.sum(dim=reduce) if reduce else prod)
    if getattr(module, "bias", None) is not None:
        out["bias"] = _sq(g.sum(dim=reduce) if reduce else g)
    return out


def _layer_norm(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor] | None:
    assert isinstance(module, nn.LayerNorm)
    dt = _math_dtype(a)
    x, g = a.to(dt), g.to(dt)
    # x̂ from the library's own kernel (no affine): several times faster than var_mean
    xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    dims = tuple(range(x.dim() - len(module.normalized_shape), x.dim()))
    return _affine(module, xhat, g, channel_dims=dims)


def _group_norm(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor] | None:
    assert isinstance(module, nn.GroupNorm)
    dt = _math_dtype(a)
    x, g = a.to(dt), g.to(dt)
    xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
    return _affine(module, xhat, g, channel_dims=(1,))


def _batch_norm(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor] | None:
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    if module.training or module.running_mean is None or module.running_var is None:
        raise BatchCoupledError(module)
    dt = _math_dtype(a)
    x, g = a.to(dt), g.to(dt)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xhat = (x - module.running_mean.to(dt).reshape(shape)) * torch.rsqrt(
        module.running_var.to(dt).reshape(shape) + module.eps
    )
    return _affine(module, xhat, g, channel_dims=(1,))


class BatchCoupledError(RuntimeError):
    """A layer mixes the examples of a batch (BatchNorm with batch statistics): no example has a
    gradient of its own."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(
            f"{type(module).__name__} uses batch statistics (train mode, or "
            "track_running_stats=False), so an example's gradient depends on the rest of its "
            "batch and GraNd is undefined. Score in eval mode (the default; GraNd(..., "
            "mode='eval')), or use GroupNorm/LayerNorm in the model."
        )


register_rule(nn.Linear, _linear)
register_rule(nn.modules.linear.NonDynamicallyQuantizableLinear, _linear)
register_rule(nn.Conv1d, _conv)
register_rule(nn.Conv2d, _conv)
register_rule(nn.Embedding, _embedding)
register_rule(nn.LayerNorm, _layer_norm)
register_rule(nn.GroupNorm, _group_norm)
register_rule(nn.BatchNorm1d, _batch_norm)
register_rule(nn.BatchNorm2d, _batch_norm)
register_rule(nn.BatchNorm3d, _batch_norm)
