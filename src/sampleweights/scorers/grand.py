"""GraNd: the norm of each example's own loss gradient (Paul, Ganguli & Dziugaite, NeurIPS 2021).

``GraNd(x, y) = ‖∇_θ ℓ(f_θ(x), y)‖₂`` over the chosen parameters (all trainable ones by default),
averaged over every update it receives (Data Diet averages 10 initialisations or early
checkpoints). Exact: per-example, not the gradient of a batch mean (which would scale it by 1/B),
and never a silently partial sum over some layers.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sampleweights.data import (
    BatchLayout,
    Forward,
    default_forward,
    logits_of,
    model_device,
    move_to_device,
)
from sampleweights.pergrad import (
    BatchCoupledError,
    LossFn,
    PerExampleGradientError,
    exact_sq_norms,
    hooks_sq_norms,
    loop_sq_norms,
    vmap_sq_norms,
)
from sampleweights.pergrad.exact import _signature
from sampleweights.pergrad.vmap import (
    _first_line,
    _map_tensors,
    _state_restored,
    _tensor_leaves,
    _without_inference_tensors,
)
from sampleweights.scorers.base import NonFinite, RunningMeanScorer
from sampleweights.scorers.passes import model_mode, unwrap_model
from sampleweights.validation import _as_index_array, as_index_tensor

__all__ = ["Engine", "GraNd", "Mode"]

Engine = Literal["auto", "hooks", "vmap", "loop"]
Mode = Literal["eval", "train"]
_ENGINES: tuple[str, ...] = get_args(Engine)
_MODES: tuple[str, ...] = get_args(Mode)


_BATCH_OF_ONE = (
    " This was a batch of one (the exact engines call the model on one example at a time): a "
    "forward that drops the batch dimension (x.squeeze(), out[0]) breaks there; squeeze only "
    "the dimensions meant (x.squeeze(-1))."
)


def cross_entropy_fp32(output: Any, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """The default per-example loss: cross-entropy of the logits in fp32 (or fp64), ``(B,)``.

    fp32 because fp16 gradients of easy examples underflow, and those are the ones pruning removes.
    Sequences (logits ``(B, T, C)``, targets ``(B, T)``): one loss per sequence, the mean of the
    token cross-entropies over its valid tokens (target ``!= ignore_index``); 0 for a sequence
    without one (no gradient; GraNd counts it in ``num_empty`` instead of scoring it).
    """
    logits = logits_of(output)
    if logits.dim() == 3 and targets.dim() == 2:
        if logits.dtype != torch.float64:
            logits = logits.float()
        batch, length, classes = logits.shape
        tokens = F.cross_entropy(
            logits.reshape(batch * length, classes),
            targets.reshape(batch * length),
            ignore_index=ignore_index,
            reduction="none",
        ).view(batch, length)  # 0 at ignored tokens
        count = (targets != ignore_index).sum(dim=1).clamp_min(1)
        return tokens.sum(dim=1) / count
    if logits.dim() != 2:
        raise ValueError(
            f"The default loss expects logits of shape (batch, classes), but the model returned "
            f"shape {tuple(logits.shape)} (sequences: (batch, tokens, classes) with (batch, "
            f"tokens) targets); pass loss_fn=lambda output, target: ... returning (B,)."
            + (_BATCH_OF_ONE if logits.dim() == 1 and targets.shape[0] == 1 else "")
        )
    # (targets ≥ C raise torch's "Target … is out of bounds" here, before any state changes)
    if logits.dtype != torch.float64:
        logits = logits.float()
    return F.cross_entropy(logits, targets, reduction="none")


def _call_with_inputs(model: nn.Module, inputs: Any) -> Any:
    """Default forward of ``update_indexed``: ``model(x)``, ``model(*x)`` or ``model(**x)``."""
    inputs = move_to_device(inputs, model_device(model))
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


class GraNd(RunningMeanScorer):
    """GraNd scores: the running mean of ``‖∇_θ loss(example)‖₂`` per example.

    GraNd takes no logits: ``update(batch)`` runs its own forward and backward on the batch, in
    its ``mode`` (eval by default; each module's flag restored afterwards, also inside
    :func:`~sampleweights.score_dataset`), and leaves the model's ``.grad``, hooks, modes,
    weights and buffers as they were (``nn.Embedding(max_norm=…)`` renormalises rows in place in
    every forward: GraNd scores the gradient at the renormalised rows, as a training step would,
    and puts the weight back; buffers a forward updates, such as a custom running statistic, are
    put back too — after every example in the exact engines, so each example meets the model as
    it was). It runs under ``torch.no_grad()`` and ``torch.inference_mode()`` as well (inference
    tensors in the batch are copied). A forward that changes its input in place (``x.mul_(2)``)
    is scored on the batch as given: ``"auto"`` notices it on the first batch and scores such a
    model with the exact engines, which give every example a copy; ``"hooks"`` refuses it.
    Use :func:`~sampleweights.score_dataset` for the Data Diet flow (score a
    checkpoint or the initialisation; several seeds average in the running mean).

    Engines, one answer:

    * ``"vmap"`` — ``torch.func`` ``vmap(grad)``; general; memory ``chunk_size × parameters``.
      An error (:class:`~sampleweights.pergrad.PerExampleGradientError`) on what ``torch.func``
      cannot transform: ``nn.GRU``/``nn.LSTM``, backward hooks, reentrant checkpointing,
      data-dependent control flow (``F.one_hot``, ``mask.all()`` checks as in Hugging Face
      models), ``nn.Embedding(max_norm=…)``, strings in a dict batch.
    * ``"hooks"`` — per-layer formulas from one backward, never building per-example gradients
      (Linear, Conv1d/2d, Embedding, LayerNorm, GroupNorm, BatchNorm in eval). A layer's rule is
      used only where its rows are provably the batch's examples in order: shape checks on every
      call (input, output, gradient lead with ``B``; rule results are ``(B,)``), and, on the
      first batch of each input signature with ``B ≥ 2``, a probe on the batch rolled by one and
      on its first half (two more passes; cached) that rejects sequence-first ``(T, B, …)``
      layers, batch-1 inputs broadcast over the batch, reorderings inside ``forward``, routed
      subsets and flattened views (see :mod:`sampleweights.pergrad.hooks`). An error, saying
      why for each, for parameters no rule covers that way.
    * ``"loop"`` — plain autograd, one example at a time (a forward and a backward on a batch of
      one per example): slow (tens of times ``vmap`` on small models, see docs/performance.md)
      but fails only where ordinary training would.
    * ``"auto"`` (default) — hooks where a rule covers a parameter, exact for the rest (e.g.
      ``nn.MultiheadAttention``'s projections, tied weights, recurrent layers): ``vmap``, or the
      loop where ``vmap`` fails (a warning says so, once per model and batch structure; ``vmap``
      is not retried on later batches of that structure). Where the hooks pass itself fails
      (reentrant checkpointing refuses its ``autograd.grad``), every parameter goes to the exact
      engines, decided the same way. Exact on every model plain autograd can differentiate.

    **Train mode.** ``mode="train"`` puts every module in train mode for GraNd's pass (BatchNorm
    in train mode is then a :class:`~sampleweights.pergrad.BatchCoupledError`: batch statistics
    couple the examples). With dropout it scores the dropped-out network: each example's gradient
    is taken under its own dropout mask, ``‖∇θ ℓ(f(x_b; θ, m_b), y_b)‖`` with a fresh ``m_b`` per
    example and per update — a random quantity whose running mean over updates also averages the
    masks. The engines draw the masks differently (one batched draw for ``"hooks"``, per-example
    draws for ``"vmap"`` and ``"loop"``; under ``"auto"`` the fallback's parameters see another
    draw than the hooked layers'), so they agree in distribution, not value by value; ``"loop"``
    equals a one-example-at-a-time training-mode backward under the same random state. With
    dropout ``p = 0`` train mode equals eval mode.

    Args:
        model: the model; a DDP/DataParallel wrapper is scored through ``.module`` (no gradient
            sync). Under FSDP score a full, unsharded copy (or summon full parameters); under
            ``torch.compile`` pass the original module (``compiled._orig_mod``).
        num_examples: ``len(dataset)``.
        loss_fn: ``loss_fn(output, targets) -> (B,)`` per-example losses (no mean!); default
            cross-entropy in fp32. A mean-reduced loss would scale every norm by 1/B. The default
            loss requires integer class targets ≥ 0 (checked with ``validate``, since
            cross-entropy silently ignores ``-100``); a custom ``loss_fn`` receives the targets as
            given — any tensor with one row per example (``-100`` ignore labels, float
            regression targets) — and judges them itself.
        engine: ``"auto"``, ``"hooks"``, ``"vmap"`` or ``"loop"``.
        params: the parameters to score: names (as in ``named_parameters()``) or ``Parameter``
            objects; default every parameter with ``requires_grad``. ``params`` of the last
            layer is DeepCore's cheap approximation; it ranks differently from the exact score.
        forward: ``forward(model, batch) -> output``; default as in ``score_dataset``.
        mode: ``"eval"`` (default) or ``"train"``: the mode every module is put in for GraNd's
            own pass (see *Train mode* above); train mode with BatchNorm is an error (batch
            statistics couple the examples: there is no per-example gradient).
        chunk_size: examples per ``vmap`` call (default: ~512 MiB of gradients).
        device, nonfinite, layout, validate, process_group: see :class:`~sampleweights.Scorer`.
        ignore_index: for the default loss on sequences (model output ``(B, T, C)``, targets
            ``(B, T)``): the target of tokens that do not count. Each sequence's loss is the
            mean token cross-entropy over its valid tokens, so GraNd scores the gradient of one
            loss per sequence; a sequence without a valid token has no score for the update
            (``num_empty`` counts it). 1-D class targets must be ``>= 0`` as before.

    State: 12 bytes per example (fp64 sum, int32 count).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> g = GraNd(model, num_examples=10)
        >>> g.update_indexed(torch.tensor([0, 5]), torch.randn(2, 3), torch.tensor([1, 0]))
        >>> scores = g.compute()
        >>> bool(scores[[0, 5]].gt(0).all()), int(scores.isnan().sum())
        (True, 8)
    """

    name = "grand"
    requires_model = True

    def __init__(
        self,
        model: nn.Module,
        num_examples: int,
        loss_fn: LossFn | None = None,
        engine: Engine = "auto",
        *,
        params: Iterable[str | nn.Parameter] | None = None,
        forward: Forward | None = None,
        mode: Mode = "eval",
        chunk_size: int | None = None,
        device: torch.device | str | None = None,
        nonfinite: NonFinite = "raise",
        layout: BatchLayout | None = None,
        validate: bool = True,
        process_group: Any = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__(
            num_examples,
            device=device,
            nonfinite=nonfinite,
            layout=layout,
            validate=validate,
            process_group=process_group,
            ignore_index=ignore_index,
        )
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}."
            )
        if engine not in _ENGINES:
            raise ValueError(f"Expected `engine` in {list(_ENGINES)}, but got {engine!r}.")
        if mode not in _MODES:
            raise ValueError(f"Expected `mode` in {list(_MODES)}, but got {mode!r}.")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"Expected `chunk_size` to be an int ≥ 1 or None, got {chunk_size!r}.")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("Expected `loss_fn` to be callable: loss_fn(output, targets) -> (B,).")
        self.model = unwrap_model(model)
        self.loss_fn: LossFn = loss_fn or _DefaultLoss(self.ignore_index)
        self._class_targets = loss_fn is None  # the default loss takes class indices ≥ 0
        self.engine: Engine = engine
        self.mode: Mode = mode
        self.chunk_size = chunk_size
        self.forward = forward
        self.param_names = self._resolve_params(params)

    def set_model(self, model: nn.Module) -> None:
        """Score later updates with ``model``, keeping the running mean (Data Diet's average over
        seeds: one scorer, a new model per seed). The scored parameter names must exist in it.

        Example:
            >>> import torch
            >>> g = GraNd(torch.nn.Linear(3, 2), num_examples=4)
            >>> for seed in range(2):
            ...     _ = torch.manual_seed(seed)
            ...     g.set_model(torch.nn.Linear(3, 2))
            ...     g.update_indexed(torch.arange(4), torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
            >>> int(g._state["count"][0])
            2
        """
        model = unwrap_model(model)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}."
            )
        named = dict(model.named_parameters())
        missing = [n for n in self.param_names if n not in named]
        if missing:
            raise ValueError(
                f"The new model lacks the scored parameters {missing[:5]}; GraNd.set_model takes "
                "a model of the same architecture."
            )
        self.model = model

    def _resolve_params(self, params: Iterable[str | nn.Parameter] | None) -> list[str]:
        named = dict(self.model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        else:
            by_id = {id(p): n for n, p in named.items()}
            names = []
            for p in params:
                if isinstance(p, str):
                    if p not in named:
                        raise ValueError(
                            f"`params` names {p!r}, which is not a parameter of the model; "
                            f"parameters are e.g. {list(named)[:5]}."
                        )
                    names.append(p)
                elif isinstance(p, nn.Parameter) and id(p) in by_id:
                    names.append(by_id[id(p)])
                else:
                    raise ValueError(
                        "`params` must hold parameter names or Parameters of the model, but got "
                        f"{type(p).__name__} not in the model."
                    )
        if not names:
            raise ValueError("GraNd has no parameters to score (none requires grad); pass params=.")
        return list(dict.fromkeys(names))

    # -- updates ---------------------------------------------------------------------------------
    def update(self, batch: Any, logits: Tensor | None = None) -> None:
        """Score one batch with the model (its own forward and backward; no logits needed).

        Args:
            batch: as a DataLoader over :class:`~sampleweights.WithIndex` yields it.
            logits: must be None; GraNd needs the model, not the logits.
        """
        if logits is not None:
            raise TypeError(
                "GraNd.update(batch) takes no logits: it runs its own forward and backward pass "
                "with the model it was built with."
            )
        self._score_batch(batch, None)

    def update_indexed(self, indices: Any, inputs: Any, targets: Any) -> None:
        """Score examples given explicitly: ``inputs`` as the model takes them (batch first)."""
        forward = self.forward or _call_with_inputs
        self._score(as_index_tensor(indices, "indices"), inputs, targets, forward)

    def _score_batch(self, batch: Any, forward: Forward | None) -> None:
        """One batch of a loader (``score_dataset`` calls this with its own ``forward``)."""
        indices = as_index_tensor(self.layout.indices(batch), "indices")
        forward = forward or self.forward or default_forward(self.layout)
        self._score(indices, batch, self.layout.targets(batch), forward)

    def _check_model(self, model: nn.Module) -> None:
        if unwrap_model(model) is not self.model:
            raise ValueError(
                "This GraNd scorer was built for another model than the one passed to "
                "score_dataset; build it with GraNd(model, len(dataset))."
            )

    def _score(self, indices: Tensor, batch: Any, targets: Any, forward: Forward) -> None:
        targets = _class_targets(targets) if self._class_targets else _as_loss_targets(targets)
        if indices.shape[0] != targets.shape[0]:
            raise ValueError(
                f"Expected one index per target, but got {indices.shape[0]} indices and "
                f"{targets.shape[0]} targets."
            )
        sequence = self._class_targets and targets.dim() == 2
        if self.validate:
            self._check_indices(indices)
            if sequence and bool(((targets < 0) & (targets != self.ignore_index)).any()):
                bad = targets[(targets < 0) & (targets != self.ignore_index)]
                raise ValueError(
                    f"Expected sequence `targets` ≥ 0 (class indices) or equal to "
                    f"ignore_index={self.ignore_index}, but got {bad.numel()} other negative "
                    f"value(s) (min {int(bad.min())}); build GraNd with ignore_index=... if your "
                    "padding label differs."
                )
            if not sequence and self._class_targets and targets.numel() and int(targets.min()) < 0:
                raise ValueError(
                    f"Expected `targets` ≥ 0 (class indices for the default cross-entropy), but "
                    f"got {int(targets.min())}; for ignore labels (-100) or other targets pass "
                    "your own loss_fn, which receives the targets as given."
                )
        sq = self._sq_norms(batch, targets, forward)
        if sq.shape != (indices.shape[0],):
            raise ValueError(
                f"`loss_fn` must return one loss per example, shape ({indices.shape[0]},), but "
                f"GraNd got per-example norms of shape {tuple(sq.shape)}."
            )
        norms = sq.clamp_min(0).sqrt().to(torch.float32)
        finite = torch.isfinite(norms)
        if self.nonfinite == "raise" and not bool(finite.all()):
            raise ValueError(
                "Non-finite gradient norms (NaN/inf in the model's output or loss); build GraNd "
                "with nonfinite='skip' to drop such examples."
            )
        empty = None
        if sequence:  # no valid token: the default loss is 0, but the sequence has no score
            empty = (targets == self.ignore_index).all(dim=1).to(norms.device)
        self._ingest(indices, norms, finite if self.nonfinite == "skip" else None, empty=empty)

    def _sq_norms(self, batch: Any, targets: Tensor, forward: Forward) -> Tensor:
        model = self.model
        device = model_device(model)
        named = dict(model.named_parameters())
        names = self.param_names
        scored = [named[n] for n in names]
        with (
            torch.inference_mode(False),  # GraNd's pass needs autograd, whatever surrounds it
            torch.enable_grad(),
            model_mode(model, train=self.mode == "train"),
            _requiring_grad(scored),
            _state_restored(model),  # buffers a forward updates, Embedding(max_norm) weights
        ):
            batch = _without_inference_tensors(batch)
            targets = _without_inference_tensors(targets).to(device, non_blocking=True)
            _check_batch_coupling(model)
            if targets.shape[0] == 0:  # an empty batch (a pad=False shard's last): nothing to do
                dtype = torch.float64 if scored[0].dtype == torch.float64 else torch.float32
                return torch.zeros(0, dtype=dtype, device=device)
            loss_fn = _checked_loss(self.loss_fn)
            chunk = self.chunk_size
            if self.engine == "vmap":
                return vmap_sq_norms(model, names, batch, targets, forward, loss_fn, chunk)
            if self.engine == "loop":
                return loop_sq_norms(model, names, batch, targets, forward, loss_fn)

            def exact(b: Any) -> Tensor:
                return exact_sq_norms(model, names, b, targets, forward, loss_fn, chunk)

            def hooks(b: Any) -> Tensor:
                args = (model, names, b, targets, forward, loss_fn)
                if self.engine == "auto":
                    return _auto_sq_norms(*args, chunk)
                try:
                    return hooks_sq_norms(*args, strict=True, chunk_size=chunk)
                except RuntimeError as err:
                    if isinstance(err, PerExampleGradientError | BatchCoupledError):
                        raise
                    raise PerExampleGradientError(
                        f"GraNd's hooks engine failed on this {type(model).__name__}: "
                        f"{_first_line(err)}. Use engine='auto' (it falls back to the exact "
                        "engines) or engine='loop'."
                    ) from err

            return _input_checked(
                model, batch, targets.shape[0], hooks, exact if self.engine == "auto" else None
            )

    def _values(self, logits: Tensor, targets: Tensor) -> Tensor:
        raise TypeError("GraNd scores with the model: call update(batch) or update_indexed().")

    def __repr__(self) -> str:
        return (
            f"GraNd(num_examples={self.num_examples}, engine={self.engine!r}, "
            f"params={len(self.param_names)}, num_updates={self.num_updates})"
        )


# model → {(parameters, mode, batch structure): why the hooks pass failed}
_HOOKS_FAILED: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, str]] = (
    weakref.WeakKeyDictionary()
)


# model → {(mode, batch structure): whether its forward changes the batch's tensors in place}
_CHANGES_INPUT: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, bool]] = (
    weakref.WeakKeyDictionary()
)


def _input_checked(
    model: nn.Module,
    batch: Any,
    n: int,
    hooks: Callable[[Any], Tensor],
    exact: Callable[[Any], Tensor] | None,
) -> Tensor:
    """``hooks(batch)``, unless the model's forward changes its input in place (``x.mul_(2)``).

    The hooks pass calls the forward several times on the same batch (probes, the pass, the
    exact engines for what no rule covers), so such a forward would feed the later calls a
    changed batch. On the first batch of each structure the batch is copied and its tensors'
    version counters watched: if the forward changed them, the update is redone from the copy
    by ``exact`` (``engine="auto"``: ``vmap`` and the loop give every example a copy), and so are
    later batches of that structure; ``engine="hooks"`` (``exact`` None) raises instead.
    """
    key = (model.training, _signature(batch, n))
    known = _CHANGES_INPUT.setdefault(model, {})
    changes = known.get(key)
    if changes is True:
        if exact is None:
            raise _changed_input(model)
        return exact(batch)
    if changes is False:
        return hooks(batch)
    leaves = _tensor_leaves(batch)
    versions = [t._version for t in leaves]
    pristine = _map_tensors(batch, lambda t: t.detach().clone())
    try:
        result = hooks(batch)
    except Exception as err:  # a failure the changed input may have caused: say so
        if all(t._version == v for t, v in zip(leaves, versions, strict=True)):
            raise
        known[key] = True
        if exact is None:
            raise _changed_input(model) from err
        return exact(pristine)
    known[key] = changes = any(t._version != v for t, v in zip(leaves, versions, strict=True))
    if not changes:
        return result
    if exact is None:
        raise _changed_input(model)
    warnings.warn(
        f"GraNd: this {type(model).__name__}'s forward changes its input in place; the hooks "
        "engine runs the forward several times on a batch, so it is scored by the exact engines "
        "instead (each example a copy). Decided once for this model and batch structure.",
        UserWarning,
        stacklevel=4,
    )
    return exact(pristine)


def _changed_input(model: nn.Module) -> PerExampleGradientError:
    return PerExampleGradientError(
        f"GraNd's hooks engine cannot score this {type(model).__name__}: its forward changes its "
        "input in place (e.g. x.mul_(2) or x -= mean), and the hooks engine runs the forward "
        "several times on the same batch. Make the change out of place (x = x * 2), or use "
        "engine='auto' or engine='loop' (they give every example a copy)."
    )


def _auto_sq_norms(
    model: nn.Module,
    names: list[str],
    batch: Any,
    targets: Tensor,
    forward: Forward,
    loss_fn: LossFn,
    chunk_size: int | None,
) -> Tensor:
    """``engine="auto"``: the hooks engine with the exact fallback for what it does not cover —
    and, where the hooks pass itself fails with an autograd error (e.g. reentrant checkpointing,
    which refuses ``autograd.grad``), the exact engine for every parameter. That decision is
    remembered per model and batch structure, like the ``vmap`` one."""
    args = (model, names, batch, targets, forward, loss_fn)
    key = (tuple(names), model.training, _signature(batch, targets.shape[0]), targets.dtype)
    failed = _HOOKS_FAILED.get(model)
    if failed is not None and key in failed:
        return exact_sq_norms(*args, chunk_size)
    try:
        return hooks_sq_norms(*args, strict=False, chunk_size=chunk_size)
    except RuntimeError as err:
        if isinstance(err, PerExampleGradientError | BatchCoupledError):
            raise  # the exact fallback's own verdict, or a configuration error
        hooks_error = err
    result = exact_sq_norms(*args, chunk_size)  # its errors are the authoritative ones
    why = _first_line(hooks_error)
    _HOOKS_FAILED.setdefault(model, {})[key] = why
    warnings.warn(
        f"GraNd: the hooks engine failed on this {type(model).__name__} ({why}); every "
        "parameter is scored by the exact engines instead (vmap, or one example at a time). "
        "Decided once for this model and batch structure.",
        UserWarning,
        stacklevel=2,
    )
    return result


class _DefaultLoss:
    """:func:`cross_entropy_fp32` with the scorer's ``ignore_index`` (for sequences)."""

    def __init__(self, ignore_index: int) -> None:
        self.ignore_index = ignore_index

    def __call__(self, output: Any, targets: Tensor) -> Tensor:
        return cross_entropy_fp32(output, targets, self.ignore_index)

    def __repr__(self) -> str:
        return f"cross_entropy_fp32(ignore_index={self.ignore_index})"


def _class_targets(targets: Any) -> Tensor:
    """Class targets for the default loss: ``(B,)``, or ``(B, T)`` for sequences, int64."""
    if not isinstance(targets, Tensor):
        targets = torch.from_numpy(_as_index_array(targets, "targets"))
    if (
        isinstance(targets, Tensor)
        and targets.dim() == 2
        and not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
    ):
        return targets.to(torch.int64)
    return as_index_tensor(targets, "targets")


def _as_loss_targets(targets: Any) -> Tensor:
    """Targets for a custom ``loss_fn``: any tensor (or array) with one row per example."""
    if isinstance(targets, Tensor):
        tensor = targets
    else:
        try:
            tensor = torch.as_tensor(targets)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                "Expected `targets` to be a tensor (or array) with one row per example for the "
                f"custom loss_fn, but got {type(targets).__name__}."
            ) from err
    if tensor.dim() == 0:
        raise ValueError(
            "Expected `targets` with one row per example (at least 1-D), but got a 0-d tensor."
        )
    return tensor


def _checked_loss(loss_fn: LossFn) -> LossFn:
    def loss(output: Any, targets: Tensor) -> Tensor:
        value = loss_fn(output, targets)
        if not isinstance(value, Tensor) or value.dim() != 1:
            raise ValueError(
                "`loss_fn` must return per-example losses of shape (B,) (reduction='none'), "
                f"but returned {getattr(value, 'shape', type(value).__name__)}."
                + (_BATCH_OF_ONE if isinstance(value, Tensor) and targets.shape[0] == 1 else "")
            )
        return value

    return loss


@contextlib.contextmanager
def _requiring_grad(params: list[nn.Parameter]) -> Any:
    """Let autograd differentiate the scored parameters, restoring their flags afterwards."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _check_batch_coupling(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or module.running_mean is None
        ):
            raise BatchCoupledError(module)
