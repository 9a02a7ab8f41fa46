"""Turn whatever a loader produced into the processing format: uchar, 1 band (grey) or 3 bands (sRGB).

Notes
-----
* Alpha is flattened onto white (slides and scans have white backgrounds; black would look like tissue).
* CMYK, Lab, XYZ and other colour spaces are converted to sRGB by libvips (with the embedded ICC
  profile where there is one).
* 1-bit images arrive from libvips as uchar 0/255 and stay grey.
* 16-bit images are scaled down to 8 bits over the full type range (``v / 257``, rounded), so a 16-bit
  value of 65535 becomes 255. Images that use only the low 12 bits come out dark; the normalization
  that follows stretches them again, with 4 fewer bits of precision.
* Signed 8-bit images are shifted by +128 (order preserved); signed 16-bit by +32768 before scaling.
* Float, 32-bit integer and complex pixels are refused: their range is not defined by the type.
"""

from __future__ import annotations

import pyvips

from ..errors import UnsupportedImageError

__all__ = ["to_processing"]

_COLOUR_SPACES_TO_SRGB = {"cmyk", "lab", "labs", "labq", "lch", "cmc", "xyz", "yxy", "hsv", "scrgb"}


def to_processing(image: pyvips.Image, path: str | None = None) -> pyvips.Image:
    """Return ``image`` as a lazy uchar image with 1 (grey) or 3 (sRGB) bands.

    Parameters
    ----------
    image : pyvips.Image
        Any image a loader produced.
    path : str, optional
        Named in error messages.

    Raises
    ------
    UnsupportedImageError
        Float, 32-bit or complex pixels, or a band layout that is not grey, grey+alpha, RGB, RGBA or CMYK.
    """
    if image.coding == "labq":
        image = image.colourspace("srgb")
    elif image.coding != "none":
        raise UnsupportedImageError(path, f"unsupported pixel coding {image.coding!r}")

    fmt = image.format
    if fmt in ("float", "double", "complex", "dpcomplex", "int", "uint"):
        loader = image.get("vips-loader") if image.get_typeof("vips-loader") else ""
        if image.interpretation == "scrgb" and fmt == "float" and not loader.startswith("tiffload"):
            # linear light in 0..1 by its format's definition (OpenEXR, PFM, a libvips .v)
            image = image.colourspace("srgb")
            fmt = image.format
        else:
            # libvips labels every 3-band float TIFF scRGB, whatever range and transfer its writer
            # meant (0..1 sRGB, 0..255 and 0..65535 are all seen): converting would guess
            raise UnsupportedImageError(
                path, f"{fmt} pixels have no defined range; convert to 8- or 16-bit first"
            )

    interpretation = image.interpretation
    if interpretation in _COLOUR_SPACES_TO_SRGB:
        image = image.colourspace("srgb")
        fmt = image.format

    if fmt == "char":
        image = (image.cast("short") + 128).cast("uchar")
    elif fmt == "short":
        image = ((image.cast("int") + 32768) * (1 / 257)).rint().cast("uchar")
    elif fmt == "ushort":
        image = (image * (1 / 257)).rint().cast("uchar")

    bands = image.bands
    if bands in (2, 4):  # grey or RGB with alpha (CMYK was converted above)
        image = image.flatten(background=[255] * (bands - 1))
        if image.format != "uchar":
            image = image.rint().cast("uchar")
    elif bands not in (1, 3):
        raise UnsupportedImageError(
            path, f"{bands}-band image (multispectral?) is not supported: expected grey or RGB"
        )
    want = "srgb" if image.bands == 3 else "b-w"
    return image if image.interpretation == want else image.copy(interpretation=want)
