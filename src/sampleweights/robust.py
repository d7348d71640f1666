"""Online Group DRO as a loss: :class:`GroupDROLoss`.

Sagawa, Koh, Hashimoto and Liang, "Distributionally Robust Neural Networks for Group Shifts: On
the Importance of Regularization for Worst-Case Generalization" (ICLR 2020), Algorithm 1, as
their released code computes it (``loss.py``, ``LossComputer.compute_robust_loss``,
``btl=False``): per step, the batch's mean loss per group ``ℓ_g``, an exponentiated-gradient
step on the group weights ``q_g ← q_g · exp(η · (ℓ_g + C_g/√n_g))`` followed by normalisation,
and the robust loss ``Σ_g q_g · ℓ_g`` with the updated weights (constant for autograd).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeGuard

import numpy as np
import torch
from torch import Tensor

from sampleweights.distributed import all_reduce_copy, is_distributed, world
from sampleweights.errors import StateMismatchError
from sampleweights.validation import check_range, per_example_ids

__all__ = ["GroupDROLoss"]

_KIND = "GroupDROLoss"
_STATE_KEYS = ("kind", "num_groups", "num_steps", "log_weights", "loss_sum", "count")


def _is_number(value: Any) -> TypeGuard[int | float | np.integer | np.floating]:
    return not isinstance(value, bool | np.bool_) and isinstance(
        value, int | float | np.integer | np.floating
    )


def _group_vector(values: Any, name: str, num_groups: int, what: str) -> Tensor:
    """``values`` (a tensor, array or list of ``num_groups`` finite numbers ≥ 0) as float64."""
    if isinstance(values, Tensor):
        if values.dtype == torch.bool or values.is_complex():
            raise TypeError(
                f"Expected `{name}` to be real numbers ({what}), but got {values.dtype}."
            )
        vector = values.detach().to("cpu", torch.float64)
    else:
        try:
            array = np.asarray(values)
        except (ValueError, TypeError):
            array = np.asarray(None)
        if array.dtype.kind not in "iuf":
            raise TypeError(
                f"Expected `{name}` to be a tensor, array or list of numbers ({what}), but got "
                f"{type(values).__name__}."
            )
        vector = torch.from_numpy(array.astype(np.float64))
    if vector.shape != (num_groups,):
        raise ValueError(
            f"Expected `{name}` of shape ({num_groups},) ({what}, one per group), but got "
            f"{tuple(vector.shape)}."
        )
    if not bool(torch.isfinite(vector).all()) or bool((vector < 0).any()):
        raise ValueError(f"Expected `{name}` to be finite and ≥ 0 ({what}), but got {vector}.")
    return vector


class GroupDROLoss:
    """Online Group DRO (Sagawa et al., ICLR 2020, Algorithm 1) as a loss with its group weights.

    ``loss = gdro(per_example_loss, groups)`` makes one step of Algorithm 1:

    1. ``ℓ_g`` = the batch's mean loss over the examples of group ``g`` (``n_g^batch`` of them);
    2. ``q_g ← q_g · exp(η · (ℓ_g + a_g))``, then ``q ← q / Σ q`` (``η`` = ``step_size``,
       ``a_g = C_g / √n_g`` the generalisation adjustment, 0 without one);
    3. returns ``Σ_g q_g · ℓ_g`` with the *updated* weights, which are constants for autograd:
       the gradient is ``Σ_i q_{g_i} / n_{g_i}^batch · ∇lossᵢ``.

    This is what the authors' ``LossComputer.compute_robust_loss`` (``btl=False``,
    ``normalize_loss=False``) computes, with these facts of that code kept on purpose:

    * **Groups absent from a batch** get ``ℓ_g = 0``: their weight is multiplied by
      ``exp(η · a_g)`` (by 1 without adjustment) before the normalisation, so it falls relative
      to the groups present, and they add nothing to the loss. The loss is *not* renormalised
      over the groups present: a batch holding only low-weight groups gives a small loss.
    * **The adjustment** ``a_g`` enters the weight update only. (The reference adds it to the
      group losses in place, ``adjusted_loss = group_loss; adjusted_loss += …``, so the value it
      returns is ``Σ_g q_g · (ℓ_g + a_g)``: larger by the constant ``Σ_g q_g · a_g``, with the
      same gradient; add ``gdro.weights @ gdro.adjustment.float()`` to compare values.) The
      reference applies the adjustment only when every ``C_g > 0``; here each group gets its own
      ``C_g``, 0 included.
    * The update is done in log space (``log q ← log q + η·(ℓ + a) − logsumexp(…)``), float64:
      the same weights, but a weight never underflows to a permanent 0 and a large loss never
      overflows ``exp`` into NaN, as the float32 product of the reference can in long runs.

    The loss is computed in float32 (or float64 for float64 losses) whatever the losses' dtype
    and returned in their dtype; group sums and the weights are float64, on the losses' device.
    Every call is one step, an empty batch included (all groups absent).

    **DDP.** The group weights stay identical on every rank: each call all-reduces the batch's
    per-group loss sums and counts over ``process_group`` (one collective of ``2 × num_groups``
    float64 numbers per step), so every rank makes the step of the global batch. Every rank must
    therefore call it once per step (a rank with no data passes an empty batch), as DDP's
    backward already requires. The value returned on every rank is the global batch's robust
    loss; its gradient is ``world_size`` × the rank's share of it, so DDP's gradient average is
    exactly the global batch's gradient, however the batch is split. Without an initialised
    process group it is a single process.

    **Validation.** Shapes and dtypes are always checked; with ``validate=True`` (default) also
    the group ids' range (free for CPU ids, as a DataLoader yields them; one sync for CUDA ids)
    and the losses' finiteness, checked on the (all-reduced) group sums, so under DDP every rank
    raises together (one sync per step on CUDA; ``validate=False`` skips both). A rejected call
    changes nothing. A shape or range error raised on one rank only leaves the other ranks
    waiting in the collective until the process group's timeout.

    Args:
        num_groups: the number of groups; group ids are ``0 … num_groups − 1``.
        step_size: ``η ≥ 0``, the reference's ``--robust_step_size`` (default 0.01). ``0`` keeps
            the weights uniform: the average of the group means.
        adjustment: ``C``, one number (a 0-dim tensor too) for every group or one per group
            (the reference's ``--generalization_adjustment``), ``≥ 0``; needs ``group_counts``.
        group_counts: ``n_g``, the number of *training-set* examples of each group (e.g.
            ``torch.bincount(train_groups, minlength=num_groups)``); positive where ``C_g > 0``.
        process_group: the ``torch.distributed`` group of the data-parallel ranks (default: the
            world, when initialised).
        validate: check group ids and loss finiteness (see above).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a value out of range (the message names the argument).

    Example:
        >>> import torch
        >>> gdro = GroupDROLoss(num_groups=2, step_size=1.0)
        >>> loss = gdro(torch.tensor([1.0, 3.0, 0.0]), torch.tensor([0, 0, 1]))  # ℓ = (2, 0)
        >>> gdro.weights                                  # ∝ (½·e², ½·e⁰)
        tensor([0.8808, 0.1192])
        >>> loss                                          # 0.8808·2 + 0.1192·0
        tensor(1.7616)
        >>> gdro.worst_group
        0
    """

    def __init__(
        self,
        num_groups: int,
        step_size: float = 0.01,
        adjustment: float | Tensor | Sequence[float] | np.ndarray | None = None,
        group_counts: Tensor | Sequence[float] | np.ndarray | None = None,
        *,
        process_group: Any = None,
        validate: bool = True,
    ) -> None:
        if isinstance(num_groups, bool | np.bool_) or not isinstance(num_groups, int | np.integer):
            raise TypeError(
                f"Expected `num_groups` to be an int (the number of group ids), but got "
                f"{type(num_groups).__name__} {num_groups!r}."
            )
        if num_groups < 1:
            raise ValueError(f"Expected `num_groups` ≥ 1, but got {num_groups}.")
        num_groups = int(num_groups)
        if not _is_number(step_size):
            raise TypeError(f"Expected `step_size` to be a number ≥ 0, but got {step_size!r}.")
        if not 0 <= float(step_size) < float("inf"):  # NaN fails too
            raise ValueError(
                f"Expected `step_size` to be a finite number ≥ 0 (η of the weight update, "
                f"e.g. 0.01), but got {step_size}."
            )
        if not isinstance(validate, bool):
            raise TypeError(f"Expected `validate` to be a bool, but got {validate!r}.")
        what_c = "the generalisation adjustment C"
        if isinstance(adjustment, Tensor | np.ndarray) and adjustment.ndim == 0:
            adjustment = adjustment.item()  # a 0-dim tensor or array: one number for every group
        if adjustment is None:
            c = torch.zeros(num_groups, dtype=torch.float64)
        elif _is_number(adjustment):
            if not 0 <= float(adjustment) < float("inf"):
                raise ValueError(
                    f"Expected `adjustment` to be finite and ≥ 0 ({what_c}), but got {adjustment}."
                )
            c = torch.full((num_groups,), float(adjustment), dtype=torch.float64)
        else:
            c = _group_vector(adjustment, "adjustment", num_groups, what_c)
        counts = None
        if group_counts is not None:
            counts = _group_vector(
                group_counts, "group_counts", num_groups, "training-set examples per group"
            )
        if bool((c > 0).any()):
            if counts is None:
                raise ValueError(
                    "`adjustment` C/√n_g needs the training-set size of each group: pass "
                    "group_counts=torch.bincount(train_groups, minlength=num_groups)."
                )
            empty = ((c > 0) & (counts == 0)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(
                    f"Expected `group_counts` > 0 where the adjustment is positive, but groups "
                    f"{empty} have 0 training examples (C/√0 is infinite); give them C = 0."
                )
        self.num_groups = num_groups
        self.step_size = float(step_size)
        self.process_group = process_group
        self.validate = validate
        bonus = torch.zeros(num_groups, dtype=torch.float64)
        if counts is not None:
            bonus = torch.where(c > 0, c / counts.sqrt(), bonus)
        self._adjustment = bonus  # a_g = C_g / √n_g, float64 (G,)
        self.num_steps = 0
        self._log_q = torch.full((num_groups,), -float(np.log(num_groups)), dtype=torch.float64)
        self._loss_sum = torch.zeros(num_groups, dtype=torch.float64)
        self._count = torch.zeros(num_groups, dtype=torch.float64)

    # ------------------------------------------------------------------ the step

    def __call__(self, per_example_loss: Tensor, groups: Any) -> Tensor:
        """One step of online Group DRO; returns the robust loss (a scalar, the losses' dtype).

        Args:
            per_example_loss: ``(B,)`` float, e.g.
                ``F.cross_entropy(logits, y, reduction="none")``.
            groups: ``(B,)`` group ids in ``[0, num_groups)`` (tensor, array or list).

        Raises:
            TypeError / ValueError: a wrong shape or dtype, group ids out of range, or a
                non-finite loss (``validate=True``); nothing is changed.
        """
        g = per_example_ids(per_example_loss, groups, "groups", "group id")
        if self.validate:
            check_range(g, 0, self.num_groups, "groups", f"num_groups={self.num_groups}")
        device = per_example_loss.device
        g = g.to(device, non_blocking=True)
        size = world(self.process_group)[0] if is_distributed(self.process_group) else 1

        # per-group loss sums and counts of the (global) batch: (2, G) float64
        rows = torch.stack(
            (per_example_loss.detach().to(torch.float64), torch.ones_like(g, dtype=torch.float64))
        )  # (2, B)
        stats = torch.zeros(2, self.num_groups, dtype=torch.float64, device=device)
        stats.index_add_(1, g, rows)
        if size > 1:
            stats = all_reduce_copy(stats, "sum", self.process_group)
        sums, counts = stats.unbind()
        if self.validate and not bool(torch.isfinite(sums).all()):
            raise ValueError(
                "Expected finite `per_example_loss`, but the batch has NaN or infinite losses"
                + (" (on some rank)" if size > 1 else "")
                + "; the group weights are unchanged. Skip this batch or fix the loss."
            )

        # the exponentiated-gradient step, in log space
        means = sums / counts.clamp_min(1.0)  # an absent group: 0, as the reference
        bonus = self._adjustment.to(device)
        logits = self._log_q.to(device) + self.step_size * (means + bonus)
        log_q = logits - torch.logsumexp(logits, dim=0)
        q = log_q.exp()

        # commit (nothing below can fail on user input)
        self._log_q, self._adjustment = log_q, bonus
        self._loss_sum = self._loss_sum.to(device) + sums
        self._count = self._count.to(device) + counts
        self.num_steps += 1

        # Σ_g q_g·ℓ_g = Σ_i q_{g_i}/n_{g_i}·lossᵢ, in at least float32
        dtype = torch.promote_types(per_example_loss.dtype, torch.float32)
        per_example_weight = (q / counts.clamp_min(1.0))[g].to(dtype)  # (B,)
        local = (per_example_weight * per_example_loss.to(dtype)).sum()
        if size > 1:
            # the value: the global robust loss (the same on every rank); the gradient:
            # world_size × this rank's share, so DDP's average is the global batch's gradient
            scaled = local * size
            value = (q * means).sum().to(dtype)
            local = scaled + (value - scaled).detach()
        return local.to(per_example_loss.dtype)

    # ------------------------------------------------------------------ inspection

    @property
    def weights(self) -> Tensor:
        """The group weights ``q``, float32 ``(num_groups,)``, summing to 1 (a copy)."""
        return self._log_q.exp().float()

    @property
    def worst_group(self) -> int:
        """The group with the largest weight (ties: the lowest id); a host sync."""
        return int(torch.argmax(self._log_q))

    @property
    def adjustment(self) -> Tensor:
        """``a_g = C_g / √n_g`` added to each group's loss in the weight update, float64."""
        return self._adjustment.clone()

    @property
    def group_count(self) -> Tensor:
        """Examples seen per group since construction or :meth:`reset`, float64 (global
        under DDP)."""
        return self._count.clone()

    @property
    def mean_group_loss(self) -> Tensor:
        """The mean per-example loss of each group over every step since construction or
        :meth:`reset`, float32; NaN for a group not yet seen."""
        mean = self._loss_sum / self._count.clamp_min(1.0)
        return torch.where(self._count > 0, mean, torch.nan).float()

    def reset(self) -> None:
        """Uniform weights, statistics cleared, ``num_steps = 0`` (the settings are kept)."""
        device = self._log_q.device
        self._log_q = torch.full_like(self._log_q, -float(np.log(self.num_groups)))
        self._loss_sum = torch.zeros(self.num_groups, dtype=torch.float64, device=device)
        self._count = torch.zeros_like(self._loss_sum)
        self.num_steps = 0

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """The state, to resume: ``kind``, ``num_groups``, ``num_steps``, and float64
        ``(num_groups,)`` tensors ``log_weights`` (log q), ``loss_sum``, ``count`` (copies).

        The state is the same on every rank under DDP, so it loads at any world size. The
        settings (``step_size``, ``adjustment``) are not part of it: pass them again.

        Example:
            >>> import torch
            >>> gdro = GroupDROLoss(3)
            >>> _ = gdro(torch.rand(4), torch.tensor([0, 1, 2, 2]))
            >>> again = GroupDROLoss(3)
            >>> again.load_state_dict(gdro.state_dict())
            >>> torch.equal(again.weights, gdro.weights), again.num_steps
            (True, 1)
        """
        return {
            "kind": _KIND,
            "num_groups": self.num_groups,
            "num_steps": self.num_steps,
            "log_weights": self._log_q.clone(),
            "loss_sum": self._loss_sum.clone(),
            "count": self._count.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, on this object's current device.

        Everything is checked before anything changes.

        Raises:
            TypeError: ``state_dict`` is not a dict.
            StateMismatchError: a missing or malformed field, another kind of state, or another
                ``num_groups`` (the message names it).
        """
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"Expected `state_dict` to be a dict from GroupDROLoss.state_dict(), but got "
                f"{type(state_dict).__name__}."
            )
        missing = [k for k in _STATE_KEYS if k not in state_dict]
        if missing:
            raise StateMismatchError(
                f"Expected a GroupDROLoss state_dict, but it lacks {missing} (got keys "
                f"{sorted(map(str, state_dict))})."
            )
        if state_dict["kind"] != _KIND:
            raise StateMismatchError(
                f"Expected a state of kind {_KIND!r}, but got {state_dict['kind']!r}."
            )
        if state_dict["num_groups"] != self.num_groups:
            raise StateMismatchError(
                f"Expected a state saved with num_groups={self.num_groups}, but got "
                f"num_groups={state_dict['num_groups']!r}: build GroupDROLoss with the same "
                "number of groups."
            )
        steps = state_dict["num_steps"]
        if (
            isinstance(steps, bool | np.bool_)
            or not isinstance(steps, int | np.integer)
            or steps < 0
        ):
            raise StateMismatchError(f"Expected `num_steps` an int ≥ 0, but got {steps!r}.")
        tensors = {}
        for key in ("log_weights", "loss_sum", "count"):
            value = state_dict[key]
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise StateMismatchError(
                    f"Expected `{key}` to be a float tensor, but got "
                    f"{getattr(value, 'dtype', type(value).__name__)}."
                )
            if value.shape != (self.num_groups,):
                raise StateMismatchError(
                    f"Expected `{key}` of shape ({self.num_groups},), but got {tuple(value.shape)}."
                )
            tensors[key] = value.detach().to(self._log_q.device, torch.float64, copy=True)
        log_q, loss_sum, count = tensors["log_weights"], tensors["loss_sum"], tensors["count"]
        if not bool(torch.isfinite(torch.cat((log_q, loss_sum, count))).all()):
            raise StateMismatchError("Expected finite `log_weights`, `loss_sum` and `count`.")
        if bool((count < 0).any()):
            raise StateMismatchError(f"Expected `count` ≥ 0, but got {count}.")
        total = float(torch.logsumexp(log_q, dim=0))
        if abs(total) > 1e-6:
            raise StateMismatchError(
                f"Expected `log_weights` of weights summing to 1, but they sum to "
                f"{float(np.exp(total)):.9g}."
            )
        self._log_q, self._loss_sum, self._count = log_q, loss_sum, count
        self.num_steps = int(steps)

    def __repr__(self) -> str:
        adjusted = ", adjusted" if bool((self._adjustment > 0).any()) else ""
        return (
            f"GroupDROLoss(num_groups={self.num_groups}, step_size={self.step_size}{adjusted}, "
            f"num_steps={self.num_steps})"
        )
