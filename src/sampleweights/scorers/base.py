"""The :class:`Scorer` base class: per-example state, validation, persistence and devices.

A concrete scorer declares its state once (``self.add_state(...)`` in ``__init__``) and writes
three methods: ``_values(logits, targets)`` — one value per example, computed where the logits
are; ``_scatter(indices, values, step)`` — vectorised scatter of a batch into the state; and
``_compute(state)`` — one float32 score per example. Everything else — reading batches,
validating input before anything changes, the non-finite policy, where the state lives (and the
transfer to host memory), merging ranks, ``reset``, ``state_dict`` — lives here, after the
pattern of torchmetrics' ``Metric``.

State layout: every state tensor has ``num_examples + 1`` entries. The extra last slot is a *trash
slot*: rows that must not count (non-finite logits under ``nonfinite="skip"``, non-final duplicates
where only the latest presentation matters) are redirected to it, which keeps every update a
plain, branch-free, sync-free scatter. ``state_dict`` and ``compute`` never show it.
"""

from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from sampleweights.data import BatchLayout
from sampleweights.distributed import all_gather_uneven, all_reduce_copy, is_distributed, world
from sampleweights.errors import StateMismatchError
from sampleweights.scorers.staging import HostStaging
from sampleweights.validation import (
    as_index_tensor,
    check_fits,
    check_num_examples,
    check_range,
    finite_rows,
)

__all__ = ["NonFinite", "RunningMeanScorer", "Scorer"]

NonFinite = Literal["raise", "skip"]
_NONFINITE: tuple[str, ...] = ("raise", "skip")


Reduce = Literal["sum", "max", "min"]


@dataclass
class _StateSpec:
    dtype: torch.dtype
    fill: float | int | bool
    reduce: Reduce | None  # how ranks merge it at compute(); None: already global / custom


def _library_version() -> str:
    from sampleweights import __version__

    return __version__


class Scorer(abc.ABC):
    """Base class of every scorer: per-example state keyed by dataset index.

    Subclasses call :meth:`add_state` in ``__init__`` and implement ``_values``, ``_scatter`` and
    ``_compute``.
    Users call :meth:`update` (or :meth:`update_indexed`) once per batch and :meth:`compute` when
    they want the scores.

    Args:
        num_examples: ``len(dataset)``; indices must lie in ``[0, num_examples)``.
        device: where the state lives. ``None``: on the device of the first update.
        nonfinite: ``"raise"`` rejects logits with NaN/inf (on CUDA this costs one host sync per
            update); ``"skip"`` drops those rows on the device, without a sync, and counts them
            (``num_skipped``; ``compute()`` warns) — for fp16 runs whose GradScaler skips
            overflowing steps.
        layout: where ``update(batch, logits)`` finds index and target in a batch.
        validate: check that indices lie in ``[0, num_examples)`` and targets in ``[0, C)``
            before anything changes. Free for CPU tensors (what a DataLoader yields); for CUDA
            tensors each check is a host sync, so a GPU loop that wants no sync at all passes
            ``validate=False`` (trusting its input) together with ``nonfinite="skip"``.
        process_group: the ``torch.distributed`` group whose ranks share the scores (default:
            the world when initialised). ``compute()`` is then a collective: call it on every
            rank; each rank gets the full vector a single process would have computed.
    """

    #: Name stored in ``state_dict`` and in saved scores.
    name: ClassVar[str] = "scorer"
    #: True for scorers that run the model themselves (GraNd): ``update(batch)`` takes no logits
    #: and ``score_dataset`` hands them the batch instead of its own no-grad forward.
    requires_model: ClassVar[bool] = False
    #: True for order-dependent scorers (forgetting): under torch.distributed each update
    #: all-gathers the batch's (index, value) pairs so every rank applies the global batch.
    exchanges_updates: ClassVar[bool] = False

    def __init__(
        self,
        num_examples: int,
        *,
        device: torch.device | str | None = None,
        nonfinite: NonFinite = "raise",
        layout: BatchLayout | None = None,
        validate: bool = True,
        process_group: Any = None,
    ) -> None:
        self.num_examples = check_num_examples(num_examples)
        if nonfinite not in _NONFINITE:
            raise ValueError(f"Expected `nonfinite` in {list(_NONFINITE)}, but got {nonfinite!r}.")
        if layout is not None and not isinstance(layout, BatchLayout):
            raise TypeError(
                f"Expected `layout` to be a sw.BatchLayout, but got {type(layout).__name__}."
            )
        self.nonfinite: NonFinite = nonfinite
        self.layout = layout or BatchLayout()
        self.validate = bool(validate)
        self.process_group = process_group
        self._device_fixed = device is not None
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._specs: dict[str, _StateSpec] = {}
        self._state: dict[str, Tensor] = {}
        self._skipped = torch.zeros((), dtype=torch.int64, device=self._device)
        self._staging: HostStaging | None = None
        self.num_updates = 0

    # -- state declaration -----------------------------------------------------------------------
    def add_state(
        self, name: str, dtype: torch.dtype, fill: float | int | bool, reduce: Reduce | None = "sum"
    ) -> None:
        """Declare a per-example state tensor of ``num_examples`` entries filled with ``fill``.

        ``reduce`` says how the ranks of a distributed job merge it in ``compute()``: ``"sum"``,
        ``"max"``, ``"min"``, or ``None`` for state that is already global (or merged by an
        override of ``_merge``).
        """
        if name in self._specs:
            raise RuntimeError(f"State {name!r} is already declared on {type(self).__name__}.")
        self._specs[name] = _StateSpec(dtype, fill, reduce)
        if self._device.type == "cuda":
            check_fits(self.num_examples, torch.empty((), dtype=dtype).element_size(), self._device)
        self._state[name] = torch.full(
            (self.num_examples + 1,), fill, dtype=dtype, device=self._device
        )

    @property
    def device(self) -> torch.device:
        """The device the state lives on."""
        return self._device

    @property
    def state_bytes_per_example(self) -> int:
        """Bytes of per-example state (the sum of the state tensors' element sizes)."""
        return sum(torch.empty((), dtype=s.dtype).element_size() for s in self._specs.values())

    @property
    def num_skipped(self) -> int:
        """Rows dropped for non-finite logits under ``nonfinite="skip"`` (synchronises)."""
        return int(self._skipped)

    # -- updates -----------------------------------------------------------------------------------
    def update(self, batch: Any, logits: Tensor) -> None:
        """Score one batch: read its indices and targets (see ``layout``) and the model's logits.

        Args:
            batch: the batch as a DataLoader over :class:`~sampleweights.WithIndex` yields it,
                ``(*inputs, target, index)`` or a dict with ``"index"`` and a target key.
            logits: ``(B, C)`` float tensor of any float dtype; detached on entry.

        Raises:
            ValueError, TypeError: for a batch without indices, mismatched sizes, out-of-range
                indices or targets, or non-finite logits; the state is left unchanged.
        """
        self.update_indexed(self.layout.indices(batch), logits, self.layout.targets(batch))

    def update_indexed(self, indices: Any, logits: Tensor, targets: Any) -> None:
        """Score one batch given explicitly: ``indices`` (B,), ``logits`` (B, C), ``targets`` (B,).

        Duplicated indices are consecutive presentations in batch order (the last is the latest).
        Every check runs before any state changes.
        """
        indices, logits, targets = self._validate(indices, logits, targets)
        targets = targets.to(logits.device, torch.int64, non_blocking=True)
        finite = finite_rows(logits) if self.nonfinite == "skip" else None
        self._ingest(indices, self._values(logits, targets), finite)

    def _ingest(self, indices: Tensor, values: Tensor, finite: Tensor | None) -> None:
        """Scatter per-example ``values`` (B,), computed on their own device, into the state.

        ``finite`` (B,) bool marks rows to keep under ``nonfinite="skip"``; the others go to the
        trash slot, so the scatter stays branch-free and sync-free.
        """
        source = values.device
        indices = indices.to(source, torch.int64, non_blocking=True)
        skipped = None
        if finite is not None:
            skipped = (~finite).sum()
            indices = torch.where(finite, indices, self.num_examples)
        if self.exchanges_updates and is_distributed(self.process_group):
            # order-dependent state: every rank applies the global batch, ordered by (rank,
            # position), so the state is identical on every rank and equals one process's
            indices, values = all_gather_uneven([indices, values], self.process_group)
        device = self._claim_device(source)
        self.num_updates += 1
        step = self.num_updates
        if device == source:
            self._apply(indices, values, skipped, step)
        elif source.type == "cuda" and device.type == "cpu":
            # host-memory state: copy this batch to pinned memory without waiting, apply the
            # previous batch (whose copy has long finished)
            self._flush()
            self._staging = HostStaging.start(indices, values, skipped, step)
        else:
            self._apply(
                indices.to(device),
                values.to(device),
                None if skipped is None else skipped.to(device),
                step,
            )

    def _apply(self, indices: Tensor, values: Tensor, skipped: Tensor | None, step: int) -> None:
        if skipped is not None:
            self._skipped += skipped
        self._scatter(indices, values, step)

    def _flush(self) -> None:
        """Apply a staged host transfer (host-memory state), if any."""
        if self._staging is not None:
            staged, self._staging = self._staging, None
            self._apply(*staged.wait())

    def _validate(self, indices: Any, logits: Any, targets: Any) -> tuple[Tensor, Tensor, Tensor]:
        indices = as_index_tensor(indices, "indices")
        targets = as_index_tensor(targets, "targets")
        if not isinstance(logits, Tensor):
            raise TypeError(f"Expected `logits` to be a tensor, but got {type(logits).__name__}.")
        if not logits.is_floating_point():
            raise TypeError(
                f"Expected `logits` to have a float dtype (the model's raw outputs), but got "
                f"{logits.dtype}."
            )
        if logits.dim() != 2:
            raise ValueError(
                f"Expected `logits` of shape (batch, num_classes), but got shape "
                f"{tuple(logits.shape)}."
            )
        batch = logits.shape[0]
        if indices.shape[0] != batch or targets.shape[0] != batch:
            raise ValueError(
                f"Expected one index, one logits row and one target per example, but got "
                f"{indices.shape[0]} indices, {batch} logits rows and {targets.shape[0]} targets."
            )
        if self.validate:
            classes = logits.shape[1]
            self._check_indices(indices)
            check_range(targets, 0, classes, "targets", f"logits have {classes} classes")
        logits = logits.detach()
        if self.nonfinite == "raise" and not bool(finite_rows(logits).all()):
            rows = int((~finite_rows(logits)).sum())
            raise ValueError(
                f"`logits` contain NaN or inf in {rows} of {batch} rows. Fix the model, or build "
                "the scorer with nonfinite='skip' to drop such rows (e.g. fp16 overflow steps "
                "that GradScaler skips)."
            )
        return indices, logits, targets

    def _check_indices(self, indices: Tensor) -> None:
        """Dataset indices must lie in ``[0, num_examples)`` (a host sync for CUDA tensors)."""
        n = self.num_examples
        check_range(indices, 0, n, "indices", f"num_examples={n}")

    def _claim_device(self, device: torch.device) -> torch.device:
        """The state's device; the first update moves the state to ``device`` unless fixed."""
        if not self._device_fixed:
            self._move_state(device)
            self._device_fixed = True
        return self._device

    # -- scorers that run the model (requires_model) ----------------------------------------------
    def _check_model(self, model: Any) -> None:
        """Raise unless this scorer scores ``model`` (only scorers with ``requires_model``)."""
        if self.requires_model:
            raise TypeError(f"{type(self).__name__} sets requires_model but lacks _check_model.")

    def _score_batch(self, batch: Any, forward: Any) -> None:
        """Score one loader batch with the model (only scorers with ``requires_model``)."""
        raise TypeError(f"{type(self).__name__} scores logits: call update(batch, logits).")

    # -- subclass interface ------------------------------------------------------------------------
    @abc.abstractmethod
    def _values(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Per-example values ``(B,)`` from validated, detached logits ``(B, C)`` (any float
        dtype) and int64 targets ``(B,)``, on the logits' device. Math in fp32."""

    @abc.abstractmethod
    def _scatter(self, indices: Tensor, values: Tensor, step: int) -> None:
        """Scatter ``values`` (B,) into the state at ``indices`` (B,) int64 in
        ``[0, num_examples]`` (``num_examples`` is the trash slot); both on the state's device.
        ``step`` is the 1-based number of the update they came from. Under
        ``exchanges_updates`` they hold every rank's batch, in rank order."""

    @abc.abstractmethod
    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        """Scores from the state (each tensor of ``num_examples`` entries, trash slot removed)."""

    # -- results -----------------------------------------------------------------------------------
    def compute(self) -> Tensor:
        """The score of every example: float32, shape ``(num_examples,)``; NaN = never updated.

        Under ``torch.distributed`` this is a collective: call it on every rank.
        """
        self._flush()
        state = {k: v[: self.num_examples] for k, v in self._state.items()}
        skipped_t = self._skipped
        if is_distributed(self.process_group):
            state = self._merge(state)
            skipped_t = all_reduce_copy(self._skipped, "sum", self.process_group)
        scores = self._compute(state)
        if self.nonfinite == "skip":
            skipped = int(skipped_t)
            if skipped:
                warnings.warn(
                    f"{type(self).__name__}: {skipped} presentation(s) with non-finite logits were "
                    "skipped (nonfinite='skip').",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return scores

    def _merge(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Merge the ranks' states (a collective): each declared ``reduce`` op on a copy."""
        merged = dict(state)
        for name, spec in self._specs.items():
            if spec.reduce is not None:
                merged[name] = all_reduce_copy(state[name], spec.reduce, self.process_group)
        return merged

    def reset(self) -> None:
        """Forget every update: the state returns to its declared fill values."""
        self._staging = None
        for name, spec in self._specs.items():
            self._state[name].fill_(spec.fill)
        self._skipped.zero_()
        self.num_updates = 0

    def to(self, device: torch.device | str) -> Scorer:
        """Move the state to ``device`` (and keep it there for later updates); returns self."""
        self._move_state(torch.device(device))
        self._device_fixed = True
        return self

    def _move_state(self, device: torch.device) -> None:
        if device == self._device:
            return
        self._flush()
        if device.type == "cuda":
            check_fits(self.num_examples, self.state_bytes_per_example, device)
        self._state = {k: v.to(device) for k, v in self._state.items()}
        self._skipped = self._skipped.to(device)
        self._device = device

    # -- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This process's state, with what is needed to check it is loaded into the right place.

        Keys: ``scorer``, ``version``, ``num_examples``, ``num_updates``, ``num_skipped``,
        ``world_size``, ``rank`` and ``state`` (name → tensor of ``num_examples`` entries, a copy).
        Under ``torch.distributed`` this is the local (per-rank) state: save it on every rank.

        Example:
            >>> from sampleweights import EL2N
            >>> s = EL2N(10)
            >>> sd = s.state_dict()
            >>> sd["scorer"], sd["num_examples"], sorted(sd["state"])
            ('el2n', 10, ['count', 'sum'])
        """
        self._flush()
        world_size, rank = world(self.process_group)
        return {
            "scorer": self.name,
            "version": _library_version(),
            "num_examples": self.num_examples,
            "num_updates": self.num_updates,
            "num_skipped": self._skipped.clone(),
            "world_size": world_size,
            "rank": rank,
            "state": {k: v[: self.num_examples].clone() for k, v in self._state.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, mapped to this scorer's device.

        Raises:
            StateMismatchError: the state belongs to another scorer, another dataset size, or
                lacks a state tensor; nothing is changed.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict:
            raise StateMismatchError(
                f"Expected a dict made by {type(self).__name__}.state_dict(), but got "
                f"{type(state_dict).__name__}."
            )
        if state_dict.get("scorer") != self.name:
            raise StateMismatchError(
                f"This state was saved by scorer {state_dict.get('scorer')!r}; it cannot be loaded "
                f"into {type(self).__name__} ({self.name!r})."
            )
        if state_dict.get("num_examples") != self.num_examples:
            raise StateMismatchError(
                f"This state was saved for num_examples={state_dict.get('num_examples')}, but this "
                f"scorer has num_examples={self.num_examples}: it belongs to another dataset."
            )
        saved = state_dict["state"]
        if set(saved) != set(self._specs):
            raise StateMismatchError(
                f"Expected state tensors {sorted(self._specs)}, but the state has {sorted(saved)}."
            )
        for name, tensor in saved.items():
            if not isinstance(tensor, Tensor) or tuple(tensor.shape) != (self.num_examples,):
                raise StateMismatchError(
                    f"State {name!r} must be a tensor of shape ({self.num_examples},), but got "
                    f"{getattr(tensor, 'shape', type(tensor).__name__)}."
                )
        world_size, rank = world(self.process_group)
        self._staging = None  # a batch in flight belongs to the state being replaced
        if state_dict.get("world_size", 1) != world_size or state_dict.get("rank", 0) != rank:
            warnings.warn(
                f"Loading the state of rank {state_dict.get('rank')} of a world of "
                f"{state_dict.get('world_size')} into rank {rank} of {world_size}: per-rank states "
                "resume only on the same world size. To move scores to another world size, "
                "save the merged scores with sw.save_scores and select from those.",
                RuntimeWarning,
                stacklevel=2,
            )
        for name, tensor in saved.items():
            dst = self._state[name]
            dst[: self.num_examples].copy_(tensor.to(dst.dtype))
            dst[self.num_examples] = self._specs[name].fill
        self._skipped.fill_(int(state_dict.get("num_skipped", 0)))
        self.num_updates = int(state_dict.get("num_updates", 0))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_examples={self.num_examples}, device={self._device}, "
            f"num_updates={self.num_updates})"
        )


class RunningMeanScorer(Scorer):
    """A scorer whose score is the mean over presentations of a per-example value.

    State: an fp64 sum and an int32 count per example (12 bytes). Subclasses write ``_values``.
    """

    def __init__(self, num_examples: int, **kwargs: Any) -> None:
        super().__init__(num_examples, **kwargs)
        self.add_state("sum", torch.float64, 0.0)
        self.add_state("count", torch.int32, 0)

    def _scatter(self, indices: Tensor, values: Tensor, step: int) -> None:
        self._state["sum"].index_add_(0, indices, values.to(torch.float64))
        self._state["count"].index_add_(0, indices, torch.ones_like(indices, dtype=torch.int32))

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        count = state["count"]
        mean = state["sum"] / count.clamp_min(1)
        return torch.where(count > 0, mean, torch.nan).to(torch.float32)


def last_occurrence(indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Group a batch's rows by index, keeping batch order within a group.

    Returns ``(sorted_indices, order, is_last)``: ``sorted_indices = indices[order]`` sorted stably,
    and ``is_last[k]`` true where row ``order[k]`` is the last presentation of its index in the
    batch. All on device, no host sync.
    """
    sorted_indices, order = torch.sort(indices, stable=True)
    is_last = torch.ones_like(sorted_indices, dtype=torch.bool)
    is_last[:-1] = sorted_indices[1:] != sorted_indices[:-1]
    return sorted_indices, order, is_last
