"""Scorers: per-example state keyed by dataset index, updated once per batch."""

from sampleweights.scorers.base import NonFinite, Scorer
from sampleweights.scorers.el2n import EL2N, el2n
from sampleweights.scorers.forgetting import ForgettingTracker
from sampleweights.scorers.grand import Engine, GraNd, Mode
from sampleweights.scorers.misclassified import Misclassified
from sampleweights.scorers.passes import eval_mode, score_dataset

__all__ = [
    "EL2N",
    "Engine",
    "ForgettingTracker",
    "GraNd",
    "Misclassified",
    "Mode",
    "NonFinite",
    "Scorer",
    "el2n",
    "eval_mode",
    "score_dataset",
]
