"""Linear contrast stretch between two percentiles."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ._hist import percentile
from .base import LutMethod, LutParams, Sample, _invalid

__all__ = ["Stretch", "StretchParams", "stretch_lut"]


def stretch_lut(lo: float, hi: float) -> np.ndarray:
    """uint8 LUT mapping ``lo`` to 0 and ``hi`` to 255 linearly, clipped, rounded half up.

    ``hi <= lo`` (a flat channel) gives the identity.
    """
    v = np.arange(256, dtype=np.float64)
    if hi - lo <= 1e-9:
        return v.astype(np.uint8)
    return np.floor(np.clip((v - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class StretchParams(LutParams):
    """Fitted stretch: the input values mapped to 0 (``lo``) and 255 (``hi``), one pair per LUT."""

    method = "stretch"
    low: float = 2.0
    high: float = 98.0
    lo: tuple[float, ...] = (0.0,)
    hi: tuple[float, ...] = (255.0,)

    spaces = ("joint", "rgb")

    def luts(self) -> np.ndarray:
        return np.stack([stretch_lut(lo, hi) for lo, hi in zip(self.lo, self.hi)])

    def _validate(self) -> None:
        super()._validate()
        low = self._field("low", "a percentile in 0..100", [()], minimum=0, maximum=100)
        self._field("high", f"a percentile in 0..100 above 'low' ({float(low):g})", [()], minimum=0, maximum=100, above=low)
        expected = "1 or 3 input values in 0..255 (one per LUT)"
        lo = self._field("lo", expected, [(1,), (3,)], minimum=0, maximum=255)
        hi = self._field("hi", expected, [(1,), (3,)], minimum=0, maximum=255)
        self._rows("lo", lo.size)
        self._rows("hi", hi.size)
        if (hi < lo).any():  # equal: a flat channel, left unchanged (stretch_lut's identity)
            _invalid(self, "hi", "at least 'lo' in every channel (equal: a flat channel, left unchanged)", f"lo {lo.tolist()}, hi {hi.tolist()}")


class Stretch(LutMethod):
    """Linear contrast stretch: the ``low`` percentile goes to 0, the ``high`` percentile to 255.

    Parameters
    ----------
    low, high : float
        Percentiles in [0, 100]; 0 and 100 give a min/max stretch.
    mode : {"joint", "rgb"}
        ``joint`` (default) computes one pair of percentiles over all channels together and applies the
        same linear map to each, so channel ratios (hue) are kept; ``rgb`` stretches each channel on its
        own (white-balances, changes hue).

    Notes
    -----
    Output ``round(clip((v - lo) / (hi - lo), 0, 1) * 255)`` in uint8, matching
    ``skimage.exposure.rescale_intensity(v, in_range=(lo, hi))`` to within the rounding (skimage
    truncates). A channel with ``hi == lo`` (flat) is left unchanged, with a warning.
    """

    name = "stretch"
    params_type = StretchParams

    def __init__(self, low: float = 2.0, high: float = 98.0, mode: str = "joint"):
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
        if mode not in ("joint", "rgb"):
            raise ValueError(f"stretch mode must be 'joint' or 'rgb', not {mode!r}")
        self.low, self.high, self.mode = float(low), float(high), mode

    @property
    def needs_luma(self) -> bool:
        return False  # colour: R, G and B (joint: their sum); grey: every row is the grey histogram

    def fit(self, sample: Sample) -> StretchParams:
        if self.mode == "rgb" and sample.bands == 3:
            rows = [sample.hist[i] for i in range(3)]
            space = "rgb"
        else:
            rows = [sample.hist[3] if sample.bands == 1 else sample.hist[:3].sum(axis=0)]
            space = "joint"
        lo = tuple(percentile(r, self.low) for r in rows)
        hi = tuple(percentile(r, self.high) for r in rows)
        flat = [i for i, (a, b) in enumerate(zip(lo, hi)) if b - a <= 1e-9]
        if flat:
            warnings.warn(
                f"stretch: {'image is' if len(flat) == len(rows) else f'channel(s) {flat} are'} flat "
                f"between the {self.low:g} and {self.high:g} percentiles; left unchanged",
                RuntimeWarning,
                stacklevel=2,
            )
        return StretchParams(space=space, low=self.low, high=self.high, lo=lo, hi=hi)
