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

Preconditions, common to every rule: **axis 0 of ``a`` and of ``g`` is the batch, and row block
``b`` (``a[b]``, ``g[b]``) is example ``b`` and nothing else**; every other axis is summed over
as positions (sequence, spatial) or channels. The layer ran once in the forward, and its
parameters are its own (registered on it, used only by its call). A rule cannot check these
itself — ``a`` of shape ``(T, B, D)`` with ``T == B`` looks like a batch — so the hook engine
checks them (shape checks on every call, a cached probe per input signature; see
:mod:`sampleweights.pergrad.hooks`) and sends any layer that fails to the exact fallback. A rule
returns ``{param_name: (B,) tensor}`` for the parameter names of the layer it knows; a parameter
it does not name (``weight_g`` of ``weight_norm``) is not covered by it.

Rules compute in fp32 (fp64 for fp64 inputs). A rule returns ``None`` when a configuration of a
supported type is not covered (e.g. a Conv with ``padding_mode="reflect"``): the parameters then
go to the exact fallback — never silently skipped.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TypeVar, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import grad as conv_grad

__all__ = ["Rule", "find_rule", "register_rule", "registered_rule"]

#: ``rule(module, a, g) -> {param_name: (B,) squared norms}`` or ``None`` (not covered).
Rule = Callable[[nn.Module, Tensor, Tensor], "dict[str, Tensor] | None"]

_RULES: dict[type[nn.Module], Rule] = {}


_R = TypeVar("_R", bound=Rule)


@overload
def register_rule(
    module_type: type[nn.Module], rule: None = None, *, replace: bool = False
) -> Callable[[_R], _R]: ...


@overload
def register_rule(module_type: type[nn.Module], rule: Rule, *, replace: bool = False) -> None: ...


def register_rule(
    module_type: type[nn.Module], rule: Rule | None = None, *, replace: bool = False
) -> Callable[[_R], _R] | None:
    """Register the rule for ``module_type`` (exact type; subclasses are not matched).

    ``register_rule(MyLayer, rule)`` registers at once; ``@register_rule(MyLayer)`` decorates the
    rule function (and returns it unchanged). A rule must honour the preconditions in this
    module's docstring: axis 0 of its input and output gradient is the batch, row ``b`` is
    example ``b``; it returns ``{param_name: (B,) squared norms}``, or ``None`` for a
    configuration it does not cover.

    Raises:
        TypeError: ``module_type`` is not an ``nn.Module`` subclass, or ``rule`` is not callable.
        ValueError: a rule for that type exists and ``replace`` is False (no silent overwrite).

    Example:
        >>> from torch import nn
        >>> class Scale(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.s = nn.Parameter(torch.ones(()))
        ...     def forward(self, x):
        ...         return self.s * x
        >>> @register_rule(Scale)
        ... def scale_rule(module, a, g):  # ∂loss_b/∂s = Σ a_b ∘ g_b
        ...     return {"s": (a * g).reshape(a.shape[0], -1).sum(1).float().square()}
        >>> find_rule(Scale()) is scale_rule
        True
        >>> del _RULES[Scale]  # (a test would use registered_rule instead)
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(
            f"Expected `module_type` to be an nn.Module subclass, but got {module_type!r}."
        )
    if rule is not None and not callable(rule):
        raise TypeError(
            f"Expected `rule` to be callable rule(module, a, g), but got {type(rule).__name__}."
        )
    if module_type in _RULES and not replace:
        raise ValueError(
            f"A per-example norm rule for {module_type.__name__} is already registered; pass "
            "replace=True to override it."
        )
    if rule is None:

        def decorate(fn: _R) -> _R:
            register_rule(module_type, fn, replace=replace)
            return fn

        return decorate
    _RULES[module_type] = rule
    return None


@contextlib.contextmanager
def registered_rule(module_type: type[nn.Module], rule: Rule) -> Iterator[None]:
    """Use ``rule`` for ``module_type`` inside a ``with`` block, then restore what was there.

    For tests and experiments: it replaces an existing rule for the block, and removes or
    restores it on exit (also on an exception), so no global registry is left patched.

    Example:
        >>> from torch import nn
        >>> def no_cover(module, a, g):
        ...     return None  # send every nn.Linear to the exact fallback
        >>> with registered_rule(nn.Linear, no_cover):
        ...     find_rule(nn.Linear(2, 2)) is no_cover
        True
        >>> find_rule(nn.Linear(2, 2)) is no_cover
        False
    """
    previous = _RULES.get(module_type)
    register_rule(module_type, rule, replace=True)
    try:
        yield
    finally:
        if previous is None:
            _RULES.pop(module_type, None)
        else:
            _RULES[module_type] = previous


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
    """Linear. ``a`` ``(B, *, I)``, ``g`` ``(B, *, O)``: axis 0 is the batch, row ``b`` is
    example ``b``; the middle axes (if any) are positions of that example."""
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
    """Conv1d/Conv2d. ``a`` ``(B, C_in, *spatial)``, ``g`` ``(B, C_out, *spatial')``: a batched
    call, axis 0 the batch, row ``b`` example ``b``; zero padding only (else ``None``)."""
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    if a.dim() != (3 if isinstance(module, nn.Conv1d) else 4):
        return None  # an unbatched call (C, L) / (C, H, W): axis 0 is not the batch
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
    cols = patches(a, kernel, dilation, pad, stride)  # (B, C·k, T)
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


def patches(
    a: Tensor,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[int, ...],
    stride: tuple[int, ...],
) -> Tensor:
    """``F.unfold(a, kernel, dilation, padding, stride)`` for ``a`` (B, C, H, W): the same values
    in the same layout (B, C·kh·kw, L). Off the CPU as one zero-pad and one strided copy of the
    whole batch (:func:`_strided_patches`): ``F.unfold`` on CUDA runs one im2col kernel per
    example, so a batch of 128 cost 128 launches per convolution. On the CPU ``F.unfold``, which
    was as fast or faster there."""
    if a.device.type == "cpu":
        return F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)
    return _strided_patches(a, kernel, dilation, padding, stride)


def _strided_patches(
    a: Tensor,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[int, ...],
    stride: tuple[int, ...],
) -> Tensor:
    """:func:`patches` for the whole batch at once: zero-pad, take every stride-th window of the
    dilated kernel's extent, keep its taps, one copy into ``F.unfold``'s layout."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel, dilation, padding, stride
    b, c = a.shape[:2]
    x = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    # windows of the dilated kernel's extent, every stride-th position: (B, C, oh, ow, eh, ew)
    x = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    x = x[..., ::dh, ::dw]  # the kernel's taps: (B, C, oh, ow, kh, kw)
    oh, ow = x.shape[2:4]
    return x.permute(0, 1, 4, 5, 2, 3).reshape(b, c * kh * kw, oh * ow)


def _embedding(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor] | None:
    """Embedding. Indices ``a`` ``(B, *)``, ``g`` ``(B, *, D)``: axis 0 the batch, row ``b``
    example ``b``; no ``scale_grad_by_freq`` (else ``None``)."""
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
    """LayerNorm. ``a``, ``g`` ``(B, *, *normalized_shape)``: axis 0 the batch, row ``b``
    example ``b``; the axes between are positions of that example."""
    assert isinstance(module, nn.LayerNorm)
    dt = _math_dtype(a)
    x, g = a.to(dt), g.to(dt)
    # x̂ from the library's own kernel (no affine): several times faster than var_mean
    xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    dims = tuple(range(x.dim() - len(module.normalized_shape), x.dim()))
    return _affine(module, xhat, g, channel_dims=dims)


def _group_norm(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor] | None:
    """GroupNorm. ``a``, ``g`` ``(B, C, *)``: axis 0 the batch, row ``b`` example ``b``."""
    assert isinstance(module, nn.GroupNorm)
    dt = _math_dtype(a)
    x, g = a.to(dt), g.to(dt)
    xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
    return _affine(module, xhat, g, channel_dims=(1,))


def _batch_norm(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor] | None:
    """BatchNorm in eval mode (running statistics). ``a``, ``g`` ``(B, C, *)``: axis 0 the
    batch, row ``b`` example ``b``. Batch statistics couple the examples: an error."""
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
