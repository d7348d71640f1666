"""Saving merged scores with their provenance: :func:`save_scores` and :func:`load_scores`.

Scores travel from one scoring job to many training jobs (possibly on another world size), so
they are saved as a plain ``.npz`` (numpy only, no pickle): the float32 vector plus a JSON record
of where it came from — scorer and settings, number of examples, number of updates, epoch or
step, library version, and anything else passed as ``**meta``. A scorer's own ``state_dict`` is
per-rank and resumes only on the same world size; saved scores move anywhere.

Writes are atomic: the file is written under a temporary name in the same directory, flushed to
disk, then renamed over the target (``os.replace``), so an interrupted save leaves the previous
file intact and never a half-written one under the final name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch import distributed as dist

from sampleweights.distributed import all_reduce_copy, is_distributed, world
from sampleweights.errors import StateMismatchError
from sampleweights.scorers.base import Scorer
from sampleweights.validation import check_num_examples

__all__ = ["load_scores", "save_scores"]

_FORMAT = "sampleweights.scores/1"
#: Provenance keys written by save_scores itself; ``**meta`` may not use them.
_RESERVED = ("format", "num_examples", "version", "saved_at")
#: ... and, when a scorer is saved, these too (a plain tensor may carry e.g. ``scorer="el2n"``).
_RESERVED_SCORER = ("scorer", "num_updates", "settings")


def save_scores(path: str | os.PathLike[str], scores: Tensor | Scorer, **meta: Any) -> Path:
    """Write ``scores`` (a ``(N,)`` float tensor, or a scorer's merged ``compute()``) to ``.npz``.

    The file holds the float32 vector and a JSON provenance record: ``format``,
    ``num_examples``, library ``version``, ``saved_at``, for a scorer also its ``scorer`` name,
    ``num_updates`` and ``settings``, plus ``**meta``. The write is atomic (temporary file in the
    same directory, then ``os.replace``): an interrupted save leaves the previous file intact.
    As with a plain ``open()``, a symlink is written through (the link stays) and a file that
    exists keeps its permission bits; the directory must be writable.

    **Under torch.distributed exactly one process writes** (rank 0), and what it writes depends
    on what it is given:

    * a **scorer**: ``save_scores`` is a *collective* — call it on **every rank** of the
      scorer's process group, with the same arguments. Each rank computes the merged scores
      (``compute()``); rank 0 writes them to *its* ``path``; then the ranks meet once more, so
      no rank returns before the file exists, and if rank 0's write fails every rank raises.
      Never call it under ``if rank == 0:`` — rank 0 would wait for the others in the merge
      until the process group's timeout (30 minutes by default; gloo then raises a
      ``RuntimeError`` that says so, NCCL's watchdog aborts the job). Nor after
      ``destroy_process_group()``: a scorer updated on several ranks then holds only its
      rank's share.
    * a **tensor** (e.g. ``scorer.compute()``, which is already merged on every rank): no
      collective; global rank 0 writes and the other ranks return the path without writing
      (the file may not exist yet when they return). Calling it on rank 0 only is fine too.

    Args:
        path: the file; ``.npz`` is appended when missing (as numpy does).
        scores: the merged scores, or a :class:`~sampleweights.Scorer`, which adds its name,
            number of updates and settings to the provenance.
        **meta: JSON-serialisable provenance, e.g. ``epoch=3, seeds=10, model="resnet18"``;
            the keys above that ``save_scores`` writes itself are refused.

    Returns:
        The path written (on every rank: the one rank 0 writes when given the same ``path``).

    Raises:
        TypeError: ``scores`` is not a 1-D float tensor or a scorer; ``meta`` is not JSON.
        ValueError: a ``meta`` key is one that ``save_scores`` writes itself; float64 scores
            that float32 storage cannot hold (beyond ±3.4e38, or non-zero below 1.4e-45); a
            ``path`` that names a folder (ends with a separator).
        RuntimeError: under torch.distributed, the merge across ranks failed (another rank did
            not call ``save_scores``) or rank 0's write failed (on the other ranks).

    Example:
        >>> import torch, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "el2n")
        >>> p = save_scores(path, torch.tensor([0.5, 0.25]), scorer="el2n", epoch=2)
        >>> p.name
        'el2n.npz'
        >>> scores, meta = load_scores(path, num_examples=2)
        >>> scores.tolist(), meta["epoch"], meta["num_examples"]
        ([0.5, 0.25], 2, 2)
    """
    scorer = scores if isinstance(scores, Scorer) else None
    if scorer is None and not _is_score_vector(scores):
        raise TypeError(
            "Expected `scores` to be a non-empty 1-D float tensor (a scorer's compute()) or a "
            f"scorer, but got {_describe(scores)}."
        )
    reserved = _RESERVED + (_RESERVED_SCORER if scorer is not None else ())
    clash = [k for k in meta if k in reserved]
    if clash:
        raise ValueError(
            f"`meta` key {clash[0]!r} is provenance that save_scores writes itself "
            f"(reserved: {', '.join(reserved)}); pass it under another name, e.g. "
            f"user_{clash[0]}=..."
        )
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`meta` must be JSON-serialisable: {err}") from err
    path = _npz_path(path)

    if not isinstance(scores, Scorer):
        # a plain tensor is already merged (or deliberately local): one writer, no collective
        if _world_rank() == 0:
            _write(path, _as_array(scores), _record(scores, meta))
        return path
    scorer = scores

    if not is_distributed(scorer.process_group):
        values = scorer.compute()
        _write(path, _as_array(values), _record(values, meta, scorer))
        return path

    # a collective: every rank of the scorer's group merges, rank 0 writes, all learn the outcome
    _, rank = world(scorer.process_group)
    try:
        values = scorer.compute()
    except RuntimeError as err:
        if type(err) is not RuntimeError and not isinstance(err, dist.DistError):
            raise  # the library's own errors already say what went wrong
        raise RuntimeError(
            f"save_scores: merging the scores across ranks failed on rank {rank} ({err}). With "
            "a scorer, save_scores is a collective: call it on every rank of the scorer's "
            "process group (not under `if rank == 0:`), or save the merged tensor that "
            "scorer.compute() returns on every rank."
        ) from err
    failure: BaseException | None = None
    if rank == 0:
        try:
            _write(path, _as_array(values), _record(values, meta, scorer))
        except Exception as err:  # re-raised below, once every rank knows
            failure = err
    ok = torch.tensor([0 if failure is not None else 1], dtype=torch.int32, device=values.device)
    written = bool(all_reduce_copy(ok, "min", scorer.process_group))  # also the barrier
    if failure is not None:
        raise failure
    if not written:
        raise RuntimeError(
            f"save_scores: rank 0 failed to write the scores (see rank 0's error); nothing was "
            f"written to {path}."
        )
    return path


def load_scores(
    path: str | os.PathLike[str], num_examples: int | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """Read scores written by :func:`save_scores`: ``(scores (N,) float32, provenance dict)``.

    The file's contents are checked, not trusted: a 1-D float vector, a provenance record of
    this format whose ``num_examples`` matches the vector.

    Args:
        path: the file; as in :func:`save_scores`, ``"x"`` reads ``"x.npz"`` (``"x"`` itself
            when only that exists).
        num_examples: ``len(dataset)`` of the dataset the scores will be applied to; a file
            saved for another size is refused.

    Raises:
        FileNotFoundError: no such file.
        StateMismatchError: the file holds scores for another number of examples, or is not a
            scores file (another ``.npz``, a corrupt or truncated file).

    Example:
        >>> import torch, tempfile, os
        >>> path = save_scores(os.path.join(tempfile.mkdtemp(), "s"), torch.tensor([1.0, 2.0]))
        >>> load_scores(path, num_examples=2)[0]
        tensor([1., 2.])
    """
    n = check_num_examples(num_examples) if num_examples is not None else None
    path = _find(Path(path))
    with open(path, "rb") as fh:  # missing / unreadable file: the OS error as it is
        try:
            data = np.load(fh, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise StateMismatchError(
                    f"{path} holds a single array, not a sampleweights scores file (.npz)."
                )
            with data:
                if "scores" not in data.files or "provenance" not in data.files:
                    raise StateMismatchError(
                        f"{path} is not a sampleweights scores file (it holds "
                        f"{sorted(data.files)}, expected 'scores' and 'provenance')."
                    )
                _check_declared_sizes(path, data)
                array = data["scores"]
                provenance = data["provenance"]
        except StateMismatchError:
            raise
        except (
            zipfile.BadZipFile,
            zlib.error,
            EOFError,
            OSError,
            ValueError,
            KeyError,
            NotImplementedError,  # zipfile: a header asks for an unknown version or method
        ) as err:
            raise StateMismatchError(
                f"{path} is not a readable sampleweights scores file (corrupt or truncated?): "
                f"{type(err).__name__}: {err}"
            ) from err
    record = _check_record(path, provenance)
    if array.ndim != 1 or array.dtype.kind != "f":
        raise StateMismatchError(
            f"{path} holds scores of shape {array.shape} and dtype {array.dtype}; a scores file "
            "holds a 1-D float vector (one score per example)."
        )
    if record["num_examples"] != array.size:
        raise StateMismatchError(
            f"{path} is inconsistent: its provenance says num_examples="
            f"{record['num_examples']} but it holds {array.size} scores (corrupt or edited?)."
        )
    if n is not None and array.size != n:
        raise StateMismatchError(
            f"{path} holds scores for {array.size} examples, but the dataset has "
            f"num_examples={n}: they belong to another dataset (or another split)."
        )
    return torch.from_numpy(array.astype(np.float32)), record


# -- helpers ---------------------------------------------------------------------------------------
def _is_score_vector(scores: Any) -> bool:
    return (
        isinstance(scores, Tensor)
        and scores.dim() == 1
        and scores.is_floating_point()
        and scores.numel() > 0
    )


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def _as_array(scores: Tensor) -> np.ndarray:
    if not _is_score_vector(scores):  # a scorer's compute() always is; guard a custom one
        raise TypeError(
            f"Expected the scorer's compute() to return a 1-D float tensor, but got "
            f"{_describe(scores)}."
        )
    stored = scores.detach().to("cpu", torch.float32)
    if scores.dtype == torch.float64:  # float32 storage must keep every value's kind
        wide = scores.detach().to("cpu")
        lost = (torch.isfinite(wide) & ~torch.isfinite(stored)) | ((wide != 0) & (stored == 0))
        if bool(lost.any()):
            at = int(lost.nonzero()[0])
            raise ValueError(
                f"Scores are stored as float32, which cannot hold {int(lost.sum())} of these "
                f"float64 scores (e.g. index {at}: {float(wide[at])!r} would become "
                f"{float(stored[at])!r}). Rescale the scores (their order is what selection "
                "uses) before saving."
            )
    return stored.numpy()


def _record(scores: Tensor, meta: dict[str, Any], scorer: Scorer | None = None) -> str:
    from sampleweights import __version__

    record: dict[str, Any] = {}
    if scorer is not None:
        record.update(
            scorer=scorer.name,
            num_updates=scorer.num_updates,
            settings={k: str(v) for k, v in _settings(scorer).items()},
        )
    record.update(meta)
    record.update(
        format=_FORMAT,
        num_examples=int(scores.numel()),
        version=__version__,
        saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return json.dumps(record)


def _world_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _npz_path(path: str | os.PathLike[str]) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"Expected `path` to be a str or os.PathLike, but got {_describe(path)}.")
    text = os.fspath(path)
    path = Path(path)
    if path.name in ("", ".", "..") or text.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        raise ValueError(f"Expected `path` to end in a file name, but got {text!r}.")
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def _find(path: Path) -> Path:
    """The file ``save_scores(path)`` wrote: ``path`` + ``.npz`` unless it already ends so."""
    candidate = _npz_path(path)
    if candidate.exists() or not path.exists():
        return candidate  # a missing file: open() names the .npz that save_scores would write
    return path


def _write(path: Path, array: np.ndarray, provenance: str) -> None:
    """Write atomically: a temporary file beside ``path``, fsync, ``os.replace``.

    As a plain ``open(path, "wb")`` would: a symlink is written through (its target is
    replaced, the link stays), and a file that exists keeps its permission bits.
    """
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode: int | None = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = None  # a new file: 0o666 & ~umask
    # a short stem keeps the temporary name within NAME_MAX whatever the target's length
    stem = path.name.encode()[:32].decode(errors="ignore")
    tmp = path.with_name(f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never clobber another writer's file; mode 0o666 & umask, like a plain open()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.chmod(tmp, mode)
            np.savez(fh, scores=array, provenance=np.array(provenance))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _check_declared_sizes(path: Path, data: np.lib.npyio.NpzFile) -> None:
    """Refuse an array header that claims more bytes than its zip member holds, before numpy
    allocates them (one corrupt header could ask for terabytes: a MemoryError, not ours)."""
    fmt, archive = np.lib.format, data.zip
    if archive is None:  # closed: numpy raises on access
        return
    names = set(archive.namelist())
    for key in ("scores", "provenance"):
        info = archive.getinfo(f"{key}.npy" if f"{key}.npy" in names else key)
        with archive.open(info) as member:
            version = fmt.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(member)
            else:
                continue  # rarer versions: numpy's own checks
            declared = math.prod(shape) * dtype.itemsize
            if declared > info.file_size - member.tell():
                raise StateMismatchError(
                    f"{path} is corrupt: its {key!r} array claims shape {shape} "
                    f"({declared} bytes) but holds {info.file_size - member.tell()} bytes."
                )


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename stands
        return
    finally:
        os.close(fd)


def _check_record(path: Path, provenance: np.ndarray) -> dict[str, Any]:
    if provenance.shape != () or provenance.dtype.kind != "U":
        raise StateMismatchError(
            f"{path} has a malformed provenance entry (shape {provenance.shape}, dtype "
            f"{provenance.dtype}; expected one JSON string)."
        )
    try:
        record = json.loads(str(provenance))
    except ValueError as err:
        raise StateMismatchError(f"{path} has provenance that is not valid JSON: {err}") from err
    if not isinstance(record, dict):
        raise StateMismatchError(
            f"{path} has provenance {type(record).__name__}, expected a JSON object."
        )
    if record.get("format") != _FORMAT:
        raise StateMismatchError(f"{path} has format {record.get('format')!r}, not {_FORMAT!r}.")
    count = record.get("num_examples")
    if isinstance(count, bool) or not isinstance(count, int):
        raise StateMismatchError(
            f"{path} has provenance without an integer num_examples (got {count!r})."
        )
    return record


def _settings(scorer: Scorer) -> dict[str, Any]:
    keys = ("nonfinite", "engine", "mode", "param_names", "chunk_size")
    return {k: getattr(scorer, k) for k in keys if hasattr(scorer, k)}
