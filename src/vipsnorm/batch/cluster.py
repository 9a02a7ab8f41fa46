"""Running tasks on a Dask cluster: a local one sized to the machine, or one given by address or client.

Only this module imports Dask, and :mod:`vipsnorm.batch.run` imports it only when a cluster is used.

The local cluster uses worker *processes* started with ``spawn`` (never ``fork``: libvips in a forked
child of a process that has already computed pixels can deadlock on its thread pool), one thread each,
and as many libvips threads as leave the machine's cores busy without oversubscribing them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dask
from distributed import Client, Future, KilledWorker, LocalCluster, as_completed
from distributed.diagnostics.plugin import WorkerPlugin

from ..errors import VipsnormError

__all__ = ["VipsSettings", "DaskRunner", "start_local", "connect", "local_size", "machine"]

#: Times a worker may die while running one task of a local cluster before the scheduler gives up on the
#: task (its ``allowed-failures``; a cluster given with ``--scheduler`` keeps its own setting, default 3).
#: Then each of the task's files is tried alone (:meth:`DaskRunner.run`). The same number bounds how often
#: a task whose result was lost, or that the scheduler dropped, is submitted again.
ALLOWED_FAILURES = 1
#: Retries of a task that raised (files never raise: their errors are results; this is for the rest).
RETRIES = 1
#: Seconds the cluster may have no worker while tasks wait before a line on stderr says so.
WAIT_NOTICE = 5.0
#: The error of a file whose worker died every time it ran (alone, the last times).
_DIED = "the worker process died on every attempt at this file (a decoder crash, or out of memory)"
#: The error of a file whose task's result was lost every time: the worker holding it died before this
#: client fetched it (the task itself had finished).
_LOST = (
    "the worker process holding this file's finished result died before it was fetched, on every attempt "
    "(workers kept dying: out of memory, or killed)"
)
#: The error of a file whose task the scheduler dropped every time (a task it no longer knows of).
_DROPPED = "the Dask scheduler dropped this file's task on every attempt (it restarted, or forgot the task)"
#: Memory a local worker is given room for: a slide job peaks at about 400 MB (README, Performance).
WORKER_MEMORY = 1 << 30
#: Tasks kept submitted per worker thread: enough that no worker waits for the next one.
WINDOW_PER_THREAD = 2


def machine() -> tuple[int, int]:
    """Usable cores and total memory in bytes."""
    import psutil

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    return max(1, cpus), int(psutil.virtual_memory().total)


def local_size(n_files: int, workers: int | None = None) -> tuple[int, int]:
    """Worker processes and libvips threads per worker for a local cluster.

    Without ``workers``: one process per core, no more than there are files, and no more than memory
    holds at :data:`WORKER_MEMORY` each. libvips gets the cores left over (a few large slides on a big
    machine still use every core).
    """
    cpus, memory = machine()
    if workers is None:
        workers = max(1, min(cpus, n_files, memory // WORKER_MEMORY))
    if workers < 1:
        raise ValueError(f"a local cluster needs at least 1 worker (0 runs in this process), not {workers}")
    return workers, max(1, cpus // workers)


class VipsSettings(WorkerPlugin):
    """libvips settings in every worker, present and future: threads per image and the operation cache.

    Parameters
    ----------
    concurrency : int, optional
        libvips threads per image. Default: ``VIPS_CONCURRENCY`` if the worker's environment sets it,
        else the cores the worker may use divided by its Dask threads (right for one worker process per
        machine; with several, set ``VIPS_CONCURRENCY`` in the workers' environment).
    cache_mem, cache_files : int
        The operation cache's memory and open-file limits. A batch never reads a file twice, so the
        cache only needs to serve one pipeline; libvips' defaults (100 MB, 100 files) multiplied by
        dozens of workers on a node would hold memory and file handles for nothing.
    """

    name = "vipsnorm-libvips"
    idempotent = False

    def __init__(self, concurrency: int | None = None, cache_mem: int = 64 << 20, cache_files: int = 16):
        self.concurrency = concurrency
        self.cache_mem = cache_mem
        self.cache_files = cache_files

    def setup(self, worker) -> None:
        import pyvips

        threads = self.concurrency or int(os.environ.get("VIPS_CONCURRENCY") or 0)
        if not threads:
            threads = max(1, machine()[0] // max(1, getattr(worker, "nthreads", 1)))
        pyvips.concurrency_set(threads)
        pyvips.cache_set_max_mem(self.cache_mem)
        pyvips.cache_set_max_files(self.cache_files)


def start_local(n_workers: int, vips_threads: int) -> tuple[Client, LocalCluster]:
    """A local cluster of ``n_workers`` spawned processes with one thread each, and a client."""
    settings = {
        "distributed.worker.multiprocessing-method": "spawn",
        "distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
        # Dask sets MALLOC_TRIM_THRESHOLD_=65536 in its workers: glibc then hands freed memory back to the
        # system at once, and libvips, which frees and allocates large buffers for every image, runs about
        # 35% slower (measured on 512 px JPEGs). The worker's memory limit still guards against growth.
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    }
    try:
        with dask.config.set(settings):
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",  # a free port: 8787 may be another cluster's
                silence_logs=logging.ERROR,
                env={"VIPS_CONCURRENCY": str(vips_threads)},
            )
            client = Client(cluster)
    except Exception as exc:
        cause = f"cannot start a local Dask cluster ({type(exc).__name__}: {exc}); try --workers 0"
        raise VipsnormError(None, cause) from exc
    return client, cluster


def connect(scheduler: str, timeout: float = 30.0) -> Client:
    """A client of the cluster at ``scheduler``: an address (``tcp://host:port``) or a scheduler file."""
    try:
        if "://" not in scheduler and os.path.isfile(scheduler):
            client = Client(scheduler_file=scheduler, timeout=timeout)
        else:
            client = Client(scheduler, timeout=timeout)
    except Exception as exc:  # OSError, TimeoutError, ValueError for a bad address
        raise VipsnormError(
            None,
            f"cannot reach the Dask scheduler {scheduler} ({type(exc).__name__}: {exc}); "
            "check --scheduler or VIPSNORM_SCHEDULER",
        ) from exc
    return client


@dataclass
class _Task:
    """A task of :meth:`DaskRunner.run` in flight: its future, its items, and what it has been through."""

    future: Future
    group: list
    #: a file run alone, after a worker died while its task ran (see :meth:`DaskRunner.run`)
    suspect: bool
    #: times this task's result was lost or the scheduler dropped it (each time it was submitted again)
    drops: int = 0


def _outcome(future: Future) -> tuple[str, object]:
    """``("finished", result)``, ``("error", exception)``, or the status of a future that is neither
    (``lost``, ``cancelled``, ``pending``) and nothing.

    The status is read again after a failed fetch: a future can be lost, erred or dropped between
    ``as_completed`` handing it over and its result arriving here.
    """
    if future.status == "finished":
        try:
            return "finished", future.result()
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 (FutureCancelledError is no Exception)
            if future.status == "finished":  # fetched, but unreadable here
                return "error", exc
    if future.status == "error":
        return "error", future.exception()
    return future.status, None


class DaskRunner:
    """Runs tasks on a Dask cluster, keeping only a window of them submitted at a time.

    The window (:data:`WINDOW_PER_THREAD` tasks per worker thread, re-read every few seconds as
    workers join or leave) bounds what the scheduler and this client hold, however many files the
    batch has, and what a killed client loses.
    """

    def __init__(
        self,
        client: Client,
        cluster: LocalCluster | None = None,
        *,
        owned: bool = False,
        description: str = "",
        settings: VipsSettings | None = None,
    ):
        self.client = client
        self.cluster = cluster
        self.owned = owned
        self.description = description or f"Dask cluster at {client.scheduler.address}"
        self._prefix = f"vipsnorm-{os.getpid()}-{time.time_ns()}"
        self._allowed_failures: int | None = None
        client.register_plugin(settings or VipsSettings())  # every worker, and those that join later

    def threads(self) -> int:
        """Worker threads in the cluster now (0 while none has joined)."""
        return int(sum(self.client.nthreads().values()))

    def allowed_failures(self) -> int:
        """The scheduler's ``allowed-failures``: how often a task may lose its worker before it is given up.

        Read from the scheduler itself (its configuration, not this process's, is the one that counts);
        Dask's default when the scheduler does not run functions sent to it.
        """
        if self._allowed_failures is None:
            try:
                # a function of this module would travel by reference: the scheduler may lack vipsnorm
                value = self.client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
            except Exception:  # noqa: BLE001 (pickled functions refused, an old scheduler: use the default)
                value = dask.config.get("distributed.scheduler.allowed-failures", 3)
            self._allowed_failures = max(0, int(value))
        return self._allowed_failures

    def run(
        self,
        fn: Callable,
        job,
        groups: Sequence[list],
        on_results: Callable[[list], None],
        fail: Callable[[object, str], object],
    ) -> None:
        """Run ``fn(job, group)`` for every group; pass each returned list to ``on_results`` as it arrives.

        Worker deaths: the scheduler reruns a task whose worker died, up to its ``allowed-failures``,
        then reports ``KilledWorker``. But a dying worker charges every task assigned to it, not only
        the one it was running, so ``KilledWorker`` only makes a file a *suspect*: the tasks in flight
        are let finish, no new work is submitted, and each suspect is run again alone, one at a time.
        Only a file whose worker dies again when it is the only task of this batch in flight ends as an
        error (``fail(item, cause)``); its innocent companions finish normally, and then the rest of the
        batch goes on.

        A worker that dies *after* finishing a task, before this client fetched the result, leaves the
        task ``lost``; a task the scheduler forgot (it restarted) is ``cancelled``. Neither is final
        and neither produced results this client saw, so the task is submitted again under a fresh
        key (the old one released, so that its results can never arrive as well), up to
        :meth:`allowed_failures` times: the scheduler's count of deaths belongs to a key and starts
        again with the new one, so these are counted here. A task that runs out of them is treated as
        after ``KilledWorker``: its files become suspects, and a suspect that runs out of them too is an
        error (``lost``: the worker died right after each solo run; ``cancelled``: the scheduler kept
        dropping it). Only a client that lost its scheduler for good ends the run (``VipsnormError``).

        While tasks wait on a cluster with no worker (none started yet, or all gone), a line on stderr
        says so after :data:`WAIT_NOTICE` seconds, once until workers are back; the run keeps waiting.
        """
        pending = deque(groups)
        suspects: deque = deque()
        running: dict[str, _Task] = {}
        futures = as_completed()
        keys = itertools.count()
        budget = self.allowed_failures()
        window, checked = 0, 0.0
        idle_since: float | None = None
        told, watched = False, 0.0

        def submit(group: list, suspect: bool, drops: int = 0) -> None:
            future = self.client.submit(fn, job, group, key=f"{self._prefix}-{next(keys)}", pure=False, retries=RETRIES)
            running[future.key] = _Task(future, group, suspect, drops)
            futures.add(future)

        def top_up() -> None:
            nonlocal window, checked
            if time.monotonic() - checked > 2.0:
                window, checked = max(4, WINDOW_PER_THREAD * self.threads()), time.monotonic()
            if suspects:
                # a dying worker charges every task it held, so a suspect is judged alone: nothing else
                # of this batch is submitted until the suspects are cleared, one at a time
                if not running:
                    submit([suspects.popleft()], True)
                return
            while pending and len(running) < window:
                submit(pending.popleft(), False)

        def watch_workers() -> None:
            """Say once on stderr when tasks have waited :data:`WAIT_NOTICE` s on a cluster with no worker."""
            nonlocal idle_since, told
            try:
                idle = not self.client.nthreads()
            except Exception:  # noqa: BLE001 (the connection is being re-established: the futures will say)
                return
            if not idle:
                idle_since, told = None, False
            elif idle_since is None:
                idle_since = time.monotonic()
            elif not told and time.monotonic() - idle_since >= WAIT_NOTICE:
                told = True
                # waiting on is right for clusters whose workers are batch jobs still queued, or that
                # scale up from zero when work arrives: no timeout suits them all, so the user decides
                print(
                    f"vipsnorm: waiting for workers on {self.client.scheduler.address}: the Dask cluster has "
                    "none; the batch goes on when one joins (Ctrl-C stops it, running it again resumes)",
                    file=sys.stderr,
                    flush=True,
                )

        def next_done() -> Future | None:
            """The next future done, or None when there is none left; watches the workers meanwhile."""
            nonlocal watched
            while not futures.has_ready():
                if futures.is_empty():
                    return None
                if time.monotonic() - watched >= 1.0:  # a round trip to the scheduler: not every 0.1 s
                    watch_workers()
                    watched = time.monotonic()
                # as_completed's own wait: woken when a future is done, or after 0.1 s at most
                condition = getattr(futures, "thread_condition", None)
                if condition is None:
                    time.sleep(0.01)
                    continue
                with condition:
                    condition.wait(timeout=0.1)
            return next(futures)

        def dropped(task: _Task, status: str) -> None:
            """Submit again a task whose result never reached this client; or give up on it."""
            if status == "cancelled":
                # the client's connection to the scheduler broke: it cancels every future, then tries to
                # reconnect for its connection timeout; after a reconnection the tasks can be resubmitted
                while self.client.status == "connecting":
                    time.sleep(0.1)
                if self.client.status != "running":
                    raise VipsnormError(
                        None,
                        "lost the connection to the Dask scheduler (it stopped, or the network failed); "
                        "run the same command again to resume",
                    )
            if task.drops < budget:
                submit(task.group, task.suspect, task.drops + 1)
            elif not task.suspect:
                suspects.extend(task.group)
            else:
                cause = _LOST if status in ("lost", "pending") else _DROPPED
                on_results([fail(task.group[0], cause)])

        top_up()
        try:
            while (future := next_done()) is not None:
                task = running.get(future.key)
                if task is None or task.future is not future:  # as_completed hands each future once; be sure
                    continue
                del running[future.key]
                status, value = _outcome(future)
                # released before anything is resubmitted: a lost key is rerun by the scheduler while
                # this client wants it, and its results must not arrive beside those of the new key
                future.release()
                if status == "finished":
                    on_results(value)
                elif status == "error":
                    if isinstance(value, KilledWorker) and not task.suspect:
                        suspects.extend(task.group)
                    elif isinstance(value, KilledWorker):
                        on_results([fail(task.group[0], _DIED)])
                    else:
                        cause = f"the task failed on the worker ({type(value).__name__}: {value})"
                        on_results([fail(item, cause) for item in task.group])
                else:
                    dropped(task, status)
                top_up()
        finally:
            # a client that lost its scheduler cannot cancel; its futures are cancelled already
            if running and self.client.status == "running":
                self.client.cancel([t.future for t in running.values()], force=True)

    def close(self) -> None:
        if self.owned:
            self.client.close()
            if self.cluster is not None:
                self.cluster.close()
