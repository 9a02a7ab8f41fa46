"""The manifest: one CSV row per input and run, appended as results arrive.

Why CSV and not Parquet: a row must be on disk the moment its result is known, so that a run killed at
any moment loses only the rows of tasks still in flight. CSV is appended to as results arrive (the rows
of a task in one ``write`` and one ``flush``; an ``fsync`` at most every second and at the end); a
Parquet file is written in whole row groups and is unreadable until its footer is written, so it would
lose everything since the last group, and it needs pyarrow. The manifest reads anywhere (pandas, a
spreadsheet, ``grep``) and its rows are one line each: fields never hold line breaks, so a row cut short
by a kill is recognised (no final newline) and dropped when the manifest is next opened.

Columns (:data:`COLUMNS`): ``run`` (id of the invocation), ``time`` (UTC, when the row was written),
``input`` (absolute path), ``input_size``, ``input_mtime_ns``, ``output`` (absolute path),
``output_size``, ``status`` (``ok``, ``error`` or ``skipped``: finished by an earlier run, output
kept), ``error`` (one line naming the file and the cause), ``method``, ``params`` (the fitted
parameters as JSON; empty when fixed parameters from ``reference`` were applied, and in ``skipped``
rows: see the input's ``ok`` row), ``reference`` (the reference used, if any), ``config`` (a hash of
the method, its target or parameters and the options: a run with other settings redoes the file),
``backend``, ``levels`` (``WxH`` per level), ``mpp_x``, ``mpp_y`` (microns per pixel), ``seconds``
(time spent on the file in the worker), ``worker`` (the Dask worker's address, ``worker process PID``
for a batch run in one child process, or ``in-process``), ``output_ino``, ``output_mtime_ns`` (the
identity of the output file the worker renamed into place: its inode number and modification time; last,
so that the columns before them keep their places).

Why the output's identity: sizes alone cannot tell two outputs apart (an uncompressed TIFF's size depends
only on its dimensions), and the rows of a task reach the manifest only when the whole task ends, while
its outputs are renamed into place one by one. A run with other settings killed mid-task has then
replaced outputs whose rows were never written, and the earlier rows, whose sizes still match, would
call them finished. Every output is a new file (a new inode, a new mtime) renamed into place, which keeps
both, so :meth:`Manifest.done` asks for both to be those recorded. They are taken by the worker (a ``stat`` of the file it renamed,
nothing read), and compared by the next run's client with its own ``stat``: this assumes that the file
system reports the same inode number and mtime for a file to every machine, as local disks, NFS,
Lustre, GPFS and CephFS do; one that does not (an SMB mount with ``noserverino``, some FUSE file
systems) makes every output look replaced, so everything is redone, never wrongly skipped. Rows without
them (manifests begun by vipsnorm before they existed keep their header, hence rows without them too)
fall back to the size.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import operator
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from ..errors import OutputError
from ._locks import open_locked
from .inputs import Item

__all__ = ["COLUMNS", "Manifest", "Finished", "read_manifest"]

COLUMNS = (
    "run", "time", "input", "input_size", "input_mtime_ns", "output", "output_size", "status", "error",
    "method", "params", "reference", "config", "backend", "levels", "mpp_x", "mpp_y", "seconds", "worker",
    "output_ino", "output_mtime_ns",
)  # fmt: skip
_REQUIRED = {"input", "input_size", "input_mtime_ns", "output", "output_size", "status", "config"}
#: Rows can be long (clahe parameters of a large slide hold every region's LUT).
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class Finished(NamedTuple):
    """What the manifest says about an input whose last row is ``ok`` or ``skipped``."""

    input_size: str
    input_mtime_ns: str
    output: str
    output_size: str
    output_ino: str
    output_mtime_ns: str
    config: str
    method: str
    reference: str
    backend: str
    levels: str
    mpp_x: str
    mpp_y: str


def _rows(lines: Iterable[str]):
    reader = csv.reader(lines)
    header = next(reader, None)
    return header, reader


def read_manifest(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Every complete row of a manifest, as dicts of strings (a row cut short by a kill is left out)."""
    data = Path(path).read_bytes()
    data = data[: data.rfind(b"\n") + 1]  # a row (or a character) cut short by a kill is left out
    header, reader = _rows(io.StringIO(data.decode("utf-8", errors="surrogateescape"), newline=""))
    if header is None:
        return []
    return [dict(zip(header, row)) for row in reader if len(row) == len(header)]


def _clean(value) -> str:
    """A field: text on one line (rows are lines), floats short."""
    if value is None:
        return ""
    if value.__class__ is str:
        return value if "\n" not in value and "\r" not in value else value.replace("\r", " ").replace("\n", " ")
    if isinstance(value, float):
        return f"{value:.6g}"
    return _clean(str(value))


class Manifest:
    """An open manifest: the last state of every input it records, and rows appended to it.

    Open it with :meth:`open`; only one process at a time may (an advisory lock on the file).

    Parameters
    ----------
    sync_seconds : float
        Longest time between two ``fsync`` calls; every row is flushed to the operating system as it
        is written, so a killed process loses nothing written, and a machine crash at most this much.
    """

    def __init__(self, path: Path, file, header: list[str], finished: dict[str, Finished], sync_seconds: float):
        self.path = path
        self._file = file
        self.header = header
        self.finished = finished
        self.sync_seconds = sync_seconds
        self._synced = time.monotonic()

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, sync_seconds: float = 1.0, columns: Sequence[str] = COLUMNS
    ) -> "Manifest":
        """Open (or create) the manifest at ``path`` for appending, after reading what it holds.

        ``columns`` is the header written into a new (or empty) manifest, under the lock: another
        command's rows, such as ``vipsnorm patches``' (they must include the columns resuming needs).
        An existing manifest keeps its own header.

        Raises
        ------
        OutputError
            The file cannot be opened, another run holds it, or it is not a vipsnorm manifest (its
            first line is not a manifest's header: it is then left unchanged, byte for byte).
        ValueError
            ``columns`` lack one that resuming needs.
        """
        missing = _REQUIRED - set(columns)
        if missing:
            raise ValueError(f"a manifest needs the columns {sorted(missing)}")
        path = Path(path)
        fd, _ = open_locked(
            path,
            os.O_RDWR,
            cannot_open="cannot open the manifest ({}); choose another --manifest",
            busy="another vipsnorm run is writing this manifest; wait for it to end or choose another --manifest",
        )
        try:
            with _naming(path, "read or write"):
                # before anything is changed: the path may name another file given by mistake (a list
                # of inputs, an image), which must be left exactly as it is
                _check_header(fd, path, columns)
                _drop_torn_tail(fd)
                # file names are bytes on POSIX: names that are not UTF-8 round-trip as surrogate escapes
                file = os.fdopen(fd, "r+", encoding="utf-8", errors="surrogateescape", newline="")
        except BaseException:
            os.close(fd)
            raise
        try:
            with _naming(path, "read or write"):
                return cls._read(path, file, columns, sync_seconds)
        except BaseException:
            with contextlib.suppress(OSError):
                file.close()
            raise

    @classmethod
    def _read(cls, path: Path, file, columns: Sequence[str], sync_seconds: float) -> "Manifest":
        """The open manifest of ``file``, after reading it (a header written into an empty one)."""
        header, reader = _rows(file)
        finished: dict[str, Finished] = {}
        if header is None:
            header = list(columns)
            file.write(",".join(columns) + "\n")
            file.flush()
        else:
            if not _REQUIRED <= set(header):  # _check_header read the same line: only if it changed since
                raise OutputError(path, _NOT_OURS.format("unexpected columns"))
            state = _state_getter(header)
            status_at, input_at, width = header.index("status"), header.index("input"), len(header)
            for row in reader:
                if len(row) != width:
                    continue
                if row[status_at] in ("ok", "skipped"):
                    finished[row[input_at]] = state(row)
                else:
                    finished.pop(row[input_at], None)
        file.seek(0, os.SEEK_END)
        return cls(path, file, header, finished, sync_seconds)

    def done(self, item: Item, config: str, out_root: str | os.PathLike[str]) -> Finished | None:
        """The record of ``item`` if it is finished and nothing changed since: its last row is ``ok`` or
        ``skipped`` with the same ``config``, the input has the recorded size and mtime, the recorded
        output is where this run puts it (``out_root/rel_dir/name.*``: another ``-o``, or the same folder
        given at another depth, is not "done"), and it is the very file the worker renamed into place:
        the recorded size, inode number and mtime (one ``stat``). Outputs appear only complete, by
        rename, so a file with that identity is the whole output of that row; any other file there (put
        by a run whose rows were lost, or touched since) is redone. A row without the identity (written
        by an earlier vipsnorm) is taken on the size alone."""
        record = self.finished.get(item.input)
        if record is None or record.config != config or item.size is None:
            return None
        if record.input_size != str(item.size) or record.input_mtime_ns != str(item.mtime_ns):
            return None
        expected = Path(out_root, item.rel_dir)
        recorded = Path(record.output)
        if os.path.normcase(os.path.abspath(recorded.parent)) != os.path.normcase(os.path.abspath(expected)):
            return None
        if recorded.stem.lower() != item.name.lower():
            return None
        if not record.output:
            return None
        try:
            st = os.stat(record.output)
            if st.st_size != int(record.output_size):
                return None
        except (OSError, ValueError):
            return None
        if (record.output_ino or record.output_mtime_ns) and (
            record.output_ino != str(st.st_ino) or record.output_mtime_ns != str(st.st_mtime_ns)
        ):
            return None
        return record

    def append(self, rows: Iterable[dict]) -> None:
        """Write ``rows`` (dicts keyed by column; missing columns empty) and flush them."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        state, input_at = _state_getter(self.header), self.header.index("input")
        for row in rows:
            row.setdefault("time", now)
            values = [_clean(row.get(name)) for name in self.header]
            writer.writerow(values)
            if row.get("status") in ("ok", "skipped"):
                self.finished[values[input_at]] = state(values)
            else:
                self.finished.pop(values[input_at], None)
        with _naming(self.path):
            self._file.write(buffer.getvalue())
            self._file.flush()
        if time.monotonic() - self._synced >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Flush and ``fsync`` the manifest.

        Raises
        ------
        OutputError
            It cannot be written (a full disk), naming the manifest.
        """
        with _naming(self.path):
            self._file.flush()
            os.fsync(self._file.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        """Sync and close (releasing the lock); the file is closed even when the sync fails (raised)."""
        if self._file.closed:
            return
        try:
            self.sync()
        finally:
            try:
                self._file.close()  # releases the lock (closed even when its flush fails again)
            except OSError:
                pass  # the sync's error says it

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            return
        try:  # never over the error on its way (a full disk fails the last sync again)
            self.close()
        except (OSError, OutputError):
            pass


@contextlib.contextmanager
def _naming(path: Path, what: str = "write"):
    """The block's OSErrors as an :class:`OutputError` naming the manifest ``path`` (a write on a full
    disk, an ``fsync`` refused by a device: their errors name no file)."""
    try:
        yield
    except OSError as exc:
        cause = f"cannot {what} the manifest ({exc.strerror or exc}); once it can be, run the command again to resume"
        raise OutputError(path, cause) from None


def _state_getter(header: list[str]):
    """A function from a row (fields in ``header`` order) to a :class:`Finished`. Fields that repeat from
    row to row (config, method, levels, ...) are interned: a million inputs then take about half the
    memory."""
    at = [header.index(name) if name in header else None for name in Finished._fields]
    get = operator.itemgetter(*at) if None not in at else (lambda row: tuple("" if i is None else row[i] for i in at))
    intern = sys.intern

    def state(row: list[str]) -> Finished:
        size, mtime, output, output_size, ino, output_mtime, *shared = get(row)
        return Finished(size, mtime, output, output_size, ino, output_mtime, *map(intern, shared))

    return state


#: Bytes of a file read to find its header (a manifest's is about 200).
_HEAD_BYTES = 1 << 16
_NOT_OURS = (
    "is not a vipsnorm manifest ({}); left unchanged: choose another --manifest, or delete this file if "
    "it is a damaged manifest"
)


def _check_header(fd: int, path: Path, columns: Sequence[str]) -> None:
    """Refuse the open file unless it is empty or a manifest: a first line that is a CSV header with the
    columns resuming needs, or, when a kill cut the very first write short, the start of the header
    this run would write (:func:`_drop_torn_tail` then empties it).

    Raises
    ------
    OutputError
        It is not a manifest (nothing has been written to it).
    """
    head = os.pread(fd, _HEAD_BYTES, 0)
    if not head:
        return
    first, newline, _ = head.partition(b"\n")
    if not newline:
        if len(head) < _HEAD_BYTES and (",".join(columns) + "\n").encode().startswith(head):
            return  # our own header, cut short
        raise OutputError(path, _NOT_OURS.format("its first line is not a CSV header"))
    try:
        header = next(csv.reader([first.decode("utf-8").rstrip("\r")]), [])
    except (UnicodeDecodeError, csv.Error):
        raise OutputError(path, _NOT_OURS.format("its first line is not a CSV header")) from None
    if not _REQUIRED <= set(header):
        raise OutputError(path, _NOT_OURS.format("unexpected columns"))


def _drop_torn_tail(fd: int) -> None:
    """Cut a last row left without its newline by a killed run (fields never hold newlines)."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        at = chunk.rfind(b"\n")
        if at >= 0:
            os.ftruncate(fd, start + at + 1)
            return
        end = start
    os.ftruncate(fd, 0)
