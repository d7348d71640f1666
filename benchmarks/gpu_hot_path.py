"""The hot path on a CUDA GPU: a collection's update against EL2N alone, against the same scorers
updated one by one and against the forwards it rides on; its peak extra memory at large
vocabularies; GraNd's engines against a training step. Ratios within one run.

Run (needs CUDA): python benchmarks/gpu_hot_path.py [--rounds 50]
Times are CUDA-event medians over ``--rounds`` calls after warm-up, each call a whole update
(host-side Python and launches included: the GPU waits for the host at these sizes); dataset
indices come from the CPU, as a DataLoader gives them. "Compiled" is ``compile=True``: with the
default settings every update is one compiled call (the fused update). Prints a markdown
report (docs/performance.md, "On a GPU").
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from models import TinyTransformer, cnn32, mlp_256, mnist1d_cnn, resnet18_gn

import sampleweights as sw

N = 50_000


def timed(fn: Callable[[], object], rounds: int, warmup: int = 5) -> float:
    """Median milliseconds of one call, by CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def call(scorers: object, *args: torch.Tensor) -> Callable[[], None]:
    """One update of a scorer or collection (or of each scorer of a list) on ``args``."""
    each = scorers if isinstance(scorers, list) else [scorers]

    def update() -> None:
        for s in each:
            s.update_indexed(*args)

    return update


def six(n: int, **kw: object) -> list[sw.Scorer]:
    return [
        sw.EL2N(n, **kw),
        sw.ForgettingTracker(n, **kw),
        sw.Misclassified(n, **kw),
        sw.AUM(n, **kw),
        sw.DataMaps(n, **kw),
        sw.Loss(n, **kw),
    ]


def batch(b: int, c: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(b, c, generator=gen) * 3).to(dtype).cuda()
    y = torch.randint(0, c, (b,), generator=gen).cuda()
    idx = torch.randperm(N, generator=gen)[:b]  # on the CPU, as a DataLoader gives them
    return idx, logits, y


def collection_table(rounds: int) -> list[str]:
    rows = [
        "| batch × classes | settings | EL2N alone | six, collection | six, compiled "
        "| six, separate | six ÷ EL2N | compiled ÷ EL2N | six ÷ separate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b, c in [(512, 10), (256, 1000), (64, 32000)]:
        idx, logits, y = batch(b, c)
        for label, kw in [
            ("defaults", {}),
            ("`validate=False, nonfinite='skip'`", {"validate": False, "nonfinite": "skip"}),
        ]:
            el2n = sw.EL2N(N, **kw)
            coll = sw.ScorerCollection(*six(N, **kw))
            comp = sw.ScorerCollection(*six(N, **kw), compile=True)
            sep = six(N, **kw)
            t_el2n = timed(call(el2n, idx, logits, y), rounds)
            t_coll = timed(call(coll, idx, logits, y), rounds)
            t_comp = timed(call(comp, idx, logits, y), rounds, 10)
            assert comp._fused is not None, "the compiled pass fell back to eager"
            t_sep = timed(call(sep, idx, logits, y), rounds)
            rows.append(
                f"| {b} × {c} | {label} | {t_el2n * 1e3:.0f} µs | {t_coll * 1e3:.0f} µs "
                f"| {t_comp * 1e3:.0f} µs | {t_sep * 1e3:.0f} µs | {t_coll / t_el2n:.2f} "
                f"| {t_comp / t_el2n:.2f} | {t_coll / t_sep:.2f} |"
            )
    return rows


def host_state_table(rounds: int) -> list[str]:
    """State in host memory (``device="cpu"``: pinned, asynchronous copies) against on-device."""
    rows = [
        "| batch × classes | scorers | state on the GPU | state in host memory | ratio |",
        "|---|---|---|---|---|",
    ]
    for b, c in [(512, 10), (64, 32000)]:
        idx, logits, y = batch(b, c)
        for label, make in [("EL2N", lambda **kw: sw.EL2N(N, **kw)), ("six", None)]:
            times = []
            for device in ("cuda", "cpu"):
                if make is None:
                    target: object = sw.ScorerCollection(*six(N, device=device))
                else:
                    target = make(device=device)
                times.append(timed(call(target, idx, logits, y), rounds))
            rows.append(
                f"| {b} × {c} | {label} | {times[0] * 1e3:.0f} µs | {times[1] * 1e3:.0f} µs "
                f"| {times[1] / times[0]:.2f} |"
            )
    return rows


def forward_table(rounds: int) -> list[str]:
    rows = [
        "| model, batch | forward (no grad) | six per update | share |",
        "|---|---|---|---|",
    ]
    for name, model, x in [
        ("ResNet-18 widths (GroupNorm), 128 × 3 × 32 × 32", resnet18_gn(), (128, 3, 32, 32)),
        ("MNIST-1D CNN (16 channels), 512", mnist1d_cnn(16), (512, 1, 40)),
    ]:
        model = model.cuda().eval()
        inputs = torch.randn(*x, device="cuda")
        with torch.no_grad():
            t_fwd = timed(lambda model=model, inputs=inputs: model(inputs), rounds)
        idx, logits, y = batch(x[0], 10)
        coll = sw.ScorerCollection(*six(N, validate=False, nonfinite="skip"))
        t_coll = timed(call(coll, idx, logits, y), rounds)
        rows.append(
            f"| {name} | {t_fwd * 1e3:.0f} µs | {t_coll * 1e3:.0f} µs "
            f"| {100 * t_coll / t_fwd:.0f} % |"
        )
    return rows


def memory_table() -> list[str]:
    rows = [
        "| batch × classes (bf16 logits) | one fp32 (B, C) buffer | peak extra, nine scorers |",
        "|---|---|---|",
    ]
    for b, c in [(64, 32000), (32, 150_000)]:
        idx, logits, y = batch(b, c, torch.bfloat16)
        coll = sw.ScorerCollection(
            sw.EL2N(N),
            sw.ForgettingTracker(N),
            sw.Misclassified(N),
            sw.AUM(N),
            sw.DataMaps(N),
            sw.Loss(N),
            sw.Margin(N),
            sw.Entropy(N),
            sw.Confidence(N, ema=0.9),
        )
        coll.update_indexed(idx, logits, y)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        coll.update_indexed(idx, logits, y)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        rows.append(f"| {b} × {c} | {b * c * 4 / 2**20:.2f} MiB | {extra / 2**20:.2f} MiB |")
    return rows


GRAND_CASES = {
    "MLP 40→256→256→10 (512)": (mlp_256, (512, 40)),
    "CNN 32×32×3 (128)": (lambda: cnn32(False), (128, 3, 32, 32)),
    "CNN with GroupNorm (128)": (lambda: cnn32(True), (128, 3, 32, 32)),
    "transformer, T = 64 (64)": (TinyTransformer, None),
    "ResNet-18 widths, GroupNorm (64)": (resnet18_gn, (64, 3, 32, 32)),
}


def grand_table(rounds: int) -> list[str]:
    rows = [
        "| model (batch) | floor | hooks | vmap, chunk 32 | hooks ÷ floor | vmap ÷ floor |",
        "|---|---|---|---|---|---|",
    ]
    for name, (build, shape) in GRAND_CASES.items():
        torch.manual_seed(0)
        model = build().cuda().eval()
        if shape is None:
            x = torch.randint(0, 1000, (64, 64), device="cuda")
        else:
            x = torch.randn(*shape, device="cuda")
        y = torch.randint(0, 10, (x.shape[0],), device="cuda")
        idx = torch.arange(x.shape[0])

        def floor(model: nn.Module = model, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()

        hooks = sw.GraNd(model, len(y), engine="hooks")
        vmap = sw.GraNd(model, len(y), engine="vmap", chunk_size=32)
        t_floor = timed(floor, rounds)
        t_hooks = timed(call(hooks, idx, x, y), rounds)
        t_vmap = timed(call(vmap, idx, x, y), max(rounds // 5, 3))
        torch.testing.assert_close(hooks.compute(), vmap.compute(), rtol=1e-2, atol=1e-5)
        rows.append(
            f"| {name} | {t_floor:.2f} ms | {t_hooks:.2f} ms | {t_vmap:.2f} ms "
            f"| {t_hooks / t_floor:.2f}× | {t_vmap / t_floor:.2f}× |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    for title, table in [
        ("ScorerCollection per update", lambda: collection_table(args.rounds)),
        ("Against the forward", lambda: forward_table(args.rounds)),
        ("Host-memory state", lambda: host_state_table(args.rounds)),
        ("Peak extra memory of one update", memory_table),
        ("GraNd engines against one training step", lambda: grand_table(args.rounds)),
    ]:
        print(f"## {title}\n")
        print("\n".join(table()), "\n", flush=True)


if __name__ == "__main__":
    main()
