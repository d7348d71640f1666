"""Adversarial inputs for batch layouts, index conversion and the probability warning.

Each test pins an input that once broke a promise of ``WithIndex``/``BatchLayout``/the default
forward, ``as_index_tensor`` or the "logits look like probabilities" warning.
"""

from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import sampleweights as sw
from conftest import assert_same_state, snapshot
from sampleweights.validation import as_index_tensor, looks_like_probabilities

PROBS = torch.tensor([[0.3, 0.7], [0.5, 0.5]])


def no_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


# -- WithIndex: an index is a dataset position or an IndexError ----------------------------------
def test_withindex_rejects_out_of_range_and_non_integer_indices():
    ds = sw.WithIndex(TensorDataset(torch.arange(5.0), torch.arange(5)))
    assert ds[-5][-1] == 0
    for bad in (-6, -10, 5):
        with pytest.raises(IndexError, match="out of range for a dataset of 5"):
            ds[bad]  # -10 used to return (sample 0, index -5)
    with pytest.raises(IndexError, match="out of range"):
        ds.__getitems__([1, -7])
    for bad in (2.7, True):
        with pytest.raises(TypeError, match="integer"):
            ds[bad]  # 2.7 used to be truncated to 2 silently
    assert ds[np.int64(2)][-1] == 2 and ds[torch.tensor(3)][-1] == 3


# -- the default forward: model inputs of any structure --------------------------------------------
Inputs = collections.namedtuple("Inputs", "x mask")


class NamedInputs(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return Inputs(torch.full((3,), float(i)), torch.ones(3)), i % 2


class NamedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, inp: Inputs) -> torch.Tensor:
        return self.lin(inp.x * inp.mask)


def test_namedtuple_model_inputs_reach_the_model():
    batch = next(iter(DataLoader(sw.WithIndex(NamedInputs()), batch_size=4)))
    assert isinstance(batch[0], Inputs)
    model = NamedModel()
    out = sw.default_forward()(model, batch)  # used to fail rebuilding the namedtuple
    torch.testing.assert_close(out, model(batch[0]))
    s = sw.EL2N(4)
    sw.score_dataset(model, [batch], s, progress=False)
    assert s.compute().isfinite().all()


class Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lin(input_ids)


def test_dict_batch_with_two_target_keys_is_a_clear_error_in_the_forward():
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    batch = {"input_ids": x, "label": y, "labels": y, "index": torch.tensor([0, 1])}
    with pytest.raises(KeyError, match="several possible target keys"):
        sw.default_forward()(Keywords(), batch)  # used to pass both to the model as inputs
    fwd = sw.default_forward(sw.BatchLayout(target_key="labels"))
    with pytest.raises(TypeError, match="label"):  # named: the other key is an input
        fwd(Keywords(), batch)
    unlabelled = {"input_ids": x, "index": torch.tensor([0, 1])}  # inference: no target needed
    assert sw.default_forward()(Keywords(), unlabelled).shape == (2, 2)


# -- as_index_tensor -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values",
    [
        torch.tensor([1, 2], dtype=torch.int32),
        torch.tensor([1, 2], dtype=torch.int16),
        torch.tensor([1, 2], dtype=torch.uint8),
        np.array([1, 2], dtype=np.int32),
        np.array([1, 2], dtype=np.uint8),
        np.array([1, 2], dtype=">i8"),  # big-endian: torch refuses it as is
        np.array([1, 2], dtype=">u4"),
    ],
    ids=lambda v: f"{type(v).__name__}-{v.dtype}",
)
def test_index_tensors_are_always_int64(values):
    out = no_warnings(as_index_tensor, values, "indices")
    assert out.dtype == torch.int64 and out.tolist() == [1, 2]


def test_read_only_numpy_indices_convert_without_a_warning():
    array = np.arange(3)
    array.setflags(write=False)
    assert no_warnings(as_index_tensor, array, "indices").tolist() == [0, 1, 2]


def test_a_list_of_samples_is_a_clear_type_error():
    # collate_fn=lambda s: s: the "batch" is a list of (x, y, index) samples
    loader = DataLoader(
        sw.WithIndex(TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))),
        batch_size=3,
        collate_fn=lambda samples: samples,
    )
    s = sw.EL2N(4)
    before = snapshot(s)
    with pytest.raises(TypeError, match=r"`indices` to be a 1-D integer tensor"):
        s.update(next(iter(loader)), torch.randn(3, 2))
    with pytest.raises(TypeError, match="`indices`"):
        as_index_tensor([[1, 2], [3]], "indices")
    assert_same_state(snapshot(s), before)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8], ids=str)
def test_grand_scores_narrow_integer_targets_like_int64(dtype):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    ref = sw.GraNd(model, 4)
    ref.update_indexed(torch.arange(4), x, y)
    s = sw.GraNd(model, 4)
    # int32 used to make the hooks engine fail (a warning, and the exact engine from then on);
    # int16 raised PerExampleGradientError
    no_warnings(s.update_indexed, torch.arange(4).to(dtype), x, y.to(dtype))
    torch.testing.assert_close(s.compute(), ref.compute())


# -- the probability warning ---------------------------------------------------------------------
def test_one_hot_logits_are_not_probabilities():
    # hand-written logits such as the docs' right = [[1.0, 0.0]] are real logits
    assert not looks_like_probabilities(torch.tensor([[1.0, 0.0]]))
    assert not looks_like_probabilities(F.one_hot(torch.tensor([0, 2, 1]), 3).float())
    s = sw.ForgettingTracker(2)
    no_warnings(s.update_indexed, [0, 1], torch.tensor([[1.0, 0.0], [0.0, 1.0]]), [0, 0])
    mixed = torch.tensor([[1.0, 0.0], [0.25, 0.75]])  # one saturated row, one soft row
    assert looks_like_probabilities(mixed)


def test_the_warning_points_at_the_callers_line():
    for call in (
        lambda s: s.update((torch.zeros(2), torch.tensor([0, 1]), torch.tensor([0, 1])), PROBS),
        lambda s: s.update_indexed([0, 1], PROBS, [0, 1]),
        lambda s: sw.ScorerCollection(s).update_indexed([0, 1], PROBS, [0, 1]),
    ):
        with pytest.warns(RuntimeWarning, match="probabilities") as record:
            call(sw.EL2N(4))
        assert record[0].filename == __file__  # not a line inside the library


def test_a_warning_raised_as_an_error_rejects_every_such_call():
    s = sw.EL2N(4)
    before = snapshot(s)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(2):  # the second call used to be accepted silently
            with pytest.raises(RuntimeWarning, match="probabilities"):
                s.update_indexed([0, 1], PROBS, [0, 1])
    assert_same_state(snapshot(s), before)
    with pytest.warns(RuntimeWarning, match="probabilities"):
        s.update_indexed([0, 1], PROBS, [0, 1])
    no_warnings(s.update_indexed, [0, 1], PROBS, [0, 1])  # once per scorer
    assert s.num_updates == 2


def test_low_precision_probabilities_with_many_classes_are_flagged():
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        assert looks_like_probabilities(torch.softmax(torch.randn(8, 50_000).to(dtype), 1))
        assert looks_like_probabilities(torch.softmax(torch.randn(1, 3), 1).to(dtype))
        assert not looks_like_probabilities(torch.log_softmax(torch.randn(8, 50), 1).to(dtype))


# -- score_dataset: one forward for scorers whose layouts disagree ---------------------------------
def four_element_batch():
    torch.manual_seed(0)
    x1, x2 = torch.randn(4, 3), torch.randn(4, 3) + 5
    return [x1, x2, torch.tensor([0, 1, 0, 1]), torch.arange(4)]


def test_score_dataset_refuses_scorers_whose_layouts_name_different_inputs():
    batch = four_element_batch()
    a = sw.EL2N(4, layout=sw.BatchLayout(target_pos=2, input_pos=0))
    b = sw.EL2N(4, layout=sw.BatchLayout(target_pos=2, input_pos=1))
    with pytest.raises(ValueError, match="input"):
        sw.score_dataset(nn.Linear(3, 2), [batch], a, b, progress=False)


def test_score_dataset_checks_every_layout_before_any_update():
    batch = four_element_batch()
    a = sw.EL2N(4, layout=sw.BatchLayout(target_pos=2, input_pos=0))
    b = sw.EL2N(4)  # the default layout refuses a 4-element batch
    with pytest.raises(ValueError, match="target_pos"):
        sw.score_dataset(nn.Linear(3, 2), [batch], a, b, progress=False)
    assert a.num_updates == 0


@pytest.mark.parametrize(
    ("values", "error", "fragment"),
    [
        (torch.tensor([True, False]), TypeError, "integer dtype"),
        ([True, False], TypeError, "integer dtype"),
        (torch.tensor(3), ValueError, "1-D"),
        ([2**63], ValueError, "beyond int64"),
        ([2**64], TypeError, "object"),
        ([-1, 2**63], TypeError, "float64"),
        (np.array([2**63], dtype=np.uint64), ValueError, "beyond int64"),
    ],
    ids=["bool-tensor", "bool-list", "0-d", "list-2**63", "list-2**64", "mixed-sign", "u64"],
)
def test_indices_that_are_not_dataset_positions_are_rejected(values, error, fragment):
    with pytest.raises(error, match=f"`indices`.*{fragment}"):
        as_index_tensor(values, "indices")
