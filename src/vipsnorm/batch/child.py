"""One worker process, for batches too small to be worth a Dask cluster.

A batch of one task (a single slide, or a few dozen small images) would wait longer for a local cluster
to start (0.5-3 s) than it runs, so it runs in one child Python process instead (about 0.3 s to start).
A child rather than this process, because a decoder crash (a segmentation fault in a codec on a corrupt
file) or the kernel's out-of-memory killer takes the whole process with it: in a child it costs only the
file being read. The file is tried again in a fresh child, and if that child dies too, the file is
recorded as an error and the batch goes on, as on a cluster (:class:`vipsnorm.batch.cluster.DaskRunner`).

The child is started as a new Python running :func:`main` (never forked: libvips in a child forked
from a process that has computed pixels can hang, and ``multiprocessing``'s spawn would re-import the
caller's main script); the two file descriptors carry pickled messages. The task function and its job
are sent once, then one file at a time: the child answers with the function's result, and a death
between a request and its answer is a crash on that file.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

__all__ = ["ChildRunner", "WORKER_ENV"]

#: Set in the child's environment: the manifest's ``worker`` column says which process ran a file.
WORKER_ENV = "VIPSNORM_WORKER_PROCESS"
#: Times a file is run again in a fresh child after its child died on it.
RETRIES = 1


#: What the child runs (``-c`` rather than ``-m``: this module is already imported with the package).
_START = "import sys; from vipsnorm.batch.child import main; sys.exit(main())"


class _Died(Exception):
    """The child ended without answering."""


class _Unusable(Exception):
    """The job cannot be run in a child (it does not pickle, or the child cannot import it)."""


def _death(returncode: int | None) -> str:
    if returncode is None:
        return "it stopped answering"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _stderr_fd() -> int:
    try:
        return sys.__stderr__.fileno()
    except (AttributeError, OSError, ValueError):  # no real standard error (an embedding application)
        return subprocess.DEVNULL


class _Child:
    """A started child process and the two ends of its pipes."""

    def __init__(self, payload: bytes):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _START, str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                stdout=_stderr_fd(),  # stray prints must not mix with the caller's output (--json lines)
                env={**os.environ, WORKER_ENV: "1"},
            )
        except OSError as exc:
            for fd in (to_child_w, from_child_r):
                os.close(fd)
            raise _Unusable(f"cannot start it: {exc}") from exc
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.send = Connection(to_child_w, readable=False)
        self.recv = Connection(from_child_r, writable=False)
        try:
            status, detail = self.call(("setup", list(sys.path), payload))
        except _Died as died:
            raise _Unusable(f"it ended while starting ({died})") from died
        if status != "ready":
            self.close()
            raise _Unusable(detail)

    def call(self, message) -> tuple:
        try:
            self.send.send(message)
            return self.recv.recv()
        except (EOFError, OSError) as exc:
            try:
                returncode = self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                returncode = None
            self.close()
            raise _Died(_death(returncode)) from exc

    def close(self) -> None:
        for conn in (self.send, self.recv):
            conn.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class ChildRunner:
    """Runs every file of a batch in one child process, one file at a time, in input order.

    Same interface as :class:`vipsnorm.batch.cluster.DaskRunner` (``run``, ``threads``, ``close``,
    ``description``). A job that cannot run in a child (its method is a class defined in the caller's
    ``__main__``, say) runs in this process instead, as ``--workers 0`` does.
    """

    description = "1 worker process"

    def __init__(self) -> None:
        self._child: _Child | None = None

    def threads(self) -> int:
        return 1

    def run(
        self,
        fn: Callable,
        job,
        groups: Sequence[list],
        on_results: Callable[[list], None],
        fail: Callable[[object, str], object],
    ) -> None:
        items = sorted((item for group in groups for item in group), key=lambda item: item.index)
        try:
            payload = pickle.dumps((fn, job))
        except Exception:  # not picklable: nothing a child could run
            payload = None
        for item in items:
            if payload is not None:
                try:
                    on_results(self._run_one(payload, item, fail))
                    continue
                except _Unusable:
                    payload = None
            self.description = "in-process"
            on_results(fn(job, [item]))

    def _run_one(self, payload: bytes, item, fail) -> list:
        cause = ""
        for _ in range(1 + RETRIES):
            if self._child is None:
                self._child = _Child(payload)
            try:
                status, value = self._child.call(("run", item))
            except _Died as died:
                self._child = None
                cause = str(died)
                continue
            if status == "ok":
                return value
            return [fail(item, f"the task failed in the worker process ({value})")]
        return [fail(item, f"the worker process died on every attempt at this file ({cause}: a decoder crash, or out of memory)")]

    def close(self) -> None:
        if self._child is not None:
            self._child.close()
            self._child = None


def _serve(read_fd: int, write_fd: int) -> int:
    """The child's loop: set up from the first message, then answer one request per file."""
    recv = Connection(read_fd, writable=False)
    send = Connection(write_fd, readable=False)
    fn = job = None
    while True:
        try:
            message = recv.recv()
        except (EOFError, OSError):  # the parent is gone
            return 0
        if message[0] == "setup":
            _, path, payload = message
            sys.path[:] = path + [p for p in sys.path if p not in path]
            try:
                fn, job = pickle.loads(payload)
            except Exception as exc:
                send.send(("unusable", f"{type(exc).__name__}: {exc}"))
                return 0
            send.send(("ready", None))
        else:
            _, item = message
            try:
                reply = ("ok", fn(job, [item]))
            except Exception as exc:  # the function turns file errors into results: this is a bug
                reply = ("error", f"{type(exc).__name__}: {exc}")
            send.send(reply)


def main() -> int:
    """Entry point of the child (``python -c`` :data:`_START` ``IN OUT``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C in the terminal: end quietly with the parent
    return _serve(int(sys.argv[1]), int(sys.argv[2]))
