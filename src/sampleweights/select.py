"""From scores to a subset: :func:`select`.

Strategies, each applied after ``offset`` removed the very highest scores:

* ``"hardest"`` — the highest scores (Data Diet keeps high EL2N/GraNd examples);
* ``"easiest"`` — the lowest scores (the control every pruning paper reports);
* ``"random"`` — a seeded uniform subset (the baseline that is hard to beat at small scale);
* ``"stratified"`` — coverage-centric selection (Zheng et al., "Coverage-centric Coreset Selection
  for High Pruning Rates", ICLR 2023): equal-width score bins, the budget spread over the bins from
  the smallest bin up, uniform within a bin.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from sampleweights.validation import as_float_vector

__all__ = ["Strategy", "select"]

Strategy = Literal["hardest", "easiest", "random", "stratified"]
_STRATEGIES: tuple[str, ...] = get_args(Strategy)


def _as_scores(scores: Any, name: str = "scores") -> Tensor:
    scores = as_float_vector(scores, name, "a scorer's compute()")
    # keep float32/float64 as given (no upcast copy of a 10⁸-entry vector); halves go to fp32
    dtype = scores.dtype if scores.dtype in (torch.float32, torch.float64) else torch.float32
    values: Tensor = scores.detach().to("cpu", dtype)
    nan = int(torch.isnan(values).sum())
    if nan:
        raise ValueError(
            f"`{name}` has {nan} NaN entries of {values.numel()}: those examples were never "
            "scored. Score the full dataset (sw.score_dataset over a loader of the whole "
            "dataset) before selecting."
        )
    if bool((values == -torch.inf).any()):
        raise ValueError(f"`{name}` contains -inf; scores must be finite or +inf (never learned).")
    return values


def _count(value: Any, total: int, name: str, *, allow_zero: bool) -> int:
    """A fraction (float) or count (int) of ``total`` as a count."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(
            f"Expected `{name}` to be a fraction (float) or a count (int), but got "
            f"{type(value).__name__}."
        )
    low = "[0" if allow_zero else "(0"
    if isinstance(value, float | np.floating):
        if not (0.0 <= value <= 1.0) or (value == 0.0 and not allow_zero):
            raise ValueError(
                f"Expected `{name}` to be a fraction in {low}, 1] or a count in "
                f"[{0 if allow_zero else 1}, {total}], but got {value}."
            )
        return round(float(value) * total)
    if not (0 if allow_zero else 1) <= value <= total:
        raise ValueError(
            f"Expected `{name}` to be a fraction in {low}, 1] or a count in "
            f"[{0 if allow_zero else 1}, {total}], but got {value}."
        )
    return int(value)


def _largest_remainder(counts: Tensor, budget: int) -> Tensor:
    """Integer quotas proportional to ``counts`` summing exactly to ``budget``."""
    total = int(counts.sum())
    # in integers: the remainders (counts · budget) mod total are exact, so equal fractional
    # parts tie exactly (in float64, 36·42/70 − 21 = 0.6000000000000014 beat a true 0.6)
    share = counts.to(torch.int64) * budget
    quota = share // total
    rest = budget - int(quota.sum())
    if rest:
        # largest fractional part first; ties to the lower class id (stable sort)
        order = torch.sort(share - quota * total, descending=True, stable=True).indices
        quota[order[:rest]] += 1
    return quota


def _take(
    pool: Tensor, pool_scores: Tensor, k: int, strategy: str, bins: int, gen: torch.Generator
) -> Tensor:
    """``k`` members of ``pool`` (ordered hardest first) by ``strategy``."""
    if k == 0:
        return pool[:0]
    if strategy == "hardest":
        return pool[:k]
    if strategy == "easiest":
        return pool[len(pool) - k :]
    if strategy == "random":
        return pool[torch.randperm(len(pool), generator=gen)[:k]]
    return _stratified(pool, pool_scores, k, bins, gen)


def _strata(values: Tensor, bins: int) -> Tensor:
    """CCS's stratum of each finite score: ``bins`` equal-width strata over
    ``[min, max · 1.0001)``, edges ``min + k · step`` computed as CCS computes them (in the scores'
    dtype), so every score lands in the stratum CCS puts it in.

    Two cases CCS does not handle: when ``max ≤ 0`` (``max · 1.0001 ≤ max``, so CCS's edges
    run downwards and it drops scores from every stratum) the top edge is
    ``max + (max − min) · 1e-4`` instead, the same 0.01 % margin of the range; and a range whose
    width overflows the dtype (float32 scores spanning ±3e38) is binned in float64 after
    dividing by ``max |score|`` — the same strata, without ``inf``/``NaN`` edges.
    """
    lo, hi = values.min(), values.max()
    top = hi * 1.0001 if bool(hi > 0) else hi + (hi - lo) * 1e-4
    step = (top - lo) / bins
    if not bool(torch.isfinite(step)):
        scale = torch.maximum(lo.abs(), hi.abs()).to(torch.float64)
        return _strata(values.to(torch.float64) / scale, bins)
    edges = torch.stack([lo + k * step for k in range(bins + 1)])  # as CCS's bin_range(k)
    # stratum k holds edges[k] ≤ s < edges[k + 1]
    ids = torch.searchsorted(edges, values, right=True) - 1
    return ids.clamp_(0, bins - 1)


def _stratified(
    pool: Tensor, pool_scores: Tensor, k: int, bins: int, gen: torch.Generator
) -> Tensor:
    finite = torch.isfinite(pool_scores)
    bin_id = torch.full((len(pool),), bins, dtype=torch.int64)  # +inf: a stratum of its own
    if bool(finite.any()):
        bin_id[finite] = _strata(pool_scores[finite], bins)
    sizes = torch.bincount(bin_id, minlength=bins + 1)
    starts = torch.cumsum(sizes, 0) - sizes
    grouped = pool[torch.argsort(bin_id, stable=True)]  # members of each stratum contiguous
    # CCS's bin_allocate: strata in the order of torch.argsort of their sizes (empty ones too),
    # each taking min(size, remaining budget // strata left). The very call CCS makes, on the
    # same size vector, so equal sizes come in the same order; the +inf stratum (which CCS does
    # not have) joins only when it is occupied.
    counted = sizes if bool(sizes[bins] > 0) else sizes[:bins]
    order = torch.argsort(counted).tolist()
    budget = [0] * (bins + 1)
    remaining = k
    for i, b in enumerate(order):  # at most bins + 1 iterations
        budget[b] = min(int(counted[b]), remaining // (len(order) - i))
        remaining -= budget[b]
    chosen = []
    for b in range(bins + 1):
        if budget[b]:
            size, start = int(sizes[b]), int(starts[b])
            pick = torch.randperm(size, generator=gen)[: budget[b]] + start
            chosen.append(grouped[pick])
    return torch.cat(chosen) if chosen else pool[:0]


def select(
    scores: Tensor,
    keep: float | int,
    strategy: Strategy = "hardest",
    *,
    offset: float | int = 0.0,
    labels: Tensor | None = None,
    class_balanced: bool = False,
    seed: int = 0,
    bins: int = 50,
    cutoff_scores: Tensor | None = None,
    cutoff: float | int = 0.0,
) -> Tensor:
    """Choose examples from their scores; returns a sorted LongTensor of dataset indices.

    Args:
        scores: ``(N,)`` float scores (a scorer's ``compute()``); higher = harder. ``+inf``
            (never learned) ranks hardest; NaN (never scored) is an error.
        keep: how many to keep: a fraction in (0, 1] (``round(keep · N)`` examples) or a count in
            [1, N]. A bool is a TypeError.
        strategy: ``"hardest"``, ``"easiest"``, ``"random"`` or ``"stratified"`` (CCS).
        offset: a fraction (of N) or count of the highest-scoring examples removed from the pool
            before any strategy (Data Diet's offset window, CCS's hard cut-off; for noisy labels).
        labels: ``(N,)`` integer class labels, needed for ``class_balanced``.
        class_balanced: keep the same fraction of every class (per-class counts by largest
            remainder, so the total is exactly the requested count).
        seed: seeds the tie-breaking permutation and the random choices.
        bins: number of equal-width score bins for ``"stratified"`` (+inf gets its own bin).
        cutoff_scores: ``(N,)`` a *second* score that ``cutoff`` removes the hardest of (higher =
            harder), before any strategy. CCS cuts the lowest-AUM examples (likely mislabelled)
            and stratifies by another score: ``cutoff_scores=-aum``.
        cutoff: a fraction (of N, rounded) or count removed from the top of ``cutoff_scores``
            first; then ``offset`` removes the highest ``scores`` among the rest.

    Stratified selection is CCS's ``stratified_sampling`` (after ``mislabel_mask`` with
    ``cutoff``): ``bins`` strata of equal width over ``[min, max·1.0001)`` of the pool's finite
    scores, edges computed as CCS computes them; the budget is spread over the strata in the
    order of ``torch.argsort`` of their sizes (as CCS), each taking ``min(size, remaining //
    strata left)``; the members are drawn uniformly within a stratum. Differences: fractions
    round (CCS truncates ``int(ratio · N)``: pass counts to reproduce it), and a pool whose
    maximum is ≤ 0 (CCS's ``max · 1.0001`` then lies below the maximum, so its edges run
    downwards) is binned over ``[min, max + (max − min) · 1e-4)``. A range too wide for the
    dtype (float32 spanning ±3e38) is binned in float64.

    Ties are broken by a seeded random permutation: forgetting and error-set scores are mostly
    ties, and index order would favour low indices.

    Raises:
        TypeError, ValueError: for the cases above; the messages name the argument.

    Example:
        >>> import torch
        >>> scores = torch.tensor([0.1, 0.9, 0.5, float("inf"), 0.3])
        >>> select(scores, 2).tolist()                     # hardest: +inf, then 0.9
        [1, 3]
        >>> select(scores, 0.4, "easiest").tolist()
        [0, 4]
        >>> select(scores, 2, offset=1).tolist()           # skip the single hardest first
        [1, 2]
        >>> aum = torch.tensor([3.0, -2.0, 1.0, 0.5, 2.0])   # example 1: likely mislabelled
        >>> select(scores, 4, "stratified", cutoff_scores=-aum, cutoff=1).tolist()   # CCS
        [0, 2, 3, 4]
    """
    values = _as_scores(scores)
    n = values.numel()
    if strategy not in _STRATEGIES:
        raise ValueError(f"Unknown `strategy` {strategy!r}; expected one of {list(_STRATEGIES)}.")
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer):
        raise TypeError(f"Expected `bins` to be an int ≥ 1, but got {type(bins).__name__}.")
    if bins < 1:
        raise ValueError(f"Expected `bins` to be an int ≥ 1, but got {bins!r}.")
    bins = int(bins)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"Expected `seed` to be an int, but got {type(seed).__name__}.")
    if not -(2**63) <= int(seed) < 2**64:
        raise ValueError(f"Expected `seed` in [-2**63, 2**64) (a 64-bit seed), but got {seed}.")
    k = _count(keep, n, "keep", allow_zero=False)
    skip = _count(offset, n, "offset", allow_zero=True)
    cut = _count(cutoff, n, "cutoff", allow_zero=True)
    cut_values: Tensor | None = None
    if cutoff_scores is not None:
        cut_values = _as_scores(cutoff_scores, "cutoff_scores")
        if cut_values.numel() != n:
            raise ValueError(
                f"Expected `cutoff_scores` of shape ({n},) like `scores`, but got "
                f"{tuple(cut_values.shape)}."
            )
    elif cut:
        raise ValueError(
            f"`cutoff`={cutoff} needs `cutoff_scores`, the (N,) score whose hardest (highest) "
            "examples it removes (e.g. -aum for CCS); to cut by `scores` itself use `offset`."
        )
    if k == 0:
        raise ValueError(f"`keep`={keep} of {n} examples rounds to 0; keep at least one example.")
    if k > n - skip - cut:
        raise ValueError(
            f"Cannot keep {k} examples after `offset` and `cutoff` removed {skip} and {cut} of "
            f"{n}: at most {n - skip - cut} remain. Lower `keep`, `offset` or `cutoff`."
        )
    label_t: Tensor | None = None
    if labels is not None or class_balanced:
        if not class_balanced:
            raise ValueError(
                "`labels` is used only with class_balanced=True; pass both or neither."
            )
        if labels is None:
            raise ValueError("class_balanced=True needs `labels`, the (N,) class of each example.")
        try:
            label_t = torch.as_tensor(labels).to("cpu")
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"Expected `labels` to be (N,) integer class ids (a tensor, array or list of "
                f"ints), but got {type(labels).__name__} that torch cannot read ({err})."
            ) from err
        if label_t.dim() != 1 or label_t.numel() != n:
            raise ValueError(
                f"Expected `labels` of shape ({n},) like `scores`, but got {tuple(label_t.shape)}."
            )
        if label_t.is_floating_point() or label_t.dtype == torch.bool or int(label_t.min()) < 0:
            raise ValueError("Expected `labels` to be non-negative integer class ids.")

    gen = torch.Generator().manual_seed(int(seed))
    if strategy == "random" and skip == 0 and cut == 0 and label_t is None:
        # a uniform subset needs no ranking: skip the sort of all N scores
        return torch.sort(torch.randperm(n, generator=gen)[:k]).values
    # hardest first, ties in a seeded random order
    perm = torch.randperm(n, generator=gen)
    order = perm[torch.sort(values[perm], descending=True, stable=True).indices]
    if cut and cut_values is not None:
        # CCS's mislabel_mask: the hardest by the cut-off score go first (ties: the same
        # seeded permutation), then offset and the strategy work on the rest
        removed = perm[torch.sort(cut_values[perm], descending=True, stable=True).indices[:cut]]
        kept = torch.ones(n, dtype=torch.bool)
        kept[removed] = False
        order = order[kept[order]]
    pool = order[skip:]
    if label_t is None:
        chosen = _take(pool, values[pool], k, strategy, bins, gen)
    else:
        pool_labels = label_t[pool]
        classes, counts = torch.unique(pool_labels, return_counts=True)
        quotas = _largest_remainder(counts, k)
        parts = []
        for c, q in zip(classes.tolist(), quotas.tolist(), strict=True):
            members = pool[pool_labels == c]  # still hardest first
            parts.append(_take(members, values[members], q, strategy, bins, gen))
        chosen = torch.cat(parts)
    return torch.sort(chosen).values
