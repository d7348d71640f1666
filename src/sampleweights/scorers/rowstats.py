"""Per-row statistics of a batch of logits, computed once and shared by every logit scorer.

:class:`RowStats` holds one batch's validated logits ``(B, C)`` and int64 targets ``(B,)`` and
computes, on first access, the ``(B,)`` statistics the scorers read: the argmax, the target's
probability ``p_y`` and its complement, ``log Σ exp``, the cross-entropy, the entropy, the
largest non-target logit, EL2N. Each is computed at most once per batch, so a
:class:`~sampleweights.ScorerCollection` of many scorers pays for each statistic once, and a
scorer alone pays only for what it reads.

Memory: the softmax statistics come from one pass over one ``(B, C)`` fp32 buffer (``x − max``,
exponentiated in place, two entries zeroed, then ``e·log e`` in place); the margin statistics use
``topk(2)`` (no ``(B, C)`` buffer); EL2N comes from the same pass. At most one ``(B, C)`` fp32
buffer is alive at a time (a test counts them), which matters for vocabularies of 32k–150k
classes.

Precision (all math in fp32 from logits of any float dtype). With ``t = x − max(x)`` and
``e = exp(t)`` (the argmax entry is exactly 1), let ``R = Σ e_j`` over the classes that are
neither the target nor the argmax — a sum of non-negative terms, exact to rounding. Then
``Σe − 1`` (``R``, plus ``e_y`` when the target is not the argmax) and the non-target mass
``Σ_{j≠y} e_j`` (``R``, plus 1) are sums of non-negative terms too, so ``log Σe = log1p(Σe − 1)``,
``1 − p_y``, the cross-entropy ``log Σe − t_y`` and the entropy ``log Σe − Σ e·t / Σe`` are each a
sum of non-negative terms: no cancellation, full relative precision even for confident examples
(``1 − p_y ≈ 1e-20``), where ``1 − p_y`` or ``logsumexp − x_y`` computed the obvious way round to 0.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

__all__ = ["RowStats"]

_TINY = torch.finfo(torch.float32).tiny


class _Softmax:
    """The statistics of one pass over one ``(B, C)`` fp32 buffer (see the module docstring).

    The reductions over the buffer run at construction; the ``(B,)`` statistics derived from
    them are computed when first read, so a scorer alone pays only for what it uses.
    """

    def __init__(self, logits: Tensor, targets: Tensor, top: tuple[Tensor, Tensor]) -> None:
        top_logit, argmax = top[0].float().view(-1, 1), top[1]  # (B, 1) row max, (B,) argmax
        rows = torch.arange(len(targets), device=logits.device)
        if logits.dtype == torch.float32:
            buf = logits - top_logit  # (B, C): the one buffer
        else:
            buf = logits.float().sub_(top_logit)
        self.t_y = buf[rows, targets]  # (B,) ≤ 0
        buf.exp_()  # e = exp(t), in (0, 1]; e[argmax] = 1
        buf.scatter_(1, argmax.view(-1, 1), 0.0).scatter_(1, targets.view(-1, 1), 0.0)
        rest = buf.sum(dim=1)  # R = Σ e over j ∉ {y, argmax}
        self.miss = (argmax != targets).to(torch.float32)  # 1 where y is not the argmax
        self.e_y = torch.exp(self.t_y)
        self.above_one = rest + self.miss * self.e_y  # Σe − 1, without cancellation
        self.wrong = rest + self.miss  # W = Σ_{j≠y} e_j (the argmax's 1 when it is not y)
        # For EL2N, ‖buf / W‖ is taken after scaling the buffer by 2^−k ≈ 1 / W (exact: a power
        # of two; 2^126 at most, a subnormal W would overflow it), so tiny entries do not
        # underflow when squared; scaling back restores it (but for subnormals).
        up = torch.ldexp(torch.ones_like(rest), (-torch.frexp(self.wrong).exponent).clamp_max(126))
        self.scaled_norm = torch.linalg.vector_norm(buf.mul_(up.view(-1, 1)), dim=1)
        self.scaled_wrong = self.wrong * up
        # the entropy (a log per entry: as dear as all of the above) only when asked for; until
        # then the buffer is kept, and it is the only (B, C) buffer alive
        self._buf: Tensor | None = buf.div_(up.view(-1, 1))

    @cached_property
    def norm(self) -> Tensor:
        return self.above_one + 1.0  # Σe

    @cached_property
    def log_norm(self) -> Tensor:
        return torch.log1p(self.above_one)  # log Σe = logsumexp(x) − max(x), ≥ 0

    @cached_property
    def p_target(self) -> Tensor:
        return self.e_y / self.norm

    @cached_property
    def wrong_mass(self) -> Tensor:
        return self.wrong / self.norm  # 1 − p_y, without cancellation

    @cached_property
    def loss(self) -> Tensor:
        return self.log_norm - self.t_y  # −log p_y: both terms ≥ 0

    @cached_property
    def el2n(self) -> Tensor:
        # ‖p − e_y‖ = (W / Σe)·√(1 + ‖q / W‖²), q = e with the target zeroed, W = Σq (see
        # sampleweights.el2n); ‖q / W‖² = ‖buf / W‖² + [y ≠ argmax] / W²
        spread = (self.scaled_norm / self.scaled_wrong.clamp_min(_TINY)).square_()
        spread += self.miss / self.wrong.square().clamp_min(_TINY)
        scores: Tensor = self.wrong_mass * spread.add_(1.0).sqrt_()
        return scores

    @cached_property
    def entropy(self) -> Tensor:
        buf, self._buf = self._buf, None
        if buf is None:  # pragma: no cover - cached_property computes this once
            raise RuntimeError("the shared buffer is gone")
        # Σ e·t = Σ e·log e over j ∉ {y, argmax} (≤ 0), plus e_y·t_y when y is not the argmax
        # (whose t = 0); xlogy(0, 0) = 0 for the zeroed and underflowed entries
        e_log_e = buf.xlogy_(buf).sum(dim=1) + self.miss * self.e_y * self.t_y
        return self.log_norm - e_log_e / self.norm  # both terms ≥ 0


class RowStats:
    """Shared per-row statistics of one batch; each computed on first access, then cached.

    Args:
        logits: ``(B, C)`` validated, detached logits of any float dtype.
        targets: ``(B,)`` int64 class labels in ``[0, C)``, on the logits' device.

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

    def __init__(self, logits: Tensor, targets: Tensor) -> None:
        self.logits = logits
        self.targets = targets

    @cached_property
    def _top(self) -> tuple[Tensor, Tensor]:
        # max and argmax in one pass (the first maximal index on ties, as Tensor.argmax)
        values, indices = self.logits.max(dim=1)
        return values, indices

    @property
    def argmax(self) -> Tensor:
        """``argmax_j x_j`` (the first on ties, as ``Tensor.argmax``), int64."""
        return self._top[1]

    @cached_property
    def correct(self) -> Tensor:
        """``argmax == target``, bool."""
        return self.argmax == self.targets

    @cached_property
    def _softmax(self) -> _Softmax:
        return _Softmax(self.logits, self.targets, self._top)

    @property
    def p_target(self) -> Tensor:
        """``p_y = softmax(x)_y``."""
        return self._softmax.p_target

    @property
    def wrong_mass(self) -> Tensor:
        """``Σ_{j≠y} p_j = 1 − p_y``, without cancellation."""
        return self._softmax.wrong_mass

    @property
    def log_norm(self) -> Tensor:
        """``logsumexp(x) − max(x) = log Σ_j exp(x_j − max x)`` (≥ 0)."""
        return self._softmax.log_norm

    @property
    def loss(self) -> Tensor:
        """Cross-entropy ``−log p_y = logsumexp(x) − x_y``."""
        return self._softmax.loss

    @property
    def entropy(self) -> Tensor:
        """Entropy of the prediction ``−Σ_j p_j log p_j`` in nats."""
        return self._softmax.entropy

    @cached_property
    def target_logit(self) -> Tensor:
        """``x_y`` as float32."""
        rows = torch.arange(len(self.targets), device=self.logits.device)
        return self.logits[rows, self.targets].float()

    @cached_property
    def other_logit(self) -> Tensor:
        """The largest non-target logit ``max_{j≠y} x_j`` as float32.

        Raises:
            ValueError: with a single class there is no other logit.
        """
        if self.logits.shape[1] < 2:
            raise ValueError(
                f"A margin needs `logits` with at least 2 classes, but got shape "
                f"{tuple(self.logits.shape)}."
            )
        top2 = self.logits.topk(2, dim=1).values.float()  # (B, 2)
        # the second largest when the target is the argmax (a tied max is then the second too)
        return torch.where(self.correct, top2[:, 1], top2[:, 0])

    @cached_property
    def logit_margin(self) -> Tensor:
        """``x_y − max_{j≠y} x_j`` (Pleiss et al.'s margin; negative when misclassified)."""
        return self.target_logit - self.other_logit

    @cached_property
    def prob_margin(self) -> Tensor:
        """``p_y − max_{j≠y} p_j`` in ``[−1, 1]``.

        With ``d`` the logit margin, ``p_y − p_o = −p_y·expm1(−d) = p_o·expm1(d)``; taking the form
        whose probability is the row's largest (``1 / Σe``) keeps a margin near 0 precise.
        """
        d = self.logit_margin
        # the leading one of x_y and x_o is the row's max, whose probability is 1 / Σe
        lead = torch.where(d >= 0, -torch.expm1(-d), torch.expm1(d))
        return lead / self._softmax.norm

    @property
    def el2n(self) -> Tensor:
        """EL2N ``‖softmax(x) − e_y‖₂``, from the shared pass, without cancellation (the formula
        of :func:`~sampleweights.el2n`, to fp32 rounding)."""
        return self._softmax.el2n
