"""The CPU probe every benchmark takes around its samples.

A fixed amount of pure-Python work, timed before and after every sample: on a quiet
machine its time is steady; when another process or the hypervisor takes the CPUs it
grows, and the sample next to it is not to be trusted.  Reported as `cpu_probe_ms`.
"""

from __future__ import annotations

import time

PROBE_LOOPS = 200_000


def cpu_probe() -> float:
    """Milliseconds this process takes for PROBE_LOOPS iterations of a trivial loop."""
    start = time.perf_counter()
    total = 0
    for i in range(PROBE_LOOPS):
        total += i
    return round((time.perf_counter() - start) * 1000, 2)
