"""Per-example loss weights: :class:`LossReweighter` and :func:`jtt_weights`."""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch import Tensor

from sampleweights.samplers import error_set
from sampleweights.validation import (
    as_float_vector,
    as_index_tensor,
    check_num_examples,
    check_range,
)

__all__ = ["LossReweighter", "Normalize", "jtt_weights"]

Normalize = Literal["mean", "batch", "weights"]
_NORMALIZE: tuple[str, ...] = get_args(Normalize)


class LossReweighter:
    """Weight each example's loss by a per-example weight, keyed by dataset index.

    ``rw(per_example_loss, indices)`` returns the batch loss

    * ``normalize="mean"`` (default): ``Σᵢ wᵢ·lossᵢ / (B · mean(w))`` with ``mean(w)`` over the
      whole dataset. Unbiased for the weighted dataset loss, on the scale of the unweighted loss
      (all-equal weights give the plain mean), and independent of how a batch is split across
      ranks or micro-batches. With uniform sampling it equals, in expectation, training on a
      sampler that repeats example i ``wᵢ`` times (JTT's upsampling): both minimise
      ``Σᵢ wᵢ·lossᵢ / Σᵢ wᵢ``.
    * ``"batch"``: ``Σ wᵢ·lossᵢ / B``;
    * ``"weights"``: ``Σ wᵢ·lossᵢ / Σ_batch wᵢ`` (a weighted mean within each batch; biased,
      and changes with the batch split).

    Args:
        weights: ``(num_examples,)`` non-negative finite weights, not all zero.
        normalize: see above.

    Example:
        >>> import torch
        >>> rw = LossReweighter(torch.tensor([1.0, 3.0, 1.0, 3.0]))     # mean weight 2
        >>> loss = torch.tensor([0.5, 0.5])
        >>> rw(loss, torch.tensor([0, 1]))                               # (0.5 + 1.5) / (2·2)
        tensor(0.5000)
    """

    def __init__(self, weights: Tensor, normalize: Normalize = "mean") -> None:
        weights = as_float_vector(weights, "weights", "one weight per example")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("Expected `weights` to be finite and ≥ 0.")
        if not bool((weights > 0).any()):
            raise ValueError("`weights` are all zero: every loss would vanish.")
        if normalize not in _NORMALIZE:
            raise ValueError(f"Expected `normalize` in {list(_NORMALIZE)}, but got {normalize!r}.")
        self.weights = weights.detach().to(torch.float32)
        self.normalize: Normalize = normalize
        self.num_examples = weights.numel()
        self._mean = float(self.weights.double().mean())

    def __call__(self, per_example_loss: Tensor, indices: Any) -> Tensor:
        """The weighted batch loss (a scalar with the loss's dtype and device).

        Args:
            per_example_loss: ``(B,)``, e.g. ``F.cross_entropy(logits, y, reduction="none")``.
            indices: ``(B,)`` dataset indices of the batch.
        """
        if not isinstance(per_example_loss, Tensor) or per_example_loss.dim() != 1:
            raise ValueError(
                "Expected `per_example_loss` of shape (batch,) — use reduction='none' — but got "
                f"{getattr(per_example_loss, 'shape', type(per_example_loss).__name__)}."
            )
        idx = as_index_tensor(indices, "indices")
        if idx.numel() != per_example_loss.numel():
            raise ValueError(
                f"Expected one index per loss, but got {idx.numel()} indices and "
                f"{per_example_loss.numel()} losses."
            )
        check_range(idx, 0, self.num_examples, "indices", f"num_examples={self.num_examples}")
        if self.weights.device != per_example_loss.device:
            self.weights = self.weights.to(per_example_loss.device)
        w = self.weights[idx.to(per_example_loss.device)].to(per_example_loss.dtype)
        total = (w * per_example_loss).sum()
        if self.normalize == "mean":
            return total / (per_example_loss.numel() * self._mean)
        if self.normalize == "batch":
            return total / per_example_loss.numel()
        return total / w.sum().clamp_min(torch.finfo(w.dtype).tiny)

    def __repr__(self) -> str:
        return f"LossReweighter(num_examples={self.num_examples}, normalize={self.normalize!r})"


def jtt_weights(error_indices: Any, num_examples: int, upweight: float) -> Tensor:
    """JTT's loss-weight variant: ``upweight`` for error examples, 1.0 for the rest; float32 (N,).

    Example:
        >>> jtt_weights([0, 2], 4, upweight=5.0)
        tensor([5., 1., 5., 1.])
    """
    n = check_num_examples(num_examples)
    if isinstance(upweight, bool) or not isinstance(upweight, int | float):
        raise TypeError(f"Expected `upweight` to be a number ≥ 1, but got {upweight!r}.")
    if not upweight >= 1 or upweight == float("inf"):
        raise ValueError(f"Expected `upweight` to be a finite number ≥ 1, but got {upweight}.")
    weights = torch.ones(n, dtype=torch.float32)
    weights[error_set(error_indices, n)] = float(upweight)
    return weights
