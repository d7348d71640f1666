"""sampleweights: score every training example from inside any PyTorch loop, and use the scores.

Score (EL2N, GraNd, forgetting events, misclassification), select (prune, error sets) and feed
the selection back (samplers, loss weights). The library never owns the loop, the model or the
optimiser.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> import sampleweights as sw
    >>> ds = sw.WithIndex(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))))
    >>> model = torch.nn.Linear(4, 3)
    >>> scorer = sw.EL2N(len(ds))
    >>> for batch in DataLoader(ds, batch_size=8, shuffle=True):
    ...     logits = model(batch[0])
    ...     scorer.update(batch, logits)
    >>> scorer.compute().shape
    torch.Size([32])
"""

from sampleweights.data import BatchLayout, WithIndex, default_forward, logits_of
from sampleweights.distributed import DistributedMismatchError
from sampleweights.dynamic import DynamicPruner
from sampleweights.errors import StateMismatchError
from sampleweights.groups import group_accuracy, group_weighted_accuracy, worst_group_accuracy
from sampleweights.persist import load_scores, save_scores
from sampleweights.reweight import LossReweighter, Normalize, jtt_weights
from sampleweights.robust import GroupDROLoss
from sampleweights.samplers import JTTSampler, PrunedSampler, UpsampleSampler
from sampleweights.scorers import (
    AUM,
    EL2N,
    Confidence,
    DataMaps,
    Engine,
    Entropy,
    ForgettingTracker,
    GraNd,
    Loss,
    Margin,
    Misclassified,
    NonFinite,
    Scorer,
    ScorerCollection,
    TokenReduce,
    el2n,
    eval_mode,
    score_dataset,
)
from sampleweights.select import Strategy, select

__version__ = "0.2.0"

__all__ = [
    "AUM",
    "EL2N",
    "BatchLayout",
    "Confidence",
    "DataMaps",
    "DistributedMismatchError",
    "DynamicPruner",
    "Engine",
    "Entropy",
    "ForgettingTracker",
    "GraNd",
    "GroupDROLoss",
    "JTTSampler",
    "Loss",
    "LossReweighter",
    "Margin",
    "Misclassified",
    "NonFinite",
    "Normalize",
    "PrunedSampler",
    "Scorer",
    "ScorerCollection",
    "StateMismatchError",
    "Strategy",
    "TokenReduce",
    "UpsampleSampler",
    "WithIndex",
    "__version__",
    "default_forward",
    "el2n",
    "eval_mode",
    "group_accuracy",
    "group_weighted_accuracy",
    "jtt_weights",
    "load_scores",
    "logits_of",
    "save_scores",
    "score_dataset",
    "select",
    "worst_group_accuracy",
]
