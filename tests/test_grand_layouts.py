"""GraNd's hook engine on layouts where a layer's rows are *not* the batch's examples in order.

Each setting is a model whose batch reaches some covered layer sequence-first, broadcast from a
batch of one, reordered, routed, flattened, behind a user's forward hook, or through a
reparametrised weight. ``engine="auto"`` must equal the one-example-at-a-time reference; with
``engine="hooks"`` the answer is exact or an :class:`UnsupportedLayerError` saying why.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import sampleweights as sw
from grand_settings import reference_grand
from sampleweights.pergrad import (
    UnsupportedLayerError,
    hooks_sq_norms,
    register_rule,
    registered_rule,
    rules,
)


@dataclass(frozen=True)
class Layout:
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], torch.Tensor]
    classes: int
    seq: int  # the sequence length T: batch T is the T == B case
    hooks_reason: str | None  # what engine="hooks" must say at B = 7 (None: hooks cover all)


class SeqFirstEncoder(nn.Module):
    """PyTorch's default TransformerEncoderLayer (batch_first=False) on (T, B, D)."""

    def __init__(self, dim=8, classes=3):
        super().__init__()
        self.proj = nn.Linear(5, dim)
        self.layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=12, dropout=0.1)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):  # (B, T, 5)
        h = self.layer(self.proj(x).transpose(0, 1))  # (T, B, D)
        return self.head(h.mean(dim=0))


class SeqFirstEmbedding(nn.Module):
    """Embedding and LayerNorm on (T, B, …)."""

    def __init__(self, vocab=20, dim=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):  # (B, T)
        h = self.norm(self.emb(tokens.t()))  # (T, B, D)
        return self.head(torch.tanh(h).mean(dim=0))


class SeqFirstLSTM(nn.Module):
    """A seq-first LSTM with the head on h[-1:], shape (1, B, H)."""

    def __init__(self, classes=3):
        super().__init__()
        self.lstm = nn.LSTM(4, 6)
        self.head = nn.Linear(6, classes)

    def forward(self, x):  # (B, T, 4)
        out, _ = self.lstm(x.transpose(0, 1))  # (T, B, H)
        return self.head(out[-1:]).squeeze(0)


class BroadcastPositions(nn.Module):
    """BERT-style: position ids of batch 1, embedded once and added to every example."""

    def __init__(self, vocab=20, seq=5, dim=6, classes=3):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.register_buffer("position_ids", torch.arange(seq).unsqueeze(0), persistent=False)

    def forward(self, tokens):  # (B, T)
        h = self.tok(tokens) + self.pos(self.position_ids[:, : tokens.shape[1]])  # (1, T, D)
        return self.head(torch.tanh(self.norm(h)).mean(dim=1))


class SortByLength(nn.Module):
    """Sort the batch by length inside forward (as for packed sequences), then restore it."""

    def __init__(self, vocab=20, dim=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):  # (B, T), 0 = padding
        order = (tokens != 0).sum(dim=1).argsort(descending=True, stable=True)
        h = torch.tanh(self.mix(self.emb(tokens[order])))  # rows in length order
        return self.head(h[order.argsort()].mean(dim=1))  # restored


class RoutedExperts(nn.Module):
    """Mixture of experts: each example goes through one of two Linear experts."""

    def __init__(self, classes=3):
        super().__init__()
        self.gate = nn.Linear(4, 1)
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
        self.head = nn.Linear(6, classes)

    def forward(self, x):  # (B, 4)
        to_a = x[:, 0] > 0
        h = torch.zeros(x.shape[0], 6, dtype=x.dtype)
        h[to_a] = self.a(x[to_a])
        h[~to_a] = self.b(x[~to_a])
        return self.head(torch.tanh(h) * torch.sigmoid(self.gate(x)))


class FlattenedView(nn.Module):
    """A Linear on a (B·T, I) view."""

    def __init__(self, classes=3):
        super().__init__()
        self.mix = nn.Linear(4, 6)
        self.head = nn.Linear(6, classes)

    def forward(self, x):  # (B, T, 4)
        b, t, i = x.shape
        h = torch.tanh(self.mix(x.reshape(b * t, i))).reshape(b, t, 6)
        return self.head(h.mean(dim=1))


class WithAdapter(nn.Module):
    """A user forward hook that changes a covered layer's output (an adapter)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.adapter = nn.Linear(6, 6)  # scored too
        self.net[0].register_forward_hook(lambda m, args, out: out + 0.5 * self.adapter(out))

    def forward(self, x):
        return self.net(x)


def _weight_norm():
    with pytest.warns(FutureWarning):  # torch deprecates it, models still use it
        first = nn.utils.weight_norm(nn.Linear(4, 6))
    return nn.Sequential(first, nn.Tanh(), nn.Linear(6, 3))


def _parametrized_weight_norm():
    first = nn.utils.parametrizations.weight_norm(nn.Linear(4, 6))
    return nn.Sequential(first, nn.Tanh(), nn.Linear(6, 3))


def _tokens(seq, low=0):
    def make(b, g):
        t = torch.randint(1, 20, (b, seq), generator=g)
        if low:  # random lengths: trailing padding
            keep = torch.arange(seq) < torch.randint(1, seq + 1, (b, 1), generator=g)
            t = t * keep
        return t

    return make


def _normal(*shape):
    return lambda b, g: torch.randn(b, *shape, generator=g)


_SEQ_FIRST = "sequence-first|do not have the batch size|did not move with the examples"
LAYOUTS = [
    Layout("seq-first-encoder-T7", SeqFirstEncoder, _normal(7, 5), 3, 7, _SEQ_FIRST),
    Layout("seq-first-encoder-T3", SeqFirstEncoder, _normal(3, 5), 3, 3, _SEQ_FIRST),
    Layout("seq-first-encoder-T1", SeqFirstEncoder, _normal(1, 5), 3, 1, _SEQ_FIRST),
    Layout("seq-first-embedding-T7", SeqFirstEmbedding, _tokens(7), 3, 7, _SEQ_FIRST),
    Layout("seq-first-embedding-T4", SeqFirstEmbedding, _tokens(4), 3, 4, _SEQ_FIRST),
    Layout("seq-first-embedding-T1", SeqFirstEmbedding, _tokens(1), 3, 1, _SEQ_FIRST),
    Layout("seq-first-lstm-head", SeqFirstLSTM, _normal(5, 4), 3, 5, "LSTM"),
    Layout("broadcast-position-ids", BroadcastPositions, _tokens(5), 3, 5, "broadcast"),
    Layout("sort-by-length", SortByLength, _tokens(6, low=1), 3, 6, "reordering"),
    Layout("routed-experts", RoutedExperts, _normal(4), 3, 4, "routed subset"),
    Layout("flattened-view", FlattenedView, _normal(5, 4), 3, 5, "flattened"),
    Layout("user-hook-changes-output", WithAdapter, _normal(4), 3, 4, None),
    Layout("weight-norm", _weight_norm, _normal(4), 3, 4, "weight_g.*weight_norm"),
    Layout("parametrized-weight-norm", _parametrized_weight_norm, _normal(4), 3, 4, "parametriz"),
]


def case(layout, batch, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = layout.build().to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = layout.inputs(batch, gen)
    if x.is_floating_point():
        x = x.to(dtype)
    y = torch.randint(0, layout.classes, (batch,), generator=gen)
    return model, x, y


def grand(model, x, y, engine, **kwargs):
    g = sw.GraNd(model, len(y), engine=engine, **kwargs)
    g.update_indexed(torch.arange(len(y)), x, y)
    return g.compute()


def _batches(layout):
    return sorted({1, 7, layout.seq})


@pytest.mark.parametrize(
    ("layout", "batch"),
    [(lay, b) for lay in LAYOUTS for b in _batches(lay)],
    ids=lambda v: v.id if isinstance(v, Layout) else f"B{v}",
)
def test_auto_equals_one_example_at_a_time(layout, batch):
    model, x, y = case(layout, batch)
    want = reference_grand(model, x, y).float()
    for seed in range(2):  # a second batch of the same signature uses the cached probe verdicts
        if seed:
            _, x, y = case(layout, batch, seed=seed)
            want = reference_grand(model, x, y).float()
        torch.testing.assert_close(grand(model, x, y, "auto"), want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("layout", "batch"),
    [(lay, b) for lay in LAYOUTS for b in _batches(lay)],
    ids=lambda v: v.id if isinstance(v, Layout) else f"B{v}",
)
def test_hooks_is_exact_or_says_why(layout, batch):
    model, x, y = case(layout, batch)
    want = reference_grand(model, x, y).float()
    if layout.hooks_reason is not None and batch == 7:
        with pytest.raises(UnsupportedLayerError, match=layout.hooks_reason):
            grand(model, x, y, "hooks")
        return
    try:
        got, error = grand(model, x, y, "hooks"), None
    except UnsupportedLayerError as err:
        got, error = None, str(err)
    if error is None:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    else:  # one line per reason, naming the parameters
        assert layout.hooks_reason is not None, error
        assert re.search(r"\n  \S+ \(\w+\)(, \S+ \(\w+\))*: \w", error), error


def test_lstm_head_is_right_with_params_on_the_head_alone():
    layout = next(lay for lay in LAYOUTS if lay.id == "seq-first-lstm-head")
    for batch in (1, 5, 7):
        model, x, y = case(layout, batch)
        names = ["head.weight", "head.bias"]
        want = reference_grand(model, x, y, names).float()
        torch.testing.assert_close(
            grand(model, x, y, "auto", params=names), want, rtol=1e-4, atol=1e-7
        )


def test_seq_first_t_equals_b_goes_to_the_fallback_in_float64():
    """T == B: shapes look batch-first; the probe must reject the layers (error was 1–13 %)."""
    layout = next(lay for lay in LAYOUTS if lay.id == "seq-first-embedding-T7")
    model, x, y = case(layout, 7, dtype=torch.float64)
    names = ["emb.weight", "norm.weight", "norm.bias"]
    got = sw.GraNd(model, 7, params=names)._sq_norms(x, y, lambda m, b: m(b)).sqrt()
    torch.testing.assert_close(got, reference_grand(model, x, y, names), rtol=1e-10, atol=1e-12)
    with pytest.raises(UnsupportedLayerError, match=r"emb\.weight.*did not move with"):
        sw.GraNd(model, 7, engine="hooks", params=names)._sq_norms(x, y, lambda m, b: m(b))


class Probed(nn.Module):
    """Counts forward calls, to see the probe run once per input signature."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_probe_runs_once_per_signature_and_not_for_one_example():
    torch.manual_seed(0)
    model = Probed()
    g = sw.GraNd(model, 100, engine="hooks")
    g.update_indexed(torch.arange(6), torch.randn(6, 4), torch.randint(0, 3, (6,)))
    assert model.calls == 3  # the pass, the rolled batch, the first half
    g.update_indexed(torch.arange(6, 12), torch.randn(6, 4), torch.randint(0, 3, (6,)))
    assert model.calls == 4  # cached
    g.update_indexed(torch.arange(12, 17), torch.randn(5, 4), torch.randint(0, 3, (5,)))
    assert model.calls == 7  # a new batch size is a new signature
    g.update_indexed(torch.tensor([17]), torch.randn(1, 4), torch.tensor([0]))
    assert model.calls == 8  # B = 1: no probe


def test_duplicated_batch_is_inconclusive_and_probed_again():
    torch.manual_seed(0)
    model = Probed()
    x = torch.randn(1, 4).expand(4, 4).clone()  # four copies of one example
    y = torch.zeros(4, dtype=torch.long)
    g = sw.GraNd(model, 10)
    g.update_indexed(torch.arange(4), x, y)
    torch.testing.assert_close(g.compute()[:4], reference_grand(model.net, x, y).float())
    calls = model.calls
    x2 = torch.randn(4, 4)
    g.update_indexed(torch.arange(4, 8), x2, y)  # informative: probed again, then cached
    assert model.calls == calls + 3
    g.update_indexed(torch.arange(4, 8), x2, y)
    assert model.calls == calls + 4
    with pytest.raises(UnsupportedLayerError, match="could not tell"):
        sw.GraNd(Probed(), 10, engine="hooks").update_indexed(torch.arange(4), x, y)


class Flip(nn.Module):
    """A fixed reversal of the batch inside forward: invisible to a roll at B = 2."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x.flip(0)).flip(0)


@pytest.mark.parametrize("batch", [2, 3, 7])
def test_fixed_permutation_inside_forward(batch):
    torch.manual_seed(0)
    model = Flip()
    x, y = torch.randn(batch, 4), torch.randint(0, 3, (batch,))
    torch.testing.assert_close(grand(model, x, y, "auto"), reference_grand(model, x, y).float())
    with pytest.raises(UnsupportedLayerError, match=r"lin\.weight"):
        grand(model, x, y, "hooks")


class Odd(nn.Module):
    """Covered layers used in ways the old message called "no per-layer rule"."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.body = nn.Linear(4, 4)
        self.side = nn.Linear(4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        if self.how == "inference":
            with torch.inference_mode():
                self.side(x.detach())
        elif self.how == "keyword":
            return self.head(h) + self.side(input=x)
        elif self.how == "functional":
            self.side(h)  # called, output dropped; the weight used functionally instead
            return self.head(h) + nn.functional.linear(h, self.side.weight)
        return self.head(h)  # "inference" and "unused": side's output never reaches the loss


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("inference", "does not require grad.*inference_mode"),
        ("unused", "not called in the forward"),
        ("keyword", "keyword arguments"),
        ("functional", "output does not reach the loss, though its parameter does"),
    ],
)
def test_hooks_error_says_why(how, reason):
    torch.manual_seed(0)
    model = Odd(how)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    names = r"side\.weight \(Linear\), side\.bias \(Linear\)"
    with pytest.raises(UnsupportedLayerError, match=rf"{names}: .*{reason}"):
        grand(model, x, y, "hooks")
    with warnings.catch_warnings():  # inference mode: the fallback may leave vmap for the loop
        warnings.simplefilter("ignore", UserWarning)
        got = grand(model, x, y, "auto")
    torch.testing.assert_close(got, reference_grand(model, x, y).float())


def test_register_rule_decorator_and_scoped_registration():
    class Double(nn.Linear):
        def forward(self, x):
            return super().forward(2 * x)

    torch.manual_seed(0)
    model = nn.Sequential(Double(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    want = reference_grand(model, x, y).float()
    with registered_rule(Double, lambda m, a, g: rules._linear(m, 2 * a, g)):
        torch.testing.assert_close(grand(model, x, y, "hooks"), want)
    assert rules.find_rule(model[0]) is None  # removed on exit
    with pytest.raises(UnsupportedLayerError, match="no per-layer rule for Double"):
        grand(model, x, y, "hooks")
    linear = rules.find_rule(nn.Linear(1, 1))
    with (
        registered_rule(nn.Linear, lambda m, a, g: None),
        pytest.raises(UnsupportedLayerError, match="does not cover this configuration"),
    ):
        grand(model, x, y, "hooks")
    assert rules.find_rule(nn.Linear(1, 1)) is linear  # restored
    try:

        @register_rule(Double)
        def double_rule(m, a, g):
            return rules._linear(m, 2 * a, g)

        assert rules.find_rule(model[0]) is double_rule
        torch.testing.assert_close(grand(model, x, y, "hooks"), want)
        with pytest.raises(ValueError, match="already registered"):
            register_rule(Double)(double_rule)
    finally:
        rules._RULES.pop(Double, None)
    with pytest.raises(TypeError, match="module_type"):
        register_rule(int, double_rule)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        register_rule(Double, 3)  # type: ignore[arg-type]


def test_a_wrong_shaped_rule_result_is_not_broadcast():
    """A rule giving (1,) instead of (B,) used to be broadcast into every example."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))

    def summed(m, a, g):
        return {k: v.sum().reshape(1) for k, v in rules._linear(m, a, g).items()}

    with registered_rule(nn.Linear, summed):
        with pytest.raises(UnsupportedLayerError, match=r"returned shape \(1,\).*not \(6,\)"):
            grand(model, x, y, "hooks")
        torch.testing.assert_close(grand(model, x, y, "auto"), reference_grand(model, x, y).float())


def test_hooks_sq_norms_directly_rejects_what_the_probe_rejects():
    layout = next(lay for lay in LAYOUTS if lay.id == "sort-by-length")
    model, x, y = case(layout, 7)
    model.eval()

    def loss(out, t):
        return nn.functional.cross_entropy(out, t, reduction="none")

    names = ["mix.weight", "mix.bias"]
    which = r"mix\.weight \(Linear\), mix\.bias \(Linear\)"
    with pytest.raises(UnsupportedLayerError, match=rf"{which}: .*reordering"):
        hooks_sq_norms(model, names, x, y, lambda m, b: m(b), loss, strict=True)
    got = hooks_sq_norms(model, names, x, y, lambda m, b: m(b), loss).sqrt()
    torch.testing.assert_close(got.float(), reference_grand(model, x, y, names).float())


def test_score_dataset_and_update_probe_once_per_signature():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = Probed()
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    ds = sw.WithIndex(TensorDataset(x, y))
    g = sw.GraNd(model, 40)
    sw.score_dataset(model, DataLoader(ds, batch_size=8), g, progress=False)
    assert model.calls == 5 + 2  # five batches, one probe (two passes)
    torch.testing.assert_close(g.compute(), reference_grand(model.net, x, y).float())
    model.calls = 0
    g = sw.GraNd(model, 40)
    for batch in DataLoader(ds, batch_size=16):  # 16, 16, 8: two signatures
        g.update(batch)
    assert model.calls == 3 + 2 * 2
