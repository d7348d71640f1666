"""Scorers: per-example state keyed by dataset index, updated once per batch."""

from sampleweights.scorers.aum import AUM
from sampleweights.scorers.base import NonFinite, Scorer, TokenReduce
from sampleweights.scorers.collection import ScorerCollection
from sampleweights.scorers.datamaps import DataMaps
from sampleweights.scorers.el2n import EL2N, el2n
from sampleweights.scorers.forgetting import ForgettingTracker
from sampleweights.scorers.grand import Engine, GraNd, Mode
from sampleweights.scorers.misclassified import Misclassified
from sampleweights.scorers.passes import eval_mode, score_dataset
from sampleweights.scorers.stats import Confidence, Entropy, Loss, Margin

__all__ = [
    "AUM",
    "EL2N",
    "Confidence",
    "DataMaps",
    "Engine",
    "Entropy",
    "ForgettingTracker",
    "GraNd",
    "Loss",
    "Margin",
    "Misclassified",
    "Mode",
    "NonFinite",
    "Scorer",
    "ScorerCollection",
    "TokenReduce",
    "el2n",
    "eval_mode",
    "score_dataset",
]
