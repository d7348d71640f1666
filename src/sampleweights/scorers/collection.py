"""Several logit scorers fed by one call: :class:`ScorerCollection`.

After torchmetrics' ``MetricCollection``: one ``update(batch, logits)`` reads and validates the
batch once, computes the per-row statistics the scorers share once (a
:class:`~sampleweights.scorers.rowstats.RowStats`: argmax, ``p_y``, log-normaliser, loss, entropy,
margins, EL2N — each on first use), and hands every scorer its values. Each scorer keeps its own
state, reductions and persistence, so the scores are bit for bit those of the same scorers
updated separately.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from sampleweights.data import BatchLayout
from sampleweights.distributed import (
    OP_COMPUTE,
    OP_UPDATE,
    DistributedMismatchError,
    all_gather_uneven,
    all_reduce_many,
    exchange_header,
    is_distributed,
    world,
)
from sampleweights.errors import StateMismatchError
from sampleweights.scorers.base import Scorer, TokenBatch, one_batch
from sampleweights.scorers.fused import CompiledUpdate, compile_error, compiled_update, fusable
from sampleweights.scorers.rowstats import RowStats, _fused, _fused_any_shape, _FusedRowStats
from sampleweights.scorers.stats import Entropy
from sampleweights.validation import finite_rows

__all__ = ["ScorerCollection"]


class ScorerCollection:
    """Update several logit scorers with one call; ``compute()`` gives ``{name: scores}``.

    Accepts scorers that take logits (EL2N, AUM, DataMaps, Loss, Margin, Entropy, Confidence,
    ForgettingTracker, Misclassified, your own :class:`~sampleweights.Scorer` subclasses);
    each must have a distinct ``name`` and the same ``num_examples``. The batch is read with the
    first scorer's ``layout`` (or ``layout=``) and checked once for every distinct
    ``(validate, nonfinite)`` policy among the scorers; every scorer's values are computed before
    any state changes, so a rejected batch leaves every scorer as it was.
    :func:`~sampleweights.score_dataset` accepts a collection like a scorer.

    Under ``torch.distributed`` each scorer does its own reductions (at ``compute()``) and, for
    order-dependent ones, its own per-update exchange; ``compute()`` calls them in the
    collection's order, the same on every rank.

    Args:
        *scorers: logit scorers (at least one).
        layout: where ``update(batch, logits)`` finds index and target; default: the first
            scorer's.
        compile: use ``torch.compile`` (inductor: C++ on the CPU, Triton on CUDA) for ``(B, C)``
            batches. When every scorer is a built-in one with a plain mean (EL2N, AUM, DataMaps,
            ForgettingTracker, Misclassified, Loss, Margin, Entropy, Confidence; no ``ema=``),
            ``nonfinite="raise"`` and ``validate=True``, each update is **one compiled call**:
            the shared statistics, every scorer's values and every state update, fused (the
            finiteness check too; the other checks stay eager and come first). It needs the
            batch's indices on the CPU (as a DataLoader gives them) and distinct; a batch with
            repeated indices, a run's first update, or a collection under
            ``torch.distributed`` takes the eager path for that update. Otherwise only the
            shared statistics are compiled. Pays below ~1000 classes (see
            docs/performance.md); at 32 000 the eager default is as fast. Off by default: the
            first batch of each new shape compiles (seconds), after a few shapes one
            dynamic-shape kernel takes every size. The statistics follow the same formulas
            but round in the compiler's order, so scores can differ from the eager path's in
            the last bits (sums over the classes in another order, ~√C float32 ulps: ≤ 5e-7
            relative up to 1000 classes, ≤ 2e-5 at 32 000); correctness (forgetting,
            misclassified) and every count are identical. Falls back to the eager path, with
            a warning, if compilation fails, dynamo's recompile limit included (8 kinds of
            call per process by default: many differently composed collections in one process
            can spend it).

    Raises:
        TypeError: an argument is not a scorer, or ``compile`` is not a bool, or a scorer runs
            the model itself
            (``GraNd``): update that one separately (``g.update(batch)``), or pass both the
            collection and it to ``score_dataset``.
        ValueError: no scorers, duplicate names, or different ``num_examples``.

    Example:
        >>> import torch, sampleweights as sw
        >>> scorers = sw.ScorerCollection(sw.EL2N(4), sw.AUM(4), sw.Misclassified(4))
        >>> scorers.update_indexed(torch.tensor([0, 1]), torch.tensor([[2.0, 0.0], [2.0, 0.0]]),
        ...                        torch.tensor([0, 1]))
        >>> scores = scorers.compute()
        >>> sorted(scores), scores["aum"]
        (['aum', 'el2n', 'misclassified'], tensor([ 2., -2., nan, nan]))
    """

    #: a collection holds logit scorers only (see :func:`~sampleweights.score_dataset`)
    requires_model: ClassVar[bool] = False

    def __init__(
        self, *scorers: Scorer, layout: BatchLayout | None = None, compile: bool = False
    ) -> None:
        if not scorers:
            raise ValueError("ScorerCollection needs at least one scorer, e.g. sw.EL2N(n).")
        for s in scorers:
            if not isinstance(s, Scorer):
                raise TypeError(
                    f"Expected scorers (sw.EL2N, sw.AUM, ...), but got {type(s).__name__}."
                )
            if s.requires_model:
                raise TypeError(
                    f"{type(s).__name__} runs the model itself (update(batch), no logits), so it "
                    "cannot share a collection's logits: update it separately, or pass the "
                    "collection and it to sw.score_dataset(model, loader, collection, scorer)."
                )
        names = [s.name for s in scorers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"Scorer names must be distinct (compute() returns name → scores), but "
                f"{duplicates} appear more than once. Use one collection per configuration."
            )
        sizes = sorted({s.num_examples for s in scorers})
        if len(sizes) > 1:
            raise ValueError(
                f"Expected every scorer to have the same num_examples (one dataset), but got "
                f"{sizes}."
            )
        if layout is not None and not isinstance(layout, BatchLayout):
            raise TypeError(
                f"Expected `layout` to be a sw.BatchLayout, but got {type(layout).__name__}."
            )
        if not isinstance(compile, bool):
            raise TypeError(
                f"Expected `compile` to be True or False (torch.compile the shared statistics), "
                f"but got {type(compile).__name__}."
            )
        self._scorers: dict[str, Scorer] = dict(zip(names, scorers, strict=True))
        self._fused: _CompiledPass | None = None
        # the whole update as one compiled call, when every scorer is fusable
        self._whole: CompiledUpdate | None = None
        if compile and all(fusable(s) for s in scorers):
            self._whole = compiled_update()
            # each update's step numbers, written through numpy (no dispatch) into one tensor
            self._steps_numpy = np.zeros(len(scorers), dtype=np.int64)
            self._steps = torch.from_numpy(self._steps_numpy)
        if compile:
            self._fused = _compiled_fused()
        self._entropy = any(isinstance(s, Entropy) for s in scorers)
        self.layout = layout or scorers[0].layout
        self.num_examples = sizes[0]

    # -- container -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._scorers)

    def __iter__(self) -> Iterator[Scorer]:
        return iter(self._scorers.values())

    def __getitem__(self, name: str) -> Scorer:
        return self._scorers[name]

    def keys(self) -> list[str]:
        """The scorers' names, in order."""
        return list(self._scorers)

    # -- updates ---------------------------------------------------------------------------------
    def update(self, batch: Any, logits: Tensor) -> None:
        """Score one batch with every scorer (see :meth:`Scorer.update`)."""
        self.update_indexed(self.layout.indices(batch), logits, self.layout.targets(batch))

    def update_indexed(self, indices: Any, logits: Tensor, targets: Any) -> None:
        """Score one batch given explicitly (see :meth:`Scorer.update_indexed`).

        Every check and every scorer's values come before any state changes. Under
        ``torch.distributed`` the order-dependent scorers share one exchange (a collective).
        Sequences (``(B, T, C)`` logits, ``(B, T)`` targets): one set of token statistics for
        every scorer (in blocks of the smallest ``chunk_tokens`` among them, if any), each
        scorer reducing them per example its own way; the scorers must share one
        ``ignore_index``.
        """
        with one_batch():  # the scorers share the grouping of this batch's indices, only
            self._update_indexed(indices, logits, targets)

    def _update_indexed(self, indices: Any, logits: Tensor, targets: Any) -> None:
        scorers = list(self._scorers.values())
        sequence = isinstance(logits, Tensor) and logits.dim() == 3
        ignore = sorted({s.ignore_index for s in scorers})
        if sequence and len(ignore) > 1:
            raise ValueError(
                f"Expected the scorers of a collection to share one `ignore_index` for sequence "
                f"batches, but got {ignore}: build them with the same ignore_index=..."
            )
        # a fusable collection checks the logits' finiteness inside its compiled call (fusable
        # is checked per update: nonfinite and validate can be changed after construction)
        fused = self._whole is not None and not sequence and all(fusable(s) for s in scorers)
        checked: dict[tuple[bool, str], tuple[Tensor, Tensor, Tensor]] = {}
        for s in scorers:
            policy = (s.validate, s.nonfinite)
            if policy not in checked:
                checked[policy] = s._validate(indices, logits, targets, check_finite=not fused)
        index_t, logits_t, target_t = next(iter(checked.values()))
        target_t = target_t.to(logits_t.device, torch.int64, non_blocking=True)
        skip = any(s.nonfinite == "skip" for s in scorers)
        if sequence:
            self._update_tokens(scorers, index_t, logits_t, target_t, skip)
            return
        if fused:
            if self._update_fused(scorers, index_t, logits_t, target_t):
                return
            scorers[0]._check_finite(logits_t)  # every scorer's nonfinite is "raise"
        finite = finite_rows(logits_t) if skip else None
        stats = self._row_stats(logits_t, target_t)
        values: list[Tensor | None] = [None] * len(scorers)
        # the entropy consumes the shared buffer: read it after everything else
        for k in sorted(range(len(scorers)), key=lambda k: isinstance(scorers[k], Entropy)):
            value = scorers[k]._values_from(stats)
            if not isinstance(value, Tensor) or value.dim() == 0 or len(value) != len(logits_t):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise TypeError(
                    f"{type(scorers[k]).__name__}._values_from(stats) must return a tensor with "
                    f"one row per example ({len(logits_t)}, ...), but returned {got}."
                )
            values[k] = value
        ready = [v for v in values if v is not None]
        exchanged = self._exchange(index_t, ready, finite)
        for s, v in zip(scorers, ready, strict=True):
            s._ingest(index_t, v, finite if s.nonfinite == "skip" else None, exchanged.get(s.name))

    def _update_fused(
        self, scorers: list[Scorer], indices: Tensor, logits: Tensor, targets: Tensor
    ) -> bool:
        """Statistics, values and every state update of a validated ``(B, C)`` batch in one
        compiled call (see :mod:`sampleweights.scorers.fused`), where that is exactly what the
        eager path would do: at least one row and two classes, no process group, every state
        already on the logits' device in a run already started (no device move or
        ``_begin_run`` pending), and the indices on the CPU (so checking that they are
        distinct costs no host sync) and distinct. Returns False, having changed nothing,
        where any of that fails: the caller takes the eager path."""
        whole, device = self._whole, logits.device
        if whole is None or logits.shape[0] == 0 or logits.shape[1] < 2:
            return False
        if indices.device.type != "cpu" or not _distinct(indices):
            return False
        for s in scorers:
            if (
                is_distributed(s.process_group)
                or not s._device_fixed
                or s._device != device
                or s._staging is not None
                or s._run_updates == 0
            ):
                return False
        self._steps_numpy[:] = [s.num_updates + 1 for s in scorers]  # what _count_update counts
        kinds = tuple(type(s) for s in scorers)
        states = [s._state for s in scorers]
        try:
            finite = whole(
                logits,
                targets,
                indices.to(device, torch.int64, non_blocking=True),
                self._steps.to(device, non_blocking=True),  # a staged copy on CUDA: no wait
                kinds,
                states,
                self._entropy,
            )
        except Exception as err:
            if not compile_error(err):
                # an error from running it: the states may hold part of this batch, and
                # applying it again eagerly would count it twice
                raise
            # compilation failed, before any of the update ran (fullgraph): the eager path
            self._compile_failed(err, "the whole update", stacklevel=5)
            return False
        if not bool(finite):  # the states are unchanged (every row went to the trash slot)
            scorers[0]._check_finite(logits)  # raises, naming the rows
        for s in scorers:
            s._count_update(device)
        return True

    def _row_stats(self, logits: Tensor, targets: Tensor) -> RowStats:
        """The batch's shared statistics: compiled when asked for (and the batch has two
        classes or more: a single class leaves the margins to raise, eagerly), else eager."""
        if self._fused is None or logits.shape[1] < 2 or logits.shape[0] == 0:
            return RowStats(logits, targets, margins=True)
        try:
            fused = self._fused(logits, targets, self._entropy)
        except Exception as err:  # a compiler missing or failing (a pure function: no state)
            self._compile_failed(err, "the statistics", stacklevel=5)
            return RowStats(logits, targets, margins=True)
        return _FusedRowStats(logits, targets, fused)

    def _compile_failed(self, err: Exception, what: str, stacklevel: int) -> None:
        """Turn every compiled path off (one warning, not one per path)."""
        self._fused = self._whole = None
        warnings.warn(
            f"ScorerCollection(compile=True): torch.compile of {what} failed "
            f"({type(err).__name__}: {err}); updating the scorers eagerly from now on.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )

    def _update_tokens(
        self, scorers: list[Scorer], indices: Tensor, logits: Tensor, targets: Tensor, skip: bool
    ) -> None:
        """``update_indexed`` for a validated sequence batch (see :class:`TokenBatch`)."""
        chunks = [s.chunk_tokens for s in scorers if s.chunk_tokens is not None]
        tokens = TokenBatch(logits, targets, scorers[0].ignore_index, min(chunks, default=None))
        finite = tokens.finite() if skip else None
        # the entropy consumes the shared buffer: read it after everything else
        order = sorted(range(len(scorers)), key=lambda k: isinstance(scorers[k], Entropy))
        per_token = tokens.values([scorers[k]._values_from for k in order], margins=True)
        values: list[Tensor] = [per_token[0]] * len(scorers)
        for k, v in zip(order, per_token, strict=True):
            values[k] = scorers[k]._reduce_tokens(v, tokens.valid)
        # sequences without a valid token travel to the trash slot, for the exchange too
        kept = torch.where(
            tokens.empty, self.num_examples, indices.to(tokens.empty.device, non_blocking=True)
        )
        exchanged = self._exchange(kept, values, finite)
        for s, v in zip(scorers, values, strict=True):
            s._ingest(
                indices,
                v,
                finite if s.nonfinite == "skip" else None,
                exchanged.get(s.name),
                empty=tokens.empty,
            )

    def _exchange(
        self, indices: Tensor, values: list[Tensor], finite: Tensor | None
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """One exchange per process group for every order-dependent scorer (forgetting, EMA):
        a header and one all-gather of every ``(index, value)`` row, bit-cast to int64; returns
        ``{name: (global indices, global values)}`` (empty without torch.distributed)."""
        groups: dict[int, list[tuple[Scorer, Tensor]]] = {}
        for s, v in zip(self._scorers.values(), values, strict=True):
            if s.exchanges_updates and is_distributed(s.process_group):
                groups.setdefault(id(s.process_group), []).append((s, v))
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for members in groups.values():
            first, group = members[0][0], members[0][0].process_group
            device = members[0][1].device
            local = indices.to(device, torch.int64, non_blocking=True)
            masked = local if finite is None else torch.where(finite, local, self.num_examples)
            rows = exchange_header(
                self._tag(members),
                OP_UPDATE,
                run=first.num_runs + (first._run_updates == 0),
                num_updates=first.num_updates,
                length=local.numel(),
                device=device,
                group=group,
            )
            packed = [local, masked]
            for _, v in members:
                packed += list(_to_int64_rows(v))
            gathered = all_gather_uneven(packed, group, counts=[row[5] for row in rows])
            every, every_masked, start = gathered[0], gathered[1], 2
            for s, v in members:
                width = math.prod(v.shape[1:])
                value = _from_int64_rows(gathered[start : start + width], v)
                out[s.name] = (every_masked if s.nonfinite == "skip" else every, value)
                start += width
        return out

    def _tag(self, members: list[tuple[Scorer, Tensor]]) -> str:
        return f"ScorerCollection({', '.join(s.name for s, _ in members)})"

    def new_run(self) -> None:
        """Start a new training run on every scorer (see :meth:`Scorer.new_run`)."""
        for s in self._scorers.values():
            s.new_run()

    # -- results ---------------------------------------------------------------------------------
    def compute(self) -> dict[str, Tensor]:
        """``{name: scores}``, each what the scorer's ``compute()`` returns.

        Under ``torch.distributed`` a collective: one header, then one all-reduce per
        (reduction, dtype) for every scorer's declared reductions together (the sums of all
        running means in one), plus the collectives of scorers that merge their own way
        (``Misclassified``).
        """
        scorers = list(self._scorers.values())
        if not any(is_distributed(s.process_group) for s in scorers):
            return {name: s.compute() for name, s in self._scorers.items()}
        groups: dict[int, list[Scorer]] = {}
        for s in scorers:
            groups.setdefault(id(s.process_group), []).append(s)
        scores: dict[str, Tensor] = {}
        for members in groups.values():
            scores.update(self._compute_group(members))
        return {name: scores[name] for name in self._scorers}

    def _compute_group(self, members: list[Scorer]) -> dict[str, Tensor]:
        group = members[0].process_group
        if not is_distributed(group):
            return {s.name: s.compute() for s in members}
        for s in members:
            s._flush()
        first = members[0]
        size, rank = world(group)
        exchange_header(
            f"ScorerCollection({', '.join(s.name for s in members)})",
            OP_COMPUTE,
            run=first.num_runs,
            num_updates=first.num_updates,
            length=first._run_updates,
            device=first.device,
            group=group,
            require_equal_updates=False,
        )
        # every rank's (num_updates, num_runs, run updates) per scorer travel in the int64 sum
        counts = torch.zeros(size, len(members), 3, dtype=torch.int64, device=first.device)
        counts[rank] = torch.tensor(
            [[s.num_updates, s.num_runs, s._run_updates] for s in members], dtype=torch.int64
        )
        states = [{k: v[: s.num_examples] for k, v in s._state.items()} for s in members]
        fused: dict[tuple[str, torch.dtype], list[tuple[int, str | None, Tensor]]] = {}
        fused[("sum", torch.int64)] = [(-1, None, counts)]
        for k, s in enumerate(members):
            fused[("sum", torch.int64)].append((k, None, s._skipped.to(torch.int64).view(1)))
            fused[("sum", torch.int64)].append((k, "", s._empty.to(torch.int64).view(1)))
            if type(s)._merge is not Scorer._merge:
                continue  # merges its own way, below
            for name, spec in s._specs.items():
                if spec.reduce is not None:
                    entry = (k, name, states[k][name])
                    fused.setdefault((spec.reduce, spec.dtype), []).append(entry)
        merged = [dict(state) for state in states]
        skipped: list[Tensor] = [torch.zeros(())] * len(members)
        empty: list[Tensor] = [torch.zeros(())] * len(members)
        for (op, _), entries in fused.items():
            results = all_reduce_many([t for _, _, t in entries], op, group)
            for (k, key, _), result in zip(entries, results, strict=True):
                if k < 0:
                    counts = result
                elif key is None:
                    skipped[k] = result.view(())
                elif key == "":
                    empty[k] = result.view(())
                else:
                    merged[k][key] = result
        every = counts.tolist()  # (rank, scorer, [updates, runs, run updates])
        for k, s in enumerate(members):
            rows = [every[r][k] for r in range(size)]
            if s.exchanges_updates and any(row[:2] != rows[0][:2] for row in rows):
                raise DistributedMismatchError(_out_of_step(s.name, rows))
            s._rank_updates = [row[0] for row in rows]
            s._rank_run_updates = [row[2] for row in rows]
        out = {}
        for k, s in enumerate(members):
            if type(s)._merge is not Scorer._merge:
                merged[k] = s._merge(states[k])
            out[s.name] = s._finish(merged[k], skipped[k], empty[k], stacklevel=3)
        return out

    def reset(self) -> None:
        """Reset every scorer."""
        for s in self._scorers.values():
            s.reset()

    def to(self, device: torch.device | str) -> ScorerCollection:
        """Move every scorer's state to ``device``; returns self."""
        for s in self._scorers.values():
            s.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """``{"collection": [names], "scorers": {name: scorer.state_dict()}}``."""
        return {
            "collection": list(self._scorers),
            "scorers": {name: s.state_dict() for name, s in self._scorers.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: all scorers or none.

        Raises:
            StateMismatchError: the state holds other scorers, or a scorer rejects its part (the
                scorers already loaded are restored, so nothing changes).
        """
        if (
            not isinstance(state_dict, dict)
            or not isinstance(state_dict.get("scorers"), dict)
            or set(state_dict["scorers"]) != set(self._scorers)
        ):
            got = (
                sorted(state_dict["scorers"])
                if isinstance(state_dict, dict) and isinstance(state_dict.get("scorers"), dict)
                else type(state_dict).__name__
            )
            raise StateMismatchError(
                f"Expected the state_dict of a ScorerCollection of {sorted(self._scorers)}, but "
                f"got {got}."
            )
        before = {name: s.state_dict() for name, s in self._scorers.items()}
        loaded: list[str] = []
        try:
            for name, s in self._scorers.items():
                s.load_state_dict(state_dict["scorers"][name])
                loaded.append(name)
        except Exception:
            for name in loaded:
                self._scorers[name].load_state_dict(before[name])
            raise

    def __repr__(self) -> str:
        return f"ScorerCollection({', '.join(repr(s) for s in self._scorers.values())})"


def _to_int64_rows(values: Tensor) -> list[Tensor]:
    """``(B,)`` or ``(B, k)`` values of any dtype as 1-D int64 rows that keep every bit (floats
    bit-cast to the integer of their width), for one integer all-gather."""
    flat = values.reshape(values.shape[0], math.prod(values.shape[1:]))
    if flat.dtype.is_floating_point:
        flat = flat.contiguous().view(_SAME_WIDTH[flat.element_size()])
    return list(flat.to(torch.int64).T)


def _from_int64_rows(rows: list[Tensor], like: Tensor) -> Tensor:
    """The inverse of :func:`_to_int64_rows` for gathered rows: values of ``like``'s dtype and
    trailing shape."""
    flat = torch.stack(rows, dim=1)  # (B_global, k)
    if like.dtype.is_floating_point:
        flat = flat.to(_SAME_WIDTH[like.element_size()]).view(like.dtype)
    else:
        flat = flat.to(like.dtype)
    return flat.reshape(flat.shape[0], *like.shape[1:])


_SAME_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class _CompiledPass:
    """The shared statistics' pass under ``torch.compile``: static-shape kernels (the fastest)
    for the first ``_STATIC_SHAPES`` input kinds (shape, dtype, device, entropy or not), which
    covers a training loop's batch size and its last, shorter batch; one dynamic-shape kernel
    for any further kind, so varying batch sizes never recompile again."""

    def __init__(self) -> None:
        self.static = torch.compile(_fused, dynamic=False)
        self.dynamic = torch.compile(_fused_any_shape, dynamic=True)
        self.kinds: set[tuple[Any, ...]] = set()

    def __call__(self, logits: Tensor, targets: Tensor, entropy: bool) -> tuple[Tensor, ...]:
        kind = (tuple(logits.shape), logits.dtype, logits.device, entropy)
        if kind in self.kinds or len(self.kinds) < _STATIC_SHAPES:
            self.kinds.add(kind)
            return tuple(self.static(logits, targets, entropy))
        return tuple(self.dynamic(logits, targets, entropy))


_STATIC_SHAPES = 4
_COMPILED: list[_CompiledPass] = []  # the one compiled pass, made on demand


def _compiled_fused() -> _CompiledPass:
    """The compiled pass, made once per process: its kernels are shared by every collection
    that asks for them (compilation happens at the first batch of each kind, not here)."""
    if not _COMPILED:
        _COMPILED.append(_CompiledPass())
    return _COMPILED[0]


def _distinct(indices: Tensor) -> bool:
    """Whether a CPU index tensor (B,) holds every index once: numpy's sort, a quarter of the
    cost of torch's at a few hundred rows (no dispatch)."""
    ordered = np.sort(indices.numpy())
    return bool((ordered[1:] != ordered[:-1]).all())


def _out_of_step(name: str, rows: list[list[int]]) -> str:
    ranks = "; ".join(
        f"rank {r}: {updates} update(s) in {runs} run(s)"
        for r, (updates, runs, _) in enumerate(rows)
    )
    return (
        f"ScorerCollection.compute(): {name} is order-dependent and the ranks are out of step "
        f"({ranks}). Every rank must call update() the same number of times (and new_run() "
        "together): on a rank that has no batch for a step call update_indexed with an empty "
        "batch (0 indices, (0, C) logits, 0 targets)."
    )
