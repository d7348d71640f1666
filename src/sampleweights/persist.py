"""Saving merged scores with their provenance: :func:`save_scores` and :func:`load_scores`.

Scores travel from one scoring job to many training jobs (possibly on another world size), so
they are saved as a plain ``.npz`` (numpy only, no pickle): the float32 vector plus a JSON record
of where it came from — scorer and settings, number of examples, number of updates, epoch or
step, library version, and anything else passed as ``**meta``. A scorer's own ``state_dict`` is
per-rank and resumes only on the same world size; saved scores move anywhere.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sampleweights.errors import StateMismatchError
from sampleweights.scorers.base import Scorer
from sampleweights.validation import check_num_examples

__all__ = ["load_scores", "save_scores"]

_FORMAT = "sampleweights.scores/1"


def save_scores(path: str | os.PathLike[str], scores: Tensor | Scorer, **meta: Any) -> Path:
    """Write ``scores`` (a ``(N,)`` tensor, or a scorer whose ``compute()`` is taken) to ``.npz``.

    Args:
        path: the file (``.npz`` is appended when missing).
        scores: the merged scores; a :class:`~sampleweights.Scorer` adds its name, number of
            updates and settings to the provenance (``compute()`` is a collective under DDP:
            call this on every rank, write on one).
        **meta: JSON-serialisable provenance, e.g. ``epoch=3, seeds=10, model="resnet18"``.

    Returns:
        The path written.

    Example:
        >>> import torch, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "el2n")
        >>> p = save_scores(path, torch.tensor([0.5, 0.25]), scorer="el2n", epoch=2)
        >>> scores, meta = load_scores(p, num_examples=2)
        >>> scores.tolist(), meta["epoch"], meta["num_examples"]
        ([0.5, 0.25], 2, 2)
    """
    record: dict[str, Any] = {}
    if isinstance(scores, Scorer):
        scorer = scores
        record.update(
            scorer=scorer.name,
            num_updates=scorer.num_updates,
            settings={k: str(v) for k, v in _settings(scorer).items()},
        )
        scores = scorer.compute()
    if not isinstance(scores, Tensor) or scores.dim() != 1 or not scores.is_floating_point():
        raise TypeError(
            "Expected `scores` to be a 1-D float tensor (a scorer's compute()) or a scorer, but "
            f"got {getattr(scores, 'shape', type(scores).__name__)}."
        )
    from sampleweights import __version__

    record.update(meta)
    record.update(
        format=_FORMAT,
        num_examples=int(scores.numel()),
        version=__version__,
        saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    try:
        provenance = json.dumps(record)
    except TypeError as err:
        raise TypeError(f"`meta` must be JSON-serialisable: {err}") from err
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    array = scores.detach().to("cpu", torch.float32).numpy()
    np.savez(path, scores=array, provenance=np.array(provenance))
    return path


def load_scores(
    path: str | os.PathLike[str], num_examples: int | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """Read scores written by :func:`save_scores`: ``(scores (N,) float32, provenance dict)``.

    Args:
        path: the ``.npz`` file.
        num_examples: ``len(dataset)`` of the dataset the scores will be applied to; a file
            saved for another size is refused.

    Raises:
        StateMismatchError: the file holds scores for another number of examples, or is not a
            scores file.
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        if "scores" not in data or "provenance" not in data:
            raise StateMismatchError(f"{path} is not a sampleweights scores file.")
        scores = torch.from_numpy(data["scores"].astype(np.float32))
        record = json.loads(str(data["provenance"]))
    if record.get("format") != _FORMAT:
        raise StateMismatchError(f"{path} has format {record.get('format')!r}, not {_FORMAT!r}.")
    if num_examples is not None:
        n = check_num_examples(num_examples)
        if scores.numel() != n:
            raise StateMismatchError(
                f"{path} holds scores for {scores.numel()} examples, but the dataset has "
                f"num_examples={n}: they belong to another dataset (or another split)."
            )
    return scores, record


def _settings(scorer: Scorer) -> dict[str, Any]:
    keys = ("nonfinite", "engine", "mode", "param_names", "chunk_size")
    return {k: getattr(scorer, k) for k in keys if hasattr(scorer, k)}
