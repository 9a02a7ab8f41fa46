"""Gather the pixels a method is fitted on: tissue only, cheaply, without loading a full level.

Strategy (``strategy=``):

``"tiles"`` (default for slides)
    A tissue mask from a low-resolution overview (Otsu on HSV saturation) picks grid cells that hold
    tissue; ``n_tiles`` of them (stratified over the slide, seeded, reproducible) are read at full resolution and every pixel whose
    saturation passes the same threshold is counted. Planning measured 50 random tiles to be within one
    grey level of the exact equalization LUT; the 1/32 level alone was 7 levels off.
``"level"``
    The overview level's tissue pixels only (fastest, least faithful).
``"exact"``
    Every tissue pixel of level 0, streamed through libvips (one extra full pass).

Ordinary images (not slides) are always sampled exactly, all pixels: in one streaming pass, or, for the
small ones a :class:`~vipsnorm.io.slide.Slide` holds decoded in memory, from those pixels (the same counts
without setting up another libvips pipeline, which costs more than counting a tile's pixels).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import pyvips

from . import _native
from .errors import NoTissueError
from .io.slide import Slide
from .methods._hist import brightest, counts as value_counts, darkest, histograms, luma_image, percentile
from .methods.base import Sample

__all__ = ["TissueMask", "tissue_mask", "saturation", "sample_slide", "STRATEGIES", "MIN_TISSUE_PIXELS"]

STRATEGIES = ("tiles", "level", "exact")

#: Threads reading the sampled tiles of a slide (no more than the machine's cores).
SAMPLE_THREADS = 4
#: Fewer tissue pixels than this (or than 1% of a tiny image) is "no tissue".
MIN_TISSUE_PIXELS = 1000
#: Saturation threshold bounds: glass is below 0.04 on a white-balanced scanner.
_MIN_THRESHOLD, _MAX_THRESHOLD = 0.05, 0.5
#: Tissue and glass classes must differ by this much in mean saturation (else: all glass).
_MIN_SEPARATION = 0.06
#: Grey slides: tissue is darker than glass by at least this many levels.
_MIN_GREY_SEPARATION = 12
#: A colour image whose channels differ by at most this many levels (on 99.9% of its overview) is grey.
_GREY_SPREAD = 2
#: A pixel whose darkest channel is this or above is glass whatever its colour (tissue_mask's grey check).
_DARK_BELOW = 205


@dataclass(frozen=True)
class TissueMask:
    """A tissue mask at overview resolution and the per-pixel rule it came from.

    Attributes
    ----------
    mask : ndarray of bool, shape (h, w)
    downsample : float
        Level-0 pixels per overview pixel.
    threshold : float
        Saturation threshold (rule ``"saturation"``: tissue if saturation > threshold) or grey level
        threshold (rule ``"intensity"``: tissue if the value, the darkest channel of a colour image, is
        below threshold).
    bands : int
    rule : {"saturation", "intensity"}
        Default: saturation for colour, intensity for grey. A grey image stored as RGB (no chroma)
        uses intensity.
    """

    mask: np.ndarray
    downsample: float
    threshold: float
    bands: int
    rule: str = ""

    def __post_init__(self):
        if not self.rule:
            object.__setattr__(self, "rule", "saturation" if self.bands == 3 else "intensity")
        if self.rule not in ("saturation", "intensity"):
            raise ValueError(f"rule must be 'saturation' or 'intensity', not {self.rule!r}")

    @property
    def fraction(self) -> float:
        return float(self.mask.mean())


def _max_min(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max and min over the channels of a uint8 ``(..., 3)`` array, as float32."""
    return brightest(rgb).astype(np.float32), darkest(rgb).astype(np.float32)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of a uint8 ``(..., 3)`` array, as float32 in [0, 1]."""
    mx = brightest(rgb)
    chroma = mx - darkest(rgb)  # uint8, never negative
    # one float32 division (mx == 0 has chroma 0, so dividing by 1 there gives 0)
    return np.divide(chroma, np.maximum(mx, 1), dtype=np.float32)


def _otsu(values: np.ndarray, bins: int = 256, value_range=(0.0, 1.0), weights: np.ndarray | None = None) -> float:
    """Otsu's threshold of ``values`` (each counted ``weights`` times, when given), a bin centre."""
    counts, edges = np.histogram(values, bins=bins, range=value_range, weights=weights)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centers)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0, dtype=float), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0, dtype=float), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centers[int(np.argmax(between))])


def _pair_keys(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of each pixel of a uint8 ``(..., 3)`` array: its darkest channel, its chroma (max - min) and the
    uint16 key ``(chroma << 8) | max``, on which its saturation alone depends."""
    mx, mn = brightest(rgb), darkest(rgb)
    chroma = mx - mn  # uint8, never negative
    pair = np.left_shift(chroma, 8, dtype=np.uint16)
    pair |= mx
    return mn, chroma, pair


def tissue_mask(overview: np.ndarray, downsample: float = 1.0, path=None) -> TissueMask:
    """Separate tissue from white glass on a low-resolution overview.

    Colour: Otsu's threshold on HSV saturation, bounded to [0.05, 0.5]. Grey: Otsu on intensity, tissue
    darker; a grey image stored as RGB (every channel within :data:`_GREY_SPREAD` levels of the others
    on 99.9% of the overview's pixels darker than glass, darkest channel below 205) is grey, by its
    darkest channel. A threshold that does not separate two
    distinct classes (an all-glass slide, whose saturation is only noise) yields :class:`NoTissueError`.

    Raises
    ------
    TypeError
        ``overview`` is not uint8.
    NoTissueError
        No tissue found.
    """
    if overview.dtype != np.uint8:
        raise TypeError(f"tissue_mask takes a uint8 overview, not {overview.dtype}")
    if overview.ndim == 2:
        overview = overview[..., np.newaxis]
    bands = overview.shape[-1]
    rule = "saturation" if bands == 3 else "intensity"
    native = _native.pair_counts(overview, _DARK_BELOW) if bands == 3 else None
    if bands == 3:
        if native is not None:  # the counts below, in one pass in C (0.047 -> 0.012 s a 2048 px overview)
            pair_counts, spread = native
        else:
            mn, chroma, pair = _pair_keys(overview)
            candidates = mn < _DARK_BELOW  # what could be tissue: glass is grey on any slide
            # (np.percentile of the chroma values, from their 256 counts)
            spread = value_counts(chroma, np.left_shift(candidates, 8, dtype=np.uint16))
            pair_counts = np.bincount(pair.reshape(-1), minlength=1 << 16)
        if spread.sum() >= 16 and percentile(spread, 99.9) <= _GREY_SPREAD:
            # no chroma where there could be tissue: grey, whatever the band count
            rule = "intensity"
            overview = darkest(overview)[..., np.newaxis]
    if rule == "saturation":
        # A pixel's saturation depends on its (chroma, max) pair only: the 65536 pairs are counted and
        # each pair's saturation (as :func:`saturation` computes it) is histogrammed, thresholded and
        # averaged with its count as weight. The same threshold and mask as from every pixel's value,
        # in half the time in numpy (0.075 -> 0.035 s on a 2048 px overview, with the grey check; the
        # kernel's counts and mask: 0.012 s); the classes' mean saturations are exact float64 sums
        # (float32 means before), which can decide the separation test differently only within about
        # 1e-8 of its limit.
        pairs = pair_counts.astype(np.float64)
        pair_chroma, pair_max = np.divmod(np.arange(1 << 16), 256)
        s = np.divide(pair_chroma, np.maximum(pair_max, 1), dtype=np.float32)
        t = min(max(_otsu(s, weights=pairs), _MIN_THRESHOLD), _MAX_THRESHOLD)
        tissue_pairs = s > t
        mask = _native.pair_mask(overview, tissue_pairs) if native is not None else None
        if mask is None:
            mask = np.take(tissue_pairs, pair if native is None else _pair_keys(overview)[2])
        inside, outside = pairs[tissue_pairs].sum(), pairs[~tissue_pairs].sum()
        separation = (
            (pairs * s)[tissue_pairs].sum() / inside - (pairs * s)[~tissue_pairs].sum() / outside
            if inside > 0 and outside > 0
            else 0.0
        )
        if separation < _MIN_SEPARATION:
            mask = np.zeros_like(mask)
    else:
        v = overview[..., 0]
        t = _otsu(v.astype(np.float32), value_range=(0.0, 256.0))
        mask = v < t
        separation = v[~mask].mean() - v[mask].mean() if mask.any() and (~mask).any() else 0.0
        if separation < _MIN_GREY_SEPARATION:
            mask = np.zeros_like(mask)
    if mask.sum() < 16:
        raise NoTissueError(path, "no tissue found (all glass?): nothing to fit the normalization on")
    return TissueMask(mask, downsample, float(t), bands, rule)


def _tissue_pixels_image(image: pyvips.Image, mask: TissueMask) -> pyvips.Image:
    """Lazy uchar 0/1 image: 1 where a pixel counts as tissue under ``mask``'s per-pixel rule."""
    if image.bands == 3 and mask.rule == "saturation":
        mx = image[0].maxpair(image[1]).maxpair(image[2])
        mn = image[0].minpair(image[1]).minpair(image[2])
        # (mx - mn) / mx > t  <=>  (mx - mn) > t * mx  (mx >= 0)
        tissue = (mx - mn) > (mx * mask.threshold)
    elif image.bands == 3:
        tissue = image[0].minpair(image[1]).minpair(image[2]) < mask.threshold
    else:
        tissue = image < mask.threshold
    return tissue & 1


def _masked_histograms(image: pyvips.Image, tissue01: pyvips.Image | None) -> np.ndarray:
    """(4, 256) histograms (R, G, B, Y) of the pixels of ``image`` where ``tissue01`` is 1, in one pass."""
    if image.bands == 3:
        stacked = image.bandjoin(luma_image(image))
    else:
        stacked = image.bandjoin([image] * 3)
    if tissue01 is None:
        hist = stacked.hist_find().numpy().reshape(256, 4)
        return hist.T.astype(np.float64)
    # One pass: values of tissue pixels land in bins 256..511 of a 16-bit histogram.
    keyed = stacked.cast("ushort") + (tissue01.cast("ushort") * 256)
    hist = keyed.hist_find().numpy().reshape(-1, 4)  # as long as the largest value + 1
    tissue = np.zeros((256, 4))
    tissue[: max(hist.shape[0] - 256, 0)] = hist[256:512]
    return tissue.T


def overview(slide: Slide, max_size: int = 2048) -> tuple[np.ndarray, float]:
    """A low-resolution view of the whole slide (at most ``max_size`` px a side) and its downsample."""
    w0, h0 = slide.dimensions
    target = max(w0, h0) / max_size
    level = slide.best_level_for_downsample(max(target, 1.0))
    image = slide.level_image(level)
    scale = max_size / max(image.width, image.height)
    if scale < 1:
        image = image.resize(scale, kernel="linear")
    array = slide.decode(image.numpy)
    if array.ndim == 2:
        array = array[..., np.newaxis]
    return array, w0 / array.shape[1]


def sample_slide(
    slide: Slide,
    *,
    strategy: str = "tiles",
    n_tiles: int = 256,
    tile: int = 256,
    seed: int = 0,
    tissue: bool | None = None,
    pixels: int = 0,
    luma: bool = True,
) -> Sample:
    """Histograms of the pixels to fit on (and, if asked, a subsample of those pixels themselves).

    Parameters
    ----------
    slide : Slide
    strategy : {"tiles", "level", "exact"}
        See the module documentation. Ignored for ordinary images (always exact).
    n_tiles, tile : int
        Number and size (level-0 pixels) of the full-resolution tiles sampled by ``"tiles"``.
    seed : int
        Which tiles are drawn; fixed by default so that fits are reproducible.
    tissue : bool, optional
        Restrict to tissue; default: yes for slides, no for ordinary images.
    pixels : int
        Also gather up to this many of the sampled pixels in :attr:`Sample.pixels` (a uniform random
        subsample of the same tissue pixels; every pixel when there are fewer), for methods fitted on
        pixel colours. 0: histograms only.
    luma : bool
        False: the Y row of a colour image may be left uncounted (NaN, see :attr:`Sample.luma_counted`)
        where counting it is extra work (a small image held in memory), for a fit that does not read it
        (:attr:`~vipsnorm.methods.Method.needs_luma`).

    Raises
    ------
    NoTissueError
        All glass, or fewer than ``MIN_TISSUE_PIXELS`` tissue pixels.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    use_tissue = slide.is_slide if tissue is None else tissue
    if not use_tissue:
        if slide.is_slide and strategy != "exact":
            # A slide without tissue masking: the overview level stands for the whole.
            image, array = slide.level_image(slide.best_level_for_downsample(8.0)), None
        else:
            image, array = slide.level_image(0), None
        source = f"all pixels, {image.width}x{image.height}"
        if slide.holds_decoded():  # a small image, decoded in memory
            # numpy only for what libvips' band counts do not give: the luma (kept by the slide, for
            # a luminance apply) and the pixels
            array = slide.decoded_pixels() if pixels else None
            hist = _histograms_in_memory(slide, image, luma)
            kept = _subsampled(array, pixels, seed) if pixels else None
            return Sample(hist, image.bands, source, pixels=kept)
        hist = slide.decode(lambda: _masked_histograms(image, None))
        kept = _subsampled_pixels(slide, image, None, pixels, seed) if pixels else None
        return Sample(hist, image.bands, source, pixels=kept)

    view, downsample = overview(slide)
    mask = tissue_mask(view, downsample, slide.path)
    background = _background(view, mask)
    if strategy == "level":
        image = pyvips.Image.new_from_array(view)
        hist = _masked_histograms(image, _tissue_pixels_image(image, mask))
        kept = _limit(view[_tissue_pixels_array(view, mask)], pixels, seed) if pixels else None
        source = f"tissue of a {view.shape[1]}x{view.shape[0]} overview"
    elif strategy == "exact" or slide.dimensions[0] * slide.dimensions[1] <= 2 * n_tiles * tile * tile:
        # (a slide the tiles would mostly cover is cheaper to count whole, in one libvips pass)
        image = slide.level_image(0)
        hist = slide.decode(lambda: _masked_histograms(image, _tissue_pixels_image(image, mask)))
        # (the R row counts every tissue pixel, also where the Y row is left uncounted)
        kept = _subsampled_pixels(slide, image, mask, pixels, seed, hist[0].sum()) if pixels else None
        source = "every tissue pixel of level 0"
    else:
        hist, kept = _sample_tiles(slide, mask, n_tiles, tile, seed, pixels)
        source = f"tissue of {n_tiles} or fewer {tile}px tiles at level 0"
    w0, h0 = slide.dimensions
    if hist[3].sum() < min(MIN_TISSUE_PIXELS, 0.01 * w0 * h0):
        raise NoTissueError(
            slide.path, f"only {int(hist[3].sum())} tissue pixels found: too little to fit on"
        )
    return Sample(hist, view.shape[-1], source, background, kept)


def _histograms_in_memory(slide: Slide, image: pyvips.Image, luma: bool) -> np.ndarray:
    """(4, 256) histograms (R, G, B, Y) of every pixel of ``image``, level 0 of ``slide`` held decoded in
    memory: the counts :func:`_masked_histograms` gives without a mask. Not ``luma`` (colour): the Y row
    is left uncounted, NaN (:attr:`Sample.luma_counted`).

    The native kernel counts the image's own buffer in one pass (0.2 ms for R, G, B on a 512x512 tile,
    0.35 ms with Y). Without it, libvips counts the bands (faster than numpy on an image in memory), and
    numpy the luma (faster than libvips): 1.7 ms CPU, against 2.9 ms for the libvips pipeline of
    :func:`_masked_histograms` and 3.0 ms for :func:`histograms`.
    """
    view = slide.decoded_pixels() if _native.available() else None
    if view is not None:
        if luma or image.bands == 1:
            return _native.histograms(view).astype(np.float64)
        return np.vstack([_native.counts(view)[0], np.full((1, 256), np.nan)])
    counts = image.hist_find().numpy().reshape(256, image.bands).T
    if image.bands == 1:
        return np.repeat(counts, 4, axis=0).astype(np.float64)
    if not luma:
        return np.vstack([counts, np.full((1, 256), np.nan)])
    return np.vstack([counts, value_counts(slide.decoded_luma())]).astype(np.float64)


#: Pixels of the (point-subsampled) image that :func:`_subsampled_pixels` reads at a time, so that
#: gathering pixels holds a strip, never a whole level, in memory (2**21: 6 MiB of RGB).
_STRIP_PIXELS = 1 << 21


def _subsample_step(width: int, height: int, n: int, count: float | None = None) -> int:
    """Keep every ``k``-th pixel in each direction: at least about ``2 n`` of the ``count`` pixels that may
    be gathered (default: all ``width * height``; the tissue pixels, when masked) stay, enough to draw
    ``n`` from. 1 when there are fewer than ``8 n``; never more than the shorter side."""
    count = width * height if count is None else count
    return max(1, min(int(np.sqrt(count / (2 * n))), width, height))


def _subsampled(array: np.ndarray, n: int, seed: int) -> np.ndarray:
    """What :func:`_subsampled_pixels` gathers without a mask, from an ``(h, w, bands)`` array held in
    memory instead of an image (the same pixels: the draws do not depend on how the rows are split)."""
    h, w = array.shape[:2]
    k = _subsample_step(w, h, n)
    # libvips' subsample keeps floor(size / k) pixels a side, starting at 0
    lattice = array[: h // k * k : k, : w // k * k : k] if k > 1 else array
    return _gather([lattice], None, lattice.shape[0] * lattice.shape[1] * 1.0, n, seed)


def _limit(values: np.ndarray, n: int, seed: int | np.random.Generator) -> np.ndarray:
    """At most ``n`` rows of ``values`` (a uniform random choice, in their original order)."""
    if values.shape[0] <= n:
        return values
    return _rows(values, _choose(values.shape[0], n, np.random.default_rng(seed)))


def _rows(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``values[keep]`` for a boolean ``keep`` over the rows of ``values``: ``np.compress`` copies a
    pixel's 3 bytes at once, 5x faster than boolean indexing of ``(n, 3)`` rows. (It would also take a
    shorter mask without a word, where indexing refuses one: the lengths are checked.)"""
    if keep.shape != values.shape[:1]:
        raise ValueError(f"a mask of {keep.shape} for {values.shape[0]} rows")
    return np.compress(keep, values, axis=0)


def _choose(total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random ``n``-subset of ``range(total)`` (``0 < n < total``), as a boolean mask.

    When ``n`` is a sizeable share of ``total`` (2 of 3 million pixels for a stain fit), each index is
    kept with probability ``n / total`` and the surplus or shortfall (a few hundred) is then dropped
    from the kept, or added from the others, uniformly at random. Every ``n``-subset is equally likely,
    as with ``rng.choice(total, n, replace=False)``: given its size ``m``, the first draw is a uniform
    ``m``-subset, and a uniform ``m - n`` of it removed (or a uniform ``n - m`` of the rest added)
    leaves a uniform ``n``-subset. One random number per index instead of ``rng.choice``'s shuffle of
    every index, and a mask instead of a sort: 0.11 -> 0.03 s for 2 of 3 million. A small ``n`` (under
    2 % of ``total``) goes to ``rng.choice``, which draws it without touching every index.
    """
    keep = np.zeros(total, bool)
    if n * 50 < total:
        keep[rng.choice(total, n, replace=False, shuffle=False)] = True
        return keep
    np.less(rng.random(total), n / total, out=keep)
    m = int(np.count_nonzero(keep))
    if m > n:
        kept = np.flatnonzero(keep)
        keep[kept[rng.choice(m, m - n, replace=False, shuffle=False)]] = False
    elif m < n:
        rest = np.flatnonzero(~keep)
        keep[rest[rng.choice(rest.size, n - m, replace=False, shuffle=False)]] = True
    return keep


def _gather(strips, mask: TissueMask | None, expected: float, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` (tissue) pixels, a uniform random choice, of ``strips`` (``(rows, w, bands)`` uint8
    arrays, in order) among which about ``expected`` pixels qualify.

    Each qualifying pixel is kept with one probability, set so that about ``1.5 n + 100`` are (all of
    them when fewer qualify), then ``n`` are drawn from those (:func:`_limit`): at most a strip and
    about ``1.5 n`` pixels are held at a time, and fewer than ``n`` come back only when fewer qualify
    (or a third fewer than ``expected`` do). One generator, drawn from in pixel order, so the result
    does not depend on how the rows are split into strips.
    """
    rng = np.random.default_rng(seed)
    rate = min(1.0, (1.5 * n + 100) / max(expected, 1.0))
    kept: list[np.ndarray] = []
    bands = 1
    for strip in strips:
        strip = strip if strip.ndim == 3 else strip[..., np.newaxis]
        bands = strip.shape[-1]
        values = strip.reshape(-1, bands)
        if mask is not None:
            values = _rows(values, _tissue_pixels_array(strip, mask).reshape(-1))
        if rate < 1.0:
            values = _rows(values, rng.random(values.shape[0]) < rate)
        kept.append(values)
    return _limit(np.concatenate(kept) if kept else np.zeros((0, bands), np.uint8), n, rng)


def _strips(image: pyvips.Image, k: int = 1):
    """The rows of ``image`` (every ``k``-th row and column of a level) as uint8 arrays of about
    :data:`_STRIP_PIXELS` pixels each; a strip spans a multiple of 256 level rows where it can, so that
    tiles (commonly 256 rows) straddling two strips are not decoded twice."""
    rows = max(1, _STRIP_PIXELS // image.width)
    if rows * k >= 256:
        rows = max(1, rows * k // 256 * 256 // k)
    # every crop made before the first is read: looking up an operation clears libvips' error buffer,
    # where a damaged JPEG tile of a TIFF leaves its only trace until Slide.decode reads it
    crops = [image.crop(0, y, image.width, min(rows, image.height - y)) for y in range(0, image.height, rows)]
    for crop in crops:
        yield crop.numpy()


def _subsampled_pixels(
    slide: Slide, image: pyvips.Image, mask: TissueMask | None, n: int, seed: int, count: float | None = None
) -> np.ndarray:
    """Up to ``n`` (tissue) pixels of ``image``, every one when fewer qualify: from a point-subsampled
    copy (real pixel colours, not averages), every ``k``-th pixel in each direction, read in strips.

    ``count``: how many pixels of ``image`` qualify (the tissue pixels counted at full resolution;
    default all), which sets ``k`` and the share of the copy's pixels kept (:func:`_gather`).
    """
    count = float(image.width * image.height if count is None else count)
    k = _subsample_step(image.width, image.height, n, count)
    small = image.subsample(k, k) if k > 1 else image
    # the copy's qualifying pixels, expected in the same share as at full resolution
    expected = small.width * small.height * (count / (image.width * image.height))
    return slide.decode(lambda: _gather(_strips(small, k), mask, expected, n, seed))


def _background(view: np.ndarray, mask: TissueMask) -> tuple[float, float, float, float] | None:
    """Median R, G, B, Y of the glass in the overview (None when there is hardly any glass)."""
    glass = ~mask.mask
    if glass.sum() < 0.02 * glass.size:
        return None
    # medians from histograms of every other overview pixel in each direction: glass is uniform, and
    # this is ten times faster than np.median over millions of pixels
    hist = histograms(view[::2, ::2], glass[::2, ::2])
    if hist[3].sum() == 0:
        return None
    return tuple(percentile(row, 50) for row in hist)


def _sample_tiles(
    slide: Slide, mask: TissueMask, n_tiles: int, tile: int, seed: int, pixels: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Tissue histograms of ``n_tiles`` stratified tissue cells, and up to ``pixels`` of their pixels."""
    w0, h0 = slide.dimensions
    tile = min(tile, w0, h0)
    cols, rows = -(-w0 // tile), -(-h0 // tile)
    # Overview tissue pixels in every grid cell (at least one overview pixel each).
    mh, mw = mask.mask.shape
    xs = np.minimum(np.round(np.arange(cols + 1) * tile / mask.downsample).astype(int), mw)
    ys = np.minimum(np.round(np.arange(rows + 1) * tile / mask.downsample).astype(int), mh)
    x1, y1 = np.minimum(np.maximum(xs[1:], xs[:-1] + 1), mw), np.minimum(np.maximum(ys[1:], ys[:-1] + 1), mh)
    x0, y0 = np.minimum(xs[:-1], x1 - 1), np.minimum(ys[:-1], y1 - 1)
    inside = _cell_sums(mask.mask, x0, x1, y0, y1)
    # Every cell with any tissue is a candidate, drawn with equal probability: each then contributes
    # its tissue pixels only, so the sum estimates the slide's tissue histogram without bias (keeping
    # only mostly-tissue cells would under-represent the pale tissue borders).
    tissue_cells = [(col, row) for row, col in zip(*np.nonzero(inside > 0))]
    if not tissue_cells:
        raise NoTissueError(slide.path, "no tissue found at full resolution")
    # Stratified: split the tissue cells (in row-major order) into n_tiles runs of neighbours and draw
    # one cell from each, so the sample covers the whole slide instead of clustering by chance.
    rng = np.random.default_rng(seed)
    strata = np.array_split(np.arange(len(tissue_cells)), min(n_tiles, len(tissue_cells)))
    chosen = [int(rng.choice(stratum)) for stratum in strata]
    level0 = slide.level_image(0)
    # tiles straight from the file's JPEG tiles where the slide has a checked reader for them: 0.39 ms
    # CPU a 256 px tile of the bench slide, against 1.1-1.2 ms for a libvips crop made into an array
    direct = slide.jpeg_tiles(0)
    hist = np.zeros((4, 256))
    kept: list[np.ndarray] = []
    if pixels:
        # keep each tissue pixel with one probability, set from the tissue the overview expects
        cell_area = ((x1 - x0)[np.newaxis, :] * (y1 - y0)[:, np.newaxis]).astype(np.float64)
        expected = sum(inside[row, col] / cell_area[row, col] * tile * tile for col, row in (tissue_cells[i] for i in chosen))
        keep_rate = min(1.0, 1.5 * pixels / max(expected, 1.0))
        keep_below = max(1, round(keep_rate * (1 << 16)))

    def read(job: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        index, tile_seed = job
        col, row = tissue_cells[index]
        x, y = col * tile, row * tile
        width, height = min(tile, w0 - x), min(tile, h0 - y)
        array = direct.read(x, y, width, height) if direct is not None else None
        if array is None:  # (None from read: a damaged tile, which libvips then reports)
            # one crop per tile: a long-lived Region was faster per fetch but its buffers grew the peak
            # memory with the slide (209 MB at 20k, 314 MB at 40k, against 151 MB for both)
            array = slide.decode(level0.crop(x, y, width, height).numpy)
        tissue = _tissue_pixels_array(array, mask)
        tile_hist = histograms(array, tissue)
        if not pixels:
            return tile_hist, None
        # each tissue pixel kept with the same probability, drawn here in the reading thread (not in
        # the one adding the tiles up: 0.24 s of a stain fit's 0.84 s at 20k) from the tile's own
        # generator, so the draws do not depend on which thread reads which tile
        # (16-bit draws, half the cost of float ones; the rate in steps of 1/65536)
        if keep_rate < 1.0:
            draws = np.random.default_rng(tile_seed).integers(0, 1 << 16, tissue.shape, dtype=np.uint16)
            tissue &= draws < keep_below
        return tile_hist, _rows(array.reshape(-1, array.shape[-1] if array.ndim == 3 else 1), tissue.reshape(-1))

    # Tiles are read by a few threads (libvips decodes, and numpy counts, without holding the GIL for
    # most of the time) and used in order, so the result does not depend on the threads. Not for the
    # OpenSlide backend, whose tiles come through Python callbacks.
    order = sorted(chosen)
    jobs = list(zip(order, rng.integers(0, 2**63, len(order)).tolist()))
    threads = min(SAMPLE_THREADS, _cores()) if slide.backend == "libvips" else 1
    with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
        # a few tiles ahead of the one being added, never all of them in memory
        window = 4 * threads
        for start in range(0, len(jobs), window):
            part = jobs[start : start + window]
            for tile_hist, tissue_pixels in pool.map(read, part) if pool is not None else map(read, part):
                hist += tile_hist
                if tissue_pixels is not None:
                    kept.append(tissue_pixels)
    if not pixels:
        return hist, None
    return hist, _limit(np.concatenate(kept) if kept else np.zeros((0, mask.bands), np.uint8), pixels, seed)


def _cell_sums(mask: np.ndarray, x0: np.ndarray, x1: np.ndarray, y0: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """``mask[y0[r]:y1[r], x0[c]:x1[c]].sum()`` for every row ``r`` and column ``c`` of a grid of cells.

    Cells that tile the mask exactly (the usual case: an overview pixel is smaller than a tile) are
    summed in one pass with ``np.add.reduceat``; others (cells of one overview pixel that overlap, on
    a coarse overview) from an integral image, whose two cumulative sums over a 2048 px mask cost
    about five times as much (0.057 s against 0.012).
    """
    mh, mw = mask.shape
    if (
        x0[0] == 0 and y0[0] == 0 and x1[-1] == mw and y1[-1] == mh
        and np.array_equal(x0[1:], x1[:-1]) and np.array_equal(y0[1:], y1[:-1])
        and (x1 > x0).all() and (y1 > y0).all()
    ):
        rows = np.add.reduceat(mask, y0, axis=0, dtype=np.int32)
        return np.add.reduceat(rows, x0, axis=1, dtype=np.int32)
    integral = np.pad(mask.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32), ((1, 0), (1, 0)))
    return integral[np.ix_(y1, x1)] - integral[np.ix_(y0, x1)] - integral[np.ix_(y1, x0)] + integral[np.ix_(y0, x0)]


def _cores() -> int:
    """Cores this process may run on (its affinity, where the system tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _tissue_pixels_array(pixels: np.ndarray, mask: TissueMask) -> np.ndarray:
    """The numpy twin of :func:`_tissue_pixels_image`: bool, True where a pixel counts as tissue (in the
    native kernel when it is built: the same float32 arithmetic in one pass, 0.53 -> 0.05 ms a 256 px
    tile)."""
    native = _native.tissue(pixels, mask.rule == "saturation", mask.threshold)
    if native is not None:
        return native
    if pixels.ndim == 2:
        pixels = pixels[..., np.newaxis]
    # the comparisons' precision written out (float32 for colour, float64 for grey), as the kernel's,
    # whatever the type of the threshold
    if pixels.shape[-1] == 3:
        mx, mn = _max_min(pixels)
        if mask.rule == "saturation":
            return (mx - mn) > mx * np.float32(mask.threshold)
        return mn < np.float32(mask.threshold)
    return pixels[..., 0] < np.float64(mask.threshold)
