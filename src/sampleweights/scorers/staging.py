"""Asynchronous device → host transfer of per-batch values, for state kept in host memory.

When a scorer's state lives on the CPU (``device="cpu"``, for datasets whose state does not fit
next to the model) and the logits are on CUDA, each update computes its per-example values on
the GPU, starts a non-blocking copy of them (``B`` values and ``B`` indices, not the logits) into
pinned host memory, and returns. The copy is applied at the next update, or before
``compute()``/``state_dict()``, by which time it has long finished: no host sync on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["HostStaging"]


def _pinned_copy(t: Tensor) -> Tensor:
    buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    buf.copy_(t, non_blocking=True)
    return buf


@dataclass
class HostStaging:
    """One batch's (indices, values, skipped count) on their way to host memory."""

    event: torch.cuda.Event
    indices: Tensor
    values: Tensor
    skipped: Tensor | None
    step: int  # the update the batch came from

    @classmethod
    def start(
        cls, indices: Tensor, values: Tensor, skipped: Tensor | None, step: int
    ) -> HostStaging:
        staged = cls(
            torch.cuda.Event(),  # type: ignore[no-untyped-call]
            _pinned_copy(indices),
            _pinned_copy(values),
            None if skipped is None else _pinned_copy(skipped),
            step,
        )
        staged.event.record()
        return staged

    def wait(self) -> tuple[Tensor, Tensor, Tensor | None, int]:
        self.event.synchronize()
        return self.indices, self.values, self.skipped, self.step
