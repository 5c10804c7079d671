"""Process-wide settings of the worker's long-running processes (the decode stage and each sink)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import signal
import sys

# Allocations between two young-generation collections (CPython's default is 700). A sink batch holds
# thousands of records with a few dicts each, so at the default the collector ran every few dozen records
# and re-examined the batch each time; the records form no cycles and are freed by reference counting.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Once the process is set up: what start-up loaded (modules, clients, schemas) moves out of the
    collector's reach (``gc.freeze``) and young collections run far less often. Cycles are still found,
    only later."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """This process gets SIGTERM when the worker that spawned it dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
