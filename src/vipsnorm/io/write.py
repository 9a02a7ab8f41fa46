"""Writing results: pyramidal tiled BigTIFF for slides, the input's own format for ordinary images.

Every write goes to a temporary name in the output folder and is renamed into place only when libvips
has finished without error, so a killed or failed run never leaves a half-written file under the final
name.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import numbers
import os
import secrets
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pyvips

from .. import _native
from ..errors import OutputError, one_line
from . import small_jpeg

__all__ = [
    "atomic_path",
    "check_name",
    "check_mpp",
    "check_quality",
    "check_size",
    "lossless_webp",
    "name_max",
    "part_stem",
    "write_pyramid",
    "write_image",
    "COMPRESSIONS",
    "IMAGE_SUFFIXES",
    "MAX_SIDE",
    "MPP_RANGE",
    "PART_MARKER",
]

COMPRESSIONS = ("jpeg", "deflate", "lzw", "none")
#: Suffix -> saver for ordinary images.
IMAGE_SUFFIXES = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp", ".tif": "tiff", ".tiff": "tiff"}
#: Temporary outputs carry this in their name (``.NAME.vipsnorm-part-<8 hex digits>.EXT``, NAME cut short
#: when the whole would not fit in a file name: :func:`part_stem`).
PART_MARKER = ".vipsnorm-part-"
#: The longest file name, in bytes, when the file system does not say (ext4, XFS, btrfs, APFS, NTFS).
NAME_MAX = 255
#: The longest file name, in bytes, that every file system vipsnorm may write to takes (eCryptfs, the
#: shortest known, takes 143).
SHORTEST_NAME_MAX = 143
#: Bytes a temporary name adds to the name it is for (24 for ``.`` + :data:`PART_MARKER` + 8 hex
#: digits), with room to spare: a name this much shorter than :data:`SHORTEST_NAME_MAX` fits, and so do
#: its temporary names, on every file system, so its folder is not asked (:func:`_limit`).
_TEMP_ROOM = 40
#: Saver -> the largest width or height it can write (libjpeg's JPEG_MAX_DIMENSION, libwebp's
#: WEBP_MAX_DIMENSION). Checked before any work: libvips would fail only when the save starts.
MAX_SIDE = {"jpeg": 65500, "webp": 16383}
_FORMAT_NAMES = {"jpeg": "JPEG", "webp": "WebP"}
#: The pixel sizes, in microns, an output can state: libvips clips TIFF resolution to 0.01..10^6 pixels
#: per cm (a pixel size outside this range would be written as another one).
MPP_RANGE = (0.01, 1e6)
# The libvips domains (first word of an error line) of the savers and of their output streams: a save
# whose *first* error comes from one of them failed on the output side. libvips reads the input lazily
# during the save, so a decode failure of the input is reported by the save too, but its first line
# comes from the loader's domain (tiff2vips, VipsJpeg, ...): the first line is the root cause, later
# ones (``vips2png: unable to write to target``) only say that the save then gave up. VipsJpeg is the
# JPEG loader's and saver's: of its messages only "unable to write ..." is the output's.
_SAVE_DOMAINS = ("vips2tiff", "vips2png", "vips2jpeg", "vips2webp", "tiffsave", "pngsave", "jpegsave", "webpsave", "wbuffer_write")

# Metadata copied from the input that must not reach the output: vendor descriptions (an Aperio
# ImageDescription makes OpenSlide read the output as Aperio with a stale pixel size), XMP/IPTC blocks.
_DROP_FIELDS = ("image-description", "xmp-data", "iptc-data")


def name_max(folder: str | os.PathLike[str]) -> int:
    """The longest file name, in bytes, the file system of ``folder`` takes (:data:`NAME_MAX` when it
    cannot be asked: a folder not created yet, Windows); eCryptfs, for one, takes only 143.

    Asked once per folder and process (``pathconf`` is a ``statfs``: an uncached server round trip on
    NFS, and a batch asks for every output): the answers of the last 4096 folders are kept. A folder
    that cannot be asked is asked again next time (it may have been created meanwhile).
    """
    try:
        return _pathconf_name_max(os.path.abspath(folder))  # (absolute: a cache key that survives a chdir)
    except (OSError, ValueError, TypeError, AttributeError):
        return NAME_MAX


@functools.lru_cache(maxsize=4096)
def _pathconf_name_max(folder: str) -> int:
    # (an exception is not cached: only answers are)
    return os.pathconf(folder, "PC_NAME_MAX")


def _limit(path: Path) -> int:
    """The longest file name the folder of ``path`` takes, or :data:`SHORTEST_NAME_MAX` without asking
    when ``path``'s name and its temporary names fit in that (what most outputs' names do): every
    use of the limit here then gives the same answer as the real one would."""
    if _bytes(path.name) + _TEMP_ROOM <= SHORTEST_NAME_MAX:
        return SHORTEST_NAME_MAX
    return name_max(path.parent)


def _bytes(text: str) -> int:
    return len(os.fsencode(text))


def _cut(text: str, limit: int) -> str:
    """The longest start of ``text`` that takes at most ``limit`` bytes, cut between characters: a
    multi-byte UTF-8 character (or an undecodable byte, kept as a surrogate escape) is never split."""
    size = 0
    for i, char in enumerate(text):
        size += _bytes(char)
        if size > limit:
            return text[:i]
    return text


def part_stem(stem: str, suffix: str, limit: int = NAME_MAX) -> str:
    """The NAME part of the temporary name ``.NAME.vipsnorm-part-XXXXXXXX.EXT`` of ``stem + suffix``:
    ``stem`` itself, or its longest start that lets the temporary name fit in ``limit`` bytes (an output
    name may be up to ``limit`` bytes, and the temporary one adds 24 and the suffix's). Empty when even
    the suffix leaves no room; :func:`atomic_path` then drops the suffix too."""
    return _cut(stem, limit - _bytes("." + PART_MARKER) - 8 - _bytes(suffix))


def _temp_suffix(path: Path, limit: int) -> str:
    """The suffix of the temporary names of ``path``: its own, unless it alone would not fit (a name such
    as ``ref.<240 letters>``). The writers here call their saver by name (``jpegsave``, ``tiffsave``),
    never by suffix, so a temporary file without one is written the same."""
    room = limit - _bytes("." + PART_MARKER) - 8
    return path.suffix if _bytes(path.suffix) <= room else ""


def _temp_prefix(path: Path, limit: int | None = None) -> Path:
    """What every temporary name of ``path`` begins with (:func:`atomic_path`), NAME cut to fit."""
    limit = _limit(path) if limit is None else limit
    return path.with_name(f".{part_stem(path.stem, _temp_suffix(path, limit), limit)}{PART_MARKER}")


def check_name(path: str | os.PathLike[str], fix: str = "give a shorter name") -> None:
    """Refuse an output whose file name the file system cannot hold, with one line naming it and ending
    with ``fix`` (what the user can do about it).

    Raises
    ------
    OutputError
        The name of ``path`` is longer than the file system of its folder allows (255 bytes on most).
    """
    path = Path(path)
    _check_name(path, _limit(path), fix)


def _check_name(path: Path, limit: int, fix: str = "give a shorter name") -> None:
    """:func:`check_name` with the folder's ``limit`` known."""
    size = _bytes(path.name)
    if size > limit:
        raise OutputError(
            path,
            f"the output name is {size} bytes, more than the {limit} a file name can have here; {fix}",
        )


_BEFORE_RENAME: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("before_rename", default=None)


@contextlib.contextmanager
def checked_before_rename(check: Callable[[], None]) -> Iterator[None]:
    """Within this block (in this thread or task), :func:`atomic_path` calls ``check()`` once the output
    is written and before it is renamed into place: an exception from it discards the output. How a
    slide's reader refuses an output whose input decoded with damage that libvips did not raise."""
    token = _BEFORE_RENAME.set(check)
    try:
        yield
    finally:
        _BEFORE_RENAME.reset(token)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success, delete it on failure.

    The temporary name is ``.NAME.vipsnorm-part-XXXXXXXX.EXT`` (:data:`PART_MARKER`), NAME cut short
    (:func:`part_stem`) so that it fits in a file name whenever ``path``'s own name does.

    A failure to delete the temporary file (a read-only or vanished folder) never replaces the error
    that made the write fail: that one is raised, and a part file left behind is deleted by the next
    run over the folder (:func:`vipsnorm.batch.inputs.remove_part_files`).

    Raises
    ------
    OutputError
        The name of ``path`` is too long for its file system (:func:`check_name`); nothing is written.
    """
    path = Path(path)
    limit = _limit(path)  # the folder asked once at most, for the check and the temporary name
    _check_name(path, limit)
    temp = Path(f"{_temp_prefix(path, limit)}{secrets.token_hex(4)}{_temp_suffix(path, limit)}")
    try:
        yield temp
        check = _BEFORE_RENAME.get()
        if check is not None:
            check()
        os.replace(temp, path)
    except BaseException:
        try:
            temp.unlink(missing_ok=True)
        except OSError:  # EROFS, EACCES, EIO: the original error says what went wrong
            pass
        raise


def check_size(path: str | os.PathLike[str], width: int, height: int) -> None:
    """Refuse, before any work, an image the format of ``path`` (by its suffix) cannot hold.

    Raises
    ------
    OutputError
        The image is wider or taller than the format allows (:data:`MAX_SIDE`: JPEG 65500 px, WebP
        16383 px a side).
    """
    kind = IMAGE_SUFFIXES.get(Path(path).suffix.lower())
    limit = MAX_SIDE.get(kind)
    if limit is not None and max(width, height) > limit:
        name = _FORMAT_NAMES[kind]
        raise OutputError(
            path,
            f"{name} holds at most {limit} px a side and the image is {width}x{height} px; "
            "write it as TIFF (--format tiff)",
        )


def check_mpp(mpp: tuple[float, float] | None) -> tuple[float, float] | None:
    """``mpp`` as two floats, or ``None`` (pixel size unknown).

    Raises
    ------
    ValueError
        Not two finite numbers within :data:`MPP_RANGE` (a zero, negative, NaN or infinite pixel size
        made libvips write its default 72 dpi, or divided by zero).
    """
    if mpp is None:
        return None
    low, high = MPP_RANGE
    try:
        x, y = (float(v) for v in mpp)
        ok = all(math.isfinite(v) and low <= v <= high for v in (x, y))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"mpp must be None (pixel size unknown) or two numbers of microns per pixel from {low:g} to {high:g}, not {mpp!r}"
        )
    return x, y


def check_quality(quality: int) -> int:
    """``quality`` if it is a whole number from 1 to 100.

    Raises
    ------
    ValueError
        Anything else (libvips silently used its default for 0 or 1000).
    """
    if isinstance(quality, bool) or not isinstance(quality, numbers.Integral) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be a whole number from 1 to 100, not {quality!r}")
    return int(quality)


def lossless_webp(path: str | os.PathLike[str]) -> bool:
    """Whether the WebP file ``path`` holds lossless (VP8L) pixels, which libvips' loader does not
    say. The first bitstream chunk decides (of the first frame, in an animation); a file that cannot
    be read or is not WebP counts as lossy."""
    try:
        with open(path, "rb") as f:
            header = f.read(12)
            if header[:4] != b"RIFF" or header[8:12] != b"WEBP":
                return False
            while len(chunk := f.read(8)) == 8:
                kind, (size,) = chunk[:4], struct.unpack("<I", chunk[4:])
                if kind in (b"VP8L", b"VP8 "):
                    return kind == b"VP8L"
                # an animation frame: its 16-byte header, then its own chunks; any other: skipped
                f.seek(16 if kind == b"ANMF" else size + (size & 1), os.SEEK_CUR)
    except OSError:
        pass
    return False


def _output_failure(exc: pyvips.Error, path: Path) -> str | None:
    """Why a save failed on the output side (the file could not be created or written, the saver
    refused the image), or ``None`` when its root cause is elsewhere: the input, read during the save.

    libvips names the file it failed to open or write (``PATH: write error`` then ``system error: No
    space left on device``); every other save-side failure comes from a saver's domain.
    """
    lines = [line.strip() for line in f"{exc.detail or ''}".splitlines() if line.strip()]
    if not lines:
        return None
    first, prefix = lines[0], f"{_temp_prefix(path)}"
    if first.startswith(prefix):  # the temporary name atomic_path gave libvips
        rest = first[len(prefix) :]  # "<8 hex digits>.EXT: write error"
        what = rest.split(": ", 1)[1] if ": " in rest else rest
        if len(lines) > 1 and lines[1].startswith("system error:"):
            what += ": " + lines[1].removeprefix("system error:").strip()
        return what
    domain = first.split(":", 1)[0]
    if domain in _SAVE_DOMAINS or first.startswith("VipsJpeg: unable to write"):
        return one_line(first)
    return None


@contextlib.contextmanager
def _output_errors(path: Path) -> Iterator[None]:
    """Failures of the output itself as :class:`OutputError` naming ``path``; a failure to decode
    the (lazily read) input stays a ``pyvips.Error`` for the caller, who knows the input."""
    try:
        yield
    except pyvips.Error as exc:
        cause = _output_failure(exc, path)
        if cause is None:
            raise
        raise OutputError(path, f"cannot write the output ({cause})") from exc
    except OSError as exc:  # the rename into place, or our own edit of the written TIFF
        raise OutputError(path, f"cannot write the output ({exc.strerror or exc})") from exc


def _clean(image: pyvips.Image, keep_exif: bool) -> pyvips.Image:
    image = image.copy()
    for field in image.get_fields():
        if field in _DROP_FIELDS or (not keep_exif and field.startswith(("exif-", "orientation"))):
            image.remove(field)
    return image


def write_pyramid(
    image: pyvips.Image,
    path: str | os.PathLike[str],
    *,
    mpp: tuple[float, float] | None = None,
    compression: str = "jpeg",
    quality: int = 90,
    tile: int = 256,
    description: str | None = None,
) -> Path:
    """Write a pyramidal tiled BigTIFF that OpenSlide (generic-tiff), QuPath and tifffile open.

    Parameters
    ----------
    mpp : (float, float), optional
        Microns per pixel at level 0, stored in the TIFF resolution tags (unit: cm); ``None``: the
        resolution unit is "none" (readers then report no pixel size).
    compression : {"jpeg", "deflate", "lzw", "none"}
        JPEG (lossy, ``quality``) by default; deflate and LZW are lossless (horizontal predictor).
    quality : int
        1 to 100.
    description : str, optional
        Our own ImageDescription; the input's (vendor) description is never copied.

    Raises
    ------
    ValueError
        An unknown compression, a quality outside 1..100, or an ``mpp`` :func:`check_mpp` refuses.
    OutputError
        The output cannot be written (folder missing or read-only, disk full, ...).
    pyvips.Error
        The pixels of ``image`` (read lazily, during the save) cannot be decoded.
    """
    path = Path(path)
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
    mpp, quality = check_mpp(mpp), check_quality(quality)
    image = _clean(image, keep_exif=False)
    if description:
        image.set_type(pyvips.GValue.gstr_type, "image-description", description)
    options = dict(
        tile=True,
        pyramid=True,
        bigtiff=True,
        tile_width=tile,
        tile_height=tile,
        compression=compression,
    )
    if compression == "jpeg":
        options["Q"] = quality
    elif compression in ("deflate", "lzw"):
        options["predictor"] = "horizontal"
    if mpp is not None:
        # libvips takes resolution in pixels per millimetre and writes it in the unit asked for.
        options.update(xres=1000.0 / mpp[0], yres=1000.0 / mpp[1], resunit="cm")
    with _output_errors(path), atomic_path(path) as temp:
        image.tiffsave(str(temp), **options)
        if mpp is None:
            _set_no_resolution_unit(temp)
    return path


def _set_no_resolution_unit(path: Path) -> None:
    """Set ResolutionUnit to "none" in every IFD of a TIFF or BigTIFF written by libvips, in place.

    libvips always writes a unit (inch or cm); with it, readers would take libvips' default resolution
    (or a JPEG's print dpi) for a real pixel size. Without a unit, OpenSlide, QuPath and vipsnorm
    report the pixel size as unknown.
    """
    with open(path, "r+b") as f:
        header = f.read(16)
        order = {b"II": "<", b"MM": ">"}.get(header[:2])
        version = struct.unpack(order + "H", header[2:4])[0] if order else None
        if version not in (42, 43):
            raise ValueError(f"{path}: expected a TIFF or a BigTIFF")
        # classic TIFF: 2-byte entry counts, 12-byte entries, 4-byte offsets; BigTIFF: 8, 20, 8
        count_fmt, entry_size, offset_fmt = ("H", 12, "I") if version == 42 else ("Q", 20, "Q")
        count_size, offset_size = struct.calcsize(count_fmt), struct.calcsize(offset_fmt)
        (offset,) = struct.unpack(order + offset_fmt, header[4:8] if version == 42 else header[8:16])
        while offset:
            f.seek(offset)
            (count,) = struct.unpack(order + count_fmt, f.read(count_size))
            for i in range(count):
                entry_at = offset + count_size + entry_size * i
                f.seek(entry_at)
                tag, typ = struct.unpack(order + "HH", f.read(4))
                if tag == 296:  # ResolutionUnit, SHORT, inline: its value is at the start of the value field
                    f.seek(entry_at + 4 + offset_size)
                    f.write(struct.pack(order + "H", 1))
            f.seek(offset + count_size + entry_size * count)
            (offset,) = struct.unpack(order + offset_fmt, f.read(offset_size))


def write_image(
    image: pyvips.Image,
    path: str | os.PathLike[str],
    *,
    mpp: tuple[float, float] | None = None,
    quality: int = 90,
    compression: str | None = None,
    lossless: bool = False,
) -> Path:
    """Write an ordinary image in the format its suffix names (JPEG, PNG, WebP, TIFF).

    Parameters
    ----------
    mpp : (float, float), optional
        Microns per pixel. TIFF: stored in the resolution tags (unit: cm), and without it the resolution
        unit is "none", so that no resolution of the input (a JPEG's print dpi, libvips' default 1 px/mm)
        is read as a pixel size. JPEG, PNG, WebP: stored as their resolution (JFIF density, pHYs, EXIF),
        and without it the image's own resolution (the input's dpi) is written unchanged.
    quality : int
        JPEG and lossy WebP quality, 1 to 100, and that of TIFF with ``compression="jpeg"``.
    compression : {"jpeg", "deflate", "lzw", "none"}, optional
        TIFF only: as for :func:`write_pyramid`; default deflate (lossless, horizontal predictor).
    lossless : bool
        WebP only: lossless WebP (``quality`` then only trades speed for size).

    Raises
    ------
    ValueError
        An unknown suffix or compression, an option the format does not take, a quality outside
        1..100, or an ``mpp`` :func:`check_mpp` refuses.
    OutputError
        The image is too large for the format (:func:`check_size`), or the output cannot be written.
    pyvips.Error
        The pixels of ``image`` (read lazily, during the save) cannot be decoded.
    """
    path = Path(path)
    kind = IMAGE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"cannot write {path.suffix!r}: use one of {sorted(IMAGE_SUFFIXES)}")
    if compression is not None and kind != "tiff":
        raise ValueError(f"compression is for TIFF outputs only, not {path.suffix!r}; leave it out")
    if lossless and kind != "webp":
        raise ValueError(f"lossless is for WebP outputs only, not {path.suffix!r}; leave it out")
    compression = compression or "deflate"
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
    mpp, quality = check_mpp(mpp), check_quality(quality)
    check_size(path, image.width, image.height)
    # a JPEG of pixels already in memory is coded by small_jpeg.save, with libvips' metadata
    pixels = _native.memory_pixels(image) if kind == "jpeg" else None
    image = _clean(image, keep_exif=True)
    resolution = {}
    if mpp is not None:  # libvips takes resolution in pixels per millimetre
        resolution = dict(xres=1000.0 / mpp[0], yres=1000.0 / mpp[1])
        image = image.copy(**resolution)
    with _output_errors(path), atomic_path(path) as temp:
        if kind == "jpeg":
            small_jpeg.save(image, temp, quality, pixels)
        elif kind == "png":
            image.pngsave(str(temp))
        elif kind == "webp":
            image.webpsave(str(temp), Q=quality, lossless=lossless)
        else:
            options: dict = dict(compression=compression)
            if compression == "jpeg":
                options["Q"] = quality
            elif compression in ("deflate", "lzw"):
                options["predictor"] = "horizontal"
            if mpp is not None:
                options.update(resolution, resunit="cm")
            image.tiffsave(str(temp), **options)
            if mpp is None:
                _set_no_resolution_unit(temp)
    return path
