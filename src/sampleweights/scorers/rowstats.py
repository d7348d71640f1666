"""Per-row statistics of a batch of logits, computed once and shared by every logit scorer.

:class:`RowStats` holds one batch's validated logits ``(B, C)`` and int64 targets ``(B,)`` and
computes, on first access, the ``(B,)`` statistics the scorers read: correctness, the target's
probability ``p_y`` and its complement, ``log Σ exp``, the cross-entropy, the entropy, the logit
and probability margins, EL2N. Each is computed at most once per batch, so a
:class:`~sampleweights.ScorerCollection` of many scorers pays for each statistic once, and a
scorer alone pays only for what it reads. :func:`~sampleweights.el2n` is ``RowStats(...).el2n``:
the function, the scorer and a collection compute EL2N with the same operations, bit for bit.

The pass (one ``(B, C)`` fp32 buffer, every step in place). With ``m = max_j x_j``:

1. ``t = x − m`` and the target's ``t_y`` read out;
2. for the margins (when asked for before step 3): ``t_o = max_{j≠y} t_j``, one cheap
   max-reduction with the target entry set to ``−inf`` (then set back to ``t_y``: the
   vectorised ``exp`` takes a slow path for ``−inf``). The logit margin is ``t_y − t_o``, bit
   for bit ``x_y − max_{j≠y} x_j`` (one of the two terms is 0: the max is ``x_y`` or ``x_o``),
   and ``t_y > t_o`` says "the target is the unique maximum": correctness without an arg-max
   reduction, which on CPU costs as much as the exponentials (the arg-max decides exact ties);
3. ``exp(t)`` in place, ``e_y`` read out and the target entry zeroed (``q``), and
   ``W = Σ_j q_j = Σ_{j≠y} e_j``;
4. EL2N ``= hypot(‖u·q‖, u·W) / (u·Σe)``: the buffer scaled by ``u = 2^k ≥ 1`` with
   ``u·W ∈ [½, 1)`` when ``W < ½`` (exact: a power of two, and no entry can overflow), its
   norm, scaled back only if the entropy needs the buffer after it;
5. the entropy (a log per entry: as dear as the exponentials, so only when read): the arg-max
   entry zeroed, ``R = Σ_{j ∉ {y, argmax}} e_j``, then ``Σ e·log e`` in place.

No other ``(B, C)`` buffer is made (a test counts them), which matters for vocabularies of
32k–150k classes.

Precision (all math in fp32 from logits of any float dtype; ``e_y = exp(t_y)``, ``Σe = W + e_y``).
``t = x − m`` is the exact difference rounded once to fp32 (float64 logits subtract in float64
first: a cast first would merge logits closer than fp32's resolution, such as ``1e4`` and
``1e4 + 1e-4``). That one rounding, ``|t|·2⁻²⁴`` absolute, is the only error the exponentials
amplify: ``exp(t)`` is off by up to ``|t|·2⁻²⁴`` relative (≤ 5.2e-6 for ``|t| ≤ 87``, ~1e-7 for
``|t| ≤ 2``), which bounds the relative error of a statistic made of such tail terms (the loss or
``1 − p_y`` of a confident example, ``p_y`` of a badly wrong one). Values below fp32's smallest
normal (``2⁻¹²⁶ ≈ 1.2e-38``) are subnormal and keep only an absolute precision of ~``2⁻¹⁴⁹``.
``1 − p_y = W / Σe`` and ``p_y = e_y / Σe`` are ratios of sums of non-negative terms: no
cancellation, full relative precision even for confident examples (``1 − p_y ≈ 1e-20``), where
``1 − p_y`` computed the obvious way rounds to 0. EL2N is ``√(‖q‖² + W²) / Σe`` (see
:func:`~sampleweights.el2n`), a sum of non-negative terms, the norm taken on the scaled buffer
so tiny entries do not underflow when squared. The cross-entropy is
``log1p(W + (e_y − 1)) − t_y``: when the target is a maximum ``e_y − 1 = 0`` and ``log1p(W)``
is exact; otherwise the loss is at least 0.44, so the rounding of ``W − 1`` (``2⁻²⁴`` absolute)
is far below its fp32 resolution. The entropy ``log1p(R + [y ≠ argmax]·e_y) + (−Σ e·t) / Σe``
is a sum of non-negative terms in every case (``Σe − 1`` summed without the arg-max's 1).
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

__all__ = ["RowStats"]

_TINY = torch.finfo(torch.float32).tiny  # smallest normal fp32
_LOG2_E = 1.4426950408889634  # log2(e)


def _minus(a: Tensor, b: Tensor) -> Tensor:
    """``a − b`` as float32, rounded once from the exact difference of the inputs: float32 and
    float64 subtract in their own dtype (a float64 difference cast to float32 afterwards: casting
    first would round logits such as ``1e4`` and ``1e4 + 1e-4`` to the same float32), the half
    types in float32 (the cast is exact)."""
    if a.dtype == torch.float32:
        return a - b
    if a.dtype == torch.float64:
        return (a - b).float()
    return a.float().sub_(b.float())


class _Pass:
    """The one ``(B, C)`` fp32 buffer and the ``(B, 1)`` statistics read from it, in stages
    (see the module docstring): the constructor runs step 1; ``t_other`` step 2 (only before
    step 3); ``exp`` step 3; ``el2n`` step 4; ``entropy`` step 5."""

    def __init__(self, logits: Tensor, targets: Tensor) -> None:
        self.logits = logits
        self.top = logits.amax(dim=1, keepdim=True)  # (B, 1): a vectorised reduction, no arg-max
        buf = _minus(logits, self.top)  # (B, C): the one buffer
        self.y = targets.view(-1, 1)
        self.buf: Tensor | None = buf
        self._t_other: Tensor | None = None
        self._exp_done = False
        self._up: Tensor | None = None  # the EL2N scale while the buffer holds it

    @cached_property
    def t_y(self) -> Tensor:
        """``x_y − m`` (B, 1), ≤ 0: read from the buffer while it holds ``t``, else the same
        subtraction again (the same bits)."""
        if not self._exp_done and self.buf is not None:
            return self.buf.gather(1, self.y)
        return _minus(self.logits.gather(1, self.y), self.top)

    def t_other(self) -> Tensor | None:
        """``max_{j≠y} t_j`` (B, 1), or None once the buffer holds exponentials."""
        if self._t_other is None and not self._exp_done and self.buf is not None:
            t_y = self.t_y  # read before the target entry changes
            self._t_other = self.buf.scatter_(1, self.y, -torch.inf).amax(dim=1, keepdim=True)
            # t_y back: exp() reads e_y from the buffer (the same bits as without margins), and
            # exp(−inf) would take a slow path of the vectorised exp (8× slower at 10 classes)
            self.buf.scatter_(1, self.y, t_y)
        return self._t_other

    def exp(self) -> None:
        if self._exp_done:
            return
        if self.buf is None:  # pragma: no cover - the buffer is consumed after exp() only
            raise RuntimeError("the shared buffer is gone")
        self._exp_done = True
        self.e_y = self.buf.exp_().gather(1, self.y)  # e_y = exp(t_y)
        self.buf.scatter_(1, self.y, 0.0)  # q = e with the target entry 0
        self.wrong = self.buf.sum(dim=1, keepdim=True)  # W = Σ_{j≠y} e_j
        self.norm = self.wrong + self.e_y  # Σe ≥ 1

    @cached_property
    def wrong_mass(self) -> Tensor:
        self.exp()
        return self.wrong / self.norm  # 1 − p_y, without cancellation

    @cached_property
    def log_norm(self) -> Tensor:
        self.exp()
        # Σe − 1 = W + (e_y − 1): exact (W) when the target is a maximum (e_y = 1)
        return torch.log1p(self.wrong + (self.e_y - 1.0))

    def el2n(self, logits: Tensor, targets: Tensor) -> Tensor:
        self.exp()
        buf = self.buf
        if buf is None:
            # the entropy consumed the buffer: the same operations again on a fresh one (the
            # same bits; a collection reads EL2N first, so only a scorer's own order gets here)
            return _Pass(logits, targets).el2n(logits, targets)
        # u = 2^k ≥ 1 with u·W in [½, 1) for W < ½, else 1 (W = f·2^e, f in [½, 1): f / W is a
        # power of two, exact); no entry u·q_j ≤ u·W can overflow, so ·u and ÷u are exact
        clamped = self.wrong.clamp(_TINY, 0.5)
        up = torch.frexp(clamped).mantissa.div_(clamped)
        self._up = up
        spread = torch.linalg.vector_norm(buf.mul_(up), dim=1, keepdim=True)  # ‖u·q‖
        # ‖p − e_y‖ = √(‖q‖² + W²) / Σe = hypot(‖u·q‖, u·W) / (u·Σe)
        scores = torch.hypot(spread, up * self.wrong).div_(up * self.norm)
        return scores.view(-1)

    @cached_property
    def p_target(self) -> Tensor:
        self.exp()
        return self.e_y / self.norm

    def entropy(self, argmax: Tensor) -> Tensor:
        self.exp()
        buf, self.buf = self.buf, None  # the last use of the buffer
        if buf is None:  # pragma: no cover - RowStats caches the entropy
            raise RuntimeError("the shared buffer is gone")
        if self._up is not None:
            buf.div_(self._up)  # undo EL2N's power-of-two scale: exact
        index = argmax.view(-1, 1)
        miss = (index != self.y).to(torch.float32)  # 1 where the target is not the arg-max
        rest = buf.scatter_(1, index, 0.0).sum(dim=1, keepdim=True)  # R, without the 1
        log_norm = torch.log1p(rest + miss * self.e_y)  # log Σe, Σe − 1 without cancellation
        # Σ e·t = Σ e·log e over j ∉ {y, argmax} (≤ 0), plus e_y·t_y when y is not the arg-max;
        # xlogy(0, 0) = 0 for the zeroed and underflowed entries; e_y·t_y likewise 0 when
        # e_y = 0 (t_y may be −inf: x − m overflows for logits of ±3e38)
        target_term = torch.where(self.e_y > 0, self.e_y * self.t_y, 0.0)
        e_log_e = buf.xlogy_(buf).sum(dim=1, keepdim=True) + miss * target_term
        return (log_norm - e_log_e / self.norm).view(-1)  # both terms ≥ 0


class RowStats:
    """Shared per-row statistics of one batch; each computed on first access, then cached.

    Args:
        logits: ``(B, C)`` validated, detached logits of any float dtype.
        targets: ``(B,)`` int64 class labels in ``[0, C)``, on the logits' device.
        margins: compute ``max_{j≠y} x_j`` in the shared pass, before the exponentials (one
            cheap reduction that also gives ``correct`` without an arg-max). ``None`` (default):
            when a margin is read before the exponentials; ``correct`` read first takes the
            arg-max. A :class:`~sampleweights.ScorerCollection` passes True. Only the speed
            depends on it: the values are the same bits either way.

    Every statistic is a ``(B,)`` tensor on the logits' device: float32, except ``argmax``
    (int64) and ``correct`` (bool).

    Example:
        >>> import torch
        >>> stats = RowStats(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([1]))
        >>> stats.argmax, stats.correct
        (tensor([0]), tensor([False]))
        >>> stats.logit_margin   # x_y − max_{j≠y} x_j
        tensor([-2.])
        >>> torch.allclose(stats.p_target + stats.wrong_mass, torch.ones(1))
        True
    """

    def __init__(self, logits: Tensor, targets: Tensor, *, margins: bool | None = None) -> None:
        self.logits = logits
        self.targets = targets
        self._margins = margins
        if margins:
            self._pass.t_other()

    @cached_property
    def _pass(self) -> _Pass:
        return _Pass(self.logits, self.targets)

    def _t_other(self) -> Tensor | None:
        """``max_{j≠y} t_j`` from the shared pass when it is (or can still be) computed there."""
        if "_pass" not in self.__dict__ and self._margins is False:
            return None
        return self._pass.t_other()

    @cached_property
    def argmax(self) -> Tensor:
        """``argmax_j x_j`` (the first on ties, as ``Tensor.argmax``), int64."""
        return self.logits.argmax(dim=1)

    @cached_property
    def correct(self) -> Tensor:
        """``argmax == target``, bool."""
        if "_pass" not in self.__dict__ and not self._margins:
            return self.argmax == self.targets  # a scorer alone: the arg-max is all it needs
        t_other = self._t_other()
        if t_other is None:
            return self.argmax == self.targets
        t_y = self._pass.t_y
        strict = (t_y > t_other).view(-1)  # the target is the unique maximum
        tie = (t_y == t_other).view(-1)  # the target shares the maximum: the first one wins
        if self.logits.device.type == "cpu":
            # no device to wait for: take the arg-max only for a batch with an exact tie
            return torch.where(tie, self.argmax == self.targets, strict) if tie.any() else strict
        return torch.where(tie, self.argmax == self.targets, strict)

    @property
    def p_target(self) -> Tensor:
        """``p_y = softmax(x)_y``."""
        return self._pass.p_target.view(-1)

    @property
    def wrong_mass(self) -> Tensor:
        """``Σ_{j≠y} p_j = 1 − p_y``, without cancellation."""
        return self._pass.wrong_mass.view(-1)

    @property
    def log_norm(self) -> Tensor:
        """``logsumexp(x) − max(x) = log Σ_j exp(x_j − max x)`` (≥ 0; exact to fp32 rounding
        when the target is a maximum, else to ``2⁻²⁴`` absolute)."""
        return self._pass.log_norm.view(-1)

    @cached_property
    def loss(self) -> Tensor:
        """Cross-entropy ``−log p_y = logsumexp(x) − x_y``."""
        return (self._pass.log_norm - self._pass.t_y).view(-1)  # both terms ≥ 0

    @cached_property
    def entropy(self) -> Tensor:
        """Entropy of the prediction ``−Σ_j p_j log p_j`` in nats."""
        return self._pass.entropy(self.argmax)

    @cached_property
    def target_logit(self) -> Tensor:
        """``x_y`` as float32."""
        return self.logits.gather(1, self.targets.view(-1, 1)).view(-1).float()

    @cached_property
    def _target_in_dtype(self) -> Tensor:
        return self.logits.gather(1, self.targets.view(-1, 1)).view(-1)

    def _check_two_classes(self) -> None:
        if self.logits.shape[1] < 2:
            raise ValueError(
                f"A margin needs `logits` with at least 2 classes, but got shape "
                f"{tuple(self.logits.shape)}."
            )

    @cached_property
    def other_logit(self) -> Tensor:
        """The largest non-target logit ``max_{j≠y} x_j`` as float32.

        Raises:
            ValueError: with a single class there is no other logit.
        """
        return self._other_in_dtype.float()

    @cached_property
    def _other_in_dtype(self) -> Tensor:
        self._check_two_classes()
        top2 = self.logits.topk(2, dim=1).values  # (B, 2)
        # the second largest when the target is the argmax (a tied max is then the second too)
        return torch.where(self.argmax == self.targets, top2[:, 1], top2[:, 0])

    @cached_property
    def logit_margin(self) -> Tensor:
        """``x_y − max_{j≠y} x_j`` (Pleiss et al.'s margin; negative when misclassified).

        Raises:
            ValueError: with a single class there is no other logit.
        """
        self._check_two_classes()
        t_other = self._t_other()
        if t_other is None:  # the shared pass is past its exponentials: the same bits by topk
            # in the logits' dtype, as the shared pass (one of x_y, x_o is the row's maximum)
            return _minus(self._target_in_dtype, self._other_in_dtype)
        return (self._pass.t_y - t_other).view(-1)

    @cached_property
    def prob_margin(self) -> Tensor:
        """``p_y − max_{j≠y} p_j`` in ``[−1, 1]``.

        With ``d`` the logit margin, ``p_y − p_o = −p_y·expm1(−d) = p_o·expm1(d)``; taking the form
        whose probability is the row's largest (``1 / Σe``) keeps a margin near 0 precise.
        """
        d = self.logit_margin
        # the leading one of x_y and x_o is the row's max, whose probability is 1 / Σe
        lead = torch.where(d >= 0, -torch.expm1(-d), torch.expm1(d))
        self._pass.exp()
        return lead / self._pass.norm.view(-1)

    @cached_property
    def el2n(self) -> Tensor:
        """EL2N ``‖softmax(x) − e_y‖₂`` without cancellation: what :func:`~sampleweights.el2n`
        returns, bit for bit."""
        return self._pass.el2n(self.logits, self.targets)


# -- the opt-in compiled pass (ScorerCollection(..., compile=True)) --------------------------------

#: the statistics the compiled pass fills in, in the order ``_fused`` returns them
_FUSED = ("correct", "p_target", "wrong_mass", "log_norm", "loss", "logit_margin", "prob_margin")


def _fused(logits: Tensor, targets: Tensor, entropy: bool) -> tuple[Tensor, ...]:
    """The shared pass of :class:`_Pass` written out of place for ``torch.compile``: two sweeps
    over the logits, the first for the maxima (``m``, ``max_{j≠y} x_j``, the arg-max), the second
    for every sum of exponentials (one ``exp`` per entry). The same formulas as the eager pass,
    so the same precision guarantees, rounded in the compiler's order; the margins and
    correctness are the eager bits (``fl(x − m)`` is monotonic in ``x``, so the max of the
    differences is the difference of the max). EL2N's power-of-two scale ``u`` comes from
    ``q_o = max_{j≠y} e_j`` (``u·q_o ≤ 1``, so no square overflows and the largest does not
    underflow) instead of from ``W``, so it is known before the second sweep. Returns the
    ``_FUSED`` statistics, EL2N, then the entropy if asked for."""
    y = targets.view(-1, 1)
    column = torch.arange(logits.shape[1], device=logits.device).view(1, -1)
    is_y = column == y
    top = logits.amax(dim=1, keepdim=True)
    t_y = _minus(logits.gather(1, y), top)
    t_other = _minus(logits.masked_fill(is_y, -torch.inf).amax(dim=1, keepdim=True), top)
    # correct = (argmax == y) without an arg-max (a slow reduction in the compiled kernel): x_y is
    # a maximum and no maximum comes before it. Compared in the logits' own dtype: float64 logits
    # closer than float32 can tell (0 and 1e-300) would tie after the float32 difference
    earlier_top = ((logits == top) & (column < y)).any(dim=1, keepdim=True)
    correct = ((logits.gather(1, y) == top) & ~earlier_top).view(-1)
    q = _minus(logits, top).exp().masked_fill(is_y, 0.0)  # exp(t) with the target entry 0
    e_y = t_y.exp()
    wrong = q.sum(dim=1, keepdim=True)  # W
    norm = wrong + e_y  # Σe ≥ 1
    log_norm = torch.log1p(wrong + (e_y - 1.0))
    margin = (t_y - t_other).view(-1)
    lead = torch.where(margin >= 0, -torch.expm1(-margin), torch.expm1(margin))
    up = torch.exp2(torch.floor(t_other * -_LOG2_E).clamp(0.0, 126.0))  # u = 2^k, u·q_o ≤ 1
    spread = (q * up).square().sum(dim=1, keepdim=True).sqrt()  # ‖u·q‖
    el2n = torch.hypot(spread, up * wrong) / (up * norm)
    out = (
        correct,
        (e_y / norm).view(-1),
        (wrong / norm).view(-1),
        log_norm.view(-1),
        (log_norm - t_y).view(-1),
        margin,
        lead / norm.view(-1),
        el2n.view(-1),
    )
    if not entropy:
        return out
    index = logits.argmax(dim=1, keepdim=True)
    is_top = column == index
    rest = q.masked_fill(is_top, 0.0)  # e over j ∉ {y, argmax}
    miss = (index != y).to(torch.float32)
    log_sum = torch.log1p(rest.sum(dim=1, keepdim=True) + miss * e_y)
    target_term = torch.where(e_y > 0, e_y * t_y, 0.0)
    e_log_e = torch.xlogy(rest, rest).sum(dim=1, keepdim=True) + miss * target_term
    return (*out, (log_sum - e_log_e / norm).view(-1))


def _fused_any_shape(logits: Tensor, targets: Tensor, entropy: bool) -> tuple[Tensor, ...]:
    """:func:`_fused` under another name, so that its compiled form (dynamic shapes) has a cache
    of its own, apart from the static-shape one."""
    return _fused(logits, targets, entropy)


class _FusedRowStats(RowStats):
    """:class:`RowStats` whose statistics come from one call of a compiled ``_fused`` (passed
    in): every statistic listed in ``_FUSED``, EL2N and (when computed) the entropy; any other
    (``target_logit``, ``other_logit``) is computed eagerly by :class:`RowStats` on first use."""

    def __init__(self, logits: Tensor, targets: Tensor, fused: tuple[Tensor, ...]) -> None:
        super().__init__(logits, targets, margins=False)
        values = dict(zip((*_FUSED, "el2n", "entropy"), fused, strict=False))
        self._fused_values = values
        # the cached properties of RowStats read their value from the instance dict first
        for name in ("correct", "loss", "logit_margin", "prob_margin", "el2n", "entropy"):
            if name in values:
                self.__dict__[name] = values[name]

    @property
    def p_target(self) -> Tensor:
        return self._fused_values["p_target"]

    @property
    def wrong_mass(self) -> Tensor:
        return self._fused_values["wrong_mass"]

    @property
    def log_norm(self) -> Tensor:
        return self._fused_values["log_norm"]
