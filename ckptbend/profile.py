"""Per-phase wall time of a command, printed to stderr when CKPTBEND_PROFILE=1 (bin/bench --profile).

Phases on worker threads overlap the main thread's, so they do not add up to the total; "waiting for …"
phases are where the main thread stood idle, i.e. what lies on the critical path.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

_seconds: dict[str, float] = {}
_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get("CKPTBEND_PROFILE", "") not in ("", "0")


def add(name: str, seconds: float) -> None:
    with _lock:
        _seconds[name] = _seconds.get(name, 0.0) + seconds


@contextmanager
def phase(name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - start)


def report(total: float) -> None:
    """Print the phases in the order they first ended, then the total (one line each, machine-readable)."""
    if not enabled():
        return
    for name, seconds in _seconds.items():
        print(f"profile\t{name}\t{seconds:.3f}", file=sys.stderr)
    print(f"profile\ttotal\t{total:.3f}", file=sys.stderr)
