"""Writing results: pyramidal tiled BigTIFF for slides, the input's own format for ordinary images.

Every write goes to a temporary name in the output folder and is renamed into place only when libvips
has finished without error, so a killed or failed run never leaves a half-written file under the final
name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pyvips

__all__ = ["atomic_path", "write_pyramid", "write_image", "COMPRESSIONS", "IMAGE_SUFFIXES", "PART_MARKER"]

COMPRESSIONS = ("jpeg", "deflate", "lzw", "none")
#: Suffix -> saver for ordinary images.
IMAGE_SUFFIXES = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp", ".tif": "tiff", ".tiff": "tiff"}
#: Temporary outputs carry this in their name (``.NAME.vipsnorm-part-<8 hex digits>.EXT``).
PART_MARKER = ".vipsnorm-part-"

# Metadata copied from the input that must not reach the output: vendor descriptions (an Aperio
# ImageDescription makes OpenSlide read the output as Aperio with a stale pixel size), XMP/IPTC blocks.
_DROP_FIELDS = ("image-description", "xmp-data", "iptc-data")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success, delete it on failure."""
    path = Path(path)
    temp = path.with_name(f".{path.stem}{PART_MARKER}{secrets.token_hex(4)}{path.suffix}")
    try:
        yield temp
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


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
        Microns per pixel at level 0, stored in the TIFF resolution tags (unit: cm).
    compression : {"jpeg", "deflate", "lzw", "none"}
        JPEG (lossy, ``quality``) by default; deflate and LZW are lossless (horizontal predictor).
    description : str, optional
        Our own ImageDescription; the input's (vendor) description is never copied.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
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
    with atomic_path(path) as temp:
        image.tiffsave(str(temp), **options)
        if mpp is None:
            _set_no_resolution_unit(temp)
    return Path(path)


def _set_no_resolution_unit(path: Path) -> None:
    """Set ResolutionUnit to "none" in every IFD of a little-endian BigTIFF, in place.

    libvips always writes a unit (inch or cm); with it, readers would take libvips' default resolution
    for a real pixel size. Without a unit, OpenSlide and QuPath report the pixel size as unknown.
    """
    import struct

    with open(path, "r+b") as f:
        header = f.read(16)
        if header[:4] != b"II+\x00":
            raise ValueError(f"{path}: expected a little-endian BigTIFF")
        (offset,) = struct.unpack("<Q", header[8:16])
        while offset:
            f.seek(offset)
            (count,) = struct.unpack("<Q", f.read(8))
            for i in range(count):
                entry_at = offset + 8 + 20 * i
                f.seek(entry_at)
                tag, typ = struct.unpack("<HH", f.read(4))
                if tag == 296:  # ResolutionUnit, SHORT, inline
                    f.seek(entry_at + 12)
                    f.write(struct.pack("<H", 1))
            f.seek(offset + 8 + 20 * count)
            (offset,) = struct.unpack("<Q", f.read(8))


def write_image(image: pyvips.Image, path: str | os.PathLike[str], *, quality: int = 90) -> Path:
    """Write an ordinary image in the format its suffix names (JPEG, PNG, WebP, TIFF)."""
    path = Path(path)
    kind = IMAGE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"cannot write {path.suffix!r}: use one of {sorted(IMAGE_SUFFIXES)}")
    image = _clean(image, keep_exif=True)
    with atomic_path(path) as temp:
        if kind == "jpeg":
            image.jpegsave(str(temp), Q=quality)
        elif kind == "png":
            image.pngsave(str(temp))
        elif kind == "webp":
            image.webpsave(str(temp), Q=quality)
        else:
            image.tiffsave(str(temp), compression="deflate", predictor="horizontal")
    return path
