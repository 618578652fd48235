"""Loaded by a benchmarked process whose PYTHONPATH starts with this folder (bench/scaling.py sets it):
SIGUSR2 starts tracing allocations (after start-up, which tracing would slow past its health check's
deadline); SIGUSR1 writes a tracemalloc snapshot to BENCH_SNAPSHOT, so that the benchmark can say which
code holds the memory that grows with the number of environments."""

from __future__ import annotations

import os
import signal
import tracemalloc
from types import FrameType

_TARGET = os.environ.get("BENCH_SNAPSHOT")

if _TARGET:

    def _start(signum: int, frame: FrameType | None) -> None:
        # Enough frames to see past the stdlib's containers to the code that asked for the memory.
        tracemalloc.start(int(os.environ.get("BENCH_FRAMES", "8")))

    def _dump(signum: int, frame: FrameType | None) -> None:
        assert _TARGET is not None
        tracemalloc.take_snapshot().dump(_TARGET + ".tmp")
        os.replace(_TARGET + ".tmp", _TARGET)  # the benchmark waits for the file to appear whole

    signal.signal(signal.SIGUSR2, _start)
    signal.signal(signal.SIGUSR1, _dump)
