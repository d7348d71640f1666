"""The ``hooks`` engine: per-example squared gradient norms from one forward and one backward.

Forward hooks keep each covered layer's input and put a *tensor* hook on its output (not
``register_full_backward_hook``, which breaks on an in-place ReLU after the layer; a tensor hook
registered before an in-place op receives the gradient of the value before it). One
``autograd.grad`` of the summed per-example losses is taken with respect to the covered layers'
outputs, so no weight gradient is ever computed, and the per-layer rules (``rules.py``) turn
``(input, output gradient)`` into per-example squared norms.

**When a rule is trusted.** A rule is exact only if row ``b`` of the layer's input (and of its
output gradient) is example ``b`` of the batch, in order, one row block per example. That is
*not* true of a sequence-first layer (``(T, B, …)``: PyTorch's default
``nn.TransformerEncoderLayer``), of an input shared by the whole batch (Hugging Face builds
``position_ids`` of batch 1), of a layer fed a reordered batch (sort by length, then restore), a
routed subset (mixture of experts) or a flattened ``(B·T, …)`` view. A layer's parameters are
scored by its rule only when every one of these checks holds, and otherwise go to the exact
fallback (:func:`~sampleweights.pergrad.exact_sq_norms`) — or, with ``strict=True``
(``GraNd(engine="hooks")``), raise an :class:`UnsupportedLayerError` that says, for each
parameter, which check failed:

1. *Plan* (every call). The parameter belongs to exactly one module (no tied weights), and a
   rule is registered for that module's exact type; the parameter has no tensor hook of its own
   (``p.register_hook`` changes the gradient autograd gives it); no global forward hook is
   registered (``register_module_forward_hook`` runs before the module's own hooks and could
   change the output the rule sees).
2. *Call* (every call). The module ran exactly once, with its input as the first positional
   argument; its output is a tensor that requires grad; the parameter has exactly one use in the
   autograd graph of the loss and that use is the module's call (the output's gradient
   arrived); the input was not changed in place afterwards; no other tensor hook was put on the
   output (``out.register_hook(lambda g: 3 * g)`` in ``forward`` or in a forward hook would run
   after the engine's and change the gradient the parameters receive). The engine's forward hook
   is registered with ``prepend=True``, so a user's forward hook that replaces the output
   (adapters, steering vectors) does not change what the rule differentiates against.
3. *Shapes* (every call). Input, output and output gradient have leading dimension ``B`` (the
   number of targets); the rule returns exactly ``(B,)`` for every parameter it is given (a
   parameter the rule does not know, e.g. ``weight_g`` of ``weight_norm``, is not covered). This
   catches a broadcast batch-1 input, a routed subset, a flattened view and a sequence-first
   layout with ``T ≠ B``.
4. *Probe* (once per model and input signature, ``B ≥ 2``). Shape checks cannot see a
   sequence-first layout with ``T == B``, nor a batch permuted inside ``forward``. On the first
   batch of each signature — the shapes, dtypes and devices of the batch's tensor leaves, ``B``,
   the scored parameters, the ``forward`` function (code, closure and default arguments), the
   rules, and the model's state: every module (a submodule swapped in), its forward hooks and
   pre-hooks (one added after the probe that reorders a block's input), an instance ``forward``,
   its public ``bool``/``str``/``None``/enum attributes (``self.reverse = True``), and the global
   forward pre-hooks — the engine
   runs its capture twice more: on the batch rolled by one example (every tensor leaf whose
   leading dimension is ``B``, and the targets), where each layer's per-example values must roll
   with it; and on the first ``⌈B/2⌉`` examples alone, where they must equal the first
   ``⌈B/2⌉`` values of the full batch. Equivariance under the roll rejects layers whose values
   do not follow the examples (a sequence-first Gram form is invariant; sort-then-restore
   yields unrolled values); the sub-batch rejects a fixed internal permutation (roll-equivariant
   permutations are the cyclic shifts, which the sub-batch tells apart) and a ``T == B`` layout
   (its row count stays ``T``). Values must agree to a relative ``1e-7`` (fp64 layer outputs),
   ``1e-2`` (fp32 on GPUs, allowing for TF32 convolutions; ``1e-4`` on the CPU) or ``5e-2``
   (fp16/bf16). A layer
   whose values are all equal across the batch (duplicated examples) cannot be judged: it goes
   to the fallback for that call and is probed again on the next batch, up to three times. A
   random forward (dropout in train mode) fails the probe: its layers go to the fallback. The
   verdicts are cached per model (weakly) and signature; layers that failed go to the fallback
   for that signature. With ``B == 1`` nothing is probed: a single row block is the example
   whatever the layout, so the rule, which sums over every other dimension, gives its exact norm
   once the shape checks pass.

Guarantee: for a given signature, a rule's value is used only where the layer's rows were the
examples in order on the probed batches and the per-call checks hold on this one. Not
guaranteed: a reordering that keeps all ``B`` rows and happens on some batches but not on the
probed one — data-dependent (sorting by a length that was equal across the probed batch), or
driven by state the signature leaves out: a numeric attribute (a call counter; numbers are left
out or every call would be a new signature), a global variable or an object the ``forward``
reads (the per-call shape check does catch routing that changes row counts). Also not seen: a
hook on the output's autograd node (``out.grad_fn.register_prehook``), which PyTorch does not
list.
Cost: the first batch of each signature runs about 2.5 forward+backward passes instead of one
(docs/performance.md measures it); later batches pay only the checks.
"""

from __future__ import annotations

import contextlib
import enum
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from sampleweights.pergrad.exact import exact_sq_norms
from sampleweights.pergrad.rules import Rule, find_rule
from sampleweights.pergrad.vmap import LossFn, _describe, _graph_nodes

__all__ = ["UnsupportedLayerError", "hooks_sq_norms"]

_PROBE_TRIES = 3  # inconclusive probes (all values equal) before a layer is sent to the fallback
# relative agreement the probe asks of per-example values; fp32 allows for TF32 convolutions
# (cuDNN's default on recent GPUs), whose algorithm may differ between batch sizes
_RTOL = {torch.float64: 1e-7, torch.float32: 1e-2}  # fp16/bf16 and others: 5e-2


class UnsupportedLayerError(TypeError):
    """``engine="hooks"`` met parameters that no per-layer rule covers exactly."""


@dataclass
class _Capture:
    name: str
    module: nn.Module
    rule: Rule
    params: dict[str, nn.Parameter]  # local name → parameter, only those in scope
    batch_size: int
    calls: int = 0
    inputs: Tensor | None = None
    input_version: int = 0
    output_dtype: torch.dtype = torch.float32  # sets the probe's tolerance
    output: Tensor | None = None
    output_version: int = 0
    output_hooks: Any = None  # the output's tensor-hook dict, to see hooks added after ours
    active: bool = False  # set once the capture is known valid; its grad hook then applies the rule
    reached: bool = False  # the output's gradient arrived
    reason: str | None = None  # why the rule cannot be used for this call (all parameters)
    norms: dict[str, Tensor] = field(default_factory=dict)  # local name → (B,) accepted values
    param_reasons: dict[str, str] = field(default_factory=dict)  # local name → why not
    handles: list[Any] = field(default_factory=list)

    def fresh(self, batch_size: int) -> _Capture:
        return _Capture(self.name, self.module, self.rule, self.params, batch_size)

    def reject(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason


@dataclass
class _Verdicts:
    """Probe results for one (model, signature): capture name → None (verified) or a reason."""

    decided: dict[str, str | None] = field(default_factory=dict)
    inconclusive: dict[str, int] = field(default_factory=dict)


_PROBED: weakref.WeakKeyDictionary[nn.Module, dict[Any, _Verdicts]] = weakref.WeakKeyDictionary()


def _plan(
    model: nn.Module, names: list[str], batch_size: int
) -> tuple[list[_Capture], dict[int, str], dict[str, str]]:
    """Modules with a rule that own scoped parameters, the scoped parameters by id, and the
    reason each scoped parameter that no capture holds is not covered."""
    scope = set(names)
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    by_id = {id(p): n for n, p in model.named_parameters() if n in scope}
    captures: list[_Capture] = []
    reasons: dict[str, str] = {}
    global_hooks = bool(nn.modules.module._global_forward_hooks)
    for mname, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) in by_id]
        if not own:
            continue
        rule = find_rule(module)
        local: dict[str, nn.Parameter] = {}
        for n, p in own:
            if owners[id(p)] > 1:
                reasons[by_id[id(p)]] = "shared with another module (tied weights)"
            elif rule is None:
                reasons[by_id[id(p)]] = _no_rule_reason(module)
            elif p._backward_hooks:
                reasons[by_id[id(p)]] = (
                    "a hook on the parameter (register_hook) changes its gradient, and the rule "
                    "computes the gradient the hook would receive"
                )
            elif global_hooks:
                reasons[by_id[id(p)]] = (
                    "a global forward hook is registered (register_module_forward_hook); it runs "
                    "before the layer's own hooks and may change the output the rule would see"
                )
            else:
                local[n] = p
        if local and rule is not None:
            captures.append(_Capture(mname, module, rule, local, batch_size))
    return captures, by_id, reasons


def _no_rule_reason(module: nn.Module) -> str:
    kind = type(module).__name__
    if kind == "ParametrizationList" or hasattr(module, "parametrizations"):
        return (
            f"a parametrized tensor of {kind} (torch.nn.utils.parametrize): the layer's weight is "
            "computed from it, and no rule covers that"
        )
    return (
        f"no per-layer rule for {kind} (rules match the exact type, not subclasses; "
        "register one with sampleweights.pergrad.register_rule)"
    )


def _graph_uses(root: Any, wanted: set[int]) -> dict[int, int]:
    """How many edges of the autograd graph below ``root`` lead to each wanted parameter."""
    uses = dict.fromkeys(wanted, 0)
    for node in _graph_nodes(root):
        for child, _ in node.next_functions:
            variable = getattr(child, "variable", None)
            if variable is not None and id(variable) in uses:
                uses[id(variable)] += 1
    return uses


def _forward_hook(capture: _Capture) -> Callable[..., None]:
    b = capture.batch_size

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        capture.calls += 1
        if capture.calls > 1:
            capture.reason = (
                f"the module ran {capture.calls} times in one forward (a rule needs one)"
            )
            capture.inputs, capture.output = None, None
            return
        if not args or not isinstance(args[0], Tensor):
            capture.reject(
                "the module was called without a tensor as first positional argument (keyword "
                "arguments?); the rule needs the input it was called with"
            )
            return
        if not isinstance(output, Tensor):
            capture.reject(f"the module returned a {type(output).__name__}, not a tensor")
            return
        if not output.requires_grad:
            capture.reject(
                "the module's output does not require grad (called under torch.no_grad or "
                "torch.inference_mode?)"
            )
            return
        a = args[0]
        if a.dim() == 0 or a.shape[0] != b or output.dim() == 0 or output.shape[0] != b:
            capture.reject(
                f"its input {tuple(a.shape)} / output {tuple(output.shape)} do not have the "
                f"batch size {b} as leading dimension (an input broadcast over the batch, a "
                "routed subset of the examples, a flattened (B·T, …) view, or a "
                "sequence-first (T, B, …) layout)"
            )
            return
        capture.inputs = a.detach()
        capture.input_version = a._version
        capture.output_dtype = output.dtype
        capture.output = output
        capture.output_version = output._version

        def grad_hook(grad: Tensor) -> None:
            # apply the rule as soon as the gradient arrives and let go of the input: memory
            # stays near a plain backward's instead of holding every layer's (input, grad)
            if capture.active and capture.inputs is not None:
                capture.reached = True
                inputs, capture.inputs = capture.inputs, None
                if inputs._version != capture.input_version:
                    # changed in place after the layer read it: the rule would see the wrong
                    # activations
                    capture.reject("its input was changed in place after the module read it")
                    return
                _apply_rule(capture, inputs, grad)

        capture.handles.append(output.register_hook(grad_hook))  # type: ignore[no-untyped-call]
        # the dict of this version of the output: hooks registered after ours (in forward, or by
        # a user's forward hook) land in it, even if the output is then changed in place
        capture.output_hooks = output._backward_hooks

    return hook


def _apply_rule(capture: _Capture, inputs: Tensor, grad: Tensor) -> None:
    b = capture.batch_size
    if grad.dim() == 0 or grad.shape[0] != b:
        capture.reject(f"its output gradient {tuple(grad.shape)} does not lead with batch {b}")
        return
    norms = capture.rule(capture.module, inputs, grad)
    if norms is None:
        capture.reject(
            f"the {type(capture.module).__name__} rule does not cover this configuration"
        )
        return
    for local in capture.params:
        value = norms.get(local)
        if value is None:
            capture.param_reasons[local] = (
                f"the {type(capture.module).__name__} rule gives no value for {local!r} (the "
                "layer's weight is computed from other parameters, e.g. by weight_norm)"
            )
        elif tuple(value.shape) != (b,):
            capture.param_reasons[local] = (
                f"the rule returned shape {tuple(value.shape)} for {local!r}, not ({b},)"
            )
        else:
            capture.norms[local] = value


@contextlib.contextmanager
def _hooked(captures: list[_Capture]) -> Iterator[None]:
    try:
        for c in captures:
            # prepend: run before any user forward hook, which may replace the output
            c.handles.append(c.module.register_forward_hook(_forward_hook(c), prepend=True))
        yield
    finally:
        for c in captures:
            for h in c.handles:
                h.remove()
            c.handles.clear()


def _capture_pass(
    model: nn.Module,
    captures: list[_Capture],
    batch: Any,
    targets: Tensor,
    forward: Callable[[nn.Module, Any], Any],
    loss_fn: LossFn,
) -> Tensor:
    """One forward and one backward to the captured outputs; fills each capture's ``norms`` or
    ``reason``. Returns the per-example losses (detached)."""
    with _hooked(captures), torch.enable_grad():
        logits = forward(model, batch)
        losses = loss_fn(logits, targets)  # (B,)
        total = losses.sum()
        uses = _graph_uses(total.grad_fn, {id(p) for c in captures for p in c.params.values()})
        # outputs modified in place after the layer (an in-place ReLU) cannot be differentiated
        # against; one of the layer's parameters makes the backward reach it, and its tensor
        # hook (registered before the in-place op) receives the right gradient
        wrt: list[Tensor] = []
        for c in captures:
            if c.calls == 0:
                c.reject("the module was not called in the forward")
            elif c.output_hooks is not None and len(c.output_hooks) > 1:
                # they run after the engine's and change the gradient the parameters receive
                c.reject(
                    "a tensor hook on its output (register_hook) may change the gradient after "
                    "the engine reads it"
                )
            for local, p in c.params.items():
                n = uses[id(p)]
                if n != 1 and c.reason is None:
                    c.param_reasons[local] = (
                        f"{local!r} does not reach the loss's autograd graph"
                        if n == 0
                        else f"{local!r} has {n} uses in the autograd graph (also used outside "
                        "the module's own call, e.g. functionally)"
                    )
            if c.reason is not None or c.output is None or len(c.param_reasons) == len(c.params):
                c.inputs = None
            else:
                c.active = True
                unchanged = c.output._version == c.output_version
                usable = [p for n, p in c.params.items() if n not in c.param_reasons]
                wrt.append(c.output if unchanged else usable[0])
            c.output = None  # ``wrt`` keeps what autograd needs; drop the rest
        if wrt:
            torch.autograd.grad(total, wrt, allow_unused=True)
        del wrt
    for c in captures:
        c.inputs = None
        if c.active and not c.reached:
            # the parameter reached the loss (one use) but the module's output did not: its use
            # is elsewhere, so the module's (input, gradient) says nothing about it
            c.reject("the module's output does not reach the loss, though its parameter does")
        if c.reason is not None:
            c.norms.clear()
    return losses.detach()


def _signature(
    model: nn.Module,
    names: list[str],
    batch: Any,
    b: int,
    forward: Callable[[nn.Module, Any], Any],
    captures: list[_Capture],
) -> Any:
    """What the probe's verdicts depend on: batch leaves' shapes, forward, rules, the model's
    modules, hooks and flags."""
    code = getattr(forward, "__code__", None)
    if code is not None:
        cells = []
        for cell in getattr(forward, "__closure__", None) or ():
            try:
                cells.append(id(cell.cell_contents))
            except ValueError:  # an empty cell
                cells.append(0)
        # default arguments too: ``lambda m, b, flag=flag: m(b, flag)``
        defaults = tuple(map(id, getattr(forward, "__defaults__", None) or ()))
        kwdefaults = getattr(forward, "__kwdefaults__", None) or {}
        fwd: Any = (code, tuple(cells), defaults, tuple((k, id(v)) for k, v in kwdefaults.items()))
    else:
        try:
            hash(forward)
            fwd = forward
        except TypeError:
            fwd = id(forward)
    layers = tuple((c.name, c.rule) for c in captures)
    return (b, tuple(names), _structure(batch), fwd, layers, _model_state(model))


def _model_state(model: nn.Module) -> Any:
    """What of the model, besides its parameters' values, may change how ``forward`` routes the
    rows: every module (identity and type: a submodule swapped in), its forward hooks and
    pre-hooks (one that reorders its input, added after the probe), an instance ``forward``
    (monkeypatched), its public flags (``bool``, ``str``, ``None`` or enum attributes:
    ``self.reverse = True``; counters and other numbers are left out, or every call would be a new
    signature), and the global forward pre-hooks."""
    state = []
    for m in model.modules():
        attrs = m.__dict__
        flags = [(k, v) for k, v in attrs.items() if _is_flag(v) and k[0] != "_"]
        state.append(
            (
                id(m),
                type(m),
                tuple(m._forward_hooks),
                tuple(m._forward_pre_hooks),
                id(attrs.get("forward")),
                tuple(flags),
            )
        )
    pre = tuple(nn.modules.module._global_forward_pre_hooks)
    return (pre, tuple(state))


_FLAG_TYPES = frozenset({bool, str, type(None)})


def _is_flag(v: Any) -> bool:
    return type(v) in _FLAG_TYPES or isinstance(v, enum.Enum)


def _structure(batch: Any) -> Any:
    """A hashable summary of a batch: containers, and each tensor leaf's shape, dtype, device
    (other leaves by value when a number or None, else by type). Cheaper than a pytree
    flatten."""
    if isinstance(batch, Tensor):
        return (tuple(batch.shape), batch.dtype, batch.device)
    if isinstance(batch, tuple | list):
        return (type(batch), tuple(_structure(v) for v in batch))
    if isinstance(batch, Mapping):
        return (type(batch), tuple((k, _structure(v)) for k, v in batch.items()))
    if isinstance(batch, int | float | bool | type(None)):
        return batch
    return type(batch)  # strings (per-example text) by type, or every batch would be new


def _rows(batch: Any, b: int, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor leaf of ``batch`` whose leading dimension is the batch."""
    return tree_map(
        lambda t: fn(t) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == b else t,
        batch,
    )


def _close(x: Tensor, ref: Tensor, scale: Tensor, rtol: float) -> bool:
    return bool(((x - ref).abs() <= rtol * (ref.abs() + 1e-2 * scale)).all())


def _probe(
    model: nn.Module,
    captures: list[_Capture],
    batch: Any,
    targets: Tensor,
    forward: Callable[[nn.Module, Any], Any],
    loss_fn: LossFn,
    verdicts: _Verdicts,
) -> None:
    """Judge each (valid, not yet judged) capture's rows against the examples; see the module
    docstring. Records verdicts; rejects failing captures for this call."""
    b = targets.shape[0]
    h = (b + 1) // 2
    rolled = [c.fresh(b) for c in captures]
    halved = [c.fresh(h) for c in captures]
    with torch.no_grad():
        rolled_batch = _rows(batch, b, lambda t: t.roll(1, 0))
        half_batch = _rows(batch, b, lambda t: t[:h])
    try:
        _capture_pass(model, rolled, rolled_batch, targets.roll(1, 0), forward, loss_fn)
        _capture_pass(model, halved, half_batch, targets[:h], forward, loss_fn)
    except Exception as err:  # a model that cannot take the probe batches: not verified
        for c in captures:
            _decide(
                c,
                verdicts,
                f"the probe could not run the model on a rolled batch or on a "
                f"sub-batch ({type(err).__name__}: {err})",
            )
        return
    for c, r, s in zip(captures, rolled, halved, strict=True):
        if r.reason is not None:
            _decide(c, verdicts, f"on the batch rolled by one example, {r.reason}")
            continue
        rtol = _RTOL.get(c.output_dtype, 5e-2)
        if c.output_dtype == torch.float32 and targets.device.type == "cpu":
            rtol = 1e-4  # no TF32 on the CPU: fp32 kernels agree far closer than 1e-2
        informative, failed = False, None
        for local, v in c.norms.items():
            if local not in r.norms:
                failed = "on the batch rolled by one example, the rule gave no value"
                break
            scale = v.abs().max()
            expected = v.roll(1, 0)
            if not _close(v, expected, scale, rtol):
                informative = True
                if not _close(r.norms[local], expected, scale, rtol):
                    failed = (
                        "its per-example values did not move with the examples when the batch "
                        "was rolled (its rows are not the batch's examples in order: a "
                        "sequence-first layout, a reordering inside forward, or a random "
                        "forward such as dropout in train mode)"
                    )
                    break
        if failed is None and s.reason is not None:
            failed = f"on its first {h} examples alone, {s.reason}"
        for local, v in c.norms.items():
            if failed is not None:
                break
            if local not in s.norms or not _close(s.norms[local], v[:h], v.abs().max(), rtol):
                failed = (
                    f"its values on the first {h} examples alone differ from theirs in the full "
                    "batch (its rows are not one block per example, in order)"
                )
        if failed is not None:
            _decide(c, verdicts, failed)
        elif informative:
            _decide(c, verdicts, None)
        else:
            tries = verdicts.inconclusive.get(c.name, 0) + 1
            verdicts.inconclusive[c.name] = tries
            reason = (
                "the probe could not tell whether its rows are the examples (its per-example "
                "values were equal across the batch)"
            )
            if tries >= _PROBE_TRIES:
                _decide(c, verdicts, reason)
            else:
                c.reject(reason)
                c.norms.clear()


def _decide(capture: _Capture, verdicts: _Verdicts, reason: str | None) -> None:
    verdicts.decided[capture.name] = reason
    if reason is not None:
        capture.reject(reason)
        capture.norms.clear()


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

    Parameters whose layer passes every check in this module's docstring by per-layer formula;
    the rest by :func:`~sampleweights.pergrad.exact_sq_norms` on the same batch (``strict=False``)
    or an :class:`UnsupportedLayerError` naming each and saying why (``strict=True``). The first
    batch of each input signature with ``B ≥ 2`` also runs the probe (two more passes).

    Raises:
        UnsupportedLayerError: ``strict=True`` and some parameters are not covered exactly.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> loss = lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")
        >>> names = [n for n, _ in model.named_parameters()]
        >>> sq = hooks_sq_norms(model, names, torch.randn(5, 3), torch.zeros(5, dtype=torch.long),
        ...                     lambda m, x: m(x), loss, strict=True)
        >>> sq.shape
        torch.Size([5])
    """
    b = targets.shape[0]
    captures, by_id, reasons = _plan(model, names, b)
    verdicts: _Verdicts | None = None
    if b >= 2 and captures:
        key = _signature(model, names, batch, b, forward, captures)
        verdicts = _PROBED.setdefault(model, {}).setdefault(key, _Verdicts())
        for c in captures:
            known = verdicts.decided.get(c.name, None)
            if known is not None:
                c.reject(known)
        captures_run = [c for c in captures if c.reason is None]
    else:
        captures_run = captures
    losses = _capture_pass(model, captures_run, batch, targets, forward, loss_fn)
    if verdicts is not None:
        unjudged = [
            c
            for c in captures_run
            if c.reason is None and c.norms and c.name not in verdicts.decided
        ]
        if unjudged:
            _probe(model, unjudged, batch, targets, forward, loss_fn, verdicts)

    dtype = torch.float64 if losses.dtype == torch.float64 else torch.float32
    sq = torch.zeros(b, dtype=dtype, device=losses.device)
    covered: set[int] = set()
    for c in captures:
        for local, p in c.params.items():
            if c.reason is None and local in c.norms:
                sq += c.norms[local].to(dtype)
                covered.add(id(p))
            else:
                reasons[by_id[id(p)]] = c.reason or c.param_reasons.get(local, "not covered")
        c.norms.clear()  # drop references to results

    rest = [n for i, n in by_id.items() if i not in covered]
    if rest:
        if strict:
            grouped: dict[str, list[str]] = {}
            for n in rest:
                grouped.setdefault(reasons[n], []).append(n)
            raise UnsupportedLayerError(
                "engine='hooks' has no per-layer rule that provably covers these parameters:\n"
                + "\n".join(
                    f"  {_describe(model, ns, limit=None)}: {why}" for why, ns in grouped.items()
                )
                + "\nUse engine='auto' (they go through the exact fallback), or register a rule "
                "with sampleweights.pergrad.register_rule."
            )
        sq += exact_sq_norms(model, rest, batch, targets, forward, loss_fn, chunk_size).to(dtype)
    return sq
