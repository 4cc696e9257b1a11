"""A graceful stop: SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption) ends a run after the
meta-iteration under way, as a requested stop rather than a crash.

The first signal only asks :class:`~bilevel_maml.engine.MetaEngine` to stop: it finishes the current
meta-iteration, agrees with every other rank on the iteration to stop at, and ends the way a
finished run does (``on_train_end``: the checkpointer writes ``last.pt``). A second Ctrl-C stops at
once with :class:`StoppedAtOnce`; the last checkpoint written is still intact, since every write is
atomic. Not counted as that second Ctrl-C: a SIGINT within :data:`SAME_PRESS_SECONDS` of the first
(torchrun forwards the terminal's Ctrl-C to its workers, which got it already), and any repeated
SIGTERM (schedulers and launchers repeat theirs). In Python::

    with GracefulStop(engine):
        engine.run()
    if engine.stop_signal is not None: ...   # stopped early, at engine.meta_iteration
"""

from __future__ import annotations

import signal
import threading
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: a SIGINT this soon after the first is the same Ctrl-C delivered twice (torchrun's forwarding)
SAME_PRESS_SECONDS = 1.0


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C during a graceful stop."""

    def __init__(self, signum: int):
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}")
        self.signum = signum


def exit_status(signum: int) -> int:
    """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).

    :param signum: the signal's number.
    """
    return 128 + signum


class GracefulStop:
    """Context manager: while inside, SIGINT and SIGTERM ask ``engine`` to stop after its current
    meta-iteration (``engine.stop_signal`` is set to the signal's number). Outside the main thread,
    where Python cannot handle signals, it does nothing.

    :param engine: the :class:`~bilevel_maml.engine.MetaEngine` to stop.
    """

    def __init__(self, engine):
        self.engine = engine
        self._previous: dict[int, object] = {}
        self._first_at = 0.0

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.engine.stop_signal is not None:
            if signum == signal.SIGINT and now - self._first_at >= SAME_PRESS_SECONDS:
                raise StoppedAtOnce(signum)
            return
        self.engine.stop_signal, self._first_at = signum, now

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False


__all__ = ["GracefulStop", "StoppedAtOnce", "exit_status"]
