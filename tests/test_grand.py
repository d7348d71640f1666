from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sampleweights as sw
from conftest import assert_same_state, snapshot
from grand_settings import SETTINGS, reference_grand
from sampleweights.pergrad import BatchCoupledError, UnsupportedLayerError

ENGINES = ["vmap", "hooks", "auto", "loop"]


def case(setting, batch, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = setting.build().to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = setting.inputs(batch, gen)
    if x.is_floating_point():
        x = x.to(dtype)
    y = torch.randint(0, setting.classes, (batch,), generator=gen)
    return model, x, y


def grand(model, x, y, engine, **kwargs):
    g = sw.GraNd(model, len(y), engine=engine, **kwargs)
    g.update_indexed(torch.arange(len(y)), x, y)
    return g.compute()


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.id)
def test_engines_equal_one_example_at_a_time(setting, engine, batch):
    model, x, y = case(setting, batch)
    want = reference_grand(model, x, y).float()
    if engine == "hooks" and not setting.hooks_cover_all:
        with pytest.raises(UnsupportedLayerError, match="no per-layer rule"):
            grand(model, x, y, engine)
        return
    got = grand(model, x, y, engine)
    torch.testing.assert_close(got, want, rtol=3e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ["hooks", "auto"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.id)
def test_formulas_exact_in_float64(setting, engine):
    if engine == "hooks" and not setting.hooks_cover_all:
        pytest.skip(
            "engine='hooks' refuses this model (some parameters have no per-layer rule); the "
            "refusal is tested in test_engines_equal_one_example_at_a_time"
        )
    model, x, y = case(setting, 7, dtype=torch.float64)
    torch.testing.assert_close(
        grand(model, x, y, engine).double(), reference_grand(model, x, y), rtol=1e-6, atol=1e-12
    )  # fp32 output; formulas checked in fp64
    # the squared norms before the final fp32 cast agree to 1e-12
    g = sw.GraNd(model, 7, engine=engine)
    sq = g._sq_norms(x, y, lambda m, b: m(b))
    assert sq.dtype == torch.float64
    torch.testing.assert_close(sq.sqrt(), reference_grand(model, x, y), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "setting",
    [s for s in SETTINGS if s.id in ("mlp", "cnn-groupnorm", "embedding-layernorm-seq")],
    ids=lambda s: s.id,
)
def test_low_precision_models_agree_with_fp32_to_stated_tolerance(setting, engine, dtype):
    """bf16/fp16 weights and activations, loss and norm math in fp32: within 5% of the fp32
    score of the same (rounded) weights — the low-precision backward itself is that noisy."""
    model, x, y = case(setting, 16)
    model = model.to(dtype)
    x16 = x.to(dtype) if x.is_floating_point() else x
    got = grand(model, x16, y, engine)
    assert got.dtype == torch.float32
    want = reference_grand(model.float(), x16.float() if x.is_floating_point() else x, y).float()
    torch.testing.assert_close(got, want, rtol=5e-2, atol=1e-3)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 6),
    cin=st.integers(1, 4),
    cout=st.integers(1, 5),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    seq=st.integers(1, 6),
    bias=st.booleans(),
    conv=st.booleans(),
)
def test_property_layer_shapes(batch, cin, cout, kernel, stride, seq, bias, conv):
    torch.manual_seed(0)
    length = seq + kernel
    if conv:
        model = nn.Sequential(
            nn.Conv1d(cin, cout, kernel, stride=stride, bias=bias), nn.Flatten(), nn.LazyLinear(3)
        )
        x = torch.randn(batch, cin, length, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Linear(cin, cout, bias=bias), nn.Flatten(), nn.LazyLinear(3))
        x = torch.randn(batch, seq, cin, dtype=torch.float64)
    model(x.float())  # materialise the lazy layer
    model = model.double()
    y = torch.randint(0, 3, (batch,))
    got = sw.GraNd(model, batch, engine="hooks")._sq_norms(x, y, lambda m, b: m(b)).sqrt()
    torch.testing.assert_close(got, reference_grand(model, x, y), rtol=1e-10, atol=1e-12)


def test_params_subset_is_the_last_layer_score():
    model, x, y = case(SETTINGS[0], 9)
    names = ["4.weight", "4.bias"]
    for engine in ENGINES:
        got = grand(model, x, y, engine, params=names)
        torch.testing.assert_close(
            got, reference_grand(model, x, y, names).float(), rtol=1e-4, atol=1e-7
        )
    by_object = grand(model, x, y, "auto", params=[model[4].weight, model[4].bias])
    torch.testing.assert_close(by_object, got)
    assert not torch.allclose(got, grand(model, x, y, "auto"))  # the exact score differs


def test_model_is_left_exactly_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 3))
    model[2].weight.requires_grad_(False)  # frozen layer stays frozen
    model(torch.randn(2, 4)).sum().backward()
    grads = {
        n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()
    }
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    hooks = [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()]
    g = sw.GraNd(model, 10, params=["0.weight", "2.weight"])
    g.update_indexed(torch.arange(5), torch.randn(5, 4), torch.randint(0, 3, (5,)))
    assert [m.training for m in model.modules()] == modes
    assert [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()] == hooks
    assert not model[2].weight.requires_grad
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n])
        assert (p.grad is None and grads[n] is None) or torch.equal(p.grad, grads[n])


def test_dropout_cannot_make_engines_disagree_in_default_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    torch.testing.assert_close(grand(model, x, y, "hooks"), grand(model, x, y, "vmap"))
    assert model.training


def test_batchnorm_in_train_mode_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    g = sw.GraNd(model, 4, mode="train")
    before = snapshot(g)
    with pytest.raises(BatchCoupledError, match=r"eval mode.*GroupNorm"):
        g.update_indexed(torch.arange(4), torch.randn(4, 4), torch.zeros(4, dtype=torch.long))
    assert_same_state(before, snapshot(g))
    g = sw.GraNd(model, 4)  # eval mode (default) works
    g.update_indexed(torch.arange(4), torch.randn(4, 4), torch.zeros(4, dtype=torch.long))


def test_score_dataset_and_update_batch_match_update_indexed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(13, 5), torch.randint(0, 3, (13,))
    ds = sw.WithIndex(TensorDataset(x, y))
    a, b, e = sw.GraNd(model, 13), sw.GraNd(model, 13), sw.EL2N(13)
    sw.score_dataset(model, DataLoader(ds, batch_size=4, shuffle=True), a, e, progress=False)
    for batch in DataLoader(ds, batch_size=5):
        b.update(batch)
    want = reference_grand(model, x, y).float()
    torch.testing.assert_close(a.compute(), want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(b.compute(), want, rtol=1e-4, atol=1e-7)
    assert e.num_updates == a.num_updates == 4
    assert b.num_updates == 3


def test_running_mean_over_several_models_like_data_diet_seeds():
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    scores = []
    g_all = sw.GraNd(nn.Linear(4, 2), 6)
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Linear(4, 2)
        g = sw.GraNd(model, 6)
        g.load_state_dict(g_all.state_dict())
        g.update_indexed(torch.arange(6), x, y)
        g_all = g
        scores.append(reference_grand(model, x, y))
    torch.testing.assert_close(g_all.compute(), torch.stack(scores).mean(0).float())


def test_bad_input_changes_nothing():
    model = nn.Linear(3, 2)
    g = sw.GraNd(model, 5)
    g.update_indexed(torch.tensor([0]), torch.randn(1, 3), torch.tensor([1]))
    before = snapshot(g)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        g.update_indexed(torch.tensor([5]), torch.randn(1, 3), torch.tensor([1]))
    with pytest.raises(ValueError, match="2 indices and 1 targets"):
        g.update_indexed(torch.tensor([0, 1]), torch.randn(2, 3), torch.tensor([1]))
    with pytest.raises(IndexError, match="out of bounds"):
        g.update_indexed(torch.tensor([0]), torch.randn(1, 3), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"[Nn]on-finite"):
        g.update_indexed(torch.tensor([0]), torch.full((1, 3), float("nan")), torch.tensor([1]))
    with pytest.raises(TypeError, match="takes no logits"):
        g.update((torch.randn(1, 3), torch.tensor([1]), torch.tensor([0])), torch.randn(1, 2))
    with pytest.raises(ValueError, match="shape \\(B,\\)"):
        sw.GraNd(model, 5, loss_fn=lambda o, t: o.sum()).update_indexed(
            torch.tensor([0]), torch.randn(1, 3), torch.tensor([1])
        )
    assert_same_state(before, snapshot(g))


def test_constructor_errors():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="engine"):
        sw.GraNd(model, 5, engine="fast")
    with pytest.raises(ValueError, match="not a parameter"):
        sw.GraNd(model, 5, params=["nope"])
    with pytest.raises(ValueError, match="mode"):
        sw.GraNd(model, 5, mode="inference")
    with pytest.raises(ValueError, match="another model"):
        sw.score_dataset(nn.Linear(3, 2), [], sw.GraNd(model, 5))


def test_nonfinite_skip_counts_rows():
    model = nn.Linear(3, 2)
    g = sw.GraNd(model, 4, nonfinite="skip")
    x = torch.randn(3, 3)
    x[1] = float("inf")
    g.update_indexed(torch.tensor([0, 1, 2]), x, torch.tensor([0, 1, 0]))
    assert g.num_skipped == 1
    with pytest.warns(RuntimeWarning, match="1 presentation"):
        scores = g.compute()
    assert scores[[0, 2]].isfinite().all() and scores[[1, 3]].isnan().all()


def test_hf_style_dict_batches_with_custom_loss():
    class HF(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, features):
            return {"logits": self.lin(features)}

    model = HF()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    batch = {"features": x, "labels": y, "index": torch.arange(6)}
    for engine in ENGINES:
        g = sw.GraNd(model, 6, engine=engine)
        g.update(batch)
        torch.testing.assert_close(g.compute(), reference_grand(model.lin, x, y).float())


class ScaledLinear(nn.Linear):
    """A subclass that changes forward: the Linear rule must not be applied to it silently."""

    def forward(self, x):
        return super().forward(2 * x)


def test_subclasses_are_not_matched_and_rules_are_not_overwritten(monkeypatch):
    from sampleweights.pergrad import register_rule, rules

    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    want = reference_grand(model, x, y).float()
    torch.testing.assert_close(grand(model, x, y, "auto"), want)  # via the vmap fallback
    with pytest.raises(UnsupportedLayerError, match=r"0\.weight \(ScaledLinear\)"):
        grand(model, x, y, "hooks")
    with pytest.raises(ValueError, match="already registered"):
        register_rule(nn.Linear, rules._linear)
    monkeypatch.setitem(rules._RULES, ScaledLinear, lambda m, a, g: rules._linear(m, 2 * a, g))
    torch.testing.assert_close(grand(model, x, y, "hooks"), want)  # a user's own rule


class InputChangedInPlace(nn.Module):
    """A layer's input modified in place after the layer read it. Ordinary training fails on it
    (autograd's version check); the hook engine, which computes no weight gradient, would not
    notice and would apply the formula to the wrong activations."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = x * 2
        out = self.b(self.a(h))
        h.mul_(0.5)  # after self.a consumed h
        return out + h.sum(dim=1, keepdim=True)


def test_an_input_changed_in_place_is_never_scored_silently_wrong():
    torch.manual_seed(0)
    model = InputChangedInPlace()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        reference_grand(model, x, y)  # what ordinary autograd says
    with pytest.raises(UnsupportedLayerError, match=r"a\.weight"):
        grand(model, x, y, "hooks")
    with pytest.raises(RuntimeError, match="inplace"):
        grand(model, x, y, "auto")  # the fallback meets autograd's own check


@settings(max_examples=200, deadline=None)
@given(
    shape=st.tuples(*(st.integers(1, 4),) * 2, st.integers(1, 9), st.integers(1, 9)),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
)
def test_batched_patches_are_unfold_bit_for_bit(shape, kernel, dilation, padding, stride):
    """The conv rule's patches off the CPU (one strided copy of the batch) against
    ``F.unfold`` (one im2col kernel per example on CUDA): the same values, the same layout."""
    from sampleweights.pergrad.rules import _strided_patches

    h, w = shape[2] + 2 * padding[0], shape[3] + 2 * padding[1]
    if dilation[0] * (kernel[0] - 1) + 1 > h or dilation[1] * (kernel[1] - 1) + 1 > w:
        return  # the kernel does not fit: F.unfold refuses it too
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    want = nn.functional.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)
    got = _strided_patches(a, kernel, dilation, padding, stride)
    assert got.shape == want.shape and torch.equal(got, want)
