"""Run a function on 2 CPU processes with a gloo process group (tests marked ``ddp``)."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int,
    world: int,
    port: int,
    fn: Callable[..., Any],
    out: str,
    args: tuple,
    timeout: float | None = None,
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    kwargs = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
    dist.init_process_group("gloo", rank=rank, world_size=world, **kwargs)
    try:
        result = fn(rank, world, *args)
        Path(out, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        if dist.is_initialized():  # a test may have destroyed the group itself
            dist.destroy_process_group()


def run_ddp(
    fn: Callable[..., Any], *args: Any, world: int = 2, timeout: float | None = None
) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` processes; returns each rank's result in order.

    ``fn`` must be importable (defined at module level in a test file or helper module).
    ``timeout``: seconds a collective may wait before it fails (the process group's timeout;
    default torch's 30 minutes) — set it short in tests of a failure path, so a hang is bounded.
    """
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _entry,
            args=(world, _free_port(), fn, out, args, timeout),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        return [pickle.loads(Path(out, f"{r}.pkl").read_bytes()) for r in range(world)]


# Runs the script given as its first argument as ``__main__``, then leaves without the
# interpreter's teardown. PyTorch keeps a gloo process group's threads alive after
# ``destroy_process_group()`` once a ``DistributedDataParallel`` model was built on it (they
# outlive the model), and at exit those threads can race the process's static destructors and
# abort it ("terminate called without an active exception", SIGABRT in a non-Python thread) after
# every line of the script ran: seen on a freshly booted, memory-pressed machine. An exception in
# the script still fails the run (exit code 1).
_LAUNCHER = """\
import os, runpy, sys
script = sys.argv.pop(1)
runpy.run_path(script, run_name="__main__")
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
"""


def torchrun(
    script: Path | str, *args: str, cwd: Path, timeout: float = 300, standalone: bool = False
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 script *args`` (one thread per process; ``tests/`` on the
    path), through a launcher that skips the racy interpreter teardown (see ``_LAUNCHER``)."""
    launcher = Path(cwd, "_torchrun_launcher.py")
    launcher.write_text(_LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    rendezvous = ["--standalone"] if standalone else []
    if not standalone:
        rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]
    command = [sys.executable, "-m", "torch.distributed.run", *rendezvous]
    command += ["--nproc_per_node", "2", str(launcher), str(script), *args]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


class CollectiveCount:
    """Records the torch.distributed collectives called while active (by wrapping them):
    ``with CollectiveCount() as count: ...; count.calls == ["all_gather", ...]``."""

    NAMES = ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast", "all_to_all")

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._saved: dict[str, object] = {}

    def __enter__(self) -> CollectiveCount:
        for name in self.NAMES:
            original = getattr(dist, name)
            self._saved[name] = original

            def wrapped(*args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
