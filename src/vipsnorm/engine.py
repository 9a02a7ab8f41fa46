"""Normalize files: open, fit (or use a reference), apply lazily, write atomically.

This is the layer the command line calls; it is the only one that both reads and writes files.
"""

from __future__ import annotations

import inspect
import os
import time
from typing import Any
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyvips

from . import __version__, _native
from .errors import (
    FlatImageError,
    InvalidReferenceError,
    OutputError,
    UnreadableImageError,
    UnsupportedImageError,
    VipsnormError,
)
from .io.slide import BACKENDS, DEFAULT_MAX_PIXELS, Slide, one_file_at_a_time, open_slide
from .io.write import (
    COMPRESSIONS,
    IMAGE_SUFFIXES,
    MPP_RANGE,
    check_mpp,
    check_name,
    check_size,
    lossless_webp,
    write_image,
    write_pyramid,
)
from .methods import METHODS, Method, Params, Sample
from .methods.base import LutMethod
from .methods._hist import luma_array
from .reference import Reference, load_reference_json
from .sampling import STRATEGIES, _cores, overview, sample_slide, tissue_mask

__all__ = [
    "Options",
    "Result",
    "build_method",
    "load_reference",
    "shares_target",
    "fit_files",
    "check_fit",
    "sample_file",
    "summarize_file",
    "fit_reference",
    "normalize_file",
    "output_path",
]

#: Output formats for ``--format``; "auto" keeps ordinary images in their format, slides as pyramids.
FORMATS = ("auto", "tiff", "jpeg", "png", "webp")
_FORMAT_SUFFIX = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "tiff": ".tif"}
_LOADER_SUFFIX = {"jpegload": ".jpg", "pngload": ".png", "webpload": ".webp", "tiffload": ".tif"}


@dataclass(frozen=True)
class Options:
    """How to sample, fit and write. Defaults are what the command line uses.

    ``compression`` is that of TIFF outputs (see :data:`~vipsnorm.io.write.COMPRESSIONS`); ``None``:
    JPEG (``quality``) for slide pyramids, deflate (lossless) for ordinary images written as TIFF. It is
    refused with a ``format`` that writes no TIFF (jpeg, png, webp); with "auto", outputs that are not
    TIFF (ordinary JPEG, PNG, WebP images) keep their format's own compression.
    """

    strategy: str = "tiles"
    n_tiles: int = 256
    seed: int = 0
    tissue: bool | None = None
    compression: str | None = None
    quality: int = 90
    format: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = True
    backend: str = "auto"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}")
        if self.n_tiles < 1:
            raise ValueError(f"the number of tiles must be 1 or more, not {self.n_tiles}")
        if self.compression is not None and self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}")
        if self.compression is not None and self.format not in ("auto", "tiff"):
            raise ValueError(
                f"--compression is for TIFF outputs only, and --format {self.format} writes none; leave it out"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}")
        if not 1 <= self.quality <= 100:
            raise ValueError("quality must be within 1..100")


@dataclass
class Result:
    """What happened to one input."""

    input: Path
    output: Path | None = None
    status: str = "ok"
    error: str | None = None
    params: Params | None = None
    slide: dict = field(default_factory=dict)
    seconds: float = 0.0
    #: The output's path when it was written under a staging name (``normalize_file(stage=...)``).
    final: Path | None = None


def build_method(name: str, reference: Reference | None = None, **options) -> Method:
    """Instantiate method ``name`` with its options (``None`` values are left at their defaults) and, for
    methods that map onto a target, the target held by ``reference``.

    Methods that map onto no target (stretch, equalize, clahe) take no ``reference``: a reference of
    their own fitted parameters is applied by passing ``params=reference.params`` to
    :func:`normalize_file` (or ``normalize_batch``), with the method built without it, as ``vipsnorm
    normalize --reference PARAMS.json`` does; it is refused here, never dropped.

    Raises
    ------
    ValueError
        An unknown method, or an option the method does not take.
    InvalidReferenceError
        A method that needs a reference got none; a reference made for another method (a target of
        another kind, or parameters); or, for a method that maps onto no target, any reference.
    """
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None
    options = {k: v for k, v in options.items() if v is not None}
    _check_taken(name, cls, options)
    if cls.target_type is None:
        if reference is not None:
            raise InvalidReferenceError(None, _no_target_cause(name, cls, reference))
        return cls(**options)
    target = None
    if reference is not None:
        if reference.target is None or not shares_target(reference.method, name):
            what = f"{reference.method} parameters" if reference.target is None else f"a {reference.method} target"
            raise InvalidReferenceError(None, f"the reference holds {what}, not a {name} target")
        target = reference.target
    elif cls.requires_reference:
        raise InvalidReferenceError(
            None, f"method {name!r} needs --reference: an image, or a target JSON made by 'vipsnorm fit --method {name}'"
        )
    return cls(target, **options)


def _no_target_cause(name: str, cls: type[Method], reference: Reference) -> str:
    """Why method ``name``, which maps onto no target, cannot take ``reference`` (and what to do)."""
    if cls.spatial:
        return f"method {name!r} takes no reference: it is fitted on each image itself; leave out the reference"
    if reference.params is not None and reference.params.method == name:
        return (
            f"the reference holds fitted {name} parameters, which are not a target: build the method without "
            "it and apply them with params=reference.params"
        )
    what = f"{reference.method} parameters" if reference.target is None else f"a {reference.method} target"
    return f"method {name!r} maps onto no target; the reference holds {what}: leave it out, or choose the method it is for"


def shares_target(made_by: str, name: str) -> bool:
    """Whether method ``name`` maps onto targets that method ``made_by`` makes (itself, or a method with
    the same target type: a macenko target serves vahadane too)."""
    cls, other = METHODS.get(name), METHODS.get(made_by)
    if cls is None or other is None:
        return False
    return name == made_by or (cls.target_type is not None and cls.target_type is other.target_type)


def load_reference(
    path: str | os.PathLike[str], method: str = "match", options: Options = Options(), **method_options
) -> Reference:
    """A reference from a JSON file (``vipsnorm fit``; ``method`` is ignored, the file says) or from an
    image or slide: the target of ``method`` that its tissue defines."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return load_reference_json(path)
    cls = METHODS.get(method)
    if cls is None:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if cls.spatial:
        raise InvalidReferenceError(
            path, f"method {method!r} takes no reference: it is fitted on each image itself; leave out --reference"
        )
    if cls.target_type is None:
        raise InvalidReferenceError(
            path, f"method {method!r} maps onto no reference image; give a parameters JSON from 'vipsnorm fit'"
        )
    try:
        with open_slide(path, max_pixels=options.max_pixels, backend=options.backend) as slide:
            sample = _sample(slide, options, cls.sample_pixels)
        sample = Sample(sample.hist, sample.bands, f"{path.name}: {sample.source}", sample.background, sample.pixels)
        target = _target_fitter(method, method_options).fit_target([sample])
    except VipsnormError as exc:  # the methods do not know the file: name the reference
        raise exc.about(path) from exc
    return Reference(target=target, inputs=(str(path),), method=method)


def _target_fitter(method: str, method_options: dict) -> Method:
    """An instance of ``method`` (without a target) whose ``fit_target`` builds targets."""
    cls = METHODS[method]
    accepted = _accepted_options(cls)
    return cls(None, **{k: v for k, v in method_options.items() if v is not None and k in accepted})


def _accepted_options(cls: type[Method]) -> set[str]:
    """The option names a method's constructor takes (its target aside)."""
    return set(inspect.signature(cls.__init__).parameters) - {"self", "target"}


def _check_taken(name: str, cls: type[Method], options: dict) -> None:
    """Refuse options (given, not ``None``) that method ``name`` does not take: never ignored."""
    unknown = sorted(set(options) - _accepted_options(cls))
    if unknown:
        names = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise ValueError(f"method {name!r} does not take {names}")


def output_path(slide: Slide, out_dir: Path, fmt: str, name: str | None = None) -> Path:
    """Where the result of ``slide`` goes: pyramidal ``.tif`` for slides, same format for images;
    named ``name`` (a file name without suffix) if given, else after the input."""
    if fmt == "auto":
        suffix = ".tif" if slide.is_slide else _LOADER_SUFFIX.get(slide.loader.split("_")[0], ".png")
        if not slide.is_slide and slide.path.suffix.lower() in IMAGE_SUFFIXES:
            if IMAGE_SUFFIXES[slide.path.suffix.lower()] == IMAGE_SUFFIXES[suffix]:
                suffix = slide.path.suffix  # keep ".jpeg" as ".jpeg"
    else:
        suffix = _FORMAT_SUFFIX[fmt]
    return out_dir / ((slide.path.stem if name is None else name) + suffix)


def _check_output(inp: Path, out: Path, options: Options) -> None:
    if not out.parent.is_dir():
        raise OutputError(out.parent, "output folder does not exist")
    # (before out.exists(), which a name too long for the file system makes an OSError)
    check_name(out, fix="rename the input, or give a shorter output name in a --list CSV")
    if out.exists():
        if out.resolve() == inp.resolve() or os.path.samefile(out, inp):
            raise OutputError(inp, f"output {out} would overwrite the input; choose another -o folder")
        if not options.overwrite:
            raise OutputError(out, "output already exists and --no-overwrite was given")


def _sample(slide: Slide, options: Options, pixels: int = 0, luma: bool = True) -> Sample:
    """The pixels to fit on, as ``options`` say; a flat sample is an error, never a division by zero.
    ``luma`` False: the Y row may be left uncounted (:attr:`Method.needs_luma`)."""
    sample = sample_slide(
        slide,
        strategy=options.strategy,
        n_tiles=options.n_tiles,
        seed=options.seed,
        tissue=options.tissue,
        pixels=pixels,
        luma=luma,
    )
    if sample.is_flat():
        if sample.luma_counted:
            value = int(sample.hist[3].argmax())
        else:  # the luma of the one colour, as it would have been counted
            value = int(luma_array(sample.hist[:3].argmax(axis=1).astype(np.uint8))[()])
        raise FlatImageError(slide.path, f"image is flat (every sampled pixel is {value}): nothing to normalize")
    return sample


def fit_slide(slide: Slide, method: Method, options: Options) -> Params:
    """Sample ``slide`` and fit ``method``.

    Spatial methods (clahe) are fitted on a whole level: level 0 with ``--sample exact``, otherwise the
    coarsest pyramid level whose downsample the method can fit on faithfully (``fit_downsample``; level
    0 when the slide has no such level). A slide must show tissue for them as for the others (unless
    tissue masking is off), though they fit on every pixel.

    Raises
    ------
    NoTissueError
        A slide (tissue masked) where no tissue is found: all glass.
    FlatImageError
        Every pixel to fit on has the same value.
    """
    if method.spatial:
        if slide.is_slide and options.tissue is not False:
            # The verdict sampling gives every other method: without it an all-glass slide was
            # normalized "ok" by clahe alone. Only checked, not used by the fit (the params are those of
            # the level), so on an overview of 1024 px a side rather than sampling's 2048: 0.05 s
            # against 0.2 s on a generated 20,000 px slide, where clahe's whole job is about 7 s.
            tissue_mask(*overview(slide, max_size=1024), slide.path)
        level = 0
        if options.strategy != "exact":
            level = slide.best_level_for_downsample(method.fit_downsample(*slide.dimensions, slide.mpp))
        def fit_level() -> Params:
            # another loader of the level, to count half of it on a thread of its own (see fit_level)
            copy = slide.independent_level_image(level) if _cores() > 1 else None
            copies = () if copy is None else (copy,)
            return method.fit_level(
                slide.level_image(level), mpp=slide.mpp, size=slide.dimensions, copies=copies, flat="error"
            )

        return slide.decode(fit_level)
    return method.fit(_sample(slide, options, method.sample_pixels, method.needs_luma))


@one_file_at_a_time
def normalize_file(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    method: Method,
    *,
    params: Params | None = None,
    options: Options = Options(),
    claimed: Collection[Path] = (),
    name: str | None = None,
    stage: str | None = None,
) -> Result:
    """Normalize one input into ``out_dir``; errors are returned in the result, never half-written files.
    Calls from several threads of a process run one after the other (:data:`vipsnorm.io.slide.FILE_LOCK`).

    Parameters
    ----------
    params : Params, optional
        Fixed parameters (a dataset-level fit) instead of fitting on this input.
    claimed : collection of Path
        Resolved paths this input must not write: the run's other inputs, and outputs already written
        for them (``a/x.svs`` and ``b/x.svs`` would both become ``x.tif``). Refused, never overwritten.
    name : str, optional
        The output's file name without suffix (default: the input's); the suffix follows ``options.format``.
    stage : str, optional
        Write the output complete under this file name without suffix (in ``out_dir``) instead, and
        leave the rename to its name to the caller (a batch worker, which checks first that its run is
        still live): ``result.output`` is then the staged file and ``result.final`` the output's path.
        The output's own name is checked as always (not an input; not existing, with
        ``--no-overwrite``), before any work.
    """
    start = time.perf_counter()
    result = Result(input=Path(path))
    try:
        with open_slide(path, max_pixels=options.max_pixels, backend=options.backend) as slide:
            result.slide = slide.describe()
            out = final = output_path(slide, Path(out_dir), options.format, name)
            _check_output(slide.path, out, options)
            if claimed and out.resolve() in claimed:
                raise OutputError(
                    path,
                    f"output {out} is another input of this run, or already written for one; "
                    "rename one of them or choose another -o folder",
                )
            check_size(out, *slide.dimensions)  # a JPEG or WebP too large: refused before any work
            try:
                mpp = check_mpp(slide.mpp)
            except ValueError:
                low, high = MPP_RANGE
                raise UnsupportedImageError(
                    path,
                    f"its pixel size {slide.mpp[0]:g} x {slide.mpp[1]:g} um is outside what an output can state "
                    f"({low:g} to {high:g} um); correct it in the file",
                ) from None
            if stage is not None:
                out = final.with_name(stage + final.suffix)
            if params is None:
                params = fit_slide(slide, method, options)
            elif params.method != method.name:
                raise InvalidReferenceError(None, f"reference holds {params.method} parameters, not {method.name}")
            result.params = params
            image = slide.stream_image(0)
            taken = slide.take_decoded()  # a small image decoded in memory: mapped in place, if the method can
            if taken is not None and method.apply_in_place(taken[1], params):
                image = taken[0]
                image.invalidate()  # (libvips' operation cache must not hand back results of the old pixels)
            elif (
                type(method).apply is LutMethod.apply
                and getattr(params, "space", None) == "luminance"
                and image.bands == 3
                and not _native.available()  # (the native kernel computes the luma itself, in the same pass)
            ):
                # a small image held decoded: its luma in numpy (counted by the fit already, if there was
                # one) instead of again in libvips
                image = method.apply(image, params, luma=slide.decoded_luma())
            else:
                image = method.apply(image, params)
            # The input is read lazily, during the save: slide.decode names it when its pixels fail to
            # decode; a failure of the output itself (disk full, read-only folder) is an OutputError
            # naming the output, which the writers raise and slide.decode lets through.
            if slide.is_slide and options.format in ("auto", "tiff"):
                description = f"vipsnorm {__version__} method={method.name} source={slide.path.name}"
                slide.decode(
                    lambda: write_pyramid(
                        image,
                        out,
                        mpp=mpp,
                        compression=options.compression or "jpeg",
                        quality=options.quality,
                        description=description,
                    )
                )
            else:
                # the pixel size, or none (a TIFF then says so); TIFF's compression to TIFF outputs only
                # (--format auto); a lossless WebP kept lossless
                kind = IMAGE_SUFFIXES[out.suffix.lower()]
                lossless = kind == "webp" and slide.loader.startswith("webpload") and lossless_webp(slide.path)
                compression = options.compression if kind == "tiff" else None
                slide.decode(
                    lambda: write_image(
                        image, out, mpp=mpp, quality=options.quality, compression=compression, lossless=lossless
                    )
                )
            result.output, result.final = out, (final if stage is not None else None)
    except VipsnormError as exc:
        result.status, result.error = "error", str(exc.about(path))
    except pyvips.Error as exc:  # anything libvips reports that the layers above did not explain
        result.status, result.error = "error", str(UnreadableImageError(path, f"libvips: {exc}"))
    except Exception as exc:  # a bug must not stop a batch; report it against the file
        result.status, result.error = "error", f"{path}: internal error ({type(exc).__name__}: {exc})"
    result.seconds = time.perf_counter() - start
    return result


def check_fit(method_name: str, method_options: dict | None = None) -> type[Method]:
    """The class of ``method_name`` if a dataset reference can be fitted with it and these options.

    Raises
    ------
    ValueError
        An unknown method, a spatial one (fitted on each image's layout), or an option it does not take
        (refused as ``vipsnorm normalize`` refuses it, never ignored).
    """
    cls = METHODS.get(method_name)
    if cls is None:
        raise ValueError(f"unknown method {method_name!r}; choose from {', '.join(METHODS)}")
    if cls.spatial:
        raise ValueError(f"method {method_name!r} is fitted on each image's own layout; it has no dataset reference")
    given = {k: v for k, v in (method_options or {}).items() if v is not None}
    _check_taken(method_name, cls, given)
    if given:  # and the values it takes must be valid (stretch: low < high; match: a known mode)
        _fitter(method_name, given)
    return cls


@one_file_at_a_time
def sample_file(
    path: str | os.PathLike[str], method_name: str, options: Options = Options()
) -> tuple[Result, Sample | None]:
    """The sample that ``vipsnorm fit`` takes from one input for ``method_name`` (the first half of
    :func:`fit_files`); errors are returned in the result, with no sample."""
    cls = check_fit(method_name)
    result = Result(input=Path(path))
    sample = None
    start = time.perf_counter()
    try:
        with open_slide(path, max_pixels=options.max_pixels, backend=options.backend) as slide:
            result.slide = slide.describe()
            sample = _sample(slide, options, cls.sample_pixels)
    except VipsnormError as exc:
        result.status, result.error = "error", str(exc.about(path))
    result.seconds = time.perf_counter() - start
    return result, sample


def _fitter(method_name: str, method_options: dict | None) -> Method:
    """The method instance whose ``summarize`` and ``fit_target`` (or ``fit``) make a dataset reference."""
    method_options = method_options or {}
    if METHODS[method_name].target_type is not None:
        return _target_fitter(method_name, method_options)
    return build_method(method_name, **method_options)


def summarize_file(
    path: str | os.PathLike[str], method_name: str, options: Options = Options(), method_options: dict | None = None
) -> tuple[Result, Any]:
    """:func:`sample_file`, then the method's :meth:`~vipsnorm.methods.Method.summarize` of the sample:
    the few numbers (or pixel-less histograms) :func:`fit_reference` needs of this input, so that a
    dataset fit never holds every input's sampled pixels. An input the method cannot use (a stain
    method on an unstained slide, say) is an error result, with no summary."""
    result, sample = sample_file(path, method_name, options)
    if sample is None:
        return result, None
    start = time.perf_counter()
    try:
        summary = _fitter(method_name, method_options).summarize(sample)
    except VipsnormError as exc:
        result.status, result.error, summary = "error", str(exc.about(path)), None
    result.seconds += time.perf_counter() - start
    return result, summary


def fit_reference(
    method_name: str,
    samples: list,
    inputs: tuple[str, ...],
    method_options: dict | None = None,
    errors: Sequence[str] = (),
) -> Reference:
    """One reference from the samples of many inputs, or their summaries (:func:`summarize_file`; the
    second half of :func:`fit_files`). ``errors``: why the other inputs could not be used (the first
    two are named when none could)."""
    cls = check_fit(method_name)
    if not samples:
        why = f": {'; '.join(errors[:2])}" + (f"; and {len(errors) - 2} more" if len(errors) > 2 else "") if errors else ""
        raise InvalidReferenceError(None, f"no input could be used; no reference written{why}")
    fitter = _fitter(method_name, method_options)
    if cls.target_type is not None:
        return Reference(target=fitter.fit_target(samples), inputs=inputs, method=method_name)
    pooled = Sample.pooled(samples, source=f"pooled tissue histograms of {len(samples)} images")
    return Reference(params=fitter.fit(pooled), inputs=inputs)


def fit_files(
    paths: list[str | os.PathLike[str]], method_name: str, *, method_options: dict | None = None, options: Options = Options()
) -> tuple[Reference, list[Result]]:
    """Fit one reference over many inputs.

    For methods that map onto a target (match, the stain methods) the reference is that target, built
    by the method's ``fit_target`` from every input's sample (match: the tissue histograms pooled, each
    input weighted equally). For the other methods it is their parameters fitted on the pooled sample,
    to be applied unchanged to every image. Each input is summarized as soon as it is sampled
    (:func:`summarize_file`: a stain method keeps its stain vectors, not its pixels), and an input the
    method cannot use is an error result while the others go on. :func:`vipsnorm.batch.fit_batch` runs
    the same two steps (:func:`summarize_file` on each input, then :func:`fit_reference`) in parallel.
    """
    method_options = method_options or {}
    check_fit(method_name, method_options)  # before any file is read
    summaries: list = []
    results: list[Result] = []
    for path in paths:
        result, summary = summarize_file(path, method_name, options, method_options)
        results.append(result)
        if summary is not None:
            summaries.append(summary)
    inputs = tuple(str(r.input) for r in results if r.status == "ok")
    errors = [r.error for r in results if r.status != "ok" and r.error]
    return fit_reference(method_name, summaries, inputs, method_options, errors), results
