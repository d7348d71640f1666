"""Dataset wrapping and batch reading: where indices, targets and model inputs live in a batch.

Every scorer keys its state by *dataset index*, so the index of each example has to travel with
the example through the user's DataLoader. :class:`WithIndex` appends it to each sample;
:class:`BatchLayout` says where to find index, target and model input in a collated batch:

* tuple samples: ``WithIndex`` appends the index. The default layout reads 3-element batches as
  ``(input, target, index)``; longer batches, such as ``(x, y, group, index)``, must say where the
  target is (``BatchLayout(target_pos=1)``): the default refuses them instead of guessing;
* dict samples: the index goes under ``"index"``; the target is ``"target"``, ``"targets"``,
  ``"label"`` or ``"labels"`` unless ``target_key`` names it; the model gets the other keys;
* a non-tuple, non-dict sample becomes ``(sample, index)``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
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
    batches that every scorer's ``update(batch, logits)`` reads without further configuration for
    ``(input, target)`` and dict samples. Samples with more fields, such as ``(x, y, group)``,
    give batches ``(x, y, group, index)`` whose target position the scorer must be told:
    ``layout=BatchLayout(target_pos=1)`` (plus ``input_pos=0`` where the library calls the model,
    in ``score_dataset`` and ``GraNd``); the default layout refuses them rather than guess.

    Args:
        dataset: a map-style dataset (``__getitem__`` and ``__len__``).
        index_key: the key the index is stored under for dict samples.

    Raises:
        TypeError: for an ``IterableDataset`` (it has no indices) or an object without
            ``__len__``/``__getitem__``.
        KeyError: when a dict sample already has ``index_key`` (never silently overwritten).
        IndexError: ``ds[i]`` for an index outside ``[-len(ds), len(ds))`` (never wrapped by
            the wrapped dataset into another example's position); TypeError for a non-integer.

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

    @staticmethod
    def _normalise(index: Any, n: int) -> int:
        """``index`` as a dataset position in ``[0, n)``: negatives count from the end; an index
        outside the dataset is an IndexError, never wrapped around by the wrapped dataset."""
        if isinstance(index, bool | np.bool_) or (
            isinstance(index, torch.Tensor) and index.dtype == torch.bool
        ):
            raise TypeError(f"Dataset indices must be integers, but got {index!r}.")
        try:
            position = operator.index(index)
        except TypeError:
            raise TypeError(
                f"Dataset indices must be integers, but got {type(index).__name__} {index!r}."
            ) from None
        if not -n <= position < n:
            raise IndexError(f"Index {position} is out of range for a dataset of {n} examples.")
        return position + n if position < 0 else position

    def __getitem__(self, index: int) -> Any:
        index = self._normalise(index, len(self))
        return self._attach(self.dataset[index], index)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        # DataLoader fetches a whole batch through __getitems__ when the dataset has one; keep the
        # wrapped dataset's batched fetch when it exists.
        n = len(self)
        indices = [self._normalise(i, n) for i in indices]
        getitems = getattr(self.dataset, "__getitems__", None)
        samples = getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]
        return [self._attach(s, i) for s, i in zip(samples, indices, strict=True)]

    def __repr__(self) -> str:
        return f"WithIndex({self.dataset!r}, index_key={self.index_key!r})"


@dataclass(frozen=True)
class BatchLayout:
    """Where index, target and model input sit in a collated batch.

    Tuple (or list) batches use positions, dict batches use keys. The defaults read what a
    DataLoader over :class:`WithIndex` yields for ``(input, target)`` samples and for dict samples:

    * a tuple batch of **3** elements is ``(input, target, index)``;
    * a tuple batch of **2** elements is ``(input, index)`` (no target: fine for the model's
      forward; scorers need a target);
    * a tuple batch of **more than 3** elements is an error unless ``target_pos`` is given: for
      ``WithIndex(TensorDataset(x, y, group))`` the batch is ``(x, y, group, index)`` and reading
      the second-to-last element as the target would silently score against ``group``;
    * a dict batch has the index under ``index_key`` and the target under ``target_key`` (or the
      one of :data:`TARGET_KEYS` present); the model gets every other key as a keyword argument.
      Several of :data:`TARGET_KEYS` present (``"label"`` and ``"labels"``) is an error, also for
      the model's inputs: the one not read as the target would reach the model as an input.

    The model input of a tuple batch (what :func:`default_forward` calls the model on) is
    ``batch[input_pos]``, or, when ``input_pos`` is ``None``, the one element that is neither the
    index nor the target (an error when several remain: set ``input_pos`` or pass a ``forward``).

    Positions may be negative (counted from the end), as in Python indexing.

    Raises:
        TypeError: for a position that is not an int (or ``None`` where allowed) or a key that is
            not a str.
        ValueError: for two roles at the same position.

    Example:
        >>> import torch
        >>> layout = BatchLayout()
        >>> batch = (torch.zeros(2, 3), torch.tensor([1, 0]), torch.tensor([7, 9]))
        >>> layout.indices(batch).tolist(), layout.targets(batch).tolist()
        ([7, 9], [1, 0])
        >>> jtt = BatchLayout(target_pos=1)  # batches (x, y, group, index)
        >>> jtt.targets((torch.zeros(2, 3), torch.tensor([1, 0]), torch.tensor([3, 3]),
        ...              torch.tensor([7, 9]))).tolist()
        [1, 0]
        >>> BatchLayout(target_key="y").targets({"x": torch.zeros(1), "y": torch.tensor([2]),
        ...                                      "index": torch.tensor([0])}).tolist()
        [2]
    """

    index_pos: int = -1  # position of the index in a tuple batch (WithIndex appends it: last)
    target_pos: int | None = None  # position of the target; None: 1 in a 3-element batch
    index_key: str = "index"  # key of the index in a dict batch
    target_key: str | None = None  # key of the target in a dict batch; None: see TARGET_KEYS
    input_pos: int | None = None  # position of the model input; None: the one element left

    def __post_init__(self) -> None:
        for name in ("index_pos", "target_pos", "input_pos"):
            value = getattr(self, name)
            if value is None and name != "index_pos":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                allowed = "an int" if name == "index_pos" else "an int or None"
                raise TypeError(f"Expected `{name}` to be {allowed}, but got {value!r}.")
        for name in ("index_key", "target_key"):
            value = getattr(self, name)
            if not (isinstance(value, str) or (value is None and name == "target_key")):
                raise TypeError(f"Expected `{name}` to be a str, but got {value!r}.")
        given = [
            (name, getattr(self, name))
            for name in ("index_pos", "target_pos", "input_pos")
            if getattr(self, name) is not None
        ]
        for i, (a, pos_a) in enumerate(given):
            for b, pos_b in given[i + 1 :]:
                if pos_a == pos_b:
                    raise ValueError(f"`{a}` and `{b}` must differ, but both are {pos_a}.")
        if self.target_key == self.index_key:
            raise ValueError(
                f"`target_key` and `index_key` must differ, but both are {self.index_key!r}: the "
                "dataset indices would be scored as class labels."
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
            return batch[self._position(len(batch), self.index_pos, "index_pos")]
        raise _no_index_error(f"a batch of type {type(batch).__name__}", batch)

    def targets(self, batch: Any) -> Any:
        """The targets (class labels) of a batch."""
        if isinstance(batch, Mapping):
            return batch[self._target_key(batch)]
        if isinstance(batch, tuple | list):
            _, target = self._positions(batch)
            if target is None:
                raise ValueError(
                    f"Expected a batch (input, target, index) with at least 3 elements, but "
                    f"got {len(batch)}. A DataLoader over sw.WithIndex(dataset) yields that "
                    "layout for (input, target) samples; for other layouts pass "
                    "layout=sw.BatchLayout(target_pos=..., index_pos=...) to the scorer, or call "
                    "update_indexed(indices, logits, targets)."
                )
            return batch[target]
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
            positions = self._positions(batch)
            return tuple(v for i, v in enumerate(batch) if i not in positions)
        raise TypeError(f"Expected a tuple, list or dict batch, but got {type(batch).__name__}.")

    def model_input(self, batch: Any) -> Any:
        """What the model is called on: one element of a tuple batch, or a dict of keyword inputs.

        Tuple batches: ``batch[input_pos]``, or the one element that is neither index nor target
        when ``input_pos`` is ``None``. Dict batches: every key other than index and target.

        Example:
            >>> import torch
            >>> layout = BatchLayout(index_pos=0, target_pos=1)  # batches (index, target, tokens)
            >>> batch = (torch.tensor([4, 5]), torch.tensor([1, 0]), torch.zeros(2, 8))
            >>> layout.model_input(batch).shape
            torch.Size([2, 8])
        """
        if isinstance(batch, Mapping):
            return self.inputs(batch)
        if not isinstance(batch, tuple | list):
            raise TypeError(
                f"Expected a tuple, list or dict batch, but got {type(batch).__name__}; pass "
                "forward=lambda model, batch: ... ."
            )
        n = len(batch)
        index, target = self._positions(batch)
        if self.input_pos is not None:
            pos = self._position(n, self.input_pos, "input_pos")
            if pos in (index, target):
                role = "index_pos" if pos == index else "target_pos"
                raise ValueError(
                    f"`input_pos`={self.input_pos} and `{role}` name the same element of a batch "
                    f"of {n} elements; set BatchLayout(input_pos=...) to where the model input is."
                )
            return batch[pos]
        rest = [i for i in range(n) if i not in (index, target)]
        if len(rest) != 1:
            raise ValueError(
                f"Cannot tell which element of a batch of {n} elements is the model input: "
                f"positions {rest} are neither index (at {index}) nor target (at {target}). "
                "Name it with BatchLayout(input_pos=...), or pass "
                "forward=lambda model, batch: model(...) for a model with several inputs."
            )
        return batch[rest[0]]

    def _positions(self, batch: Sequence[Any]) -> tuple[int, int | None]:
        """Index and target positions in ``[0, len(batch))`` (target ``None``: no target)."""
        n = len(batch)
        if n < 2:
            raise _no_index_error(f"a {type(batch).__name__} of {n} element(s)", batch)
        index = self._position(n, self.index_pos, "index_pos")
        target: int | None
        if self.target_pos is not None:
            target = self._position(n, self.target_pos, "target_pos")
            if target == index:
                raise ValueError(
                    f"`index_pos`={self.index_pos} and `target_pos`={self.target_pos} name the "
                    f"same element of a batch of {n} elements; set them to where index and "
                    "target are."
                )
        elif n == 2:
            target = None  # (input, index): a non-tuple sample, no target
        elif n == 3 and index == 2:
            target = 1  # (input, target, index): WithIndex over (input, target) samples
        else:
            raise ValueError(
                f"Cannot tell where the target is in a batch of {n} elements with the index at "
                f"position {self.index_pos}: without `target_pos` only 3-element batches "
                "(input, target, index) are read. For WithIndex(TensorDataset(x, y, group)) the "
                "batch is (x, y, group, index): pass layout=sw.BatchLayout(target_pos=1) (and "
                "input_pos=... if the model input is not the only other element), or call "
                "update_indexed(indices, logits, targets)."
            )
        return index, target

    @staticmethod
    def _position(n: int, pos: int, name: str) -> int:
        if not -n <= pos < n:
            raise ValueError(
                f"`{name}`={pos} is outside a batch of {n} elements; set "
                f"BatchLayout({name}=...) to where that element is."
            )
        return pos % n

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
        if not present:
            if not required:
                return None  # the model's inputs of an unlabelled batch
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
        moved = [move_to_device(v, device) for v in obj]
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple: fields as arguments
            return type(obj)(*moved)
        return type(obj)(moved)
    return obj


def default_forward(layout: BatchLayout | None = None) -> Forward:
    """The default ``forward(model, batch)``: ``model(layout.model_input(batch))`` or
    ``model(**inputs)``.

    Tuple batches call the model on their model input as ``layout`` places it (by default the
    first element of an ``(input, target, index)`` batch; see :meth:`BatchLayout.model_input`);
    dict batches call it with every key other than index and target as keyword arguments. Inputs
    are moved to the model's device first.

    Raises:
        ValueError: when ``layout`` cannot tell which element is the model input (see
            :class:`BatchLayout`); the message says which argument to set.
        TypeError: for a batch that is not a tuple, list or dict.

    Example:
        >>> import torch
        >>> fwd = default_forward()
        >>> model = torch.nn.Linear(3, 2)
        >>> fwd(model, (torch.zeros(4, 3), torch.zeros(4), torch.arange(4))).shape
        torch.Size([4, 2])
        >>> fwd = default_forward(BatchLayout(index_pos=0, target_pos=1))  # (index, target, x)
        >>> fwd(model, (torch.arange(4), torch.zeros(4), torch.zeros(4, 3))).shape
        torch.Size([4, 2])
    """
    if layout is not None and not isinstance(layout, BatchLayout):
        raise TypeError(
            f"Expected `layout` to be a sw.BatchLayout, but got {type(layout).__name__}."
        )
    read = layout if layout is not None else BatchLayout()

    def forward(model: nn.Module, batch: Any) -> Any:
        if not isinstance(batch, Mapping | tuple | list):
            raise TypeError(
                f"The default forward handles tuple, list and dict batches, but got "
                f"{type(batch).__name__}; pass forward=lambda model, batch: ... ."
            )
        inputs = move_to_device(read.model_input(batch), model_device(model))
        if isinstance(batch, Mapping):
            return model(**inputs)
        return model(inputs)

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
