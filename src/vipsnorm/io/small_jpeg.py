"""Small ordinary JPEGs decoded with the system's libjpeg-turbo rather than libvips' own decoder.

A batch of small JPEGs spends most of its time decoding and encoding. pyvips-binary's libvips decodes
JPEG with the mozjpeg it bundles, measured at 2.2 ms for a 512x512 JPEG here, where libjpeg-turbo
called directly (``_jpegtiles.c``, the extension the direct tile reader lives in) takes 0.9 ms.
:func:`decode` decodes such a file into memory and gives the image libvips' header fields and metadata
(EXIF, ICC profile, resolution), so that everything after it (fit, apply, the JPEG written) is what it
would have been: a test checks outputs byte for byte against the libvips path.

Only where the bytes are libvips' own:

* each process checks once, before the first use, that JPEGs of every layout decoded here (grey, RGB,
  YCbCr 4:4:4, 4:2:2, 4:4:0, 4:2:0 and 4:1:1, baseline and progressive, with restart markers, odd sizes)
  decode to exactly what libvips makes of them; when one differs (another libjpeg), none is used;
* a file of any other layout (CMYK, 12-bit, arithmetic coding, unusual sampling) is left to libvips;
* any libjpeg warning (data cut short, garbled, stray bytes) leaves the file to libvips, which then
  reports the damage, or reads a harmlessly odd file, exactly as before.

Off when the extension or the colour kernel is not built, or with ``VIPSNORM_NATIVE=0``.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import pyvips

from .. import _native
from . import jpeg_tiles

__all__ = ["available", "reason", "decode"]

_checked: tuple[bool, str] | None = None
_check_lock = threading.Lock()


def _pattern(width: int, height: int, bands: int) -> np.ndarray:
    """Smooth ramps, hard edges and noise: content on which the chroma upsampling and rounding of two
    decoders would tell apart."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(20261121)
    planes = [
        (x * 255 // max(width - 1, 1)),
        (y * 255 // max(height - 1, 1)),
        np.where((x // 5 + y // 3) % 2 == 0, 230, 20),
    ]
    image = np.stack(planes[:bands], axis=-1).astype(np.int64) + rng.integers(-25, 26, (height, width, bands))
    return np.clip(image, 0, 255).astype(np.uint8)


def _encode(lib, pixels: np.ndarray, rgb: bool, layout: int, progressive: bool, restart: int) -> bytes:
    height, width, bands = pixels.shape
    out, size = ctypes.c_void_p(), ctypes.c_ulong()
    status = lib.vj_encode(
        pixels.ctypes.data, width, height, bands, int(rgb), layout, int(progressive), restart,
        ctypes.byref(out), ctypes.byref(size),
    )  # fmt: skip
    try:
        if status != 0 or not out.value:
            raise RuntimeError(f"vj_encode failed ({status})")
        return ctypes.string_at(out.value, size.value)
    finally:
        lib.vj_free(out)


def _variants(lib):
    """(name, bands, rgb, layout index, progressive, restart rows) of every layout :func:`decode` takes."""
    names = ("4:4:4", "4:2:2", "4:4:0", "4:2:0", "4:1:1")
    if lib.vj_layout_count() != len(names):  # (vj_layouts and this list must name the same layouts)
        raise RuntimeError(f"the extension decodes {lib.vj_layout_count()} layouts, not the {len(names)} checked here")
    yield "grey", 1, False, 0, False, 0
    yield "RGB", 3, True, 0, False, 0
    for layout, name in enumerate(names):
        yield f"YCbCr {name}", 3, False, layout, False, 0
        yield f"YCbCr {name} progressive", 3, False, layout, True, 0
    yield "YCbCr 4:2:0 restart markers", 3, False, 3, False, 1


def _self_check(lib) -> tuple[bool, str]:
    """Whether this process's decoder gives libvips' bytes on every layout, and what differed if not."""
    for name, bands, rgb, layout, progressive, restart in _variants(lib):
        for width, height in ((45, 37), (16, 16)):
            data = _encode(lib, _pattern(width, height, bands), rgb, layout, progressive, restart)
            theirs = pyvips.Image.jpegload_buffer(data, fail_on="warning", access="sequential")
            expected = np.frombuffer(theirs.write_to_memory(), np.uint8).reshape(height, width, theirs.bands)
            ours = np.empty((height, width, bands), np.uint8)
            status = lib.vj_decode(None, data, len(data), width, height, bands, ours.ctypes.data)
            if status != 0 or theirs.bands != bands or not np.array_equal(ours, expected):
                return False, f"off: {name} JPEGs decode otherwise than libvips' decoder here (status {status})"
    return True, "checked against libvips"


def _state() -> tuple[bool, str]:
    global _checked
    if _checked is None:
        with _check_lock:
            if _checked is None:
                lib, why = jpeg_tiles._load()
                if lib is None:
                    _checked = False, f"off: the JPEG extension is {why}"
                elif not _native.available():
                    _checked = False, f"off: the colour kernel is off ({_native.reason()})"
                else:
                    try:
                        _checked = _self_check(lib)
                    except (RuntimeError, pyvips.Error) as exc:
                        _checked = False, f"off: its check failed ({exc})"
    return _checked


def available() -> bool:
    """Whether small JPEGs are decoded here (extension and kernel built and on, check passed)."""
    return _state()[0]


def reason() -> str:
    """Why :func:`available` says what it says."""
    return _state()[1]


def decode(path: str | os.PathLike[str], header: pyvips.Image) -> pyvips.Image | None:
    """The JPEG ``path`` decoded into a memory image with the fields and metadata of ``header`` (its
    libvips jpegload, not yet read), or None: :func:`decode` is off, or the file is not of a layout it
    decodes, or libjpeg warned (the caller then decodes it with libvips, which reports what is wrong).

    The image's buffer is its own (a numpy array it keeps): the caller may change its pixels in place.
    """
    if header.format != "uchar" or header.coding != "none" or header.bands not in (1, 3) or not available():
        return None
    if header.interpretation != ("srgb" if header.bands == 3 else "b-w"):
        return None
    width, height, bands = header.width, header.height, header.bands
    pixels = np.empty((height, width, bands), np.uint8)
    lib = jpeg_tiles._load()[0]
    if lib.vj_decode(os.fsencode(path), None, 0, width, height, bands, pixels.ctypes.data) != 0:
        return None
    image = pyvips.Image.new_from_memory(pixels.data, width, height, bands, "uchar")
    if not _native.adopt_fields(image, header):
        return None
    return image
