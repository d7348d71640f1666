"""The ``hooks`` engine: per-example squared gradient norms from one forward and one backward.

Forward hooks keep each covered layer's input and put a *tensor* hook on its output (not
``register_full_backward_hook``, which breaks on an in-place ReLU after the layer; a tensor hook
registered before an in-place op receives the gradient of the value before it). One
``autograd.grad`` of the summed per-example losses is taken with respect to the covered layers'
outputs, so no weight gradient is ever computed, and the per-layer rules (``rules.py``) turn
``(input, output gradient)`` into per-example squared norms.

A parameter is *covered* when it belongs to exactly one module with a rule, that module ran
exactly once in the forward, and the parameter has exactly one use in the autograd graph. Tied
weights, modules called twice, and weights used functionally (``nn.MultiheadAttention``'s
projections) fail one of these checks and go to the ``vmap`` engine — or, with ``strict=True``,
raise an error naming them. No parameter is ever skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sampleweights.pergrad.rules import Rule, find_rule
from sampleweights.pergrad.exact import exact_sq_norms
from sampleweights.pergrad.vmap import LossFn

__all__ = ["UnsupportedLayerError", "hooks_sq_norms"]


class UnsupportedLayerError(TypeError):
    """``engine="hooks"`` met parameters that no per-layer rule covers."""


@dataclass
class _Capture:
    name: str
    module: nn.Module
    rule: Rule
    params: dict[str, nn.Parameter]  # local name → parameter, only those in scope
    calls: int = 0
    inputs: Tensor | None = None
    input_version: int = 0
    output: Tensor | None = None
    output_version: int = 0
    active: bool = False  # set once the capture is known valid; its grad hook then applies the rule
    reached: bool = False  # the output's gradient arrived
    norms: dict[str, Tensor] | None = None
    handles: list[Any] = field(default_factory=list)


def _plan(model: nn.Module, names: list[str]) -> tuple[list[_Capture], dict[int, str]]:
    """Modules with a rule that own scoped parameters, and the scoped parameters by id."""
    scope = set(names)
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    by_id = {id(p): n for n, p in model.named_parameters() if n in scope}
    captures = []
    for mname, module in model.named_modules():
        rule = find_rule(module)
        if rule is None:
            continue
        local = {
            n: p
            for n, p in module.named_parameters(recurse=False)
            if id(p) in by_id and owners[id(p)] == 1  # tied parameters go to the fallback
        }
        if local:
            captures.append(_Capture(mname, module, rule, local))
    return captures, by_id


def _graph_uses(root: Any, wanted: dict[int, str]) -> dict[int, int]:
    """How many edges of the autograd graph below ``root`` lead to each wanted parameter."""
    uses = dict.fromkeys(wanted, 0)
    seen: set[Any] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None and id(variable) in uses:
                uses[id(variable)] += 1
            stack.append(child)
    return uses


def _forward_hook(capture: _Capture) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        capture.calls += 1
        if capture.calls > 1 or not args or not isinstance(args[0], Tensor):
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return
        capture.inputs = args[0].detach()
        capture.input_version = args[0]._version
        capture.output = output
        capture.output_version = output._version

        def grad_hook(grad: Tensor) -> None:
            # apply the rule as soon as the gradient arrives and let go of the input: memory
            # stays near a plain backward's instead of holding every layer's (input, grad)
            if capture.active and capture.inputs is not None:
                capture.reached = True
                if capture.inputs._version == capture.input_version:
                    capture.norms = capture.rule(capture.module, capture.inputs, grad)
                # else: the input was changed in place after the layer read it; the rule would
                # see the wrong activations, so the parameters go to the fallback (norms None)
                capture.inputs = None

        capture.handles.append(output.register_hook(grad_hook))  # type: ignore[no-untyped-call]

    return hook


@contextlib.contextmanager
def _hooked(captures: list[_Capture]) -> Iterator[None]:
    try:
        for c in captures:
            c.handles.append(c.module.register_forward_hook(_forward_hook(c)))
        yield
    finally:
        for c in captures:
            for h in c.handles:
                h.remove()
            c.handles.clear()


def hooks_sq_norms(
    model: nn.Module,
    names: list[str],
    batch: Any,
    targets: Tensor,
    forward: Callable[[nn.Module, Any], Any],
    loss_fn: LossFn,
    *,
    strict: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-example squared gradient norms over ``names``: ``(B,)`` fp32 (fp64 for fp64 models).

    Covered parameters by per-layer formula; the rest by :func:`vmap_sq_norms` on the same batch
    (``strict=False``) or an :class:`UnsupportedLayerError` naming them (``strict=True``).
    """
    captures, by_id = _plan(model, names)
    with _hooked(captures), torch.enable_grad():
        logits = forward(model, batch)
        losses = loss_fn(logits, targets)  # (B,)
        total = losses.sum()
        uses = _graph_uses(total.grad_fn, by_id)
        valid = [
            c
            for c in captures
            if c.calls == 1
            and c.output is not None
            and all(uses[id(p)] == 1 for p in c.params.values())
        ]
        # outputs modified in place after the layer (an in-place ReLU) cannot be differentiated
        # against; one of the layer's parameters makes the backward reach it, and its tensor
        # hook (registered before the in-place op) receives the right gradient
        wrt: list[Tensor] = []
        for c in valid:
            assert c.output is not None
            c.active = True
            unchanged = c.output._version == c.output_version
            wrt.append(c.output if unchanged else next(iter(c.params.values())))
        for c in captures:
            c.output = None  # ``wrt`` keeps what autograd needs; drop the rest
        if wrt:
            torch.autograd.grad(total, wrt, allow_unused=True)
        del wrt

    b = targets.shape[0]
    dtype = torch.float64 if losses.dtype == torch.float64 else torch.float32
    sq = torch.zeros(b, dtype=dtype, device=losses.device)
    covered: set[int] = set()
    for c in valid:
        if not c.reached:  # the output did not reach the loss: zero gradient
            covered.update(id(p) for p in c.params.values())
        elif c.norms is not None:  # None: the rule does not cover this configuration
            for local, p in c.params.items():
                sq += c.norms[local].to(dtype)
                covered.add(id(p))
    for c in captures:  # drop references to activations and results
        c.inputs, c.norms = None, None

    rest = [n for i, n in by_id.items() if i not in covered]
    if rest:
        if strict:
            raise UnsupportedLayerError(
                "engine='hooks' has no per-layer rule for these parameters: "
                f"{_describe(model, rest)}. Use engine='auto' (they go through the vmap "
                "engine), or register a rule with sampleweights.pergrad.register_rule."
            )
        sq += exact_sq_norms(model, rest, batch, targets, forward, loss_fn, chunk_size).to(dtype)
    return sq


def _describe(model: nn.Module, names: list[str]) -> str:
    """Parameter names with their owning module's type, for error messages."""
    modules = dict(model.named_modules())
    parts = []
    for n in names:
        owner = n.rsplit(".", 1)[0] if "." in n else ""
        parts.append(f"{n} ({type(modules.get(owner, model)).__name__})")
    return ", ".join(parts)
