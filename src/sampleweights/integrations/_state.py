"""Helpers the framework integrations share: per-rank state in a checkpoint, our samplers.

A scorer's ``state_dict`` is per rank (a rank holds the sums of the batches it saw), but a
Lightning checkpoint is written by rank 0 alone: :func:`gather_rank_states` collects every rank's
state (a collective) so the one file holds them all, and :func:`own_rank_state` picks this rank's
part back out on load. The scorers' own provenance checks (scorer, ``num_examples``, world size,
rank) still run on that part in ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch import Tensor

from sampleweights.distributed import world
from sampleweights.errors import StateMismatchError
from sampleweights.samplers import _MultisetSampler
from sampleweights.scorers.base import Scorer
from sampleweights.scorers.collection import ScorerCollection

__all__ = ["check_scorer", "gather_rank_states", "is_sw_sampler", "own_rank_state", "to_cpu"]

#: what the integrations accept as "a scorer"
AnyScorer = Scorer | ScorerCollection


def check_scorer(scorer: Any, name: str, *, logits: bool = True) -> None:
    """TypeError unless ``scorer`` is a scorer or a ScorerCollection (a logit scorer if
    ``logits``: the in-loop updates hand it logits)."""
    if not isinstance(scorer, Scorer | ScorerCollection):
        raise TypeError(
            f"Expected `{name}` to be a sampleweights scorer (e.g. sw.EL2N(n)) or a "
            f"sw.ScorerCollection, but got {type(scorer).__name__}."
        )
    if logits and scorer.requires_model:
        raise TypeError(
            f"`{name}` is {type(scorer).__name__}, which runs the model itself (no logits): it "
            "cannot be updated from training_step's logits. Score it in a pass with "
            "sw.score_dataset instead (e.g. score_with=...)."
        )


def is_sw_sampler(sampler: Any) -> bool:
    """One of our samplers (PrunedSampler, UpsampleSampler, JTTSampler and their subclasses)."""
    return isinstance(sampler, _MultisetSampler)


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor copied to the CPU (dicts and lists walked), for pickling."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, Mapping):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def gather_rank_states(local: Any) -> dict[str, Any]:
    """``{"world_size": R, "ranks": [state of rank 0, …]}``: every rank's ``local`` state.

    A collective under ``torch.distributed`` (every rank must call it, as every rank calls a
    framework's checkpoint hook); without a process group, a list of one.
    """
    size, _ = world()
    local = to_cpu(local)
    if size == 1:
        return {"world_size": 1, "ranks": [local]}
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, local)
    return {"world_size": size, "ranks": gathered}


def own_rank_state(saved: Any, what: str) -> Any:
    """This rank's entry of a :func:`gather_rank_states` dict.

    Raises:
        StateMismatchError: ``saved`` is malformed or holds no entry for this rank.
    """
    size, rank = world()
    if (
        not isinstance(saved, Mapping)
        or not isinstance(saved.get("ranks"), list)
        or saved.get("world_size") != len(saved["ranks"])
    ):
        raise StateMismatchError(
            f"Expected the {what} state saved by sampleweights' integration "
            f"({{'world_size': R, 'ranks': [...]}}), but got {type(saved).__name__}."
        )
    if saved["world_size"] != size:
        raise StateMismatchError(
            f"The {what} state in this checkpoint was saved by {saved['world_size']} "
            f"process(es); this run has {size}. Per-rank scorer and sampler states resume only "
            "in a job of the same size: resume with the same number of processes, or start the "
            "scorers afresh (save merged scores with sw.save_scores to carry them over)."
        )
    return saved["ranks"][rank]
