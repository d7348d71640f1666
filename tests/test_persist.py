from __future__ import annotations

import json
import os
import stat

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


def _failing_savez(file, *args, **kwargs):
    """np.savez that dies mid-write, after some bytes reached the file (disk full, a kill)."""
    if hasattr(file, "write"):
        file.write(b"PK\x03\x04 half a zip")
    else:
        with open(file, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_an_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch, error):
    old = torch.tensor([0.5, 0.25, 2.0])
    path = sw.save_scores(tmp_path / "scores", old, epoch=1)

    def dying(file, *args, **kwargs):
        try:
            _failing_savez(file)
        except OSError as err:
            raise error("interrupted") from err

    monkeypatch.setattr(np, "savez", dying)
    with pytest.raises(error, match="interrupted"):
        sw.save_scores(path, torch.tensor([9.0, 9.0, 9.0]), epoch=2)
    monkeypatch.undo()
    scores, meta = sw.load_scores(path, num_examples=3)
    assert torch.equal(scores, old) and meta["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npz"]  # no temporary left


def test_save_replaces_the_file_and_keeps_the_usual_permissions(tmp_path):
    path = sw.save_scores(tmp_path / "s", torch.rand(4), epoch=1)
    sw.save_scores(tmp_path / "s", torch.rand(4), epoch=2)
    assert sw.load_scores(path)[1]["epoch"] == 2
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as a plain open() would
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_load_finds_the_file_that_save_wrote_under_the_same_name(tmp_path):
    written = sw.save_scores(tmp_path / "x", torch.tensor([1.0, 2.0]))
    assert written == tmp_path / "x.npz"
    assert torch.equal(sw.load_scores(tmp_path / "x")[0], torch.tensor([1.0, 2.0]))
    assert torch.equal(sw.load_scores(str(tmp_path / "x"), num_examples=2)[0][:1], torch.ones(1))
    with pytest.raises(FileNotFoundError, match=r"y\.npz"):
        sw.load_scores(tmp_path / "y")


def _valid_provenance(n):
    return json.dumps({"format": "sampleweights.scores/1", "num_examples": n})


def _corrupt_files(tmp_path):
    good = sw.save_scores(tmp_path / "good", torch.rand(50)).read_bytes()
    files = {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "random bytes": bytes(range(256)) * 4,
        "zip without the end": good[:-30],
    }
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / f"{name}.npz"
        out[name].write_bytes(data)
    arrays = {
        "npy array": None,
        "pickled object": {"scores": np.array([{"a": 1}], dtype=object)},
        "bad json": {"scores": np.zeros(3, np.float32), "provenance": np.array("{not json")},
        "json list": {"scores": np.zeros(3, np.float32), "provenance": np.array("[1, 2]")},
        "no format": {"scores": np.zeros(3, np.float32), "provenance": np.array("{}")},
        "no num_examples": {
            "scores": np.zeros(3, np.float32),
            "provenance": np.array(json.dumps({"format": "sampleweights.scores/1"})),
        },
        "count disagrees": {
            "scores": np.zeros(3, np.float32),
            "provenance": np.array(_valid_provenance(4)),
        },
        "2-D scores": {
            "scores": np.zeros((2, 5), np.float32),
            "provenance": np.array(_valid_provenance(10)),
        },
        "integer scores": {
            "scores": np.zeros(3, np.int64),
            "provenance": np.array(_valid_provenance(3)),
        },
        "provenance not a string": {
            "scores": np.zeros(3, np.float32),
            "provenance": np.zeros(2),
        },
    }
    for name, content in arrays.items():
        out[name] = tmp_path / f"{name}.npz"
        if content is None:
            with open(out[name], "wb") as fh:
                np.save(fh, np.zeros(3, np.float32))
        elif name == "pickled object":
            np.savez(out[name], provenance=np.array(_valid_provenance(1)), **content)
        else:
            np.savez(out[name], **content)
    return out


def test_corrupt_or_foreign_files_raise_the_documented_error(tmp_path):
    for name, path in _corrupt_files(tmp_path).items():
        for num_examples in (None, 10):
            with pytest.raises(sw.StateMismatchError, match=r"\.npz"):
                sw.load_scores(path, num_examples=num_examples)
            assert name  # the failing case is named by the loop in a traceback


def test_any_flipped_byte_is_refused_or_harmless(tmp_path):
    # the zip's CRC covers the data; a flip in zip metadata that does not matter may load
    scores = torch.tensor([0.5, 1.5, -2.0, 3.25, 0.0])
    good = sw.save_scores(tmp_path / "good", scores).read_bytes()
    path = tmp_path / "flipped.npz"
    refused = 0
    for offset in range(len(good)):
        data = bytearray(good)
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
        try:
            loaded, meta = sw.load_scores(path, num_examples=5)
        except sw.StateMismatchError:
            refused += 1
            continue
        assert torch.equal(loaded, scores) and meta["num_examples"] == 5, offset
    assert refused > len(good) // 2


def test_a_2d_array_with_the_right_size_is_not_a_score_vector(tmp_path):
    np.savez(
        tmp_path / "grid.npz",
        scores=np.zeros((2, 5), np.float32),
        provenance=np.array(_valid_provenance(10)),
    )
    with pytest.raises(sw.StateMismatchError, match=r"shape \(2, 5\).*1-D"):
        sw.load_scores(tmp_path / "grid.npz", num_examples=10)


def test_meta_never_overwrites_provenance(tmp_path):
    for key in ("num_examples", "format", "version", "saved_at"):
        with pytest.raises(ValueError, match=f"`meta` key '{key}'.*user_{key}"):
            sw.save_scores(tmp_path / "m", torch.rand(3), **{key: 1})
    s = sw.EL2N(3)
    s.update_indexed(torch.tensor([0]), torch.randn(1, 2), torch.tensor([1]))
    for key in ("scorer", "num_updates", "settings"):
        with pytest.raises(ValueError, match=f"`meta` key '{key}'"):
            sw.save_scores(tmp_path / "m", s, **{key: "mine"})
    assert not (tmp_path / "m.npz").exists()  # nothing written by a rejected call
    # a plain tensor may name its scorer
    meta = sw.load_scores(sw.save_scores(tmp_path / "m", torch.rand(3), scorer="el2n"))[1]
    assert meta["scorer"] == "el2n" and meta["num_examples"] == 3


def test_more_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match=r"1-D float.*\(2, 2\)"):
        sw.save_scores(tmp_path / "x", torch.rand(2, 2))
    with pytest.raises(TypeError, match="non-empty"):
        sw.save_scores(tmp_path / "x", torch.rand(0))
    with pytest.raises(TypeError, match="`path`"):
        sw.save_scores(3, torch.rand(3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_examples"):
        sw.load_scores(tmp_path / "x", num_examples=2.0)
