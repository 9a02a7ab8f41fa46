"""Batches: find the inputs, skip what an earlier run finished, run the rest as tasks (on a Dask cluster,
in one child process when the batch is a single task, or in this process), and record every result in
the manifest as it arrives.

Each task is a list of files; a worker opens, fits, applies and writes each of them with
:func:`vipsnorm.engine.normalize_file` (the same unit as for one file) and returns one row per file.
Small images are grouped (up to :data:`GROUP_FILES` files or :data:`GROUP_BYTES` per task, fewer when
there are few files for many workers) so that scheduling costs little next to the work; a whole-slide
file is one task. The client (this process) is the only writer of the manifest.

Each output is put in place by the worker in two steps: :func:`~vipsnorm.engine.normalize_file` writes
it complete under a hidden staging name (``.NAME.vipsnorm-part-XXXXXXXX.EXT``, a part file to every
cleanup), then :func:`normalize_items` renames it to its final name, but only if its run is still the
live run of the output folder: the client writes its run's token in a marker file in the output folder
(:func:`live_marker`) before any worker starts, when the run has work to do (a resume with nothing
left writes nothing, so it runs over a read-only output tree), and deletes it when the run ends; a
later run with the same manifest replaces it (a killed run's marker stays until then). A task still
running after its client was killed (on a cluster given with
``--scheduler``, Dask cannot stop a running task) then never puts outputs made with its settings over
those of a later run: it removes its staged file and reports the input as an error. The worker also
records the identity (size, inode number, mtime) of the file it renamed into place, which
:meth:`~vipsnorm.batch.manifest.Manifest.done` compares on the next run, so that an output replaced in
the few microseconds between the check and the rename, or by anything else, is redone, never skipped.
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
from ..io.write import PART_MARKER
from ..methods import Method, Params
from ..reference import Reference
from ._signals import terminate_as_interrupt
from .child import WORKER_ENV, ChildRunner
from .inputs import (
    OWN_PREFIX,
    Entry,
    Item,
    _under,
    discover,
    file_stat,
    group,
    input_stat,
    output_folder,
    plan,
    remove_part_files,
)
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
    "live_marker",
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
#: Name of the marker file of a live run, in the output folder (:func:`live_marker`).
LIVE_PREFIX = OWN_PREFIX + "run-"
#: Longest output name, in bytes, kept in its staging name; longer ones are staged under a digest, so
#: that the staging name and the temporary name of its write fit in any file system's names.
_STAGE_NAME_BYTES = 64


# --------------------------------------------------------------------------------------------------
# what runs on a worker


@dataclass(frozen=True)
class NormalizeJob:
    """What every file of a normalize batch shares (sent with each task; a few kB).

    Attributes
    ----------
    live : str, optional
        The marker file of the run (:func:`live_marker`): a worker puts an output in place only while
        it holds ``token``. None: always (a job made by a caller of :func:`normalize_items`).
    token : str
        This run's token, unique to the run.
    """

    out_root: str
    method: Method
    params: Params | None
    options: Options
    live: str | None = None
    token: str = ""


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


def _row(item: Item, result: Result, worker: str, size: int | None, mtime: int | None, identity=None) -> dict:
    """The manifest row of ``item``; ``identity`` is ``(size, inode, mtime_ns)`` of the output the worker
    renamed into place (None: no output)."""
    slide = result.slide or {}
    mpp = slide.get("mpp") or (None, None)
    output = None if result.output is None else str(result.output)
    out_size, out_ino, out_mtime = identity or (None, None, None)
    return {
        "index": item.index,
        "input": item.input,
        "input_size": size,
        "input_mtime_ns": mtime,
        "output": output,
        "output_size": out_size,
        "output_ino": out_ino,
        "output_mtime_ns": out_mtime,
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


def live_marker(out_root: str | os.PathLike[str], manifest: str | os.PathLike[str]) -> Path:
    """The marker file of the live run of ``out_root`` with ``manifest``: ``out_root/.vipsnorm-run-KEY``,
    KEY a digest of the manifest's real path.

    In the output folder, because that is the one place every worker is sure to see at the client's
    path (they write there), wherever the manifest is. One per manifest, because runs with different
    manifests may write the same output folder at the same time (each its own inputs), while runs with
    the same manifest never overlap (its lock): the marker of a manifest names the one run that may
    still put outputs in place. Hidden, so that no search of the folder takes it for an input.
    """
    key = hashlib.sha256(os.fsencode(os.path.realpath(manifest))).hexdigest()[:16]
    return Path(out_root, LIVE_PREFIX + key)


#: Tokens of runs this process has seen replaced: a run never becomes live again, so the rest of its
#: tasks' files are skipped without reading the marker or doing any work.
_ENDED: set[str] = set()


def _is_live(job: NormalizeJob) -> bool:
    """True while ``job``'s run is the live run of its output folder (its marker holds its token); once
    False, the token is in :data:`_ENDED`.

    One small read (``open``, ``read``, ``close``: a few microseconds locally, one round trip on NFS,
    whose close-to-open consistency makes the ``open`` see a marker another machine replaced).
    """
    if job.live is None:
        return True
    if job.token in _ENDED:
        return False
    try:
        with open(job.live, "rb") as f:
            held = f.read(256).strip()
    except FileNotFoundError:  # the run ended (its client deletes the marker) and none took over
        held = b""
    except OSError:  # cannot tell (a transient error): not this file, but maybe the next
        return False
    if held == job.token.encode():
        return True
    _ENDED.add(job.token)
    return False


def _not_live(item: Item, job: NormalizeJob) -> str:
    return (
        f"{item.input}: output not put in place: its run ended or a later run of {job.out_root} with the same "
        "manifest took over (this task outlived its vipsnorm command); run the command again to resume"
    )


def _stage_name(name: str) -> str:
    """The hidden name an output of ``name`` is written under before it is put in place: a part file
    (``.NAME.vipsnorm-part-XXXXXXXX``, :data:`vipsnorm.batch.inputs.PART_FILE`), so that every cleanup
    deletes one a killed worker left, and unique to this write."""
    if len(os.fsencode(name)) > _STAGE_NAME_BYTES:
        name = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return f".{name}{PART_MARKER}{secrets.token_hex(4)}"


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # removed with the other part files by the next run over the folder
        pass


def _normalize_one(job: NormalizeJob, item: Item, folder: Path) -> tuple[Result, tuple | None]:
    """Normalize ``item`` into ``folder`` under a staging name, then rename it into place if the run is
    still live; return the result and the identity ``(size, inode, mtime_ns)`` of the output put in place.

    The rename into place is done here rather than by the writer so that the check of the run comes
    just before it (the writer's own rename only moves the complete file to its staging name). It costs
    one more rename, two ``stat`` calls (one was made before too, for the size) and the marker's read:
    about 30 us a file on a local disk, against 4-5 ms to normalize a 256 px JPEG (measured on a loaded
    2-core machine; within the noise of a batch of 300 such files).
    """
    stage = _stage_name(item.name)
    result = normalize_file(
        item.input, folder, job.method, params=job.params, options=job.options, name=item.name, stage=stage
    )
    if result.status != "ok" or result.output is None:
        if result.error:  # name the output as the user knows it, not its staging name
            result.error = result.error.replace(str(folder / stage), str(folder / item.name))
        return result, None
    staged, final = Path(result.output), Path(result.final)  # (the final name checked before any work)
    try:
        if not _is_live(job):
            _discard(staged)
            return Result(Path(item.input), status="error", error=_not_live(item, job), slide=result.slide), None
        before = os.stat(staged)
        os.replace(staged, final)
    except OSError as exc:
        _discard(staged)
        error = OutputError(final, f"cannot write the output ({exc.strerror or exc})")
        return Result(Path(item.input), status="error", error=str(error), slide=result.slide), None
    # the identity after the rename, of the file renamed (same inode: a rename keeps it); should another
    # writer have replaced it meanwhile, the one renamed is recorded, and the next run redoes the output
    try:
        after = os.stat(final)
    except OSError:
        after = before
    st = after if after.st_ino == before.st_ino else before
    result.output, result.final = final, None
    return result, (st.st_size, st.st_ino, st.st_mtime_ns)


def normalize_items(job: NormalizeJob, items: Sequence[Item]) -> list[dict]:
    """Normalize each item into its output folder; one row per item, never an exception for a file.

    An item whose run is no longer live (:func:`_is_live`: read when the task starts and just before
    each output is renamed into place, one small read per file) is an error row, and nothing of it is
    put in place; once a check has failed, the task's other files are not even started.
    """
    worker = worker_id()
    rows = []
    # Output folders checked (no way out of the output root) and made once a task: a task's files share
    # few folders, and its run is seconds long. A folder deleted during the task is not made again: the
    # outputs meant for it fail, are recorded as errors, and the next run redoes them.
    folders: dict[str, Path] = {}
    for position, item in enumerate(items):
        size, mtime = file_stat(item.input)
        start = time.perf_counter()
        identity = None
        try:
            if job.token in _ENDED or (position == 0 and not _is_live(job)):  # a task that outlived its run
                result = Result(Path(item.input), status="error", error=_not_live(item, job))
            else:
                folder = folders.get(item.rel_dir)
                if folder is None:
                    folder = folders[item.rel_dir] = output_folder(job.out_root, item.rel_dir)
                result, identity = _normalize_one(job, item, folder)
        except VipsnormError as exc:
            result = Result(Path(item.input), status="error", error=str(exc.about(item.input)))
        except Exception as exc:  # a bug must not take the other files of the task with it
            result = Result(Path(item.input), status="error", error=_internal(item, exc))
        if result.status != "ok":
            result.seconds = time.perf_counter() - start
        rows.append(_row(item, result, worker, size, mtime, identity))
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
    elif opts["compression"] == "jpeg":
        # given explicitly, JPEG makes ordinary TIFF outputs JPEG-compressed, where the default writes
        # deflate: another hash, or a resume would skip outputs made the other way. A run begun with
        # an explicit --compression jpeg by a version before None existed hashed "jpeg" (as its default
        # did), so its outputs are redone once; then its reruns skip them again.
        opts["compression"] = "jpeg, given"
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


def _discover_or_fail(inputs, lists, include, exclude, skip=(), once_per="output") -> list[Entry]:
    entries = discover(inputs, lists, include=include, exclude=exclude, skip=skip, once_per=once_per)
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

    # SIGTERM (timeout, SLURM, docker stop) cleans up as Ctrl-C does, then ends the process
    with terminate_as_interrupt(), Manifest.open(manifest_path) as book:
        if "patches" in book.header:
            raise OutputError(manifest_path, "is a manifest of vipsnorm patches, not of normalize; choose another --manifest")
        bar = _Progress(len(items), progress)
        token, live = f"{run_id} {secrets.token_hex(8)}", None

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
            # Only folders this run writes into, at the start and the end: temporary outputs of a killed
            # run (or of a worker that died in this one) are never results, but listing the folder of
            # every finished input too would cost a resume with nothing to do one listing per folder
            # (huge folders on NFS), and would delete the staged files of a concurrent run with another
            # manifest writing there. A leftover in a folder with nothing left to do stays until a run
            # writes there again: hidden, it is never taken for an input or an output.
            folders = list(_output_folders(out_root, todo).values())
            if todo:
                # this run is now the live one: tasks of an earlier run with this manifest still running
                # on a cluster (their client was killed) put nothing more in place. Claimed only with
                # work to do, so that a resume with nothing left runs over a read-only output tree
                live = _claim(live_marker(out_root, manifest_path), token)
            remove_part_files(_contained(out_root, folders))
            engine = _engine(len(todo), _fits_one_task(todo), client, scheduler, workers)
            try:
                job = NormalizeJob(str(out_root), method, params, options, None if live is None else str(live), token)
                fail = lambda item, cause: _error_row(item, f"{item.input}: {cause}")  # noqa: E731
                engine.run(normalize_items, job, _group(todo, engine.threads()), record, fail)
            finally:
                summary.engine = engine.description  # after the run: a child runner may fall back here
                if live is not None:
                    # no run is live now, before the engine is closed: a task still running (after
                    # Ctrl-C or an error; a local cluster's or the child's goes on while they shut down)
                    # then puts nothing in place, and the staged file it leaves is removed just below
                    _release(live, token)
                    live = None
                engine.close()
                # those a worker that died left, in folders that exist now; each checked again: one may
                # have become a link meanwhile
                remove_part_files(_contained(out_root, folders))
        finally:
            bar.close()
            if live is not None:  # (the engine could not start)
                _release(live, token)
    summary.seconds = time.perf_counter() - start
    return summary


def _claim(live: Path, token: str) -> Path:
    """Write ``token`` into the marker ``live``: this run is now the live one of its output folder.

    Written in place rather than renamed into place: a reader that sees it half-written sees neither
    its own token nor the new one, and stops, which is right for every reader but this run's own
    workers, and those start only after this.

    Raises
    ------
    OutputError
        The marker cannot be written.
    """
    try:
        with open(live, "w", encoding="utf-8") as f:
            f.write(token + "\n")
    except OSError as exc:
        cause = f"cannot write the marker of the live run ({exc.strerror or exc}); make the output folder writable"
        raise OutputError(live, cause) from None
    return live


def _release(live: Path, token: str) -> None:
    """Delete the marker ``live`` if it still holds ``token`` (no other run with the manifest can have
    replaced it while this one holds the manifest's lock; checked all the same)."""
    try:
        with open(live, "rb") as f:
            if f.read(256).strip() != token.encode():
                return
        live.unlink()
    except OSError:  # gone already, or a folder made read-only meanwhile: a later run replaces it
        pass


def _output_folders(out_root: Path, items: Sequence[Item]) -> dict[str, Path]:
    """The output folder of every item of ``items`` the plan accepted, by ``rel_dir``, each once (whether
    it leads out of ``out_root`` is for :func:`_contained` to say, when it is about to be cleaned)."""
    folders: dict[str, Path] = {}
    for item in items:
        if item.error is None and item.rel_dir not in folders:
            folders[item.rel_dir] = out_root.joinpath(*item.rel_dir.split("/")) if item.rel_dir else out_root
    return folders


def _contained(out_root: Path, folders) -> list[Path]:
    """``folders`` whose real path is inside the real ``out_root``: the check :func:`output_folder` makes
    before writing, made again before deleting part files, since a folder inside the output folder may
    be (or may have become since planning) a symbolic link to another place, whose files are not this
    run's. One ``realpath`` per folder; folders that do not exist are left out (nothing to delete)."""
    root = os.path.realpath(out_root)
    kept = []
    for folder in folders:
        real = os.path.realpath(folder)
        if _under(real, root) and os.path.isdir(real):
            kept.append(folder)
    return kept


@terminate_as_interrupt()  # SIGTERM: the clean-up of Ctrl-C (the cache closed, the cluster shut down), then the end
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
    # every file once, whatever the names that reach it: a file pooled twice would weigh twice
    entries = _discover_or_fail(inputs, lists, include, exclude, once_per="file")
    items = []
    for i, e in enumerate(entries):
        size, mtime_ns, unusable = input_stat(e.path) if e.error is None else (None, None, None)
        items.append(Item(i, e.path, "", "", size, mtime_ns, e.error or unusable))
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
