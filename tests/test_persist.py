from __future__ import annotations

import numpy as np
import pytest
import torch

import sampleweights as sw
from sampleweights.validation import check_fits


def test_round_trip_with_provenance(tmp_path):
    s = sw.EL2N(5)
    s.update_indexed(torch.tensor([0, 3]), torch.randn(2, 4), torch.tensor([1, 2]))
    path = sw.save_scores(tmp_path / "el2n", s, epoch=3, model="mlp")
    assert path.suffix == ".npz"
    scores, meta = sw.load_scores(path, num_examples=5)
    torch.testing.assert_close(scores, s.compute(), equal_nan=True)
    assert meta["scorer"] == "el2n" and meta["num_updates"] == 1 and meta["epoch"] == 3
    assert meta["num_examples"] == 5 and meta["version"] == sw.__version__
    # usable directly by select once complete
    full = sw.EL2N(3)
    full.update_indexed(torch.arange(3), torch.randn(3, 2), torch.tensor([0, 1, 0]))
    p = sw.save_scores(tmp_path / "full.npz", full.compute())
    assert len(sw.select(sw.load_scores(p)[0], 2)) == 2


def test_refuses_another_dataset_size_and_other_files(tmp_path):
    path = sw.save_scores(tmp_path / "s.npz", torch.rand(10))
    with pytest.raises(sw.StateMismatchError, match=r"10 examples.*num_examples=12"):
        sw.load_scores(path, num_examples=12)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(sw.StateMismatchError, match="not a sampleweights scores file"):
        sw.load_scores(tmp_path / "other.npz")


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="1-D float"):
        sw.save_scores(tmp_path / "x", torch.arange(3))
    with pytest.raises(TypeError, match="JSON"):
        sw.save_scores(tmp_path / "x", torch.rand(3), model=object())


def test_state_that_does_not_fit_on_the_gpu_fails_up_front(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 2**34))
    with pytest.raises(MemoryError, match=r"12\.00 GiB.*device='cpu'"):
        check_fits(2**30 - 1, 12, torch.device("cuda", 0))
    check_fits(1000, 12, torch.device("cuda", 0))  # fits: no error
    check_fits(2**40, 12, torch.device("cpu"))  # host memory is not checked
