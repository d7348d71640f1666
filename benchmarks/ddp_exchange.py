"""Cost of ForgettingTracker's per-step exchange under DDP, against the training step itself.

Two gloo processes on CPU, one thread each. Each rank trains a DDP-wrapped MLP (40→256→256→10)
on batches of 256 for 600 steps, interleaving three variants and reporting per-step medians: the
step alone; the step + EL2N.update (no communication: merged at compute()); the step +
ForgettingTracker.update (a 48-byte header all-gather, then the packed pairs). It also counts
the bytes each rank hands to ``all_gather`` in ForgettingTracker's exchanges: bytes on the wire
per example per update (each rank's buffer goes to every other rank).

Run: python benchmarks/ddp_exchange.py
"""

from __future__ import annotations

import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import sampleweights as sw

STEPS, BATCH, N = 200, 256, 100_000


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(
            nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(BATCH, 40, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)
    samples: dict[str, list[float]] = {"step": [], "step+el2n": [], "step+forgetting": []}
    scorers = {"step": None, "step+el2n": sw.EL2N(N), "step+forgetting": sw.ForgettingTracker(N)}
    for i in range(STEPS * 3):  # interleaved, per-step medians: robust on a shared 2-core box
        name = list(samples)[i % 3]
        scorer = scorers[name]
        dist.barrier()
        start = time.perf_counter()
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad()
        if scorer is not None:
            idx = torch.arange(i * BATCH, (i + 1) * BATCH) % N
            scorer.update_indexed(idx, logits, y)
        samples[name].append(time.perf_counter() - start)
    results = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in samples.items()}
    results["wire"] = _wire_bytes()
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def _wire_bytes() -> dict[str, float]:
    """Bytes this rank hands to all_gather per ForgettingTracker.update, split header / data."""
    import sampleweights.distributed as swd

    sent: list[int] = []
    real = swd.dist.all_gather

    def spy(parts, tensor, group=None):  # type: ignore[no-untyped-def]
        sent.append(tensor.numel() * tensor.element_size())
        return real(parts, tensor, group=group)

    swd.dist.all_gather = spy
    try:
        tracker = sw.ForgettingTracker(N)
        tracker.update_indexed(
            torch.arange(BATCH), torch.randn(BATCH, 10), torch.zeros(BATCH, dtype=torch.long)
        )
    finally:
        swd.dist.all_gather = real
    header, data = sent
    return {"header": float(header), "per_example": data / BATCH}


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = queue.get()
    for p in procs:
        p.join()
    wire = results.pop("wire")
    base = results["step"]
    print(f"{'per step (ms), 2 gloo ranks':<34}{'ms':>8}{'× step':>9}")
    for name, ms in results.items():
        print(f"{name:<34}{ms:>8.3f}{ms / base:>9.3f}")
    print(
        f"forgetting exchange: {wire['per_example']:.1f} bytes per example per update "
        f"+ a {wire['header']:.0f}-byte header per rank (batch {BATCH}, N = {N})"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
