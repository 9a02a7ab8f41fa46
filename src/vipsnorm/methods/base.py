"""The method protocol: ``fit(sample) -> Params`` and ``apply(image, params)`` (lazy pyvips).

A :class:`Sample` holds the statistics fitting needs: the histograms of the (tissue) pixels that were
sampled. Methods never open files; :mod:`vipsnorm.sampling` builds samples from slides.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyvips

from .. import _native
from ..errors import UnsupportedImageError
from ._hist import _luma_program, apply_luts_array, apply_luts_image, histograms

__all__ = ["Sample", "Params", "LutParams", "Method", "LutMethod", "ROWS"]

#: Rows of :attr:`Sample.hist`.
ROWS = {"r": 0, "g": 1, "b": 2, "y": 3}


@dataclass(frozen=True, eq=False)
class Sample:
    """Histograms of sampled pixels.

    Attributes
    ----------
    hist : ndarray, shape (4, 256), float64
        Pixel counts per value for R, G, B and BT.601 luma Y. For grey images all four rows are the grey
        histogram.
    bands : int
        1 for grey sources, 3 for colour.
    source : str
        How the pixels were gathered (for reports).
    background : tuple of 4 floats, optional
        Median R, G, B, Y of the glass around the tissue (slides); ``None`` for images without glass.
        Matching maps the source's glass onto the target's, so glass stays glass.
    pixels : ndarray, shape (n, 3), uint8, optional
        A uniform random subsample of the same (tissue) pixels, for methods fitted on pixel colours
        rather than histograms (stain normalization). Gathered only when a method asks for it
        (:attr:`Method.sample_pixels`); not saved by :meth:`to_dict`.

    Notes
    -----
    The sample that :func:`vipsnorm.engine.fit_slide` hands to a method whose :attr:`Method.needs_luma`
    is False may leave the Y row of a colour image uncounted: every value NaN (see :attr:`luma_counted`),
    so that any use of it shows. Such a sample lives only for that one fit; every sample that is
    returned, saved or pooled has all four rows.
    """

    hist: np.ndarray
    bands: int = 3
    source: str = ""
    background: tuple[float, float, float, float] | None = None
    pixels: np.ndarray | None = None

    def __post_init__(self):
        hist = np.asarray(self.hist, dtype=np.float64)
        if hist.shape != (4, 256):
            raise ValueError(f"Sample.hist must have shape (4, 256), not {hist.shape}")
        object.__setattr__(self, "hist", hist)
        if self.background is not None:
            object.__setattr__(self, "background", tuple(float(v) for v in self.background))
        if self.pixels is not None:
            pixels = np.asarray(self.pixels)
            if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] not in (1, 3):
                raise ValueError(f"Sample.pixels must be uint8 of shape (n, 3) or (n, 1), not {pixels.dtype} {pixels.shape}")
            object.__setattr__(self, "pixels", pixels)

    @property
    def n(self) -> float:
        """Number of pixels (or total weight, for pooled samples)."""
        return float(self.hist[3].sum())

    @classmethod
    def from_array(cls, pixels: np.ndarray, source: str = "array") -> "Sample":
        """Histograms (and :attr:`pixels`) of every pixel of an ``(h, w)``, ``(h, w, 1)`` or
        ``(h, w, 3)`` uint8 array."""
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8:
            raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
        hist = histograms(pixels)
        bands = 1 if pixels.ndim == 2 or pixels.shape[-1] == 1 else 3
        return cls(hist, bands, source, pixels=pixels.reshape(-1, bands))

    @classmethod
    def pooled(cls, samples: Iterable["Sample"], source: str = "") -> "Sample":
        """One sample from many, each weighted equally whatever its pixel count (a dataset palette).

        Raises
        ------
        ValueError
            No samples, or one whose luma row is uncounted (:attr:`luma_counted`).
        """
        samples = list(samples)
        if not samples:
            raise ValueError("no samples to pool")
        if not all(s.luma_counted for s in samples):  # its NaN would make every pooled count NaN
            raise ValueError(
                "cannot pool a sample whose luma (Y) row was left uncounted (NaN); sample with "
                "sample_slide(..., luma=True), the default"
            )
        scale = np.mean([s.n for s in samples])
        hist = sum(s.hist / s.n for s in samples) * scale / len(samples)
        bands = 3 if any(s.bands == 3 for s in samples) else 1
        backgrounds = [s.background for s in samples if s.background is not None]
        background = tuple(np.median(backgrounds, axis=0)) if backgrounds else None
        # pixels: as many from each sample (the fewest any has), so each weighs the same here too
        with_pixels = [s.pixels for s in samples if s.pixels is not None and s.pixels.shape[0] > 0]
        pixels = None
        if with_pixels and len({p.shape[1] for p in with_pixels}) == 1:
            n = min(p.shape[0] for p in with_pixels)
            rng = np.random.default_rng(0)
            pixels = np.concatenate([p[np.sort(rng.choice(p.shape[0], n, replace=False))] for p in with_pixels])
        return cls(hist, bands, source or f"pooled from {len(samples)} images", background, pixels)

    @property
    def luma_counted(self) -> bool:
        """False when the Y row was left uncounted (NaN) for a fit that does not read it."""
        return not np.isnan(self.hist[3, 0])

    def _require_luma(self, what: str) -> None:
        """Raise ValueError when the Y row that ``what`` (a fit, named in the message) reads is uncounted."""
        if not self.luma_counted:
            raise ValueError(
                f"{what} reads the luma (Y) histogram, which this sample left uncounted (NaN); sample with "
                "sample_slide(..., luma=True), the default"
            )

    def is_flat(self) -> bool:
        """True when every channel holds a single value (an uncounted Y row aside: R, G and B each
        holding a single value make Y hold one too)."""
        rows = self.hist if self.luma_counted else self.hist[:3]
        return bool(all(np.count_nonzero(row) <= 1 for row in rows))

    def stats(self) -> dict[str, dict[str, float]]:
        """Per-channel mean, standard deviation, min, 2nd/50th/98th percentile and max."""
        from ._hist import percentile

        out = {}
        names = ["grey"] if self.bands == 1 else ["r", "g", "b", "y"]
        values = np.arange(256, dtype=np.float64)
        for name in names:
            counts = self.hist[ROWS.get(name, 3)]
            total = counts.sum()
            mean = float((counts * values).sum() / total)
            std = float(np.sqrt((counts * (values - mean) ** 2).sum() / total))
            present = np.nonzero(counts)[0]
            out[name] = {
                "mean": round(mean, 3),
                "std": round(std, 3),
                "min": int(present[0]),
                "p2": round(percentile(counts, 2), 3),
                "median": round(percentile(counts, 50), 3),
                "p98": round(percentile(counts, 98), 3),
                "max": int(present[-1]),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "bands": self.bands,
            "source": self.source,
            "background": None if self.background is None else list(self.background),
            "hist": [[float(v) for v in row] for row in self.hist],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Sample":
        """Rebuild a sample saved with :meth:`to_dict` (a ``match`` reference, a cached summary).

        Raises
        ------
        ValueError
            ``data`` is not what :meth:`to_dict` writes: not a dict, ``bands`` not 1 or 3, ``hist`` not
            4 rows of 256 finite counts >= 0 each with some counts (the luma row of a colour sample may
            be all NaN: uncounted, see :attr:`luma_counted`), ``background`` not 4 values in 0..255.
        KeyError
            ``hist`` or ``bands`` is missing.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a sample must be a JSON object, not {_json_kind(data)}")
        bands = data["bands"]
        if isinstance(bands, bool) or bands not in (1, 3):
            raise ValueError(f"sample 'bands' must be 1 (grey) or 3 (colour), not {_shown(bands)}")
        hist = _numbers(data["hist"], "sample 'hist'", "4 rows (R, G, B, luma Y) of 256 pixel counts >= 0", [(4, 256)], minimum=0)
        counted = hist[:3] if bands == 3 and np.isnan(hist[3]).all() else hist  # an uncounted Y row: all NaN
        if not np.isfinite(counted).all():
            raise ValueError(
                "sample 'hist' holds a count that is not a finite number (NaN or infinity); only the luma row "
                "of a colour sample may be all NaN (uncounted)"
            )
        empty = [name for name, row in zip("RGBY", counted) if not row.sum() > 0]
        if empty:
            raise ValueError(f"sample 'hist' must hold pixel counts in every row; row(s) {', '.join(empty)} hold none")
        background = data.get("background")
        if background is not None:
            background = _numbers(
                background, "sample 'background'", "4 numbers in 0..255 (the glass's median R, G, B, Y) or null",
                [(4,)], minimum=0, maximum=255,
            )
            if not np.isfinite(background).all():
                raise ValueError(f"sample 'background' holds a value that is not a finite number: {background.tolist()}")
        source = data.get("source", "")
        if not isinstance(source, str):
            raise ValueError(f"sample 'source' must be a string, not {_shown(source)}")
        return cls(hist, int(bands), source, None if background is None else tuple(background.tolist()))


@dataclass(frozen=True)
class Params:
    """Base of every method's fitted parameters: frozen, JSON-serializable, holding every fitted value.

    Parameters read from JSON are checked (:meth:`from_dict` calls :meth:`validate`): values of the
    wrong shape or range raise :class:`ValueError` naming the field and what it must be, so that a
    hand-written or tampered file is refused when it is read, not turned into a wrong image or an
    internal error later. Parameters built in code (by a fit, or per patch by an augmentation) are not
    checked on construction, which would cost 20-200 us each; call :meth:`validate` on hand-made ones.
    NaN and infinities are left to :meth:`is_finite` (a fit that produced one is refused by
    :func:`~vipsnorm.reference.save_reference`) and :meth:`from_dict`, which refuses them.
    """

    method: ClassVar[str]

    def validate(self) -> "Params":
        """Raise ValueError when a value is not one the method's fit makes and its apply step takes
        (the message names the field and what it must be); return the parameters unchanged."""
        self._validate()
        return self

    def _validate(self) -> None:
        """Raise ValueError when a value is not one the method's fit makes and its apply step takes.

        Subclasses check their fields with :meth:`_field` (and :func:`_invalid` for relations between
        fields), calling ``super()._validate()``.
        """

    def _field(self, name: str, expected: str, shapes, **bounds) -> np.ndarray:
        """Field ``name`` as a float64 array, checked by :func:`_numbers` (``expected`` describes it)."""
        return _numbers(getattr(self, name), _what(self, name), expected, shapes, **bounds)

    def _choice(self, name: str, choices: tuple[str, ...]) -> str:
        """Field ``name``, which must be one of the strings ``choices``."""
        value = getattr(self, name)
        if not isinstance(value, str) or value not in choices:
            _invalid(self, name, "one of " + ", ".join(map(repr, choices)), _shown(value))
        return value

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **_jsonable(dataclasses.asdict(self))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Params":
        """Rebuild parameters saved with :meth:`to_dict`.

        Raises
        ------
        ValueError
            ``data`` is not a dict, names another method, holds unknown fields, a NaN or an infinity, or
            a value :meth:`_validate` refuses; the message names the field.
        """
        name = getattr(cls, "method", cls.__name__)
        if not isinstance(data, dict):
            raise ValueError(f"{name} parameters must be a JSON object, not {_json_kind(data)}")
        if data.get("method", name) != name:
            raise ValueError(f"expected {name} parameters, not {_shown(data['method'])}")
        data = {k: v for k, v in data.items() if k != "method"}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(fields)
        if unknown:
            raise ValueError(f"unknown {name} parameters: {sorted(unknown)}")
        for key, value in data.items():
            if not _finite(value):
                raise ValueError(f"{name} parameter {key!r} holds a value that is not a finite number (NaN or infinity)")
        return cls(**{k: _tupled(v) for k, v in data.items()}).validate()

    def is_finite(self) -> bool:
        """True when every number the parameters hold is finite (no NaN, no infinity)."""
        return _finite(_jsonable(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


@dataclass(frozen=True)
class LutParams(Params):
    """Parameters of a method whose apply step is a lookup table (stretch, equalize, match)."""

    space: str

    #: The values of :attr:`space` the method's fit makes; ``"rgb"`` goes with three LUTs, the others one.
    spaces: ClassVar[tuple[str, ...]] = ("luminance", "rgb")

    @abstractmethod
    def luts(self) -> np.ndarray:
        """uint8 LUTs, shape (1, 256) or (3, 256)."""

    def _validate(self) -> None:
        super()._validate()
        self._choice("space", self.spaces)

    def _rows(self, name: str, rows: int) -> None:
        """Refuse ``rows`` LUTs (or values of field ``name``) that :attr:`space` does not take."""
        want = 3 if self.space == "rgb" else 1
        if rows != want:
            _invalid(self, name, f"{want} row{'s' if want > 1 else ''} for space {self.space!r} (one per LUT)", f"{rows}")

    def _lut_field(self, name: str = "lut") -> np.ndarray:
        """Field ``name``: 1 or 3 LUTs (as :attr:`space` says) of 256 integers in 0..255."""
        luts = self._field(name, "1 or 3 rows (LUTs) of 256 integers in 0..255", [(1, 256), (3, 256)], integer=True, minimum=0, maximum=255)
        self._rows(name, luts.shape[0])
        return luts


class Method(ABC):
    """A normalization method: options in the constructor, ``fit`` then ``apply``."""

    name: ClassVar[str]
    params_type: ClassVar[type[Params]]
    #: How many tissue pixels :meth:`fit` needs in :attr:`Sample.pixels` (0: histograms suffice).
    sample_pixels: ClassVar[int] = 0
    #: What the method maps images onto (match: a :class:`Sample` palette; stain methods: their stain
    #: target), or None when fitted parameters stand on their own (stretch, equalize). Methods with a
    #: target take it as the first constructor argument and build one with :meth:`fit_target`.
    target_type: ClassVar[type | None] = None
    #: True when the method needs ``--reference`` (it has no default target).
    requires_reference: ClassVar[bool] = False
    #: Spatial methods (clahe) are fitted on the whole level-0 image by ``fit_level``, not on a Sample.
    spatial: ClassVar[bool] = False

    @property
    def needs_luma(self) -> bool:
        """Whether :meth:`fit` reads the Y row (``hist[3]``) of a colour :class:`Sample`. When False,
        :func:`vipsnorm.engine.fit_slide` lets the sampler leave it uncounted (NaN) where counting it is
        extra work (the luma of a small image held in memory: about 1 ms of a 512x512 tile's 8).
        Default True; a method that says False must also not read :attr:`Sample.n`."""
        return True

    def fit_target(self, samples: list):
        """The target that the samples of one or many reference images define (``vipsnorm fit``); each
        item a :class:`Sample` or its :meth:`summarize`."""
        raise TypeError(f"method {self.name!r} maps onto no target")

    def summarize(self, sample: Sample):
        """What :meth:`fit_target` (or the pooling of a dataset fit) needs of one input's sample, small
        enough to hold for every input of a dataset: ``vipsnorm fit`` computes it where the input was
        sampled (a worker) and keeps only this. Default: the sample without its :attr:`Sample.pixels`.

        Raises the method's errors for an input it cannot use (a stain method on one stain, say)."""
        return sample if sample.pixels is None else dataclasses.replace(sample, pixels=None)

    def kernel_program(self, params: Params):
        """The native kernel's :class:`~vipsnorm._native.Program` of :meth:`apply` on a uchar RGB image
        under ``params``, the same bytes (see :mod:`vipsnorm._native`), or ``None``: the kernel is off,
        or this method's map is not one it runs (the default)."""
        return None

    @abstractmethod
    def fit(self, sample: Sample) -> Params:
        """Fit on the statistics of the sampled pixels."""

    @abstractmethod
    def apply(self, image: pyvips.Image, params: Params) -> pyvips.Image:
        """Return the lazily normalized image (uchar, same bands)."""

    @abstractmethod
    def apply_array(self, array: np.ndarray, params: Params) -> np.ndarray:
        """The same transform on a uint8 numpy array (patches, augmentations, tests)."""

    def apply_in_place(self, pixels: np.ndarray, params: Params) -> bool:
        """Map ``pixels``, a writable C-contiguous uint8 ``(h, w, bands)`` array, in place with the native
        kernel, to the bytes :meth:`apply` gives; False, the pixels untouched, where there is no such
        path (the kernel off, a method it does not run: the default). For an image held decoded in
        memory (:meth:`~vipsnorm.io.slide.Slide.take_decoded`), which then needs no libvips pipeline."""
        return False


class LutMethod(Method):
    """A method whose apply step is :func:`apply_luts_image` of its params' LUTs."""

    def apply(self, image: pyvips.Image, params: LutParams, luma: np.ndarray | None = None) -> pyvips.Image:
        """:func:`apply_luts_image`; ``luma``: the luma of ``image`` already computed in numpy (an
        ``(h, w)`` uint8 array, :func:`~vipsnorm.methods._hist.luma_array`, e.g.
        :meth:`~vipsnorm.io.slide.Slide.decoded_luma`), used by a luminance apply instead of computing
        it again in libvips: the same pixels (the two lumas are equal bit for bit), about 1 ms less on a
        512x512 tile (not needed when the native kernel maps the image: see :mod:`vipsnorm._native`).

        Raises
        ------
        UnsupportedImageError
            ``image`` is not uchar with 1 (grey) or 3 (RGB) bands (alpha, 16-bit, float: convert it as
            :func:`vipsnorm.open` does), or per-channel LUTs meet a grey image.
        """
        if image.format != "uchar" or image.bands not in (1, 3):
            raise UnsupportedImageError(
                None,
                f"{self.name} needs an 8-bit (uchar) grey or RGB image, not {image.format} with {image.bands} bands; "
                "convert it first (alpha flattened, 16-bit scaled to 8 bits), as vipsnorm.open does",
            )
        return apply_luts_image(image, _luts_for(params, image.bands, self.name), params.space, luma)

    def kernel_program(self, params: LutParams):
        """The kernel's program of a luminance LUT (hue kept); ``None`` for per-channel LUTs, which
        libvips maps in one operation."""
        return _kernel_luma_program(self, params)

    def apply_in_place(self, pixels: np.ndarray, params: LutParams) -> bool:
        if type(self).apply is not LutMethod.apply:  # (a subclass that maps otherwise: its apply decides)
            return False
        if not _native.available() or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] not in (1, 3):
            return False
        bands = pixels.shape[-1]
        luts = np.asarray(_luts_for(params, bands, self.name), dtype=np.uint8).reshape(-1, 256)
        # the branches of apply_luts_image
        if params.space == "luminance" and bands == 3:
            done = _native.apply_luma(pixels, luts[0], out=pixels)
        elif params.space == "rgb" and bands == 3:
            done = _native.apply_luts(pixels, luts, out=pixels)
        else:
            done = _native.apply_luts(pixels, luts[:1], out=pixels)
        return done is not None

    def apply_array(self, array: np.ndarray, params: LutParams) -> np.ndarray:
        """The same transform on a uint8 ``(h, w)``, ``(h, w, 1)`` or ``(h, w, 3)`` array.

        Raises
        ------
        TypeError
            The array is not uint8.
        UnsupportedImageError
            Not one of those shapes (alpha: flatten it first), or per-channel LUTs meet a grey image.
        """
        array = np.asarray(array)
        if array.dtype != np.uint8:
            raise TypeError(f"{self.name} needs uint8 pixels, not {array.dtype}; scale to 0..255 and round first")
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3))):
            raise UnsupportedImageError(
                None,
                f"{self.name} needs an (h, w), (h, w, 1) or (h, w, 3) array, not shape {array.shape}; "
                "flatten alpha (or drop extra bands) first",
            )
        bands = 1 if array.ndim == 2 else array.shape[-1]
        return apply_luts_array(array, _luts_for(params, bands, self.name), params.space)


def _kernel_luma_program(method: LutMethod, params: LutParams):
    if getattr(params, "space", None) != "luminance" or not _native.available():
        return None
    return _luma_program(np.asarray(_luts_for(params, 3, method.name), dtype=np.uint8).reshape(-1, 256)[0])


def _luts_for(params: LutParams, bands: int, method: str) -> np.ndarray:
    """``params.luts()``, refusing per-channel LUTs that differ for a grey image (which channel's?)."""
    luts = params.luts()
    if bands == 1 and luts.shape[0] > 1 and not (luts == luts[:1]).all():
        single = next(space for space in type(params).spaces if space != "rgb")  # the method's one-LUT mode
        raise UnsupportedImageError(
            None,
            f"{method} parameters fitted per channel (mode rgb) on colour images cannot be applied to a grey "
            f"image: fit them on grey images, or use mode {single}",
        )
    return luts


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _tupled(value):
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def _numbers(value, what: str, expected: str, shapes, *, integer: bool = False, minimum=None, maximum=None, above=None, below=None) -> np.ndarray:
    """``value`` as a float64 array, or ValueError ``"<what> must be <expected>; got ..."``.

    Parameters
    ----------
    value
        A number or a nest of sequences of numbers (booleans and strings are refused).
    what, expected : str
        Names the value (``"stretch parameter 'lo'"``) and says what it must be, for the message.
    shapes : list of tuples
        The shapes allowed (``()`` for a scalar).
    integer : bool
        Refuse floats (JSON ``1.0`` included): the values index or count.
    minimum, maximum, above, below : float, optional
        Bounds: inclusive (``minimum``, ``maximum``) and exclusive (``above``, ``below``).

    Notes
    -----
    NaN and infinities pass the bounds: whether every value is finite is for :meth:`Params.is_finite`
    and :meth:`Params.from_dict` (or the caller) to say, with their own message.
    """
    try:
        array = np.asarray(value)
    except ValueError:  # ragged nesting
        array = np.asarray(None)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{what} must be {expected}; got {_shown(value)}")
    if array.shape not in [tuple(s) for s in shapes]:
        shown = repr(_jsonable(value))
        raise ValueError(f"{what} must be {expected}; got shape {array.shape}" + (f": {shown}" if len(shown) <= 60 else ""))
    if integer and array.dtype.kind == "f":
        raise ValueError(f"{what} must be {expected}; got non-integers: {_shown(value)}")
    array = array.astype(np.float64)
    finite = np.isfinite(array)
    for bound, outside, rule in (
        (minimum, np.less, ">= {}"),
        (maximum, np.greater, "<= {}"),
        (above, np.less_equal, "> {}"),
        (below, np.greater_equal, "< {}"),
    ):
        if bound is not None:
            bad = finite & outside(array, bound)
            if bad.any():
                raise ValueError(f"{what} must be {expected}; got {array[bad][0]:g} (need {rule.format(bound)})")
    return array


def _invalid(params: "Params", name: str, expected: str, got: str):
    """Raise the ValueError of field ``name`` of ``params``: what it must be, what it is."""
    raise ValueError(f"{_what(params, name)} must be {expected}; got {got}")


def _what(params: "Params", name: str) -> str:
    return f"{getattr(params, 'method', type(params).__name__)} parameter {name!r}"


def _shown(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(_jsonable(value))
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _json_kind(value) -> str:
    """What JSON calls the type of a decoded value (for "must be a JSON object, not ...")."""
    for kind, name in ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string"), ((int, float), "number")):
        if isinstance(value, kind):
            return f"a JSON {name} ({_shown(value, 30)})"
    return "null" if value is None else type(value).__name__


def _finite(value) -> bool:
    """False when ``value`` (a JSON-like nest of dicts, lists and scalars) holds a NaN or an infinity."""
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, (float, np.floating)):
        return bool(np.isfinite(value))
    return True
