"""Argument checks shared by scorers, samplers and selection: clear errors, before any change."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "as_float_vector",
    "as_index_tensor",
    "check_fits",
    "check_num_examples",
    "check_range",
    "finite_rows",
    "looks_like_probabilities",
    "warning_stacklevel",
]


def check_num_examples(num_examples: Any) -> int:
    """Validate ``num_examples`` (a positive int; numpy integers are accepted) and return it.

    Example:
        >>> import numpy as np
        >>> check_num_examples(np.int64(10))
        10
    """
    if isinstance(num_examples, bool | np.bool_) or not isinstance(num_examples, int | np.integer):
        raise TypeError(
            f"Expected `num_examples` to be an int (len(dataset)), but got "
            f"{type(num_examples).__name__}"
            + (f" {num_examples!r}" if isinstance(num_examples, float | np.floating) else "")
            + ". Pass len(dataset)."
        )
    if num_examples < 1:
        raise ValueError(f"Expected `num_examples` ≥ 1 (len(dataset)), but got {num_examples}.")
    return int(num_examples)


_UINT64: torch.dtype | None = getattr(torch, "uint64", None)
_INT64_MAX = int(np.iinfo(np.int64).max)


def as_index_tensor(values: Any, name: str) -> Tensor:
    """``values`` as a 1-D int64 tensor (lists, tuples and numpy arrays are converted; an int64
    tensor is returned as is, other integer tensors are converted on their own device without a
    host sync). Raises TypeError/ValueError naming ``name`` otherwise.

    Every integer dtype comes out as int64, the one torch indexes, scatters and takes as class
    targets everywhere (cross-entropy refuses int16/int32 targets; uint16/32/64 tensors cannot
    even be reduced). An empty list is an empty batch. A uint64 value above 2⁶³ − 1 is a
    ValueError for numpy arrays, lists and CPU tensors (a CUDA tensor is converted without a host
    sync, so such a value wraps to a negative number that the range check rejects). Bool, float
    and ragged inputs are TypeErrors.

    Example:
        >>> import numpy as np
        >>> as_index_tensor(np.array([3, 1], dtype=np.uint32), "indices")
        tensor([3, 1])
        >>> as_index_tensor([], "indices")
        tensor([], dtype=torch.int64)
    """
    if isinstance(values, Tensor):
        tensor = values
    else:
        tensor = torch.from_numpy(_as_index_array(values, name))
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"Expected `{name}` to have an integer dtype, but got {tensor.dtype}.")
    if tensor.dim() != 1:
        raise ValueError(
            f"Expected `{name}` to be 1-D (one entry per example), but got shape "
            f"{tuple(tensor.shape)}."
        )
    if (
        tensor.dtype == _UINT64
        and tensor.device.type == "cpu"
        and bool((tensor.view(torch.int64) < 0).any())
    ):
        # a uint64 value beyond int64 is a negative int64 when viewed: checked where it is free
        raise ValueError(
            f"Expected `{name}` to be dataset indices, but got torch.uint64 values beyond "
            "int64 (indices are at most 2**63 - 1)."
        )
    return tensor if tensor.dtype == torch.int64 else tensor.to(torch.int64)


def _as_index_array(values: Any, name: str) -> np.ndarray:
    """A native-order int64 numpy array of a list, tuple or array of integers (see
    :func:`as_index_tensor`); bool arrays pass through for its dtype error."""
    if not isinstance(values, np.ndarray | Sequence) or isinstance(values, str | bytes):
        if isinstance(values, int | np.integer | float | np.floating):
            raise TypeError(
                f"Expected `{name}` to be a 1-D integer tensor, but got the scalar {values!r} "
                f"({type(values).__name__}); for one example pass a list: [{values!r}]."
            )
        raise TypeError(
            f"Expected `{name}` to be a 1-D integer tensor, but got {type(values).__name__}."
        )
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, OverflowError) as err:  # ragged: e.g. a list of samples
        raise TypeError(
            f"Expected `{name}` to be a 1-D integer tensor, but got a {type(values).__name__} "
            f"numpy cannot read as one ({err}). A DataLoader with collate_fn=lambda s: s yields "
            "a list of samples, not a batch: keep the default collate."
        ) from None
    if array.size == 0 and not isinstance(values, np.ndarray):
        array = array.astype(np.int64)  # [] has no dtype of its own: an empty batch
    if array.dtype.kind not in "iub":
        raise TypeError(
            f"Expected `{name}` to be a 1-D integer tensor, but got {type(values).__name__} "
            f"of {array.dtype}."
        )
    if array.dtype.kind == "b":
        return array
    if array.dtype.kind == "u" and array.size and int(array.max()) > _INT64_MAX:
        raise ValueError(
            f"Expected `{name}` to be dataset indices, but got {array.dtype} values up to "
            f"{int(array.max())}, beyond int64 (indices are at most 2**63 - 1)."
        )
    # a new native-order int64 array unless it already is one (and writable: torch warns about
    # sharing read-only memory)
    copy = (
        array.dtype != np.dtype(np.int64)
        or not array.flags.writeable
        or not array.flags.c_contiguous  # negative strides, which torch cannot share
    )
    return array.astype(np.int64, copy=True) if copy else array


def as_float_vector(values: Any, name: str, what: str) -> Tensor:
    """``values`` as a non-empty 1-D float tensor (numpy arrays converted), or a clear error."""
    if isinstance(values, np.ndarray):
        # a copy in native byte order and C layout: torch cannot share reversed (negative-stride)
        # or big-endian arrays
        values = torch.from_numpy(np.ascontiguousarray(values, values.dtype.newbyteorder("=")))
    if not isinstance(values, Tensor) or not values.is_floating_point():
        raise TypeError(
            f"Expected `{name}` to be a 1-D float tensor ({what}), but got "
            f"{getattr(values, 'dtype', type(values).__name__)}."
        )
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(
            f"Expected `{name}` of shape (num_examples,), but got {tuple(values.shape)}."
        )
    return values


def check_range(values: Tensor, low: int, high: int, name: str, what: str) -> None:
    """Raise ValueError unless every entry of ``values`` is in ``[low, high)``.

    Free for CPU tensors (what a DataLoader yields); for CUDA tensors it synchronises once.
    """
    if values.numel() == 0:
        return
    lo, hi = torch.aminmax(values)
    lo_i, hi_i = int(lo), int(hi)
    if lo_i < low or hi_i >= high:
        bad = int(((values < low) | (values >= high)).sum())
        raise ValueError(
            f"Expected `{name}` in [{low}, {high}) ({what}), but got values from {lo_i} to "
            f"{hi_i} ({bad} out of range)."
        )


def per_example_ids(
    per_example_loss: Any, ids: Any, name: str = "indices", what: str = "index"
) -> Tensor:
    """Check a ``(B,)`` float per-example loss and its ``(B,)`` integer ids (dataset indices,
    group ids); return the ids as int64 where they were given. Range checks are the caller's.

    Raises:
        ValueError: the loss is not 1-D (a reduced loss), or the counts differ.
        TypeError: the loss is not a float tensor, or the ids are not integers.
    """
    if not isinstance(per_example_loss, Tensor):
        raise TypeError(
            f"Expected `per_example_loss` to be a torch tensor of shape (batch,) (e.g. "
            f"F.cross_entropy(logits, y, reduction='none')), but got "
            f"{type(per_example_loss).__name__}."
        )
    if per_example_loss.dim() != 1:
        raise ValueError(
            "Expected `per_example_loss` of shape (batch,) — use reduction='none' — but got "
            f"{getattr(per_example_loss, 'shape', type(per_example_loss).__name__)}."
        )
    if not per_example_loss.is_floating_point():
        raise TypeError(
            f"Expected `per_example_loss` to be a float tensor, but got {per_example_loss.dtype}."
        )
    out = as_index_tensor(ids, name)
    if out.numel() != per_example_loss.numel():
        plural = "indices" if what == "index" else f"{what}s"
        raise ValueError(
            f"Expected one {what} per loss, but got {out.numel()} {plural} and "
            f"{per_example_loss.numel()} losses."
        )
    return out


def check_fits(num_examples: int, bytes_per_example: int, device: torch.device) -> None:
    """Raise MemoryError up front when per-example state would not fit in free CUDA memory."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    free, _ = torch.cuda.mem_get_info(device)
    need = (num_examples + 1) * bytes_per_example
    if need > free:
        raise MemoryError(
            f"Per-example state needs {need / 2**30:.2f} GiB ({bytes_per_example} bytes × "
            f"{num_examples} examples) but {device} has {free / 2**30:.2f} GiB free. Keep the "
            "state in host memory with device='cpu' (see docs/scaling.md)."
        )


def finite_rows(logits: Tensor) -> Tensor:
    """``(B,)`` bool: rows of ``logits`` without NaN or ±inf.

    ``x · 0`` is exactly 0 for finite ``x`` and NaN otherwise, so a row sums to 0 exactly when it is
    finite: exact, and 7–10× faster on CPU than ``torch.isfinite(logits).all(1)``.
    """
    return logits.mul(0).sum(dim=1, dtype=torch.float32) == 0


def looks_like_probabilities(logits: Tensor) -> bool:
    """True when every row of ``logits`` (classes on the last dim) is non-negative and sums
    to 1, and some entry lies strictly between 0 and 1.

    Softmax outputs passed where raw logits are expected are accepted by the math but shrink every
    score (a second softmax flattens them towards uniform). Exactly one-hot rows alone are not
    flagged: hand-written logits such as ``[[1.0, 0.0]]`` are real logits. A NaN anywhere gives
    False. One reduction and one host sync on CUDA for logits with a negative entry (a second
    sync only for non-negative ones); empty batches and single-class logits are never flagged.
    The tolerance on the row sums is 1e-3 (1e-2 for 16-bit floats, whose rounding of C
    probabilities adds up).

    Example:
        >>> import torch
        >>> looks_like_probabilities(torch.tensor([[0.2, 0.8], [0.5, 0.5]]))
        True
        >>> looks_like_probabilities(torch.tensor([[0.2, 0.8], [2.0, -1.0]]))
        False
        >>> looks_like_probabilities(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        False
    """
    if logits.dim() == 0 or logits.numel() == 0 or logits.shape[-1] < 2:
        return False
    if float(logits.amin()) < 0:
        return False  # real logits nearly always have a negative entry: one reduction decides
    tol = 1e-3 if logits.element_size() >= 4 else 1e-2
    deviation = (logits.sum(dim=-1, dtype=torch.float32) - 1).abs().amax()
    soft = ((logits > 0) & (logits < 1)).any()  # not only exact 0s and 1s
    return bool((deviation <= tol) & soft)  # NaN anywhere: False


def warning_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller of this function point at the
    first frame outside this package: the user's line, however deep inside the library the
    warning is raised (``update`` → ``update_indexed`` → ``_validate``)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame = sys._getframe(1)  # the function that warns: stacklevel 1
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level
