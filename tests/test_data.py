from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import sampleweights as sw


class DictDataset(Dataset):
    def __init__(self, n: int, target_key: str = "labels") -> None:
        self.x = torch.randn(n, 3)
        self.y = torch.arange(n) % 2
        self.target_key = target_key

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], self.target_key: self.y[i]}


class Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


def test_tuple_samples_get_index_appended():
    ds = sw.WithIndex(TensorDataset(torch.arange(5.0), torch.arange(5) * 10))
    x, y, i = ds[2]
    assert (float(x), int(y), i) == (2.0, 20, 2)
    assert ds[-1][-1] == 4  # negative indices are normalised to the dataset index
    assert len(ds) == 5


def test_dict_and_plain_samples():
    ds = sw.WithIndex(DictDataset(4))
    assert ds[3]["index"] == 3 and "labels" in ds[3]
    plain = sw.WithIndex([10, 11, 12])
    assert plain[1] == (11, 1)


def test_dict_with_index_key_is_an_error_not_an_overwrite():
    ds = sw.WithIndex([{"index": 5, "target": 1}])
    with pytest.raises(KeyError, match="index_key"):
        ds[0]
    renamed = sw.WithIndex([{"index": 5, "target": 1}], index_key="sw_index")
    assert renamed[0] == {"index": 5, "target": 1, "sw_index": 0}


def test_iterable_dataset_rejected():
    with pytest.raises(TypeError, match="IterableDataset"):
        sw.WithIndex(Stream())
    with pytest.raises(TypeError, match="map-style"):
        sw.WithIndex(object())


def test_getitems_batched_fetch_keeps_indices():
    class Batched(TensorDataset):
        def __getitems__(self, idx):
            return [(self.tensors[0][i], self.tensors[1][i]) for i in idx]

    ds = sw.WithIndex(Batched(torch.arange(6.0), torch.arange(6)))
    batch = next(iter(DataLoader(ds, batch_size=3, sampler=[5, 0, 3])))
    assert batch[-1].tolist() == [5, 0, 3]
    assert batch[0].tolist() == [5.0, 0.0, 3.0]


def test_layout_reads_tuple_and_dict_batches_through_a_dataloader():
    ds = sw.WithIndex(TensorDataset(torch.randn(7, 3), torch.arange(7) % 3))
    batch = next(iter(DataLoader(ds, batch_size=7, shuffle=True)))
    layout = sw.BatchLayout()
    idx, y = layout.indices(batch), layout.targets(batch)
    assert sorted(idx.tolist()) == list(range(7))
    assert torch.equal(y, idx % 3)
    dbatch = next(iter(DataLoader(sw.WithIndex(DictDataset(5)), batch_size=5)))
    assert layout.indices(dbatch).tolist() == list(range(5))
    assert layout.targets(dbatch).tolist() == [0, 1, 0, 1, 0]
    assert set(layout.inputs(dbatch)) == {"input_ids"}


def test_layout_errors_point_to_withindex():
    layout = sw.BatchLayout()
    with pytest.raises(ValueError, match="WithIndex"):
        layout.indices({"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="WithIndex"):
        layout.indices(torch.zeros(3))
    with pytest.raises(ValueError, match="at least 3"):
        layout.targets((torch.zeros(2, 3), torch.tensor([0, 1])))
    with pytest.raises(KeyError, match="several possible target keys"):
        layout.targets({"label": 1, "labels": 2, "index": 0})
    with pytest.raises(KeyError, match="no target"):
        layout.targets({"x": 1, "index": 0})
    with pytest.raises(ValueError, match="must differ"):
        sw.BatchLayout(index_pos=0, target_pos=0)
    with pytest.raises(TypeError, match="index_pos"):
        sw.BatchLayout(index_pos=True)


def test_custom_positions():
    layout = sw.BatchLayout(index_pos=0, target_pos=2)
    batch = (torch.tensor([4, 5]), torch.zeros(2, 3), torch.tensor([1, 0]))
    assert layout.indices(batch).tolist() == [4, 5]
    assert layout.targets(batch).tolist() == [1, 0]
    assert len(layout.inputs(batch)) == 1


def test_logits_of_hf_style_outputs():
    class Out:
        logits = torch.ones(2, 3)

    assert sw.logits_of(Out()).shape == (2, 3)
    assert sw.logits_of({"logits": torch.zeros(1, 2)}).shape == (1, 2)
    with pytest.raises(TypeError, match="logits"):
        sw.logits_of({"loss": torch.zeros(())})


# -- the layout decides what the model is called on ------------------------------------------------
class TokenModel(nn.Module):
    """Embeds any integer tensor: it runs (silently) on dataset indices as well as on tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(50, 8), nn.Linear(8, 3)
        self.seen: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.seen.append(ids)
        return self.head(self.emb(ids).reshape(ids.shape[0], -1, 8).mean(1))


def index_first_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (6, 5), generator=gen)
    return torch.arange(10, 16), torch.arange(6) % 3, tokens  # (index, target, tokens)


def test_default_forward_calls_the_model_on_the_layouts_input():
    index, target, tokens = index_first_batch()
    layout = sw.BatchLayout(index_pos=0, target_pos=1)
    model = TokenModel()
    out = sw.default_forward(layout)(model, (index, target, tokens))
    assert model.seen[-1] is tokens  # not the dataset indices in batch[0]
    assert torch.equal(out, model(tokens))
    assert layout.model_input((index, target, tokens)) is tokens


def test_score_dataset_and_grand_read_the_model_input_from_the_layout():
    index, target, tokens = index_first_batch()
    layout = sw.BatchLayout(index_pos=0, target_pos=1)
    model = TokenModel()
    batches = [(index - 10, target, tokens)]
    el2n = sw.EL2N(6, layout=layout)
    grand = sw.GraNd(model, 6, layout=layout)
    sw.score_dataset(model, batches, el2n, grand, progress=False)
    with torch.no_grad():
        expected = sw.el2n(model(tokens), target)
    torch.testing.assert_close(el2n.compute(), expected)
    ref = sw.GraNd(model, 6)
    ref.update_indexed(index - 10, tokens, target)
    torch.testing.assert_close(grand.compute(), ref.compute())
    in_loop = sw.GraNd(model, 6, layout=layout)
    in_loop.update(batches[0])
    torch.testing.assert_close(in_loop.compute(), ref.compute())


# -- more than (input, target, index): the target position must be said --------------------------
def jtt_batch() -> tuple[list, TensorDataset]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, generator=gen)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    group = torch.tensor([3, 2, 0, 2, 1, 3, 0, 2])  # valid class ids too: a silent misread
    ds = sw.WithIndex(TensorDataset(x, y, group))
    return next(iter(DataLoader(ds, batch_size=8))), ds


def test_default_layout_refuses_batches_longer_than_three():
    batch, ds = jtt_batch()
    assert len(batch) == 4  # (x, y, group, index)
    layout = sw.BatchLayout()
    assert torch.equal(layout.indices(batch), torch.arange(8))  # the index is unambiguous
    for read in (layout.targets, layout.inputs, layout.model_input):
        with pytest.raises(ValueError, match=r"4 elements.*BatchLayout\(target_pos=1\)"):
            read(batch)
    s = sw.EL2N(len(ds))
    before = s.state_dict()
    with pytest.raises(ValueError, match="target_pos"):
        s.update(batch, torch.randn(8, 4))
    assert s.num_updates == 0 and torch.equal(
        s.state_dict()["state"]["count"], before["state"]["count"]
    )
    with pytest.raises(ValueError, match="target_pos"):
        sw.score_dataset(nn.Linear(3, 4), DataLoader(ds, batch_size=4), s, progress=False)


def test_explicit_target_pos_reads_x_y_group_index():
    batch, ds = jtt_batch()
    x, y, group, _ = batch
    layout = sw.BatchLayout(target_pos=1)
    assert layout.targets(batch) is y
    assert layout.inputs(batch) == (x, group)
    with pytest.raises(ValueError, match=r"positions \[0, 2\].*input_pos"):
        layout.model_input(batch)  # x or group: not guessed
    in_loop = sw.EL2N(len(ds), layout=layout)  # update(batch, logits) needs only the target
    logits = torch.randn(8, 4)
    in_loop.update(batch, logits)
    torch.testing.assert_close(in_loop.compute(), sw.el2n(logits, y))
    layout = sw.BatchLayout(target_pos=1, input_pos=0)  # score_dataset calls the model too
    assert layout.model_input(batch) is x
    model = nn.Linear(3, 4)
    s = sw.EL2N(len(ds), layout=layout)
    sw.score_dataset(model, DataLoader(ds, batch_size=3), s, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(s.compute(), sw.el2n(model(x), y))


def test_input_pos_picks_one_of_several_inputs():
    x1, x2, y, i = torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([0, 1]), torch.tensor([4, 5])
    batch = (x1, x2, y, i)
    with pytest.raises(ValueError, match=r"input_pos.*forward="):
        sw.BatchLayout(target_pos=2).model_input(batch)
    assert sw.BatchLayout(target_pos=2, input_pos=1).model_input(batch) is x2
    assert sw.BatchLayout(target_pos=-2, input_pos=0).model_input(batch) is x1
    out = sw.default_forward(sw.BatchLayout(target_pos=2, input_pos=1))(nn.Linear(3, 2), batch)
    assert out.shape == (2, 2)
    with pytest.raises(ValueError, match="same element"):  # -1 and 2 are one element here
        sw.BatchLayout(input_pos=2).model_input((x1, y, i))


def test_two_element_batches_have_an_input_but_no_target():
    batch = next(iter(DataLoader(sw.WithIndex(torch.randn(4, 3)), batch_size=4)))
    layout = sw.BatchLayout()
    assert layout.model_input(batch) is batch[0]
    assert sw.default_forward()(nn.Linear(3, 2), batch).shape == (4, 2)
    with pytest.raises(ValueError, match="at least 3"):
        layout.targets(batch)


def test_a_moved_index_needs_an_explicit_target():
    batch = (torch.tensor([4, 5]), torch.zeros(2, 3), torch.tensor([1, 0]))  # (index, x, target)
    with pytest.raises(ValueError, match="target_pos"):
        sw.BatchLayout(index_pos=0).targets(batch)
    assert sw.BatchLayout(index_pos=0, target_pos=2).targets(batch).tolist() == [1, 0]


def test_layout_arguments_are_checked():
    with pytest.raises(TypeError, match="target_pos"):
        sw.BatchLayout(target_pos="1")
    with pytest.raises(TypeError, match="input_pos"):
        sw.BatchLayout(input_pos=True)
    with pytest.raises(TypeError, match="index_key"):
        sw.BatchLayout(index_key=0)
    with pytest.raises(ValueError, match="`target_pos` and `input_pos` must differ"):
        sw.BatchLayout(target_pos=1, input_pos=1)
    with pytest.raises(ValueError, match=r"`target_pos`=5 is outside a batch of 3"):
        sw.BatchLayout(target_pos=5).targets((torch.zeros(1), torch.zeros(1), torch.zeros(1)))
    with pytest.raises(ValueError, match="same element"):
        sw.BatchLayout(target_pos=2).targets((torch.zeros(1), torch.zeros(1), torch.zeros(1)))
    with pytest.raises(TypeError, match="BatchLayout"):
        sw.default_forward({"index_pos": 0})


def test_dict_batches_keep_their_keys():
    class Keywords(nn.Module):
        def forward(self, input_ids):
            self.seen = input_ids
            return torch.zeros(len(input_ids), 2)

    dbatch = next(iter(DataLoader(sw.WithIndex(DictDataset(3)), batch_size=3)))
    model = Keywords()
    fwd = sw.default_forward(sw.BatchLayout(input_pos=0, target_pos=1))  # positions: tuples only
    assert fwd(model, dbatch).shape == (3, 2)
    assert model.seen is dbatch["input_ids"]


def test_dict_with_index_key_is_an_error_through_a_dataloader():
    loader = DataLoader(sw.WithIndex([{"index": 5, "target": 1}] * 2), batch_size=2)
    with pytest.raises(KeyError, match="already has the key 'index'"):
        next(iter(loader))
