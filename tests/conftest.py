"""Shared test helpers."""

from __future__ import annotations

import copy

import pytest
import torch

import sampleweights as sw

LOGIT_SCORERS = [sw.EL2N, sw.ForgettingTracker, sw.Misclassified]


def all_logit_scorers(n: int, confidence_ema: float | None = 0.8, **kw) -> list[sw.Scorer]:
    """One of every logit scorer (the confidence one with ``ema=confidence_ema``), sharing
    ``kw``."""
    return [
        sw.EL2N(n, **kw),
        sw.AUM(n, **kw),
        sw.DataMaps(n, **kw),
        sw.Loss(n, **kw),
        sw.Margin(n, **kw),
        sw.Entropy(n, **kw),
        sw.Confidence(n, ema=confidence_ema, **kw),
        sw.ForgettingTracker(n, **kw),
        sw.Misclassified(n, **kw),
    ]


def snapshot(scorer: sw.Scorer) -> dict:
    """A deep copy of everything a scorer's state_dict holds, for "nothing changed" checks."""
    return copy.deepcopy(scorer.state_dict())


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "state":
            assert a["state"].keys() == b["state"].keys()
            for name in a["state"]:
                assert torch.equal(a["state"][name], b["state"][name]), name
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.fixture(params=LOGIT_SCORERS, ids=lambda c: c.__name__)
def scorer_cls(request):
    return request.param
