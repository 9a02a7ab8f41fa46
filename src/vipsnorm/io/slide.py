"""One slide object for every input: a whole-slide image, a pyramidal TIFF or an ordinary picture.

Two backends sit behind :class:`Slide`:

* ``libvips`` (tiffload, jpegload, pngload, ...) for everything libvips decodes: ordinary images, Aperio
  SVS with JPEG tiles (pages become levels), generic pyramidal TIFF and OME-TIFF with sub-IFD levels.
  It is about 3x faster than OpenSlide on tiled TIFF.
* ``openslide`` for vendor formats (NDPI, MRXS, SCN, BIF, VMS, DICOM, ...) and for TIFF-based slides
  whose tiles libvips cannot decode (JPEG 2000 SVS: the header opens in libvips, the pixels fail). Its
  levels are streamed into libvips through a virtual TIFF, so they are lazy, random access and never
  held whole in memory.

:func:`open_slide` decides by probe-decoding a tile of the first and the last level with libvips.

Small ordinary images (not slides, at most :data:`SMALL_IMAGE_PIXELS` pixels) take a fast path: the
probe decodes the whole image once, into memory, in the processing format, and that one decoded image
serves the fit (:meth:`Slide.decoded_pixels`: histograms without another libvips pipeline) and the
apply and write (:meth:`Slide.level_image` returns it; with the native kernel the fit counts its own
buffer and the method maps it in place there, :meth:`Slide.take_decoded`). Streaming sets up a libvips pipeline for the
probe window, one for the histograms and one for the write, and at tile sizes that set-up costs more
than the pixels; above about a megapixel it no longer does (see :data:`SMALL_IMAGE_PIXELS`), so slides
and larger images keep streaming.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyvips

from .. import _native
from ..errors import ImageTooLargeError, one_line, UnreadableImageError, UnsupportedImageError, VipsnormError
from . import jpeg_tiles as _jpeg
from . import small_jpeg as _small_jpeg
from ._virtual_tiff import VirtualTiff
from .pixels import to_processing
from .write import checked_before_rename

__all__ = ["Level", "Slide", "open_slide", "DEFAULT_MAX_PIXELS", "SMALL_IMAGE_PIXELS", "BACKENDS"]

#: Refuse images whose level 0 claims more pixels than this (about a 160,000 x 125,000 slide).
DEFAULT_MAX_PIXELS = 20_000_000_000

#: Ordinary images of at most this many pixels take the in-memory fast path (see the module notes).
#: Measured CPU time per image of the whole equalize job, fast path against streaming: 512x512 11.7 ms
#: against 14.0, 724x724 19.5 against 21.3, 1024x1024 31.0 against 31.5, 1448x1448 68 against 63,
#: 2048x2048 133 against 118: above about a megapixel the libvips pipelines' set-up no longer dominates,
#: and they (two threads) beat the extra copy and numpy's one thread.
SMALL_IMAGE_PIXELS = 1024 * 1024

#: Suffixes of files opened first as JPEGs (see VipsSlide).
_JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")

#: Signatures of files that are ordinary images whatever their content, by suffix: OpenSlide reads none
#: of these formats, so asking it to detect a vendor (0.4 ms a file) is skipped.
_PLAIN_SIGNATURES = {
    ".jpg": b"\xff\xd8\xff",
    ".jpeg": b"\xff\xd8\xff",
    ".png": b"\x89PNG\r\n\x1a\n",
}

#: OpenSlide vendors whose files are TIFF that libvips' tiffload can read page by page.
_TIFF_VENDORS = {"aperio", "generic-tiff"}

_APERIO_MPP = re.compile(r"\bMPP\s*=\s*([0-9.eE+-]+)")


def _vips_error_text() -> str:
    """libvips' error buffer (one for the process; what failing calls and some warnings left)."""
    return pyvips.ffi.string(pyvips.vips_lib.vips_error_buffer()).decode("utf-8", "replace")


#: libvips keeps at most this many bytes of error text (VIPS_MAX_ERROR) and ends a full buffer with "...".
_VIPS_ERROR_ROOM = 10240


def _new_vips_errors(before: str) -> tuple[list[str], bool]:
    """The lines of libvips' error buffer added since it read ``before`` (all of it if it was cleared in
    between), and whether the buffer is full (later lines were dropped; the last may be cut short)."""
    now = _vips_error_text()
    added = now[len(before) :] if now.startswith(before) else now
    full = len(now.encode("utf-8")) >= _VIPS_ERROR_ROOM - 256 or now.rstrip().endswith("...")
    return [line.strip() for line in added.splitlines() if line.strip()], full


class _Unsure(Exception):
    """A trace in libvips' error buffer that may not be this slide's (another decode ran at the same
    time) or a buffer too full to read: :meth:`Slide.decode` decides again with the process to itself."""


class _Decodes:
    """The :meth:`Slide.decode` calls in progress in this process: any number share it, and a re-check
    has it alone (it waits for those in progress; new ones wait for it)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._started = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[Callable[[], bool]]:
        """Yields ``alone()``: no other decode was in progress when this one began, nor began since."""
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            alone = self._active == 0
            self._active += 1
            self._started += 1
            start = self._started
        try:
            yield lambda: alone and self._started == start
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._active:
                self._cond.wait()
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


#: Held while a file is opened, read, fitted and written (:func:`open_slide`,
#: :func:`vipsnorm.engine.normalize_file`, :func:`~vipsnorm.engine.sample_file`,
#: :func:`vipsnorm.training.patches.extract_slide`, ``PatchReader.read``): one file at a time per
#: process, whatever the threads calling (other :class:`Slide` methods called from several threads at
#: once: hold it around them). Damage that libvips lets pass (a JPEG tile of a TIFF filled with grey,
#: a JPEG's harmless warnings told from harmful ones) is told only by libvips' error buffer, which is
#: one for the process and which pyvips clears on every failed call and failed property lookup, from
#: any thread: two files read at once in one process could each lose the other's trace or take it for
#: their own (measured with two threads: a damaged slide normalized and reported ok 33 times in 40, a
#: healthy one refused with the other's error 22 times in 40). A file's own reading threads (its
#: sampled tiles, CLAHE's halves) are :meth:`Slide.decode`'s concern.
FILE_LOCK = threading.RLock()
if hasattr(os, "register_at_fork"):
    # a child forked while another thread held it (a plain-fork data loader) would wait for it forever;
    # reset in place: other modules hold the lock object itself
    os.register_at_fork(after_in_child=FILE_LOCK._at_fork_reinit)


def one_file_at_a_time(fn):
    """``fn`` run holding :data:`FILE_LOCK`."""

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with FILE_LOCK:
            return fn(*args, **kwargs)

    return locked


_DECODES = _Decodes()
_IN_DECODE = threading.local()
if hasattr(os, "register_at_fork"):
    # a child forked during another thread's decode would count it as in progress forever, and a
    # re-check there would wait for it
    os.register_at_fork(after_in_child=lambda: _DECODES.__init__())


@dataclass(frozen=True)
class Level:
    """One resolution level: size in pixels and downsample factor relative to level 0."""

    width: int
    height: int
    downsample: float


class Slide(ABC):
    """A readable image with one or more resolution levels.

    Attributes
    ----------
    path : pathlib.Path
    backend : str
        ``"libvips"`` or ``"openslide"``.
    vendor : str or None
        OpenSlide's vendor name (``"aperio"``, ``"hamamatsu"``, ``"generic-tiff"``, ...) or ``None`` for
        ordinary images.
    loader : str
        The libvips loader (``"jpegload"``, ``"tiffload"``, ...) or ``"openslide"``.
    levels : tuple of Level
        Level 0 first; downsample of level 0 is 1.
    mpp : tuple of float or None
        Microns per pixel (x, y) at level 0, where the file records it.
    associated : tuple of str
        Names of associated images (label, macro, thumbnail): listed, never processed.
    """

    path: Path
    backend: str
    vendor: str | None
    loader: str
    levels: tuple[Level, ...]
    mpp: tuple[float, float] | None
    associated: tuple[str, ...]
    #: Why this slide was found damaged by a :meth:`decode` that libvips let pass, if it was: every
    #: later decode refuses it with the same cause. libvips keeps the tile it filled with grey in the
    #: level's cache, and would hand it back to a second read of the window without a word (a patch
    #: read again in the next epoch, a dataset's slide kept open).
    _damage_found: str | None = None

    @property
    def is_slide(self) -> bool:
        """True for whole-slide images (vendor format or pyramid): fitting then uses tissue only."""
        return self.vendor is not None or len(self.levels) > 1

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.levels[0].width, self.levels[0].height

    @abstractmethod
    def _level(self, level: int) -> pyvips.Image:
        """The level as the loader gives it (any format/bands)."""

    def level_image(self, level: int = 0) -> pyvips.Image:
        """Lazy pixels of ``level`` in the processing format (uchar, 1 or 3 bands)."""
        self._check_level(level)
        return to_processing(self._level(level), str(self.path))

    def _check_level(self, level: int) -> None:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level < len(self.levels):
            raise ValueError(f"{self.path}: no level {level!r}; levels are 0 to {len(self.levels) - 1}")

    def _check_window(self, level: int, x: int, y: int, width: int, height: int) -> Level:
        """The level of a window inside it (at least one pixel, starting inside the level; it is cut at
        the level's right and bottom edges)."""
        self._check_level(level)
        lvl = self.levels[level]
        if not (0 <= x < lvl.width and 0 <= y < lvl.height and width >= 1 and height >= 1):
            raise ValueError(
                f"{self.path}: window {width}x{height} at ({x}, {y}) does not start inside level {level} "
                f"({lvl.width}x{lvl.height}) or is empty"
            )
        return lvl

    def independent_level_image(self, level: int = 0) -> pyvips.Image | None:
        """The pixels of :meth:`level_image` from a loader of their own (not shared with it, nor cached),
        for a pass that reads part of a level while another part is read from :meth:`level_image`:
        libvips decodes one loaded TIFF's tiles one at a time. ``None`` where that gains nothing (the
        pixels are in memory, or come through OpenSlide)."""
        return None

    def stream_image(self, level: int = 0) -> pyvips.Image:
        """The pixels of :meth:`level_image`, for one pass over the whole level from top to bottom (a
        slide written out): where the direct reader decodes the level (:meth:`jpeg_tiles`), its tiles
        are decoded by all of libvips' threads at once, a row of tiles at a time, rather than one at a
        time by libvips' TIFF loader. Same bytes; slow for scattered windows (each costs a row of
        tiles): read those from :meth:`level_image`."""
        return self.level_image(level)

    def jpeg_tiles(self, level: int) -> _jpeg.JpegTiles | None:
        """A direct reader of ``level``'s windows (:class:`~vipsnorm.io.jpeg_tiles.JpegTiles`: only a
        window's pixels are made from its JPEG tiles), giving the bytes of :meth:`level_image`, or
        ``None`` where there is none (not JPEG tiles it reads, the decoder is off, or a check of it
        failed): read windows from :meth:`level_image` then, and also where its ``read`` gives None."""
        return None

    def decoded_pixels(self) -> np.ndarray | None:
        """Level 0 in the processing format as an ``(h, w, bands)`` uint8 array, when the slide holds it
        decoded in memory (small ordinary images, see :data:`SMALL_IMAGE_PIXELS`); ``None`` otherwise
        (stream it through :meth:`level_image`). Read-only."""
        return None

    def holds_decoded(self) -> bool:
        """Whether :meth:`decoded_pixels` gives an array (level 0 is held decoded in memory), without
        copying it out."""
        return False

    def take_decoded(self) -> tuple[pyvips.Image, np.ndarray] | None:
        """Hand over level 0 held decoded in memory, to be changed in place: the memory image (with the
        input's metadata) and a writable ``(h, w, bands)`` uint8 array over its pixels; the slide forgets
        them (a later :meth:`level_image` reads the file again). Arrays that :meth:`decoded_pixels` gave
        before see the change. ``None`` where the slide holds no such pixels of its own, or without the
        native kernel (:func:`vipsnorm._native.memory_pixels`)."""
        return None

    def decoded_luma(self) -> np.ndarray | None:
        """The BT.601 luma (:func:`~vipsnorm.methods._hist.luma_array`) of :meth:`decoded_pixels` as an
        ``(h, w)`` uint8 array, computed once and kept while the slide is open, when level 0 is held
        decoded in colour; ``None`` otherwise. Read-only."""
        return None

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels of a window of ``level`` as a uint8 array: ``(h, w, 3)`` for colour, ``(h, w)`` for grey
        (bounded size). The window must start inside the level; it is cut at the right and bottom edges.

        Raises
        ------
        ValueError
            No such level, or a window that is empty or starts outside the level.
        UnreadableImageError
            Its pixels fail to decode.
        """
        self._check_window(level, x, y, width, height)
        image = self.level_image(level)
        width = min(width, image.width - x)
        height = min(height, image.height - y)
        return self.decode(lambda: image.crop(x, y, width, height).numpy())

    def best_level_for_downsample(self, downsample: float) -> int:
        """The highest-numbered level whose downsample does not exceed ``downsample``."""
        best = 0
        for index, lvl in enumerate(self.levels):
            if lvl.downsample <= downsample * 1.001:
                best = index
        return best

    def decode(self, work):
        """Run ``work()`` (which reads pixels) and turn decode failures into one-line errors, those that
        libvips lets pass included (see :meth:`_damage`): an output that ``work()`` writes through
        :func:`~vipsnorm.io.write.atomic_path` is then discarded before it is renamed into place.

        libvips' error buffer, where some of that damage leaves its only trace, is one for the process:
        when another decode ran at the same time (another thread) and a trace appeared, or the buffer
        filled up, ``work()`` is run again with the process's decodes to itself before a slide is
        refused. A ``decode`` inside another (same thread) leaves the check to the outer one. A slide
        found damaged stays so: every later decode refuses it with the same cause (``_damage_found``).
        """
        if self._damage_found is not None:
            raise UnreadableImageError(self.path, self._damage_found)
        if getattr(_IN_DECODE, "active", False):  # the outer decode checks, its hook still set
            try:
                return work()
            except pyvips.Error as exc:
                raise UnreadableImageError(self.path, self._decode_cause(exc)) from exc
        _IN_DECODE.active = True
        try:
            try:
                with _DECODES.shared() as alone:
                    return self._decode_once(work, alone, sure=False)
            except _Unsure:
                pass
            with _DECODES.exclusive():
                pyvips.vips_lib.vips_error_clear()
                return self._decode_once(work, lambda: True, sure=True)
        finally:
            _IN_DECODE.active = False

    def _decode_once(self, work, alone: Callable[[], bool], sure: bool):
        if alone():
            pyvips.vips_lib.vips_error_clear()  # what is left there is no decode's: room for this one
        before = _vips_error_text()

        def check() -> None:
            damage = self._damage(before, alone(), sure)
            if damage:
                self._damage_found = f"cannot decode pixels ({damage})"
                raise UnreadableImageError(self.path, self._damage_found)

        try:
            with checked_before_rename(check):  # an output written by work() is checked before it is kept
                result = work()
        except pyvips.Error as exc:
            raise UnreadableImageError(self.path, self._decode_cause(exc)) from exc
        check()
        return result

    def _decode_cause(self, exc: Exception) -> str:
        return f"cannot decode pixels ({one_line(str(exc))})"

    def _damage(self, before: str, alone: bool, sure: bool) -> str | None:
        """A decode failure that ``work()`` in :meth:`decode` did not raise, or ``None``. ``before`` is
        libvips' error text before the work; ``alone``: no other decode overlapped it; ``sure``: the
        re-check, with the process's decodes to itself (raise :class:`_Unsure` to ask for it)."""
        return None

    def describe(self) -> dict:
        """Metadata as a JSON-friendly dict (for ``vipsnorm inspect`` and manifests)."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "loader": self.loader,
            "vendor": self.vendor,
            "is_slide": self.is_slide,
            "levels": [
                {"width": lvl.width, "height": lvl.height, "downsample": round(lvl.downsample, 4)}
                for lvl in self.levels
            ],
            "mpp": None if self.mpp is None else [round(v, 6) for v in self.mpp],
            "associated": list(self.associated),
        }

    def close(self) -> None:
        """Release file handles (libvips images are released when dropped)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (
            f"<{type(self).__name__} {self.path.name} {w}x{h} levels={len(self.levels)} "
            f"vendor={self.vendor} mpp={self.mpp}>"
        )


class VipsSlide(Slide):
    """A slide or image read with libvips; ``pages[i]`` (or sub-IFD) holds level ``i``."""

    backend = "libvips"

    def __init__(self, path: Path, vendor: str | None, osr=None):
        self.path = path
        self.vendor = vendor
        # A file named as a JPEG is first opened as probe decodes a small JPEG (failing on libjpeg's
        # warnings, read once from start to end), so that its header is parsed once: probe decodes this
        # same load. When that open fails (not a JPEG, or a header libjpeg warns about) the file is
        # opened as any other, and fails (or not) as it always did.
        self._sequential: pyvips.Image | None = None
        first = None
        if vendor is None and osr is None and path.suffix.lower() in _JPEG_SUFFIXES:
            try:
                first = pyvips.Operation.call("jpegload", str(path), fail_on="warning", revalidate=True, access="sequential")
            except pyvips.Error:  # (pyvips clears libvips' error buffer of what it reported)
                pass
        probe_load = first
        try:
            if first is None:
                first = pyvips.Image.new_from_file(str(path), fail_on="error", revalidate=True)
        except pyvips.Error as exc:
            raise UnreadableImageError(path, f"not an image libvips can open ({one_line(str(exc))})") from exc
        # (libvips' own .v format names no loader)
        self.loader = first.get("vips-loader") if first.get_typeof("vips-loader") else "vipsload"
        self._levels: dict[int, pyvips.Image] = {}
        self._memory: pyvips.Image | None = None  # level 0 decoded, in the processing format
        self._owned = False  # _memory's buffer is this slide's own (copy_memory made it)
        self._lenient = False  # a JPEG whose decoder warnings are all harmless (see probe)
        self._luma: np.ndarray | None = None  # its luma, once asked for (decoded_luma)
        self._direct: dict[int, _jpeg.JpegTiles | None] = {}  # jpeg_tiles(level), once asked for
        self._direct_file: _jpeg.SharedFile | None = None  # the file, open once for all of them
        self._streams: list[_jpeg.NativeLevel] = []  # stream_image's levels, closed with the slide
        self._direct_lock = threading.Lock()
        fields = set(first.get_fields())
        self._load: list[dict] = [{}]
        levels = [Level(first.width, first.height, 1.0)]
        associated: tuple[str, ...] = ()
        if self.loader.startswith("tiffload") and "n-subifds" in fields and first.get("n-subifds") > 0:
            # OME-TIFF style pyramid: levels in the SubIFDs of the first page (OpenSlide does not
            # read these; it would see one level)
            for index in range(first.get("n-subifds")):
                sub = pyvips.Image.new_from_file(str(path), subifd=index, revalidate=True)
                self._load.append({"subifd": index})
                levels.append(Level(sub.width, sub.height, first.width / sub.width))
        elif osr is not None:
            # OpenSlide knows which TIFF pages are levels; find each by its size.
            pages = _tiff_page_sizes(path, first)
            self._load, levels = [], []
            for (w, h), ds in zip(osr.level_dimensions, osr.level_downsamples):
                if (w, h) not in pages:
                    raise UnsupportedImageError(path, f"level {w}x{h} has no matching TIFF page")
                self._load.append({"page": pages[(w, h)]})
                levels.append(Level(w, h, float(ds)))
        if osr is not None:
            associated = tuple(sorted(osr.associated_images))
        elif self.loader.startswith(("gifload", "webpload", "heifload")) and "n-pages" in fields and first.get("n-pages") > 1:
            # an animation (GIF, WebP) or a HEIF holding several images: libvips loads the first only
            raise UnsupportedImageError(
                path,
                f"holds {first.get('n-pages')} frames or images: vipsnorm normalizes one image a file, and "
                "would keep only the first; extract the frames into files first",
            )
        elif self.loader.startswith("tiffload") and len(levels) == 1 and first.get_typeof("n-pages") and first.get("n-pages") > 1:
            # Pages of one size that are not a pyramid are planes (channels, z-slices, time points: a
            # multi-plane OME-TIFF, a stack). Normalizing the first alone would drop the rest unseen.
            second = pyvips.Image.new_from_file(str(path), page=1, revalidate=True)
            if (second.width, second.height) == (first.width, first.height):
                raise UnsupportedImageError(
                    path,
                    f"holds {first.get('n-pages')} planes of {first.width}x{first.height} (channels, z-slices or "
                    "time points): vipsnorm normalizes one grey or RGB image; split the planes into files first",
                )
        self.levels = tuple(levels)
        self.associated = associated
        # a description that states the pixel size (Aperio "MPP =", OME-XML) beats resolution tags
        self.mpp = _mpp_from_description(first, fields) or (
            _mpp_from_openslide(osr) if osr is not None else _mpp_from_resolution(first, fields)
        )
        self.pages = first.get("n-pages") if "n-pages" in fields else 1
        if probe_load is first:  # (kept for a small JPEG only, whose one decode it is)
            self._sequential = first if self._fits_in_memory() else None
        elif not self._load[0] and self._fail_on() == "error":
            self._levels[0] = first  # what _level(0) would open: the header is parsed once

    def _damage(self, before: str, alone: bool, sure: bool) -> str | None:
        # libvips decodes the JPEG tiles of a TIFF itself and, whatever fail_on says, a tile cut short or
        # garbled only leaves a "VipsJpeg:" line in its error buffer (the tile filled with grey). The
        # lines are looked for among those the work added; a buffer is cleared by any failing call, so
        # a work reads its pixels after its last operation lookup (Slide.decode).
        if not self.loader.startswith("tiffload"):
            return None
        lines, full = _new_vips_errors(before)
        damaged = [
            line for line in lines
            if line.startswith("VipsJpeg:") and not line.endswith("...") and not benign_jpeg_warnings(line)
        ]
        if (damaged and not alone) or (full and not sure):
            raise _Unsure
        if damaged:
            return f"a JPEG tile is damaged: {damaged[0].split(':', 1)[1].strip()}"
        if full:
            return (
                "its JPEG tiles gave more warnings than libvips keeps, so whether one is damaged cannot be "
                "told; check the file (e.g. re-scan or re-export it)"
            )
        return None

    def _fail_on(self) -> str:
        # tiffload reports a tile that fails to decompress only as a warning (and gives black pixels),
        # and libjpeg a JPEG cut short that still ends with an end-of-image marker ("premature end of
        # data segment": the rest filled with grey), so TIFF and JPEG fail on warnings (a JPEG whose
        # warnings are all harmless is read failing on errors only: see probe). libpng's warnings (a
        # known-incorrect sRGB profile, say) leave the pixels whole.
        if self.loader.startswith("jpegload"):
            return "error" if self._lenient else "warning"
        return "warning" if self.loader.startswith("tiffload") else "error"

    def _level(self, level: int) -> pyvips.Image:
        # Each level is opened once per Slide and shared (a JPEG is decoded once for probe, fit and
        # write). revalidate: libvips caches loads by file name, and would hand back the old pixels of a
        # file replaced since it was last opened in this process.
        if level not in self._levels:
            self._levels[level] = pyvips.Image.new_from_file(
                str(self.path), fail_on=self._fail_on(), revalidate=True, **self._load[level]
            )
        return self._levels[level]

    def level_image(self, level: int = 0) -> pyvips.Image:
        if level == 0 and self._memory is not None:
            return self._memory
        return super().level_image(level)

    def stream_image(self, level: int = 0) -> pyvips.Image:
        image = self.level_image(level)
        reader = self.jpeg_tiles(level)
        native = None if reader is None else reader.native_level()
        if native is None:
            return image
        streamed = _native.tile_source(image, native.share(), native.read, native.free)
        if streamed is None:
            native.close()
            return image
        # its decoded rows and descriptor given back when the slide closes, though libvips' operation
        # cache may keep the image a while (it then reads through libvips' loader)
        with self._direct_lock:
            self._streams.append(native)
        return streamed

    def independent_level_image(self, level: int = 0) -> pyvips.Image | None:
        if level == 0 and self._memory is not None:
            return None
        self.level_image(level)  # opened (and checked) as usual first
        loaded = pyvips.Image.new_from_file(
            str(self.path), fail_on=self._fail_on(), revalidate=True, **self._load[level]
        )
        return to_processing(loaded, str(self.path))

    def holds_decoded(self) -> bool:
        return self._memory is not None

    def decoded_luma(self) -> np.ndarray | None:
        if self._luma is None and self._memory is not None and self._memory.bands == 3:
            from ..methods._hist import luma_array

            luma = luma_array(self.decoded_pixels())
            luma.flags.writeable = False
            self._luma = luma
        return self._luma

    def decoded_pixels(self) -> np.ndarray | None:
        image = self._memory
        if image is None:
            return None
        view = _native.memory_pixels(image)  # the image's own buffer, read-only
        if view is not None:
            return view
        # a region copies the pixels out in this thread (no libvips thread pool to start); not kept, so
        # that the pixels are held twice only while they are sampled
        data = pyvips.Region.new(image).fetch(0, 0, image.width, image.height)
        return np.frombuffer(data, np.uint8).reshape(image.height, image.width, image.bands)

    def take_decoded(self) -> tuple[pyvips.Image, np.ndarray] | None:
        image = self._memory
        if image is None or not self._owned:
            return None
        view = _native.memory_pixels(image, writable=True)
        if view is None:
            return None
        self._memory, self._luma, self._owned = None, None, False
        return image, view

    def jpeg_tiles(self, level: int) -> _jpeg.JpegTiles | None:
        self._check_level(level)
        reader = self._direct.get(level, False)
        if reader is not False:
            return reader
        with self._direct_lock:
            if level not in self._direct:
                self._direct[level] = self._verified_jpeg_tiles(level)
            return self._direct[level]

    def _verified_jpeg_tiles(self, level: int) -> _jpeg.JpegTiles | None:
        """The level's direct reader, used only once a window across four of its tiles (or all of a
        smaller level) read both ways is equal: it gives what libvips gives or is not used (a colour
        space read otherwise, say). A window libvips fails on leaves the level to libvips."""
        if not _jpeg.available() or not self.loader.startswith("tiffload") or self._memory is not None:
            return None
        loaded = self._level(level)
        if (loaded.format, loaded.bands, loaded.coding, loaded.interpretation) != ("uchar", 3, "none", "srgb"):
            return None  # (to_processing would change the bytes: the direct reader gives the file's)
        try:
            layout = _jpeg.read_layout(self.path, **self._load[level])
        except (OSError, ValueError):
            return None
        if layout is None or (layout.width, layout.height) != (loaded.width, loaded.height):
            return None
        if self._direct_file is None:
            try:
                self._direct_file = _jpeg.SharedFile(self.path)
            except OSError:
                return None
        reader = _jpeg.JpegTiles(self.path, layout, file=self._direct_file)
        # a window on the corner of four tiles near the middle, at odd offsets in each
        tw, th = layout.tile_width, layout.tile_height
        w, h = min(layout.width, 2 * tw - 2 * (tw // 3)), min(layout.height, 2 * th - 2 * (th // 3))
        x = min(max(0, (layout.tiles_across // 2) * tw - w // 2 - 1), layout.width - w)
        y = min(max(0, (layout.tiles_down // 2) * th - h // 2 - 1), layout.height - h)
        try:
            expected = self.read_region(level, x, y, w, h)
        except VipsnormError:
            reader.close()
            return None
        got = reader.read(x, y, w, h)
        if got is None or not np.array_equal(got, expected):
            reader.close()
            return None
        reader.keeping = self._kept_tiles_check(reader, level, (x, y, w, h), expected)
        return reader

    def _kept_tiles_check(self, reader: _jpeg.JpegTiles, level: int, window: tuple[int, int, int, int],
                          expected: np.ndarray) -> bool:
        """Whether ``reader`` may keep tiles (:attr:`~vipsnorm.io.jpeg_tiles.JpegTiles.keeping`): the
        checked window read again with its tiles kept, a whole tile of it after that (an output pass
        not cropped after a cropped one) and the window once more (cropped after not cropped) all give
        libvips' bytes, and the last two were read from kept tiles. Off where the decoder cannot keep
        tiles, the process's budget is 0, or the level's tiles are not kept (progressive, or larger than
        the budget)."""
        if not _jpeg.keeping_supported() or _jpeg.kept_stats()["budget"] == 0:
            return False
        layout = reader.layout
        x, y = window[:2]
        tx, ty = x // layout.tile_width * layout.tile_width, y // layout.tile_height * layout.tile_height
        tile = (tx, ty, min(layout.tile_width, layout.width - tx), min(layout.tile_height, layout.height - ty))
        try:
            tile_expected = self.read_region(level, *tile)
        except VipsnormError:
            return False
        hits = 0
        for got_window, want in ((window, expected), (tile, tile_expected), (window, expected)):
            before = _jpeg.kept_stats()["hits"]
            got = reader._read(*got_window, _jpeg.KEEP_ALWAYS)
            hits += _jpeg.kept_stats()["hits"] > before
            if got is None or not np.array_equal(got, want):
                reader.forget_kept()
                return False
        if hits < 2:  # (the passes over kept tiles were not checked: another thread, say, took the store)
            reader.forget_kept()
            return False
        return True

    def close(self) -> None:
        with self._direct_lock:
            for native in self._streams:
                native.close()
            self._streams.clear()
            for reader in self._direct.values():
                if reader is not None:
                    reader.close()
            self._direct.clear()
            if self._direct_file is not None:
                self._direct_file.close()
                self._direct_file = None
        self._levels.clear()
        self._memory = None
        self._luma = None
        self._owned = False
        self._sequential = None

    def _fits_in_memory(self) -> bool:
        """True for an ordinary image small enough to be decoded once into memory by :meth:`probe`."""
        w, h = self.dimensions
        return not self.is_slide and w * h <= SMALL_IMAGE_PIXELS

    def probe(self) -> None:
        """Decode a small window of the first and the last level; raise pyvips.Error if it fails.

        A small ordinary image is decoded whole instead, once, and kept in memory (the window would
        have decoded all of a JPEG or PNG anyway).

        A JPEG is decoded failing on libjpeg's warnings, which is how it reports missing data (a file cut
        short, even one that still ends with an end marker, is filled with grey). When every warning is
        one that leaves the pixels whole (:data:`BENIGN_JPEG_WARNINGS`: stray bytes between segments,
        odd scan parameters), and a whole decode failing on errors only counts that one warning alone
        (:func:`count_jpeg_warnings`: libvips reports only the first), it is read failing on errors only
        from there on. Either way this first decode is of the whole JPEG (random access decodes all of it).
        """
        try:
            self._probe()
        except pyvips.Error as exc:
            if self._fail_on() != "warning" or not self.loader.startswith("jpegload") or not benign_jpeg_warnings(str(exc)):
                raise
            # libvips stops at the first warning, so a harmless one would hide any after it: decoded
            # whole again, failing on errors only, the file must give exactly that one warning. A count
            # of 0 means the count was lost (pyvips' warnings disabled): refused, as before this check.
            count = count_jpeg_warnings(self.path)
            if count != 1:
                first = one_line(str(exc)).split("VipsJpeg:", 1)[-1].split(";")[0].strip()
                seen = f"{count} warnings" if count else "warnings it could not count (pyvips' log warnings are off)"
                raise pyvips.Error(
                    f"libjpeg gave {seen}: the first harmless ({first}), the others not shown, so the data may "
                    "be damaged"
                ) from exc
            self._lenient = True
            self._levels.clear()
            self._memory = self._luma = None
            self._owned = False
            self._probe()

    def _probe(self) -> None:
        if self._fits_in_memory() and self._memory is None:
            try:
                # a sequential loader: a random-access one decodes into a buffer of its own first, and
                # copy_memory then copies that (measured 0.35 ms CPU of 2.2 on a 512x512 JPEG); called
                # by name, since the header told which loader reads the file
                loaded, self._sequential = self._sequential, None  # (never used twice: one pass only)
                if loaded is not None and not self._lenient:
                    # a faster decoder than libvips' own, where it gives the same bytes (small_jpeg); any
                    # warning leaves the file to libvips below, which reports it
                    decoded = _small_jpeg.decode(self.path, loaded)
                    if decoded is not None:
                        self._memory, self._owned = decoded, True
                        self._levels.pop(0, None)
                        return
                if loaded is None or self._lenient:
                    loaded = pyvips.Operation.call(
                        self.loader, str(self.path), fail_on=self._fail_on(), revalidate=True, access="sequential", **self._load[0]
                    )
                processed = to_processing(loaded, str(self.path))
                self._memory = processed.copy_memory()
                # a buffer of its own, unless copy_memory handed back an image libvips already held in
                # memory (it does not copy those): the pixels take_decoded may let a method change in place
                self._owned = self._memory.pointer != processed.pointer
            except (VipsnormError, pyvips.Error):
                # Not convertible (refused by level_image later), or not decodable: stream as before,
                # from a fresh load, so that what fails and its message are what they always were.
                pass
            self._levels.pop(0, None)  # the loader's own copy (the libvips cache may keep it a while)
            if self._memory is not None:
                return
        for level in {0, len(self.levels) - 1}:
            image = self._level(level)
            w, h = min(image.width, 256), min(image.height, 256)
            image.crop((image.width - w) // 2, (image.height - h) // 2, w, h).avg()


class OpenSlideSlide(Slide):
    """A slide read with OpenSlide; each level is streamed into libvips through a virtual TIFF."""

    backend = "openslide"
    loader = "openslide"
    tile = 256

    def __init__(self, path: Path, osr):
        self.path = path
        self._osr = osr
        self.vendor = osr.properties.get("openslide.vendor")
        self.levels = tuple(
            Level(w, h, float(ds)) for (w, h), ds in zip(osr.level_dimensions, osr.level_downsamples)
        )
        self.mpp = _mpp_from_openslide(osr)
        self.associated = tuple(sorted(osr.associated_images))
        # one virtual TIFF per level, made on first use: every later read shares its tile cache
        self._virtual: dict[int, tuple[VirtualTiff, pyvips.Image]] = {}

    def _read_tile(self, level: int, t: int, tx: int, ty: int) -> np.ndarray:
        lvl = self.levels[level]
        w, h = min(t, lvl.width - tx * t), min(t, lvl.height - ty * t)
        x0, y0 = round(tx * t * lvl.downsample), round(ty * t * lvl.downsample)
        rgba = np.asarray(self._osr.read_region((x0, y0), level, (w, h)))
        return _flatten_on_white(rgba)

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """A window of ``level`` straight from OpenSlide's ``read_region`` (flattened on white as the
        level's tiles are), without the virtual TIFF: random patches do not fill its tile cache."""
        import openslide

        lvl = self._check_window(level, x, y, width, height)
        width, height = min(width, lvl.width - x), min(height, lvl.height - y)
        try:
            rgba = self._osr.read_region((round(x * lvl.downsample), round(y * lvl.downsample)), level, (width, height))
        except openslide.OpenSlideError as exc:
            raise UnreadableImageError(self.path, f"cannot decode pixels (OpenSlide: {exc})") from exc
        return _flatten_on_white(np.asarray(rgba))

    def _level(self, level: int) -> pyvips.Image:
        if level not in self._virtual:
            lvl = self.levels[level]
            tile = min(self.tile, -(-max(lvl.width, lvl.height) // 16) * 16)
            virtual = VirtualTiff(lvl.width, lvl.height, tile, lambda tx, ty: self._read_tile(level, tile, tx, ty))
            image = virtual.image(fail_on="error")
            profile = self._icc_profile()
            if profile:  # the scanner's colour profile travels with the pixels, as libvips' loaders do
                image = image.copy()
                image.set_type(pyvips.GValue.blob_type, "icc-profile-data", profile)
            self._virtual[level] = (virtual, image)
        return self._virtual[level][1]

    def _icc_profile(self) -> bytes | None:
        """The slide's ICC profile (OpenSlide >= 4), as bytes."""
        try:
            profile = self._osr.color_profile
        except AttributeError:  # openslide-python < 1.3
            return None
        return None if profile is None else profile.tobytes()

    def _decode_cause(self, exc: Exception) -> str:
        damage = self._damage("", True, True)
        return f"cannot decode pixels ({damage})" if damage else super()._decode_cause(exc)

    def _damage(self, before: str, alone: bool, sure: bool) -> str | None:
        # a tile OpenSlide fails on ends the virtual TIFF's data (libvips sees end of file and may give
        # black pixels without an error): the failure is kept there
        for virtual, _ in self._virtual.values():
            if virtual.error is not None:
                return f"OpenSlide: {one_line(str(virtual.error))}"
        return None

    def probe(self) -> None:
        for level in {0, len(self.levels) - 1}:
            lvl = self.levels[level]
            w, h = min(lvl.width, 256), min(lvl.height, 256)
            x0 = round((lvl.width - w) // 2 * lvl.downsample)
            y0 = round((lvl.height - h) // 2 * lvl.downsample)
            self._osr.read_region((x0, y0), level, (w, h))

    def close(self) -> None:
        self._osr.close()


#: libjpeg warnings after which the pixels are whole (lower case, as they appear in libvips' message):
#: bytes between segments, scan parameters a sequential JPEG should not have, an odd progression or
#: Adobe marker, a JFIF revision or thumbnail out of spec. Every other warning (a premature end, a bad
#: Huffman or arithmetic code, a lost restart marker) means missing or garbled data: an error.
BENIGN_JPEG_WARNINGS = (
    "extraneous bytes before marker",
    "invalid sos parameters for sequential jpeg",
    "inconsistent progression sequence",
    "unknown adobe color transform code",
    "unknown jfif revision number",
    "jfif extension marker: thumbnail image",
    "warning: thumbnail image size does not match data length",
)


_READ_GAVE = re.compile(r"read gave (\d+) warnings?")


def count_jpeg_warnings(path: str | os.PathLike[str]) -> int:
    """How many warnings libjpeg gives decoding the JPEG ``path`` whole, failing on errors only: the
    largest ``read gave N warnings`` that libvips logs (through pyvips' logger) when the decode's image
    is freed, 0 when none was seen.

    The decode is this function's own (sequential, in strips of 256 rows: bounded memory at any size),
    so that its image is freed here and the count logged in this thread; records of other threads are
    not counted. The count is read by a filter on the ``pyvips`` logger, which passes every record on
    unchanged: nothing is added to or taken from what the user's logging shows. With pyvips' warnings
    disabled (``logging.disable``, a logger level above WARNING) nothing is logged and the count is 0.
    """
    counts: list[int] = []
    me = threading.get_ident()

    def catch(record: logging.LogRecord) -> bool:
        if record.thread == me:
            found = _READ_GAVE.search(record.getMessage())
            if found:
                counts.append(int(found.group(1)))
        return True

    logger = logging.getLogger("pyvips")
    logger.addFilter(catch)
    try:
        image = pyvips.Image.new_from_file(str(path), fail_on="error", revalidate=True, access="sequential")
        region = pyvips.Region.new(image)
        for y in range(0, image.height, 256):
            region.fetch(0, y, image.width, min(256, image.height - y))
        del region, image
    finally:
        logger.removeFilter(catch)
    return max(counts, default=0)


def benign_jpeg_warnings(message: str) -> bool:
    """True when the libjpeg messages in a libvips error ``message`` (its ``VipsJpeg:`` lines) are all
    :data:`BENIGN_JPEG_WARNINGS`, and there is at least one."""
    found = [line.split(":", 1)[1].strip().lower() for line in message.splitlines() if line.strip().startswith("VipsJpeg:")]
    return bool(found) and all(any(benign in text for benign in BENIGN_JPEG_WARNINGS) for text in found)


def _flatten_on_white(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide gives non-premultiplied RGBA, transparent outside scanned areas: flatten onto white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.float32) / 255.0
    return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _tiff_page_sizes(path: Path, first: pyvips.Image) -> dict[tuple[int, int], int]:
    """Map (width, height) -> first TIFF page index with that size."""
    sizes: dict[tuple[int, int], int] = {}
    for page in range(first.get("n-pages")):
        image = first if page == 0 else pyvips.Image.new_from_file(str(path), page=page, revalidate=True)
        sizes.setdefault((image.width, image.height), page)
    return sizes


def _mpp_from_openslide(osr) -> tuple[float, float] | None:
    try:
        return float(osr.properties["openslide.mpp-x"]), float(osr.properties["openslide.mpp-y"])
    except (KeyError, ValueError):
        return None


def _mpp_from_description(image: pyvips.Image, fields: set[str]) -> tuple[float, float] | None:
    """Aperio "MPP =" (in a description that starts with "Aperio", as OpenSlide requires) or OME-XML
    PhysicalSizeX/Y in the TIFF ImageDescription."""
    if "image-description" not in fields:
        return None
    description = image.get("image-description")
    # "MPP =" only in an Aperio description (any other text may hold it: a file name, a note)
    match = _APERIO_MPP.search(description) if description.lstrip().startswith("Aperio") else None
    if match:
        mpp = float(match.group(1))
        return (mpp, mpp) if mpp > 0 else None
    return _ome_mpp(description)


def _mpp_from_resolution(image: pyvips.Image, fields: set[str]) -> tuple[float, float] | None:
    """TIFF resolution tags, only when a unit is set (a JPEG's 72 dpi is not a pixel size)."""
    loader = image.get("vips-loader") if "vips-loader" in fields else ""
    if loader.startswith("tiffload") and "resolution-unit" in fields and image.xres > 0 and image.yres > 0:
        # libvips reports resolution in pixels per millimetre whatever the unit in the file.
        return 1000.0 / image.xres, 1000.0 / image.yres
    return None


_OME_SIZE = re.compile(r'PhysicalSize([XY])="([0-9.eE+-]+)"')
_OME_UNIT = re.compile(r'PhysicalSize([XY])Unit="([^"]+)"')
_TO_MICRONS = {"\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_mpp(description: str) -> tuple[float, float] | None:
    """PhysicalSizeX/Y of the first OME-XML Pixels element (default unit: micrometre)."""
    if "<OME" not in description:
        return None
    sizes = {axis: float(v) for axis, v in _OME_SIZE.findall(description)[:2]}
    units = dict(_OME_UNIT.findall(description)[:2])
    try:
        x, y = (sizes[a] * _TO_MICRONS[units.get(a, "µm")] for a in "XY")
    except KeyError:
        return None
    return (x, y) if x > 0 and y > 0 else None


def _plain_image(path: Path) -> bool:
    """True for a JPEG or PNG by suffix and signature: no OpenSlide format is either."""
    signature = _PLAIN_SIGNATURES.get(path.suffix.lower())
    if signature is None:
        return False
    with open(path, "rb") as f:
        return f.read(len(signature)) == signature


def _detect_vendor(path: Path) -> str | None:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


def _open_openslide(path: Path):
    import openslide

    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as exc:
        raise UnreadableImageError(path, f"OpenSlide cannot open it ({exc})") from exc


BACKENDS = ("auto", "libvips", "openslide")


@one_file_at_a_time
def open_slide(
    path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS, backend: str = "auto"
) -> Slide:
    """Open any slide or image with the fastest backend that decodes it.

    Parameters
    ----------
    path : path-like
        A whole-slide image (SVS, NDPI, MRXS, DICOM, pyramidal TIFF, ...) or an ordinary image.
    max_pixels : int
        Refuse images whose level 0 has more pixels than this (a guard against hostile or corrupt
        headers); ``0`` disables the check.
    backend : {"auto", "libvips", "openslide"}
        ``auto`` picks as described above; the others force a backend (``openslide`` only for files
        OpenSlide recognises).

    Raises
    ------
    UnreadableImageError
        Missing, empty, a folder, corrupt or undecodable.
    UnsupportedImageError
        Decodes, but not as a 2-D grey/RGB image vipsnorm can process.
    ImageTooLargeError
        Above ``max_pixels``.
    """
    path = Path(path)
    if not path.exists():
        raise UnreadableImageError(path, "no such file")
    if path.is_dir():
        raise UnreadableImageError(path, "is a directory, not an image")
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # a POSIX name in another encoding: libvips and OpenSlide take UTF-8 names
        raise UnreadableImageError(path, "the file name is not valid UTF-8 (libvips cannot open it); rename the file") from None
    if path.stat().st_size == 0:
        raise UnreadableImageError(path, "file is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise UnreadableImageError(path, "permission denied")

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    vendor = None if _plain_image(path) else _detect_vendor(path)
    slide: Slide
    if backend == "openslide":
        if vendor is None:
            raise UnsupportedImageError(path, "OpenSlide does not recognise this file (try --backend auto)")
        slide = OpenSlideSlide(path, _open_openslide(path))
        _probe_openslide(slide)
    elif backend == "libvips" or vendor is None or vendor in _TIFF_VENDORS:
        osr = None
        if vendor is not None:
            try:
                osr = _open_openslide(path)
            except UnreadableImageError:
                # OpenSlide only told which pages are levels: libvips reads the first page alone (a TIFF
                # compressed in a way OpenSlide does not know, WebP say), or fails with its own reason
                pass
        try:
            slide = VipsSlide(path, vendor, osr)
            _check_size(slide, max_pixels)
            slide.probe()
            if osr is not None:
                osr.close()
        except pyvips.Error as exc:
            if osr is None or backend == "libvips":
                if osr is not None:
                    osr.close()
                raise UnreadableImageError(path, f"cannot decode pixels ({one_line(str(exc))})") from exc
            slide = OpenSlideSlide(path, osr)  # e.g. JPEG 2000 SVS: header opens, libvips tiles fail
            _probe_openslide(slide)
        except VipsnormError:
            if osr is not None:
                osr.close()
            raise
    else:
        slide = OpenSlideSlide(path, _open_openslide(path))
        _probe_openslide(slide)
    _check_size(slide, max_pixels)
    return slide


def _probe_openslide(slide: OpenSlideSlide) -> None:
    import openslide

    try:
        slide.probe()
    except openslide.OpenSlideError as exc:
        slide.close()
        raise UnreadableImageError(slide.path, f"cannot decode pixels (OpenSlide: {exc})") from exc


def _check_size(slide: Slide, max_pixels: int) -> None:
    w, h = slide.dimensions
    if w <= 0 or h <= 0:
        raise UnreadableImageError(slide.path, f"image has no pixels ({w}x{h})")
    if max_pixels and w * h > max_pixels:
        raise ImageTooLargeError(
            slide.path,
            f"{w}x{h} = {w * h:,} pixels is above the limit of {max_pixels:,} "
            "(raise it with --max-pixels if the file is genuine)",
        )
