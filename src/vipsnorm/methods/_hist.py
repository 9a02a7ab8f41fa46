"""Histogram arithmetic shared by the LUT methods: luma, percentiles, CDFs, LUT application.

Notes
-----
Luma is ITU-R BT.601 Y' on the gamma-encoded uchar values, computed in the same fixed point as
OpenCV's ``COLOR_RGB2YCrCb``: ``Y = (4899 R + 9617 G + 1868 B + 8192) >> 14``. The pyvips path and the
numpy path compute it bit-exactly alike.
"""

from __future__ import annotations

import functools

import numpy as np
import pyvips

from .. import _native

__all__ = [
    "LUMA_WEIGHTS",
    "luma_array",
    "luma_image",
    "histograms",
    "percentile",
    "apply_luts_image",
    "apply_luts_array",
    "extend_to_white",
]

LUMA_WEIGHTS = (4899, 9617, 1868)  # / 2**14
_SHIFT = 14

#: Values per step of the numpy paths over whole images: a step's 8-byte temporaries (np.take's intp
#: copy of its indices, float64) take 120 KiB, below glibc's 128 KiB mmap threshold. Larger ones are
#: mapped, page-faulted and unmapped on every call, which costs more than the arithmetic on a 256 px
#: patch (1.7 us a 4 KiB page, measured).
STEP = 15_360


def brightest(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel max over the channels of an ``(..., 3)`` array, in its dtype (channel by channel:
    faster than ``max(axis=-1)`` over 3-value rows)."""
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def darkest(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel min over the channels of an ``(..., 3)`` array, in its dtype (as :func:`brightest`)."""
    return np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def luma_array(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an ``(..., 3)`` uint8 array, as uint8 (``(..., 1)`` arrays pass through)."""
    if rgb.shape[-1] == 1:
        return rgb[..., 0]
    native = _native.luma(rgb)  # the same formula in C (0.11 -> 0.05 ms on a 256 px patch)
    if native is not None:
        return native
    flat = rgb.reshape(-1, rgb.shape[-1])
    out = np.empty(flat.shape[0], np.uint8)
    for start in range(0, flat.shape[0], 2 * STEP):  # int32 temporaries of 120 KiB
        out[start : start + 2 * STEP] = _luma(flat[start : start + 2 * STEP])
    return out.reshape(rgb.shape[:-1])


def _luma(rgb: np.ndarray) -> np.ndarray:
    # the fixed-point formula, in place in int32
    y = rgb[..., 0].astype(np.int32)
    y *= LUMA_WEIGHTS[0]
    for band in (1, 2):
        term = rgb[..., band].astype(np.int32)
        term *= LUMA_WEIGHTS[band]
        y += term
    y += 1 << (_SHIFT - 1)
    y >>= _SHIFT
    return y.astype(np.uint8)


def counts(values: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Histogram (256 int64 counts) of a uint8 array of any shape, of the values where ``keep`` (a
    uint16 array of its shape, 256 for a kept value and 0 for the others) is 256 if given.

    ``np.add.at``: as fast as ``np.bincount``, without its intp copy of the values."""
    if keep is None:
        out = np.zeros(256, np.int64)
        np.add.at(out, values, 1)
        return out
    out = np.zeros(512, np.int64)  # dropped values land in bins 0..255
    np.add.at(out, np.add(values, keep, dtype=np.uint16), 1)
    return out[256:]


def take(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``table[index]`` for a 1-D ``table`` and an unsigned integer ``index`` whose every value is in
    range: ``np.take`` (faster than fancy indexing) in steps of :data:`STEP` values, so that it converts
    only a step's indices to intp at a time."""
    out = np.empty(index.shape, table.dtype)
    flat, into = index.reshape(-1), out.reshape(-1)
    for start in range(0, flat.shape[0], STEP):
        np.take(table, flat[start : start + STEP], out=into[start : start + STEP], mode="wrap")
    return out


#: ``256 * band`` for each value of a step of interleaved RGB values (STEP is a multiple of 3).
_BAND_OFFSETS = np.tile(np.array([0, 256, 512], np.uint16), STEP // 3)
_BAND_OFFSETS.flags.writeable = False


def band_keys(rgb: np.ndarray) -> list[np.ndarray]:
    """Every value of a uint8 ``(..., 3)`` array keyed by its band, ``value + 256 * band`` (uint16), in
    C order, as the flat steps of :data:`STEP` values that :func:`keyed_counts` and :func:`take_keyed`
    take: the three bands' values are counted, or mapped through their three LUTs, in one contiguous
    pass each (faster than three strided passes, one per band)."""
    flat = np.ascontiguousarray(rgb).reshape(-1)
    return [
        np.add(flat[start : start + STEP], _BAND_OFFSETS[: min(STEP, flat.size - start)], dtype=np.uint16)
        for start in range(0, flat.size, STEP)
    ]


def keyed_counts(keys: list[np.ndarray], bins: int = 768) -> np.ndarray:
    """``(bins // 256, 256)`` int64 counts of the keys of :func:`band_keys` (one row per band)."""
    out = np.zeros(bins, np.int64)
    for part in keys:
        np.add.at(out, part, 1)
    return out.reshape(-1, 256)


def take_keyed(luts: np.ndarray, keys: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """``luts[band][value]`` for the keys of :func:`band_keys` (``luts``: ``(3, 256)`` uint8), as a uint8
    array of ``shape``: one ``np.take`` from the flat 768-entry table per step."""
    table = np.ascontiguousarray(luts, dtype=np.uint8).reshape(-1)
    out = np.empty(shape, np.uint8)
    into = out.reshape(-1)
    for start, part in zip(range(0, into.size, STEP), keys):
        np.take(table, part, out=into[start : start + part.size], mode="wrap")
    return out


def histograms(pixels: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """(4, 256) R, G, B, Y counts of a uint8 ``(h, w)`` / ``(h, w, 1)`` / ``(h, w, 3)`` array, counted
    row by row; only the pixels where ``keep`` is True, if given. Grey fills all four rows."""
    bands = 1 if pixels.ndim == 2 else pixels.shape[-1]
    if bands not in (1, 3):
        raise ValueError(f"expected 1 or 3 bands, got {bands}")
    native = _native.histograms(pixels, keep)  # the same counts in one pass (0.54 -> 0.1 ms a 256 px tile)
    if native is not None:
        return native.astype(np.float64)
    flat = pixels.reshape(-1, bands)
    if keep is not None:
        keep = keep.reshape(-1).astype(bool).astype(np.uint16) << 8
    rows = [counts(flat[:, b], keep) for b in range(bands)]
    rows = rows + [counts(luma_array(flat), keep)] if bands == 3 else rows * 4
    return np.array(rows, dtype=np.float64)


def luma_image(image: pyvips.Image) -> pyvips.Image:
    """Lazy BT.601 luma of a 3-band uchar image (a 1-band image is returned as is)."""
    if image.bands == 1:
        return image
    # Y + 0.5 as the mean of three float bands (3 w R / 2**14 + 1.5, 3 w G / 2**14, 3 w B / 2**14), then
    # truncated. Every product, partial sum and the sum are multiples of 2**-14 below 768 (24 significant
    # bits: exact in float32), and the mean itself, (4899 R + 9617 G + 1868 B + 8192) / 2**14, is exactly
    # representable, so the division by 3 is exact too: floor(mean) equals the integer formula (checked
    # for all 2**24 colours in the tests). A per-band linear and a band mean take less CPU than the 3x1
    # recomb they replace: 1.4 ms against 2.0 ms on a 512x512 tile, 75 ms against 96 ms at 4096x4096.
    scale = 3.0 / (1 << _SHIFT)
    weighted = image.linear([w * scale for w in LUMA_WEIGHTS], [1.5, 0.0, 0.0])
    return weighted.bandmean().cast("uchar")


def percentile(counts: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear method) of the values whose histogram is ``counts``."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("empty histogram")
    if q <= 0 or q >= 100:  # the extremes exactly, also for fractional counts (pooled samples)
        present = np.flatnonzero(counts > 0)
        return float(present[0] if q <= 0 else present[-1])
    cum = np.cumsum(counts)
    position = (total - 1) * q / 100.0 if total >= 1 else 0.0
    below = np.floor(position)
    v0 = int(np.searchsorted(cum, below, side="right"))
    v1 = int(np.searchsorted(cum, below + 1, side="right")) if below + 1 <= total - 1 else v0
    v0, v1 = min(v0, counts.size - 1), min(v1, counts.size - 1)
    return float(v0 + (position - below) * (v1 - v0))


def extend_to_white(lut: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Keep glass white and black black: outside the sampled range, interpolate to (0,0) and (255,255).

    Values the sample never saw (glass above the brightest tissue pixel, say) would otherwise all map to
    the target's brightest tissue value, tinting white glass.
    """
    present = np.nonzero(counts > 0)[0]
    if present.size == 0:
        return lut
    lo, hi = int(present[0]), int(present[-1])
    out = lut.astype(np.float64).copy()
    if hi < 255:
        out[hi:] = np.interp(np.arange(hi, 256), [hi, 255], [out[hi], 255.0])
    if lo > 0:
        out[: lo + 1] = np.interp(np.arange(0, lo + 1), [0, lo], [0.0, out[lo]])
    return out


def _lut_image(lut: np.ndarray) -> pyvips.Image:
    lut = np.asarray(lut)
    rows = lut.reshape(-1, 256)
    image = pyvips.Image.new_from_array(rows.T[np.newaxis, :, :].astype(lut.dtype))
    return image


def apply_luts_image(image: pyvips.Image, luts: np.ndarray, space: str, luma: np.ndarray | None = None) -> pyvips.Image:
    """Apply uint8 LUTs lazily.

    Parameters
    ----------
    image : pyvips.Image
        uchar, 1 or 3 bands.
    luts : ndarray, shape (k, 256), uint8
        One LUT (``k == 1``) or one per band (``k == 3``).
    space : {"joint", "rgb", "luminance"}
        ``joint``: the one LUT on every band. ``rgb``: LUT ``i`` on band ``i``. ``luminance``: the LUT maps
        luma Y to Y'; every band gets ``Y' - Y`` added (hue and chroma kept, as in YCbCr).
    luma : ndarray, optional
        ``(h, w)`` uint8: the luma of ``image`` already computed in numpy (:func:`luma_array`, equal bit
        for bit to :func:`luma_image`), used by a luminance apply instead of computing it again in
        libvips (about 1 ms less on a 512x512 image held in memory). Checked, but not needed, when the
        native kernel (:mod:`vipsnorm._native`) maps the image: it computes the luma in the same pass.

    Raises
    ------
    ValueError
        ``image`` is not uchar with 1 or 3 bands, or ``luma`` is not its luma's shape.
    """
    if image.format != "uchar" or image.bands not in (1, 3):  # else a LUT's wrong pixels, or garbage
        raise ValueError(f"expected a uchar image with 1 or 3 bands, not {image.format} with {image.bands} bands")
    luts = np.asarray(luts, dtype=np.uint8).reshape(-1, 256)
    if space == "luminance" and image.bands == 3:
        if luma is not None and (luma.shape != (image.height, image.width) or luma.dtype != np.uint8):
            raise ValueError(f"luma must be uint8 of shape {(image.height, image.width)}, not {luma.dtype} {luma.shape}")
        fused = _native.map_image(image, _luma_key(luts[0]), functools.partial(_luma_program, luts[0]))
        if fused is not None:  # the same arithmetic in one pass (the luma is computed again there)
            return fused
        if luma is None:
            y = luma_image(image)
        else:  # (pyvips keeps a reference to the array's buffer)
            y = pyvips.Image.new_from_memory(np.ascontiguousarray(luma).data, image.width, image.height, 1, "uchar")
        delta = luts[0].astype(np.int16) - np.arange(256, dtype=np.int16)
        # a 3-band delta LUT saves libvips a band broadcast in the add (measured 1.4x faster)
        return (image + y.maplut(_lut_image(np.stack([delta] * 3)))).cast("uchar")
    if space == "rgb" and image.bands == 3:
        return image.maplut(_lut_image(luts))
    return image.maplut(_lut_image(luts[:1]))


def apply_luts_array(array: np.ndarray, luts: np.ndarray, space: str) -> np.ndarray:
    """The numpy twin of :func:`apply_luts_image` for ``(h, w)``, ``(h, w, 1)`` or ``(h, w, 3)`` uint8
    arrays (TypeError for another dtype, ValueError for another shape)."""
    if array.dtype != np.uint8:  # a LUT of 256 entries indexes 8-bit values only
        raise TypeError(f"expected uint8 pixels, not {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3))):
        raise ValueError(f"expected an (h, w), (h, w, 1) or (h, w, 3) array, not shape {array.shape}")
    luts = np.asarray(luts, dtype=np.uint8).reshape(-1, 256)
    squeeze = array.ndim == 2
    a = array[..., np.newaxis] if squeeze else array
    if space == "luminance" and a.shape[-1] == 3:
        out = _native.apply_luma(a, luts[0])
        if out is None:
            out = add_luma_change(a, luts[0], luma_array(a))
    elif space == "rgb" and a.shape[-1] == 3:
        out = _native.apply_luts(a, luts)
        if out is None:
            out = take_keyed(luts, band_keys(a), a.shape)
    else:
        out = _native.apply_luts(a, luts[:1])
        if out is None:
            out = take(luts[0], a)
    return out[..., 0] if squeeze else out


def _luma_key(lut: np.ndarray) -> tuple:
    return ("luminance", lut.tobytes())


def _luma_program(lut: np.ndarray) -> _native.Program:
    """The native kernel's program of a luminance LUT: :func:`add_luma_change` of the luma's change
    (the kernel computes luma with :data:`LUMA_WEIGHTS`, written out in it)."""
    return _native.Program([("luma", {"t1": np.ascontiguousarray(lut, dtype=np.uint8)})])


def add_luma_change(rgb: np.ndarray, lut: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``clip(rgb + lut[y] - y, 0, 255)``: the luma ``y`` of a ``(..., 3)`` uint8 array mapped by the
    uint8 ``lut``, its change added to every band (hue and chroma kept, as in YCbCr)."""
    return add_change(rgb, take(lut, y), y)


def add_change(rgb: np.ndarray, new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """``clip(rgb + (new - old), 0, 255)`` as uint8, for a ``(..., 3)`` uint8 array and the new and old
    uint8 values (luma) of its pixels, the change added to every band (in steps of whole rows)."""
    out = np.empty(rgb.shape, np.uint8)
    step = max(1, 4 * STEP * rgb.shape[0] // max(rgb.size, 1))  # rows: int16 temporaries of 120 KiB
    for start in range(0, rgb.shape[0], step):
        part = rgb[start : start + step].astype(np.int16)
        change = new[start : start + step].astype(np.int16)
        change -= old[start : start + step]
        for b in range(rgb.shape[-1]):  # band by band: one broadcast over the band axis is slower
            part[..., b] += change
        out[start : start + step] = np.clip(part, 0, 255, out=part)
    return out
