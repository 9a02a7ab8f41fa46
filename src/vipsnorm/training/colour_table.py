"""Full-colour lookup tables: a per-pixel normalization of a patch as one table lookup per pixel.

A fitted per-pixel method (the LUT methods and the stain methods; not CLAHE, which looks at a pixel's
surroundings) maps every input colour to one output colour, whatever its place in the slide. Cutting
many patches from one slide, the same colours come back again and again, and looking each up in a
table of all 2**24 RGB colours is several times cheaper than running the method's libvips pipeline
(four operations for Macenko, about ten for Reinhard) on every patch: 0.15 ms for a 256 px patch.

The table is filled lazily: a colour is computed, through the method's own libvips pipeline
(``method.apply`` on an image of the missing colours), the first time a patch holds it, so that no
time is spent on the millions of colours a slide never shows, and every output is the pipeline's own
value: a patch read through the table equals the same window of the lazily normalized slide bit for
bit (tested for every per-pixel method).

Memory: a table is 64 MiB of address space (one 32-bit entry per colour), allocated zeroed by the
system on demand, so only the pages of the colours met are resident (a few to a few tens of MiB on
H&E slides). :func:`colour_table` keeps at most :data:`MAX_TABLES` of them per process, most recently
used first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import pyvips

from ..methods import Method, Params

__all__ = ["ColourTable", "colour_table", "table_key", "per_pixel", "MAX_TABLES"]

#: Tables kept per process (each up to 64 MiB, usually a fraction of it resident).
MAX_TABLES = 4
#: Entry ``R | G << 8 | B << 16`` (little-endian: the bytes R, G, B) holds the output colour the same
#: way, with ``_FILLED`` in its top byte once computed.
_FILLED = np.uint32(0xFF000000)
#: While a colour is being computed its entry holds ``_MARK | position`` (below ``_FILLED``: unfilled).
_MARK = np.uint32(0x01000000)
_POSITION = np.uint32(0x00FFFFFF)
#: Pixels whose missing colours are filled at once (their positions must fit below ``_MARK``).
_MAX_FILL = 1 << 23
#: Colours computed per libvips fetch.
_CHUNK = 1 << 16
_ENTRY = np.dtype("<u4")


def per_pixel(method: Method | None) -> bool:
    """Whether ``method``'s output at a pixel depends on that pixel's colour only (a table can hold it)."""
    return method is not None and not method.spatial


def _index(pixels: np.ndarray) -> np.ndarray:
    """``R | G << 8 | B << 16`` of every pixel of an ``(..., 3)`` uint8 array, or of an ``(..., 4)``
    one whose fourth band is 0 (read as little-endian uint32: no arithmetic), flat uint32."""
    if pixels.shape[-1] == 4 and pixels.flags.c_contiguous:
        return pixels.reshape(-1).view(_ENTRY)
    flat = pixels.reshape(-1, pixels.shape[-1])
    index = flat[:, 2].astype(np.uint32)
    index <<= 16
    green = flat[:, 1].astype(np.uint32)
    green <<= 8
    index |= green
    index |= flat[:, 0]
    return index


class ColourTable:
    """The output colour of every input colour under one fitted per-pixel ``method`` and ``params``,
    filled on first use (see the module documentation). Safe to call from several threads: lookups take
    no lock; filling missing colours takes one."""

    def __init__(self, method: Method, params: Params):
        if not per_pixel(method):
            raise ValueError(f"{method.name} is not a per-pixel method: a colour table cannot hold it")
        self.method, self.params = method, params
        self._entries = np.zeros(1 << 24, _ENTRY)  # calloc: pages are mapped as entries are written
        self._lock = threading.Lock()
        self._pipeline: pyvips.Image | None = None

    @property
    def filled(self) -> int:
        """How many colours have been computed so far."""
        return int(np.count_nonzero(self._entries))

    def _compute(self, colours: np.ndarray) -> np.ndarray:
        """The method's libvips pipeline on ``(n, 3)`` uint8 colours, as ``(n, 3)`` uint8 (under the lock).

        The pipeline is built once, on a row of :data:`_CHUNK` pixels over a buffer of ours: building
        it (its lookup tables made into images) costs more than running it on a patch's new colours.
        libvips reads the buffer whenever a region is fetched, and none of the methods' operations
        keeps pixels between fetches.
        """
        if self._pipeline is None:
            self._buffer = np.zeros((_CHUNK, 3), np.uint8)
            source = pyvips.Image.new_from_memory(self._buffer.data, _CHUNK, 1, 3, "uchar")
            self._pipeline = self.method.apply(source, self.params)
        out = np.empty(colours.shape, np.uint8)
        for start in range(0, colours.shape[0], _CHUNK):
            chunk = colours[start : start + _CHUNK]
            n = chunk.shape[0]
            self._buffer[:n] = chunk
            data = pyvips.Region.new(self._pipeline).fetch(0, 0, n, 1)  # in this thread, no thread pool
            out[start : start + n] = np.frombuffer(data, np.uint8).reshape(n, 3)
        return out

    def _fill(self, index: np.ndarray, colours: np.ndarray) -> np.ndarray:
        """Compute the entries ``index`` (of ``colours``; a colour may come many times) that are not
        filled yet, and return the filled entries of all of them."""
        with self._lock:  # the marks below are private to one filler; readers see them as unfilled
            entries = self._entries
            current = entries.take(index)
            for start in range(0, index.size, _MAX_FILL):
                part = current[start : start + _MAX_FILL]  # a view: filled in place
                todo = entries.take(index[start : start + _MAX_FILL]) < _FILLED  # (an earlier part may have filled some)
                where = index[start : start + _MAX_FILL][todo]
                # one representative per distinct colour: each position writes a mark holding its
                # number, and the position that reads back its own mark computes the colour for all
                positions = np.arange(where.size, dtype=np.uint32)
                entries[where] = positions | _MARK
                first = (entries.take(where) & _POSITION) == positions
                out = self._compute(colours[start : start + _MAX_FILL][todo][first]).astype(np.uint32)
                entries[where[first]] = out[:, 0] | (out[:, 1] << 8) | (out[:, 2] << 16) | _FILLED
                part[:] = entries.take(index[start : start + _MAX_FILL])
            return current

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb`` (an ``(h, w, 3)`` uint8 array) mapped by the method: a new ``(h, w, 3)`` uint8 array."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise ValueError(f"a colour table maps (h, w, 3) uint8 arrays, not {rgb.dtype} {rgb.shape}")
        return self._map(rgb)

    def map_rgbx(self, rgbx: np.ndarray) -> np.ndarray:
        """The same for an ``(h, w, 4)`` uint8 array with 0 in its fourth band (a libvips fetch of the
        image with a zero band joined): its bytes are the table's indices as they are (a nonzero fourth
        band makes an index out of range: IndexError)."""
        if rgbx.dtype != np.uint8 or rgbx.ndim != 3 or rgbx.shape[-1] != 4:
            raise ValueError(f"map_rgbx maps (h, w, 4) uint8 arrays, not {rgbx.dtype} {rgbx.shape}")
        return self._map(np.ascontiguousarray(rgbx))

    def _map(self, pixels: np.ndarray) -> np.ndarray:
        index = _index(pixels)
        values = self._entries.take(index)
        if values.size and values.min() < _FILLED:  # (a reduction: no mask of the whole patch when nothing is missing)
            # positions, not a boolean mask: a patch usually misses a few hundred of its 65536 colours,
            # and two masked selections over the whole patch cost more than the lookups (0.1 ms)
            missing = np.flatnonzero(values < _FILLED)
            values[missing] = self._fill(index[missing], pixels.reshape(-1, pixels.shape[-1])[missing, :3])
        # band by band from the byte view: twice as fast as one copy of the (n, 4)[:, :3] slice
        entries = values.view(np.uint8).reshape(-1, 4)
        out = np.empty((*pixels.shape[:2], 3), np.uint8)
        flat = out.reshape(-1, 3)
        for band in range(3):
            flat[:, band] = entries[:, band]
        return out


_TABLES: OrderedDict[tuple, ColourTable] = OrderedDict()
_TABLES_LOCK = threading.Lock()


def table_key(method: Method, params: Params) -> tuple:
    """What identifies a table: the method's class and the params' repr (apply depends on the params
    alone, all frozen tuples and floats). A caller that asks often keeps it (a repr costs 10 us)."""
    return (type(method), repr(params))


def colour_table(method: Method, params: Params, key: tuple | None = None) -> ColourTable:
    """The process's table for ``method`` fitted as ``params`` (made, or reused when the same fit asked
    for one before); at most :data:`MAX_TABLES` are kept, the least recently used dropped. ``key``:
    :func:`table_key` of the two, if the caller has it."""
    key = table_key(method, params) if key is None else key
    with _TABLES_LOCK:
        table = _TABLES.get(key)
        if table is None:
            table = _TABLES[key] = ColourTable(method, params)
            while len(_TABLES) > MAX_TABLES:
                _TABLES.popitem(last=False)
        else:
            _TABLES.move_to_end(key)
        return table
