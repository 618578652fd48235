"""Loaded by a benchmarked process whose PYTHONPATH starts with this folder (bench/scaling.py sets it):
SIGUSR2 starts tracing allocations (after start-up, which tracing would slow past its health check's
deadline); SIGUSR1 writes a tracemalloc snapshot to BENCH_SNAPSHOT, so that the benchmark can say which
code holds the memory that grows with the number of environments, and next to it (BENCH_SNAPSHOT +
".types.json") how many objects of each type the garbage collector tracks, which names what holds
that memory (kopf's per-object records, our caches) where an allocation site alone does not."""

from __future__ import annotations

import collections
import gc
import json
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
        gc.collect()  # what is garbage already is not what grows
        types = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
        with open(_TARGET + ".types.json", "w") as out:
            json.dump(dict(types), out)
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(_TARGET + ".tmp")
        else:  # not traced (a plain run that wants the type counts): an empty snapshot
            tracemalloc.start(1)
            tracemalloc.take_snapshot().dump(_TARGET + ".tmp")
            tracemalloc.stop()
        os.replace(_TARGET + ".tmp", _TARGET)  # the benchmark waits for the file to appear whole

    signal.signal(signal.SIGUSR2, _start)
    signal.signal(signal.SIGUSR1, _dump)
