"""The inputs ``vipsnorm fit`` has summarized, kept so that a rerun samples only what is new or changed.

A dataset fit over thousands of slides takes hours; a crash, a killed job or one more folder of slides
must not mean sampling every slide again. Each input's summary (:meth:`vipsnorm.methods.Method.summarize`:
pixel-less histograms, or a stain method's few numbers) is appended, as soon as it arrives, to a JSON-lines
file beside the reference (``REF.inputs.jsonl``), with the input's absolute path, size and mtime and a hash
of everything that changes a summary (the method and its options, the sampling options, the vipsnorm
version). A rerun takes an input's summary from there when all of these still match, so the reference
is the one a run from scratch would fit (summaries round-trip exactly through JSON), and samples the
rest. Errors are not kept: they are tried again. A line cut short by a kill is ignored. One fit at a time
per file (an advisory lock). A file that is not one of these (a CSV, an image given as ``--cache`` by
mistake) is refused before anything is written to it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..engine import Options
from ..errors import OutputError
from ..methods import Sample
from ..methods.stain import LabSummary, StainSummary
from ._locks import open_locked

__all__ = ["SummaryCache", "default_cache", "fit_config"]


def default_cache(reference: str | os.PathLike[str]) -> Path:
    """Where the summaries of the inputs of the reference ``REF.json`` are kept: ``REF.inputs.jsonl``."""
    path = Path(os.path.abspath(reference))
    return path.with_name(path.stem + ".inputs.jsonl")


def fit_config(method_name: str, method_options: dict | None, options: Options) -> str:
    """16 hex digits that change with anything that changes an input's summary."""
    data = {
        "version": __version__,
        "method": method_name,
        "method_options": {k: v for k, v in sorted((method_options or {}).items()) if v is not None},
        "sampling": [options.strategy, options.n_tiles, options.seed, options.tissue, options.max_pixels, options.backend],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _encode(summary) -> dict[str, Any]:
    if isinstance(summary, Sample):
        return {"kind": "sample", **summary.to_dict()}
    if isinstance(summary, StainSummary):
        return {
            "kind": "stain",
            "he": np.asarray(summary.he).tolist(),
            "max_c": np.asarray(summary.max_c).tolist(),
            "stained": int(summary.stained),
            "source": summary.source,
        }
    if isinstance(summary, LabSummary):
        return {"kind": "lab", "mean": np.asarray(summary.mean).tolist(), "std": np.asarray(summary.std).tolist(), "source": summary.source}
    raise TypeError(f"cannot keep a summary of type {type(summary).__name__}")


def _decode(data: dict[str, Any]):
    kind = data["kind"]
    if kind == "sample":
        return Sample.from_dict(data)
    if kind == "stain":
        return StainSummary(np.asarray(data["he"], dtype=np.float64), np.asarray(data["max_c"], dtype=np.float64), int(data["stained"]), data["source"])
    if kind == "lab":
        return LabSummary(np.asarray(data["mean"], dtype=np.float64), np.asarray(data["std"], dtype=np.float64), data["source"])
    raise ValueError(f"unknown summary kind {kind!r}")


#: How every line :meth:`SummaryCache.add` writes begins (compact JSON, keys in this order).
_LINE_START = b'{"input":'


def _is_record(line: bytes) -> bool:
    """``line`` is one :meth:`SummaryCache.add` wrote: a JSON object with its keys."""
    try:
        row = json.loads(line)
    except ValueError:  # UnicodeDecodeError too
        return False
    return isinstance(row, dict) and {"input", "size", "mtime_ns", "config", "summary"} <= row.keys()


def _check_ours(path: Path, data: bytes) -> None:
    """Refuse ``data`` (the file's content) unless it is empty or a file of fitted inputs: its first line
    a record, or, when a kill cut the very first line short, the start of one.

    Raises
    ------
    OutputError
        It is not (nothing has been written to it).
    """
    first, newline, _ = data.partition(b"\n")
    if not data or (_is_record(first) if newline else data.startswith(_LINE_START)):
        return
    raise OutputError(
        path,
        "is not a file of fitted inputs of vipsnorm fit (its first line is not one of its records); left "
        "unchanged: give --cache a new file name, or delete this file if it is a damaged one",
    )


class SummaryCache:
    """An open summaries file: :meth:`get` what an earlier run kept, :meth:`add` what this one makes."""

    def __init__(self, path: Path, config: str, fd: int, kept: dict[tuple[str, int, int], Any]):
        self.path, self.config, self._fd, self._kept = path, config, fd, kept

    @classmethod
    def open(cls, path: str | os.PathLike[str], config: str, *, reuse: bool = True) -> "SummaryCache":
        """Open (or create) the file at ``path``, taking the lines of ``config`` (none if not ``reuse``).

        Raises
        ------
        OutputError
            It cannot be opened, another fit holds it, or it is not empty and not a file of fitted
            inputs (its first line is not one of the records :meth:`add` writes); it is left unchanged.
        """
        path = Path(path)
        fd, _ = open_locked(
            path,
            os.O_RDWR | os.O_APPEND,
            cannot_open="cannot open the file of fitted inputs ({})",
            busy="another vipsnorm fit is using this file; wait for it to end",
        )
        try:
            with open(os.dup(fd), "rb") as f:
                data = f.read()
            _check_ours(path, data)  # before any change: the file may be something else given by mistake
            if data and not data.endswith(b"\n"):  # a line cut short by a kill: drop it before appending
                os.ftruncate(fd, data.rfind(b"\n") + 1)
            kept: dict[tuple[str, int, int], Any] = {}
            for line in data.splitlines() if reuse else ():
                try:
                    row = json.loads(line)
                    if row.get("config") == config:  # later lines win
                        kept[row["input"], int(row["size"]), int(row["mtime_ns"])] = _decode(row["summary"])
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # cut short, or not ours
        except BaseException:
            os.close(fd)
            raise
        return cls(path, config, fd, kept)

    def get(self, path: str, size: int | None, mtime_ns: int | None):
        """The summary kept for ``path`` with this size and mtime, or None."""
        if size is None or mtime_ns is None:
            return None
        return self._kept.get((os.path.abspath(path), size, mtime_ns))

    def add(self, path: str, size: int | None, mtime_ns: int | None, summary) -> None:
        """Keep ``summary`` of ``path`` (as it was when it was listed: ``size``, ``mtime_ns``)."""
        if size is None or mtime_ns is None or summary is None:
            return
        row = {"input": os.path.abspath(path), "size": size, "mtime_ns": mtime_ns, "config": self.config, "summary": _encode(summary)}
        line = json.dumps(row, separators=(",", ":")) + "\n"
        try:
            os.write(self._fd, line.encode())
        except OSError as exc:
            raise OutputError(self.path, f"cannot write the file of fitted inputs ({exc.strerror or exc})") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock
            self._fd = -1

    def __enter__(self) -> "SummaryCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
