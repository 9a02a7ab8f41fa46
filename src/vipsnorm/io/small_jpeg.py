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

Encoding (:func:`save`): libvips takes 1.55 ms to encode a 512x512 JPEG at Q90 here, libjpeg-turbo 0.8.
libvips writes its metadata markers (EXIF rebuilt from the image's fields, ICC profile, XMP, ...) after
the file's SOI, then the coded image, which libjpeg-turbo codes to the same bytes with the same
settings. The markers depend on the image's fields and size only, not on its pixels, so the first image
of each set of fields (and quality) is saved by libvips and coded here too: when the coded parts are
equal byte for byte, libvips' markers are kept, and later images with the same fields are coded here and
written after them. Where the two differ, those fields stay with libvips. Before any of this, each
process checks the coder on patterns (grey and colour, at qualities with and without chroma subsampling).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import numpy as np
import pyvips

from .. import _native
from . import jpeg_tiles

__all__ = ["available", "reason", "decode", "save"]

#: the process checks' verdicts, by name ("decode", "save"): (on, why)
_verdicts: dict[str, tuple[bool, str]] = {}
_check_lock = threading.RLock()  # (the coder's check asks for the decoder's verdict first)


def _verdict(name: str, check) -> tuple[bool, str]:
    """The verdict of the process check ``name``: ``check()`` made once, the first time it is asked."""
    verdict = _verdicts.get(name)
    if verdict is None:
        with _check_lock:
            verdict = _verdicts.get(name)
            if verdict is None:
                try:
                    verdict = check()
                except (RuntimeError, pyvips.Error) as exc:
                    verdict = False, f"off: its check failed ({exc})"
                _verdicts[name] = verdict
    return verdict


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


def _decoder_check() -> tuple[bool, str]:
    lib, why = jpeg_tiles._load()
    if lib is None:
        return False, f"off: the JPEG extension is {why}"
    if not _native.available():
        return False, f"off: the colour kernel is off ({_native.reason()})"
    return _self_check(lib)


def _state() -> tuple[bool, str]:
    return _verdict("decode", _decoder_check)


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


# --------------------------------------------------------------------------------------------------
# encoding

#: libvips' metadata markers (the bytes from the SOI to the first quantization table) by the fields
#: and quality of the images they were checked for; ``False``: the coded parts differed, leave to libvips.
_headers: dict[tuple, bytes | bool] = {}
#: at most this many sets of fields are remembered
_MAX_HEADERS = 64
#: fields sets checked, and saves that found theirs checked: checks stop once they stop paying
_counts = {"checks": 0, "hits": 0}
#: checks made before the hits must keep up with them
_FREE_CHECKS = 8


def _save_encode(lib, pixels: np.ndarray, quality: int) -> bytes | None:
    """``pixels`` coded as libvips' jpegsave codes them (``vj_save``), SOI to EOI; None on failure."""
    height, width, bands = pixels.shape
    out, size = ctypes.c_void_p(), ctypes.c_ulong()
    status = lib.vj_save(pixels.ctypes.data, width, height, bands, quality, ctypes.byref(out), ctypes.byref(size))
    try:
        return ctypes.string_at(out.value, size.value) if status == 0 and out.value else None
    finally:
        lib.vj_free(out)


def _header_end(data: bytes) -> int | None:
    """Where a JPEG's first quantization table starts, when only APPn and COM markers come between it
    and the SOI (as libvips writes them); None otherwise."""
    if data[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xDB:
            return at
        if not (0xE0 <= marker <= 0xEF or marker == 0xFE):
            return None
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None


def _same_coding(theirs: bytes, ours: bytes | None) -> bytes | None:
    """libvips' metadata markers (with the SOI) when ``ours`` codes the image as ``theirs`` does."""
    cut = _header_end(theirs)
    if cut is None or ours is None or ours[:2] != b"\xff\xd8" or theirs[cut:] != ours[2:]:
        return None
    return theirs[:cut]


def _save_self_check(lib) -> tuple[bool, str]:
    for quality in (90, 75):  # 4:4:4 and 4:2:0
        for bands in (1, 3):
            for width, height in ((45, 37), (16, 16), (300, 7)):
                pixels = _pattern(width, height, bands)
                image = pyvips.Image.new_from_memory(pixels.tobytes(), width, height, bands, "uchar")
                image = image.copy(interpretation="srgb" if bands == 3 else "b-w")
                theirs = image.jpegsave_buffer(Q=quality)
                if _same_coding(theirs, _save_encode(lib, pixels, quality)) is None:
                    return False, f"off: {bands}-band JPEGs at Q{quality} are coded otherwise than by libvips here"
    return True, "checked against libvips"


def _coder_check() -> tuple[bool, str]:
    decoding, why = _state()  # (the extension loaded, the kernel on: memory_pixels needs it)
    return _save_self_check(jpeg_tiles._load()[0]) if decoding else (False, why)


def _save_state() -> tuple[bool, str]:
    return _verdict("save", _coder_check)


def _save_key(image: pyvips.Image, quality: int) -> tuple | None:
    """What libvips' markers for ``image`` depend on: its size, quality and every field (blobs by value),
    but its file name; None when a field is not a plain value."""
    fields = []
    for name in image.get_fields():
        if name == "filename":
            continue
        value = image.get(name)
        if not isinstance(value, (str, int, float, bytes)):
            return None
        fields.append((name, value))
    return (quality, tuple(fields))


def _may_check() -> bool:
    """Whether a new set of fields may still be checked (see :data:`_FREE_CHECKS`, :data:`_MAX_HEADERS`)."""
    if len(_headers) >= _MAX_HEADERS:
        return False
    return _counts["checks"] < _FREE_CHECKS or _counts["hits"] >= _counts["checks"]


def _read_back(path: str | os.PathLike[str]) -> bytes:
    return Path(path).read_bytes()


def save(image: pyvips.Image, path: str | os.PathLike[str], quality: int, pixels: np.ndarray | None = None) -> None:
    """Write ``image`` to the JPEG ``path`` exactly as ``image.jpegsave(path, Q=quality)`` does, faster
    where it can (see the module's description).

    ``pixels``: the image's own pixels, an ``(h, w, bands)`` uint8 array over its memory
    (:func:`vipsnorm._native.memory_pixels` of ``image`` or of the image it is a copy of), or None
    (then libvips saves it). Raises what ``jpegsave`` raises, and ``OSError`` when the file cannot be
    written; nothing else (a field this module cannot read, say) stops a save.
    """
    key = None
    if (
        pixels is not None
        and (_may_check() or any(_headers.values()))
        and image.format == "uchar"
        and image.coding == "none"
        and image.bands in (1, 3)
        and image.interpretation == ("srgb" if image.bands == 3 else "b-w")
        and pixels.shape == (image.height, image.width, image.bands)
        and pixels.dtype == np.uint8
        and pixels.flags.c_contiguous
        and _save_state()[0]
    ):
        try:
            key = _save_key(image, quality)
        except Exception:  # noqa: BLE001 (a field pyvips cannot read: libvips saves, as without this module)
            key = None
    header = _headers.get(key) if key is not None else None
    if header:
        coded = _save_encode(jpeg_tiles._load()[0], pixels, quality)
        if coded is not None:
            _counts["hits"] += 1
            with open(path, "wb") as file:
                file.write(header)
                file.write(memoryview(coded)[2:])
            return
    image.jpegsave(str(path), Q=quality)
    if key is None or header is not None or not _may_check():
        return  # (where fields seldom repeat, checking each new set would cost more than it saves)
    _counts["checks"] += 1
    try:
        theirs = _read_back(path)
    except OSError:  # (a write-only file, say: the file written is libvips' and stays; nothing learned)
        return
    _headers[key] = _same_coding(theirs, _save_encode(jpeg_tiles._load()[0], pixels, quality)) or False
