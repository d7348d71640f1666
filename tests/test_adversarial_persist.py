"""Adversarial inputs for save_scores/load_scores and LossReweighter/jtt_weights."""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile

import numpy as np
import pytest
import torch

import sampleweights as sw
import sampleweights.reweight as reweight_module

# -- save_scores / load_scores ---------------------------------------------------------------------


def test_a_file_name_the_filesystem_accepts_can_be_saved(tmp_path):
    # the temporary file beside it must not need a longer name than the target (NAME_MAX = 255)
    name = "s" * 246 + ".npz"
    path = sw.save_scores(tmp_path / name, torch.tensor([1.0, 2.0]))
    assert path.name == name
    assert torch.equal(sw.load_scores(path, num_examples=2)[0], torch.tensor([1.0, 2.0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_saving_through_a_symlink_updates_its_target(tmp_path):
    # like a plain open(): "latest.npz -> run3/scores.npz" stays a link and run3's file changes
    target = sw.save_scores(tmp_path / "run3" / "scores", torch.tensor([1.0, 1.0]))
    link = tmp_path / "latest.npz"
    link.symlink_to(target)
    assert sw.save_scores(link, torch.tensor([7.0, 8.0]), epoch=4) == link
    assert link.is_symlink()
    scores, meta = sw.load_scores(target, num_examples=2)
    assert torch.equal(scores, torch.tensor([7.0, 8.0])) and meta["epoch"] == 4
    assert sorted(p.name for p in target.parent.iterdir()) == ["scores.npz"]


def test_saving_over_a_file_keeps_its_permissions(tmp_path):
    # private scores (0o600) must not become world-readable because a save replaced the file
    path = sw.save_scores(tmp_path / "private", torch.rand(3))
    os.chmod(path, 0o600)
    sw.save_scores(path, torch.rand(3))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o640)
    sw.save_scores(path, torch.rand(3))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_path_without_a_file_name_is_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (".", "", tmp_path / "sub" / ".."):
        with pytest.raises(ValueError, match="file name"):
            sw.save_scores(path, torch.rand(3))
    assert list(tmp_path.iterdir()) == []


def test_a_reader_of_the_previous_file_is_not_disturbed_by_a_save(tmp_path):
    path = sw.save_scores(tmp_path / "s", torch.tensor([1.0, 2.0, 3.0]))
    with open(path, "rb") as reader:  # another process has the old file open
        sw.save_scores(path, torch.tensor([4.0, 5.0, 6.0]))
        with np.load(reader) as data:
            assert data["scores"].tolist() == [1.0, 2.0, 3.0]
    assert sw.load_scores(path)[0].tolist() == [4.0, 5.0, 6.0]


def test_a_file_written_by_the_previous_release_still_loads(tmp_path):
    # the previous save_scores: np.savez(path, ...) with meta merged under the provenance keys
    record = '{"scorer": "el2n", "epoch": 1, "format": "sampleweights.scores/1", '
    record += '"num_examples": 3, "version": "0.1.0", "saved_at": "2024-01-01T00:00:00+0000"}'
    np.savez(str(tmp_path / "old"), scores=np.array([0.5, np.nan, 2.0], np.float32),
             provenance=np.array(record))  # fmt: skip
    scores, meta = sw.load_scores(tmp_path / "old", num_examples=3)
    torch.testing.assert_close(scores, torch.tensor([0.5, float("nan"), 2.0]), equal_nan=True)
    assert meta["epoch"] == 1 and meta["scorer"] == "el2n"


def test_a_header_that_claims_terabytes_is_refused_before_allocating(tmp_path):
    # a corrupt shape in the array header: StateMismatchError, not a 36 TiB MemoryError
    header = np.lib.format.header_data_from_array_1_0(np.zeros(3, np.float32))
    header["shape"] = (10**13,)
    scores = io.BytesIO()
    np.lib.format.write_array_header_1_0(scores, header)
    scores.write(np.zeros(3, np.float32).tobytes())
    provenance = io.BytesIO()
    record = {"format": "sampleweights.scores/1", "num_examples": 3}
    np.lib.format.write_array(provenance, np.array(json.dumps(record)))
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("scores.npy", scores.getvalue())
        archive.writestr("provenance.npy", provenance.getvalue())
    with pytest.raises(sw.StateMismatchError, match="corrupt"):
        sw.load_scores(path)


# -- LossReweighter / jtt_weights ------------------------------------------------------------------

NORMALIZE = ["mean", "batch", "weights"]


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_an_empty_batch_gives_a_zero_loss_not_nan(normalize):
    rw = sw.LossReweighter(torch.tensor([1.0, 2.0, 3.0]), normalize)
    loss = torch.zeros(0, requires_grad=True)
    out = rw(loss, torch.zeros(0, dtype=torch.long))
    assert out.item() == 0.0
    out.backward()


def _fake_world(monkeypatch, same_on_every_rank=2):
    """A 2-rank group where the other rank holds the same batch (no processes needed)."""
    monkeypatch.setattr(reweight_module, "is_distributed", lambda group=None: True)
    monkeypatch.setattr(reweight_module, "world", lambda group=None: (same_on_every_rank, 0))
    monkeypatch.setattr(
        reweight_module, "all_reduce_copy", lambda t, op, group=None: t * same_on_every_rank
    )


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_sync_batch_when_every_rank_is_empty_gives_zero_not_nan(monkeypatch, normalize):
    _fake_world(monkeypatch)
    rw = sw.LossReweighter(torch.tensor([1.0, 2.0, 3.0]), normalize, sync_batch=True)
    loss = torch.zeros(0, requires_grad=True)
    out = rw(loss, [])
    assert out.item() == 0.0
    out.backward()
    # and with data: identical batches on both ranks average to the single-process loss
    loss, idx = torch.tensor([0.5, 1.5]), torch.tensor([2, 0])
    torch.testing.assert_close(rw(loss, idx), sw.LossReweighter(rw.weights, normalize)(loss, idx))


@pytest.mark.parametrize("tiny_or_huge", [1e-50, 1e300])
def test_float64_weights_that_float32_cannot_hold_are_refused(tiny_or_huge):
    # valid in float64, but 0 (all zero) or inf once stored as float32: the loss would be NaN
    weights = torch.full((3,), tiny_or_huge, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32"):
        sw.LossReweighter(weights)


def _float32_result(weights, normalize, loss, idx, dtype):
    """The loss computed in float32, rounded once to ``dtype``."""
    return sw.LossReweighter(weights, normalize)(loss.detach().float(), idx).to(dtype).item()


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_losses_do_not_overflow_or_lose_the_weights(normalize, dtype):
    # Σ wᵢ·lossᵢ = 10⁵ overflows float16 (max 65504) though the normalised loss is 10 (100 for
    # "batch"); bfloat16 keeps the range but rounds the sum and the weights
    weights, idx = torch.full((1000,), 10.0), torch.arange(1000)
    loss = torch.full((1000,), 10.0, dtype=dtype, requires_grad=True)
    out = sw.LossReweighter(weights, normalize)(loss, idx)
    assert out.dtype == dtype
    assert out.item() == _float32_result(weights, normalize, loss, idx, dtype)
    out.backward()
    assert torch.isfinite(loss.grad).all()
    # weights that bf16 cannot hold (3.3, 1 + 2⁻⁹) are applied as given, not rounded first
    w = torch.tensor([3.3, 1.0 + 2**-9, 3.3, 1.0])
    small = torch.tensor([100.0, 200.0, 300.0, 400.0], dtype=dtype)
    got = sw.LossReweighter(w, normalize)(small, torch.arange(4)).item()
    assert got == _float32_result(w, normalize, small, torch.arange(4), dtype)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_sync_batch_with_float16_losses_does_not_overflow(monkeypatch, normalize):
    weights, idx = torch.full((1000,), 10.0), torch.arange(1000)
    loss = torch.full((1000,), 10.0, dtype=torch.float16)
    expected = _float32_result(weights, normalize, loss, idx, torch.float16)
    _fake_world(monkeypatch)
    rw = sw.LossReweighter(weights, normalize, sync_batch=True)
    assert rw(loss, idx).item() == expected


def test_jtt_upweight_accepts_numpy_numbers():
    expected = torch.tensor([5.0, 1.0, 1.0])
    assert torch.equal(sw.jtt_weights([0], 3, np.int64(5)), expected)
    assert torch.equal(sw.jtt_weights([0], 3, np.float32(5.0)), expected)
    with pytest.raises(TypeError, match="upweight"):
        sw.jtt_weights([0], 3, np.bool_(True))
    with pytest.raises(ValueError, match="upweight"):
        sw.jtt_weights([0], 3, np.float64("nan"))
    with pytest.raises(ValueError, match="upweight"):
        sw.jtt_weights([0], 3, 1e39)  # finite, but ∞ in the float32 weights
