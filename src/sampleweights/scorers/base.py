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
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor

from sampleweights.data import BatchLayout
from sampleweights.distributed import (
    OP_COMPUTE,
    OP_UPDATE,
    all_gather_uneven,
    all_reduce_copy,
    all_reduce_many,
    exchange_header,
    is_distributed,
    world,
)
from sampleweights.errors import StateMismatchError
from sampleweights.scorers.staging import HostStaging
from sampleweights.validation import (
    _as_index_array,
    as_index_tensor,
    check_fits,
    check_num_examples,
    check_range,
    finite_rows,
    looks_like_probabilities,
)

if TYPE_CHECKING:
    from sampleweights.scorers.rowstats import RowStats

__all__ = ["NonFinite", "RunningMeanScorer", "Scorer", "TokenReduce"]

NonFinite = Literal["raise", "skip"]
_NONFINITE: tuple[str, ...] = ("raise", "skip")

#: How per-token values of a ``(B, T, C)`` batch become one value per example.
TokenReduce = Literal["mean", "sum", "max"]
_TOKEN_REDUCE: tuple[str, ...] = ("mean", "sum", "max")


Reduce = Literal["sum", "max", "min"]


@dataclass
class _StateSpec:
    dtype: torch.dtype
    fill: float | int | bool
    reduce: Reduce | None  # how ranks merge it at compute(); None: already global / custom
    nonnegative: bool = False  # load_state_dict rejects negative entries (counts, steps)


def _row_stats(logits: Tensor, targets: Tensor) -> RowStats:
    """A batch's lazily computed shared statistics (imported here: rowstats imports scorers)."""
    from sampleweights.scorers.rowstats import RowStats

    return RowStats(logits, targets)


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
        ignore_index: for sequence batches (``(B, T, C)`` logits, ``(B, T)`` targets): the
            target of tokens that do not count (padding, prompt), as in
            ``F.cross_entropy``. Ignored for ``(B, C)`` batches, whose targets must be classes.
        token_reduce: how a sequence's per-token values become its value for the update, over
            its valid tokens: ``"mean"`` (default), ``"sum"`` or ``"max"``. Correctness
            (``ForgettingTracker``, ``Misclassified``, ``DataMaps``' correctness) follows
            ``min_token_accuracy`` instead.
        min_token_accuracy: a sequence counts as correct when at least this fraction of its
            valid tokens is predicted right (arg-max = target), in ``(0, 1]``. Default 0.5 (a
            majority: exact match of every token is rare under teacher forcing, which would
            leave forgetting events and the error set nearly constant); 1.0: every token.
        chunk_tokens: compute sequence statistics ``chunk_tokens`` tokens at a time (whole
            sequences when it is ``>= T``), bounding the ``(tokens, C)`` fp32 buffer for long
            sequences and large vocabularies. ``None`` (default): the whole batch at once.

    Sequences: an example without a valid token (every target ``ignore_index``) has no value
    for that update: it is not counted as a presentation, ``num_empty`` counts it and
    ``compute()`` warns. Each valid token is a row of the shared statistics, so the values are
    those of the ``(B·T, C)`` rows, reduced per example.

    Runs: :meth:`new_run` starts a new training run (Data Diet averages scores over several
    runs). Order-dependent scorers never compare presentations across runs; ``num_runs``
    counts the runs that received updates.
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
        ignore_index: int = -100,
        token_reduce: TokenReduce = "mean",
        min_token_accuracy: float = 0.5,
        chunk_tokens: int | None = None,
    ) -> None:
        self.num_examples = check_num_examples(num_examples)
        _check_sequence_options(ignore_index, token_reduce, min_token_accuracy, chunk_tokens)
        self.ignore_index = int(ignore_index)
        self.token_reduce: TokenReduce = token_reduce
        self.min_token_accuracy = float(min_token_accuracy)
        self.chunk_tokens = chunk_tokens
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
        self._empty = torch.zeros((), dtype=torch.int64)  # on the device of the values
        self._staging: HostStaging | None = None
        self.num_updates = 0
        #: runs that received at least one update (see :meth:`new_run`)
        self.num_runs = 0
        self._run_updates = 0  # updates in the current run
        self._world: tuple[int, int] | None = None  # (world size, rank) of the updates
        self._rank_updates: list[int] = []  # every rank's num_updates, from compute()'s header

    # -- state declaration -----------------------------------------------------------------------
    def add_state(
        self,
        name: str,
        dtype: torch.dtype,
        fill: float | int | bool,
        reduce: Reduce | None = "sum",
        *,
        nonnegative: bool | None = None,
    ) -> None:
        """Declare a per-example state tensor of ``num_examples`` entries filled with ``fill``.

        ``reduce`` says how the ranks of a distributed job merge it in ``compute()``: ``"sum"``,
        ``"max"``, ``"min"``, or ``None`` for state that is already global (or merged by an
        override of ``_merge``). ``nonnegative`` (default: true for integer dtypes, which hold
        counts and step numbers) makes ``load_state_dict`` reject negative entries.
        """
        if name in self._specs:
            raise RuntimeError(f"State {name!r} is already declared on {type(self).__name__}.")
        if nonnegative is None:
            nonnegative = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
        self._specs[name] = _StateSpec(dtype, fill, reduce, nonnegative)
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

    @property
    def num_empty(self) -> int:
        """Presentations of sequences without a valid token (every target ``ignore_index``),
        which have no value and are not counted (this process's batches; ``compute()`` warns
        with the sum over the ranks; synchronises)."""
        return int(self._empty)

    # -- updates -----------------------------------------------------------------------------------
    def update(self, batch: Any, logits: Tensor) -> None:
        """Score one batch: read its indices and targets (see ``layout``) and the model's logits.

        Args:
            batch: the batch as a DataLoader over :class:`~sampleweights.WithIndex` yields it,
                ``(*inputs, target, index)`` or a dict with ``"index"`` and a target key.
            logits: ``(B, C)`` float tensor of any float dtype, or ``(B, T, C)`` for sequences
                (targets ``(B, T)``, ``ignore_index`` for tokens that do not count); detached
                on entry.

        Raises:
            ValueError, TypeError: for a batch without indices, mismatched sizes, out-of-range
                indices or targets, or non-finite logits; the state is left unchanged.
        """
        self.update_indexed(self.layout.indices(batch), logits, self.layout.targets(batch))

    def update_indexed(self, indices: Any, logits: Tensor, targets: Any) -> None:
        """Score one batch given explicitly: ``indices`` (B,), ``logits`` (B, C), ``targets`` (B,).

        Sequences: ``logits`` (B, T, C) and ``targets`` (B, T), whose entries are classes in
        ``[0, C)`` or ``ignore_index``; each example's per-token values reduce over its valid
        tokens (``token_reduce``, ``min_token_accuracy``).
        Duplicated indices are consecutive presentations in batch order (the last is the latest).
        Every check runs before any state changes.

        Example:
            >>> import torch, sampleweights as sw
            >>> s = sw.Loss(2)
            >>> logits = torch.zeros(2, 3, 4)             # 2 sequences, 3 tokens, 4 classes
            >>> targets = torch.tensor([[1, 2, -100], [0, -100, -100]])
            >>> s.update_indexed([0, 1], logits, targets)
            >>> s.compute()                               # mean over valid tokens: log 4
            tensor([1.3863, 1.3863])
        """
        indices, logits, targets = self._validate(indices, logits, targets)
        targets = targets.to(logits.device, torch.int64, non_blocking=True)
        if logits.dim() == 3:
            tokens = TokenBatch(logits, targets, self.ignore_index, self.chunk_tokens)
            finite = tokens.finite() if self.nonfinite == "skip" else None
            (values,) = tokens.values([self._values_from], margins=None)
            self._ingest(
                indices, self._reduce_tokens(values, tokens.valid), finite, empty=tokens.empty
            )
            return
        finite = finite_rows(logits) if self.nonfinite == "skip" else None
        self._ingest(indices, self._values_from(_row_stats(logits, targets)), finite)

    def _reduce_tokens(self, values: Tensor, valid: Tensor) -> Tensor:
        """One value per example from per-token ``values`` (B, T) or (B, T, k) and the mask of
        valid tokens ``valid`` (B, T): bool values (correctness) by ``min_token_accuracy``, float
        values by ``token_reduce``; NaN for examples without a valid token (which ``_ingest``
        drops). Scorers whose columns mix the two kinds override it (``DataMaps``)."""
        if values.dtype == torch.bool:
            return token_correct(values, valid, self.min_token_accuracy)
        return reduce_tokens(values, valid, self.token_reduce)

    def _ingest(
        self,
        indices: Tensor,
        values: Tensor,
        finite: Tensor | None,
        exchanged: tuple[Tensor, Tensor] | None = None,
        *,
        empty: Tensor | None = None,
    ) -> None:
        """Scatter per-example ``values`` (B,), computed on their own device, into the state.

        ``finite`` (B,) bool marks rows to keep under ``nonfinite="skip"``; the others go to the
        trash slot, so the scatter stays branch-free and sync-free. ``exchanged``: the global
        batch ``(indices, values)`` of an order-dependent scorer, already exchanged by a
        :class:`~sampleweights.ScorerCollection` (one exchange for all its scorers; its indices
        carry the trash slot for skipped rows), applied instead of this scorer's own exchange.
        ``empty`` (B,) bool marks sequences without a valid token: sent to the trash slot too,
        and counted in ``num_empty``.
        """
        source = values.device
        if indices.device != source or indices.dtype != torch.int64:  # a no-op .to() costs ~5 µs
            indices = indices.to(source, torch.int64, non_blocking=True)
        skipped = None
        if finite is not None:
            skipped = (~finite).sum()
            indices = torch.where(finite, indices, self.num_examples)
        if empty is not None:
            if self._empty.device != source:
                self._empty = self._empty.to(source)
            self._empty += empty.sum()
            indices = torch.where(empty, self.num_examples, indices)
        if exchanged is not None:
            indices, values = exchanged
        elif self.exchanges_updates and is_distributed(self.process_group):
            # order-dependent state: every rank applies the global batch, ordered by (rank,
            # position), so the state is identical on every rank and equals one process's
            indices, values = self._exchange(indices, values)
        device, step = self._count_update(source)
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

    def _count_update(self, source: torch.device) -> tuple[torch.device, int]:
        """The bookkeeping of one update whose values are on ``source``: claims the state's
        device, records the process group's world, starts a run (``_begin_run`` on the first
        update of a later one) and counts the update. Returns ``(state device, step)``, the
        step being the update's 1-based number."""
        device = self._claim_device(source)
        here = world(self.process_group)
        if self.exchanges_updates or self._world is None or here[0] > 1:
            self._world = here
        # else: a per-rank state updated under a group that is gone stays that rank's part
        if self._run_updates == 0:
            if self.num_runs:
                self._begin_run()  # the first update of a later run
            self.num_runs += 1
        self._run_updates += 1
        self.num_updates += 1
        return device, self.num_updates

    def _exchange(self, indices: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """All-gather every rank's ``(index, value)`` pairs, in rank order (a collective).

        The header (see :func:`~sampleweights.distributed.exchange_header`) checks that every
        rank makes this same update and carries the batch lengths. Bool values travel packed with
        their index into one integer, ``2·index + value``: int32 (4 bytes per example) while
        ``2·num_examples + 1 < 2³¹``, else int64 (8 bytes).
        """
        rows = exchange_header(
            self.name,
            OP_UPDATE,
            run=self.num_runs + (self._run_updates == 0),
            num_updates=self.num_updates,
            length=indices.numel(),
            device=indices.device,
            group=self.process_group,
        )
        counts = [row[5] for row in rows]
        if values.dtype != torch.bool:
            gathered = all_gather_uneven([indices, values], self.process_group, counts=counts)
            return gathered[0], gathered[1]
        wide = torch.int32 if 2 * self.num_examples + 1 < 2**31 else torch.int64
        packed = indices.to(wide) * 2 + values.to(wide)  # (B,)
        (every,) = all_gather_uneven([packed], self.process_group, counts=counts)
        every = every.to(torch.int64)
        return every // 2, (every % 2).to(torch.bool)

    def _apply(self, indices: Tensor, values: Tensor, skipped: Tensor | None, step: int) -> None:
        if skipped is not None:
            self._skipped += skipped
        self._scatter(indices, values, step)

    def _flush(self) -> None:
        """Apply a staged host transfer (host-memory state), if any."""
        if self._staging is not None:
            staged, self._staging = self._staging, None
            self._apply(*staged.wait())

    def _validate(
        self, indices: Any, logits: Any, targets: Any, *, check_finite: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Check one batch; returns ``(indices, detached logits, targets)`` as tensors.
        ``check_finite=False`` leaves the ``nonfinite="raise"`` check of ``(B, C)`` logits to
        the caller (:meth:`_check_finite`; a fused collection update makes it inside its
        compiled call)."""
        if isinstance(logits, Tensor) and logits.dim() == 3:
            return self._validate_tokens(indices, logits, targets)
        indices = as_index_tensor(indices, "indices")
        targets = as_index_tensor(targets, "targets")
        if not isinstance(logits, Tensor):
            raise TypeError(f"Expected `logits` to be a tensor, but got {type(logits).__name__}.")
        self._check_float_logits(logits)
        if logits.dim() != 2:
            raise ValueError(
                f"Expected `logits` of shape (batch, num_classes), or (batch, tokens, "
                f"num_classes) for sequences, but got shape {tuple(logits.shape)}."
            )
        batch = logits.shape[0]
        if logits.shape[1] == 0:
            raise ValueError(
                f"Expected `logits` with at least one class, but got shape {tuple(logits.shape)}."
            )
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
        if check_finite:
            self._check_finite(logits)
        self._warn_if_probabilities(logits, "every row of `logits` is non-negative and sums to 1")
        return indices, logits, targets

    def _check_finite(self, logits: Tensor) -> None:
        """With ``nonfinite="raise"``: ValueError if a row of ``(B, C)`` logits holds NaN or inf
        (a host sync for CUDA tensors)."""
        if self.nonfinite == "raise" and not bool(finite_rows(logits).all()):
            rows = int((~finite_rows(logits)).sum())
            raise ValueError(
                f"`logits` contain NaN or inf in {rows} of {len(logits)} rows. Fix the model, or "
                "build the scorer with nonfinite='skip' to drop such rows (e.g. fp16 overflow "
                "steps that GradScaler skips)."
            )

    def _validate_tokens(
        self, indices: Any, logits: Tensor, targets: Any
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``_validate`` for a sequence batch: logits (B, T, C), targets (B, T) of classes in
        ``[0, C)`` or ``ignore_index``; the non-finite check looks at valid tokens only."""
        indices = as_index_tensor(indices, "indices")
        if not isinstance(targets, Tensor):
            targets = torch.from_numpy(_as_index_array(targets, "targets"))
        if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
            raise TypeError(
                f"Expected `targets` to have an integer dtype, but got {targets.dtype}."
            )
        self._check_float_logits(logits)
        batch, length, classes = logits.shape
        if classes == 0:
            raise ValueError(
                f"Expected `logits` with at least one class, but got shape {tuple(logits.shape)}."
            )
        if targets.shape != (batch, length) or indices.shape[0] != batch:
            raise ValueError(
                f"Expected sequence `logits` (B, T, C) with `targets` (B, T) and `indices` (B,), "
                f"but got the shapes logits {tuple(logits.shape)}, targets "
                f"{tuple(targets.shape)} and indices {tuple(indices.shape)}. For a causal LM "
                "pass the logits unshifted and the labels shifted left, padded with "
                f"ignore_index={self.ignore_index}."
            )
        targets = targets.to(torch.int64)
        valid = targets != self.ignore_index
        if self.validate:
            self._check_indices(indices)
            if targets.numel() and not bool(((targets >= 0) & (targets < classes) | ~valid).all()):
                bad = targets[valid & ((targets < 0) | (targets >= classes))]
                raise ValueError(
                    f"Expected `targets` in [0, {classes}) (logits have {classes} classes) or "
                    f"equal to ignore_index={self.ignore_index}, but got {bad.numel()} other "
                    f"value(s) in [{int(bad.min())}, {int(bad.max())}]. Pass the scorer's "
                    "ignore_index=... if your padding label differs."
                )
        logits = logits.detach()
        if self.nonfinite == "raise":
            tokens = TokenBatch(
                logits,
                targets.to(logits.device, non_blocking=True),
                self.ignore_index,
                self.chunk_tokens,
            )
            finite = tokens.finite()
            if not bool(finite.all()):
                raise ValueError(
                    f"`logits` contain NaN or inf at valid tokens of {int((~finite).sum())} of "
                    f"{batch} sequences. Fix the model, or build the scorer with "
                    "nonfinite='skip' to drop such sequences (e.g. fp16 overflow steps that "
                    "GradScaler skips)."
                )
        self._warn_if_probabilities(logits, "every token's `logits` are non-negative and sum to 1")
        return indices, logits, targets

    @staticmethod
    def _check_float_logits(logits: Tensor) -> None:
        """TypeError unless ``logits`` has a float dtype."""
        if not logits.is_floating_point():
            raise TypeError(
                f"Expected `logits` to have a float dtype (the model's raw outputs), but got "
                f"{logits.dtype}."
            )

    def _warn_if_probabilities(self, logits: Tensor, what: str) -> None:
        """Warn (once per scorer, with ``validate``) when ``logits`` look like probabilities;
        ``what`` says what was seen (``"every row of `logits` is non-negative and sums to 1"``)."""
        if (
            self.validate
            and not getattr(self, "_warned_probabilities", False)
            and looks_like_probabilities(logits)
        ):
            # a warning, not an error: a row of real logits can sum to 1 by chance (once per
            # scorer; the check is skipped after it). The flag is set only once the warning has
            # been shown: under -W error it raises, rejecting this call and every such call.
            from sampleweights.validation import warning_stacklevel

            warnings.warn(
                f"{type(self).__name__}: {what}: "
                "these look like probabilities (softmax outputs), which shrink every score. Pass "
                "the model's raw outputs before softmax, or probs.log() if probabilities are all "
                "you have.",
                RuntimeWarning,
                stacklevel=warning_stacklevel(),
            )
            self._warned_probabilities = True

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

    @staticmethod
    def _scatter_distinct(
        state: dict[str, Tensor], indices: Tensor, values: Tensor, step: int | Tensor
    ) -> None:
        """``_scatter`` for a batch whose indices are all distinct, as a function of the state
        dict alone (no ``self``; tensor operations only, the trash slot being each state's last
        entry), so that ``ScorerCollection(..., compile=True)`` can fuse the updates of its
        built-in scorers with the shared statistics into one compiled call. ``step``: the
        update's number, an int or a 0-d int64 tensor. The built-in scorers define it and use it
        in their own ``_scatter``; other scorers are never fused."""
        raise TypeError(
            "Only the built-in scorers' updates are fused (sampleweights.scorers.fused.FUSABLE); "
            "this scorer updates through its own _scatter."
        )

    def _values_from(self, stats: RowStats) -> Tensor:
        """Per-example values ``(B,)`` from a batch's shared :class:`RowStats` (the statistics a
        :class:`~sampleweights.ScorerCollection` computes once for all its scorers).
        ``update_indexed`` calls it too, with the batch's own ``RowStats``, so a scorer alone and
        in a collection compute the same bits. Default: ``_values(logits, targets)``; logit
        scorers override it to read the shared statistics. The statistics (and the logits) are
        shared with the collection's other scorers: return new tensors, never change them in
        place (``stats.loss.clamp(max=1)``, not ``clamp_``)."""
        return self._values(stats.logits, stats.targets)

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
    def compute(self, *, local: bool = False) -> Tensor:
        """The score of every example: float32, shape ``(num_examples,)``; NaN = never updated.

        Under ``torch.distributed`` this is a collective: call it on every rank (before
        ``destroy_process_group``); every rank gets the merged vector. Its first collective is
        the same small header the update exchanges start with, so ranks that are out of step
        raise :class:`~sampleweights.DistributedMismatchError` at once instead of hanging.

        Args:
            local: return this rank's own, unmerged scores, with no collective. Without a
                process group, a scorer whose state was updated under one (world size > 1) holds
                only this rank's part and refuses ``compute()`` unless ``local=True``:
                compute the merged scores before ``destroy_process_group`` (and keep them with
                :func:`~sampleweights.save_scores`). Order-dependent scorers
                (``ForgettingTracker``) hold the same complete state on every rank and need no
                group.

        Raises:
            RuntimeError: the state was updated under a process group that is gone.
            DistributedMismatchError: the ranks are out of step (see
                :mod:`sampleweights.distributed`).
        """
        self._flush()
        state = {k: v[: self.num_examples] for k, v in self._state.items()}
        skipped_t, empty_t = self._skipped, self._empty
        if not local and is_distributed(self.process_group):
            rows = exchange_header(
                self.name,
                OP_COMPUTE,
                run=self.num_runs,
                num_updates=self.num_updates,
                length=self._run_updates,  # compute() carries the updates in the current run
                device=self._device,
                group=self.process_group,
                require_equal_updates=self.exchanges_updates,
            )
            self._rank_updates = [row[4] for row in rows]
            self._rank_run_updates = [row[5] for row in rows]
            state = self._merge(state)
            # every rank counts its own batches' skipped rows and empty sequences: the sums
            skipped_t, empty_t = all_reduce_many(
                [self._skipped, self._empty], "sum", self.process_group
            )
        elif (
            not local
            and self._world is not None
            and self._world[0] > 1
            and not self.exchanges_updates
        ):
            size, rank = self._world
            raise RuntimeError(
                f"{type(self).__name__}.compute(): this state was updated on rank {rank} of a "
                f"process group of {size}, which is no longer initialised, so it holds only "
                "this rank's part of the scores. Call compute() on every rank before "
                "destroy_process_group() (and keep the merged scores with sw.save_scores), or "
                "pass compute(local=True) for this rank's own partial scores."
            )
        return self._finish(state, skipped_t, empty_t, stacklevel=2)

    def _finish(
        self, state: dict[str, Tensor], skipped: Tensor, empty: Tensor, stacklevel: int = 2
    ) -> Tensor:
        """The scores from a merged state (``_compute``), warning about skipped presentations
        and empty sequences (``skipped``, ``empty``: their merged counts; ``stacklevel`` as seen
        from the caller). The end of ``compute()``, shared with
        :class:`~sampleweights.ScorerCollection`'s fused merge."""
        scores = self._compute(state)
        if self.nonfinite == "skip":
            count = int(skipped)
            if count:
                warnings.warn(
                    f"{type(self).__name__}: {count} presentation(s) with non-finite logits were "
                    "skipped (nonfinite='skip').",
                    RuntimeWarning,
                    stacklevel=stacklevel + 1,
                )
        empty_count = int(empty)
        if empty_count:
            warnings.warn(
                f"{type(self).__name__}: {empty_count} presentation(s) of sequences without a "
                f"valid token (every target == ignore_index={self.ignore_index}) had no value and "
                "were not counted.",
                RuntimeWarning,
                stacklevel=stacklevel + 1,
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
        """Forget every update and every run: the state returns to its declared fill values."""
        self._staging = None
        for name, spec in self._specs.items():
            self._state[name].fill_(spec.fill)
        self._skipped.zero_()
        self._empty.zero_()
        self.num_updates = 0
        self.num_runs = 0
        self._run_updates = 0
        self._world = None

    def new_run(self) -> None:
        """Start a new training run: the presentation order starts afresh.

        Data Diet averages scores over several independently initialised training runs. Call
        ``new_run()`` before each run (before the first too: a run without updates is not
        counted, so repeated calls are harmless). Order-dependent scorers never compare a
        presentation with one from an earlier run: ``ForgettingTracker`` aggregates its per-run
        counts (``across_runs``), ``Misclassified`` keeps only the latest run. For running-mean
        scorers (EL2N, GraNd) it only advances ``num_runs``: their mean over every update *is*
        the mean over runs when each run presents each example equally often.

        Under ``torch.distributed`` every rank calls it at the same point of the loop (it
        communicates nothing; ``ForgettingTracker``'s next exchange checks that the ranks agree).

        Example:
            >>> import torch, sampleweights as sw
            >>> s = sw.ForgettingTracker(1)
            >>> right, wrong, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), [0]
            >>> for run in range(2):
            ...     s.new_run()
            ...     s.update_indexed([0], right, y)
            ...     s.update_indexed([0], wrong, y)     # one event per run
            >>> s.num_runs, s.compute()                 # mean over the runs
            (2, tensor([1.]))
        """
        self._flush()
        if self._run_updates == 0:
            return
        self._end_run()
        self._run_updates = 0

    def _end_run(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Close the current run (it had updates); order-dependent scorers fold their per-run
        state here. Default: nothing (running means span runs)."""

    def _begin_run(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Called at the first update of every run after the first (on the state's device,
        nothing in flight). Scorers that keep only the latest run clear their state here, so
        results between ``new_run()`` and that update still show the previous run."""

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
        ``num_empty``, ``num_runs``, ``run_updates`` (updates in the current run),
        ``world_size``, ``rank`` (of the process group the state was updated in) and ``state``
        (name → tensor of ``num_examples`` entries, a copy). Under ``torch.distributed`` this is
        the local (per-rank) state: save it on every rank.

        Example:
            >>> from sampleweights import EL2N
            >>> s = EL2N(10)
            >>> sd = s.state_dict()
            >>> sd["scorer"], sd["num_examples"], sorted(sd["state"])
            ('el2n', 10, ['count', 'sum'])
        """
        self._flush()
        world_size, rank = self._world or world(self.process_group)
        return {
            "scorer": self.name,
            "version": _library_version(),
            "num_examples": self.num_examples,
            "num_updates": self.num_updates,
            "num_skipped": self._skipped.clone(),
            "num_empty": self._empty.clone(),
            "num_runs": self.num_runs,
            "run_updates": self._run_updates,
            "world_size": world_size,
            "rank": rank,
            "state": {k: v[: self.num_examples].clone() for k, v in self._state.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, mapped to this scorer's device.

        Everything is checked before anything changes. Per-rank state (every scorer but
        ``ForgettingTracker``, whose state is the same on every rank) resumes only on the same
        rank of a process group of the same size: a state updated on rank 1 of 2 holds half the
        scores. To move scores to another world size, save the merged scores with
        :func:`~sampleweights.save_scores` and select from those.

        Raises:
            StateMismatchError: the state belongs to another scorer, another dataset size,
                another rank or world size, lacks a state tensor, or holds impossible values
                (wrong dtypes, negative counts); nothing is changed.
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
        if not isinstance(saved, dict) or set(saved) != set(self._specs):
            names = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise StateMismatchError(
                f"Expected state tensors {sorted(self._specs)}, but the state has {names}."
            )
        for name, tensor in saved.items():
            spec = self._specs[name]
            if not isinstance(tensor, Tensor) or tuple(tensor.shape) != (self.num_examples,):
                raise StateMismatchError(
                    f"State {name!r} must be a tensor of shape ({self.num_examples},), but got "
                    f"{getattr(tensor, 'shape', type(tensor).__name__)}."
                )
            if tensor.dtype != spec.dtype:
                raise StateMismatchError(
                    f"State {name!r} must have dtype {spec.dtype}, but got {tensor.dtype}: it "
                    f"was not saved by this version of {type(self).__name__}."
                )
            if spec.nonnegative and tensor.numel() and bool((tensor < 0).any()):
                raise StateMismatchError(
                    f"State {name!r} holds counts, which must be >= 0, but has "
                    f"{int((tensor < 0).sum())} negative entries (min {int(tensor.min())})."
                )
        num_updates = _saved_count(state_dict, "num_updates", 0)
        num_runs = _saved_count(state_dict, "num_runs", 1 if num_updates else 0)
        run_updates = _saved_count(state_dict, "run_updates", num_updates)
        skipped = _saved_counter(state_dict, "num_skipped")
        empty = _saved_counter(state_dict, "num_empty")
        earlier_runs = num_runs - (run_updates > 0)  # each had at least one update
        if (
            run_updates > num_updates
            or earlier_runs > num_updates - run_updates
            or (num_updates and not num_runs)
        ):
            raise StateMismatchError(
                f"Expected 0 <= run_updates <= num_updates and 1 <= num_runs <= num_updates "
                f"(or all 0), every run before the current one with an update of its own, but "
                f"got num_updates={num_updates}, num_runs={num_runs}, run_updates={run_updates}."
            )
        saved_world = (
            _saved_count(state_dict, "world_size", 1),
            _saved_count(state_dict, "rank", 0),
        )
        here = world(self.process_group)
        if num_updates and saved_world != here and not self.exchanges_updates:
            raise StateMismatchError(
                f"This state was updated on rank {saved_world[1]} of a process group of "
                f"{saved_world[0]}; this scorer is rank {here[1]} of {here[0]}. Per-rank states "
                "resume only on the same rank of a group of the same size (load each rank's own "
                "state_dict). To move scores to another world size, save the merged scores "
                "(compute() on every rank) with sw.save_scores and select from those."
            )
        problem = self._check_loaded(
            {k: v for k, v in saved.items()},
            num_updates=num_updates,
            num_runs=num_runs,
            run_updates=run_updates,
        )
        if problem is not None:
            raise StateMismatchError(problem)
        self._staging = None  # a batch in flight belongs to the state being replaced
        for name, tensor in saved.items():
            dst = self._state[name]
            dst[: self.num_examples].copy_(tensor)
            dst[self.num_examples] = self._specs[name].fill
        self._skipped.fill_(skipped)
        self._empty.fill_(empty)
        self.num_updates = num_updates
        self.num_runs = num_runs
        self._run_updates = run_updates
        self._world = saved_world if num_updates else None

    def _check_loaded(
        self, state: dict[str, Tensor], *, num_updates: int, num_runs: int, run_updates: int
    ) -> str | None:
        """Scorer-specific consistency check of a state about to be loaded: a message saying
        what is wrong, or None. Runs before anything changes."""
        return None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_examples={self.num_examples}, device={self._device}, "
            f"num_updates={self.num_updates})"
        )


class RunningMeanScorer(Scorer):
    """A scorer whose score is the mean over presentations of a per-example value.

    Subclasses write ``_values`` (and ``_values_from``). Two reductions:

    * ``ema=None`` (default): the plain mean over every presentation. State: an fp64 sum and an
      int32 count per example (12 bytes).
    * ``ema=β`` with ``β`` in (0, 1): the bias-corrected exponential moving average over the
      example's own presentations, for in-loop use where old epochs should fade. After
      presentations with values ``v_1 … v_n`` (oldest first) the score is

      ``Σ_k β^(n−k) v_k / Σ_k β^(n−k)`` = Adam's ``m_n / (1 − β^n)`` for ``m_k = β m_{k−1} +
      (1 − β) v_k``, so the first presentation's value is the score after one presentation
      (no bias towards 0), and a value ``j`` presentations old weighs ``β^j`` relative to the
      newest. Time is counted in presentations of that example, not in updates: an example
      unseen for a while keeps its score. Duplicates in one update are consecutive
      presentations in batch order. State: an fp64 weighted sum and an fp64 total weight per
      example (16 bytes). The average depends on the order of presentations, so under
      ``torch.distributed`` each update exchanges the batch's (index, value) pairs (like
      :class:`~sampleweights.ForgettingTracker`): every rank must call ``update`` equally often,
      and the state is identical on every rank.

    Raises:
        TypeError, ValueError: ``ema`` not a float in (0, 1).
    """

    @staticmethod
    def _scatter_distinct(
        state: dict[str, Tensor], indices: Tensor, values: Tensor, step: int | Tensor
    ) -> None:
        """The plain mean's update, ``sum += value`` and ``count += 1`` at each index (repeated
        indices too; with ``ema=`` the collection does not fuse the update)."""
        state["sum"].index_add_(0, indices, values.to(torch.float64))
        state["count"].index_add_(0, indices, torch.ones_like(indices, dtype=torch.int32))

    def __init__(self, num_examples: int, *, ema: float | None = None, **kwargs: Any) -> None:
        if ema is not None:
            if isinstance(ema, bool) or not isinstance(ema, int | float):
                raise TypeError(
                    f"Expected `ema` to be None or a decay (float) in (0, 1), but got "
                    f"{type(ema).__name__}."
                )
            if not 0.0 < float(ema) < 1.0:
                raise ValueError(
                    f"Expected `ema` to be a decay in (0, 1) (e.g. 0.9: a presentation k steps "
                    f"old weighs 0.9^k), or None for the plain mean, but got {ema!r}."
                )
        super().__init__(num_examples, **kwargs)
        self.ema: float | None = None if ema is None else float(ema)
        if self.ema is None:
            self.add_state("sum", torch.float64, 0.0)
            self.add_state("count", torch.int32, 0)
        else:
            # order-dependent: every rank applies the global batch; state replicated
            self.exchanges_updates = True  # type: ignore[misc]
            self.add_state("ema_sum", torch.float64, 0.0, reduce=None)
            self.add_state("ema_weight", torch.float64, 0.0, reduce=None)

    def state_dict(self) -> dict[str, Any]:
        """:meth:`Scorer.state_dict` plus ``"ema"``, the decay (None for the plain mean)."""
        return {**super().state_dict(), "ema": self.ema}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """:meth:`Scorer.load_state_dict`, refusing a state of another ``ema`` decay too (its
        weighted sums would mix two decays, matching neither)."""
        saved = state_dict.get("ema") if isinstance(state_dict, dict) else None
        if saved != self.ema:
            raise StateMismatchError(
                f"This state was saved by {type(self).__name__}(ema={saved!r}); this scorer has "
                f"ema={self.ema!r}. Build it with the saved run's ema to resume."
            )
        super().load_state_dict(state_dict)

    def _scatter(self, indices: Tensor, values: Tensor, step: int) -> None:
        if self.ema is None:
            self._scatter_distinct(self._state, indices, values, step)  # repeats sum up too
            return
        # r presentations of one index in this batch, values v_1 … v_r in batch order:
        # S ← β^r S + Σ_k β^(r−k) v_k, W ← β^r W + Σ_k β^(r−k)
        sorted_idx, order, is_last = last_occurrence(indices)
        size = len(sorted_idx)
        position = torch.arange(size, device=indices.device)
        first = torch.ones_like(is_last)
        first[1:] = is_last[:-1]  # a group (one index) starts after the previous one's last
        start = torch.cummax(torch.where(first, position, 0), 0).values  # (B,) its group's first
        end = torch.where(is_last, position, size).flip(0).cummin(0).values.flip(0)  # … last row
        # β^(presentations after it) and β^r, r = the group's size; a Python β: no host → GPU copy
        weight = torch.pow(self.ema, (end - position).to(torch.float64))
        fade = torch.pow(self.ema, (end - start + 1).to(torch.float64))
        slot = torch.where(is_last, sorted_idx, self.num_examples)  # each index once; rest: trash
        for name, add in (
            ("ema_sum", weight * values[order].to(torch.float64)),
            ("ema_weight", weight),
        ):
            state = self._state[name]
            state.index_copy_(0, slot, state[slot] * fade)
            state.index_add_(0, sorted_idx, add)

    def _compute(self, state: dict[str, Tensor]) -> Tensor:
        if self.ema is None:
            count = state["count"]
            mean = state["sum"] / count.clamp_min(1)
            return torch.where(count > 0, mean, torch.nan).to(torch.float32)
        weight = state["ema_weight"]
        average = state["ema_sum"] / torch.where(weight > 0, weight, 1.0)
        return torch.where(weight > 0, average, torch.nan).to(torch.float32)


def last_occurrence(indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Group a batch's rows by index, keeping batch order within a group.

    Returns ``(sorted_indices, order, is_last)``: ``sorted_indices = indices[order]`` sorted stably,
    and ``is_last[k]`` true where row ``order[k]`` is the last presentation of its index in the
    batch. All on device, no host sync. Inside :func:`one_batch` the answer for one index tensor
    is computed once (an in-place change of the tensor bumps its version and is seen).
    """
    cache = _batch_cache()
    # inference tensors track no version, so an in-place change would go unseen: not cached
    tracked = cache is not None and not indices.is_inference()
    if tracked and cache is not None:
        hit = cache.get(("last", id(indices)))
        if hit is not None and hit[0] is indices and hit[1] == indices._version:
            grouped: tuple[Tensor, Tensor, Tensor] = hit[2]
            return grouped  # the same batch again (several scorers of one collection update)
    sorted_indices, order = torch.sort(indices, stable=True)
    is_last = torch.ones_like(sorted_indices, dtype=torch.bool)
    is_last[:-1] = sorted_indices[1:] != sorted_indices[:-1]
    result = (sorted_indices, order, is_last)
    if tracked and cache is not None:
        cache[("last", id(indices))] = (indices, indices._version, result)
    return result


def distinct_on_cpu(is_last: Tensor) -> bool:
    """True when ``is_last`` (from :func:`last_occurrence`) is on the CPU and all true: every index
    of the batch appears once, so the scorers may take their simpler, bit-identical scatter. False
    on other devices, where the answer would cost a host sync. Inside :func:`one_batch` the
    scorers of one collection update share the answer (one reduction for all of them)."""
    if is_last.device.type != "cpu":
        return False
    cache = _batch_cache()
    if cache is None or is_last.is_inference():  # no version to tell an in-place change
        return bool(is_last.all())
    hit = cache.get(("distinct", id(is_last)))
    if hit is not None and hit[0] is is_last and hit[1] == is_last._version:
        return bool(hit[2])
    distinct = bool(is_last.all())
    cache[("distinct", id(is_last))] = (is_last, is_last._version, distinct)
    return distinct


@contextmanager
def one_batch() -> Iterator[None]:
    """The scope of one batch's update by several scorers (a collection's): inside it,
    :func:`last_occurrence` and :func:`distinct_on_cpu` answer once per tensor. Nothing is
    remembered across updates: a caller may refill the same index tensor for the next batch in a
    way no version counter sees (through ``.numpy()``), and a stale grouping would be a silently
    wrong score. Per thread; nested scopes share the outermost one's answers."""
    if getattr(_SCOPE, "cache", None) is not None:
        yield
        return
    _SCOPE.cache = {}
    try:
        yield
    finally:
        _SCOPE.cache = None


def _batch_cache() -> dict[tuple[str, int], Any] | None:
    return getattr(_SCOPE, "cache", None)


# this thread's answers within one_batch() (None outside): key → (tensor, its version, answer)
_SCOPE = threading.local()


def _saved_counter(state_dict: dict[str, Any], key: str) -> int:
    """A counter saved as an int or a one-element integer tensor (0 when absent)."""
    value = state_dict.get(key, 0)
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StateMismatchError(
            f"Expected {key!r} to be a count >= 0 (an int or a one-element integer "
            f"tensor), but got {value!r}."
        )
    return value


def _saved_count(state_dict: dict[str, Any], key: str, default: int) -> int:
    """An int >= 0 stored under ``key`` of a saved state (``default`` when absent)."""
    value = state_dict.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StateMismatchError(
            f"Expected {key!r} in the state to be an int >= 0, but got {value!r} "
            f"({type(value).__name__})."
        )
    return value


# -- sequences ---------------------------------------------------------------------------------


def _check_sequence_options(
    ignore_index: Any, token_reduce: Any, min_token_accuracy: Any, chunk_tokens: Any
) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(
            f"Expected `ignore_index` to be an int (the target of tokens that do not count, "
            f"e.g. -100), but got {type(ignore_index).__name__}."
        )
    if token_reduce not in _TOKEN_REDUCE:
        raise ValueError(
            f"Expected `token_reduce` in {list(_TOKEN_REDUCE)}, but got {token_reduce!r}."
        )
    if isinstance(min_token_accuracy, bool) or not isinstance(min_token_accuracy, int | float):
        raise TypeError(
            f"Expected `min_token_accuracy` to be a float in (0, 1], but got "
            f"{type(min_token_accuracy).__name__}."
        )
    if not 0.0 < float(min_token_accuracy) <= 1.0:
        raise ValueError(
            f"Expected `min_token_accuracy` in (0, 1] (0.5: most valid tokens right; 1.0: every "
            f"token), but got {min_token_accuracy!r}."
        )
    if chunk_tokens is not None and (
        isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1
    ):
        raise ValueError(
            f"Expected `chunk_tokens` to be None or an int >= 1 (tokens per chunk), but got "
            f"{chunk_tokens!r}."
        )


class TokenBatch:
    """A validated sequence batch: per-token statistics as rows, reduced per example later.

    Tokens are the rows of :class:`~sampleweights.scorers.rowstats.RowStats` (``(B·T, C)``, a
    view of contiguous logits: the shared pass's fp32 buffer is the only ``(B·T, C)`` one), with
    ignored targets replaced by class 0 (their values are masked out by the reduction). With
    ``chunk_tokens`` the rows come in blocks of whole sequences (``chunk_tokens >= T``) or of
    ``chunk_tokens`` tokens of one sequence, each a view of contiguous logits, written into the
    ``(B, T)`` per-token values; only a Python loop over blocks, no host sync.

    Attributes:
        valid: ``(B, T)`` bool, the tokens whose target is not ``ignore_index``.
        empty: ``(B,)`` bool, the sequences without a valid token.
    """

    def __init__(
        self, logits: Tensor, targets: Tensor, ignore_index: int, chunk_tokens: int | None
    ) -> None:
        self.logits = logits
        self.valid = targets != ignore_index
        self.safe = torch.where(self.valid, targets, 0)
        self.empty = ~self.valid.any(dim=1)
        self.chunk_tokens = chunk_tokens

    def _blocks(self) -> list[tuple[int, int, int, int]]:
        """``(b0, b1, t0, t1)`` blocks covering the batch (one block without ``chunk_tokens``)."""
        batch, length, _ = self.logits.shape
        chunk = self.chunk_tokens
        if chunk is None or batch * length <= chunk:
            return [(0, batch, 0, length)]
        if chunk >= length:
            rows = chunk // length
            return [(b, min(b + rows, batch), 0, length) for b in range(0, batch, rows)]
        return [
            (b, b + 1, t, min(t + chunk, length))
            for b in range(batch)
            for t in range(0, length, chunk)
        ]

    def finite(self) -> Tensor:
        """``(B,)`` bool: sequences whose valid tokens have finite logits (see
        :func:`~sampleweights.validation.finite_rows`: ``x · 0`` sums to 0 exactly when finite)."""
        ok = torch.empty(self.valid.shape, dtype=torch.bool, device=self.logits.device)
        for b0, b1, t0, t1 in self._blocks():
            block = self.logits[b0:b1, t0:t1]
            ok[b0:b1, t0:t1] = block.mul(0).sum(dim=-1, dtype=torch.float32) == 0
        return (ok | ~self.valid).all(dim=1)

    def values(
        self, readers: list[Callable[[RowStats], Tensor]], *, margins: bool | None
    ) -> list[Tensor]:
        """Per-token values ``(B, T, ...)`` of every reader (``RowStats -> (rows, ...)``), all
        from one :class:`RowStats` per block, read in the given order."""
        from sampleweights.scorers.rowstats import RowStats

        batch, length, classes = self.logits.shape
        blocks = self._blocks()  # never empty: B·T = 0 is one (empty) block
        out: list[Tensor] = []
        for b0, b1, t0, t1 in blocks:
            rows = (b1 - b0) * (t1 - t0)
            block = self.logits[b0:b1, t0:t1].reshape(rows, classes)
            if block.stride(-1) != 1:
                # classes not adjacent in memory (class-major logits): a reduction over a strided
                # view sums in another order than over the copy a whole-batch reshape makes, so
                # every block is made contiguous, and chunked and whole batches give the same bits
                block = block.contiguous()
            stats = RowStats(block, self.safe[b0:b1, t0:t1].reshape(rows), margins=margins)
            got = [v.view(b1 - b0, t1 - t0, *v.shape[1:]) for v in (r(stats) for r in readers)]
            if len(blocks) == 1:
                return got
            if not out:
                out = [
                    torch.empty((batch, length, *v.shape[2:]), dtype=v.dtype, device=v.device)
                    for v in got
                ]
            for dst, v in zip(out, got, strict=True):
                dst[b0:b1, t0:t1] = v
        return out


def reduce_tokens(values: Tensor, valid: Tensor, how: TokenReduce) -> Tensor:
    """``values`` (B, T) or (B, T, k) reduced over each sequence's valid tokens (``valid``
    (B, T) bool) by ``how`` (``"mean"``, ``"sum"``, ``"max"``), in fp32; NaN for a sequence
    without a valid token. Masked with ``where`` (a NaN at an ignored token does not leak).

    Example:
        >>> import torch
        >>> v = torch.tensor([[1.0, 3.0, 9.0], [2.0, 0.0, 0.0]])
        >>> valid = torch.tensor([[True, True, False], [False, False, False]])
        >>> reduce_tokens(v, valid, "mean"), reduce_tokens(v, valid, "max")
        (tensor([2., nan]), tensor([3., nan]))
    """
    values = values.float()
    mask = valid if values.dim() == 2 else valid.view(*valid.shape, *[1] * (values.dim() - 2))
    empty = ~mask.any(dim=1)
    if how == "max":
        out = torch.where(mask, values, -torch.inf).amax(dim=1)
    else:
        out = torch.where(mask, values, 0.0).sum(dim=1)
        if how == "mean":
            count = mask.sum(dim=1, dtype=torch.float32).clamp_min(1.0)
            out = out / count
    return torch.where(empty, torch.nan, out)


def token_correct(correct: Tensor, valid: Tensor, min_accuracy: float) -> Tensor:
    """``(B,)`` bool: at least ``min_accuracy`` of a sequence's valid tokens are correct
    (``correct``, ``valid``: (B, T) bool). False for a sequence without a valid token (which
    has no value: ``_ingest`` drops it).

    Example:
        >>> import torch
        >>> hit = torch.tensor([[True, False, True], [True, False, False]])
        >>> token_correct(hit, torch.ones(2, 3, dtype=torch.bool), 0.5)
        tensor([ True, False])
    """
    # the fraction in float64, as Python's hits / count >= min_accuracy: in float32,
    # 0.3 · 50 = 15.000001 would reject 15 right tokens of 50
    hits = (correct & valid).sum(dim=1, dtype=torch.float64)
    count = valid.sum(dim=1, dtype=torch.float64)
    return (hits / count.clamp_min(1.0) >= min_accuracy) & (count > 0)
