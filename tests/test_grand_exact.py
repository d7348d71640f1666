"""GraNd's exact engines on what ``torch.func`` cannot transform, GraNd's modes, empty batches and
targets for a custom loss.

Every model here is checked against a plain one-example-at-a-time backward loop:
``reference_grand`` from the shared settings, or :func:`reference_backward` below where that one
cannot run (reentrant checkpointing refuses ``autograd.grad``; custom losses and dict batches).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sampleweights as sw
from conftest import assert_same_state, snapshot
from grand_settings import SETTINGS, reference_grand
from sampleweights.pergrad import (
    BatchCoupledError,
    PerExampleGradientError,
    exact_sq_norms,
    loop_sq_norms,
    vmap_sq_norms,
)

EXACT = ["auto", "loop"]
ALL_ENGINES = ["auto", "hooks", "vmap", "loop"]


def ce(output, y):
    return F.cross_entropy(sw.logits_of(output).float(), y, reduction="none")


def reference_backward(model, batch_of, n, targets, loss=ce, call=None):
    """Obviously correct, for any model: example ``b`` alone (``batch_of(b)``), ``.backward()``
    of its loss into cleared ``.grad`` slots (reentrant checkpointing needs ``.backward()``)."""
    call = call or (lambda m, x: m(x))
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for b in range(n):
        for p in params:
            p.grad = None
        loss(call(model, batch_of(b)), targets[b : b + 1]).sum().backward()
        out.append(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
    for p in params:
        p.grad = None
    return torch.stack(out).sqrt()


def scores(model, x, y, engine, **kwargs):
    g = sw.GraNd(model, len(y), engine=engine, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "GraNd: ", UserWarning)
        g.update_indexed(torch.arange(len(y)), x, y)
    return g.compute()


def assert_rel(got, want, tol=1e-4):
    err = ((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-12)).max()
    assert float(err) <= tol, f"relative error {float(err):.2e} > {tol:.0e}"


# -- models torch.func cannot transform -----------------------------------------------------------
class Recurrent(nn.Module):
    """A GRU/LSTM over (B, T, 4), batch-first or sequence-first inside, then a Linear head."""

    def __init__(self, cell=nn.GRU, batch_first=True, **kwargs):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cell(4, 5, batch_first=batch_first, **kwargs)
        width = 10 if kwargs.get("bidirectional") else 5
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out[:, -1])


class Gain(nn.Module):
    """A parameter no per-layer rule covers (so ``auto`` sends it to the exact fallback)."""

    def __init__(self, width):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x * self.gain


def with_backward_hook():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), Gain(6), nn.Linear(6, 3))
    model.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    model[2].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    return model


class ReentrantCheckpoint(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.gain = Gain(6)

    def block(self, h):
        return torch.tanh(self.gain(self.b(h)))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = checkpoint.checkpoint(self.block, h, use_reentrant=True)
        return self.c(h)


def embedding_max_norm():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(12, 3))
    with torch.no_grad():  # rows of norm 1.5–3: every row is renormalised when used
        w = model[0].weight
        w.mul_(torch.linspace(1.5, 3.0, 10).unsqueeze(1) / w.norm(dim=1, keepdim=True))
    return model


def brier(output, y):
    """A loss with ``F.one_hot`` (data-dependent under vmap)."""
    p = output.float().softmax(dim=-1)
    return (p - F.one_hot(y, p.shape[-1]).float()).pow(2).sum(dim=-1)


def normal(*shape):
    return lambda b: torch.randn(b, *shape)


# (id, build, inputs(batch), dtype): 3 classes, cross-entropy; compared with reference_grand
PLAIN = [
    ("gru-batch-first", lambda: Recurrent(), normal(3, 4), torch.float32),
    ("gru-seq-first", lambda: Recurrent(batch_first=False), normal(3, 4), torch.float32),
    (
        "gru-2-layer-bidirectional",
        lambda: Recurrent(num_layers=2, bidirectional=True),
        normal(3, 4),
        torch.float32,
    ),
    ("lstm-fp64", lambda: Recurrent(nn.LSTM), normal(3, 4), torch.float64),
    ("lstm-bf16", lambda: Recurrent(nn.LSTM), normal(3, 4), torch.bfloat16),
    ("full-backward-hooks", with_backward_hook, normal(4), torch.float32),
]


def plain_case(build, inputs, dtype, batch):
    torch.manual_seed(0)
    model = build().to(dtype)
    x = inputs(batch).to(dtype)
    y = torch.randint(0, 3, (batch,))
    return model, x, y


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("engine", EXACT)
@pytest.mark.parametrize(
    ("build", "inputs", "dtype"), [c[1:] for c in PLAIN], ids=[c[0] for c in PLAIN]
)
def test_exact_engines_on_models_vmap_cannot_transform(build, inputs, dtype, engine, batch):
    model, x, y = plain_case(build, inputs, dtype, batch)
    want = reference_grand(model, x, y)
    got = scores(model, x, y, engine)
    # bf16 under auto: the hook formula's fp32 ‖a‖²‖g‖² vs the reference's bf16-rounded weight
    # gradient of the head (the LSTM itself goes through the loop, as the reference)
    tol = 5e-3 if dtype == torch.bfloat16 and engine == "auto" else 1e-4
    assert_rel(got, want, tol)


@pytest.mark.parametrize(
    ("build", "inputs", "dtype"), [c[1:] for c in PLAIN], ids=[c[0] for c in PLAIN]
)
def test_vmap_engine_fails_with_a_clear_error_on_them(build, inputs, dtype):
    model, x, y = plain_case(build, inputs, dtype, 3)
    with pytest.raises(
        PerExampleGradientError, match=r"GraNd's vmap engine.*engine='loop'"
    ) as info:
        scores(model, x, y, "vmap")
    assert info.value.__cause__ is not None  # the torch.func error, chained
    first, _ = next(iter(model.named_parameters()))
    owner = dict(model.named_modules())[first.rsplit(".", 1)[0]]
    assert f"{first} ({type(owner).__name__})" in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuDNN RNNs)")
@pytest.mark.parametrize("engine", EXACT)
def test_eval_mode_recurrent_layers_on_cuda(engine):
    """cuDNN's RNN backward refuses eval mode: the loop turns cuDNN off for the call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 4), Recurrent()).cuda()  # Embedding: hooked before it
    x = torch.randint(0, 20, (7, 3), device="cuda")
    y = torch.randint(0, 3, (7,), device="cuda")
    with torch.backends.cudnn.flags(enabled=False):
        want = reference_grand(model, x, y)
    assert_rel(scores(model, x, y, engine).cpu(), want.cpu())
    assert torch.backends.cudnn.enabled


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("engine", EXACT)
def test_reentrant_checkpointing(engine, batch):
    torch.manual_seed(0)
    model = ReentrantCheckpoint()
    x, y = torch.randn(batch, 4), torch.randint(0, 3, (batch,))
    with pytest.raises(RuntimeError, match="use_reentrant"):
        reference_grand(model, x, y)  # autograd.grad itself refuses it
    want = reference_backward(model, lambda b: x[b : b + 1], batch, y)
    grads_before = [p.grad for p in model.parameters()]
    assert_rel(scores(model, x, y, engine), want)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads_before, strict=True))


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("engine", EXACT)
def test_one_hot_in_the_loss(engine, batch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(batch, 4), torch.randint(0, 3, (batch,))
    want = reference_backward(model, lambda b: x[b : b + 1], batch, y, loss=brier)
    assert_rel(scores(model, x, y, engine, loss_fn=brier), want)
    with pytest.raises(PerExampleGradientError, match="vmap"):
        scores(model, x, y, "vmap", loss_fn=brier)


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("engine", EXACT)
def test_embedding_max_norm_is_scored_and_the_weight_left_as_it_was(engine, batch):
    model = embedding_max_norm()
    x, y = torch.randint(0, 10, (batch, 3)), torch.randint(0, 3, (batch,))
    weight = model[0].weight.detach().clone()
    assert bool((weight.norm(dim=1) > 1.0).all())  # every row is renormalised when used
    want = reference_grand(copy.deepcopy(model), x, y)  # (the reference renormalises its copy)
    assert_rel(scores(model, x, y, engine), want)
    assert torch.equal(model[0].weight, weight)


class TextModel(nn.Module):
    """Uses a per-example string field: its length is a feature."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, features, text):
        lengths = torch.tensor([[float(len(t))] for t in text])
        return {"logits": self.lin(torch.cat([features, lengths / 4], dim=1))}


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("engine", EXACT)
def test_string_fields_in_a_dict_batch(engine, batch):
    torch.manual_seed(0)
    model = TextModel()
    x, y = torch.randn(batch, 4), torch.randint(0, 3, (batch,))
    text = ["a" * (i + 1) for i in range(batch)]
    rows = {"features": x, "text": text, "labels": y, "index": torch.arange(batch)}
    want = reference_backward(
        model, lambda b: (x[b : b + 1], text[b : b + 1]), batch, y, call=lambda m, a: m(*a)
    )
    g = sw.GraNd(model, batch, engine=engine)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "GraNd: ", UserWarning)
        g.update(rows)
    assert_rel(g.compute(), want)
    with pytest.raises(PerExampleGradientError, match=r"not tensors: batch\['text'\]"):
        sw.GraNd(model, batch, engine="vmap").update(rows)


def test_hugging_face_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config)
    b, t = 7, 6
    ids = torch.randint(1, 40, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[2, 4:] = 0
    mask[5, 3:] = 0
    y = torch.randint(0, 3, (b,))
    rows = {"input_ids": ids, "attention_mask": mask, "labels": y, "index": torch.arange(b)}
    model.eval()
    want = reference_backward(
        model,
        lambda i: {"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]},
        b,
        y,
        call=lambda m, a: m(**a),
    )
    for engine in EXACT:
        g = sw.GraNd(model, b, engine=engine)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "GraNd: ", UserWarning)
            g.update(rows)
        assert_rel(g.compute(), want)
    assert model.training is False


def test_loop_equals_the_reference_on_every_shared_setting():
    for setting in SETTINGS:
        torch.manual_seed(0)
        model = setting.build()
        gen = torch.Generator().manual_seed(1)
        x = setting.inputs(5, gen)
        y = torch.randint(0, setting.classes, (5,), generator=gen)
        want = reference_grand(model, x, y)
        assert_rel(scores(model, x, y, "loop"), want)


# -- the fallback decision ------------------------------------------------------------------------
class CountingGRU(Recurrent):
    calls = 0

    def forward(self, x):
        CountingGRU.calls += 1
        return super().forward(x)


def test_a_failing_vmap_is_tried_once_per_model_and_batch_structure():
    torch.manual_seed(0)
    model = CountingGRU()
    names = [n for n, _ in model.named_parameters()]
    x, y = torch.randn(7, 3, 4), torch.randint(0, 3, (7,))
    call = lambda m, b: m(b)  # noqa: E731
    CountingGRU.calls = 0
    with pytest.warns(UserWarning, match=r"rnn\.weight_ih_l0 \(GRU\).*engine='loop'"):
        first = exact_sq_norms(model, names, x, y, call, ce)
    assert CountingGRU.calls == 1 + 7  # one failed vmap call, then one call per example
    CountingGRU.calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        second = exact_sq_norms(model, names, x[:5], y[:5], call, ce)  # another B, same structure
    assert CountingGRU.calls == 5  # vmap not tried again
    torch.testing.assert_close(second, first[:5])
    assert_rel(first.sqrt(), reference_grand(model, x, y))
    CountingGRU.calls = 0
    with pytest.warns(UserWarning, match="GraNd: torch.func"):  # another structure: tried again
        exact_sq_norms(model, names, x[:, :2], y, call, ce)
    assert CountingGRU.calls == 1 + 7


def test_loop_errors_name_grand_the_parameters_and_the_example():
    class InputChangedInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = x * 2
            out = self.b(self.a(h))
            h.mul_(0.5)
            return out + h.sum(dim=1, keepdim=True)

    model = InputChangedInPlace()
    x, y = torch.randn(3, 4), torch.randint(0, 3, (3,))
    for engine in EXACT:
        with pytest.raises(
            PerExampleGradientError, match=r"example 0.*a\.weight \(Linear\)"
        ) as info:
            scores(model, x, y, engine)
        assert "inplace" in str(info.value) and info.value.__cause__ is not None


def test_auto_survives_a_failing_hooks_pass_and_hooks_says_why():
    """The hook engine's ``autograd.grad`` with respect to ``a``'s output crosses a reentrant
    checkpoint, which refuses it: ``auto`` scores every parameter exactly instead."""
    torch.manual_seed(0)
    model = ReentrantCheckpoint()
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    want = reference_backward(model, lambda b: x[b : b + 1], 7, y)
    with pytest.raises(PerExampleGradientError, match=r"hooks engine failed.*engine='auto'"):
        scores(model, x, y, "hooks")
    g = sw.GraNd(model, 7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g.update_indexed(torch.arange(7), x, y)
    assert any("hooks engine failed" in str(w.message) for w in caught)
    assert_rel(g.compute(), want)


# -- modes ----------------------------------------------------------------------------------------
class ModeRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


def recorder_model(dropout=0.0):
    return nn.Sequential(
        nn.Linear(4, 6), nn.Dropout(dropout), ModeRecorder(), nn.Tanh(), nn.Linear(6, 3)
    )


@pytest.mark.parametrize("engine", ALL_ENGINES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mode_is_set_for_the_pass_and_every_flag_restored(engine, mode):
    torch.manual_seed(0)
    model = recorder_model().eval()
    model[4].train()  # a module with its own flag
    flags = [m.training for m in model.modules()]
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    scores(model, x, y, engine, mode=mode)
    assert model[2].seen and set(model[2].seen) == {mode == "train"}
    assert [m.training for m in model.modules()] == flags


def test_score_dataset_scores_grand_in_its_own_mode():
    torch.manual_seed(0)
    model = recorder_model()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    ds = sw.WithIndex(TensorDataset(x, y))
    g, e = sw.GraNd(model, 6, mode="train"), sw.EL2N(6)
    sw.score_dataset(model, DataLoader(ds, batch_size=3), g, e, progress=False)
    seen = model[2].seen
    assert seen.count(False) == 2  # the logit scorers' no-grad forward, one per batch: eval
    assert seen.count(True) >= 2  # GraNd's own passes: train
    assert model.training and model[2].training
    # p = 0: train mode scores what eval mode scores
    assert_rel(g.compute(), reference_grand(model, x, y))


def test_batchnorm_in_train_mode_is_an_error_inside_score_dataset_too():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ds = sw.WithIndex(TensorDataset(torch.randn(4, 4), torch.zeros(4, dtype=torch.long)))
    g = sw.GraNd(model, 4, mode="train")
    before = snapshot(g)
    with pytest.raises(BatchCoupledError):
        sw.score_dataset(model, DataLoader(ds, batch_size=2), g, progress=False)
    assert_same_state(before, snapshot(g))
    assert model.training and model[1].training


@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_dropout_p0_train_mode_equals_eval_mode(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    want = reference_grand(model, x, y)
    assert_rel(scores(model, x, y, engine, mode="train"), want)


def test_loop_in_train_mode_equals_a_training_mode_loop_under_the_same_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3)).eval()
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    model.train()
    torch.manual_seed(123)
    want = reference_backward(model, lambda b: x[b : b + 1], 7, y)
    model.eval()
    torch.manual_seed(123)
    got = scores(model, x, y, "loop", mode="train")
    assert_rel(got, want)
    assert not torch.allclose(got.double(), reference_grand(model, x, y))  # masks were applied


# (not "hooks": its layout probe compares passes that draw different masks, and refuses)
@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
def test_dropout_in_train_mode_gives_each_example_its_own_mask(engine):
    """Identical examples: one score in eval mode, different scores in train mode; and the
    average over 200 masks agrees across engines (the engines agree in distribution)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3))
    n = 200
    x, y = torch.randn(1, 4).expand(n, 4).clone(), torch.ones(n, dtype=torch.long)
    evals = scores(model, x, y, engine)
    assert torch.allclose(evals, evals[0].expand(n))
    torch.manual_seed(1)
    trains = scores(model, x, y, engine, mode="train")
    assert trains.unique().numel() > n // 4
    torch.manual_seed(2)
    reference = scores(model, x, y, "loop", mode="train")
    # mean of 200 draws: standard error ≈ std/√200 ≈ 7% of std; allow 5 standard errors
    se = (trains.std() ** 2 / n + reference.std() ** 2 / n).sqrt()
    assert float((trains.mean() - reference.mean()).abs()) < 5 * float(se)


# -- empty batches --------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_an_empty_batch_is_a_no_op_that_counts_as_an_update(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    g = sw.GraNd(model, 5, engine=engine)
    g.update_indexed(torch.tensor([1]), torch.randn(1, 4), torch.tensor([2]))
    before = g.compute()
    g.update_indexed(
        torch.zeros(0, dtype=torch.long), torch.randn(0, 4), torch.zeros(0, dtype=torch.long)
    )
    g.update(
        (torch.randn(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    )
    torch.testing.assert_close(g.compute(), before, equal_nan=True)
    el2n = sw.EL2N(5)  # as the logit scorers: an (empty) update
    el2n.update_indexed(
        torch.zeros(0, dtype=torch.long), torch.randn(0, 3), torch.zeros(0, dtype=torch.long)
    )
    assert g.num_updates == 3 and el2n.num_updates == 1


def test_the_engines_take_empty_batches():
    model = nn.Linear(4, 3).double()
    names = ["weight", "bias"]
    x, y = torch.randn(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    for fn in (vmap_sq_norms, exact_sq_norms, loop_sq_norms):
        sq = fn(model, names, x, y, lambda m, b: m(b), ce)
        assert sq.shape == (0,) and sq.dtype == torch.float64


# -- targets of a custom loss ---------------------------------------------------------------------
@pytest.mark.parametrize("engine", ALL_ENGINES)
def test_custom_loss_receives_ignore_labels_as_given(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.tensor([0, -100, 2, 1, -100])

    def masked_ce(output, targets):
        return F.cross_entropy(output.float(), targets, ignore_index=-100, reduction="none")

    got = scores(model, x, y, engine, loss_fn=masked_ce)
    kept = y != -100
    assert bool((got[~kept] == 0).all())  # an ignored example has no gradient
    assert_rel(got[kept], reference_grand(model, x[kept], y[kept]))
    with pytest.raises(ValueError, match=r"≥ 0.*-100.*loss_fn"):
        scores(model, x, y, engine)  # the default cross-entropy would ignore them silently


def test_custom_loss_receives_float_regression_targets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(5, 4), torch.randn(5, 2)

    def mse(output, targets):
        return (output - targets).pow(2).sum(dim=1)

    want = reference_backward(model, lambda b: x[b : b + 1], 5, y, loss=mse)
    for engine in ALL_ENGINES:
        assert_rel(scores(model, x, y, engine, loss_fn=mse), want)
    g = sw.GraNd(model, 5, loss_fn=mse)
    with pytest.raises(ValueError, match="one row per example"):
        g.update_indexed(torch.arange(1), x[:1], torch.tensor(1.0))
    with pytest.raises(ValueError, match="2 indices and 5 targets"):
        g.update_indexed(torch.arange(2), x, y)
    assert g.num_updates == 0
