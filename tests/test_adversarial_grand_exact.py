"""Adversarial checks of GraNd's exact engines (``auto`` and ``loop``; ``vmap`` where it applies).

Each model is checked against a plain backward on each example alone, on a fresh copy of the
model (so "the model as it was" is the reference, whatever the forward changes), and the model
and the batch are checked to be left as they were.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from torch import nn

import sampleweights as sw
from sampleweights.pergrad import PerExampleGradientError, exact_sq_norms, loop_sq_norms
from sampleweights.pergrad import exact as exact_module
from sampleweights.pergrad import vmap as vmap_module

EXACT = ["auto", "loop"]
Y = torch.tensor([0, 1, 0, 1])


def ce(output, y):
    return F.cross_entropy(sw.logits_of(output).float(), y, reduction="none")


def reference(model, example, n, targets, loss=ce, call=None, names=None):
    """Example ``b`` alone on a fresh copy of the model: ``autograd.grad`` of its loss with
    respect to ``names`` (default: every parameter that requires grad)."""
    call = call or (lambda m, x: m(x))
    out = []
    for b in range(n):
        fresh = copy.deepcopy(model)
        if names:
            params = [p.requires_grad_(True) for k, p in fresh.named_parameters() if k in names]
        else:
            params = [p for p in fresh.parameters() if p.requires_grad]
        value = loss(call(fresh, example(b)), targets[b : b + 1]).sum()
        grads = torch.autograd.grad(value, params, allow_unused=True)
        out.append(sum((g.double() ** 2).sum() for g in grads if g is not None))
    return torch.stack(out).sqrt()


def scores(model, batch, y, engine, **kwargs):
    g = sw.GraNd(model, len(y), engine=engine, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "GraNd: ", UserWarning)
        g.update_indexed(torch.arange(len(y)), batch, y)
    return g.compute()


def assert_rel(got, want, tol=1e-4):
    err = ((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-12)).max()
    assert float(err) <= tol, f"relative error {float(err):.2e} > {tol:.0e}"


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_state(model, saved):
    now = model.state_dict(keep_vars=True)
    assert now.keys() == saved.keys()
    for k in saved:
        assert torch.equal(now[k], saved[k]), k


# -- forwards with side effects -------------------------------------------------------------------
class RunningStat(nn.Module):
    """Updates a running mean (in place) and a call counter (reassigned) in every forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        with torch.no_grad():
            self.mean.mul_(0.5).add_(0.5 * x.mean(0))
        self.calls = self.calls + 1
        return self.lin(x - self.mean)


@pytest.mark.parametrize("engine", EXACT)
def test_buffers_updated_in_the_forward_are_put_back_and_each_example_sees_them_as_they_were(
    engine,
):
    torch.manual_seed(0)
    model = RunningStat()
    model.mean.fill_(0.3)
    x = torch.randn(4, 3)
    want = reference(model, lambda b: x[b : b + 1], 4, Y)
    saved, calls = state_of(model), model.calls
    assert_rel(scores(model, x, Y, engine), want)
    assert_state(model, saved)
    assert model.calls is calls  # the reassigned buffer: the very tensor put back


def test_loop_puts_buffers_back_when_called_directly():
    torch.manual_seed(0)
    model = RunningStat()
    x = torch.randn(4, 3)
    saved = state_of(model)
    sq = loop_sq_norms(model, ["lin.weight", "lin.bias"], x, Y, lambda m, b: m(b), ce)
    assert_rel(sq.sqrt(), reference(model, lambda b: x[b : b + 1], 4, Y))
    assert_state(model, saved)


class ChangesItsInput(nn.Module):
    """``x.mul_(2)`` in the forward; a GRU (not under vmap): ``auto`` falls back to the loop."""

    def __init__(self, rnn=True):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.rnn = nn.GRU(3, 2, batch_first=True) if rnn else None

    def forward(self, x):
        x.mul_(2)
        out = self.lin(x)
        return out if self.rnn is None else out + self.rnn(x.unsqueeze(1))[0][:, -1]


@pytest.mark.parametrize("engine", [*EXACT, "vmap"])
def test_a_forward_that_changes_its_input_in_place_is_scored_on_the_batch_as_given(engine):
    torch.manual_seed(0)
    model = ChangesItsInput(rnn=engine != "vmap")
    x = torch.randn(4, 3)
    want = reference(model, lambda b: x[b : b + 1].clone(), 4, Y, names=["lin.weight"])
    for _ in range(2):  # the second batch uses the remembered decision
        batch = x.clone()
        assert_rel(scores(model, batch, Y, engine, params=["lin.weight"]), want)
        if engine != "auto":  # each example a copy: the batch itself is not changed
            assert torch.equal(batch, x)


def test_hooks_engine_refuses_a_forward_that_changes_its_input():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))

    def forward(m, x):
        x.mul_(2)
        return m(x)

    with pytest.raises(PerExampleGradientError, match=r"changes its\s+input in place"):
        scores(model, torch.randn(4, 3), Y, "hooks", forward=forward)


# -- autograd switched off around the call --------------------------------------------------------
@pytest.mark.parametrize("engine", ["auto", "loop", "vmap", "hooks"])
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode_around_the_call(engine, context):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(4, 3)
    want = reference(model, lambda b: x[b : b + 1], 4, Y)
    with context():
        xi, yi = x.clone(), Y.clone()  # inference tensors under inference_mode
        got = scores(model, xi, yi, engine)
    assert_rel(got, want)


# -- memory: no verdict on the model --------------------------------------------------------------
def test_vmap_out_of_memory_is_not_remembered_as_a_model_vmap_cannot_transform(monkeypatch):
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(exact_module, "vmap_sq_norms", oom)
    with pytest.warns(UserWarning, match="chunk_size"):
        sq = exact_sq_norms(model, ["weight", "bias"], x, Y, lambda m, b: m(b), ce, 2)
    assert_rel(sq.sqrt(), reference(model, lambda b: x[b : b + 1], 4, Y))
    assert model not in exact_module._VMAP_FAILED


def test_vmap_engine_raises_out_of_memory_as_it_is(monkeypatch):
    def vmap(*args, **kwargs):
        def run(*a, **k):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

        return run

    monkeypatch.setattr(vmap_module, "vmap", vmap)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        scores(nn.Linear(3, 2), torch.randn(4, 3), Y, "vmap")


# -- a forward that drops the batch dimension of a batch of one -----------------------------------
class Squeezes(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x).squeeze()


@pytest.mark.parametrize("loss", [None, lambda out, y: F.cross_entropy(out, y, reduction="none")])
def test_a_forward_that_squeezes_a_batch_of_one_gets_an_error_that_says_so(loss):
    with pytest.raises(ValueError, match="batch of one"):
        scores(Squeezes(), torch.randn(4, 3), Y, "loop", loss_fn=loss)


# -- batches and outputs of unusual shapes --------------------------------------------------------
class KeywordsOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, *, x, names, lengths, flag, scale):
        assert all(isinstance(n, str) for n in names) and len(names) == len(lengths) == len(x)
        extra = torch.tensor([len(n) + k for n, k in zip(names, lengths, strict=True)])
        return self.lin(x) * scale * (2.0 if flag else 1.0) + 0.1 * extra.float()[:, None]


@pytest.mark.parametrize("engine", EXACT)
def test_keyword_only_model_with_strings_int_lists_and_shared_values(engine):
    torch.manual_seed(0)
    model = KeywordsOnly()
    x = torch.randn(4, 3)
    batch = {"x": x, "names": ["a", "bb", "c", "dd"], "lengths": [1, 2, 3, 4], "flag": True}
    batch["scale"] = torch.tensor(1.5)

    def example(b):
        return {**batch, "x": x[b : b + 1], "names": batch["names"][b : b + 1],
                "lengths": batch["lengths"][b : b + 1]}  # fmt: skip

    want = reference(model, example, 4, Y, call=lambda m, kw: m(**kw))
    assert_rel(scores(model, batch, Y, engine), want)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, scale):
        return self.lin(x) * scale, self.lin.weight.sum()  # a tuple output


@pytest.mark.parametrize("engine", [*EXACT, "vmap"])
def test_batch_of_one_with_a_shared_leaf_of_shape_1_and_a_tuple_output(engine):
    torch.manual_seed(0)
    model, x, scale, y = Scaled(), torch.randn(1, 3), torch.tensor([2.0]), torch.tensor([1])

    def loss(out, t):
        return F.cross_entropy(out[0], t, reduction="none").half()  # (B,) in float16

    want = reference(model, lambda b: (x, scale), 1, y, loss=loss, call=lambda m, a: m(*a))
    assert_rel(scores(model, (x, scale), y, engine, loss_fn=loss), want)


@pytest.mark.parametrize("engine", EXACT)
def test_frozen_parameters_scored_with_params_and_grad_already_populated(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.GRU(4, 2, batch_first=True))
    model[0].weight.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    grads = [p.grad for p in model.parameters()]
    x = torch.randn(4, 5, 3)

    def loss(out, y):
        return ce(out[0][:, -1], y)

    got = scores(model, x, Y, engine, params=["0.weight"], loss_fn=loss)
    assert not model[0].weight.requires_grad
    for p, g in zip(model.parameters(), grads, strict=True):
        assert p.grad is g and bool((g == 7).all())
    want = reference(model, lambda b: x[b : b + 1], 4, Y, loss=loss, names=["0.weight"])
    assert_rel(got, want)


class NonReentrant(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        hidden = checkpoint.checkpoint(lambda h: torch.tanh(self.a(h)), x, use_reentrant=False)
        return self.b(hidden)


@pytest.mark.parametrize("engine", EXACT)
def test_non_reentrant_checkpointing(engine):
    torch.manual_seed(0)
    model, x = NonReentrant(), torch.randn(4, 3)
    assert_rel(scores(model, x, Y, engine), reference(model, lambda b: x[b : b + 1], 4, Y))


class Coupled(nn.Module):
    """``x - x.mean(0)``: the examples of a batch interact (no per-example gradient exists)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x - 0.5 * x.mean(0, keepdim=True))


@pytest.mark.parametrize("engine", EXACT)
def test_a_batch_coupled_forward_is_scored_on_each_example_alone(engine):
    torch.manual_seed(0)
    model, x = Coupled(), torch.randn(4, 3)
    assert_rel(scores(model, x, Y, engine), reference(model, lambda b: x[b : b + 1], 4, Y))


def test_eval_mode_scoring_leaves_the_random_state_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.GRU(4, 2, batch_first=True))
    x = torch.randn(4, 5, 3)
    state = torch.get_rng_state()
    for engine in EXACT:
        scores(model, x, Y, engine, loss_fn=lambda out, y: ce(out[0][:, -1], y))
    assert torch.equal(torch.get_rng_state(), state)


# -- the vmap-failure cache -----------------------------------------------------------------------
class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_many_models_through_set_model_never_reuse_a_dead_models_decision():
    g = sw.GraNd(Recurrent(), num_examples=4)
    x = torch.randn(4, 2, 3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "GraNd: ", UserWarning)
        for seed in range(6):  # a dead model's id is often reused by the next one
            torch.manual_seed(seed)
            model = Recurrent()
            g.set_model(model)
            want = reference(model, lambda b: x[b : b + 1], 4, Y)
            before = g._state["sum"][:4].clone()
            g.update_indexed(torch.arange(4), x, Y)
            assert_rel((g._state["sum"][:4] - before).float(), want)
            del model
    gc.collect()
    assert len(exact_module._VMAP_FAILED) <= 2  # dead models' entries are gone
