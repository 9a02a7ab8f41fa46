"""Global histogram equalization."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .. import _native
from ._hist import add_luma_change, apply_luts_array, counts, luma_array
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

    def _validate(self) -> None:
        super()._validate()
        self._lut_field()


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

    @property
    def needs_luma(self) -> bool:
        return self.mode == "luminance"  # rgb: R, G and B of a colour image (a grey one has Y in every row)

    def fit(self, sample: Sample) -> EqualizeParams:
        """Equalization LUT(s) of the sample's histograms; ValueError when mode luminance meets a colour
        sample whose luma row is uncounted (:attr:`Sample.luma_counted`)."""
        rgb = self.mode == "rgb" and sample.bands == 3
        if not rgb:
            sample._require_luma("equalize (mode luminance)")
        luts = self._luts(sample.hist[:3] if rgb else sample.hist[3:])
        return EqualizeParams(space="rgb" if rgb else "luminance", lut=tuple(map(tuple, luts.tolist())))

    def fit_apply_array(self, array: np.ndarray) -> np.ndarray:
        """Fit on every pixel of a uint8 ``(h, w)``, ``(h, w, 1)`` or ``(h, w, 3)`` array and apply to it:
        ``apply_array(array, fit(Sample.from_array(array)))`` bit for bit, counting only the histograms
        the mode needs and the luma once, without a :class:`Sample` or params (training patches)."""
        a = np.asarray(array)
        if a.dtype != np.uint8:
            raise TypeError(f"expected uint8 pixels, got {a.dtype}")
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3))):
            raise ValueError(f"expected an (h, w), (h, w, 1) or (h, w, 3) array, not shape {a.shape}")
        if a.ndim == 2 or a.shape[-1] == 1:
            return apply_luts_array(a, self._luts([counts(a)]), "luminance")
        if self.mode != "rgb":
            fused = _native.equalize_luma(a)  # (count, LUT and map in one call to the kernel)
            if fused is not None:
                if fused[1] <= 1:
                    self._luts([np.zeros(256)])  # (the flat-histogram warning)
                return fused[0]
        native = _native.counts(a, luma=self.mode != "rgb")  # (the kernel's counts: the same numbers, one pass)
        if self.mode == "rgb":
            rows = native[0] if native is not None else [counts(a[..., b]) for b in range(3)]
            return apply_luts_array(a, self._luts(rows), "rgb")
        if native is None:
            hist, y = None, luma_array(a)
        else:
            hist, y = native
        lut = self._luts([counts(y)] if hist is None else hist)[0]
        out = _native.apply_luma(a, lut, y)  # (None when the kernel is off)
        return out if out is not None else add_luma_change(a, lut, y)

    @staticmethod
    def _luts(rows) -> np.ndarray:
        """(k, 256) uint8 equalization LUTs of k histograms (warns about flat ones)."""
        if any(np.count_nonzero(r) <= 1 for r in rows):
            warnings.warn("equalize: flat histogram; left unchanged", RuntimeWarning, stacklevel=3)
        return np.stack([equalize_lut(r) for r in rows])
