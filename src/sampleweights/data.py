"""Dataset wrapping and batch reading: where indices, targets and model inputs live in a batch.

Every scorer keys its state by *dataset index*, so the index of each example has to travel with
the example through the user's DataLoader. :class:`WithIndex` appends it to each sample;
:class:`BatchLayout` says where to find index, target and inputs in a collated batch, following
DESIGN.md ("Batch layout"):

* tuple samples: ``WithIndex`` appends the index, so batches read as ``(*inputs, target, index)``;
* dict samples: the index goes under ``"index"``; the target is ``"target"``, ``"targets"``,
  ``"label"`` or ``"labels"`` unless ``target_key`` names it;
* a non-tuple, non-dict sample becomes ``(sample, index)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

__all__ = [
    "TARGET_KEYS",
    "BatchLayout",
    "Forward",
    "WithIndex",
    "default_forward",
    "logits_of",
    "model_device",
    "move_to_device",
]

T_co = TypeVar("T_co", covariant=True)

#: Dict keys tried, in order, for the target when ``BatchLayout.target_key`` is ``None``.
TARGET_KEYS: tuple[str, ...] = ("target", "targets", "label", "labels")

#: ``forward(model, batch) -> output``: how to call the model on a batch.
Forward = Callable[[nn.Module, Any], Any]


class WithIndex(Dataset[Any], Generic[T_co]):
    """Wrap a map-style dataset so that every sample carries its own dataset index.

    ``ds[i]`` is ``(*dataset[i], i)`` for tuple (or list) samples, ``{**dataset[i], "index": i}``
    for dict samples and ``(dataset[i], i)`` for anything else. A DataLoader over it yields
    batches that every scorer's ``update(batch, logits)`` reads without further configuration.

    Args:
        dataset: a map-style dataset (``__getitem__`` and ``__len__``).
        index_key: the key the index is stored under for dict samples.

    Raises:
        TypeError: for an ``IterableDataset`` (it has no indices) or an object without
            ``__len__``/``__getitem__``.
        KeyError: when a dict sample already has ``index_key`` (never silently overwritten).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = WithIndex(TensorDataset(torch.zeros(5, 3), torch.arange(5)))
        >>> x, y, i = ds[3]
        >>> int(y), i
        (3, 3)
        >>> len(ds)
        5
    """

    def __init__(self, dataset: Dataset[T_co], *, index_key: str = "index") -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                "WithIndex needs a map-style dataset, but got an IterableDataset, whose examples "
                "have no stable index. Materialise it into a map-style dataset, or compute "
                "indices yourself and call scorer.update_indexed(indices, logits, targets)."
            )
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(
                "WithIndex needs a map-style dataset with __getitem__ and __len__, but got "
                f"{type(dataset).__name__}."
            )
        if not isinstance(index_key, str):
            raise TypeError(
                f"Expected `index_key` to be a str, but got {type(index_key).__name__}."
            )
        self.dataset = dataset
        self.index_key = index_key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type,unused-ignore]

    def _attach(self, sample: Any, index: int) -> Any:
        if isinstance(sample, tuple | list):
            return (*sample, index)
        if isinstance(sample, Mapping):
            if self.index_key in sample:
                raise KeyError(
                    f"The dataset's sample {index} already has the key {self.index_key!r}; "
                    "WithIndex will not overwrite it. Pass another name, e.g. "
                    "WithIndex(dataset, index_key='sw_index'), and the same name to the "
                    "scorer's layout: BatchLayout(index_key='sw_index')."
                )
            return {**sample, self.index_key: index}
        return (sample, index)

    def _normalise(self, index: int) -> int:
        index = int(index)
        return index + len(self) if index < 0 else index

    def __getitem__(self, index: int) -> Any:
        index = self._normalise(index)
        return self._attach(self.dataset[index], index)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        # DataLoader fetches a whole batch through __getitems__ when the dataset has one; keep the
        # wrapped dataset's batched fetch when it exists.
        indices = [self._normalise(i) for i in indices]
        getitems = getattr(self.dataset, "__getitems__", None)
        samples = getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]
        return [self._attach(s, i) for s, i in zip(samples, indices, strict=True)]

    def __repr__(self) -> str:
        return f"WithIndex({self.dataset!r}, index_key={self.index_key!r})"


@dataclass(frozen=True)
class BatchLayout:
    """Where index, target and model inputs sit in a collated batch.

    Tuple (or list) batches use positions, dict batches use keys. The defaults read what a
    DataLoader over :class:`WithIndex` yields: ``(*inputs, target, index)`` or a dict with
    ``"index"`` and one of :data:`TARGET_KEYS`.

    Example:
        >>> import torch
        >>> layout = BatchLayout()
        >>> batch = (torch.zeros(2, 3), torch.tensor([1, 0]), torch.tensor([7, 9]))
        >>> layout.indices(batch).tolist(), layout.targets(batch).tolist()
        ([7, 9], [1, 0])
        >>> BatchLayout(target_key="y").targets({"x": torch.zeros(1), "y": torch.tensor([2]),
        ...                                      "index": torch.tensor([0])}).tolist()
        [2]
    """

    index_pos: int = -1  # position of the index in a tuple batch
    target_pos: int = -2  # position of the target in a tuple batch
    index_key: str = "index"  # key of the index in a dict batch
    target_key: str | None = None  # key of the target in a dict batch; None: see TARGET_KEYS

    def __post_init__(self) -> None:
        for name in ("index_pos", "target_pos"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Expected `{name}` to be an int, but got {value!r}.")
        if self.index_pos == self.target_pos:
            raise ValueError(
                f"`index_pos` and `target_pos` must differ, but both are {self.index_pos}."
            )

    # -- reading ---------------------------------------------------------------------------------
    def indices(self, batch: Any) -> Any:
        """The dataset indices of a batch (whatever the collate produced, usually a tensor)."""
        if isinstance(batch, Mapping):
            if self.index_key not in batch:
                raise _no_index_error(f"a dict batch without the key {self.index_key!r}", batch)
            return batch[self.index_key]
        if isinstance(batch, tuple | list):
            if len(batch) < 2:
                raise _no_index_error(f"a {type(batch).__name__} of {len(batch)} element(s)", batch)
            return batch[self._position(batch, self.index_pos, "index_pos")]
        raise _no_index_error(f"a batch of type {type(batch).__name__}", batch)

    def targets(self, batch: Any) -> Any:
        """The targets (class labels) of a batch."""
        if isinstance(batch, Mapping):
            return batch[self._target_key(batch)]
        if isinstance(batch, tuple | list):
            if len(batch) < 3:
                raise ValueError(
                    f"Expected a batch (*inputs, target, index) with at least 3 elements, but "
                    f"got {len(batch)}. A DataLoader over sw.WithIndex(dataset) yields that "
                    "layout for (input, target) samples; for other layouts pass "
                    "layout=sw.BatchLayout(target_pos=..., index_pos=...) to the scorer, or call "
                    "update_indexed(indices, logits, targets)."
                )
            return batch[self._position(batch, self.target_pos, "target_pos")]
        raise TypeError(
            f"Expected a tuple, list or dict batch, but got {type(batch).__name__}. Call "
            "update_indexed(indices, logits, targets) for other batch types."
        )

    def inputs(self, batch: Any) -> Any:
        """Everything but index and target: a tuple for tuple batches, a dict for dict batches."""
        if isinstance(batch, Mapping):
            drop = {self.index_key, self._target_key(batch, required=False)}
            return {k: v for k, v in batch.items() if k not in drop}
        if isinstance(batch, tuple | list):
            n = len(batch)
            positions = {self.index_pos % n, self.target_pos % n}
            return tuple(v for i, v in enumerate(batch) if i not in positions)
        raise TypeError(f"Expected a tuple, list or dict batch, but got {type(batch).__name__}.")

    def _position(self, batch: Sequence[Any], pos: int, name: str) -> int:
        if not -len(batch) <= pos < len(batch):
            raise IndexError(
                f"`{name}`={pos} is outside a batch of {len(batch)} elements; set "
                f"BatchLayout({name}=...) to where that element is."
            )
        return pos

    def _target_key(self, batch: Mapping[str, Any], *, required: bool = True) -> str | None:
        if self.target_key is not None:
            if self.target_key not in batch and required:
                raise KeyError(
                    f"The batch has no target key {self.target_key!r} (it has {sorted(batch)})."
                )
            return self.target_key
        present = [k for k in TARGET_KEYS if k in batch]
        if len(present) == 1:
            return present[0]
        if not required:
            return None
        if not present:
            raise KeyError(
                f"Found no target in a dict batch with keys {sorted(batch)}: expected one of "
                f"{list(TARGET_KEYS)}, or name it with BatchLayout(target_key=...)."
            )
        raise KeyError(
            f"The dict batch has several possible target keys {present}; name the one to use "
            "with BatchLayout(target_key=...)."
        )


def _no_index_error(what: str, batch: Any) -> ValueError:
    return ValueError(
        f"Cannot find dataset indices in {what}. Wrap your dataset in sw.WithIndex(dataset) so "
        "every batch carries its examples' indices (tuple batches end with the index, dict "
        "batches get the key 'index'), or call scorer.update_indexed(indices, logits, targets)."
    )


# -- calling the model ---------------------------------------------------------------------------
def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) tuple, list or dict to ``device``; other leaves untouched."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj


def default_forward(layout: BatchLayout | None = None) -> Forward:
    """The default ``forward(model, batch)``: ``model(batch[0])`` or ``model(**inputs)``.

    Tuple batches call the model on their first element; dict batches call it with every key other
    than index and target as keyword arguments. Inputs are moved to the model's device first.

    Example:
        >>> import torch
        >>> fwd = default_forward()
        >>> model = torch.nn.Linear(3, 2)
        >>> fwd(model, (torch.zeros(4, 3), torch.zeros(4), torch.arange(4))).shape
        torch.Size([4, 2])
    """
    layout = layout or BatchLayout()

    def forward(model: nn.Module, batch: Any) -> Any:
        device = model_device(model)
        if isinstance(batch, Mapping):
            return model(**move_to_device(layout.inputs(batch), device))
        if isinstance(batch, tuple | list):
            return model(move_to_device(batch[0], device))
        raise TypeError(
            f"The default forward handles tuple, list and dict batches, but got "
            f"{type(batch).__name__}; pass forward=lambda model, batch: ... ."
        )

    return forward


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: the tensor itself, ``output["logits"]`` or ``.logits``.

    Example:
        >>> import torch
        >>> logits_of({"logits": torch.ones(1, 2)}).shape
        torch.Size([1, 2])
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]  # type: ignore[no-any-return]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"Cannot find logits in the model's output of type {type(output).__name__}: expected a "
        "tensor, a dict with 'logits' or an object with a .logits attribute. Pass "
        "forward=lambda model, batch: ... returning the logits tensor."
    )
