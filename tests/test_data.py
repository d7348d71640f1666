from __future__ import annotations

import pytest
import torch
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
