"""A random-access libvips image whose tiles come from Python, through a virtual uncompressed BigTIFF.

libvips has no public way to build a lazy image from a Python tile callback, but it can load a TIFF from
a custom source with seek support. We serve the bytes of an uncompressed tiled BigTIFF whose header and
tile-offset tables are computed arithmetically, and whose tile data is produced on demand by
``read_tile(tx, ty) -> (tile, tile, 3) uint8``. libvips then reads it like any tiled TIFF: random access,
its own tile cache, streaming pyramid writes, and nothing is ever held whole in memory.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import pyvips

__all__ = ["VirtualTiff"]

_SHORT, _LONG8 = 3, 16


class VirtualTiff:
    """Serve an uncompressed RGB tiled BigTIFF of ``width`` x ``height`` built from ``read_tile``.

    Parameters
    ----------
    width, height : int
        Image size in pixels.
    tile : int
        Tile size (a multiple of 16).
    read_tile : callable
        ``read_tile(tx, ty)`` returns a ``(tile, tile, 3)`` uint8 array; edge tiles may be smaller, they
        are padded with white.
    cache_tiles : int
        Decoded tiles kept (libvips keeps its own cache on top of this).
    """

    def __init__(
        self,
        width: int,
        height: int,
        tile: int,
        read_tile: Callable[[int, int], np.ndarray],
        cache_tiles: int = 16,
    ):
        self.width, self.height, self.tile = width, height, tile
        self._read_tile = read_tile
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_size = cache_tiles
        self.error: BaseException | None = None
        self.tiles_x = -(-width // tile)
        self.tiles_y = -(-height // tile)
        self.tile_bytes = tile * tile * 3
        self._header = self._build_header()
        self.data_start = len(self._header)
        self.size = self.data_start + self.tiles_x * self.tiles_y * self.tile_bytes
        self._pos = 0

    def _build_header(self) -> bytes:
        n_tiles = self.tiles_x * self.tiles_y
        entries = [
            (256, _LONG8, 1, self.width),
            (257, _LONG8, 1, self.height),
            (258, _SHORT, 3, None),  # BitsPerSample 8,8,8 (inline)
            (259, _SHORT, 1, 1),  # no compression
            (262, _SHORT, 1, 2),  # RGB
            (277, _SHORT, 1, 3),
            (284, _SHORT, 1, 1),  # chunky
            (322, _SHORT, 1, self.tile),
            (323, _SHORT, 1, self.tile),
            (324, _LONG8, n_tiles, "offsets"),
            (325, _LONG8, n_tiles, "counts"),
        ]
        ifd_offset = 16
        ifd_size = 8 + 20 * len(entries) + 8
        offsets_at = ifd_offset + ifd_size
        counts_at = offsets_at + 8 * n_tiles
        data_start = counts_at + 8 * n_tiles
        out = bytearray(b"II" + struct.pack("<HHHQ", 43, 8, 0, ifd_offset))
        out += struct.pack("<Q", len(entries))
        for tag, typ, count, value in entries:
            out += struct.pack("<HHQ", tag, typ, count)
            if value is None:
                out += struct.pack("<HHHH", 8, 8, 8, 0)
            elif value == "offsets":
                out += struct.pack("<Q", offsets_at if n_tiles > 1 else data_start)
            elif value == "counts":
                out += struct.pack("<Q", counts_at if n_tiles > 1 else self.tile * self.tile * 3)
            elif typ == _SHORT:
                out += struct.pack("<HHHH", value, 0, 0, 0)
            else:
                out += struct.pack("<Q", value)
        out += struct.pack("<Q", 0)  # no next IFD
        tile_bytes = self.tile * self.tile * 3
        out += (data_start + tile_bytes * np.arange(n_tiles, dtype="<u8")).tobytes()
        out += np.full(n_tiles, tile_bytes, dtype="<u8").tobytes()
        assert len(out) == data_start
        return bytes(out)

    def _tile_bytes(self, index: int) -> bytes:
        hit = self._cache.get(index)
        if hit is not None:
            self._cache.move_to_end(index)
            return hit
        ty, tx = divmod(index, self.tiles_x)
        pixels = np.asarray(self._read_tile(tx, ty), dtype=np.uint8)
        if pixels.shape != (self.tile, self.tile, 3):
            padded = np.full((self.tile, self.tile, 3), 255, np.uint8)
            padded[: pixels.shape[0], : pixels.shape[1]] = pixels
            pixels = padded
        data = pixels.tobytes()
        self._cache[index] = data
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return data

    def _read(self, size: int) -> bytes:
        if self.error is not None or self._pos >= self.size:
            return b""
        try:
            if self._pos < self.data_start:
                chunk = self._header[self._pos : self._pos + size]
            else:
                index, within = divmod(self._pos - self.data_start, self.tile_bytes)
                chunk = self._tile_bytes(index)[within : within + size]
        except BaseException as exc:  # reported by the owner; libvips sees end of file
            self.error = exc
            return b""
        self._pos += len(chunk)
        return chunk

    def _seek(self, offset: int, whence: int) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        self._pos = base + offset
        return self._pos

    def image(self, **options) -> pyvips.Image:
        """Open the virtual TIFF in libvips (lazy, random access)."""
        source = pyvips.SourceCustom()
        source.on_read(self._read)
        source.on_seek(self._seek)
        # pyvips keeps ``source`` (and through its callbacks, ``self``) alive with every image
        # derived from this one.
        return pyvips.Image.new_from_source(source, "", **options)
