"""Running tasks on a Dask cluster: a local one sized to the machine, or one given by address or client.

Only this module imports Dask, and :mod:`vipsnorm.batch.run` imports it only when a cluster is used.

The local cluster uses worker *processes* started with ``spawn`` (never ``fork``: libvips in a forked
child of a process that has already computed pixels can deadlock on its thread pool), one thread each,
and as many libvips threads as leave the machine's cores busy without oversubscribing them.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence

import dask
from distributed import Client, KilledWorker, LocalCluster, as_completed
from distributed.diagnostics.plugin import WorkerPlugin

from ..errors import VipsnormError

__all__ = ["VipsSettings", "DaskRunner", "start_local", "connect", "local_size", "machine"]

#: Times a worker may die while running one task of a local cluster before the scheduler gives up on the
#: task (its ``allowed-failures``; a cluster given with ``--scheduler`` keeps its own setting, default 3).
#: Then each of the task's files is tried alone (:meth:`DaskRunner.run`).
ALLOWED_FAILURES = 1
#: Retries of a task that raised (files never raise: their errors are results; this is for the rest).
RETRIES = 1
#: The error of a file whose worker died every time it ran (alone, the last times).
_DIED = "the worker process died on every attempt at this file (a decoder crash, or out of memory)"
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
        client.register_plugin(settings or VipsSettings())  # every worker, and those that join later

    def threads(self) -> int:
        """Worker threads in the cluster now (0 while none has joined)."""
        return int(sum(self.client.nthreads().values()))

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
        """
        pending = deque(groups)
        suspects: deque = deque()
        running: dict[str, tuple[object, list, bool]] = {}
        futures = as_completed()
        keys = itertools.count()
        window, checked = 0, 0.0

        def submit(group: list, suspect: bool) -> None:
            future = self.client.submit(fn, job, group, key=f"{self._prefix}-{next(keys)}", pure=False, retries=RETRIES)
            running[future.key] = (future, group, suspect)
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

        top_up()
        try:
            for future in futures:
                _, group, suspect = running.pop(future.key)
                if future.status == "finished":
                    on_results(future.result())
                elif future.status == "error":
                    exc = future.exception()
                    if isinstance(exc, KilledWorker) and not suspect:
                        suspects.extend(group)
                    elif isinstance(exc, KilledWorker):
                        on_results([fail(group[0], _DIED)])
                    else:
                        cause = f"the task failed on the worker ({type(exc).__name__}: {exc})"
                        on_results([fail(item, cause) for item in group])
                else:
                    raise VipsnormError(
                        None,
                        f"the Dask scheduler dropped this batch's tasks ({future.status}: it restarted, or the "
                        "connection was lost); run the same command again to resume",
                    )
                future.release()
                top_up()
        finally:
            if running:
                self.client.cancel([f for f, _, _ in running.values()], force=True)

    def close(self) -> None:
        if self.owned:
            self.client.close()
            if self.cluster is not None:
                self.cluster.close()
