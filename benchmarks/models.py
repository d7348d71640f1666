"""Models shared by the benchmarks (the sizes named in docs/performance.md)."""

from __future__ import annotations

from torch import nn


def mnist1d_cnn(channels: int = 32, classes: int = 10) -> nn.Module:
    """A 1D-CNN for MNIST-1D input (B, 1, 40): three conv layers, a linear head."""
    return nn.Sequential(
        nn.Conv1d(1, channels, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 5, classes),
    )


def tiny_mlp(inputs: int = 40, hidden: int = 100, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Linear(inputs, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )
