"""Shared argument checks: unsigned and numpy indices, empty batches, numpy scalars, softmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sampleweights as sw
from conftest import assert_same_state, snapshot
from sampleweights.validation import (
    as_index_tensor,
    check_num_examples,
    looks_like_probabilities,
)

LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, -3.0], [1.0, 1.0, 1.0]])
TARGETS = [2, 0, 1]


def reference() -> sw.EL2N:
    s = sw.EL2N(8)
    s.update_indexed(torch.tensor([5, 0, 7]), LOGITS, torch.tensor(TARGETS))
    return s


def torch_unsigned() -> list[torch.dtype]:
    return [getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_numpy_unsigned_indices_and_targets_score_like_int64(dtype):
    s = sw.EL2N(8)
    s.update_indexed(np.array([5, 0, 7], dtype=dtype), LOGITS, np.array(TARGETS, dtype=dtype))
    torch.testing.assert_close(s.compute(), reference().compute(), equal_nan=True)


@pytest.mark.parametrize("dtype", torch_unsigned(), ids=str)
def test_torch_unsigned_indices_and_targets_score_like_int64(dtype):
    s = sw.EL2N(8)
    s.update_indexed(torch.tensor([5, 0, 7]).to(dtype), LOGITS, torch.tensor(TARGETS).to(dtype))
    torch.testing.assert_close(s.compute(), reference().compute(), equal_nan=True)
    assert as_index_tensor(torch.tensor([3]).to(dtype), "indices").dtype == torch.int64


def test_unsigned_values_beyond_int64_are_rejected_not_wrapped():
    s = reference()
    before = snapshot(s)
    huge = np.array([2**64 - 1], dtype=np.uint64)
    with pytest.raises(ValueError, match=r"`indices`.*beyond int64"):
        s.update_indexed(huge, LOGITS[:1], [0])
    if hasattr(torch, "uint64"):
        with pytest.raises(ValueError, match=r"`indices`.*beyond int64"):
            s.update_indexed(torch.tensor([-3]).view(torch.uint64), LOGITS[:1], [0])
    assert_same_state(snapshot(s), before)
    if hasattr(torch, "uint32"):
        big32 = torch.tensor([2**32 - 1]).to(torch.uint32)  # fits int64: the range check says so
        with pytest.raises(ValueError, match=r"`indices` in \[0, 8\)"):
            s.update_indexed(big32, LOGITS[:1], [0])
    assert_same_state(snapshot(s), before)


def test_an_empty_list_is_an_empty_batch_like_an_empty_tensor():
    lists, tensors = reference(), reference()
    lists.update_indexed([], torch.empty(0, 3), [])
    tensors.update_indexed(
        torch.empty(0, dtype=torch.int64), torch.empty(0, 3), torch.empty(0, dtype=torch.int64)
    )
    assert lists.num_updates == tensors.num_updates == 2
    torch.testing.assert_close(lists.compute(), reference().compute(), equal_nan=True)
    assert as_index_tensor([], "indices").dtype == torch.int64
    with pytest.raises(ValueError, match="1-D"):
        as_index_tensor([[]], "indices")
    with pytest.raises(TypeError, match="float64"):  # an explicit float array stays an error
        as_index_tensor(np.array([], dtype=np.float64), "indices")


def test_an_empty_list_batch_goes_through_update():
    s = sw.Misclassified(4)
    s.update(([], [], []), torch.empty(0, 2))  # (inputs, targets, indices), B = 0
    assert s.num_updates == 1 and s.compute().isnan().all()


@pytest.mark.parametrize("scalar", [np.int64(3), 3, np.float32(3.0)], ids=repr)
def test_a_scalar_index_is_a_clear_type_error(scalar):
    with pytest.raises(TypeError, match=r"`indices`.*scalar.*pass a list"):
        as_index_tensor(scalar, "indices")


def test_numpy_integers_count_examples():
    for n in (np.int64(5), np.uint32(5), np.int8(5)):
        value = check_num_examples(n)
        assert value == 5 and type(value) is int
    assert sw.EL2N(np.int64(5)).num_examples == 5
    for bad in (np.float64(5.0), 5.0, np.bool_(True), True, torch.tensor(5), np.array(5)):
        with pytest.raises(TypeError, match=r"`num_examples`.*len\(dataset\)"):
            check_num_examples(bad)
    for bad in (np.int64(0), np.uint8(0), -3):
        with pytest.raises(ValueError, match="`num_examples` ≥ 1"):
            check_num_examples(bad)


SCORES = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])


@pytest.mark.parametrize(
    ("numpy_value", "python_value"),
    [(np.int64(3), 3), (np.uint8(3), 3), (np.float32(0.5), 0.5), (np.float64(0.3), 0.3)],
    ids=repr,
)
def test_select_takes_numpy_keep_and_offset(numpy_value, python_value):
    for strategy in ("hardest", "easiest", "random", "stratified"):
        expected = sw.select(SCORES, python_value, strategy)
        assert torch.equal(sw.select(SCORES, numpy_value, strategy), expected)
        expected = sw.select(SCORES, 2, strategy, offset=python_value)
        assert torch.equal(sw.select(SCORES, 2, strategy, offset=numpy_value), expected)


@pytest.mark.parametrize(
    ("name", "value", "error", "fragment"),
    [
        ("keep", np.bool_(True), TypeError, "got bool"),
        ("keep", np.float32("nan"), ValueError, "got nan"),
        ("keep", np.float64(1.5), ValueError, "got 1.5"),
        ("keep", np.int64(0), ValueError, r"count in \[1, 10\]"),
        ("keep", np.uint64(11), ValueError, r"count in \[1, 10\]"),
        ("keep", np.array(3), TypeError, "ndarray"),
        ("offset", np.bool_(False), TypeError, "got bool"),
        ("offset", np.float16(-0.1), ValueError, r"fraction in \[0, 1\]"),
        ("offset", np.int64(-1), ValueError, r"count in \[0, 10\]"),
        ("offset", np.uint16(11), ValueError, r"count in \[0, 10\]"),
    ],
    ids=repr,
)
def test_select_rejects_bad_numpy_keep_and_offset_clearly(name, value, error, fragment):
    with pytest.raises(error, match=f"`{name}`.*{fragment}"):
        sw.select(SCORES, **{"keep": 1, name: value})


def test_looks_like_probabilities():
    probs = torch.softmax(torch.randn(16, 10), dim=1)
    assert looks_like_probabilities(probs)
    assert looks_like_probabilities(probs.to(torch.bfloat16))
    assert looks_like_probabilities(probs.to(torch.float16))
    assert looks_like_probabilities(probs.double())
    assert not looks_like_probabilities(torch.log_softmax(torch.randn(16, 10), dim=1))
    assert not looks_like_probabilities(probs * 0.9)  # non-negative, but rows sum to 0.9
    mixed = probs.clone()
    mixed[3] = torch.randn(10)  # one row of real logits
    assert not looks_like_probabilities(mixed)
    nan = probs.clone()
    nan[0, 0] = float("nan")
    assert not looks_like_probabilities(nan)
    assert not looks_like_probabilities(torch.empty(0, 10))  # an empty batch proves nothing
    assert not looks_like_probabilities(torch.ones(4, 1))  # one class: always sums to 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_unsigned_indices_and_no_sync_without_validate():
    dev = torch.device("cuda")
    idx = torch.tensor([5, 0, 7]).to(torch.uint32 if hasattr(torch, "uint32") else torch.int64)
    s = sw.EL2N(8, validate=False, nonfinite="skip", device=dev)
    probs = LOGITS.softmax(1).to(dev)  # would warn under validate=True: no check here
    targets = torch.tensor(TARGETS, device=dev)
    idx = idx.to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s.update_indexed(idx, probs, targets)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = sw.EL2N(8)
    ref.update_indexed(torch.tensor([5, 0, 7]), LOGITS.softmax(1), torch.tensor(TARGETS))
    torch.testing.assert_close(s.compute().cpu(), ref.compute(), equal_nan=True)
