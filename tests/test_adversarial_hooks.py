"""Adversarial models for GraNd's hook engine: each would make a per-layer rule's value wrong
while every shape looks right. ``engine="auto"`` must equal the one-example-at-a-time reference;
``engine="hooks"`` must be exact or raise :class:`UnsupportedLayerError`.

Two kinds: a change the engine does not see in the layer's (input, output gradient) — a tensor
hook that rescales the gradient after the engine reads it — and a change of the model after the
probe cached its verdicts for a signature (a flag, a hook on a parent block, a swapped
submodule, a ``forward`` default argument).
"""

from __future__ import annotations

import enum

import pytest
import torch
from torch import nn

import sampleweights as sw
from grand_settings import reference_grand
from sampleweights.pergrad import UnsupportedLayerError


def grand(model, x, y, engine="auto", **kwargs):
    g = sw.GraNd(model, len(y), engine=engine, **kwargs)
    g.update_indexed(torch.arange(len(y)), x, y)
    return g.compute()


def data(batch=6, features=4, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, features, generator=gen), torch.randint(0, classes, (batch,))


def assert_reference(got, model, x, y, names=None):
    torch.testing.assert_close(
        got, reference_grand(model, x, y, names).float(), rtol=1e-4, atol=1e-7
    )


# --- tensor hooks that change the gradient after the engine reads it ------------------------


class ScaledInForward(nn.Module):
    """``out.register_hook`` on a Linear's output inside forward (gradient scaling/reversal)."""

    def __init__(self, inplace_after=False):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 5), nn.Linear(5, 3)
        self.inplace_after = inplace_after

    def forward(self, x):
        h = self.lin(x)
        if h.requires_grad:
            h.register_hook(lambda g: 3 * g)
        if self.inplace_after:  # the hook stays on the value before the in-place op
            h.tanh_()
            return self.head(h)
        return self.head(torch.tanh(h))


def _scaled_by_forward_hook():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def hook(module, args, out):
        if out.requires_grad:
            out.register_hook(lambda g: -2 * g)  # a gradient-reversal layer

    model[0].register_forward_hook(hook)
    return model


@pytest.mark.parametrize(
    "build",
    [ScaledInForward, lambda: ScaledInForward(inplace_after=True), _scaled_by_forward_hook],
    ids=["in-forward", "before-an-in-place-op", "by-a-forward-hook"],
)
def test_a_tensor_hook_on_a_layer_output_is_not_bypassed(build):
    torch.manual_seed(0)
    model = build()
    x, y = data()
    assert_reference(grand(model, x, y), model, x, y)
    with pytest.raises(UnsupportedLayerError, match="tensor hook on its output"):
        grand(model, x, y, "hooks")


def test_a_hook_on_the_parameter_is_not_bypassed_by_the_hooks_engine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].weight.register_hook(lambda g: 2 * g)
    x, y = data()
    with pytest.raises(UnsupportedLayerError, match=r"0\.weight \(Linear\): a hook on the param"):
        grand(model, x, y, "hooks")
    assert_reference(grand(model, x, y, "loop"), model, x, y)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_backward_hooks_of_modules_are_seen_by_the_rules():
    """A full backward (pre-)hook acts on the gradient outside the layer's output tensor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].register_full_backward_pre_hook(lambda m, go: (3 * go[0],))
    model[2].register_full_backward_hook(lambda m, gi, go: (2 * gi[0],))
    x, y = data()
    assert_reference(grand(model, x, y, "hooks"), model, x, y)


# --- the model changes after its signature was probed ---------------------------------------


class Order(enum.Enum):
    KEEP = 0
    REVERSE = 1


class Flagged(nn.Module):
    """Reverses the batch around its Linear when a flag says so (examples stay independent)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.reverse = False
        self.order = Order.KEEP
        self.calls = 0  # a counter: not part of the signature

    def forward(self, x, reverse=False):
        self.calls += 1
        if reverse or self.reverse or self.order is Order.REVERSE:
            return self.lin(x.flip(0)).flip(0)
        return self.lin(x)


class Flip(nn.Module):
    def forward(self, x):
        return x.flip(0)


def _set_flag(model, g):
    model.reverse = True


def _set_enum(model, g):
    model.order = Order.REVERSE


def _swap_submodules(model, g):
    model.pre, model.post = Flip(), Flip()


def _hooks_on_a_parent(model, g):
    model.block.register_forward_pre_hook(lambda m, args: (args[0].flip(0),))
    model.block.register_forward_hook(lambda m, args, out: out.flip(0))


def _patched_forward(model, g):
    model.block.forward = lambda x, reverse=False: model.block.lin(x.flip(0)).flip(0)


def _forward_with(rev):
    return lambda m, b, rev=rev: m(b, reverse=rev)  # one code object, the flag a default


def _forward_default(model, g):
    g.forward = _forward_with(True)


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre, self.post = nn.Identity(), nn.Identity()
        self.block = Flagged()

    def forward(self, x, reverse=False):
        return self.post(self.block(self.pre(x), reverse=reverse))


@pytest.mark.parametrize(
    "change",
    [
        _set_flag,
        _set_enum,
        _swap_submodules,
        _hooks_on_a_parent,
        _patched_forward,
        _forward_default,
    ],
)
def test_a_change_after_the_probe_is_a_new_signature(change):
    torch.manual_seed(0)
    model = Wrapped()
    flagged = change in (_set_flag, _set_enum)
    target = model.block if flagged else model
    g = sw.GraNd(model, 12, forward=_forward_with(False))
    x, y = data(seed=1)
    g.update_indexed(torch.arange(6), x, y)  # probed: every layer in order
    change(target, g)
    x, y = data(seed=2)
    g.update_indexed(torch.arange(6, 12), x, y)
    # one example at a time, a reversal of the batch is the identity: the plain reference
    want = reference_grand(model, x, y).float()
    torch.testing.assert_close(g.compute()[6:], want, rtol=1e-4, atol=1e-7)


def test_a_counter_does_not_make_every_call_a_new_signature():
    torch.manual_seed(0)
    model = Flagged()
    g = sw.GraNd(model, 100)
    for i in range(3):
        x, y = data(seed=i)
        g.update_indexed(torch.arange(6 * i, 6 * i + 6), x, y)
    assert model.calls == 3 + 2  # three batches, one probe


# --- layouts the checks get right (regressions) ---------------------------------------------


class CatFlipped(nn.Module):
    """The layer runs on the batch concatenated with its reversal (2B rows), then split."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 5), nn.Linear(10, 3)

    def forward(self, x):
        b = x.shape[0]
        h = self.lin(torch.cat([x, x.flip(0)]))
        return self.head(torch.cat([h[:b], h[b:].flip(0)], 1))


class Scrambled(nn.Module):
    """(B, T, D) → (T, B, D) → reshaped to (B, T, D): rows mix examples, shapes look right."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        b, t, d = x.shape
        h = self.lin(x.transpose(0, 1).reshape(b, t, d)).reshape(t, b, d).transpose(0, 1)
        return self.head(torch.tanh(h).mean(1))


class ExpandedToken(nn.Module):
    """A Linear on a learned token expanded over the batch (stride 0), and position ids
    expanded to (B, T) into an Embedding with padding_idx."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 4))
        self.q = nn.Linear(4, 4)
        self.pos = nn.Embedding(3, 4, padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # (B, 3, 4)
        b = x.shape[0]
        c = self.q(self.cls.expand(b, 4)).unsqueeze(1)
        p = self.pos(torch.arange(3).expand(b, 3))
        return self.head(torch.tanh(c * x + p).mean(1))


def _spectral():
    return nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3))


def _parametrized():
    class Soft(nn.Module):
        def forward(self, w):
            return w + 0.1 * w.tanh()

    first = nn.Linear(4, 5)
    nn.utils.parametrize.register_parametrization(first, "weight", Soft())
    return nn.Sequential(first, nn.Tanh(), nn.Linear(5, 3))


def _plain_layer_norm():
    return nn.Sequential(
        nn.Linear(4, 5), nn.LayerNorm(5, elementwise_affine=False), nn.Linear(5, 3)
    )


def _grouped_dilated_conv():
    return nn.Sequential(
        nn.Conv1d(4, 6, 3, dilation=2, groups=2, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(24, 3),
    )


SAFE = [
    ("cat-with-reversal", CatFlipped, (4,)),
    ("scrambled-rows", Scrambled, (3, 4)),
    ("expanded-token-and-positions", ExpandedToken, (3, 4)),
    ("spectral-norm", _spectral, (4,)),
    ("parametrize", _parametrized, (4,)),
    ("layer-norm-without-affine", _plain_layer_norm, (4,)),
    ("conv-groups-dilation-stride", _grouped_dilated_conv, (4, 11)),
]


@pytest.mark.parametrize(("build", "shape"), [s[1:] for s in SAFE], ids=[s[0] for s in SAFE])
def test_auto_is_exact_on_layouts_the_checks_handle(build, shape):
    torch.manual_seed(0)
    model = build()
    for seed in range(2):  # the second batch uses the cached verdicts
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.randn(6, *shape, generator=gen), torch.randint(0, 3, (6,), generator=gen)
        assert_reference(grand(model, x, y), model, x, y)


def test_bias_only_scoring():
    torch.manual_seed(0)
    model = _plain_layer_norm()
    x, y = data()
    for engine in ("auto", "hooks"):
        assert_reference(grand(model, x, y, engine, params=["0.bias"]), model, x, y, ["0.bias"])
