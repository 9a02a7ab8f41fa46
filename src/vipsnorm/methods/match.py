"""Histogram matching (specification) to a target palette."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidReferenceError
from ._hist import extend_to_white
from .base import LutMethod, LutParams, Sample, _invalid

__all__ = ["Match", "MatchParams", "match_lut", "anchor_glass"]


def match_lut(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """LUT sending the source histogram onto the target one.

    Each source value goes to the target value at the same quantile, interpolated linearly between the
    target's occupied values (the rule of ``skimage.exposure.match_histograms``). Values outside the
    source's occupied range are interpolated towards 0 and 255 (:func:`extend_to_white`), so glass that
    the tissue sample never saw stays white.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if source.sum() <= 0 or target.sum() <= 0:
        raise ValueError("empty histogram")
    src_q = np.cumsum(source) / source.sum()
    values = np.nonzero(target)[0]
    tgt_q = np.cumsum(target[values]) / target.sum()
    lut = np.interp(src_q, tgt_q, values.astype(np.float64))
    lut = extend_to_white(lut, source)
    return np.clip(np.floor(lut + 0.5), 0, 255).astype(np.uint8)


def anchor_glass(lut: np.ndarray, glass_in: float, glass_out: float, width: int = 16) -> np.ndarray:
    """Make ``lut`` send the glass level ``glass_in`` to ``glass_out``, keeping it monotonic.

    Pale tissue shares channel values with glass, so a CDF mapping fitted on tissue alone can darken or
    tint the glass (a blue-tinted source matched to a pink target). Above ``glass_in`` the LUT becomes
    the line to (255, 255); below it is capped at ``glass_out`` and blended towards it over ``width``
    levels, so there is no jump.
    """
    v = np.arange(256, dtype=np.float64)
    g_in, g_out = float(np.clip(glass_in, 1, 254)), float(np.clip(glass_out, 1, 254))
    capped = np.minimum(np.asarray(lut, dtype=np.float64), g_out)
    blend = np.clip((v - (g_in - width)) / width, 0.0, 1.0)
    out = capped * (1 - blend) + g_out * blend
    above = v >= g_in
    out[above] = np.interp(v[above], [g_in, 255.0], [g_out, 255.0])
    return out


@dataclass(frozen=True)
class MatchParams(LutParams):
    """Fitted matching: the LUT(s), and a description of the target they map onto."""

    method = "match"
    lut: tuple[tuple[int, ...], ...] = ()
    target: str = ""

    def luts(self) -> np.ndarray:
        return np.asarray(self.lut, dtype=np.uint8)

    def _validate(self) -> None:
        super()._validate()
        self._lut_field()
        if not isinstance(self.target, str):
            _invalid(self, "target", "a string (what the LUTs map onto)", repr(self.target))


class Match(LutMethod):
    """Histogram specification: map the image's histogram onto a target's.

    Parameters
    ----------
    target : Sample
        The target palette: the sample of a reference image, or one pooled over a dataset
        (``vipsnorm fit``).
    mode : {"rgb", "luminance"}
        ``rgb`` (default) matches each channel, moving the colour palette onto the target's (as
        ``match_histograms(..., channel_axis=-1)``); ``luminance`` matches luma only, keeping chroma.
    """

    name = "match"
    params_type = MatchParams
    target_type = Sample
    requires_reference = True

    def __init__(self, target: Sample | None = None, mode: str = "rgb"):
        if mode not in ("rgb", "luminance"):
            raise ValueError(f"match mode must be 'rgb' or 'luminance', not {mode!r}")
        self.target, self.mode = target, mode

    @property
    def needs_luma(self) -> bool:
        return self.mode == "luminance"  # rgb: R, G and B of a colour image (a grey one has Y in every row)

    def fit_target(self, samples: list[Sample]) -> Sample:
        """The palette of one image, or the tissue histograms of many pooled, each weighing the same."""
        if len(samples) == 1:
            return samples[0]
        return Sample.pooled(samples, source=f"pooled tissue histograms of {len(samples)} images")

    def fit(self, sample: Sample) -> MatchParams:
        """LUT(s) matching the sample's histograms onto the target's.

        Raises
        ------
        InvalidReferenceError
            No target, a grey target for a colour image in mode rgb, or one whose luma row is uncounted
            in mode luminance.
        ValueError
            Mode luminance on a colour sample whose luma row is uncounted (:attr:`Sample.luma_counted`).
        """
        if self.target is None:
            raise InvalidReferenceError(None, "match needs a reference (--reference IMAGE or JSON)")
        rgb = self.mode == "rgb" and sample.bands == 3
        if rgb and self.target.bands == 1:
            raise InvalidReferenceError(None, "reference is grey; use --mode luminance for colour images")
        if not rgb:
            if not self.target.luma_counted:
                raise InvalidReferenceError(
                    None, "reference's luma (Y) histogram is uncounted (NaN); use --mode rgb, or sample it with luma=True"
                )
            sample._require_luma("match (mode luminance)")
        rows = range(3) if rgb else [3]
        luts = []
        for i in rows:
            lut = match_lut(sample.hist[i], self.target.hist[i]).astype(np.float64)
            if sample.background is not None:
                # glass goes to the target's glass, or stays as it is if the target has none
                glass_out = sample.background[i] if self.target.background is None else self.target.background[i]
                lut = anchor_glass(lut, sample.background[i], glass_out)
            luts.append(tuple(int(v) for v in np.clip(np.floor(lut + 0.5), 0, 255)))
        luts = tuple(luts)
        return MatchParams(
            space="rgb" if rgb else "luminance", lut=luts, target=self.target.source or "reference"
        )
