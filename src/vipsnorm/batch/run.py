"""Batches: find the inputs, skip what an earlier run finished, run the rest as tasks (on a Dask cluster,
in one child process when the batch is a single task, or in this process), and record every result in
the manifest as it arrives.

Each task is a list of files; a worker opens, fits, applies and writes each of them with
:func:`vipsnorm.engine.normalize_file` (the same unit as for one file) and returns one row per file.
Small images are grouped (up to :data:`GROUP_FILES` files or :data:`GROUP_BYTES` per task, fewer when
there are few files for many workers) so that scheduling costs little next to the work; a whole-slide
file is one task. The client (this process) is the only writer of the manifest.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine import Options, Result, check_fit, fit_reference, normalize_file, summarize_file
from ..errors import InvalidReferenceError, OutputError, VipsnormError
from ..methods import Method, Params
from ..reference import Reference
from .child import WORKER_ENV, ChildRunner
from .inputs import Entry, Item, discover, file_stat, group, output_folder, plan, remove_part_files
from .manifest import Manifest

__all__ = [
    "normalize_batch",
    "fit_batch",
    "BatchSummary",
    "NormalizeJob",
    "default_manifest",
    "config_hash",
    "normalize_items",
    "sample_items",
    "worker_id",
    "SCHEDULER_ENV",
]

#: Environment variable naming the Dask scheduler to use when none is given (``tcp://host:port`` or a
#: scheduler file).
SCHEDULER_ENV = "VIPSNORM_SCHEDULER"
#: Most files in one task.
GROUP_FILES = 64
#: Most input bytes in one task of small files.
GROUP_BYTES = 64 << 20
#: Files at least this large are a task of their own (and every whole-slide format, whatever its size).
SOLO_BYTES = 16 << 20
#: Tasks per worker thread at least, when there are few files (so that every worker gets some).
TASKS_PER_THREAD = 4


# --------------------------------------------------------------------------------------------------
# what runs on a worker


@dataclass(frozen=True)
class NormalizeJob:
    """What every file of a normalize batch shares (sent with each task; a few kB)."""

    out_root: str
    method: Method
    params: Params | None
    options: Options


def worker_id() -> str:
    """Who runs this: the Dask worker's address, ``worker process PID`` (a :class:`ChildRunner`'s
    child), or ``in-process``."""
    distributed = sys.modules.get("distributed")
    if distributed is not None:
        try:
            return distributed.get_worker().address
        except ValueError:  # not inside a worker
            pass
    if os.environ.get(WORKER_ENV):
        return f"worker process {os.getpid()}"
    return "in-process"


def _row(item: Item, result: Result, worker: str, size: int | None, mtime: int | None) -> dict:
    slide = result.slide or {}
    mpp = slide.get("mpp") or (None, None)
    output = None if result.output is None else str(result.output)
    return {
        "index": item.index,
        "input": item.input,
        "input_size": size,
        "input_mtime_ns": mtime,
        "output": output,
        "output_size": None if output is None else file_stat(output)[0],
        "status": result.status,
        "error": result.error,
        "params": "" if result.params is None else result.params.to_json(),
        "backend": slide.get("backend"),
        "levels": " ".join(f"{lvl['width']}x{lvl['height']}" for lvl in slide.get("levels", ())),
        "mpp_x": mpp[0],
        "mpp_y": mpp[1],
        "seconds": round(result.seconds, 3),
        "worker": worker,
    }


def _internal(item: Item, exc: Exception) -> str:
    return f"{item.input}: internal error ({type(exc).__name__}: {exc})"


def normalize_items(job: NormalizeJob, items: Sequence[Item]) -> list[dict]:
    """Normalize each item into its output folder; one row per item, never an exception for a file."""
    worker = worker_id()
    rows = []
    for item in items:
        size, mtime = file_stat(item.input)
        start = time.perf_counter()
        try:
            folder = output_folder(job.out_root, item.rel_dir)
            result = normalize_file(
                item.input, folder, job.method, params=job.params, options=job.options, name=item.name
            )
        except VipsnormError as exc:
            result = Result(Path(item.input), status="error", error=str(exc.about(item.input)))
        except Exception as exc:  # a bug must not take the other files of the task with it
            result = Result(Path(item.input), status="error", error=_internal(item, exc))
        if result.status != "ok":
            result.seconds = time.perf_counter() - start
        rows.append(_row(item, result, worker, size, mtime))
    return rows


def sample_items(job: tuple[str, Options, dict], items: Sequence[Item]) -> list[tuple[int, Result, object]]:
    """The fitting summary of each item (``vipsnorm fit``): ``(index, result, summary or None)``, where
    the summary is the method's :meth:`~vipsnorm.methods.Method.summarize` of the item's sample (a few
    numbers, or histograms: never the sampled pixels, which would all be sent to the client)."""
    method_name, options, method_options = job
    out = []
    for item in items:
        try:
            result, summary = summarize_file(item.input, method_name, options, method_options)
        except Exception as exc:  # as above
            result, summary = Result(Path(item.input), status="error", error=_internal(item, exc)), None
        out.append((item.index, result, summary))
    return out


# --------------------------------------------------------------------------------------------------
# the client side


@dataclass
class BatchSummary:
    """Counts of a finished batch."""

    ok: int = 0
    error: int = 0
    skipped: int = 0
    manifest: Path | None = None
    engine: str = ""
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.ok + self.error + self.skipped

    def line(self) -> str:
        """The summary line the command line prints."""
        text = f"{self.ok} of {self.total} inputs normalized, {self.error} failed, {self.skipped} skipped (done before)"
        return f"{text} in {self.seconds:.1f} s ({self.engine}); manifest: {self.manifest}"


def default_manifest(out_dir: str | os.PathLike[str]) -> Path:
    """``OUT.manifest.csv`` beside the output folder ``OUT``: the output tree holds outputs only."""
    out = Path(os.path.abspath(out_dir))
    if not out.name:
        raise OutputError(out, "the output folder has no name to put a manifest beside; give --manifest")
    return out.with_name(out.name + ".manifest.csv")


def _canonical(value):
    """``value`` as plain JSON data, for hashing (arrays by digest)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, np.ndarray):
        digest = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
        return {"array": digest, "shape": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value):
        fields = {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"type": type(value).__qualname__, **fields}
    if hasattr(value, "__dict__"):
        return {"type": type(value).__qualname__, **_canonical(vars(value))}
    return repr(value)


def config_hash(method: Method, params: Params | None, options: Options) -> str:
    """What makes two runs' outputs the same: the method with its options and target, the fixed
    parameters if any, and every option but ``overwrite`` (16 hex digits of a SHA-256)."""
    opts = {k: v for k, v in dataclasses.asdict(options).items() if k != "overwrite"}
    if opts["compression"] is None:
        # the default (JPEG pyramids, deflate ordinary TIFFs) writes what "jpeg", the default before
        # None, wrote: the same hash, so that a run begun with an earlier version resumes
        opts["compression"] = "jpeg"
    data = {
        "method": method.name,
        "state": _canonical(method),
        "params": None if params is None else params.to_dict(),
        "options": opts,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class _InProcess:
    """Runs every file in this process (``workers=0``): one at a time, in input order, each recorded as
    soon as it is done. A crash of a decoder ends the whole run."""

    description = "in-process"

    def threads(self) -> int:
        return 1

    def run(self, fn, job, groups: Sequence[list[Item]], on_results, fail) -> None:
        for item in sorted((item for items in groups for item in items), key=lambda item: item.index):
            on_results(fn(job, [item]))

    def close(self) -> None:
        pass


def _error_row(item: Item, error: str) -> dict:
    """The row of an input that was not (or could not be) processed."""
    return {
        "index": item.index,
        "input": item.input,
        "input_size": item.size,
        "input_mtime_ns": item.mtime_ns,
        "status": "error",
        "error": error,
    }


def _check_engine(client, scheduler: str | None, workers: int | None) -> None:
    """Refuse contradictory choices before any work."""
    if workers is not None and workers < 0:
        raise ValueError(f"--workers must be 0 or more (0: in this process), not {workers}")
    if workers is not None and (scheduler is not None or client is not None):
        raise ValueError("--workers sizes a local cluster; it cannot be combined with --scheduler or a client")
    if scheduler is not None and client is not None:
        raise ValueError("give a client or a scheduler address, not both")


def _engine(n_files: int, fits_one_task: bool, client, scheduler: str | None, workers: int | None):
    """In-process, one child process (a batch of one task), the given client, the cluster at
    ``scheduler``, or a new local cluster."""
    if client is not None:
        from .cluster import DaskRunner

        return DaskRunner(client)
    if scheduler is None and workers is None:
        scheduler = os.environ.get(SCHEDULER_ENV) or None
    if scheduler is not None:
        from .cluster import DaskRunner, connect

        return DaskRunner(connect(scheduler), owned=True)
    if workers == 0 or n_files == 0:
        return _InProcess()
    if workers is None and fits_one_task:
        return ChildRunner()
    from .cluster import DaskRunner, VipsSettings, local_size, start_local

    n_workers, vips_threads = local_size(n_files, workers)
    client, cluster = start_local(n_workers, vips_threads)
    plural = "s" if n_workers > 1 else ""
    description = f"local Dask cluster, {n_workers} worker{plural}"
    return DaskRunner(client, cluster, owned=True, description=description, settings=VipsSettings(vips_threads))


def runner(n_tasks: int, client=None, scheduler: str | None = None, workers: int | None = None):
    """What runs ``n_tasks`` tasks of one input each (a slide each, say): one child process for one task,
    this process for ``workers=0``, the given client, the cluster at ``scheduler`` (or ``$VIPSNORM_SCHEDULER``), or a new
    local cluster (the default).

    The runner has ``run(fn, job, groups, on_results, fail)`` (``fn(job, group)``: a picklable
    module-level function returning a list, passed to ``on_results`` as each task ends; ``fail(item,
    cause)`` makes the entry of an item whose worker died), ``threads()``, ``description`` and ``close()``.
    """
    _check_engine(client, scheduler, workers)
    return _engine(n_tasks, n_tasks <= 1, client, scheduler, workers)


def _fits_one_task(items: Sequence[Item]) -> bool:
    """True when the whole batch is no more than one task: a cluster could not run it faster."""
    if len(items) <= 1:
        return True
    return (
        not any(i.solo or (i.size or 0) >= SOLO_BYTES for i in items)
        and len(items) <= GROUP_FILES
        and sum(i.size or 0 for i in items) <= GROUP_BYTES
    )


def _group(items: Sequence[Item], threads: int) -> list[list[Item]]:
    per_task = max(1, min(GROUP_FILES, math.ceil(len(items) / (TASKS_PER_THREAD * max(1, threads)))))
    return group(items, max_files=per_task, max_bytes=GROUP_BYTES, solo_bytes=SOLO_BYTES)


class _Progress:
    """A tqdm bar on stderr (files, rate, time left), or nothing."""

    def __init__(self, total: int, show: bool | None, unit: str = "file"):
        if show is None:
            show = sys.stderr.isatty()
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, smoothing=0.05)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _discover_or_fail(inputs, lists, include, exclude, skip=()) -> list[Entry]:
    entries = discover(inputs, lists, include=include, exclude=exclude, skip=skip)
    if not entries:
        raise ValueError("no input given")
    return entries


def normalize_batch(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    method: Method,
    *,
    params: Params | None = None,
    options: Options = Options(),
    lists: Sequence[str | os.PathLike[str]] = (),
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    manifest: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
    reference: str = "",
    progress: bool | None = False,
    on_row: Callable[[dict], None] | None = None,
) -> BatchSummary:
    """Normalize every input into ``out_dir``, resuming from the manifest, in parallel.

    Parameters
    ----------
    inputs : sequence of path-like
        Files and folders (searched recursively; see :mod:`vipsnorm.batch.inputs`).
    method, params, options
        As for :func:`vipsnorm.engine.normalize_file`.
    lists : sequence of path-like
        List files (``.csv`` with ``input`` and optional ``output`` columns, or one path per line).
    include, exclude : sequence of str
        Shell patterns for the files searched in folders.
    manifest : path-like, optional
        The CSV manifest (default: :func:`default_manifest`). Rows are appended; what it records as
        finished, unchanged and with the same settings is skipped.
    overwrite : bool
        Redo every input, even those the manifest records as finished.
    client : dask.distributed.Client, optional
        Run on this client's cluster (left open).
    scheduler : str, optional
        Address (``tcp://host:port``) or scheduler file of a running Dask cluster; default: the
        ``VIPSNORM_SCHEDULER`` environment variable, unless ``workers`` is given.
    workers : int, optional
        Worker processes of a new local cluster; 0 runs everything in this process. Default: a local
        cluster sized to the machine, or one child process when the batch is no more than one task.
    reference : str
        What the manifest names as the reference (a file, for the record).
    progress : bool or None
        Show a progress bar on stderr; ``None``: when stderr is a terminal.
    on_row : callable, optional
        Called in this process with each row as it is recorded (``index``, ``params`` as JSON).

    Returns
    -------
    BatchSummary
        Counts of ok, error and skipped inputs.

    Raises
    ------
    OutputError
        The manifest cannot be opened (or another run holds it).
    VipsnormError
        The Dask cluster cannot be reached or started, or dropped the tasks.
    ValueError
        No input, a list file that cannot be read, or ``workers`` with ``scheduler``.
    """
    start = time.perf_counter()
    _check_engine(client, scheduler, workers)
    out_root = Path(os.path.abspath(out_dir))
    manifest_path = Path(os.path.abspath(manifest)) if manifest is not None else default_manifest(out_root)
    if params is not None and params.method != method.name:
        raise InvalidReferenceError(None, f"the parameters are for {params.method}, not {method.name}")
    entries = _discover_or_fail(inputs, lists, include, exclude, skip=[out_root])
    out_root.mkdir(parents=True, exist_ok=True)
    items = plan(entries, out_root)
    config = config_hash(method, params, options)
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(2)
    shared = {"run": run_id, "method": method.name, "reference": reference, "config": config}
    summary = BatchSummary(manifest=manifest_path)

    with Manifest.open(manifest_path) as book:
        if "patches" in book.header:
            raise OutputError(manifest_path, "is a manifest of vipsnorm patches, not of normalize; choose another --manifest")
        bar = _Progress(len(items), progress)

        def record(rows: list[dict]) -> None:
            book.append([{**row, **shared, "params": "" if params is not None else row.get("params")} for row in rows])
            for row in rows:
                if row["status"] == "ok":
                    summary.ok += 1
                elif row["status"] == "skipped":
                    summary.skipped += 1
                else:
                    summary.error += 1
                if on_row is not None:
                    on_row(row)
            bar.update(len(rows))

        try:
            todo, early = [], []
            for item in items:
                done = None if item.error is not None or overwrite else book.done(item, config, out_root)
                if item.error is not None:
                    early.append(_error_row(item, item.error))
                elif done is not None:
                    early.append({**done._asdict(), "index": item.index, "input": item.input, "status": "skipped"})
                else:
                    todo.append(item)
                if len(early) >= 10000:
                    record(early)
                    early = []
            record(early)
            # temporary outputs of a killed run (or of a worker that died in this one) are never results
            folders = {out_root.joinpath(*i.rel_dir.split("/")) if i.rel_dir else out_root for i in todo}
            remove_part_files(folders)
            engine = _engine(len(todo), _fits_one_task(todo), client, scheduler, workers)
            try:
                job = NormalizeJob(str(out_root), method, params, options)
                fail = lambda item, cause: _error_row(item, f"{item.input}: {cause}")  # noqa: E731
                engine.run(normalize_items, job, _group(todo, engine.threads()), record, fail)
            finally:
                summary.engine = engine.description  # after the run: a child runner may fall back here
                engine.close()
                remove_part_files(folders)
        finally:
            bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def fit_batch(
    inputs: Sequence[str | os.PathLike[str]],
    method_name: str = "match",
    *,
    method_options: dict | None = None,
    options: Options = Options(),
    lists: Sequence[str | os.PathLike[str]] = (),
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    cache: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool | None = False,
) -> tuple[Reference, list[Result]]:
    """:func:`vipsnorm.engine.fit_files` over many inputs in parallel: each input is sampled and
    summarized by a worker (:func:`vipsnorm.engine.summarize_file`), then the summaries are combined
    here, in input order, by :func:`vipsnorm.engine.fit_reference` (the same result as ``fit_files``).

    Inputs, ``client``, ``scheduler``, ``workers`` and ``progress`` are as for :func:`normalize_batch`.
    With ``cache`` (a JSON-lines file, see :mod:`vipsnorm.batch.fitcache`), every summary is kept there
    as it arrives, and inputs an earlier fit with the same settings summarized, unchanged since, are not
    sampled again (their results have status ``skipped``); ``overwrite`` samples everything again.

    Raises
    ------
    InvalidReferenceError
        No input could be used.
    OutputError
        The cache cannot be opened, or another fit holds it.
    ValueError
        Unknown method or option, no input.
    """
    from .fitcache import SummaryCache, fit_config

    method_options = method_options or {}
    check_fit(method_name, method_options)  # before any work
    _check_engine(client, scheduler, workers)
    entries = _discover_or_fail(inputs, lists, include, exclude)
    items = [Item(i, e.path, "", "", *file_stat(e.path), e.error) for i, e in enumerate(entries)]
    results: list[Result | None] = [None] * len(items)
    summaries: list = [None] * len(items)
    book = None
    if cache is not None:
        book = SummaryCache.open(cache, fit_config(method_name, method_options, options), reuse=not overwrite)
    try:
        todo = []
        for item in items:
            kept = None if book is None or item.error is not None else book.get(item.input, item.size, item.mtime_ns)
            if item.error is not None:
                results[item.index] = Result(Path(item.input), status="error", error=item.error)
            elif kept is not None:
                results[item.index], summaries[item.index] = Result(Path(item.input), status="skipped"), kept
            else:
                todo.append(item)
        bar = _Progress(len(items), progress)
        bar.update(len(items) - len(todo))
        by_index = {item.index: item for item in todo}

        def collect(out: list) -> None:
            for index, result, summary in out:
                results[index], summaries[index] = result, summary
                if book is not None and result.status == "ok":
                    book.add(by_index[index].input, by_index[index].size, by_index[index].mtime_ns, summary)
            bar.update(len(out))

        def fail(item: Item, cause: str):
            return item.index, Result(Path(item.input), status="error", error=f"{item.input}: {cause}"), None

        try:
            engine = _engine(len(todo), _fits_one_task(todo), client, scheduler, workers)
            try:
                job = (method_name, options, method_options)
                engine.run(sample_items, job, _group(todo, engine.threads()), collect, fail)
            finally:
                engine.close()
        finally:
            bar.close()
    finally:
        if book is not None:
            book.close()
    final = [r for r in results if r is not None]
    ok = [i for i, r in enumerate(results) if r is not None and r.status in ("ok", "skipped") and summaries[i] is not None]
    inputs_ok = tuple(str(results[i].input) for i in ok)
    errors = [r.error for r in final if r.status == "error" and r.error]
    reference = fit_reference(method_name, [summaries[i] for i in ok], inputs_ok, method_options, errors)
    return reference, final
