"""What a batch processes and where each result goes: inputs found in paths, folders and list files,
mapped onto an output tree that mirrors theirs and never leaves the output folder.

Three kinds of input:

- a **file** given by name: its output goes to the top of the output folder, named after it;
- a **folder**: searched recursively for files matching the include patterns (hidden files and folders,
  and the output folder itself, are never entered); each output keeps its path relative to the folder;
- a **list file**: ``.csv`` with an ``input`` column and an optional ``output`` column (the output's
  path relative to the output folder; its suffix is chosen by ``--format`` as for every output), or
  text with one input per line (a line starting with ``#`` is a comment: write ``./#x.svs`` for a
  file whose name starts with ``#``; blank lines and lines of spaces only are skipped). Names are
  taken exactly, spaces included: a text line loses only its line ending, a CSV value is what the
  CSV reader reads. Relative inputs are relative to the list file's folder; without an ``output``
  column the tree below the list file's folder is mirrored (below the deepest folder common to every
  entry, when some lie outside it). Output names that are absolute or hold ``..`` are refused: they
  are recorded as errors and nothing is written for them.

An output that would be named like vipsnorm's own files (a temporary output, :data:`PART_FILE`, which
every run's cleanup deletes, or ``.vipsnorm-*``) is refused by :func:`plan`, and so is an input that is
not a regular file (a FIFO, a device, a socket: named on the command line or in a list; a folder
search takes regular files only).

Names that lead to the same file through symbolic links are one input, under the first name given,
when they would also have the same output (``link -> real`` given as two folders: the same work, done
once); with different outputs (``train/cat/x.png`` and ``val/cat/x.png``, both links to
``pool/x.png``) each name is an input of its own, written to its own place in the mirrored tree. A fit
takes every file once, whatever its names (``discover(once_per="file")``): a file pooled twice would
weigh twice in the reference.

Two inputs that would share an output folder and name (whatever their suffixes: ``x.svs`` and
``x.tif`` both become ``x.tif``), and an output that could replace an input, are refused before any
work starts; the first input keeps the name. Outputs are compared where they are actually written: with
``\\`` read as a folder separator (as :func:`safe_relative` does for every output folder) and symbolic
links to folders inside the output folder followed.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import OutputError
from ..io.write import PART_MARKER, name_max

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
    "input_stat",
    "PART_FILE",
    "OWN_PREFIX",
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
#: How vipsnorm's own hidden files in an output folder begin (the marker of a live run,
#: ``.vipsnorm-run-KEY``; ``vipsnorm patches``' ``.vipsnorm-rows`` and ``.vipsnorm-patches``).
OWN_PREFIX = ".vipsnorm-"


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
    real : str, optional
        The file ``path`` leads to, symbolic links followed, as :func:`discover` found it (so that
        :func:`plan` need not look again: one ``lstat`` a file, a server round trip on NFS); None: not
        known. Not compared: an entry is its name and output.
    """

    path: str
    rel_dir: str = ""
    name: str = ""
    error: str | None = None
    real: str | None = field(default=None, compare=False, repr=False)


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
    folder that is one of its own ancestors (a link cycle) is not entered again. Two links to one
    folder in different places (``train/cat`` and ``val/cat`` -> ``pool/cat``) are both searched: their
    files have different places in the mirrored tree, and :func:`discover` decides what is one input.
    """

    def visit(current: str, rel: str, ancestors: frozenset[str]):
        real = os.path.realpath(current)
        if real in ancestors:
            return
        ancestors = ancestors | {real}
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
                    yield from visit(child.path, child_rel, ancestors)
            elif child.is_file() and _matches(child.name, child_rel, include):
                if _matches(child.name, child_rel, exclude):
                    continue
                if not _one_line_ok(child.path):
                    shown = child.path.replace("\n", "\\n").replace("\r", "\\r")
                    yield Entry(shown, error=f"{shown}: the file name holds a line break; rename it")
                    continue
                yield Entry(child.path, rel, Path(child.name).stem)

    yield from visit(folder, "", frozenset())


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
    """The ``(input, output or None)`` pairs of a list file, inputs (and outputs) exactly as written:
    nothing is stripped but a text line's line ending (``\n`` or ``\r\n``). Comments (text lines
    starting with ``#``), blank lines, lines of spaces only and CSV rows without an input are skipped;
    an output cell that is empty (or spaces only) is None.

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
        for row in reader:  # values as the csv module reads them: '" a.jpg"' names " a.jpg"
            value = row.get("input") or ""
            if value.strip():  # a row without an input (empty, or spaces) is skipped
                out = (row.get("output") or "") if "output" in columns else ""
                pairs.append((value, out if out.strip() else None))
        return pairs
    for line in text.split("\n"):  # not splitlines(): form feeds and the like may be in file names
        if line.endswith("\r"):  # a CRLF line ending; nothing else is removed: " a.jpg" names " a.jpg"
            line = line[:-1]
        if line.strip() and not line.startswith("#"):  # blank lines, and lines of spaces, are skipped
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
    once_per: str = "output",
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
    once_per : {"output", "file"}
        What makes two names one input when symbolic links lead them to the same file (the first name
        given is kept). ``"output"`` (normalize): the same file *and* the same output folder and name,
        as :func:`plan` compares them (folders with ``\\`` as a separator, names case-insensitively):
        the same work, listed once, while the same file under two outputs (``train/cat/x.png`` and
        ``val/cat/x.png``, links to one pool) is two inputs, each written to its place. ``"file"``
        (fit): the same file, whatever its outputs: a file pooled twice would weigh twice in a
        reference. Hard links are separate names in either case.

    Raises
    ------
    ValueError
        A list file cannot be read, or ``once_per`` is neither ``"output"`` nor ``"file"``.
    """
    if once_per not in ("output", "file"):
        raise ValueError(f"once_per must be 'output' or 'file', not {once_per!r}")
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
    # ``real`` and a link to it (``link -> real``, named as a folder, inside a folder or in a list) with
    # one output would otherwise be normalized twice (the second refused as a collision), and any two
    # names of one file pooled twice by a fit. But one file under two outputs is two inputs for
    # normalize: ML layouts link one pool into train/ and val/, and both trees must be complete.
    # Symbolic links only: hard links are names of their own (a dataset de-duplicated by hard links).
    # Each entry keeps the file it leads to, for plan() (one lstat a name, made once).
    seen: set = set()
    parents: dict[str, str] = {}
    folder_keys: dict[str, str] = {}
    unique = []
    for entry in entries:
        if entry.error is not None:
            key = real = entry.path
        else:
            real = _real_file(entry.path, parents)
            if once_per == "file":
                key = real
            else:
                folder = folder_keys.get(entry.rel_dir)
                if folder is None:
                    folder = folder_keys[entry.rel_dir] = _folder_key(entry.rel_dir)
                key = (real, folder, entry.name.lower())
        if key not in seen:
            seen.add(key)
            if entry.error is None:
                entry = Entry(entry.path, entry.rel_dir, entry.name, None, real)
            unique.append(entry)
    return unique


def _folder_key(rel_dir: str) -> str:
    """``rel_dir`` as :func:`plan` compares output folders before following links: ``\\`` separates
    folders, empty and ``.`` parts dropped, case ignored."""
    return "/".join(p for p in rel_dir.replace("\\", "/").split("/") if p not in ("", ".")).lower()


def _real_parent(path: str, parents: dict[str, str]) -> str:
    """``os.path.realpath`` of the folder of ``path``, looked up once per folder in ``parents``."""
    parent = os.path.dirname(path)
    real = parents.get(parent)
    if real is None:
        real = parents[parent] = os.path.realpath(parent)
    return real


def _real_file(path: str, parents: dict[str, str]) -> str:
    """``os.path.realpath(path)`` at the cost of one ``lstat`` (folders resolved once, in ``parents``)."""
    real = os.path.join(_real_parent(path, parents), os.path.basename(path))
    return os.path.realpath(real) if os.path.islink(real) else real


def file_stat(path: str) -> tuple[int | None, int | None]:
    """``(size, mtime_ns)`` of ``path``, or ``(None, None)`` when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def input_stat(path: str) -> tuple[int | None, int | None, str | None]:
    """``(size, mtime_ns, error)`` of the input ``path`` (one ``stat``): as :func:`file_stat`, with why it
    cannot be an input when it is a FIFO, a device or a socket (a read would block, never end, or see 0
    bytes), else None. A name that leads to no file is left to the worker, which reports it."""
    try:
        st = os.stat(path)
    except OSError:
        return None, None, None
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return st.st_size, st.st_mtime_ns, None
    return None, None, f"{path}: not a regular file (a FIFO, device or socket); nothing read"


def _folder_parts(rel_dir: str) -> tuple[str, ...]:
    """The folders of ``rel_dir`` as :func:`output_folder` creates them (``\\`` separates folders too).

    Raises
    ------
    ValueError
        As :func:`safe_relative`.
    """
    return safe_relative(rel_dir).parts if rel_dir else ()


def _existing(path: str) -> str:
    """``path`` or its nearest existing ancestor (where the file system can be asked about names)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


#: The shortest suffix an output takes (``.tif``, ``.jpg``, ``.png``): a name that leaves no room for it
#: is refused when planning; one too long only with a longer suffix (``.tiff``) by the worker.
_MIN_SUFFIX = 4


def plan(entries: Sequence[Entry], out_root: str | os.PathLike[str]) -> list[Item]:
    """Number the entries, stat them, and refuse outputs that would collide or replace an input.

    Outputs are compared where they are written: their folder as :func:`output_folder` makes it (``\\``
    separates folders) and with symbolic links to folders inside ``out_root`` followed, so ``a\\b/x`` and
    ``a/b/x``, or ``alias/x`` and ``real/x`` when ``alias -> real``, are one output. Names are compared
    case-insensitively and without suffixes (the suffix of an output is known only once its input is
    open), so the check is conservative: ``x.jpg`` and ``x.png`` in one folder are refused too. An
    output folder that leads outside ``out_root``, a folder or file name too long for the file system,
    an output named like vipsnorm's own files (:func:`_own_file_name`) and an input that is not a
    regular file (:func:`input_stat`) are refused too. The items' ``rel_dir`` are the folders as written
    (``a/b`` for ``a\\b``), so that a rerun finds its outputs where the manifest recorded them.
    """
    out_root = os.path.abspath(out_root)
    out_real = os.path.realpath(out_root)
    limit = name_max(_existing(out_real))
    parents: dict[str, str] = {}
    # inputs that live inside the output folder, by the output key they would be overwritten through:
    # the name they were given, and the file itself when that name is a symbolic link (known from
    # discover, which looked already: not asked again)
    inside: dict[tuple[str, str], str] = {}
    for entry in entries:
        if entry.error is not None:
            continue
        named = os.path.join(_real_parent(entry.path, parents), os.path.basename(entry.path))
        real = entry.real if entry.real is not None else _real_file(entry.path, parents)
        for path in {named, real}:
            folder, name = os.path.split(path)
            if _under(folder, out_real):
                inside.setdefault((folder.lower(), Path(name).stem.lower()), entry.path)
    folders: dict[str, tuple[tuple[str, ...], str] | str] = {}  # rel_dir -> (parts, real folder) or error
    taken: dict[tuple[str, str], str] = {}
    items = []
    for index, entry in enumerate(entries):
        size, mtime, error = input_stat(entry.path) if entry.error is None else (None, None, entry.error)
        rel_dir = entry.rel_dir
        if error is None:
            folder = folders.get(entry.rel_dir)
            if folder is None:
                folder = folders[entry.rel_dir] = _output_folder_of(entry.rel_dir, out_root, out_real, limit)
            if isinstance(folder, str):
                error = f"{entry.path}: {folder}"
            else:
                parts, real = folder
                rel_dir = "/".join(parts)
                error = _output_error(entry, out_root, out_real, parts, real, limit, inside, taken)
        items.append(Item(index, entry.path, rel_dir, entry.name, size, mtime, error))
    return items


def _output_folder_of(rel_dir: str, out_root: str, out_real: str, limit: int) -> tuple[tuple[str, ...], str] | str:
    """``(folders, real path)`` of the output folder ``rel_dir``, or why it cannot be used."""
    try:
        parts = _folder_parts(rel_dir)
    except ValueError as exc:
        return f"{exc}; nothing written"
    shown = os.path.join(out_root, *parts)
    for part in parts:
        if len(os.fsencode(part)) > limit:
            return (
                f"output folder {shown} has a name of more than {limit} bytes, too long for the file system; "
                "rename the folder, or give shorter output names in a --list CSV"
            )
    real = os.path.realpath(shown)
    if not _under(real, out_real):
        return f"output folder {shown} leads outside the output folder {out_root} (a symbolic link?); nothing written"
    return parts, real


def _output_error(
    entry: Entry,
    out_root: str,
    out_real: str,
    parts: tuple[str, ...],
    real: str,
    limit: int,
    inside: dict[tuple[str, str], str],
    taken: dict[tuple[str, str], str],
) -> str | None:
    """Why ``entry`` cannot have the output ``real/name.*`` (None if it can; then it takes it)."""
    shown = os.path.join(out_root, *parts, entry.name) + ".*"
    if real != os.path.join(out_real, *parts):  # a link inside the output folder
        shown += f" (that is {os.path.join(real, entry.name)}.*, links followed)"
    if len(os.fsencode(entry.name)) + _MIN_SUFFIX > limit:
        return (
            f"{entry.path}: output {shown} needs a name of more than {limit} bytes, too long for the file "
            "system; rename the input, or give a shorter output name in a --list CSV"
        )
    if _own_file_name(entry.name):
        return (
            f"{entry.path}: output {shown} would have a name vipsnorm keeps for its own temporary files, which "
            "every run deletes; rename the input, or give another output name in a --list CSV; nothing written"
        )
    key = (real.lower(), entry.name.lower())
    if key in inside:
        other = inside[key]
        if other == entry.path or os.path.realpath(other) == os.path.realpath(entry.path):
            return f"{entry.path}: output {shown} could overwrite the input; choose another -o folder"
        return (
            f"{entry.path}: output {shown} could overwrite another input of this run ({other}); "
            "choose another -o folder"
        )
    if key in taken:
        return (
            f"{entry.path}: output {shown} is already the output of {taken[key]}; rename one of them "
            "or give output names in a --list CSV"
        )
    taken[key] = entry.path
    return None


def _own_file_name(name: str) -> bool:
    """True when an output ``name`` + suffix would be taken for a file of vipsnorm's own: a temporary
    output (:data:`PART_FILE`, which the run's cleanup deletes) or a name beginning :data:`OWN_PREFIX`."""
    return name.startswith(OWN_PREFIX) or PART_FILE.match(name + ".tif") is not None


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

    Errors name the folder in their cause but no file, so that the caller's
    :meth:`~vipsnorm.errors.VipsnormError.about` names the input whose output it was to hold.

    Raises
    ------
    OutputError
        ``rel_dir`` is not a plain relative path, an existing folder on the way is a symbolic link
        that leads outside ``out_root``, or the folder cannot be created.
    """
    root = Path(out_root)
    if rel_dir:
        try:
            rel = safe_relative(rel_dir)
        except ValueError as exc:
            raise OutputError(None, f"output folder {rel_dir!r} in {root}: {exc}; nothing written") from None
        target = root.joinpath(*rel.parts)
    else:
        target = root
    try:
        existing = target
        while not existing.exists() and existing != root:
            existing = existing.parent
        if not _under(os.path.realpath(existing), os.path.realpath(root)):
            raise OutputError(
                None, f"output folder {target} leads outside the output folder {root} (a symbolic link?); nothing written"
            )
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission, a name too long
        raise OutputError(None, f"cannot create the output folder {target} ({exc.strerror or exc})") from None
    return target


def remove_part_files(folders: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Delete the temporary outputs a killed run left in ``folders`` (not below them); return them.

    Never raises: a folder that cannot be listed, or a part file that cannot be deleted (gone already,
    ``EACCES``, ``EROFS``, ``EIO``), is passed over. A leftover is hidden and never taken for an output,
    so one left in place costs disk space, while an error here would end a run that can do its work.
    """
    removed = []
    for folder in folders:
        try:
            with os.scandir(folder) as it:
                names = [d.name for d in it if PART_FILE.match(d.name) and _plain_file(d)]
        except OSError:
            continue
        for name in names:
            path = Path(folder) / name
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def _plain_file(entry: os.DirEntry) -> bool:
    """``entry`` is a file, not a link (False when that cannot be told: a file system without file types
    in its listings makes this an ``lstat``, which may fail)."""
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False
