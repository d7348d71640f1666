"""The shared list of GraNd test settings (model, input, classes), after BackPACK's
``firstorder_settings``: every engine and every test uses the same cases, with readable ids."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Setting:
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], torch.Tensor]
    classes: int
    hooks_cover_all: bool = True  # False: some parameters need the vmap fallback


class SeqClassifier(nn.Module):
    """Embedding + LayerNorm + Linear over a sequence, mean-pooled."""

    def __init__(self, vocab=30, dim=12, classes=4, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.mix(self.norm(self.emb(tokens)))  # (B, T, D): Linear over a sequence
        return self.head(torch.tanh(h).mean(dim=1))


class Transformer(nn.Module):
    def __init__(self, dim=16, classes=3):
        super().__init__()
        self.proj = nn.Linear(6, dim)
        self.layer = nn.TransformerEncoderLayer(
            dim, nhead=2, dim_feedforward=24, dropout=0.1, batch_first=True
        )
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.layer(self.proj(x)).mean(dim=1))


class TiedAndTwice(nn.Module):
    """A Linear called twice, and an output layer tied to the embedding."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.twice = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight  # tied

    def forward(self, tokens):
        h = self.emb(tokens).mean(dim=1)
        h = torch.relu(self.twice(torch.relu(self.twice(h))))
        return self.out(h)


def _mlp():
    return nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)
    )


def _inplace():
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(inplace=True), nn.Linear(16, 5))


def _cnn_gn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, groups=2),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 4),
    )


def _cnn_bn():
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, dilation=2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 4),
    )
    # non-trivial running statistics, as after training
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


def _conv1d():
    return nn.Sequential(
        nn.Conv1d(1, 8, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 10, 10),
    )


def _wide_conv():
    """Many channels on few positions: the Gram-matrix path of the conv rule."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32, 3),
    )


def _reflect_conv():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )


def _tokens(vocab):
    return lambda b, g: torch.randint(0, vocab, (b, 7), generator=g)


def _normal(*shape):
    return lambda b, g: torch.randn(b, *shape, generator=g)


SETTINGS = [
    Setting("mlp", _mlp, _normal(10), 5),
    Setting("inplace-relu", _inplace, _normal(10), 5),
    Setting("cnn-groupnorm", _cnn_gn, _normal(3, 8, 8), 4),
    Setting("cnn-batchnorm-eval", _cnn_bn, _normal(3, 8, 8), 4),
    Setting("embedding-layernorm-seq", SeqClassifier, _tokens(30), 4),
    Setting("embedding-padding-idx", lambda: SeqClassifier(padding_idx=0), _tokens(30), 4),
    Setting("transformer-encoder", Transformer, _normal(9, 6), 3, hooks_cover_all=False),
    Setting("tied-and-twice", TiedAndTwice, _tokens(11), 11, hooks_cover_all=False),
    Setting("conv1d-mnist1d", _conv1d, _normal(1, 40), 10),
    Setting("conv-many-channels-gram", _wide_conv, _normal(3, 7, 7), 3),
    Setting("conv-reflect-padding", _reflect_conv, _normal(3, 8, 8), 3, hooks_cover_all=False),
]


def reference_grand(model, x, y, names=None):
    """Obviously correct: one example at a time, ordinary autograd, eval mode."""
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    named = dict(model.named_parameters())
    names = names or [n for n, p in named.items() if p.requires_grad]
    params = [named[n] for n in names]
    out = []
    for b in range(len(y)):
        logits = model(x[b : b + 1])
        logits = logits if logits.dtype == torch.float64 else logits.float()
        loss = nn.functional.cross_entropy(logits, y[b : b + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(sum((g.double() ** 2).sum() for g in grads if g is not None).sqrt())
    for m, flag in was:
        m.training = flag
    return torch.stack(out)
