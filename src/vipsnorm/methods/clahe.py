"""Contrast-limited adaptive histogram equalization (CLAHE) that streams over gigapixel slides.

The image is cut into a grid of *contextual regions*; each region gets a clipped-histogram equalization
LUT computed over the **whole** image (one streaming libvips pass, bounded memory), and every pixel is
mapped through the LUTs of the (up to) four region centres around it, interpolated bilinearly. This is
CLAHE on the whole image at once, never per-tile CLAHE, so tiles of a slide show no seams.

The arithmetic is OpenCV's ``createCLAHE(clipLimit, tileGridSize)``: the same region geometry (an image
whose size is not a multiple of the grid is padded at the bottom/right by ``BORDER_REFLECT_101`` for the
histograms, exactly as OpenCV does), the same clip limit ``max(1, int(clipLimit * regionArea / 256))``,
the same redistribution of the clipped excess (evenly, then the remainder one count every
``256 // remainder`` bins from 0), the same LUT scale ``255 / regionArea`` in float32 with
round-half-even, and the same interpolation coordinates ``x / regionWidth - 0.5``.

Notes
-----
Input is uchar, 1 band (grey) or 3 bands (RGB, gamma-encoded). In ``luminance`` mode a colour image is
equalized on its BT.601 luma ``Y`` (bit-exactly :func:`~vipsnorm.methods._hist.luma_image`) and every band
gets ``Y' - Y`` added, clipped to 0..255 (hue and chroma kept, as in YCbCr); in ``rgb`` mode each band is
equalized on its own. On grey images, and on the luma of colour images, the numpy path
(:meth:`Clahe.apply_array`) reproduces OpenCV to within rounding (see ``tests/test_clahe.py`` for the
measured figures); the lazy pyvips path (:meth:`Clahe.apply`) equals the numpy path up to one grey level
on pixels whose interpolated value falls on (or within float error of) a half-integer.
"""

from __future__ import annotations

import base64
import functools
import math
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyvips

from .. import _native
from ..errors import FlatImageError
from ._hist import STEP, add_change, luma_array, luma_image
from .base import Method, Params, Sample, _invalid

__all__ = ["Clahe", "ClaheParams", "clahe_luts", "grid_geometry"]

#: OpenCV's default tileGridSize, used for images up to LARGE pixels a side.
DEFAULT_GRID = (8, 8)
#: Larger images (slides) get regions of this many level-0 pixels instead, unless told otherwise.
LARGE = 8192
DEFAULT_REGION = 1024
#: Fitting on a downsampled level needs regions of at least this many pixels a side there.
MIN_FIT_REGION = 256

#: Bins of a uchar histogram.
_BINS = 256
#: Regions whose histograms one ``hist_find`` pass can key into a ushort image (65536 bins / 256).
_REGIONS_PER_PASS = 65536 // _BINS
#: Interpolation cells one ``maplut`` can key (its LUT holds at most 65536 entries).
_CELLS_PER_LUT = 65536 // _BINS
#: Largest block of one cell's interpolation weights (float32, 4 bands; ``rgb`` mode: three times as wide)
#: that :meth:`Clahe.apply` holds in memory: 64 MiB, regions up to 2048 px a side (1182 px in ``rgb``
#: mode). Larger regions zoom the weights instead (see :func:`_weight_image`).
_BLOCK_BYTES = 64 << 20


# --------------------------------------------------------------------------------------------------
# geometry and LUTs (shared by every path)


def grid_geometry(width: int, height: int, grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """OpenCV's region size and padding: ``(tile_w, tile_h, pad_x, pad_y)`` for a ``(cols, rows)`` grid.

    When width and height are both multiples of the grid, the regions tile the image exactly. Otherwise
    OpenCV pads the image at the right by ``cols - width % cols`` and at the bottom by
    ``rows - height % rows`` (``BORDER_REFLECT_101``), even along an axis that was already a multiple,
    and the regions tile the padded image.
    """
    cols, rows = grid
    if width % cols == 0 and height % rows == 0:
        pad_x = pad_y = 0
    else:
        pad_x, pad_y = cols - width % cols, rows - height % rows
    return (width + pad_x) // cols, (height + pad_y) // rows, pad_x, pad_y


def clahe_luts(hist: np.ndarray, clip_limit: float, area: int) -> np.ndarray:
    """OpenCV's clipped-equalization LUTs of region histograms.

    Parameters
    ----------
    hist : ndarray, shape (..., 256), integer
        Pixel counts per value of each region (``area`` pixels each).
    clip_limit : float
        OpenCV's ``clipLimit``: each bin is clipped at ``max(1, int(clip_limit * area / 256))``; the
        excess is spread over all bins (evenly, then the remainder one count every ``256 // remainder``
        bins starting at 0). ``clip_limit <= 0`` disables clipping (plain adaptive equalization).
    area : int
        Pixels per region.

    Returns
    -------
    ndarray, shape (..., 256), uint8
        ``round_half_even(cumsum(clipped) * float32(255 / area))``, in float32 as OpenCV.
    """
    hist = np.asarray(hist)
    if _native.available():  # the same arithmetic, in C
        clip = min(max(int(clip_limit * area / _BINS), 1), area) if clip_limit > 0 else 0
        native = _native.clahe_luts(hist, clip, np.float32(_BINS - 1) / np.float32(area))
        if native is not None:
            return native
    out = np.empty(hist.shape, np.uint8)
    rows, into = hist.reshape(-1, _BINS), out.reshape(-1, _BINS)
    # int32 counts when a region's cumulative counts fit (a few calls fewer per region than int64)
    dtype = np.int32 if area < 1 << 30 else np.int64
    per = max(1, 2 * STEP * 4 // (_BINS * np.dtype(dtype).itemsize))  # regions per step: temporaries of 120 KiB
    for start in range(0, rows.shape[0], per):
        into[start : start + per] = _clahe_luts(rows[start : start + per], clip_limit, area, dtype)
    return out


def _clahe_luts(hist: np.ndarray, clip_limit: float, area: int, dtype=np.int64) -> np.ndarray:
    if clip_limit > 0:
        # (no bin holds more than the area: a larger clip clips nothing, and would overflow int32)
        clip = min(max(int(clip_limit * area / _BINS), 1), area)
        h = np.minimum(hist, clip, dtype=dtype, casting="unsafe")
        # the clipped excess, sum(max(hist - clip, 0)), is what the clipping removed
        excess = hist.sum(axis=-1, dtype=np.int64)
        excess -= h.sum(axis=-1, dtype=np.int64)
        batch, residual = np.divmod(excess, _BINS)
        h += batch.astype(dtype)[..., np.newaxis]
        h += np.take(_residual_bins(), residual, axis=0)
    else:
        h = np.array(hist, dtype=dtype)
    scale = np.float32(_BINS - 1) / np.float32(area)
    lut = np.cumsum(h, axis=-1, out=h).astype(np.float32)
    lut *= scale
    np.rint(lut, out=lut)
    return np.clip(lut, 0, 255, out=lut)


@functools.lru_cache(maxsize=1)
def _residual_bins() -> np.ndarray:
    """(256, 256) uint8: the bins that get one more count when ``r`` counts remain to be spread (row
    ``r``): one every ``256 // r`` bins from 0, ``r`` of them (OpenCV's rule)."""
    r = np.arange(_BINS)[:, np.newaxis]
    i = np.arange(_BINS)
    step = np.maximum(_BINS // np.maximum(r, 1), 1)
    table = ((i % step == 0) & (i // step < r)).astype(np.uint8)
    table.flags.writeable = False
    return table


def _reflect101(index: np.ndarray, size: int) -> np.ndarray:
    """``BORDER_REFLECT_101`` source index (``dcb|abcd|cba``), reflected as often as needed."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    j = np.mod(index, period)
    return np.where(j < size, j, period - j)


def _axis_cells(size: int, tile: int, regions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel along one axis: interpolation cell (0..regions), the two region indices, weight of the 2nd.

    OpenCV's coordinates in float32: ``f = x * (1 / tile) - 0.5``, ``t1 = floor(f)``, ``a = f - t1``;
    the regions are ``max(t1, 0)`` and ``min(t1 + 1, regions - 1)``.
    """
    f = np.arange(size, dtype=np.float32) * (np.float32(1.0) / np.float32(tile)) - np.float32(0.5)
    t1 = np.floor(f)
    a = (f - t1).astype(np.float32)
    t1 = t1.astype(np.int64)
    return t1 + 1, np.maximum(t1, 0), np.minimum(t1 + 1, regions - 1), a


# --------------------------------------------------------------------------------------------------
# params


@dataclass(frozen=True)
class ClaheParams(Params):
    """Fitted CLAHE: the region geometry and every region's LUT.

    Attributes
    ----------
    width, height : int
        Size of the image fitted on (level 0); :meth:`Clahe.apply` requires the same size.
    grid : (int, int)
        Regions across and down (OpenCV's ``tileGridSize``).
    tile : (int, int)
        Region width and height in pixels (of the padded image, see :func:`grid_geometry`).
    clip_limit : float
        OpenCV's ``clipLimit`` used for the fit (0: no clipping).
    mode : {"luminance", "rgb", "grey"}
        What the LUTs map: BT.601 luma (colour images), each band, or the grey band.
    luts : str
        The uint8 LUTs, shape ``(channels, rows, cols, 256)`` (channels 3 for ``rgb``, else 1), as
        base64 of the zlib-compressed C-order bytes (a 100k-pixel slide has thousands of regions).
    """

    method = "clahe"
    width: int = 0
    height: int = 0
    grid: tuple[int, int] = (1, 1)
    tile: tuple[int, int] = (1, 1)
    clip_limit: float = 2.0
    mode: str = "luminance"
    luts: str = ""

    @staticmethod
    def encode_luts(luts: np.ndarray) -> str:
        return base64.b64encode(zlib.compress(np.ascontiguousarray(luts, dtype=np.uint8).tobytes(), 6)).decode("ascii")

    def lut_array(self) -> np.ndarray:
        """The LUTs as a ``(channels, rows, cols, 256)`` uint8 array."""
        raw = np.frombuffer(zlib.decompress(base64.b64decode(self.luts)), dtype=np.uint8)
        cols, rows = self.grid
        return raw.reshape(-1, rows, cols, _BINS)

    def _validate(self) -> None:
        super()._validate()
        size = "a positive integer (pixels of the image fitted on)"
        width = int(self._field("width", size, [()], integer=True, minimum=1))
        height = int(self._field("height", size, [()], integer=True, minimum=1))
        grid = tuple(int(v) for v in self._field("grid", "2 positive integers (regions across, down)", [(2,)], integer=True, minimum=1))
        tile = tuple(int(v) for v in self._field("tile", "2 positive integers (region width, height)", [(2,)], integer=True, minimum=1))
        self._field("clip_limit", "a number >= 0 (0: no clipping)", [()], minimum=0)
        mode = self._choice("mode", ("luminance", "rgb", "grey"))
        expected = grid_geometry(width, height, grid)[:2]
        if tile != expected:
            _invalid(self, "tile", f"{expected}, the regions of a {grid[0]}x{grid[1]} grid on {width}x{height} pixels", str(tile))
        channels = 3 if mode == "rgb" else 1
        size = channels * grid[0] * grid[1] * _BINS
        what = f"base64 of the zlib-compressed {channels}x{grid[1]}x{grid[0]}x{_BINS} uint8 LUTs ({size} bytes)"
        if not isinstance(self.luts, str):
            _invalid(self, "luts", what, repr(type(self.luts).__name__))
        try:  # at most one byte more than expected is inflated: a bogus stream cannot fill the memory
            inflate = zlib.decompressobj()
            raw = inflate.decompress(base64.b64decode(self.luts, validate=True), size + 1)
            complete = inflate.eof
        except (ValueError, zlib.error) as exc:  # binascii.Error is a ValueError
            _invalid(self, "luts", what, f"undecodable text ({exc})")
        if len(raw) != size or not complete:
            _invalid(self, "luts", what, f"{len(raw)} bytes" if complete else f"more than {size} bytes")


# --------------------------------------------------------------------------------------------------
# the method


class Clahe(Method):
    """Contrast-limited adaptive histogram equalization over the whole image (OpenCV semantics).

    Parameters
    ----------
    clip_limit : float
        OpenCV's ``clipLimit`` (default 2.0): histogram bins are clipped at
        ``clip_limit * region_area / 256`` counts (at least 1); 0 disables clipping.
    grid : (int, int), optional
        Regions across and down (OpenCV's ``tileGridSize``), used when no region size is given.
        Default: OpenCV's 8 x 8 for images up to ``LARGE`` (8192) pixels a side; larger images (slides)
        get regions of ``DEFAULT_REGION`` (1024) level-0 pixels instead, since eight regions across a
        100,000-pixel slide would not be adaptive at all.
    region : int or (int, int), optional
        Region side in level-0 pixels (slides: 1024 is a good start). The grid becomes
        ``max(1, round(size / region))`` regions along each axis, and the geometry is then OpenCV's for
        that grid, so the result is exactly OpenCV's CLAHE of the whole image with that grid.
    region_um : float, optional
        Region side in microns; needs the pixel size (``mpp`` of :meth:`fit_level`). Takes precedence
        over ``region`` when the pixel size is known, else ``region`` (or the grid) is used.
    mode : {"luminance", "rgb"}
        ``luminance`` (default): equalize BT.601 luma and add ``Y' - Y`` to every band (hue kept).
        ``rgb``: equalize each band on its own. Grey images have one band either way.

    Notes
    -----
    CLAHE needs spatial statistics, so it is not fitted from a :class:`~vipsnorm.methods.base.Sample`
    (:meth:`fit` raises): fit it on the image itself with :meth:`fit_level` (a lazy pyvips image, one
    streaming pass in bounded memory) or :meth:`fit_array` (numpy, same result bit for bit).

    An image whose every pixel has one value is left unchanged (identity LUTs, with a warning); a flat
    *region* inside a textured image is treated as OpenCV does (the clipped excess spread evenly, close
    to the identity). Images smaller than the grid are handled as OpenCV does (padding by reflection,
    regions of a single pixel).
    """

    name = "clahe"
    params_type = ClaheParams
    #: Fitted on the image's own spatial statistics: see :meth:`fit_level`.
    spatial = True

    def __init__(
        self,
        clip_limit: float = 2.0,
        grid: Sequence[int] | None = None,
        region: int | Sequence[int] | None = None,
        region_um: float | None = None,
        mode: str = "luminance",
    ):
        if mode not in ("luminance", "rgb"):
            raise ValueError(f"clahe mode must be 'luminance' or 'rgb', not {mode!r}")
        if not (isinstance(clip_limit, (int, float)) and math.isfinite(clip_limit)) or clip_limit < 0:
            raise ValueError(f"clahe clip_limit must be a finite number >= 0 (0: no clipping), not {clip_limit!r}")
        if grid is not None:
            grid = tuple(int(g) for g in grid)
            if len(grid) != 2 or min(grid) < 1:
                raise ValueError(f"clahe grid must be two positive integers (cols, rows), not {grid!r}")
        if region is not None:
            region = (int(region), int(region)) if np.ndim(region) == 0 else tuple(int(r) for r in region)
            if len(region) != 2 or min(region) < 1:
                raise ValueError(f"clahe region must be a positive number of pixels, not {region!r}")
        if region_um is not None and not region_um > 0:
            raise ValueError(f"clahe region_um must be positive, not {region_um!r}")
        self.clip_limit = float(clip_limit)
        self.grid = grid
        self.region = region
        self.region_um = None if region_um is None else float(region_um)
        self.mode = mode

    # -- geometry ----------------------------------------------------------------------------------

    def grid_for(self, width: int, height: int, mpp: float | Sequence[float] | None = None) -> tuple[int, int]:
        """The ``(cols, rows)`` grid used for an image of this size (and pixel size, in microns)."""
        region = self.region
        if self.region_um is not None and mpp is not None:
            mx, my = (float(mpp), float(mpp)) if np.ndim(mpp) == 0 else (float(mpp[0]), float(mpp[1]))
            if mx > 0 and my > 0:
                region = (self.region_um / mx, self.region_um / my)
        if region is None:
            if self.region_um is not None and self.region is None:
                raise ValueError(
                    "clahe region_um needs the pixel size (mpp) of the image, which is unknown: "
                    "give the region in pixels (region=...) or a grid instead"
                )
            if self.grid is None:
                if max(width, height) > LARGE:
                    return max(1, round(width / DEFAULT_REGION)), max(1, round(height / DEFAULT_REGION))
                return DEFAULT_GRID
            return self.grid
        return max(1, round(width / region[0])), max(1, round(height / region[1]))

    # -- fitting -----------------------------------------------------------------------------------

    def fit(self, sample: Sample) -> ClaheParams:
        raise TypeError(
            "clahe is fitted on the image itself (it needs per-region, spatial statistics), not on a "
            "sample of pixels: use Clahe.fit_level(image, mpp=...) on the level-0 pyvips image, or "
            "Clahe.fit_array(array) on a numpy array"
        )

    def fit_level(
        self,
        image: pyvips.Image,
        *,
        mpp: float | Sequence[float] | None = None,
        size: tuple[int, int] | None = None,
        copies: Sequence[pyvips.Image] = (),
        flat: str = "warn",
    ) -> ClaheParams:
        """Fit on a (lazy) uchar 1- or 3-band pyvips image, in bounded memory.

        The per-region histograms are counted by libvips ``hist_find`` on a ushort image keyed
        ``region * 256 + value`` (up to 256 regions per pass; the passes cover disjoint bands of the
        image, so the image is read once in total).

        Parameters
        ----------
        mpp : float or (float, float), optional
            Level-0 microns per pixel (for ``region_um``).
        size : (int, int), optional
            Level-0 ``(width, height)`` when ``image`` is a downsampled pyramid level of it. The region
            geometry is then level 0's, each region's histogram is counted on the level pixels that fall
            in it and scaled to the region's level-0 area (see :meth:`fit_downsample` for when that is
            faithful). Default: ``image`` is level 0, and the fit is exact.
        copies : sequence of pyvips.Image
            Other, independently opened instances of the same pixels (another loader of the same file
            and level, e.g. :meth:`~vipsnorm.io.slide.Slide.independent_level_image`). Bands of regions
            are then counted concurrently, one instance per thread: libvips decodes the tiles of one
            loaded TIFF one at a time, so a single pass keeps about 1.2 of 2 cores busy, and two
            instances nearly two (a generated 20,000 px slide's 2x level: 0.65 -> 0.43 s to decode).
            The counts are the same.
        flat : {"warn", "error"}
            An image whose every pixel has one value: identity LUTs with a warning, or
            :class:`~vipsnorm.errors.FlatImageError` (the command line's choice, as for the other methods).
        """
        if flat not in ("warn", "error"):
            raise ValueError(f"flat must be 'warn' or 'error', not {flat!r}")
        _check_image(image)
        for copy in copies:
            if (copy.width, copy.height, copy.bands, copy.format) != (image.width, image.height, image.bands, image.format):
                raise ValueError("copies must have the image's size, bands and format")
        width, height = (image.width, image.height) if size is None else (int(size[0]), int(size[1]))
        grid = self.grid_for(width, height, mpp)
        mode = self._mode(image.bands)
        tw, th, pad_x, pad_y = grid_geometry(width, height, grid)
        planes = [luma_image(im) if mode == "luminance" else im for im in (image, *copies)]
        if (image.width, image.height) == (width, height):
            hist = _region_histograms_image([_pad_image(plane, pad_x, pad_y) for plane in planes], grid, (tw, th))
        else:
            hist = _region_histograms_reduced(planes, (width, height), grid, (tw, th))
        return self._encode(self._luts(hist, tw * th, flat), width, height, grid, (tw, th), mode)

    def fit_downsample(self, width: int, height: int, mpp: float | Sequence[float] | None = None) -> float:
        """The largest pyramid downsample that :meth:`fit_level` can fit a ``width`` x ``height`` level 0
        on faithfully: 2 when every region is at least ``2 * MIN_FIT_REGION`` pixels a side, else 1.

        Measured on a generated 20,000-pixel H&E slide (regions of 1000 px): LUTs fitted on the 2x level
        differ from the exact level-0 fit by 1.1 grey levels on average over the pixels (worst 5), and on
        the 4x level by 1.4 (worst 8); the 2x level costs a quarter of the level-0 pass.
        """
        tw, th, _, _ = grid_geometry(width, height, self.grid_for(width, height, mpp))
        return 2.0 if min(tw, th) >= 2 * MIN_FIT_REGION else 1.0

    def fit_array(self, array: np.ndarray, *, mpp: float | Sequence[float] | None = None) -> ClaheParams:
        """The in-memory twin of :meth:`fit_level` for an ``(h, w)`` / ``(h, w, 1)`` / ``(h, w, 3)`` uint8
        array: numpy only, the same histograms (so the same params)."""
        a = _check_array(array)
        height, width, _ = a.shape
        grid, tile, mode, luts = self._fit_luts_array(a, mpp)
        return self._encode(luts, width, height, grid, tile, mode)

    def fit_apply_array(self, array: np.ndarray, *, mpp: float | Sequence[float] | None = None) -> np.ndarray:
        """:meth:`fit_array` then :meth:`apply_array` on the same array, bit for bit, without encoding
        and decoding the params' LUTs and with one luma in luminance mode (training patches)."""
        squeeze = np.asarray(array).ndim == 2
        a = _check_array(array)
        y = luma_array(a) if self._mode(a.shape[-1]) == "luminance" else None
        grid, tile, mode, luts = self._fit_luts_array(a, mpp, y)
        out = _map_array(a, luts, grid, tile, mode, y)
        return out[..., 0] if squeeze else out

    def _fit_luts_array(self, a: np.ndarray, mpp, y: np.ndarray | None = None):
        """``(grid, tile, mode, luts)`` of an ``(h, w, bands)`` uint8 array (``y``: its luma, if known)."""
        height, width, bands = a.shape
        grid = self.grid_for(width, height, mpp)
        mode = self._mode(bands)
        tw, th, pad_x, pad_y = grid_geometry(width, height, grid)
        if mode == "luminance":
            planes = (luma_array(a) if y is None else y)[..., np.newaxis]
        else:
            planes = a
        hist = _region_histograms_array(planes, grid, (tw, th), (pad_x, pad_y))
        return grid, (tw, th), mode, self._luts(hist, tw * th)

    def _mode(self, bands: int) -> str:
        return "grey" if bands == 1 else self.mode

    def _luts(self, hist: np.ndarray, area: int, flat: str = "warn") -> np.ndarray:
        if all(np.count_nonzero(h.sum(axis=(0, 1))) <= 1 for h in hist):
            if flat == "error":
                values = sorted({int(np.flatnonzero(h.sum(axis=(0, 1)))[0]) for h in hist if h.any()})
                raise FlatImageError(
                    None, f"image is flat (every pixel is {'/'.join(map(str, values))}): nothing to normalize"
                )
            warnings.warn("clahe: every pixel has the same value; left unchanged", RuntimeWarning, stacklevel=4)
            return np.broadcast_to(np.arange(_BINS, dtype=np.uint8), hist.shape)
        return clahe_luts(hist, self.clip_limit, area)

    def _encode(self, luts, width, height, grid, tile, mode) -> ClaheParams:
        return ClaheParams(
            width=int(width),
            height=int(height),
            grid=(int(grid[0]), int(grid[1])),
            tile=(int(tile[0]), int(tile[1])),
            clip_limit=self.clip_limit,
            mode=mode,
            luts=ClaheParams.encode_luts(luts),
        )

    # -- applying ----------------------------------------------------------------------------------

    def apply(self, image: pyvips.Image, params: ClaheParams, *, lean: bool = False) -> pyvips.Image:
        """Lazy CLAHE mapping: per-cell ``maplut`` of the four surrounding region LUTs, weighted bilinearly.

        Each interpolation cell (the rectangle between four region centres) is keyed into a ushort
        image (``cell * 256 + value``) and mapped through a 4-band float LUT holding the four regions'
        values; these are multiplied by four times their bilinear weights (:func:`_weight_image`) and
        averaged by ``bandmean``, which is their weighted sum. Rounding is folded into the LUT (``+ 0.5``
        then truncation). The cell geometry is OpenCV's computed exactly (:func:`_cells`), which moves an
        interpolated value by float error only.

        In luminance mode the LUT holds ``Y' - Y + 256.5``, so the sum truncated to ushort is
        ``round(Y' - Y) + 256`` (always positive), and a 512-entry LUT of three short bands turns it into
        the change added to every band. A ``maplut`` is the cheap way to copy one band into three: a
        ``bandjoin``, or a 1 -> 3 ``linear`` or ``recomb``, costs about 4 CPU ns a pixel, and the 4 -> 3
        ``recomb`` of the weighted values used before 4.3 ns, where ``bandmean``, the cast and this
        ``maplut`` take 2.2 ns together. In ``rgb`` mode (and for a grey fit applied to three bands) the
        bands are unfolded along x (``bandunfold``: one band three times as wide) so that one keyed
        ``maplut`` maps all three, and folded back after the cast: no per-band extraction or ``bandjoin``.

        Measured on an 8192 px square in memory (CPU time, input read 1.8 ns a pixel): luminance mode
        11.4 ns a pixel (16.7 with the recomb, zoomed weights and a float add), ``rgb`` 12.9 (27.8 with a
        recomb per band and a bandjoin).

        ``lean``: weight by the product of a zoomed row and column of weights instead of a replicated
        block (1.4 CPU ns a pixel more, the same values), so that the image holds no block (up to
        ``_BLOCK_BYTES``, 64 MiB; 16 MiB for 1024 px regions in luminance mode) for as long as it lives: for
        images kept in numbers, such as a patch reader's, one per slide and level.
        """
        _check_image(image)
        _check_size(image.width, image.height, params)
        luts = params.lut_array().astype(np.float32)
        mode, bands = _apply_mode(params, image.bands)
        if mode == "luminance":
            change = luts[:1] - np.arange(_BINS, dtype=np.float32) + np.float32(_BINS + 0.5)
            shifted = _interpolate(luma_image(image), change, params, lean).cast("ushort")
            return (image + shifted.maplut(_change_lut())).cast("uchar")
        # (a grey fit maps every band alike)
        tables = (luts if mode == "rgb" else np.broadcast_to(luts[:1], (bands, *luts.shape[1:]))) + np.float32(0.5)
        if bands == 1:
            return _interpolate(image, tables, params, lean).cast("uchar")
        return _interpolate(image.bandunfold(factor=bands), tables, params, lean).cast("uchar").bandfold(factor=bands)

    def apply_array(self, array: np.ndarray, params: ClaheParams) -> np.ndarray:
        """The numpy twin of :meth:`apply` (OpenCV's float32 interpolation and round-half-even)."""
        squeeze = np.asarray(array).ndim == 2
        a = _check_array(array)
        height, width, bands = a.shape
        _check_size(width, height, params)
        mode, bands = _apply_mode(params, bands)
        out = _map_array(a, params.lut_array(), params.grid, params.tile, mode)
        return out[..., 0] if squeeze else out


# --------------------------------------------------------------------------------------------------
# helpers: checks


def _check_image(image: pyvips.Image) -> None:
    if image.format != "uchar" or image.bands not in (1, 3):
        raise ValueError(f"clahe needs a uchar image with 1 or 3 bands, not {image.format} with {image.bands} bands")


def _check_array(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise TypeError(f"clahe needs uint8 pixels, got {a.dtype}")
    if a.ndim == 2:
        a = a[..., np.newaxis]
    if a.ndim != 3 or a.shape[-1] not in (1, 3) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"clahe needs an (h, w), (h, w, 1) or (h, w, 3) array, not shape {np.shape(array)}")
    return a


def _check_size(width: int, height: int, params: ClaheParams) -> None:
    if (width, height) != (params.width, params.height):
        raise ValueError(
            f"clahe parameters were fitted on a {params.width}x{params.height} image, not {width}x{height}: "
            "CLAHE's regions are tied to the image; fit it on this image (fit_level / fit_array)"
        )


def _apply_mode(params: ClaheParams, bands: int) -> tuple[str, int]:
    if params.mode == "grey":
        return "grey", bands  # a grey fit maps every band alike (fitted and applied on one band in practice)
    if bands != 3:
        raise ValueError(f"clahe parameters fitted in {params.mode} mode on a colour image, applied to {bands} band(s)")
    return params.mode, bands


# --------------------------------------------------------------------------------------------------
# helpers: numpy


def _region_histograms_array(
    planes: np.ndarray, grid: tuple[int, int], tile: tuple[int, int], pad: tuple[int, int]
) -> np.ndarray:
    """(channels, rows, cols, 256) region counts of ``(h, w, channels)`` uint8 planes, padded at the right
    and bottom by ``pad`` (``BORDER_REFLECT_101``, as OpenCV).

    Each value is keyed ``(channel, region row, region col) * 256 + value`` (uint16, or int32 past
    65536 bins) and counted by ``np.add.at``, a few rows of regions (or of pixels) at a time.
    """
    cols, rows = grid
    tw, th = tile
    height, width, channels = planes.shape
    if _native.available():  # one pass in C, through the padded grid's source rows and columns
        ys = _reflect101(np.arange(rows * th), height)
        xs = _reflect101(np.arange(cols * tw), width)
        native = _native.region_counts(planes, grid, tile, ys, xs)
        if native is not None:
            return native
    if pad != (0, 0):
        ys = _reflect101(np.arange(rows * th), height)
        xs = _reflect101(np.arange(cols * tw), width)
        planes = planes[ys[:, np.newaxis], xs]
    out = np.zeros(channels * rows * cols * _BINS, np.int64)
    row_values = cols * tw * channels
    per = max(1, min(rows, 4 * STEP // (th * row_values)))  # region rows at a time: keys of 120 KiB
    sub = max(1, 4 * STEP // row_values)  # pixel rows at a time, within a larger region row
    for r0 in range(0, rows, per):
        n = min(per, rows - r0)
        keys = _region_keys(r0, n, grid, tw, channels)
        block = planes[r0 * th : (r0 + n) * th].reshape(n, th, cols * tw, channels)
        for y0 in range(0, th, sub):
            np.add.at(out, np.add(block[:, y0 : y0 + sub], keys, dtype=keys.dtype), 1)
    return out.reshape(channels, rows, cols, _BINS)


@functools.lru_cache(maxsize=32)
def _region_keys(r0: int, n: int, grid: tuple[int, int], tw: int, channels: int) -> np.ndarray:
    """The keys of :func:`_region_histograms_array` for the region rows ``r0 .. r0 + n``, shape
    ``(n, 1, cols * tw, channels)``: ``((channel * rows + region row) * cols + region col) * 256``."""
    cols, rows = grid
    region = (r0 + np.arange(n))[:, np.newaxis] * cols + np.arange(cols * tw)[np.newaxis, :] // tw
    keys = (region[:, :, np.newaxis] + np.arange(channels) * (rows * cols)) * _BINS
    keys = keys.astype(np.uint16 if channels * rows * cols * _BINS <= 1 << 16 else np.int32)[:, np.newaxis]
    keys.flags.writeable = False
    return keys


def _map_array(
    a: np.ndarray, luts: np.ndarray, grid: tuple[int, int], tile: tuple[int, int], mode: str, y=None
) -> np.ndarray:
    """OpenCV's bilinear interpolation of the region LUTs ``luts[channel, row, col, 256]`` at every pixel
    of an ``(h, w, bands)`` uint8 array, as :meth:`Clahe.apply_array` (``y``: the luma, if known).

    Each band (or the luma) is one ``(h, w * k)`` plane of values; each of the four regions around a
    pixel is one ``np.take`` from the flat float32 LUTs at ``value + base``, the base indexing the region
    (and the band's LUTs in ``rgb`` mode). The arithmetic is OpenCV's, in float32, in its order.
    """
    height, width, bands = a.shape
    if mode == "luminance":
        plane = luma_array(a) if y is None else y
        k = 1
    else:
        plane = a.reshape(height, width * bands)
        k = bands
    table = luts.astype(np.float32).reshape(-1)
    # (tuples of ints: params made by hand may hold lists, which do not hash)
    geometry = _interp_geometry(height, width, tuple(map(int, tile)), tuple(map(int, grid)), k, mode == "rgb")
    native = _native.clahe_map(plane, table, geometry.native()) if _native.available() else None
    if native is not None:  # the same arithmetic in one pass (3-3.6x less CPU on a 256 px patch)
        if mode != "luminance":
            return native.reshape(height, width, k)
        changed = _native.add_change(a, native, plane)
        return changed if changed is not None else add_change(a, native, plane)
    xa1, xa, ya1, ya = geometry.weights
    out = np.empty((height, width * k), np.uint8)
    step = max(1, STEP // (width * k))
    top, bottom, other = (np.empty((min(step, height), width * k), np.float32) for _ in range(3))
    for y0 in range(0, height, step):
        sl = slice(y0, min(y0 + step, height))
        v = plane[sl]
        t, b, o = top[: sl.stop - y0], bottom[: sl.stop - y0], other[: sl.stop - y0]
        i11, i12, i21, i22 = (np.add(v, base, dtype=base.dtype) for base in geometry.bases(sl))
        np.take(table, i11, out=t, mode="wrap")
        np.take(table, i12, out=o, mode="wrap")
        t *= xa1
        o *= xa
        t += o  # the top row of regions
        np.take(table, i21, out=b, mode="wrap")
        np.take(table, i22, out=o, mode="wrap")
        b *= xa1
        o *= xa
        b += o  # the bottom row
        t *= ya1[sl]
        b *= ya[sl]
        t += b
        # OpenCV clips to 0..255 here; a convex combination of LUT values needs no clipping after rint
        out[sl] = np.rint(t, out=t)
    if mode == "luminance":
        return add_change(a, out, plane)
    return out.reshape(height, width, k)


class _Geometry:
    """Where each pixel of an image size and grid finds its four region LUTs, and its weights.

    The flat LUT index of region ``(row, col)`` of band ``c`` is ``((c * rows + row) * cols + col) * 256``
    in ``rgb`` mode (every band indexes the one LUT set otherwise), stored per pixel column and per pixel
    row and summed (:meth:`bases`); images up to :attr:`KEEP` values keep the sums.
    """

    KEEP = 1 << 18

    def __init__(self, height: int, width: int, tile, grid, k: int, rgb: bool):
        cols, rows = grid
        _, tx1, tx2, xa = _axis_cells(width, tile[0], cols)
        _, ty1, ty2, ya = _axis_cells(height, tile[1], rows)
        dtype = np.uint16 if k * rows * cols * _BINS <= 1 << 16 else np.int32
        band = np.arange(k) * (rows * cols * _BINS if rgb else 0)
        self.columns = [(tx[:, np.newaxis] * _BINS + band).reshape(-1).astype(dtype) for tx in (tx1, tx2)]
        self.rows = [(ty * (cols * _BINS)).astype(dtype)[:, np.newaxis] for ty in (ty1, ty2)]
        xa = np.repeat(xa, k)  # one weight per value of a row of k bands
        one = np.float32(1.0)
        #: ``1 - a``, ``a`` across and ``1 - b``, ``b`` down (float32, as OpenCV)
        self.weights = (one - xa, xa, (one - ya)[:, np.newaxis], ya[:, np.newaxis])
        self.kept = self._bases(slice(0, height)) if height * width * k <= self.KEEP else None
        self._native = None
        for array in self.columns + self.rows + list(self.weights) + (self.kept or []):
            array.flags.writeable = False

    def native(self) -> _native.ClaheGeometry:
        """This geometry for :func:`vipsnorm._native.clahe_map` (made once)."""
        if self._native is None:
            self._native = _native.ClaheGeometry(self.rows, self.columns, self.weights)
        return self._native

    def _bases(self, rows: slice) -> list[np.ndarray]:
        return [r[rows] + c for r in self.rows for c in self.columns]  # top left, top right, bottom ...

    def bases(self, rows: slice) -> list[np.ndarray]:
        """The flat LUT index, less the value, of the four regions around each pixel of ``rows``."""
        return [b[rows] for b in self.kept] if self.kept is not None else self._bases(rows)


@functools.lru_cache(maxsize=4)
def _interp_geometry(height: int, width: int, tile, grid, k: int, rgb: bool) -> _Geometry:
    return _Geometry(height, width, tile, grid, k, rgb)


# --------------------------------------------------------------------------------------------------
# helpers: pyvips


def _pad_image(image: pyvips.Image, pad_x: int, pad_y: int) -> pyvips.Image:
    """Lazy ``BORDER_REFLECT_101`` padding at the right and bottom (libvips' ``mirror`` repeats the edge)."""
    if pad_x:
        image = _join_tree([image] + _reflect_runs(image, image.width, pad_x, "x"), "horizontal")
    if pad_y:
        image = _join_tree([image] + _reflect_runs(image, image.height, pad_y, "y"), "vertical")
    return image


def _reflect_runs(image: pyvips.Image, size: int, pad: int, axis: str) -> list[pyvips.Image]:
    """The padding strip as crops (flipped when the source runs backwards) of runs of the reflection."""
    index = _reflect101(np.arange(size, size + pad), size)
    runs: list[pyvips.Image] = []
    start = 0
    while start < pad:
        end = start + 1
        step = index[end] - index[start] if end < pad else 0
        if step in (-1, 1):
            while end < pad and index[end] - index[end - 1] == step:
                end += 1
        lo = int(min(index[start], index[end - 1]))
        n = end - start
        if axis == "x":
            part = image.crop(lo, 0, n, image.height)
            part = part.flip("horizontal") if step == -1 and n > 1 else part
        else:
            part = image.crop(0, lo, image.width, n)
            part = part.flip("vertical") if step == -1 and n > 1 else part
        runs.append(part)
        start = end
    return runs


def _join_tree(images: list[pyvips.Image], direction: str) -> pyvips.Image:
    """Join images in a balanced tree (a shallow pipeline even for hundreds of parts)."""
    while len(images) > 1:
        images = [a.join(b, direction) for a, b in zip(images[::2], images[1::2])] + (
            [images[-1]] if len(images) % 2 else []
        )
    return images[0]


def _passes(rows: int, cols: int, instances: int) -> list[tuple[int, int, int, int]]:
    """``(r0, nr, c0, nc)`` blocks of regions, one ``hist_find`` pass each: at most 256 regions a pass,
    and at least one pass per instance (of similar heights) when there are rows enough."""
    block_cols = min(cols, _REGIONS_PER_PASS)
    block_rows = max(1, _REGIONS_PER_PASS // block_cols)
    passes = max(-(-rows // block_rows), min(instances, rows))
    block_rows = -(-rows // passes)
    return [
        (r0, min(block_rows, rows - r0), c0, min(block_cols, cols - c0))
        for r0 in range(0, rows, block_rows)
        for c0 in range(0, cols, block_cols)
    ]


def _run_passes(instances: list, blocks: list, count) -> None:
    """``count(instance, block)`` for every block, the blocks dealt round-robin to the instances, each
    instance's share run in order on a thread of its own (one instance: in this thread)."""
    shares = [blocks[i :: len(instances)] for i in range(len(instances))]
    if len(instances) == 1:
        for block in blocks:
            count(instances[0], block)
        return
    with ThreadPoolExecutor(len(instances)) as pool:
        futures = [pool.submit(lambda i, share: [count(i, b) for b in share], i, share) for i, share in zip(instances, shares)]
        for future in futures:
            future.result()


def _region_histograms_image(padded: list[pyvips.Image], grid: tuple[int, int], tile: tuple[int, int]) -> np.ndarray:
    """(bands, rows, cols, 256) counts of a padded lazy uchar image (given as one or more independent
    instances, see :meth:`Clahe.fit_level`), with keyed ushort ``hist_find``."""
    cols, rows = grid
    tw, th = tile
    out = np.empty((padded[0].bands, rows, cols, _BINS), np.int64)

    def count(image: pyvips.Image, block: tuple[int, int, int, int]) -> None:
        r0, nr, c0, nc = block
        keys = (np.arange(nr * nc, dtype=np.uint16) * _BINS).reshape(nr, nc)
        key_image = pyvips.Image.new_from_array(keys).cast("ushort").zoom(tw, th)
        crop = image.crop(c0 * tw, r0 * th, nc * tw, nr * th)
        out[:, r0 : r0 + nr, c0 : c0 + nc] = _keyed_counts(crop, key_image, nr, nc)  # disjoint blocks

    _run_passes(padded, _passes(rows, cols, len(padded)), count)
    return out


def _keyed_counts(block: pyvips.Image, keys: pyvips.Image, nr: int, nc: int) -> np.ndarray:
    """(bands, nr, nc, 256) counts of a uchar ``block`` whose pixels ``keys`` (ushort, ``region * 256``)
    assign to ``nr x nc`` regions: one ``hist_find`` of ``block | keys``."""
    counts = (block | keys).hist_find().numpy()  # uchar | ushort is ushort
    counts = np.asarray(counts).reshape(-1, block.bands)[: nr * nc * _BINS]  # ushort hist: max + 1 bins
    if counts.shape[0] < nr * nc * _BINS:
        counts = np.pad(counts, ((0, nr * nc * _BINS - counts.shape[0]), (0, 0)))
    return counts.T.reshape(block.bands, nr, nc, _BINS)


def _region_histograms_reduced(
    planes: list[pyvips.Image], size: tuple[int, int], grid: tuple[int, int], tile: tuple[int, int]
) -> np.ndarray:
    """(bands, rows, cols, 256) region counts of level 0 estimated from ``planes`` (one or more
    independent instances of a downsampled level, see :meth:`Clahe.fit_level`).

    Each level pixel belongs to the region of its centre mapped to level 0; a region's counts are scaled
    so that they sum to its level-0 area ``tw * th`` (the padded part of the border regions included, as
    the reflection padding repeats the region's own pixels).
    """
    cols, rows = grid
    tw, th = tile
    width, height = planes[0].width, planes[0].height
    col_of = np.minimum(((np.arange(width) + 0.5) * (size[0] / width) // tw).astype(np.int64), cols - 1)
    row_of = np.minimum(((np.arange(height) + 0.5) * (size[1] / height) // th).astype(np.int64), rows - 1)
    out = np.zeros((planes[0].bands, rows, cols, _BINS), np.float64)

    def count(plane: pyvips.Image, block: tuple[int, int, int, int]) -> None:
        r0, nr, c0, nc = block
        ys = np.nonzero((row_of >= r0) & (row_of < r0 + nr))[0]
        xs = np.nonzero((col_of >= c0) & (col_of < c0 + nc))[0]
        if ys.size == 0 or xs.size == 0:
            return
        x0, x1, y0, y1 = int(xs[0]), int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1
        col_keys = ((col_of[x0:x1] - c0) * _BINS).astype(np.uint16)[np.newaxis]
        row_keys = ((row_of[y0:y1] - r0) * nc * _BINS).astype(np.uint16)[:, np.newaxis]
        keys = (
            pyvips.Image.new_from_array(col_keys).cast("ushort").zoom(1, y1 - y0)
            + pyvips.Image.new_from_array(row_keys).cast("ushort").zoom(x1 - x0, 1)
        ).cast("ushort")
        out[:, r0 : r0 + nr, c0 : c0 + nc] = _keyed_counts(plane.crop(x0, y0, x1 - x0, y1 - y0), keys, nr, nc)

    _run_passes(planes, _passes(rows, cols, len(planes)), count)
    total = out.sum(axis=-1, keepdims=True)
    return np.rint(out * (tw * th / np.maximum(total, 1))).astype(np.int64)


def _float_image(array: np.ndarray) -> pyvips.Image:
    """A small float32 numpy array ``(h, w)`` or ``(h, w, bands)`` as a pyvips image."""
    return pyvips.Image.new_from_array(np.ascontiguousarray(array, dtype=np.float32))


def _cells(size: int, tile: int) -> np.ndarray:
    """Interpolation cell (0 .. regions) of each pixel along one axis, in exact integer arithmetic.

    Pixel ``x`` lies between the centres of regions ``cell - 1`` and ``cell``, with
    ``cell = floor(x / tile + 0.5) = (2 x + tile) // (2 tile)`` and the weight of the second region
    ``a = (2 x + tile) / (2 tile) - cell``: OpenCV's ``t1 + 1`` and ``a`` of ``x / tile - 0.5``, which it
    computes in float32 (:func:`_axis_cells`; the two differ by float error: in ``a``, and in the cell of
    a pixel whose ``x / tile - 0.5`` is an integer, where OpenCV may have ``a`` one ulp below 1 in the
    cell before, the same value). The regions are ``max(cell - 1, 0)`` and ``min(cell, regions - 1)``.
    Every cell but the first and last starts ``tile`` pixels after the previous one, at the same phase:
    pixel ``x`` has the weight of column ``(x + tile // 2) % tile`` of :func:`_cell_weights`.
    """
    return (2 * np.arange(size) + tile) // (2 * tile)


def _cell_weights(tile: int) -> np.ndarray:
    """(tile,) float32 weights ``a`` of the second region across one cell: ``(2 j + tile % 2) / (2 tile)``."""
    return ((2 * np.arange(tile) + tile % 2) / (2 * tile)).astype(np.float32)


def _weight_image(params: ClaheParams, k: int, lean: bool = False) -> pyvips.Image:
    """Lazy 4-band float ``4 * [(1-a)(1-b), a(1-b), (1-a)b, ab]`` (times 4 for ``bandmean``, exactly).

    The weights repeat from cell to cell, so one cell's block (a region's size) is replicated over the
    image and cropped at the phase of :func:`_cells`: libvips reads it in place. Multiplying by it costs
    1.2 CPU ns a pixel, against 2.6 ns for the product of a row and a column of weights zoomed to the
    image's size (measured on an 8192 px square), which is what replaces a block of more than
    ``_BLOCK_BYTES``; both hold the float32 products of the same float32 factors, so the two are equal
    bit for bit. ``k``: bands unfolded along x, each column's weights repeated ``k`` times.
    """
    tw, th = params.tile
    width, height = params.width, params.height
    one, four = np.float32(1.0), np.float32(4.0)
    ax, ay = _cell_weights(tw), _cell_weights(th)
    wx = np.repeat(np.stack([one - ax, ax, one - ax, ax], axis=-1) * four, k, axis=0)  # (k tw, 4)
    wy = np.stack([one - ay, one - ay, ay, ay], axis=-1)  # (th, 4)
    if not lean and 16 * k * tw * th <= _BLOCK_BYTES:
        block = _float_image(wy[:, np.newaxis] * wx[np.newaxis])
        across = -(-(width + tw // 2) // tw)
        down = -(-(height + th // 2) // th)
        return block.replicate(across, down).crop(k * (tw // 2), th // 2, k * width, height)
    columns = k * ((np.arange(width) + tw // 2) % tw)[:, np.newaxis] + np.arange(k)  # (W, k)
    row = _float_image(wx[columns.reshape(-1)][np.newaxis])  # (1, k W, 4)
    column = _float_image(wy[(np.arange(height) + th // 2) % th][:, np.newaxis])  # (H, 1, 4)
    return row.zoom(1, height) * column.zoom(k * width, 1)


def _interpolate(plane: pyvips.Image, tables: np.ndarray, params: ClaheParams, lean: bool = False) -> pyvips.Image:
    """Lazy 1-band float: at each pixel, OpenCV's bilinear interpolation of ``tables[band, region, v]``.

    ``plane`` is uchar, one band of ``k * width`` pixels across (``k`` bands unfolded along x, value ``j``
    of a row being band ``j % k`` of pixel ``j // k``), ``tables`` is ``(k, rows, cols, 256)`` float32.
    The image is cut into strips of one cell row; each strip into chunks of at most ``256 // k`` cells,
    keyed ``(cell in the chunk * k + band) * 256 + v`` (ushort) and mapped by one ``maplut`` to the four
    regions' values, which :func:`_weight_image` weights and ``bandmean`` sums.
    """
    k = tables.shape[0]
    cols, rows = params.grid
    tw, th = params.tile
    per_lut = _CELLS_PER_LUT // k
    cx = _cells(params.width, tw)
    cy = _cells(params.height, th)
    x_starts = np.searchsorted(cx, np.arange(cx[-1] + 2))  # cell c spans x_starts[c] .. x_starts[c + 1]
    y_starts = np.searchsorted(cy, np.arange(cy[-1] + 2))
    x_cells = np.arange(cx[-1] + 1)  # the cells present (first and last: maybe partial)
    q1, q2 = np.maximum(x_cells - 1, 0), np.minimum(x_cells, cols - 1)
    key_row = np.repeat((cx % per_lut) * k, k) + np.tile(np.arange(k), params.width)
    key_image = pyvips.Image.new_from_array((key_row * _BINS).astype(np.uint16)[np.newaxis]).cast("ushort")
    strips = []
    for c in range(cy[-1] + 1):
        y0, y1 = int(y_starts[c]), int(y_starts[c + 1])
        top, bottom = tables[:, max(c - 1, 0)], tables[:, min(c, rows - 1)]  # (k, cols, 256)
        chunks = []
        for i0 in range(0, x_cells.size, per_lut):
            i1 = min(i0 + per_lut, x_cells.size)
            x0, x1 = k * int(x_starts[x_cells[i0]]), k * int(x_starts[x_cells[i1 - 1] + 1])
            lut = np.stack(
                [top[:, q1[i0:i1]], top[:, q2[i0:i1]], bottom[:, q1[i0:i1]], bottom[:, q2[i0:i1]]], axis=-1
            )  # (k, cells, 256, 4)
            keys = key_image.crop(x0, 0, x1 - x0, 1).zoom(1, y1 - y0)
            index = plane.crop(x0, y0, x1 - x0, y1 - y0) | keys  # uchar | ushort is ushort
            chunks.append(index.maplut(_float_image(lut.transpose(1, 0, 2, 3).reshape(1, -1, 4))))
        strips.append(_join_tree(chunks, "horizontal"))
    return (_join_tree(strips, "vertical") * _weight_image(params, k, lean)).bandmean()


def _change_lut() -> pyvips.Image:
    """(1, 512) 3-band short LUT: entry ``i`` is the luma change ``i - 256`` in every band."""
    change = np.arange(2 * _BINS, dtype=np.int16) - _BINS
    return pyvips.Image.new_from_array(np.repeat(change[:, np.newaxis], 3, axis=1)[np.newaxis]).cast("short")
