"""Ctrl-C and SIGTERM while worker threads run: raised only where the main thread holds no lock.

CPython runs a signal handler between two bytecodes of the main thread, so the KeyboardInterrupt it
raises can land just after a `queue.Queue`'s lock was taken and before the `with` that releases it is
entered. The clean-up that follows then waits on that lock forever (a bake hung after SIGTERM this way).
Inside `deferred()` the handlers only note the signal, and `check()` raises KeyboardInterrupt at the
points the writer chooses; waits poll `check()` every POLL seconds.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

POLL = 0.05                 # seconds: how soon a deferred Ctrl-C is noticed while the main thread waits
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_handlers: dict = {}        # inside deferred(): the handlers it stands in for
_noted: list[int] = []      # signals received inside deferred(), not yet handled


def _note(signum, frame):
    _noted.append(signum)


def check() -> None:
    """Run the handlers of the signals noted so far (Ctrl-C's raises KeyboardInterrupt, as does ckptbend's
    SIGTERM handler); call only where the main thread holds no lock."""
    while _noted:
        signum = _noted.pop(0)
        _handlers[signum](signum, None)


@contextmanager
def deferred():
    """Note SIGINT/SIGTERM instead of handling them at once; handle them at check() or, at the latest, on
    leaving. Signals whose handler is not a Python function (ignored, or the default that ends the
    process) stay as they are, and so does everything off the main thread (where Python sets no handlers)."""
    if _handlers or threading.current_thread() is not threading.main_thread():
        yield       # nested, or off the main thread: nothing to defer here
        return
    for s in SIGNALS:
        if callable(signal.getsignal(s)):
            _handlers[s] = signal.signal(s, _note)
    try:
        yield
        check()     # a signal that came after the last check is not lost
    finally:
        for s, h in _handlers.items():
            signal.signal(s, h)
        _handlers.clear()
        _noted.clear()
