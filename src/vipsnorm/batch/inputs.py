"""What a batch processes and where each result goes: inputs found in paths, folders and list files,
mapped onto an output tree that mirrors theirs and never leaves the output folder.

Three kinds of input:

- a **file** given by name: its output goes to the top of the output folder, named after it;
- a **folder**: searched recursively for files matching the include patterns (hidden files and folders,
  and the output folder itself, are never entered); each output keeps its path relative to the folder;
- a **list file**: ``.csv`` with an ``input`` column and an optional ``output`` column (the output's
  path relative to the output folder; its suffix is chosen by ``--format`` as for every output), or
  text with one input per line (``#`` comments). Relative inputs are relative to the list file's
  folder; without an ``output`` column the tree below the list file's folder is mirrored (below the
  deepest folder common to every entry, when some lie outside it). Output names that are absolute or
  hold ``..`` are refused: they are recorded as errors and nothing is written for them.

Two inputs that would share an output folder and name (whatever their suffixes: ``x.svs`` and
``x.tif`` both become ``x.tif``), and an output that could replace an input, are refused before any
work starts; the first input keeps the name.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import OutputError
from ..io.write import PART_MARKER

__all__ = [
    "DEFAULT_INCLUDE",
    "SLIDE_SUFFIXES",
    "Entry",
    "Item",
    "discover",
    "read_list",
    "safe_relative",
    "plan",
    "group",
    "output_folder",
    "remove_part_files",
    "file_stat",
    "PART_FILE",
]

#: Searched for in folders unless ``include`` says otherwise (matched case-insensitively on the name).
DEFAULT_INCLUDE = (
    "*.svs", "*.tif", "*.tiff", "*.ndpi", "*.vms", "*.vmu", "*.scn", "*.mrxs", "*.svslide", "*.bif",
    "*.dcm", "*.jpg", "*.jpeg", "*.png", "*.webp",
)  # fmt: skip
#: Whole-slide formats: always one task each, however small the file (an MRXS's pixels are elsewhere).
SLIDE_SUFFIXES = frozenset({".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"})
#: A temporary output left by a killed write (:func:`vipsnorm.io.write.atomic_path`).
PART_FILE = re.compile(r"^\.(?P<stem>.*)" + re.escape(PART_MARKER) + r"[0-9a-f]{8}(\.[^./]*)?$")


@dataclass(frozen=True)
class Entry:
    """One input found, before planning.

    Attributes
    ----------
    path : str
        Absolute, lexically normalized path (symbolic links kept).
    rel_dir : str
        Output folder relative to the output root, POSIX separators, ``""`` for the root itself.
    name : str
        Output file name without suffix.
    error : str, optional
        Why this entry cannot be processed (recorded as an error, never run).
    """

    path: str
    rel_dir: str = ""
    name: str = ""
    error: str | None = None


@dataclass(frozen=True)
class Item:
    """One planned input: an :class:`Entry` with its position in the batch and its size and mtime."""

    index: int
    input: str
    rel_dir: str
    name: str
    size: int | None = None
    mtime_ns: int | None = None
    error: str | None = None

    @property
    def solo(self) -> bool:
        """A whole-slide format: one task of its own."""
        return Path(self.input).suffix.lower() in SLIDE_SUFFIXES


def _one_line_ok(path: str) -> bool:
    return "\n" not in path and "\r" not in path


def _matches(name: str, rel: str, patterns: Sequence[str]) -> bool:
    """``name`` (or, for patterns with a ``/``, the relative path) matches one of ``patterns``."""
    for pattern in patterns:
        target = rel if "/" in pattern else name
        if fnmatch.fnmatch(target.lower(), pattern.lower()):
            return True
    return False


def _walk(folder: str, include: Sequence[str], exclude: Sequence[str], skip: set[str]) -> Iterable[Entry]:
    """Files below ``folder`` matching ``include`` and not ``exclude``, in sorted order.

    Symbolic links to folders are followed (``archive/2019 -> /mnt/disk2/2019`` is a common layout); a
    folder already visited on the way down (a link cycle) is not entered again.
    """
    entered: set[str] = set()

    def visit(current: str, rel: str):
        real = os.path.realpath(current)
        if real in entered:
            return
        entered.add(real)
        try:
            with os.scandir(current) as it:
                children = sorted(it, key=lambda d: d.name)
        except OSError as exc:
            yield Entry(current, error=f"{current}: cannot list the folder ({exc.strerror or exc})")
            return
        for child in children:
            if child.name.startswith("."):
                continue  # hidden files and folders, our own temporary outputs among them
            child_rel = f"{rel}/{child.name}" if rel else child.name
            if child.is_dir():  # a symbolic link to a folder too
                if os.path.realpath(child.path) not in skip:
                    yield from visit(child.path, child_rel)
            elif child.is_file() and _matches(child.name, child_rel, include):
                if _matches(child.name, child_rel, exclude):
                    continue
                if not _one_line_ok(child.path):
                    shown = child.path.replace("\n", "\\n").replace("\r", "\\r")
                    yield Entry(shown, error=f"{shown}: the file name holds a line break; rename it")
                    continue
                yield Entry(child.path, rel, Path(child.name).stem)

    yield from visit(folder, "")


def safe_relative(name: str) -> PurePosixPath:
    """``name`` as a path relative to the output folder; refused if it could lead out of it.

    Both ``/`` and ``\\`` separate folders; ``.`` parts are dropped.

    Raises
    ------
    ValueError
        Empty, absolute (``/x``, ``\\x``, ``C:x``), holding a ``..`` part or a line break, or naming a
        hidden file.
    """
    if not name or not name.strip():
        raise ValueError("the output name is empty")
    if "\0" in name or not _one_line_ok(name):
        raise ValueError(f"the output name {name!r} holds a control character")
    text = name.replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise ValueError(f"the output name {name!r} is absolute; give a path relative to the output folder")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"the output name {name!r} holds '..'; it must stay inside the output folder")
    if not parts:
        raise ValueError(f"the output name {name!r} names no file")
    if parts[-1].startswith("."):
        raise ValueError(f"the output name {name!r} names a hidden file")
    return PurePosixPath(*parts)


def read_list(path: str | os.PathLike[str]) -> list[tuple[str, str | None]]:
    """The ``(input, output or None)`` pairs of a list file, inputs as written.

    Raises
    ------
    ValueError
        The list cannot be read, or a CSV list has no ``input`` column.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the list ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the list is not UTF-8 text") from None
    pairs: list[tuple[str, str | None]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if "input" not in columns:
            raise ValueError(f"{path}: a CSV list needs an 'input' column (and may have an 'output' column)")
        reader.fieldnames = columns
        for row in reader:
            value = (row.get("input") or "").strip()
            if value:
                out = (row.get("output") or "").strip() if "output" in columns else ""
                pairs.append((value, out or None))
        return pairs
    for line in text.split("\n"):  # not splitlines(): form feeds and the like may be in file names
        line = line.strip("\r").strip()
        if line and not line.startswith("#"):
            pairs.append((line, None))
    return pairs


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _list_entries(list_file: str | os.PathLike[str]) -> list[Entry]:
    list_path = Path(os.path.abspath(list_file))
    base = str(list_path.parent)
    pairs = read_list(list_path)
    absolute = [os.path.normpath(os.path.join(base, p)) for p, _ in pairs]
    mirrored = [a for a, (_, out) in zip(absolute, pairs) if out is None]
    root = base
    if mirrored and not all(_under(a, base) for a in mirrored):
        root = os.path.commonpath([os.path.dirname(a) for a in mirrored])
    entries = []
    for path, (_, out) in zip(absolute, pairs):
        if not _one_line_ok(path):
            entries.append(Entry(path.replace("\n", "\\n"), error=f"{list_path}: an input name holds a line break"))
            continue
        if out is None:
            rel = os.path.relpath(os.path.dirname(path), root)
            rel = "" if rel == "." else PurePosixPath(*Path(rel).parts).as_posix()
            entries.append(Entry(path, rel, Path(path).stem))
            continue
        try:
            target = safe_relative(out)
        except ValueError as exc:
            entries.append(Entry(path, error=f"{path}: {exc} (in {list_path}); nothing written"))
            continue
        parent = target.parent.as_posix()
        entries.append(Entry(path, "" if parent == "." else parent, PurePosixPath(target.name).stem or target.name))
    return entries


def discover(
    inputs: Sequence[str | os.PathLike[str]] = (),
    lists: Sequence[str | os.PathLike[str]] = (),
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    skip: Iterable[str | os.PathLike[str]] = (),
) -> list[Entry]:
    """Every input named by ``inputs`` (files and folders) and ``lists`` (list files), in order, each once.

    Parameters
    ----------
    include, exclude : sequence of str
        Shell patterns for files found in folders (default :data:`DEFAULT_INCLUDE`); matched on the
        file name, or on the path relative to the folder when the pattern holds a ``/``. Files named
        directly or in a list are always taken.
    skip : iterable of path-like
        Folders never searched (the output folder).

    Raises
    ------
    ValueError
        A list file cannot be read.
    """
    include = tuple(include) if include else DEFAULT_INCLUDE
    skip_real = {os.path.realpath(s) for s in skip}
    entries: list[Entry] = []
    for given in inputs:
        path = os.path.abspath(given)
        if not _one_line_ok(path):
            entries.append(Entry(path.replace("\n", "\\n"), error="the name holds a line break; rename it"))
        elif os.path.isdir(path) and any(_under(os.path.realpath(path), s) for s in skip_real):
            entries.append(Entry(path, error=f"{path}: is the output folder or inside it; choose another -o folder"))
        elif os.path.isdir(path):
            found = list(_walk(path, include, exclude, skip_real))
            if not found:
                entries.append(
                    Entry(path, error=f"{path}: is a directory holding no input (none matches {' '.join(include)})")
                )
            entries += found
        else:
            entries.append(Entry(path, "", Path(path).stem))
    for list_file in lists:
        entries += _list_entries(list_file)
    seen: set[str] = set()
    unique = []
    for entry in entries:
        if entry.path not in seen:
            seen.add(entry.path)
            unique.append(entry)
    return unique


def file_stat(path: str) -> tuple[int | None, int | None]:
    """``(size, mtime_ns)`` of ``path``, or ``(None, None)`` when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def plan(entries: Sequence[Entry], out_root: str | os.PathLike[str]) -> list[Item]:
    """Number the entries, stat them, and refuse outputs that would collide or replace an input.

    Names are compared case-insensitively and without suffixes (the suffix of an output is known only
    once its input is open), so the check is conservative: ``x.jpg`` and ``x.png`` in one folder are
    refused too.
    """
    out_root = os.path.abspath(out_root)
    out_real = os.path.realpath(out_root)
    # inputs that live inside the output folder, by the output key they would be overwritten through
    real_parents: dict[str, str] = {}
    inside: dict[tuple[str, str], str] = {}
    for entry in entries:
        if entry.error is not None:
            continue
        parent = os.path.dirname(entry.path)
        real = real_parents.get(parent)
        if real is None:
            real = real_parents[parent] = os.path.realpath(parent)
        if _under(real, out_real):
            rel = os.path.relpath(real, out_real)
            rel = "" if rel == "." else PurePosixPath(*Path(rel).parts).as_posix()
            inside.setdefault((rel.lower(), Path(entry.path).stem.lower()), entry.path)
    taken: dict[tuple[str, str], str] = {}
    items = []
    for index, entry in enumerate(entries):
        size, mtime = file_stat(entry.path) if entry.error is None else (None, None)
        error = entry.error
        if error is None:
            key = (entry.rel_dir.lower(), entry.name.lower())
            shown = os.path.join(out_root, *entry.rel_dir.split("/"), entry.name) + ".*"
            if key in inside:
                other = inside[key]
                if other == entry.path or os.path.realpath(other) == os.path.realpath(entry.path):
                    error = f"{entry.path}: output {shown} could overwrite the input; choose another -o folder"
                else:
                    error = (
                        f"{entry.path}: output {shown} could overwrite another input of this run ({other}); "
                        "choose another -o folder"
                    )
            elif key in taken:
                error = (
                    f"{entry.path}: output {shown} is already the output of {taken[key]}; rename one of them "
                    "or give output names in a --list CSV"
                )
            else:
                taken[key] = entry.path
        items.append(Item(index, entry.path, entry.rel_dir, entry.name, size, mtime, error))
    return items


def group(items: Sequence[Item], *, max_files: int, max_bytes: int, solo_bytes: int) -> list[list[Item]]:
    """Tasks: every whole-slide file (by format, or ``solo_bytes`` and larger) alone, the others in
    runs of at most ``max_files`` files and ``max_bytes`` bytes, in order. Solo tasks come first,
    largest first, so that the longest work starts early."""
    solo, groups, current, current_bytes = [], [], [], 0
    for item in items:
        size = item.size or 0
        if item.solo or size >= solo_bytes:
            solo.append([item])
            continue
        if current and (len(current) >= max_files or current_bytes + size > max_bytes):
            groups.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += size
    if current:
        groups.append(current)
    solo.sort(key=lambda g: -(g[0].size or 0))
    return solo + groups


def output_folder(out_root: str | os.PathLike[str], rel_dir: str) -> Path:
    """Create and return ``out_root/rel_dir``, refusing any way out of ``out_root``.

    Raises
    ------
    OutputError
        ``rel_dir`` is not a plain relative path, or an existing folder on the way is a symbolic link
        that leads outside ``out_root``.
    """
    root = Path(out_root)
    if rel_dir:
        try:
            rel = safe_relative(rel_dir)
        except ValueError as exc:
            raise OutputError(root, str(exc)) from None
        target = root.joinpath(*rel.parts)
    else:
        target = root
    existing = target
    while not existing.exists() and existing != root:
        existing = existing.parent
    if not _under(os.path.realpath(existing), os.path.realpath(root)):
        raise OutputError(target, f"leads outside the output folder {root} (a symbolic link?); nothing written")
    target.mkdir(parents=True, exist_ok=True)
    return target


def remove_part_files(folders: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Delete the temporary outputs a killed run left in ``folders`` (not below them); return them."""
    removed = []
    for folder in folders:
        try:
            with os.scandir(folder) as it:
                names = [d.name for d in it if d.is_file(follow_symlinks=False) and PART_FILE.match(d.name)]
        except OSError:
            continue
        for name in names:
            path = Path(folder) / name
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed
