"""Peak host memory of each GraNd engine, each in a fresh process (CPU: peak RSS growth).

Run: python benchmarks/grand_memory.py [case ...]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
WORKER = r"""
import resource, sys, json, torch
sys.path.insert(0, {here!r})
torch.set_num_threads(1)
from test_bench_grand import _setup, floor_step
import sampleweights as sw
name, what = sys.argv[1], sys.argv[2]
model, x, y = _setup(name)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if what == "floor":
    floor_step(model, x, y)
else:
    engine = "vmap" if what.startswith("vmap") else "hooks"
    chunk = 32 if what == "vmap-chunk32" else len(y)
    scorer = sw.GraNd(model, len(y), engine=engine, chunk_size=chunk)
    scorer.update_indexed(torch.arange(len(y)), x, y)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"case": name, "what": what, "peak_mb": (peak - base) / 1024}}))
"""


def main(cases: list[str]) -> None:
    from test_bench_grand import CASES

    for name in cases or list(CASES):
        for what in ("floor", "hooks", "vmap-chunk32", "vmap"):
            code = WORKER.format(here=str(HERE))
            out = subprocess.run(
                [sys.executable, "-c", code, name, what],
                capture_output=True,
                text=True,
                timeout=1200,
            )
            line = (
                out.stdout.strip().splitlines()[-1]
                if out.returncode == 0
                else json.dumps(
                    {"case": name, "what": what, "error": out.stderr.strip().splitlines()[-1:]}
                )
            )
            print(line, flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    _ = resource
    main(sys.argv[1:])
