from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import sampleweights as sw


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def data(n=21):
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def test_scores_equal_a_manual_eval_pass_and_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = Net()
    model.body[1].eval()  # a deliberately frozen submodule must stay frozen
    calls = []
    handle = model.head.register_forward_hook(lambda *a: calls.append(1))
    model(torch.randn(5, 4)).sum().backward()  # leave some .grad behind
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    hooks = len(model.head._forward_hooks)

    ds = sw.WithIndex(data())
    el2n, mis, forget = sw.EL2N(len(ds)), sw.Misclassified(len(ds)), sw.ForgettingTracker(len(ds))
    sw.score_dataset(model, DataLoader(ds, batch_size=8), el2n, mis, forget, progress=False)

    assert {n: m.training for n, m in model.named_modules()} == modes
    assert len(model.head._forward_hooks) == hooks
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]) and torch.equal(p.grad, grads[n])
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n])
    handle.remove()
    assert len(calls) == 1 + 3  # one forward per batch, shared by the three scorers

    model.eval()
    with torch.no_grad():
        x, y = data().tensors
        want = sw.el2n(model(x), y)
    torch.testing.assert_close(el2n.compute(), want)
    torch.testing.assert_close(mis.compute(), (model(x).argmax(1) != y).float())


class DictData(Dataset):
    def __init__(self) -> None:
        self.base = data(10)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {"features": x, "labels": y}


class HFModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, features):
        return {"logits": self.lin(features), "hidden": None}


def test_dict_batches_and_hf_style_outputs():
    ds = sw.WithIndex(DictData())
    model = HFModel()
    s = sw.EL2N(len(ds))
    sw.score_dataset(model, DataLoader(ds, batch_size=4), s, progress=False)
    x, y = data(10).tensors
    torch.testing.assert_close(s.compute(), sw.el2n(model.lin(x).detach(), y))


def test_custom_forward_for_multi_input_batches():
    base = data(9)
    ds = sw.WithIndex(TensorDataset(base.tensors[0], base.tensors[0] * 2, base.tensors[1]))
    model = nn.Linear(4, 3)
    s = sw.EL2N(len(ds), layout=sw.BatchLayout(target_pos=2))  # (x1, x2, y, index)
    sw.score_dataset(
        model, DataLoader(ds, batch_size=4), s, forward=lambda m, b: m(b[0] + b[1]), progress=False
    )
    x, y = base.tensors
    torch.testing.assert_close(s.compute(), sw.el2n(model(3 * x).detach(), y))


def test_ddp_style_wrapper_is_unwrapped():
    model = nn.Linear(4, 3)
    wrapped = nn.DataParallel(model)
    ds = sw.WithIndex(data(6))
    s = sw.EL2N(6)
    sw.score_dataset(wrapped, DataLoader(ds, batch_size=6), s, progress=False)
    x, y = data(6).tensors
    torch.testing.assert_close(s.compute(), sw.el2n(model(x).detach(), y))


def test_bad_arguments():
    with pytest.raises(TypeError, match="at least one scorer"):
        sw.score_dataset(nn.Linear(1, 1), [])
    with pytest.raises(TypeError, match="scorers"):
        sw.score_dataset(nn.Linear(1, 1), [], "el2n")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        sw.score_dataset(lambda x: x, [], sw.EL2N(3))


def test_progress_bar_does_not_change_results():
    ds = sw.WithIndex(data(12))
    model = nn.Linear(4, 3)
    a, b = sw.EL2N(12), sw.EL2N(12)
    sw.score_dataset(model, DataLoader(ds, batch_size=5), a, progress=True)
    sw.score_dataset(model, DataLoader(ds, batch_size=5), b, progress=False)
    torch.testing.assert_close(a.compute(), b.compute())
