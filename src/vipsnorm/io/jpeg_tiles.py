"""Windows of JPEG-tiled TIFF levels read straight from the file, decoding only what they need.

A random 256 px patch of a slide with 256 px tiles meets four tiles, and libvips (like OpenSlide)
decodes all of each: four tiles of work for one tile of pixels. :class:`JpegTiles` reads the tiles'
bytes itself (:func:`read_layout` finds them in the TIFF directory) and has libjpeg-turbo make only
the pixels of each tile inside the window (``_jpegtiles.c``): rows outside it are skipped (entropy
decoding only) and columns cropped, the same bytes as libvips gives. A tile's data are decoded to
their end the first time it is read (a garbled tile can give wrong pixels with no warning until
further down), and later windows of it stop after their last row.

It serves :class:`~vipsnorm.training.patches.PatchReader` through
:meth:`vipsnorm.io.slide.VipsSlide.jpeg_tiles`, which uses a level only after a window of it read
both ways came out equal, and reads any window it fails on (a damaged or missing tile, anything
libjpeg warns about) through libvips, which then reports what is wrong as it always does.

Tiles are also kept, as their JPEG coefficients, in one store for the process (48 MB unless
``VIPSNORM_KEPT_TILES_MB`` or :func:`set_kept_budget` says otherwise; least recently used given back
first): a later window of a kept tile is an output pass over its coefficients, with no entropy decoding.
Random patches read in row order meet 40% of their tiles again. Keeping costs a read that finds no kept
tile about a tenth more, so tiles are kept only while recent reads would have found theirs kept (shuffled
reads of a large slide go on decoding the other way). A level keeps tiles only once kept reads of its
checked window gave libvips' bytes too (:attr:`JpegTiles.keeping`).

A level also streams whole into libvips through :meth:`JpegTiles.native_level` and
:meth:`vipsnorm.io.slide.VipsSlide.stream_image` (a slide written out): libvips' TIFF loader decodes the
tiles of one file one at a time, while here every libvips thread decodes tiles of the row they work in,
and pyvips-binary's decoder (mozjpeg) takes about twice as long a tile as the system's libjpeg-turbo.
Rows of tiles are kept decoded three at a time (9 bytes a pixel of the level's width, times the tile
height: 46 MB for a 20,000 px wide slide with 256 px tiles).

The decoder is an optional extension built when libjpeg-turbo's headers are present; without it, or
with ``VIPSNORM_NATIVE=0`` in the environment (which also turns off the colour kernel), windows come
from libvips. :func:`available` and :func:`reason` say which.
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import math
import os
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "available", "reason", "TileLayout", "read_layout", "JpegTiles", "SharedFile", "NativeLevel", "keeping_supported",
    "set_kept_budget", "kept_stats",
]

#: VJ_VERSION of _jpegtiles.c
_VERSION = 7

# TIFF tags read here
_WIDTH, _LENGTH, _BITS, _COMPRESSION, _PHOTOMETRIC = 256, 257, 258, 259, 262
_ORIENTATION, _SAMPLES, _PLANAR, _SAMPLE_FORMAT = 274, 277, 284, 339
_TILE_WIDTH, _TILE_LENGTH, _TILE_OFFSETS, _TILE_COUNTS = 322, 323, 324, 325
_SUB_IFDS, _JPEG_TABLES = 330, 347
_JPEG = 7  # "new-style" JPEG compression (TIFF Technical Note 2), what slides use
_RGB, _YCBCR = 2, 6

# TIFF field types: numpy type (without byte order) and size
_TYPES = {
    1: ("u1", 1), 2: ("u1", 1), 3: ("u2", 2), 4: ("u4", 4), 6: ("i1", 1), 7: ("u1", 1), 8: ("i2", 2),
    9: ("i4", 4), 13: ("u4", 4), 16: ("u8", 8), 17: ("i8", 8), 18: ("u8", 8),
}
_MAX_IFDS = 100_000  # pages walked at most (a loop in a damaged file ends there)
_MAX_ENTRIES = 4096  # entries of one directory accepted


@dataclass(frozen=True)
class TileLayout:
    """Where the JPEG tiles of one TIFF directory (a level) are, and what they hold."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    rgb: bool  # photometric RGB (the JPEG streams hold RGB); False: YCbCr
    tables: bytes  # JPEGTables: the abbreviated stream of shared tables (may be empty)
    offsets: np.ndarray  # uint64, one a tile, row-major
    counts: np.ndarray  # uint64

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_height)


class _Directory:
    """The entries of one TIFF directory (IFD), values read when asked for."""

    def __init__(self, fh, offset: int, big: bool, order: str, size: int):
        self._fh, self._big, self._order, self._size = fh, big, order, size
        fh.seek(offset)
        count_format, entry_size, inline = ("Q", 20, 8) if big else ("H", 12, 4)
        raw = fh.read(8 if big else 2)
        (count,) = struct.unpack(order + count_format, raw)
        if not 0 < count <= _MAX_ENTRIES:
            raise ValueError(f"a directory of {count} entries")
        data = fh.read(count * entry_size + (8 if big else 4))
        if len(data) != count * entry_size + (8 if big else 4):
            raise ValueError("a directory cut short")
        self.entries: dict[int, tuple[int, int, bytes]] = {}
        for i in range(count):
            entry = data[i * entry_size:(i + 1) * entry_size]
            tag, kind = struct.unpack(order + "HH", entry[:4])
            (n,) = struct.unpack(order + ("Q" if big else "I"), entry[4:12] if big else entry[4:8])
            self.entries[tag] = (kind, n, entry[12:20] if big else entry[8:12])
        (self.next,) = struct.unpack(order + ("Q" if big else "I"), data[count * entry_size:])
        self._inline = inline

    def values(self, tag: int) -> np.ndarray | None:
        entry = self.entries.get(tag)
        if entry is None:
            return None
        kind, n, field = entry
        if kind not in _TYPES:
            raise ValueError(f"tag {tag} has type {kind}")
        code, size = _TYPES[kind]
        nbytes = n * size
        if nbytes <= self._inline:
            raw = field[:nbytes]
        else:
            (offset,) = struct.unpack(self._order + ("Q" if self._big else "I"), field)
            if offset + nbytes > self._size:
                raise ValueError(f"tag {tag}'s values lie past the end of the file")
            self._fh.seek(offset)
            raw = self._fh.read(nbytes)
        values = np.frombuffer(raw, ("<" if self._order == "<" else ">") + code)
        return values.astype(np.uint64 if code[0] == "u" else np.int64)

    def value(self, tag: int, default: int | None = None) -> int | None:
        values = self.values(tag)
        if values is None or len(values) == 0:
            return default
        return int(values[0])

    def raw(self, tag: int) -> bytes | None:
        values = self.values(tag)
        return None if values is None else values.astype(np.uint8).tobytes()


def read_layout(path: str | os.PathLike[str], page: int = 0, subifd: int | None = None) -> TileLayout | None:
    """The JPEG tiles of page ``page`` (or of its sub-IFD ``subifd``) of the TIFF at ``path``: None when
    that directory is not 8-bit, 3-sample, chunky, JPEG-compressed tiles in upright orientation (what
    :class:`JpegTiles` reads), or the file is not a TIFF this reads.

    Raises
    ------
    OSError
        The file cannot be read.
    ValueError
        The TIFF structure is damaged (a directory or values past the end of the file, a loop).
    """
    try:
        return _read_layout(path, page, subifd)
    except struct.error as exc:  # a field cut short by the end of the file
        raise ValueError(f"a damaged TIFF directory ({exc})") from exc


def _read_layout(path: str | os.PathLike[str], page: int, subifd: int | None) -> TileLayout | None:
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(16)
        if head[:2] not in (b"II", b"MM"):
            return None
        order = "<" if head[:2] == b"II" else ">"
        (magic,) = struct.unpack(order + "H", head[2:4])
        if magic == 42:
            big, (offset,) = False, struct.unpack(order + "I", head[4:8])
        elif magic == 43 and len(head) == 16:
            big, (offset,) = True, struct.unpack(order + "Q", head[8:16])
        else:
            return None
        seen = set()
        directory = None
        for _ in range(page + 1):
            if offset == 0 or offset >= size or offset in seen or len(seen) >= _MAX_IFDS:
                raise ValueError(f"the TIFF has no page {page}" if offset == 0 else "a damaged TIFF directory chain")
            seen.add(offset)
            directory = _Directory(fh, offset, big, order, size)
            offset = directory.next
        if subifd is not None:
            subs = directory.values(_SUB_IFDS)
            if subs is None or not 0 <= subifd < len(subs):
                raise ValueError(f"page {page} has no sub-IFD {subifd}")
            directory = _Directory(fh, int(subs[subifd]), big, order, size)
        return _layout(directory)


def _layout(d: _Directory) -> TileLayout | None:
    bits = d.values(_BITS)
    if (
        d.value(_COMPRESSION) != _JPEG
        or d.value(_SAMPLES, 1) != 3
        or bits is None or not np.all(bits == 8)
        or d.value(_PLANAR, 1) != 1
        or d.value(_SAMPLE_FORMAT, 1) != 1
        or d.value(_ORIENTATION, 1) != 1
        or d.value(_PHOTOMETRIC) not in (_RGB, _YCBCR)
        or d.value(_TILE_WIDTH) is None
    ):
        return None
    width, height = d.value(_WIDTH), d.value(_LENGTH)
    tile_width, tile_height = d.value(_TILE_WIDTH), d.value(_TILE_LENGTH)
    if not width or not height or not tile_width or not tile_height or tile_width > 65535 or tile_height > 65535:
        return None
    offsets, counts = d.values(_TILE_OFFSETS), d.values(_TILE_COUNTS)
    tiles = -(-width // tile_width) * -(-height // tile_height)
    if offsets is None or counts is None or len(offsets) < tiles or len(counts) < tiles:
        return None
    return TileLayout(
        width, height, tile_width, tile_height, d.value(_PHOTOMETRIC) == _RGB, d.raw(_JPEG_TABLES) or b"",
        np.ascontiguousarray(offsets[:tiles], np.uint64), np.ascontiguousarray(counts[:tiles], np.uint64),
    )


class SharedFile:
    """A file open for reading, shared by the readers of a slide's levels: closed by :meth:`close`, or
    when the last object holding it is collected (a slide a dataset drops, say)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.fd: int | None = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self):
        try:
            self.close()
        except Exception:  # (interpreter shutdown)
            pass


#: keep modes of vj_window: off; keep tiles while recent reads would have met theirs kept; always keep
KEEP_OFF, KEEP_ADAPTIVE, KEEP_ALWAYS = 0, 1, 2
_keys = itertools.count(1)  # readers' numbers in the store of kept tiles


class JpegTiles:
    """Windows of one level (a :class:`TileLayout` of the file at ``path``), decoded straight from the
    file. The file is held open until :meth:`close` (a file replaced since is still read as it was
    when the layout was read; ``file``: read through that :class:`SharedFile`, which :meth:`close`
    leaves open for its other holders). Several threads may read at once.

    With :attr:`keeping` on (:meth:`vipsnorm.io.slide.VipsSlide.jpeg_tiles` turns it on once a check of
    the level's kept tiles gives libvips' bytes), tiles decoded for a window may be kept as their JPEG
    coefficients in the process's store (:func:`set_kept_budget`), so that a later window of the same
    tile skips its entropy decoding: random patches read in row order meet 40% of their tiles again.
    Tiles are kept only while recent reads would have found theirs (shuffled reads of a large slide
    seldom do, and keeping costs a read that finds none about a tenth more)."""

    def __init__(self, path: str | os.PathLike[str], layout: TileLayout, file: SharedFile | None = None):
        lib = _load()[0]
        if lib is None:
            raise RuntimeError(f"direct JPEG tile reads are off: {reason()}")
        self.path, self.layout, self._lib = Path(path), layout, lib
        self._owns_file = file is None
        self._file: SharedFile | None = SharedFile(path) if file is None else file
        self._tables = ctypes.create_string_buffer(layout.tables, max(len(layout.tables), 1))
        self._valid = np.zeros(len(layout.offsets), np.uint8)  # tiles decoded to their end cleanly
        self._key = next(_keys)
        #: whether windows may keep their tiles' coefficients (see the class); off until turned on
        self.keeping = False

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray | None:
        """The ``(height, width, 3)`` uint8 window at ``(x, y)`` (a new array), or None when a tile of it
        cannot be decoded cleanly (read it through libvips, which says what is wrong) or the reader is
        closed.

        Raises
        ------
        ValueError
            The window is not wholly inside the level.
        """
        return self._read(x, y, width, height, KEEP_ADAPTIVE if self.keeping else KEEP_OFF)

    def _read(self, x: int, y: int, width: int, height: int, keep: int) -> np.ndarray | None:
        """:meth:`read`, keeping tiles as ``keep`` says (``KEEP_*``)."""
        layout, file = self.layout, self._file
        fd = None if file is None else file.fd
        if not (0 <= x and 0 <= y and width > 0 and height > 0
                and x + width <= layout.width and y + height <= layout.height):
            raise ValueError(f"window {width}x{height} at ({x}, {y}) is not inside {layout.width}x{layout.height}")
        if fd is None:
            return None
        out = np.empty((height, width, 3), np.uint8)
        status = self._lib.vj_window(
            fd, self._tables, len(layout.tables), layout.offsets.ctypes.data, layout.counts.ctypes.data,
            self._valid.ctypes.data, len(layout.offsets), layout.tiles_across, layout.tile_width,
            layout.tile_height, layout.width, layout.height, int(layout.rgb), x, y, width, height, out.ctypes.data,
            self._key, keep,
        )
        return out if status == 0 else None

    def native_level(self) -> NativeLevel | None:
        """A C copy of this level (tables, offsets, its own file descriptor) for a libvips image that
        decodes it in libvips' threads (:func:`vipsnorm._native.tile_source`), or None when the reader is
        closed or out of memory or file descriptors."""
        layout, file = self.layout, self._file
        fd = None if file is None else file.fd
        if fd is None:
            return None
        level = self._lib.vj_level_new(
            fd, self._tables, len(layout.tables), layout.offsets.ctypes.data, layout.counts.ctypes.data,
            len(layout.offsets), layout.tiles_across, layout.tile_width, layout.tile_height, layout.width,
            layout.height, int(layout.rgb),
        )
        return NativeLevel(self._lib, level) if level else None

    def valid_tiles(self) -> int:
        """How many tiles have been decoded to their end without a warning (after which windows of
        them stop after their last row)."""
        return int(np.count_nonzero(self._valid))

    def kept_bytes(self) -> int:
        """Bytes of this reader's tiles kept in the store now."""
        return int(self._lib.vj_keep_held(self._key))

    def forget_kept(self) -> None:
        """Give back this reader's kept tiles (their memory) now."""
        self._lib.vj_keep_drop(self._key)

    def close(self) -> None:
        """Stop reading (later reads give None), give back kept tiles; close the file if this reader
        opened it. Not while another thread reads."""
        file, self._file = self._file, None
        self.keeping = False
        self.forget_kept()
        if file is not None and self._owns_file:
            file.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # (interpreter shutdown)
            pass


class NativeLevel:
    """One holder of a C level (``vj_level``); the libvips image made of it is another
    (:meth:`share`). :meth:`close` gives its memory (rows of decoded tiles) and its file descriptor back
    at once, even while libvips still holds the image (its operation cache may, for a while): the image
    then reads through libvips' loader. Closed when collected, too."""

    def __init__(self, lib: ctypes.CDLL, pointer: int):
        self._lib, self.pointer = lib, pointer
        self.read = ctypes.cast(lib.vj_level_read, ctypes.c_void_p).value  # address of vj_level_read
        self.free = ctypes.cast(lib.vj_level_free, ctypes.c_void_p).value  # of vj_level_free

    def share(self) -> int:
        """The level's address, with one more holder (to be let go with :attr:`free`)."""
        if not self.pointer:
            raise ValueError("the level is closed")
        self._lib.vj_level_ref(self.pointer)
        return self.pointer

    def close(self) -> None:
        pointer, self.pointer = self.pointer, 0
        if pointer:
            self._lib.vj_level_release(pointer)
            self._lib.vj_level_free(pointer)

    def __del__(self):
        try:
            self.close()
        except Exception:  # (interpreter shutdown)
            pass


_loaded: tuple[ctypes.CDLL | None, str] | None = None
_load_lock = threading.Lock()


def _load() -> tuple[ctypes.CDLL | None, str]:
    global _loaded
    if _loaded is None:
        with _load_lock:
            if _loaded is None:
                _loaded = _load_library()
    return _loaded


def _load_library() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("VIPSNORM_NATIVE", "1") == "0":
        return None, "switched off (VIPSNORM_NATIVE=0)"
    spec = importlib.util.find_spec("vipsnorm._jpegtiles")
    if spec is None or not spec.origin:
        return None, "not built (libjpeg-turbo's headers were missing at install, e.g. Debian's libjpeg62-turbo-dev)"
    try:
        lib = ctypes.CDLL(spec.origin)
        if lib.vj_version() != _VERSION:
            return None, f"built from another version (VJ_VERSION {lib.vj_version()}, expected {_VERSION}): reinstall"
    except (OSError, AttributeError) as exc:
        return None, f"cannot be loaded ({exc})"
    lib.vj_window.restype = ctypes.c_int
    lib.vj_window.argtypes = [
        ctypes.c_int, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
    ]
    # the store of kept tiles
    lib.vj_keep_supported.restype = ctypes.c_int
    lib.vj_keep_configure.restype = None
    lib.vj_keep_configure.argtypes = [ctypes.c_uint64]
    lib.vj_keep_drop.restype = None
    lib.vj_keep_drop.argtypes = [ctypes.c_uint64]
    lib.vj_keep_held.restype = ctypes.c_int64
    lib.vj_keep_held.argtypes = [ctypes.c_uint64]
    lib.vj_keep_stats.restype = None
    lib.vj_keep_stats.argtypes = [ctypes.c_void_p]
    lib.vj_keep_configure(_budget_from_environment())
    # a level as a libvips source (vipsnorm._native.tile_source)
    lib.vj_level_new.restype = ctypes.c_void_p
    lib.vj_level_new.argtypes = [
        ctypes.c_int, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
    ]
    for name in ("vj_level_free", "vj_level_ref", "vj_level_release"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    # whole files (vipsnorm.io.small_jpeg)
    lib.vj_decode.restype = ctypes.c_int
    lib.vj_decode.argtypes = [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
    ]
    lib.vj_encode.restype = ctypes.c_int
    lib.vj_encode.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_ulong),
    ]
    lib.vj_save.restype = ctypes.c_int
    lib.vj_save.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_ulong),
    ]
    lib.vj_free.restype = None
    lib.vj_free.argtypes = [ctypes.c_void_p]
    lib.vj_layout_count.restype = ctypes.c_int
    return lib, "loaded"


#: the store's budget unless VIPSNORM_KEPT_TILES_MB says otherwise: about 120 tiles of 256 px
DEFAULT_KEPT_MB = 48
_MAX_KEPT_MB = 1 << 20  # (a terabyte: larger budgets, "inf" among them, are taken as this)


def _budget_bytes(megabytes: float) -> int:
    """A budget in MB as bytes for the store: within 0 and _MAX_KEPT_MB.

    Raises
    ------
    ValueError
        Not a number, or negative.
    """
    megabytes = float(megabytes)
    if math.isnan(megabytes) or megabytes < 0:
        raise ValueError(f"a budget of {megabytes} MB (a number of MB, 0 or more)")
    return int(min(megabytes, _MAX_KEPT_MB) * (1 << 20))


def _budget_from_environment() -> int:
    """VIPSNORM_KEPT_TILES_MB in bytes; the default where it is unset, empty, or not a budget (with a
    warning: a misspelt value must not turn off reading)."""
    value = os.environ.get("VIPSNORM_KEPT_TILES_MB", "").strip()
    if value:
        try:
            return _budget_bytes(value)
        except ValueError:
            warnings.warn(f"VIPSNORM_KEPT_TILES_MB={value!r} is not a number of MB >= 0: "
                          f"keeping {DEFAULT_KEPT_MB} MB of tiles", RuntimeWarning, stacklevel=2)
    return _budget_bytes(DEFAULT_KEPT_MB)


def keeping_supported() -> bool:
    """Whether tiles can be kept as coefficients here (the decoder is built against a libjpeg-turbo
    whose internals it was checked on)."""
    lib = _load()[0]
    return lib is not None and bool(lib.vj_keep_supported())


def set_kept_budget(megabytes: float) -> None:
    """Bytes the process may keep tiles in (all readers together; 0 keeps none; more than a terabyte is
    taken as a terabyte). The default is ``VIPSNORM_KEPT_TILES_MB`` from the environment, or
    :data:`DEFAULT_KEPT_MB`; a data-loader worker process has its own store. Readers of levels opened
    while the budget was 0 do not keep tiles.

    Raises
    ------
    ValueError
        ``megabytes`` is negative or not a number.
    """
    budget = _budget_bytes(megabytes)  # (raises ValueError first)
    lib = _load()[0]
    if lib is not None:
        lib.vj_keep_configure(budget)


def kept_stats() -> dict[str, int]:
    """The store's counts: ``hits`` (tile reads served from kept tiles), ``loads`` (tiles kept),
    ``others`` (tile reads of keeping readers decoded without keeping: recent reads seldom met kept
    tiles), ``bytes`` and ``tiles`` kept now, ``budget``."""
    lib = _load()[0]
    out = np.zeros(6, np.int64)
    if lib is not None:
        lib.vj_keep_stats(out.ctypes.data)
    return dict(zip(("hits", "loads", "others", "bytes", "tiles", "budget"), map(int, out)))


def available() -> bool:
    """Whether windows can be decoded here (the extension is built and not switched off)."""
    return _load()[0] is not None


def reason() -> str:
    """Why :func:`available` says what it says."""
    return _load()[1]
