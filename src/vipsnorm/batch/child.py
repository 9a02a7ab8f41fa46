"""One worker process, for batches too small to be worth a Dask cluster.

A batch of one task (a single slide, or a few dozen small images) would wait longer for a local cluster
to start (0.5-3 s) than it runs, so it runs in one child Python process instead (about 0.3 s to start).
A child rather than this process, because a decoder crash (a segmentation fault in a codec on a corrupt
file) or the kernel's out-of-memory killer takes the whole process with it: in a child it costs only the
file being read. The file is tried again in a fresh child, and if that child dies too, the file is
recorded as an error and the batch goes on, as on a cluster (:class:`vipsnorm.batch.cluster.DaskRunner`).

The child is started as a new Python running :func:`main` (never forked: libvips in a child forked
from a process that has computed pixels can hang, and ``multiprocessing``'s spawn would re-import the
caller's main script). Two pipes carry pickled messages: the task function and its job are sent once,
then one file at a time; the child answers with the function's result, and a death between a request
and its answer is a crash on that file. A third pipe is only held open by this process: when this
process dies (killed, say), the child sees it close and ends itself at once, so that it never goes on
writing outputs that no manifest will record (unless this process forked a copy of itself that still
holds the pipe: use spawn or forkserver with libvips anyway).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

__all__ = ["ChildRunner", "WORKER_ENV"]

#: Set in the child's environment: the manifest's ``worker`` column says which process ran a file.
WORKER_ENV = "VIPSNORM_WORKER_PROCESS"
#: Times a file is run again in a fresh child after its child was killed (by a signal) on it.
RETRIES = 1
#: Exit status of a child that ends itself because its parent died.
_ORPHANED = 3


#: What the child runs (``-c`` rather than ``-m``: this module is already imported with the package).
_START = "import sys; from vipsnorm.batch.child import main; sys.exit(main())"


class _Died(Exception):
    """The child ended without answering (``returncode``: as :attr:`subprocess.Popen.returncode`, or
    None when it had to be killed)."""

    def __init__(self, returncode: int | None):
        super().__init__(_death(returncode))
        self.returncode = returncode

    @property
    def crashed(self) -> bool:
        """Killed by a signal (a segmentation fault, the out-of-memory killer) or hung: worth a retry. An
        exit status is an error of the child's own, the same every time."""
        return self.returncode is None or self.returncode < 0


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
    """A started child process and this side of its three pipes: requests, answers, and a "life" pipe
    that this process only holds open, so that the child ends itself when it closes (this process
    died: the child must not go on writing outputs nobody will record)."""

    def __init__(self, payload: bytes):
        requests, answers, life = os.pipe(), os.pipe(), os.pipe()
        theirs = (requests[0], answers[1], life[0])
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _START, *map(str, theirs)],
                pass_fds=theirs,
                stdin=subprocess.DEVNULL,
                stdout=_stderr_fd(),  # stray prints must not mix with the caller's output (--json lines)
                env={**os.environ, WORKER_ENV: "1"},
            )
        except Exception as exc:
            for fd in (requests[1], answers[0], life[1]):
                os.close(fd)
            raise _Unusable(f"cannot start it: {exc}") from exc
        finally:
            for fd in theirs:
                os.close(fd)
        self._life: int | None = life[1]
        self.send = Connection(requests[1], readable=False)
        self.recv = Connection(answers[0], writable=False)
        try:
            status, detail = self.call(("setup", list(sys.path), payload))
        except _Died as died:
            raise _Unusable(f"it ended while starting ({died})") from died
        except BaseException:  # Ctrl-C while it starts
            self.close()
            raise
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
            raise _Died(returncode) from exc

    def close(self) -> None:
        for conn in (self.send, self.recv):
            conn.close()
        if self._life is not None:
            os.close(self._life)
            self._life = None
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
    ``__main__``, say: the first child cannot import it) runs in this process instead, as ``--workers 0``
    does. Once a child has run, a file is never run in this process: if no new child can be started
    after a crash, the file is an error.
    """

    description = "1 worker process"

    def __init__(self) -> None:
        self._child: _Child | None = None
        self._started = False

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
                except _Unusable as exc:
                    if self._started:
                        on_results([fail(item, f"no worker process could be started for this file ({exc})")])
                        continue
                    payload = None
            self.description = "in-process"
            on_results(fn(job, [item]))

    def _run_one(self, payload: bytes, item, fail) -> list:
        deaths: list[_Died] = []
        while True:
            if self._child is None:
                try:
                    self._child = _Child(payload)
                except _Unusable as exc:
                    if not deaths:
                        raise
                    cause = f"the worker process died on this file ({deaths[-1]}) and no new one could be started ({exc})"
                    return [fail(item, cause)]
                self._started = True
            try:
                status, value = self._child.call(("run", item))
            except _Died as died:
                self._child = None
                deaths.append(died)
                if died.crashed and len(deaths) <= RETRIES:
                    continue
                break
            if status == "ok":
                return value
            return [fail(item, f"the task failed in the worker process ({value})")]
        if deaths[-1].crashed:
            cause = f"the worker process died on every attempt at this file ({deaths[-1]}: a decoder crash, or out of memory)"
        else:
            cause = f"the worker process ended on this file ({deaths[-1]})"
        return [fail(item, cause)]

    def close(self) -> None:
        if self._child is not None:
            self._child.close()
            self._child = None


def _watch(life: int) -> None:
    """End this child as soon as its parent's end of the life pipe closes."""
    while True:
        try:
            if os.read(life, 1):
                continue
        except InterruptedError:
            continue
        except OSError:
            pass
        os._exit(_ORPHANED)


def _serve(read_fd: int, write_fd: int) -> int:
    """The child's loop: set up from the first message, then answer one request per file."""
    recv = Connection(read_fd, writable=False)
    send = Connection(write_fd, readable=False)
    fn = job = None
    while True:
        try:
            data = recv.recv_bytes()
        except (EOFError, OSError):  # the parent is gone
            return 0
        try:
            message = pickle.loads(data)
        except Exception as exc:
            send.send(("unusable" if fn is None else "error", f"cannot read the task ({type(exc).__name__}: {exc})"))
            if fn is None:
                return 0
            continue
        if message[0] == "setup":
            _, path, payload = message
            sys.path[:] = path + [p for p in sys.path if p not in path]
            try:
                fn, job = pickle.loads(payload)
            except Exception as exc:
                send.send(("unusable", f"{type(exc).__name__}: {exc}"))
                return 0
            send.send(("ready", None))
            continue
        _, item = message
        try:
            reply = ("ok", fn(job, [item]))
        except Exception as exc:  # the function turns file errors into results: this is a bug
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            send.send(reply)  # pickled whole before anything is written
        except (EOFError, OSError):
            return 0
        except Exception as exc:  # a result that does not pickle
            send.send(("error", f"its result cannot be sent back ({type(exc).__name__}: {exc})"))


def main() -> int:
    """Entry point of the child (``python -c`` :data:`_START` ``REQUESTS ANSWERS LIFE``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C in the terminal: end quietly with the parent
    fds = [int(a) for a in sys.argv[1:4]]
    for fd in fds:  # inherited through pass_fds: never pass them on (a helper a codec starts, say)
        os.set_inheritable(fd, False)
    threading.Thread(target=_watch, args=(fds[2],), daemon=True).start()
    return _serve(fds[0], fds[1])
