"""Bytes of per-example state, and the peak extra memory of compute(), per scorer (CPU).

State bytes are the state tensors' sizes; compute()'s peak is the growth of the process's peak
RSS while it runs, measured in a fresh process per scorer at N = 20M.

Run: python benchmarks/state_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys

N = 20_000_000
WORKER = r"""
import json, resource, sys, torch
import sampleweights as sw
n, name = int(sys.argv[1]), sys.argv[2]
s = {"EL2N": sw.EL2N, "ForgettingTracker": sw.ForgettingTracker,
     "Misclassified": sw.Misclassified}[name](n)
idx = torch.arange(0, n, 97)
s.update_indexed(idx, torch.randn(len(idx), 10), torch.zeros(len(idx), dtype=torch.long))
state = sum(t.nbytes for t in s._state.values())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
s.compute()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"scorer": name, "state_bytes_per_example": state / n,
                  "compute_extra_bytes_per_example": round(peak / n, 1)}))
"""


def main() -> None:
    for name in ("EL2N", "ForgettingTracker", "Misclassified"):
        out = subprocess.run(
            [sys.executable, "-c", WORKER, str(N), name], capture_output=True, text=True, check=True
        )
        row = json.loads(out.stdout)
        print(row)


if __name__ == "__main__":
    main()
