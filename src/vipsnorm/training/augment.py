"""Random training-time augmentations built on the normalization methods.

Each transform is thin, in the style of albumentations and torchvision v2: :meth:`Augmentation.draw`
takes its random parameters from an explicit :class:`numpy.random.Generator`, then a pure function of
this module (:func:`stretch`, :func:`equalize`, :func:`clahe`, :func:`match`, :func:`stain_jitter`) maps
the image with the same numpy code path the method applies to slides (``fit`` on
:meth:`Sample.from_array <vipsnorm.methods.Sample.from_array>` or ``fit_array``, then ``apply_array``;
for equalization and CLAHE their ``fit_apply_array``, the two in one call, bit for bit, without building
the statistics and parameters a slide needs). So an augmentation at fixed parameters *is* the method's
numpy path (``apply_array``) on that patch: nothing is re-implemented. Equalization and CLAHE then equal
OpenCV (``equalizeHist``, ``createCLAHE``) bit for bit. ``vipsnorm normalize`` runs the method's libvips
pipeline instead (``apply``), which for the per-pixel methods gives the same values, but for CLAHE
rounds an interpolated value that falls on (or within float error of) a half-integer up where the numpy
path and OpenCV round it to even: a patch of :func:`clahe` and the same image through ``normalize
--method clahe`` (same clip limit, grid and mode) differ by one grey level on such values (about 1% of
them on an H&E tile), never more.

Transforms are plain callables ``t(image, rng=None)``: they work in :class:`Compose` here, which passes
one generator through, and in ``torchvision.transforms.Compose``, which calls ``t(image)``: each member
then draws from its own generator (made from its ``seed``). The datasets of :mod:`.datasets` with
``seed`` give every patch its own generator, so runs are reproducible with any number of loader workers,
but only through a transform that takes ``rng``: :class:`Compose` here does, torchvision's does not (its
members' draws then depend on the workers: every DataLoader worker holds a copy of the generators in the
same state; the dataset warns).

Notes
-----
Images are uint8 numpy arrays, ``(h, w, 3)`` RGB (gamma-encoded sRGB, as decoded) or grey ``(h, w)`` /
``(h, w, 1)``; the output has the input's shape and dtype. Statistics are those of the patch itself
(every pixel, glass included: a patch has no tissue mask). A patch a method cannot fit (a flat patch for
stretch or equalization, a grey or unstained one for stain jitter) is returned unchanged, never an error
in the middle of training.
"""

from __future__ import annotations

import inspect
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import VipsnormError
from .. import _native
from ..methods import Clahe, Equalize, Macenko, Match, Sample, Stretch
from ..methods._hist import band_keys, keyed_counts, take_keyed
from ..methods.stain import MacenkoParams, macenko_stains
from ..synth import DEFAULT_STAINS

__all__ = [
    "Augmentation",
    "Compose",
    "RandomStretch",
    "RandomEqualization",
    "RandomClahe",
    "RandomHistogramMatch",
    "RandomStainJitter",
    "stretch",
    "equalize",
    "clahe",
    "match",
    "stain_jitter",
    "stain_matrix",
    "HED_STAINS",
]

#: Ruifrok & Johnston optical-density vectors of hematoxylin, eosin and DAB (unit length, rows), as
#: ``skimage.color.rgb_from_hed``; H and E are :data:`vipsnorm.synth.DEFAULT_STAINS`.
HED_STAINS = np.stack(
    [DEFAULT_STAINS[:, 0], DEFAULT_STAINS[:, 1], np.array([0.27, 0.57, 0.78]) / np.linalg.norm([0.27, 0.57, 0.78])]
)
#: Length of the third (residual) stain vector added to fitted H and E (see :func:`stain_jitter`).
_RESIDUAL = 0.05


def _image(image) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise TypeError(f"augmentations take uint8 images, not {a.dtype} (scale floats to 0..255 and round first)")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3))) or a.size == 0:
        raise ValueError(f"augmentations take (h, w), (h, w, 1) or (h, w, 3) images, not shape {a.shape}")
    return a


def _quiet(fit: Callable[[], Any]) -> Any:
    # a flat patch makes stretch/equalize warn and keep it unchanged: expected here, not worth a warning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fit()


# --------------------------------------------------------------------------------------------------
# pure functions: one method, fixed parameters, one patch


def stretch(image: np.ndarray, low: float = 2.0, high: float = 98.0, mode: str = "joint") -> np.ndarray:
    """:class:`~vipsnorm.methods.Stretch` ``(low, high, mode)`` fitted on the patch and applied to it."""
    image = _image(image)
    method = Stretch(low, high, mode)
    return method.apply_array(image, _quiet(lambda: method.fit(Sample.from_array(image))))


def equalize(image: np.ndarray, mode: str = "luminance") -> np.ndarray:
    """:class:`~vipsnorm.methods.Equalize` ``(mode)`` fitted on the patch and applied to it
    (``fit_apply_array``): OpenCV's ``equalizeHist`` per channel in ``rgb`` mode, on the BT.601 luma in
    ``luminance`` mode."""
    image = _image(image)
    method = Equalize(mode)
    if mode == "rgb" and image.ndim == 3 and image.shape[-1] == 3 and not _native.available():
        # fit_apply_array's rgb path, with each value keyed by its band once: the keys are counted (the
        # three histograms in one pass) and then mapped through the three LUTs (one table) alike (with
        # the native kernel, fit_apply_array counts and maps in C)
        keys = band_keys(image)
        return take_keyed(_quiet(lambda: method._luts(keyed_counts(keys))), keys, image.shape)
    return _quiet(lambda: method.fit_apply_array(image))


def clahe(
    image: np.ndarray, clip_limit: float = 2.0, grid: tuple[int, int] = (8, 8), mode: str = "luminance"
) -> np.ndarray:
    """:class:`~vipsnorm.methods.Clahe` on the patch (``fit_apply_array``: ``fit_array`` then
    ``apply_array``): OpenCV's ``createCLAHE(clip_limit, grid)`` per channel (``rgb``) or on the luma
    (``luminance``)."""
    image = _image(image)
    return _quiet(lambda: Clahe(clip_limit=clip_limit, grid=grid, mode=mode).fit_apply_array(image))


def match(image: np.ndarray, reference: Sample, mode: str = "rgb") -> np.ndarray:
    """:class:`~vipsnorm.methods.Match` onto ``reference`` (a :class:`Sample`: ``Sample.from_array``
    of a reference image, or a palette from ``vipsnorm fit``), fitted on the patch and applied to it."""
    image = _image(image)
    method = Match(reference, mode)
    return method.apply_array(image, method.fit(Sample.from_array(image)))


def stain_matrix(image: np.ndarray, stains: str = "fit", io: float = 240.0) -> tuple[np.ndarray, np.ndarray] | None:
    """The 3 x 3 optical-density stain matrix ``W`` (rows: hematoxylin, eosin, a third vector) and its
    99th-percentile concentrations used by :func:`stain_jitter`; None when the patch cannot be unmixed.

    ``stains="fit"``: H and E fitted on the patch by :func:`~vipsnorm.methods.stain.macenko_stains`
    (None for a grey patch, or one with too few stained pixels or a single stain); the third row is
    their normalized cross product, short (length 0.05), so that the optical density that is neither H
    nor E is kept. ``stains="hed"``: the fixed Ruifrok & Johnston H, E and DAB vectors
    (:data:`HED_STAINS`), concentrations 1.
    """
    if stains == "hed":
        return HED_STAINS, np.ones(3)
    if stains != "fit":
        raise ValueError(f"stains must be 'fit' or 'hed', not {stains!r}")
    if image.ndim != 3 or image.shape[-1] != 3:
        return None
    try:
        he, max_c, _ = macenko_stains(image.reshape(-1, 3), io)
    except VipsnormError:  # no tissue, one stain only: nothing to jitter
        return None
    residual = np.cross(he[:, 0], he[:, 1])
    residual *= _RESIDUAL / np.linalg.norm(residual) * (1.0 if residual.sum() >= 0 else -1.0)
    return np.stack([he[:, 0], he[:, 1], residual]), np.array([max_c[0], max_c[1], 1.0])


def stain_jitter(
    image: np.ndarray,
    scale: Sequence[float] = (1.0, 1.0),
    shift: Sequence[Sequence[float]] = ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    stains: str = "fit",
    io: float = 240.0,
) -> np.ndarray:
    """Change the amounts and colours of hematoxylin and eosin in optical-density space.

    Parameters
    ----------
    scale : (float, float)
        Factors on the concentrations of H and E.
    shift : ((3 floats), (3 floats))
        Added to the unit optical-density vectors of H and E (negative components are clipped to 0,
        then each vector is normalized again): the stains' colours change.
    stains : {"fit", "hed"}
        The stain matrix (:func:`stain_matrix`): Macenko's fitted on the patch, or fixed Ruifrok &
        Johnston H, E and DAB (HED jitter, the multiplicative part of Tellez et al. 2018).
    io : float
        Transmitted light intensity (glass), as :class:`~vipsnorm.methods.Macenko`.

    Notes
    -----
    This is the Macenko method's own map, ``OD' = W'^T diag(scale) W^-T OD`` with the source matrix
    ``W`` and a target ``W'`` (the jittered vectors, concentrations ``scale`` times the source's),
    applied by :meth:`Macenko.apply_array <vipsnorm.methods.Macenko.apply_array>` with a three-row
    :class:`~vipsnorm.methods.stain.MacenkoParams`. At ``scale=(1, 1)`` and no shift it is the
    identity up to Macenko's arithmetic: ``I + 1`` (the ``I + 1`` of its optical density), at most 255.
    A patch :func:`stain_matrix` cannot unmix is returned unchanged.
    """
    image = _image(image)
    fitted = stain_matrix(image, stains, io)
    if fitted is None:
        return image
    w, max_c = fitted
    scale = np.asarray(scale, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    if scale.shape != (2,) or np.any(scale <= 0) or shift.shape != (2, 3):
        raise ValueError(f"need 2 positive scales and a (2, 3) shift, not {scale.tolist()} and {shift.tolist()}")
    target = w.copy()
    moved = np.maximum(w[:2] + shift, 0.0)
    norms = np.linalg.norm(moved, axis=1, keepdims=True)
    target[:2] = np.where(norms > 1e-6, moved / np.maximum(norms, 1e-6), w[:2])
    target_max_c = max_c * np.array([scale[0], scale[1], 1.0])
    params = MacenkoParams(
        he=tuple(map(tuple, w.tolist())),
        max_c=tuple(max_c.tolist()),
        target_he=tuple(map(tuple, target.tolist())),
        target_max_c=tuple(target_max_c.tolist()),
        io=float(io),
    )
    try:
        return Macenko(io=io).apply_array(image, params)
    except VipsnormError:  # target vectors that are no optical densities (a degenerate fit)
        return image


# --------------------------------------------------------------------------------------------------
# the thin classes


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _range(name: str, value, lo: float = -math.inf, hi: float = math.inf) -> tuple[float, float]:
    """A ``(low, high)`` range (a single number is the range of one value), checked within [lo, hi]."""
    a, b = (float(value), float(value)) if np.ndim(value) == 0 else (float(value[0]), float(value[1]))
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{name} must be a range (low, high) with {lo:g} <= low <= high <= {hi:g}, not {value!r}")
    return a, b


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    return lo if lo == hi else float(rng.uniform(lo, hi))


class Augmentation(ABC):
    """A random transform: with probability ``p`` draw parameters (:meth:`draw`) and apply them
    (:meth:`apply`, a pure function of the image and the parameters); otherwise return the image.

    Parameters
    ----------
    p : float
        Probability of applying the transform to an image.
    seed : int, numpy.random.Generator or None
        The generator used when a call gives none (``t(image)``): seeded runs are reproducible.
    """

    def __init__(self, p: float = 1.0, seed: int | np.random.Generator | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability within 0..1, not {p}")
        self.p = float(p)
        self.seed = seed
        self.rng = _rng(seed)

    def draw(self, rng: np.random.Generator) -> dict[str, Any] | None:
        """The parameters of one application, or None when it is skipped (probability ``1 - p``).
        Always takes one uniform number for the probability first, so a stream of draws does not
        depend on ``p``'s outcome."""
        if rng.random() >= self.p:
            return None
        return self._draw(rng)

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        return {}

    @abstractmethod
    def apply(self, image: np.ndarray, **params) -> np.ndarray:
        """The transform at fixed ``params`` (what :meth:`draw` returns)."""

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        image = _image(image)
        params = self.draw(self.rng if rng is None else rng)
        return image if params is None else self.apply(image, **params)

    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain JSON data (``type(t)(**t.config())`` is the same transform;
        the seed is kept only when it is an integer)."""
        return {"p": self.p, "seed": self.seed if isinstance(self.seed, int) else None}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k not in ("references",))
        return f"{type(self).__name__}({args})"


class RandomStretch(Augmentation):
    """Random linear contrast stretch: percentiles ``low`` and ``high`` drawn uniformly from their
    ranges, then :func:`stretch` (:class:`~vipsnorm.methods.Stretch`).

    Parameters
    ----------
    low, high : (float, float) or float
        Ranges of the lower and upper percentiles (0..100; every ``low`` below every ``high``).
    mode : {"joint", "rgb"}
    """

    def __init__(self, low=(0.0, 5.0), high=(95.0, 100.0), mode: str = "joint", p: float = 1.0, seed=None):
        super().__init__(p, seed)
        self.low, self.high = _range("low", low, 0.0, 100.0), _range("high", high, 0.0, 100.0)
        if self.low[1] >= self.high[0]:
            raise ValueError(f"every low percentile must be below every high one: low {self.low}, high {self.high}")
        Stretch(self.low[0], self.high[1], mode)  # checks the mode
        self.mode = mode

    def _draw(self, rng):
        return {"low": _uniform(rng, self.low), "high": _uniform(rng, self.high)}

    def apply(self, image, low: float, high: float):
        return stretch(image, low, high, self.mode)

    def config(self):
        return {"low": list(self.low), "high": list(self.high), "mode": self.mode, **super().config()}


class RandomEqualization(Augmentation):
    """Histogram equalization of the patch with probability ``p`` (:func:`equalize`,
    :class:`~vipsnorm.methods.Equalize`): ``mode="luminance"`` (hue kept) or ``"rgb"`` (per channel)."""

    def __init__(self, mode: str = "luminance", p: float = 0.5, seed=None):
        super().__init__(p, seed)
        Equalize(mode)
        self.mode = mode

    def apply(self, image):
        return equalize(image, self.mode)

    def config(self):
        return {"mode": self.mode, **super().config()}


class RandomClahe(Augmentation):
    """CLAHE with a clip limit drawn uniformly from ``clip_limit`` (:func:`clahe`,
    :class:`~vipsnorm.methods.Clahe`, OpenCV's semantics) on a ``grid`` of regions (cols, rows).

    At a fixed clip limit it equals OpenCV's ``createCLAHE`` bit for bit (the method's numpy path);
    ``vipsnorm normalize --method clahe`` (the libvips path) differs from it by one grey level on values
    that fall on a half-integer (see the module notes)."""

    def __init__(self, clip_limit=(1.0, 4.0), grid=(8, 8), mode: str = "luminance", p: float = 1.0, seed=None):
        super().__init__(p, seed)
        self.clip_limit = _range("clip_limit", clip_limit, 0.0)
        Clahe(self.clip_limit[0], grid=grid, mode=mode)  # checks grid and mode
        self.grid = (int(grid[0]), int(grid[1]))
        self.mode = mode

    def _draw(self, rng):
        return {"clip_limit": _uniform(rng, self.clip_limit)}

    def apply(self, image, clip_limit: float):
        return clahe(image, clip_limit, self.grid, self.mode)

    def config(self):
        return {"clip_limit": list(self.clip_limit), "grid": list(self.grid), "mode": self.mode, **super().config()}


def _reference_sample(reference) -> Sample:
    if isinstance(reference, Sample):
        return reference
    if isinstance(reference, dict):
        return Sample.from_dict(reference)
    return Sample.from_array(_image(reference), source="reference image")


class RandomHistogramMatch(Augmentation):
    """Histogram matching (:func:`match`, :class:`~vipsnorm.methods.Match`) onto one of several
    references, drawn uniformly.

    Parameters
    ----------
    references : sequence
        uint8 images (loaded by the caller), :class:`~vipsnorm.methods.Sample` palettes (e.g. a
        ``vipsnorm fit`` reference's), or their ``to_dict()``.
    mode : {"rgb", "luminance"}
    """

    def __init__(self, references: Sequence, mode: str = "rgb", p: float = 1.0, seed=None):
        super().__init__(p, seed)
        self.references = [_reference_sample(r) for r in references]
        if not self.references:
            raise ValueError("RandomHistogramMatch needs at least one reference")
        Match(self.references[0], mode)
        self.mode = mode

    def _draw(self, rng):
        return {"reference": int(rng.integers(len(self.references)))}

    def apply(self, image, reference: int):
        return match(image, self.references[reference], self.mode)

    def config(self):
        return {"references": [r.to_dict() for r in self.references], "mode": self.mode, **super().config()}


class RandomStainJitter(Augmentation):
    """Random H&E stain jitter in optical-density space (:func:`stain_jitter`): each stain's
    concentration scaled by a factor drawn uniformly from ``scale``, and each component of its unit
    optical-density vector moved by a shift drawn uniformly from ``[-shift, shift]``.

    Parameters
    ----------
    scale : (float, float) or float
        Range of the concentration factors (positive), drawn for H and E independently.
    shift : float
        Largest change of a stain vector's component (0: colours kept, only amounts change).
    stains : {"fit", "hed"}
        Macenko stain vectors fitted on each patch, or the fixed Ruifrok & Johnston HED matrix.
    """

    def __init__(self, scale=(0.8, 1.2), shift: float = 0.05, stains: str = "fit", p: float = 1.0, seed=None):
        super().__init__(p, seed)
        self.scale = _range("scale", scale, 0.0)
        if self.scale[0] <= 0:
            raise ValueError(f"scale factors must be positive, not {scale!r}")
        if np.ndim(shift) != 0:
            raise ValueError(f"shift is one number, the largest change of a stain vector component, not {shift!r}")
        self.shift = _range("shift", shift, 0.0, 1.0)[1]
        if stains not in ("fit", "hed"):
            raise ValueError(f"stains must be 'fit' or 'hed', not {stains!r}")
        self.stains = stains

    def _draw(self, rng):
        scale = [_uniform(rng, self.scale) for _ in range(2)]
        shift = rng.uniform(-self.shift, self.shift, (2, 3)) if self.shift > 0 else np.zeros((2, 3))
        return {"scale": scale, "shift": shift.tolist()}

    def apply(self, image, scale, shift):
        return stain_jitter(image, scale, shift, self.stains)

    def config(self):
        return {"scale": list(self.scale), "shift": self.shift, "stains": self.stains, **super().config()}


def takes_rng(transform: Callable) -> bool:
    """True when ``transform`` accepts an ``rng`` keyword (the augmentations and :class:`Compose` here)."""
    if isinstance(transform, (Augmentation, Compose)):
        return True
    try:
        return "rng" in inspect.signature(transform).parameters
    except (TypeError, ValueError):
        return False


class Compose:
    """Apply ``transforms`` in order, passing one generator to those that take ``rng``.

    Unlike ``torchvision.transforms.Compose`` it takes ``rng`` itself, so a dataset with ``seed``
    (:mod:`.datasets`) hands each item's generator to every vipsnorm augmentation in it: use it for
    results that do not depend on the number of loader workers. Members without ``rng`` (torchvision's
    transforms, say) are called as ``t(image)``."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)
        self._takes_rng = [takes_rng(t) for t in self.transforms]

    def __call__(self, image, rng: np.random.Generator | None = None):
        for transform, with_rng in zip(self.transforms, self._takes_rng):
            image = transform(image, rng=rng) if with_rng and rng is not None else transform(image)
        return image

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"
