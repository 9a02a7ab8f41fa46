"""Global histogram equalization."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .base import LutMethod, LutParams, Sample

__all__ = ["Equalize", "EqualizeParams", "equalize_lut"]


def equalize_lut(counts: np.ndarray) -> np.ndarray:
    """Classical equalization LUT: ``round(255 * (cdf(v) - cdf_min) / (N - cdf_min))``.

    ``cdf_min`` is the count of the lowest occupied value, so the darkest value maps to 0 and the
    brightest to 255 (the definition of OpenCV's ``equalizeHist``). Values below the occupied range map
    to 0, above it to 255. A histogram with a single occupied value gives the identity.
    """
    counts = np.asarray(counts, dtype=np.float64)
    cdf = np.cumsum(counts)
    total = cdf[-1]
    present = np.nonzero(counts)[0]
    if present.size <= 1:
        return np.arange(256, dtype=np.uint8)
    cdf_min = counts[present[0]]
    lut = np.floor((cdf - cdf_min) / (total - cdf_min) * 255.0 + 0.5)
    return np.clip(lut, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class EqualizeParams(LutParams):
    """Fitted equalization: the LUT(s) themselves (one for luminance, three per channel)."""

    method = "equalize"
    lut: tuple[tuple[int, ...], ...] = ()

    def luts(self) -> np.ndarray:
        return np.asarray(self.lut, dtype=np.uint8)


class Equalize(LutMethod):
    """Global histogram equalization.

    Parameters
    ----------
    mode : {"luminance", "rgb"}
        ``luminance`` (default) equalizes BT.601 luma Y and adds the change of Y to every channel, so hue
        and chroma (Cb, Cr) are kept, as in the common OpenCV recipe (equalize Y of YCrCb). ``rgb``
        equalizes each channel on its own (hue changes).

    Notes
    -----
    Fitted on the sample's histogram (tissue pixels of a slide), so white glass does not dominate the
    CDF; glass brighter than all tissue maps to 255 and stays white. On uint8 input the LUT equals
    OpenCV's ``equalizeHist`` up to rounding, and ``skimage.exposure.equalize_hist`` after rescaling its
    output from ``[cdf_min, 1]`` to ``[0, 255]``.
    """

    name = "equalize"
    params_type = EqualizeParams

    def __init__(self, mode: str = "luminance"):
        if mode not in ("luminance", "rgb"):
            raise ValueError(f"equalize mode must be 'luminance' or 'rgb', not {mode!r}")
        self.mode = mode

    def fit(self, sample: Sample) -> EqualizeParams:
        rgb = self.mode == "rgb" and sample.bands == 3
        rows = [sample.hist[i] for i in range(3)] if rgb else [sample.hist[3]]
        if any(np.count_nonzero(r) <= 1 for r in rows):
            warnings.warn("equalize: flat histogram; left unchanged", RuntimeWarning, stacklevel=2)
        luts = tuple(tuple(int(v) for v in equalize_lut(r)) for r in rows)
        return EqualizeParams(space="rgb" if rgb else "luminance", lut=luts)
