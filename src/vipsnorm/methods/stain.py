"""H&E stain normalization: Reinhard (Lab statistics), Macenko and Vahadane (stain vectors in optical
density).

All are fitted on a sample of tissue pixel colours (:attr:`Sample.pixels`) and applied as a short
per-pixel pipeline of lookup tables and 3x3 matrices (:mod:`._stain`) that stays lazy on a pyvips image,
so a slide streams through in bounded memory. Each maps onto a *target*: the canonical Macenko stain
matrix by default (Macenko and Vahadane share the target and the apply step, and differ in how they
estimate the stain vectors), or one fitted on reference images with :meth:`Macenko.fit_target`,
:meth:`Vahadane.fit_target` or :meth:`Reinhard.fit_target` (``vipsnorm fit``).
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyvips

from .. import _native
from ..errors import InvalidReferenceError, NoTissueError, StainSeparationError, UnsupportedImageError
from ._hist import STEP, brightest, darkest, percentile, take
from ._stain import (
    HE_REF,
    LAB_C,
    LAB_K,
    MAX_C_REF,
    N16,
    RGB_TO_XYZ,
    WHITE_D65,
    Lut,
    Recomb,
    ToIndex,
    blend_array,
    blend_image,
    column_mix,
    kernel_steps,
    lab_f,
    lab_f_inverse,
    linear_to_srgb,
    od_lut,
    pair_sum,
    rgb_to_lab,
    run_array,
    run_image,
    srgb_to_linear,
)
from ._vahadane import learn_dictionary
from .base import Method, Params, Sample, _invalid

__all__ = [
    "Macenko",
    "MacenkoParams",
    "MacenkoTarget",
    "StainParams",
    "Vahadane",
    "VahadaneParams",
    "Reinhard",
    "ReinhardParams",
    "ReinhardTarget",
    "stain_summary",
    "StainSummary",
    "LabSummary",
    "macenko_stains",
    "vahadane_stains",
    "MIN_STAINED_PIXELS",
    "MIN_STAIN_ANGLE",
]

#: Fewer stained pixels than this (after the optical-density threshold) cannot be fitted.
MIN_STAINED_PIXELS = 100
#: Reinhard: sampled pixels whose channels differ by at most this many levels (99.9% of them) are a
#: grey image stored as RGB (refused, as a grey image is).
GREY_SPREAD = 2
#: Two fitted stain vectors closer than this (degrees) are one stain: H and E cannot be separated.
#: Real H&E tiles give 20-45 degrees; an eosin-only tile about 2.
MIN_STAIN_ANGLE = 5.0
#: Pixels of a stain method's pipeline gather (see :attr:`Method.sample_pixels`).
SAMPLE_PIXELS = 2_000_000
#: Vahadane learns its stain vectors on at most this many of them (a uniform subsample).
LEARN_PIXELS = 200_000

Matrix = tuple[tuple[float, ...], ...]

#: How far from 1 the length of a hematoxylin or eosin vector of a target or parameters may be: fits
#: make unit vectors; a hand-written one, rounded to a few decimals, is well within this.
UNIT_TOLERANCE = 0.1
#: Hematoxylin and eosin vectors of fitted parameters closer than this (degrees) cannot be unmixed
#: (fits refuse them below :data:`MIN_STAIN_ANGLE`).
MIN_UNMIX_ANGLE = 1.0


def _stain_vectors(params: Params, name: str, stains: tuple[int, ...]) -> np.ndarray:
    """Field ``name`` of ``params``: ``stains`` rows of 3 optical densities, the first two (hematoxylin,
    eosin) of unit length (:data:`UNIT_TOLERANCE`); a third row (:func:`~vipsnorm.training.augment.stain_jitter`'s
    residual) may have any length.

    Components are not required to be >= 0: Macenko's fit projects the pixels' optical densities on a
    plane, and on colours other than H&E it makes unit vectors with negative components, which its
    apply step maps as it always has.
    """
    what = "2 stain vectors (hematoxylin, eosin)" if stains == (2,) else f"{' or '.join(map(str, stains))} stain vectors (hematoxylin, eosin, then a residual)"
    expected = f"{what} of 3 optical densities (R, G, B), hematoxylin and eosin of unit length"
    he = params._field(name, expected, [(k, 3) for k in stains])
    lengths = np.linalg.norm(he[:2], axis=1)
    if (np.abs(lengths - 1.0) > UNIT_TOLERANCE).any():
        _invalid(params, name, expected, f"lengths {[round(float(v), 4) for v in lengths]}")
    return he


def _concentrations(params: Params, name: str, stains: int) -> np.ndarray:
    """Field ``name`` of ``params``: one maximum concentration > 0 per stain vector."""
    return params._field(name, f"{stains} numbers > 0 (the maximum concentration of each stain vector)", [(stains,)], above=0)


@dataclass(frozen=True)
class StainSummary:
    """One input's stains for a dataset target (:meth:`Macenko.summarize`): ``he`` (3, 2) optical-density
    vectors of hematoxylin and eosin as columns, ``max_c`` their 99th-percentile concentrations,
    ``stained`` the pixels they were found on."""

    he: np.ndarray
    max_c: np.ndarray
    stained: int
    source: str = ""


@dataclass(frozen=True)
class LabSummary:
    """One input's CIELAB tissue statistics for a dataset target (:meth:`Reinhard.summarize`)."""

    mean: np.ndarray
    std: np.ndarray
    source: str = ""


def _floats(values) -> tuple:
    """Nested tuples of Python floats (JSON-friendly, hashable) from an array-like."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 1:
        return tuple(float(v) for v in a)
    return tuple(_floats(row) for row in a)


def _colour_pixels(sample: Sample, method: str) -> np.ndarray:
    if sample.pixels is None:
        raise ValueError(
            f"{method} is fitted on pixel colours: the sample has none (build it with Sample.from_array, "
            f"or gather Method.sample_pixels pixels when sampling)"
        )
    if sample.bands != 3 or sample.pixels.shape[1] != 3:
        raise UnsupportedImageError(
            None, f"stain normalization ({method}) needs a colour (RGB) image; this one is grey"
        )
    return sample.pixels


def _check_image(image: pyvips.Image, method: str) -> None:
    if image.bands != 3:
        what = "grey" if image.bands == 1 else f"{image.bands}-band"
        raise UnsupportedImageError(
            None, f"stain normalization ({method}) needs a colour (RGB) image; this one is {what}"
        )
    if image.format != "uchar":
        raise UnsupportedImageError(None, f"stain normalization ({method}) needs 8-bit pixels, not {image.format}")


def _check_array(array: np.ndarray, method: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise UnsupportedImageError(
            None, f"stain normalization ({method}) needs a colour (RGB) image; got shape {array.shape}"
        )
    if array.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {array.dtype}")
    return array


def _rgb(pixels: np.ndarray) -> bool:
    """Whether ``pixels`` is a uint8 ``(h, w, 3)`` array (what :meth:`apply_in_place` maps; anything else
    goes to :meth:`apply`, which says what is wrong)."""
    return pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[-1] == 3


# --- Macenko -------------------------------------------------------------------------------------


def _extreme_directions(odhat: np.ndarray, plane: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The unit OD directions at the ``alpha`` and ``100 - alpha`` percentiles of angle in ``plane``."""
    proj = odhat @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha], overwrite_input=True)
    return plane @ np.array([np.cos(lo), np.sin(lo)]), plane @ np.array([np.cos(hi), np.sin(hi)])


def _order_he(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(3, 2) matrix of columns H, E: hematoxylin is the vector with the larger red optical density.

    Hematoxylin (blue-purple) absorbs red light, eosin (pink) hardly does (canonical red OD 0.56 vs
    0.22). The rule does not depend on the arbitrary signs of the eigenvectors or on which extreme
    angle a stain lands on, so H and E never swap between images.
    """
    return np.stack([a, b], axis=1) if a[0] > b[0] else np.stack([b, a], axis=1)


def _max_concentrations(he: np.ndarray, od: np.ndarray, method: str) -> np.ndarray:
    """99th percentile of each stain's least-squares concentration ``pinv(HE) OD`` over ``od``.

    The apply step (:meth:`StainParams.od_matrix`) unmixes with the same ``pinv(HE)``, so the fitted
    maxima are those of the concentrations it scales, whichever method found ``he``.
    """
    concentrations = np.linalg.pinv(he) @ od.T
    max_c = np.percentile(concentrations, 99, axis=1, overwrite_input=True)
    if not np.all(max_c > 1e-6):
        raise StainSeparationError(
            None, f"{method}: a stain has no positive concentration (99th percentiles {max_c.tolist()})"
        )
    return max_c


def _one_stain(method: str, angle: float, what: str) -> StainSeparationError:
    return StainSeparationError(
        None,
        f"{method}: the stained pixels hold one stain only ({what} {angle:.1f} degrees apart, need "
        f"{MIN_STAIN_ANGLE:g}); hematoxylin and eosin cannot be separated: use --method reinhard or match",
    )


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    """Degrees between unit vectors."""
    return float(np.degrees(np.arccos(np.clip(a @ b, -1.0, 1.0))))


def macenko_stains(
    pixels: np.ndarray, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15
) -> tuple[np.ndarray, np.ndarray, int]:
    """Macenko et al. (2009) stain matrix and 99th-percentile concentrations of ``(n, 3)`` uint8 pixels.

    Returns
    -------
    he : ndarray, shape (3, 2)
        Unit optical-density vectors of hematoxylin (column 0) and eosin (column 1).
    max_c : ndarray, shape (2,)
        99th percentile of each stain's concentration over all ``pixels``.
    stained : int
        Pixels used for the stain vectors (optical density >= ``beta`` in every channel).

    Raises
    ------
    NoTissueError
        Fewer than :data:`MIN_STAINED_PIXELS` stained pixels (a blank or all-white image).
    StainSeparationError
        One stain only (the two extreme directions are closer than :data:`MIN_STAIN_ANGLE`), or
        concentrations without spread.

    Notes
    -----
    The steps of the reference implementation (HEnorm_python, torchstain): ``OD = -ln((I + 1) / Io)``;
    pixels with ``OD < beta`` in any channel are dropped; the OD cloud is projected on the plane of its
    two largest principal axes; the directions at the ``alpha`` and ``100 - alpha`` percentiles of angle
    are the stains. The principal axis is oriented towards positive OD first, so the angles never wrap
    around +-pi. Concentrations are the least-squares solution over *all* pixels, as the reference.
    """
    pixels = np.asarray(pixels).reshape(-1, 3)
    table = od_lut(io)
    if pixels.dtype == np.uint8:  # the threshold applied to the 256 values, not to every pixel's OD
        # OD falls as the value rises, so the values dark enough are 0 .. dark - 1, and a pixel is
        # dark enough in every channel when its brightest channel is (one comparison a pixel, where a
        # lookup per channel took 0.1 s on 2 million pixels)
        dark = int(np.count_nonzero(table >= beta))
        keep = brightest(pixels) < dark if dark < 256 else np.ones(pixels.shape[0], bool)
        odhat = take(table, np.compress(keep, pixels, axis=0))  # (5x faster than pixels[keep])
    else:
        od = table[pixels]
        odhat = od[(od >= beta).all(axis=1)]
    if odhat.shape[0] < MIN_STAINED_PIXELS:
        # stained in some channel but not in all: one stain that leaves a channel clear (eosin alone
        # barely absorbs red), not glass
        dark = table >= beta
        coloured = int(np.count_nonzero(dark[pixels].any(axis=-1)))
        if coloured >= MIN_STAINED_PIXELS:
            raise StainSeparationError(
                None,
                f"macenko: {coloured} of {pixels.shape[0]} pixels are stained in some channel, but only "
                f"{odhat.shape[0]} in every channel (optical density >= beta={beta:g}; need {MIN_STAINED_PIXELS}): "
                "one stain only, which leaves a channel clear (eosin alone barely absorbs red), or very pale "
                "staining; hematoxylin and eosin cannot be separated: use --method reinhard or match",
            )
        raise NoTissueError(
            None,
            f"macenko: only {odhat.shape[0]} of {pixels.shape[0]} pixels are stained (optical density >= "
            f"beta={beta:g} in every channel, i.e. darker than about {io * np.exp(-beta) - 1:.0f}); need at "
            f"least {MIN_STAINED_PIXELS}: the image is blank or all glass",
        )
    _, vectors = np.linalg.eigh(np.cov(odhat.T))
    plane = vectors[:, 1:3].copy()
    if plane[:, 1].sum() < 0:
        plane[:, 1] *= -1
    v_lo, v_hi = _extreme_directions(odhat, plane, alpha)
    angle = _angle(v_lo, v_hi)
    if angle < MIN_STAIN_ANGLE:
        raise _one_stain("macenko", angle, "the two stain directions are")
    he = _order_he(v_lo, v_hi)
    stained = int(odhat.shape[0])
    if pixels.dtype == np.uint8:
        del odhat  # the OD of every pixel only now: fewer large arrays alive at once
        od = take(table, pixels)
    return he, _max_concentrations(he, od, "macenko"), stained


def vahadane_stains(
    pixels: np.ndarray,
    io: float = 240.0,
    beta: float = 0.15,
    regularizer: float = 0.1,
    learn_pixels: int = LEARN_PIXELS,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Vahadane et al. (2016) stain matrix (sparse non-negative dictionary learning) and 99th-percentile
    concentrations of ``(n, 3)`` uint8 pixels.

    Returns
    -------
    he, max_c : as :func:`macenko_stains`.
    stained : int
        Pixels the stain vectors were learned on (at most ``learn_pixels``).

    Raises
    ------
    NoTissueError
        Fewer than :data:`MIN_STAINED_PIXELS` stained pixels (a blank or all-white image).
    StainSeparationError
        One stain only: the two learned vectors are closer than :data:`MIN_STAIN_ANGLE` (noisy
        single-stain pixels split between them), or fewer than :data:`MIN_STAINED_PIXELS` pixels use one
        of them (it stayed where it started); or concentrations without spread.

    Notes
    -----
    ``OD = -ln((I + 1) / Io)`` as Macenko's. The stained pixels are those with ``OD >= beta`` in at
    least one channel (darkest channel below about 206 for ``Io = 240``: the tissue, pale eosin
    included; StainTools keeps CIELAB ``L < 80``, much the same pixels), negative optical densities
    (brighter than ``Io``) set to 0. When there are more than ``learn_pixels`` of them a uniform
    subsample, always the same for the same pixels, is learned on: at 200,000 pixels the vectors are
    within 0.15 degrees of those learned on every pixel of the shared H&E tiles, in well under a second.

    The stain vectors ``D`` (unit, non-negative) minimize ``0.5 ||OD - A D||^2 + regularizer ||A||_1``
    over non-negative concentrations ``A`` (:func:`._vahadane.learn_dictionary`, exact alternating
    minimization from the canonical H&E vectors; it reaches the same optimum as SPAMS, which StainTools
    uses, and as scikit-learn's ``dict_learning``: tests/test_vahadane.py). Hematoxylin is the vector
    with the larger red optical density, as in Macenko's. The l1 penalty favours explaining each pixel
    with one stain: on pixels where both stains are dense the vectors come out closer together than the
    true ones (a few degrees), which is the method, not a fitting error.

    The maximum concentrations are the 99th percentiles of the least-squares concentrations over *all*
    ``pixels``, as in Macenko's: the shared apply step unmixes that way.
    """
    pixels = np.asarray(pixels).reshape(-1, 3)
    od = od_lut(io)[pixels]
    stained = od[(od >= beta).any(axis=1)]
    if stained.shape[0] < MIN_STAINED_PIXELS:
        raise NoTissueError(
            None,
            f"vahadane: only {stained.shape[0]} of {pixels.shape[0]} pixels are stained (optical density >= "
            f"beta={beta:g} in a channel, i.e. darker than about {io * np.exp(-beta) - 1:.0f}); need at "
            f"least {MIN_STAINED_PIXELS}: the image is blank or all glass",
        )
    if stained.shape[0] > learn_pixels:
        keep = np.random.default_rng(0).choice(stained.shape[0], learn_pixels, replace=False)
        stained = stained[np.sort(keep)]
    init = np.asarray(HE_REF, dtype=np.float64).T
    d, codes, _ = learn_dictionary(np.maximum(stained, 0.0), init, regularizer)
    angle = _angle(d[0], d[1])
    if angle < MIN_STAIN_ANGLE:
        raise _one_stain("vahadane", angle, "the two learned stain vectors are")
    used = np.count_nonzero(codes > 0, axis=0)
    if used.min() < MIN_STAINED_PIXELS:
        # an atom (almost) no pixel uses stays where it started: it is no stain of this image
        raise StainSeparationError(
            None,
            f"vahadane: the stained pixels hold one stain only ({used.min()} of {stained.shape[0]} pixels use "
            f"one of the two learned stain vectors, need {MIN_STAINED_PIXELS}); hematoxylin and eosin cannot be "
            f"separated: use --method reinhard or match",
        )
    he = _order_he(d[0], d[1])
    return he, _max_concentrations(he, od, "vahadane"), int(stained.shape[0])


@dataclass(frozen=True)
class MacenkoTarget(Params):
    """A stain-matrix target (Macenko's and Vahadane's): the stain matrix and max concentrations
    everything is mapped onto.

    Attributes
    ----------
    he : ((hR, hG, hB), (eR, eG, eB))
        Unit optical-density vectors of hematoxylin and eosin.
    max_c : (float, float)
        Their 99th-percentile concentrations.
    source : str
        Where it comes from (for reports).
    """

    method = "macenko-target"
    he: Matrix = (tuple(r[0] for r in HE_REF), tuple(r[1] for r in HE_REF))
    max_c: tuple[float, float] = MAX_C_REF
    source: str = "canonical (Macenko et al. 2009)"

    def matrix(self) -> np.ndarray:
        """The (3, 2) stain matrix, columns H, E."""
        return np.asarray(self.he, dtype=np.float64).T

    def _validate(self) -> None:
        super()._validate()
        _stain_vectors(self, "he", (2,))
        _concentrations(self, "max_c", 2)
        if not isinstance(self.source, str):
            _invalid(self, "source", "a string (where the target comes from)", repr(self.source))


@dataclass(frozen=True)
class StainParams(Params):
    """A fitted stain-matrix normalization (Macenko's or Vahadane's): the source's stains and the
    target's. The apply step depends on these only.

    Attributes
    ----------
    he, max_c : as :class:`MacenkoTarget`, of the source image.
    target_he, target_max_c : the target's.
    io : float
        Transmitted light intensity of ``OD = -ln((I + 1) / io)``.
    """

    he: Matrix = ()
    max_c: tuple[float, ...] = ()
    target_he: Matrix = ()
    target_max_c: tuple[float, ...] = ()
    io: float = 240.0

    def od_matrix(self) -> np.ndarray:
        """The 3x3 map of optical densities: ``target_HE @ diag(target_max_c / max_c) @ pinv(HE)``."""
        he = np.asarray(self.he, dtype=np.float64).T
        target = np.asarray(self.target_he, dtype=np.float64).T
        scale = np.asarray(self.target_max_c) / np.asarray(self.max_c)
        return target @ np.diag(scale) @ np.linalg.pinv(he)

    def steps(self) -> list:
        """The per-pixel pipeline (see :mod:`._stain`)."""
        return _stain_matrix_steps(self)

    def _validate(self) -> None:
        super()._validate()
        he = _stain_vectors(self, "he", (2, 3))
        _concentrations(self, "max_c", len(he))
        _stain_vectors(self, "target_he", (len(he),))
        _concentrations(self, "target_max_c", len(he))
        self._field("io", "a number > 0 (the transmitted light intensity, 240)", [()], above=0)
        angle = _angle(*(he[:2] / np.linalg.norm(he[:2], axis=1, keepdims=True)))
        if angle < MIN_UNMIX_ANGLE:  # (NaN passes: is_finite's to refuse)
            _invalid(
                self, "he", f"hematoxylin and eosin vectors at least {MIN_UNMIX_ANGLE:g} degree apart (to unmix them)",
                f"{angle:.2f} degrees",
            )


@dataclass(frozen=True)
class MacenkoParams(StainParams):
    """Fitted Macenko normalization: the source's stains and the target's, and the constants used.

    Attributes
    ----------
    he, max_c, target_he, target_max_c, io : as :class:`StainParams`.
    alpha, beta : float
        Angle percentile and optical-density threshold of the fit.
    stained : int
        Number of stained pixels the stain vectors were fitted on.
    """

    method = "macenko"
    alpha: float = 1.0
    beta: float = 0.15
    stained: int = 0

    def _validate(self) -> None:
        super()._validate()
        self._field("alpha", "a percentile in [0, 50)", [()], minimum=0, below=50)
        self._field("beta", "an optical density >= 0", [()], minimum=0)
        self._field("stained", "a number of pixels (an integer >= 0)", [()], integer=True, minimum=0)


@dataclass(frozen=True)
class VahadaneParams(StainParams):
    """Fitted Vahadane normalization: the source's stains (sparse dictionary learning) and the target's.

    Attributes
    ----------
    he, max_c, target_he, target_max_c, io : as :class:`StainParams`.
    beta : float
        Optical-density threshold of the stained pixels (in any channel).
    regularizer : float
        Weight of the l1 penalty on the concentrations (``lambda``).
    stained : int
        Number of stained pixels the stain vectors were learned on.
    """

    method = "vahadane"
    beta: float = 0.15
    regularizer: float = 0.1
    stained: int = 0

    def _validate(self) -> None:
        super()._validate()
        self._field("beta", "an optical density >= 0", [()], minimum=0)
        self._field("regularizer", "a number > 0 (the l1 penalty's weight)", [()], above=0)
        self._field("stained", "a number of pixels (an integer >= 0)", [()], integer=True, minimum=0)


def _stain_matrix_steps(params: StainParams) -> list:
    """``out = floor(min(Io exp(-M OD), 255))`` as LUT -> recomb (one :class:`PairSum`) -> ushort index
    -> LUT.

    The index of band ``b`` is ``s_b (OD'_b + o_b)``: the offset ``o`` (which keeps optical densities
    down to ``ln(Io / 255)``, i.e. output 255, above index 0) lies in the range of ``M`` (a combination
    of the target stain vectors), so it is folded into the first LUT as ``OD + d`` with ``M d = o``: no
    extra ``linear`` in the pipeline. Index ``j`` stands for the middle of its interval, ``j + 0.5``.
    """
    io = float(params.io)
    m = params.od_matrix()
    target = np.asarray(params.target_he, dtype=np.float64).T
    od_white = np.log(io / 255.0)  # output 255 at and below this optical density
    od_black = np.log(io) + 0.1  # output 0 above about this
    margin = max(0.0, -od_white) + 0.02
    direction = target.sum(axis=1)  # target @ (1, 1): positive for any plausible stain vectors
    if direction.min() <= 1e-3:
        raise InvalidReferenceError(None, f"{params.method} target stain vectors are not optical densities: {params.target_he}")
    k = margin / direction.min()
    offset = k * direction  # = M d for d = HE diag(max_c / target_max_c) (k, k)
    he = np.asarray(params.he, dtype=np.float64).T
    d = he @ (np.asarray(params.max_c) / np.asarray(params.target_max_c) * k)
    scale = (N16 - 1) / (od_black + offset)
    table1 = (od_lut(io)[np.newaxis, :] + d[:, np.newaxis]).astype(np.float32)
    table2 = np.stack([_output_table(io, scale[b], offset[b]) for b in range(3)])
    return [pair_sum(table1, np.diag(scale) @ m), ToIndex(), Lut(table2)]


def _output_values(j: np.ndarray, io: float, scale: float, offset: float) -> np.ndarray:
    """``floor(min(io exp(-((j + 0.5) / scale - offset)), 255))`` of int64 indices ``j`` (float64)."""
    x = np.divide(j + 0.5, scale)
    x -= offset
    np.negative(x, out=x)
    np.exp(x, out=x)
    x *= io
    np.minimum(x, 255.0, out=x)
    return np.floor(x, out=x)


def _output_table(io: float, scale: float, offset: float) -> np.ndarray:
    """The 65536-entry uint8 table of :func:`_output_values` (the last LUT of the stain pipeline).

    The values fall with ``j`` (for a positive scale, consecutive centres ``(j + 0.5) / scale - offset``
    are far more than a rounding error apart), so the table is a staircase: for each level ``k`` the
    first index below it is estimated from ``ln(io / k)`` and then found exactly among the values of
    its neighbours. An estimate that misses by more than that (never seen) falls back to every entry.
    """
    last = N16 - 1
    step = 1.0 / scale if scale > 0 else np.inf
    span = max(abs(offset), (last + 1) * step, 1.0)
    if io > 0 and np.isfinite(io) and np.isfinite(scale) and scale > 0 and np.isfinite(offset) and step > 1e-9 * span:
        levels = np.arange(1, 256, dtype=np.float64)
        with np.errstate(all="ignore"):
            guess = np.floor((np.log(io / levels) + offset) * scale + 0.5)
        if np.all(np.isfinite(guess)):
            lo = np.clip(guess.astype(np.int64) - 2, 0, last)
            window = np.minimum(lo[:, np.newaxis] + np.arange(4), last)  # lo .. lo + 3
            above = _output_values(window, io, scale, offset) >= levels[:, np.newaxis]
            # first index below level k: within the window, or the window does not bracket it
            ok = (above[:, 0] | (window[:, 0] == 0)) & (~above[:, -1] | (window[:, -1] == last))
            if np.all(ok):
                first = np.where(above[:, -1], last + 1, window[:, 0] + above.sum(axis=1))
                bounds = np.concatenate([[0], first[::-1], [last + 1]])
                return np.repeat(np.arange(255, -1, -1, dtype=np.uint8), np.diff(bounds))
    table = np.empty(N16, np.uint8)
    for start in range(0, N16, STEP):  # float64 temporaries below glibc's mmap threshold
        table[start : start + STEP] = _output_values(np.arange(start, min(start + STEP, N16)), io, scale, offset)
    return table


def _steps(params: StainParams | ReinhardParams) -> list:
    """``params.steps()``, kept for the last few params: the patches of a slide share theirs, and its
    tables cost more than mapping a 256 px patch (Reinhard's: 10 ms)."""
    try:
        return _kept_steps(params)
    except TypeError:  # params made by hand with lists: not hashable
        return params.steps()


@functools.lru_cache(maxsize=4)
def _kept_steps(params: StainParams | ReinhardParams) -> list:
    return params.steps()


def _program(params: StainParams | ReinhardParams, weight: np.ndarray | None) -> _native.Program | None:
    """The native kernel's program of ``params``' pipeline (then the glass blend by ``weight``)."""
    steps = kernel_steps(_steps(params), weight)
    return None if steps is None else _native.Program(steps)


class _StainMatrixMethod(Method):
    """What Macenko and Vahadane share: a stain-matrix target (:class:`MacenkoTarget`, default the
    canonical one), the dataset target (median stain vectors and concentrations) and the apply step
    (unmix with the source's stains, remix with the target's). Subclasses estimate the stains."""

    target_type = MacenkoTarget
    sample_pixels = SAMPLE_PIXELS

    def _set_target(self, target: MacenkoTarget | None, io: float) -> None:
        if target is not None and not isinstance(target, MacenkoTarget):
            raise InvalidReferenceError(
                None, f"{self.name} needs a stain-matrix (macenko) target, not {type(target).__name__}"
            )
        self.target = MacenkoTarget() if target is None else target
        self.io = float(io)

    @abstractmethod
    def _stains(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """``(he (3, 2), max_c (2,), stained pixels)`` of ``(n, 3)`` uint8 pixels."""

    @abstractmethod
    def _params(self, he: np.ndarray, max_c: np.ndarray, stained: int) -> StainParams:
        """The method's params for the fitted stains and this method's target and constants."""

    def _fit_pixels(self, sample: Sample) -> tuple[np.ndarray, np.ndarray, int]:
        return self._stains(_colour_pixels(sample, self.name))

    def fit(self, sample: Sample) -> StainParams:
        return self._params(*self._fit_pixels(sample))

    def summarize(self, sample: Sample) -> "StainSummary":
        """This input's stain vectors and 99th-percentile concentrations (what :meth:`fit_target` takes
        the medians of), instead of its pixels."""
        he, max_c, stained = self._fit_pixels(sample)
        return StainSummary(he=he, max_c=max_c, stained=stained, source=sample.source)

    def fit_target(self, samples: list) -> MacenkoTarget:
        """The median stain vectors (each renormalized to unit length) and median max concentrations of
        ``samples`` (each a :class:`Sample` or its :meth:`summarize`; one sample: that image's own
        stains)."""
        if not samples:
            raise ValueError("no samples to fit a target on")
        fits = [s if isinstance(s, StainSummary) else self.summarize(s) for s in samples]
        he = np.median([f.he for f in fits], axis=0)
        he /= np.linalg.norm(he, axis=0, keepdims=True)
        max_c = np.median([f.max_c for f in fits], axis=0)
        source = fits[0].source if len(fits) == 1 else f"median of {len(fits)} images"
        return MacenkoTarget(he=_floats(he.T), max_c=_floats(max_c), source=source or "image")

    def apply(self, image: pyvips.Image, params: StainParams) -> pyvips.Image:
        _check_image(image, self.name)
        fused = _native.map_image(image, ("stain", params), functools.partial(_program, params, None))
        return fused if fused is not None else run_image(image, params.steps())

    def kernel_program(self, params: StainParams) -> _native.Program | None:
        return _program(params, None) if _native.available() else None

    def apply_array(self, array: np.ndarray, params: StainParams) -> np.ndarray:
        array = _check_array(array, self.name)
        fused = _native.map_array(array, ("stain", params), functools.partial(_program, params, None))
        return fused if fused is not None else run_array(array, _steps(params))

    def apply_in_place(self, pixels: np.ndarray, params: StainParams) -> bool:
        return _rgb(pixels) and _native.map_in_place(pixels, ("stain", params), functools.partial(_program, params, None))


class Macenko(_StainMatrixMethod):
    """Macenko stain normalization: unmix H and E in optical density, remix with the target's stains.

    Parameters
    ----------
    target : MacenkoTarget, optional
        The stains to map onto; default the canonical ``HERef = [[0.5626, 0.2159], [0.7201, 0.8012],
        [0.4062, 0.5581]]``, ``maxCRef = [1.9705, 1.0308]``.
    io : float
        Transmitted light intensity (the brightness of glass), 240.
    alpha : float
        Percentile of the angles taken as the extreme stain directions, 1.
    beta : float
        Optical density below which (in any channel) a pixel is transparent, 0.15.

    Notes
    -----
    Input and output are sRGB uint8. Per pixel ``OD = -ln((I + 1) / Io)``, ``OD' = target_HE
    diag(target_max_c / max_c) pinv(HE) OD``, ``out = floor(min(Io exp(-OD'), 255))`` as the reference
    implementation (HEnorm_python, torchstain), which truncates; ``exp`` is a 65536-entry table. Glass
    is mapped as the reference maps it: white stays at 255 for ordinary stain matrices (tested), but no
    extra protection is applied.
    """

    name = "macenko"
    params_type = MacenkoParams

    def __init__(self, target: MacenkoTarget | None = None, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15):
        if not 0.0 <= alpha < 50.0:
            raise ValueError(f"need 0 <= alpha < 50, got {alpha}")
        if io <= 0 or beta < 0:
            raise ValueError(f"need io > 0 and beta >= 0, got io={io}, beta={beta}")
        self._set_target(target, io)
        self.alpha, self.beta = float(alpha), float(beta)

    def _stains(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        return macenko_stains(pixels, self.io, self.alpha, self.beta)

    def _params(self, he: np.ndarray, max_c: np.ndarray, stained: int) -> MacenkoParams:
        return MacenkoParams(
            he=_floats(he.T),
            max_c=_floats(max_c),
            target_he=self.target.he,
            target_max_c=self.target.max_c,
            io=self.io,
            alpha=self.alpha,
            beta=self.beta,
            stained=stained,
        )


class Vahadane(_StainMatrixMethod):
    """Vahadane stain normalization: stain vectors by sparse non-negative dictionary learning, then
    Macenko's apply step (unmix, scale the concentrations, remix with the target's stains).

    Parameters
    ----------
    target : MacenkoTarget, optional
        The stains to map onto; default the canonical Macenko target, as :class:`Macenko`.
    io : float
        Transmitted light intensity (the brightness of glass), 240.
    beta : float
        Optical density a pixel must reach in at least one channel to be learned on, 0.15.
    regularizer : float
        Weight ``lambda`` of the l1 penalty on the concentrations, 0.1 (Vahadane et al., StainTools).
    learn_pixels : int
        Learn on a uniform subsample of at most this many stained pixels, 200,000.

    Notes
    -----
    See :func:`vahadane_stains` for the fit. Apply is :class:`Macenko`'s, bit for bit: the same
    parameters give the same output. Needs only numpy: the lasso of two stains is solved in closed form
    (:mod:`._vahadane`), where scikit-learn's ``dict_learning`` runs a coordinate-descent solver per
    pixel (on 20,000 pixels: 13 s against 10 ms here, to the same stains). The fit is deterministic:
    a fixed start and a fixed subsample, no random state.
    """

    name = "vahadane"
    params_type = VahadaneParams

    def __init__(
        self,
        target: MacenkoTarget | None = None,
        io: float = 240.0,
        beta: float = 0.15,
        regularizer: float = 0.1,
        learn_pixels: int = LEARN_PIXELS,
    ):
        if io <= 0 or beta < 0 or regularizer <= 0:
            raise ValueError(f"need io > 0, beta >= 0 and regularizer > 0, got io={io}, beta={beta}, regularizer={regularizer}")
        if learn_pixels < MIN_STAINED_PIXELS:
            raise ValueError(f"need learn_pixels >= {MIN_STAINED_PIXELS}, got {learn_pixels}")
        self._set_target(target, io)
        self.beta, self.regularizer, self.learn_pixels = float(beta), float(regularizer), int(learn_pixels)

    def _stains(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        return vahadane_stains(pixels, self.io, self.beta, self.regularizer, self.learn_pixels)

    def _params(self, he: np.ndarray, max_c: np.ndarray, stained: int) -> VahadaneParams:
        return VahadaneParams(
            he=_floats(he.T),
            max_c=_floats(max_c),
            target_he=self.target.he,
            target_max_c=self.target.max_c,
            io=self.io,
            beta=self.beta,
            regularizer=self.regularizer,
            stained=stained,
        )


# --- Reinhard ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReinhardTarget(Params):
    """A Reinhard target: CIELAB means and standard deviations (L, a, b)."""

    method = "reinhard-target"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    source: str = ""

    def _validate(self) -> None:
        super()._validate()
        _lab_stats_fields(self, "mean", "std")
        if not isinstance(self.source, str):
            _invalid(self, "source", "a string (where the target comes from)", repr(self.source))


def _lab_stats_fields(params: Params, mean: str, std: str) -> None:
    """Fields ``mean`` and ``std`` of ``params``: CIELAB means (L, a, b) and standard deviations >= 0."""
    params._field(mean, "3 numbers (the CIELAB means of L, a and b)", [(3,)])
    params._field(std, "3 numbers >= 0 (the CIELAB standard deviations of L, a and b)", [(3,)], minimum=0)


@dataclass(frozen=True)
class ReinhardParams(Params):
    """Fitted Reinhard normalization.

    Attributes
    ----------
    mean, std : (L, a, b)
        CIELAB statistics of the source's sampled pixels.
    target_mean, target_std : (L, a, b)
        The target's.
    glass : (low, high) or None
        Glass protection: a pixel whose darkest channel is at or above ``high`` is kept as it is, at or
        below ``low`` fully normalized, smoothly blended between; ``None``: every pixel normalized.
    """

    method = "reinhard"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    target_mean: tuple[float, ...] = ()
    target_std: tuple[float, ...] = ()
    glass: tuple[float, float] | None = None

    def _validate(self) -> None:
        super()._validate()
        _lab_stats_fields(self, "mean", "std")
        _lab_stats_fields(self, "target_mean", "target_std")
        if self.glass is not None:
            expected = "null or (low, high) levels with 0 <= low < high <= 256"
            low, high = self._field("glass", expected, [(2,)], minimum=0, maximum=256)
            if not low < high and np.isfinite([low, high]).all():
                _invalid(self, "glass", expected, f"({low:g}, {high:g})")

    def lab_map(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, shift)``: ``Lab' = scale * Lab + shift``. A channel without spread is only shifted."""
        std, tstd = np.asarray(self.std), np.asarray(self.target_std)
        scale = np.where(std > 1e-6, tstd / np.maximum(std, 1e-6), 1.0)
        return scale, np.asarray(self.target_mean) - scale * np.asarray(self.mean)

    def steps(self) -> list:
        """The per-pixel pipeline (see :mod:`._stain`)."""
        return _reinhard_steps(self)

    def weight_table(self) -> np.ndarray | None:
        """(1, 256) uint8 tissue weight of a pixel's darkest channel (255 = fully normalized)."""
        if self.glass is None:
            return None
        low, high = self.glass
        t = np.clip((high - np.arange(256.0)) / max(high - low, 1e-6), 0.0, 1.0)
        return np.floor(255.0 * t * t * (3.0 - 2.0 * t) + 0.5).astype(np.uint8)[np.newaxis]


# Quantization ranges of the Reinhard pipeline: XYZ / white in [0, 1]; companded f' in [F_LO, F_HI]
# (L' from about -130 to 275: colours mapped further out clip); linear RGB in [0, 1].
_F_LO, _F_HI = -1.0, 2.5


def _reinhard_steps(params: ReinhardParams) -> list:
    """sRGB -> linear -> XYZ/white -> f (cube root) -> affine (the Lab map) -> XYZ -> linear -> sRGB.

    In companded coordinates ``f`` the Lab map is affine: ``f' = A f + t`` with ``A = K^-1 diag(scale)
    K`` (``Lab = K f + c``). The shift ``t`` and the quantization offset of the next index are folded
    into the table of ``f`` (``f + d`` with ``A d = t + offset / s``).
    """
    scale, shift = params.lab_map()
    # K^-1 diag(scale) K, written out: f'_y takes f_y alone, f'_x and f'_z a multiple of f_y (zeros
    # exactly, so that the map is a ColumnMix)
    s_l, s_a, s_b = (float(v) for v in scale)
    a = np.array([[s_a, s_l - s_a, 0.0], [0.0, s_l, 0.0], [0.0, s_l - s_b, s_b]])
    t = np.linalg.solve(LAB_K, scale * LAB_C + shift - LAB_C)
    xyzn = RGB_TO_XYZ / WHITE_D65[:, np.newaxis]
    s1 = (N16 - 1) / xyzn.sum(axis=1)  # white (1, 1, 1) -> the last index
    s2 = (N16 - 1) / (_F_HI - _F_LO)
    d = np.linalg.solve(a, t - _F_LO)
    centres = (np.arange(N16) + 0.5)[np.newaxis, :]
    lin = srgb_to_linear(np.arange(256) / 255.0).astype(np.float32)[np.newaxis]
    f_table = (lab_f(centres / s1[:, np.newaxis]) + d[:, np.newaxis]).astype(np.float32)
    xyz_table = (lab_f_inverse(centres / s2 + _F_LO) * WHITE_D65[:, np.newaxis]).astype(np.float32)
    srgb_table = np.floor(linear_to_srgb(centres / (N16 - 1)) * 255.0 + 0.5).astype(np.uint8)
    return [
        pair_sum(lin, np.diag(s1) @ xyzn),
        ToIndex(),
        column_mix(f_table, s2 * a),
        ToIndex(),
        Lut(xyz_table),
        Recomb((N16 - 1) * np.linalg.inv(RGB_TO_XYZ)),
        ToIndex(),
        Lut(srgb_table),
    ]


def _lab_stats(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CIELAB means and standard deviations of ``(n, 3)`` pixels (n >= 1).

    In steps of 16 :data:`STEP` pixels, each step's mean and sum of squared deviations combined with
    the others' (Chan et al.'s pairwise update, as exact as a two-pass mean and deviation, to about
    1e-12 here): a few MB of temporaries at a time, where 2M pixels at once (48 MB a temporary) cost
    0.2-0.4 s in fresh memory, more than the arithmetic (0.12 s).
    """
    count, mean, m2 = 0, np.zeros(3), np.zeros(3)
    for start in range(0, pixels.shape[0], 16 * STEP):
        lab = rgb_to_lab(pixels[start : start + 16 * STEP])
        n = lab.shape[0]
        step_mean = lab.mean(axis=0)
        lab -= step_mean
        step_m2 = np.einsum("ij,ij->j", lab, lab)
        total = count + n
        delta = step_mean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + step_m2 + delta * delta * (count * n / total)
        count = total
    return mean, np.sqrt(m2 / count)


#: Width of the glass protection blend, and its top's distance below the glass level (levels of the
#: darkest channel; the margin covers the noise and JPEG ringing of glass).
GLASS_WIDTH = 35.0
GLASS_MARGIN = 10.0


def _glass_levels(option, sample: Sample) -> tuple[float, float] | None:
    """Resolve the ``glass`` option (see :class:`Reinhard`)."""
    if option != "auto":
        return option
    if sample.background is not None:
        level = min(sample.background[:3])
    else:
        level = float(np.percentile(darkest(_colour_pixels(sample, "reinhard")), 99))
    high = float(np.clip(level - GLASS_MARGIN, 150.0, 250.0))
    return (high - GLASS_WIDTH, high)


def _tissue(pixels: np.ndarray, method: str, glass: tuple[float, float] | None) -> np.ndarray:
    """The pixels the statistics are taken on: all, or (glass protection) those it does not keep."""
    # (the channels as columns: min(axis=1) and ptp over millions of 3-value rows took 0.13 s)
    low = darkest(pixels)
    stained = low < 205.0
    n = int(np.count_nonzero(stained))
    if n < MIN_STAINED_PIXELS:
        raise NoTissueError(
            None,
            f"{method}: only {n} of {pixels.shape[0]} pixels are tissue (darkest channel below 205); need "
            f"at least {MIN_STAINED_PIXELS}: the image is blank or all glass",
        )
    spread = (brightest(pixels) - low)[stained]
    if pixels.dtype == np.uint8:  # np.percentile's value, from the 256 counts instead of a partition
        spread_999 = percentile(np.bincount(spread, minlength=256), 99.9)
    else:
        spread_999 = float(np.percentile(spread, 99.9))
    if spread_999 <= GREY_SPREAD:  # (of the tissue: glass is grey)
        # a grey image stored as RGB has no chroma to map: Reinhard would tint it with the target's mean
        # colour, or, as a target, take the colour out of every image
        raise UnsupportedImageError(
            None,
            f"stain normalization ({method}) needs a colour image; this one is grey stored as RGB "
            f"(its channels differ by at most {GREY_SPREAD} levels)",
        )
    if glass is None:
        return pixels
    kept = np.compress(low < glass[1], pixels, axis=0)
    if kept.shape[0] < MIN_STAINED_PIXELS:
        # glass protection keeps the pixels at or above ``high`` as they are, and they are not counted
        raise NoTissueError(
            None,
            f"{method}: only {kept.shape[0]} of {pixels.shape[0]} pixels are darker than the glass "
            f"protection level (darkest channel below {glass[1]:g}); need at least {MIN_STAINED_PIXELS}: "
            "the image is too pale to fit on",
        )
    return kept


class Reinhard(Method):
    """Reinhard et al. (2001) colour transfer: match the mean and standard deviation of L, a and b.

    Parameters
    ----------
    target : ReinhardTarget
        The statistics to match (:meth:`fit_target` on reference images). Required by :meth:`fit`.
    glass : "auto", (float, float) or None
        Glass protection levels ``(low, high)`` of a pixel's darkest channel: pixels at or above
        ``high`` are kept, at or below ``low`` fully normalized, blended between (smoothstep).
        ``"auto"`` (default): ``high`` 10 levels below the glass level and ``low`` 35 below that, the
        glass level being the darkest channel of the slide's glass when the sample knows it
        (:attr:`Sample.background`), else the 99th percentile of the sampled pixels' darkest channel
        (the glass of a tile; on a tile without glass, its brightest 1 % are kept). Adapting to the
        image keeps the same tissue in the statistics when exposure changes. ``None`` normalizes
        every pixel (plain Reinhard, as torchstain).

    Notes
    -----
    Colour space: CIELAB, D65, as ``skimage.color.rgb2lab`` and torchstain's numpy backend (not
    OpenCV's 8-bit Lab). Statistics are over the sample's pixels (tissue only for slides) that glass
    protection does not keep (darkest channel below ``high``); with ``glass=None`` over every sampled
    pixel, as torchstain and StainTools on a tile. A channel without spread is shifted,
    not scaled. Output is rounded to uint8 (torchstain truncates). The linear Lab map would tint white
    glass (L = 100 goes wherever the tissue statistics send it); glass protection keeps 255 at 255.
    Reinhard does not separate stains: an eosin-only image is moved towards the target's mean colour.
    """

    name = "reinhard"
    params_type = ReinhardParams
    target_type = ReinhardTarget
    requires_reference = True
    sample_pixels = SAMPLE_PIXELS

    def __init__(self, target: ReinhardTarget | None = None, glass: str | tuple[float, float] | None = "auto"):
        if target is not None and not isinstance(target, ReinhardTarget):
            raise InvalidReferenceError(None, f"reinhard needs a reinhard target, not {type(target).__name__}")
        if glass is not None and glass != "auto":
            glass = (float(glass[0]), float(glass[1]))
            if not 0.0 <= glass[0] < glass[1] <= 256.0:
                raise ValueError(f"need 0 <= low < high <= 256 for glass, got {glass}")
        self.target, self.glass = target, glass

    def _stats(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        glass = _glass_levels(self.glass, sample)
        return _lab_stats(_tissue(_colour_pixels(sample, self.name), self.name, glass))

    def fit(self, sample: Sample) -> ReinhardParams:
        if self.target is None:
            raise InvalidReferenceError(
                None,
                "method 'reinhard' needs --reference: an image or a target JSON made by "
                "'vipsnorm fit --method reinhard'",
            )
        mean, std = self._stats(sample)
        return ReinhardParams(
            mean=_floats(mean),
            std=_floats(std),
            target_mean=self.target.mean,
            target_std=self.target.std,
            glass=_glass_levels(self.glass, sample),
        )

    def summarize(self, sample: Sample) -> "LabSummary":
        """This input's CIELAB tissue mean and standard deviation (what :meth:`fit_target` takes the
        medians of), instead of its pixels."""
        mean, std = self._stats(sample)
        return LabSummary(mean=mean, std=std, source=sample.source)

    def fit_target(self, samples: list) -> ReinhardTarget:
        """The median of the samples' Lab means and the median of their Lab standard deviations (each
        item a :class:`Sample` or its :meth:`summarize`)."""
        if not samples:
            raise ValueError("no samples to fit a target on")
        stats = [s if isinstance(s, LabSummary) else self.summarize(s) for s in samples]
        source = stats[0].source if len(stats) == 1 else f"median of {len(stats)} images"
        return ReinhardTarget(
            mean=_floats(np.median([s.mean for s in stats], axis=0)),
            std=_floats(np.median([s.std for s in stats], axis=0)),
            source=source or "image",
        )

    def apply(self, image: pyvips.Image, params: ReinhardParams) -> pyvips.Image:
        _check_image(image, self.name)
        fused = _native.map_image(image, ("reinhard", params), functools.partial(_program, params, params.weight_table()))
        if fused is not None:
            return fused
        out = run_image(image, params.steps())
        table = params.weight_table()
        if table is None:
            return out
        low = image[0].minpair(image[1]).minpair(image[2])
        weight = low.maplut(pyvips.Image.new_from_array(table.T[np.newaxis]))
        return blend_image(weight, out, image)

    def kernel_program(self, params: ReinhardParams) -> _native.Program | None:
        return _program(params, params.weight_table()) if _native.available() else None

    def apply_in_place(self, pixels: np.ndarray, params: ReinhardParams) -> bool:
        return _rgb(pixels) and _native.map_in_place(
            pixels, ("reinhard", params), functools.partial(_program, params, params.weight_table())
        )

    def apply_array(self, array: np.ndarray, params: ReinhardParams) -> np.ndarray:
        array = _check_array(array, self.name)
        fused = _native.map_array(array, ("reinhard", params), functools.partial(_program, params, params.weight_table()))
        if fused is not None:
            return fused
        out = run_array(array, _steps(params))
        table = params.weight_table()
        if table is None:
            return out
        return blend_array(take(table[0], darkest(array)), out, array)


# --- inspect -------------------------------------------------------------------------------------


def stain_summary(params: Params) -> dict[str, Any]:
    """What ``vipsnorm inspect`` shows of fitted stain parameters or a stain target."""
    r = lambda v: [round(float(x), 4) for x in v]  # noqa: E731
    if isinstance(params, (StainParams, MacenkoTarget)):
        out: dict[str, Any] = {
            "method": params.method,
            "hematoxylin": r(params.he[0]),
            "eosin": r(params.he[1]),
            "max_concentrations": {"hematoxylin": round(params.max_c[0], 4), "eosin": round(params.max_c[1], 4)},
        }
        if isinstance(params, StainParams):
            out["target"] = {
                "hematoxylin": r(params.target_he[0]),
                "eosin": r(params.target_he[1]),
                "max_concentrations": {
                    "hematoxylin": round(params.target_max_c[0], 4),
                    "eosin": round(params.target_max_c[1], 4),
                },
            }
            out["io"], out["stained_pixels"] = params.io, params.stained
            if isinstance(params, VahadaneParams):
                out["regularizer"] = params.regularizer
        else:
            out["source"] = params.source
        return out
    if isinstance(params, (ReinhardParams, ReinhardTarget)):
        out = {"method": params.method, "lab_mean": r(params.mean), "lab_std": r(params.std)}
        if isinstance(params, ReinhardParams):
            out["target"] = {"lab_mean": r(params.target_mean), "lab_std": r(params.target_std)}
            out["glass"] = None if params.glass is None else list(params.glass)
        else:
            out["source"] = params.source
        return out
    raise TypeError(f"not stain parameters: {type(params).__name__}")
