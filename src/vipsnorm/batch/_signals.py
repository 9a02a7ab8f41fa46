"""SIGTERM during a batch: the same clean-up as Ctrl-C, then the end SIGTERM asked for.

``timeout``, SLURM (at its walltime or ``scancel``), ``docker stop`` and most process managers end a
process with SIGTERM, whose default action ends it at once: no ``finally`` runs, so the run's marker
(``.vipsnorm-run-KEY``), a temporary output and, on a local cluster, the in-flight tasks' outputs are
left to the next run. :func:`terminate_as_interrupt` turns SIGTERM into :class:`Terminated` (a
:class:`KeyboardInterrupt`) for the length of a run, so the clean-up of Ctrl-C runs, then ends the
process with SIGTERM all the same (its default action, restored): whoever sent it sees the process
end of it (exit status 143 in a shell).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

__all__ = ["Terminated", "terminate_as_interrupt"]


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived during a batch (raised in the main thread, as Ctrl-C raises KeyboardInterrupt)."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """For the length of the ``with`` block, SIGTERM raises :class:`Terminated` in the main thread; on
    the way out the previous handler is restored and, if SIGTERM came, it is sent again, so that the
    process ends of it once the block's clean-up is done.

    Does nothing outside the main thread (only it can handle signals) or when SIGTERM already has a
    handler of the program's own (or is ignored): that one decides. Blocks may nest: only the
    outermost installs the handler.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return
    received = False

    def handler(signum, frame):
        nonlocal received
        if received:  # the clean-up of the first is under way: let it finish
            return
        received = True
        raise Terminated("terminated (SIGTERM)")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if received:
            os.kill(os.getpid(), signal.SIGTERM)  # the default action now: the process ends of it
