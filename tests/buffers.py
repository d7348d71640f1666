"""Count large float32 buffers alive at once: the memory claims of the shared scoring pass."""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBuffers(TorchDispatchMode):
    """Peak number of float32 tensors of at least ``numel`` entries (default: the logits' size)
    alive at once, other than views of the logits' own storage and in-place results."""

    def __init__(self, logits: torch.Tensor, numel: int | None = None) -> None:
        super().__init__()
        self.numel = logits.numel() if numel is None else numel
        self.skip = logits.untyped_storage().data_ptr()
        self.live: Counter[int] = Counter()
        self.peak = 0

    def _drop(self, ptr: int) -> None:
        self.live[ptr] -= 1
        if not self.live[ptr]:
            del self.live[ptr]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (
                isinstance(t, torch.Tensor)
                and t.dtype == torch.float32
                and t.numel() >= self.numel
                and t.untyped_storage().data_ptr() != self.skip
                and not any(t is a for a in tree_flatten((args, kwargs))[0])  # in place
            ):
                ptr = t.untyped_storage().data_ptr()
                self.live[ptr] += 1
                weakref.finalize(t, self._drop, ptr)
                self.peak = max(self.peak, len(self.live))
        return out
