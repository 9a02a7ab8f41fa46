"""Patches cut from slides for training: where they are (a grid or random positions over the tissue),
their normalized pixels, and how they are written.

Where
    :func:`grid_patches` and :func:`random_patches` place ``size`` x ``size`` windows on one level of a
    slide (:func:`choose_level`: by index, or by microns per pixel when the slide knows its pixel size)
    and keep those whose tissue fraction reaches ``min_tissue``. The tissue mask is the one fitting
    uses (:func:`vipsnorm.sampling.tissue_mask` on an overview of at most 2048 px a side), so it costs
    one low-resolution read per slide; a patch's tissue fraction is the fraction of mask pixels whose
    centres fall inside it.

Pixels
    :class:`PatchReader` reads windows of one open slide through the *lazy normalized pipeline* of the
    whole level (``method.apply(slide.level_image(level), params)``, fitted once per slide), so a patch
    is pixel for pixel the same window of the normalized slide, never a per-patch re-fit (which would
    give every patch of one slide other colours). Where libvips decodes the slide, each window is
    computed by a libvips ``Region`` fetch in the calling thread (no thread pool: cheap per patch and
    safe in data-loader workers); on OpenSlide slides the raw window comes from OpenSlide's
    ``read_region`` and the method's numpy twin (``apply_array``) maps it.

Writing
    :func:`extract_slide` writes one slide's patches as PNG, JPEG or ``.npy`` files in a folder of
    their own, or as WebDataset-style tar shards (``KEY.png`` + ``KEY.json`` per sample), every output
    under a temporary name first and renamed when the slide is complete (a failed slide leaves
    nothing), then commits the slide's rows of the table with a record of its settings and input;
    :func:`extract_slides` runs many slides (a bad one gives an error result, the others go on),
    skips those an earlier run committed with the same settings from the same input, logs every slide
    in a manifest and writes the coordinates table ``patches.csv``.

Resuming
    A slide is finished when its rows file ``OUT/.vipsnorm-rows/NAME.csv`` holds a record (its first
    line) of the settings (:func:`patch_config`), the input and its size and mtime, and the outputs.
    The file is deleted before a slide's outputs are replaced and written (by rename) only once they
    are all in place, so a kill at any moment never leaves a slide that looks finished and is not.
    A redo deletes the slide's earlier outputs that its new ones do not replace by name (those of
    another ``format``, shards beyond the new last one) once the new record is in, and never a file
    that is not one of the slide's outputs; a kill in between leaves them listed for the next run.
    :func:`extract_slides` and :func:`extract_slide` have the reasons in full.

Notes
-----
Patches are uint8, ``(size, size, bands)`` (3 for colour, 1 for grey), in the processing format of
:func:`vipsnorm.io.pixels.to_processing`. Coordinates ``x, y`` are on the patch's level, ``x0, y0`` on
level 0 (``x0 = round(x * downsample)``). At level 0 a patch equals the same window of the slide that
``vipsnorm normalize`` writes (tested, lossless output). At a coarser level it is that level of the
input mapped by the same fitted parameters; the pyramid levels that ``normalize`` writes are instead
shrunk from the normalized level 0, which differs slightly for methods that are not linear. CLAHE's
per-region tables are tied to level 0's geometry: at a coarser level the same tables are interpolated
over that level's geometry (:func:`params_at_level`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import glob
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import tarfile
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple
from pathlib import Path

import numpy as np
import pyvips

from .. import _native
from ..batch._locks import open_locked
from ..batch._signals import terminate_as_interrupt
from ..batch.inputs import PART_FILE, input_stat
from ..batch.manifest import COLUMNS, Manifest
from ..batch.run import config_hash, default_manifest, worker_id
from ..engine import Options, build_method, fit_slide, load_reference
from ..errors import (
    InvalidReferenceError,
    NoTissueError,
    OutputError,
    UnreadableImageError,
    UnsupportedImageError,
    VipsnormError,
    one_line,
)
from ..io.slide import FILE_LOCK, Slide, one_file_at_a_time, open_slide
from ..io.write import PART_MARKER, atomic_path
from ..methods import Method, Params
from ..reference import Reference
from ..methods.clahe import ClaheParams, grid_geometry
from ..sampling import TissueMask, overview, tissue_mask
from .colour_table import colour_table as shared_colour_table, per_pixel, table_key

__all__ = [
    "Patch",
    "PatchJob",
    "SlideResult",
    "PatchReader",
    "TissueFractions",
    "FORMATS",
    "TABLE",
    "TABLE_COLUMNS",
    "choose_level",
    "tissue_fractions",
    "grid_patches",
    "random_patches",
    "plan_patches",
    "params_at_level",
    "resolve_normalization",
    "extract_slide",
    "extract_slides",
    "read_table",
    "write_table",
    "rebuild_table",
    "patch_key",
    "patch_config",
    "MANIFEST_COLUMNS",
    "output_name",
    "level_mpp",
    "slide_rng",
]

#: ``--format`` choices: image files, numpy arrays, WebDataset tar shards, or the coordinates table only.
FORMATS = ("png", "jpg", "npy", "tar", "coords")
#: The coordinates table written into the output folder.
TABLE = "patches.csv"
#: Where each slide's rows of the table are kept (hidden: loaders globbing OUT see only patches).
ROWS_DIR = ".vipsnorm-rows"
#: The first line of a slide's rows file starts with this, followed by its record as JSON.
_RECORD_TAG = "#vipsnorm-patches "
TABLE_COLUMNS = ("key", "slide", "level", "x", "y", "x0", "y0", "size", "mpp", "tissue", "file")
#: Random positions drawn per patch asked for, at most, before giving up on finding more with tissue.
_DRAWS_PER_PATCH = 400
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


# --------------------------------------------------------------------------------------------------
# coordinates


@dataclass(frozen=True)
class Patch:
    """One ``size`` x ``size`` window of one slide level.

    Attributes
    ----------
    slide : str
        Path of the slide, as given.
    level : int
    x, y : int
        Top-left corner on ``level``.
    x0, y0 : int
        The same corner on level 0 (``round(x * downsample)``).
    size : int
        Side in pixels of ``level``.
    mpp : float or None
        Microns per pixel at ``level`` (x), where the slide records its pixel size.
    tissue : float
        Fraction of the window that the tissue mask covers (``nan`` when not measured).
    """

    slide: str
    level: int
    x: int
    y: int
    x0: int
    y0: int
    size: int
    mpp: float | None = None
    tissue: float = float("nan")

    @property
    def key(self) -> str:
        """A name unique within a slide's patches: ``STEM_L<level>_<x0>_<y0>`` (no dots, as WebDataset
        keys need)."""
        return patch_key(Path(self.slide).stem, self.level, self.x0, self.y0)

    def to_row(self, file: str = "", name: str | None = None) -> dict:
        """A row of the coordinates table (:data:`TABLE_COLUMNS`)."""
        key = self.key if name is None else patch_key(name, self.level, self.x0, self.y0)
        return {
            "key": key,
            "slide": self.slide,
            "level": self.level,
            "x": self.x,
            "y": self.y,
            "x0": self.x0,
            "y0": self.y0,
            "size": self.size,
            "mpp": "" if self.mpp is None else f"{self.mpp:.6g}",
            "tissue": "" if math.isnan(self.tissue) else f"{self.tissue:.4f}",
            "file": file,
        }

    @classmethod
    def from_row(cls, row: dict) -> "Patch":
        """The patch of a coordinates-table row (extra columns are ignored)."""
        mpp, tissue = row.get("mpp") or "", row.get("tissue") or ""
        return cls(
            slide=row["slide"],
            level=int(row["level"]),
            x=int(row["x"]),
            y=int(row["y"]),
            x0=int(row["x0"]),
            y0=int(row["y0"]),
            size=int(row["size"]),
            mpp=float(mpp) if mpp else None,
            tissue=float(tissue) if tissue else float("nan"),
        )


def patch_key(name: str, level: int, x0: int, y0: int) -> str:
    """``NAME_L<level>_<x0>_<y0>`` with every character of ``name`` other than letters, digits, ``_``
    and ``-`` replaced by ``_`` (WebDataset splits keys at the first dot)."""
    return f"{_KEY_UNSAFE.sub('_', name)}_L{level}_{x0}_{y0}"


def output_name(path: str | os.PathLike[str]) -> str:
    """The name of a slide's outputs: its file name without suffix, characters other than letters,
    digits, ``_`` and ``-`` replaced by ``_``."""
    return _KEY_UNSAFE.sub("_", Path(path).stem)


def choose_level(slide: Slide, *, level: int | None = None, mpp: float | None = None) -> int:
    """The level to cut patches from: ``level``, or the one whose pixel size is closest to ``mpp``
    microns (in ratio; the finer one on a tie). Default: level 0.

    Raises
    ------
    UnsupportedImageError
        ``level`` does not exist, or ``mpp`` was asked for and the slide does not record its pixel size.
    """
    if level is not None and mpp is not None:
        raise ValueError("give a level or a pixel size (mpp), not both")
    if mpp is None:
        level = 0 if level is None else int(level)
        if not 0 <= level < len(slide.levels):
            raise UnsupportedImageError(
                slide.path, f"has {len(slide.levels)} level(s) (0-{len(slide.levels) - 1}); there is no level {level}"
            )
        return level
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, not {mpp}")
    if slide.mpp is None:
        raise UnsupportedImageError(
            slide.path, f"the pixel size is unknown, so no level can be chosen for {mpp:g} um/px: give --level instead"
        )
    distances = [abs(math.log(slide.mpp[0] * lvl.downsample / mpp)) for lvl in slide.levels]
    return int(min(range(len(distances)), key=lambda i: (round(distances[i], 9), i)))


def level_mpp(slide: Slide, level: int) -> float | None:
    """Microns per pixel (x) at ``level``, or None."""
    return None if slide.mpp is None else slide.mpp[0] * slide.levels[level].downsample


@dataclass(frozen=True)
class TissueFractions:
    """Tissue fractions of level-0 windows, from a tissue mask at overview resolution.

    Attributes
    ----------
    mask : TissueMask or None
        None for a slide without tissue (every fraction is 0).
    """

    mask: TissueMask | None
    width: int
    height: int
    _integral: np.ndarray = field(repr=False, default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.mask is not None and self._integral is None:
            m = self.mask.mask
            integral = np.pad(m.cumsum(0, dtype=np.int64).cumsum(1), ((1, 0), (1, 0)))
            object.__setattr__(self, "_integral", integral)

    def __call__(self, x0: np.ndarray, y0: np.ndarray, side: float) -> np.ndarray:
        """Fractions of the windows ``[x0, x0 + side) x [y0, y0 + side)`` (level-0 pixels, arrays)."""
        x0 = np.asarray(x0, dtype=np.float64)
        y0 = np.asarray(y0, dtype=np.float64)
        if self.mask is None:
            return np.zeros(np.broadcast(x0, y0).shape)
        mh, mw = self.mask.mask.shape
        dx, dy = self.width / mw, self.height / mh

        def span(lo: np.ndarray, d: float, n: int) -> tuple[np.ndarray, np.ndarray]:
            # mask pixels whose centres fall inside [lo, lo + side); at least the one holding the middle
            a = np.ceil(lo / d - 0.5).astype(np.int64)
            b = np.ceil((lo + side) / d - 0.5).astype(np.int64)
            middle = np.floor((lo + side / 2) / d).astype(np.int64)
            a, b = np.where(b > a, a, middle), np.where(b > a, b, middle + 1)
            return np.clip(a, 0, n - 1), np.clip(b, 1, n)

        xa, xb = span(x0, dx, mw)
        ya, yb = span(y0, dy, mh)
        s = self._integral
        inside = s[yb, xb] - s[ya, xb] - s[yb, xa] + s[ya, xa]
        return inside / ((xb - xa) * (yb - ya))


def tissue_fractions(slide: Slide, required: bool = True) -> TissueFractions:
    """The tissue mask of ``slide`` (from its overview) as a :class:`TissueFractions`.

    ``required=False``: a slide without tissue gives fractions of 0 instead of :class:`NoTissueError`.
    """
    view, downsample = overview(slide)
    try:
        mask = tissue_mask(view, downsample, slide.path)
    except NoTissueError:
        if required:
            raise
        mask = None
    w0, h0 = slide.dimensions
    return TissueFractions(mask, w0, h0)


def _patches(slide: Slide, level: int, size: int, xs: np.ndarray, ys: np.ndarray, fractions: np.ndarray) -> list[Patch]:
    ds = slide.levels[level].downsample
    mpp = level_mpp(slide, level)
    path = str(slide.path)
    return [
        Patch(path, level, int(x), int(y), int(round(x * ds)), int(round(y * ds)), size, mpp, float(f))
        for x, y, f in zip(xs, ys, fractions)
    ]


def _check_size(size: int) -> None:
    if int(size) != size or size < 1:
        raise ValueError(f"patch size must be a positive number of pixels, not {size!r}")


def grid_patches(
    slide: Slide,
    size: int,
    *,
    level: int = 0,
    stride: int | None = None,
    min_tissue: float = 0.5,
    fractions: TissueFractions | None = None,
) -> list[Patch]:
    """Every ``size`` x ``size`` window of a grid over ``level`` (step ``stride``, default ``size``;
    windows wholly inside the level only) whose tissue fraction is at least ``min_tissue``, in rows.

    ``min_tissue=0`` keeps every window, tissue or not (fractions are still measured where the slide
    has tissue).
    """
    _check_size(size)
    stride = size if stride is None else int(stride)
    if stride < 1:
        raise ValueError(f"stride must be positive, not {stride}")
    if fractions is None:
        fractions = tissue_fractions(slide, required=min_tissue > 0)
    lvl = slide.levels[level]
    xs = np.arange(0, lvl.width - size + 1, stride)
    ys = np.arange(0, lvl.height - size + 1, stride)
    gx, gy = (a.ravel() for a in np.meshgrid(xs, ys))
    ds = lvl.downsample
    f = fractions(np.round(gx * ds), np.round(gy * ds), size * ds)
    keep = f >= min_tissue
    return _patches(slide, level, size, gx[keep], gy[keep], f[keep])


def _check_seed(seed) -> None:
    """Raise ValueError unless ``seed`` is an integer >= 0 (what numpy's ``SeedSequence`` takes)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"the seed of random patches must be an integer >= 0, not {seed!r}")


def slide_rng(slide: Slide | str | os.PathLike, seed: int) -> np.random.Generator:
    """The random generator of ``slide``'s random patches: from ``seed`` (an integer >= 0) and the
    slide's file name, so every slide gets its own positions whatever the order of the slides."""
    _check_seed(seed)
    name = Path(slide.path if isinstance(slide, Slide) else slide).name
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]))


def random_patches(
    slide: Slide,
    size: int,
    n: int,
    *,
    level: int = 0,
    min_tissue: float = 0.5,
    seed: int = 0,
    rng: np.random.Generator | None = None,
    fractions: TissueFractions | None = None,
    overlap: bool = True,
) -> list[Patch]:
    """Up to ``n`` distinct windows at uniformly random positions of ``level`` (wholly inside it) whose
    tissue fraction is at least ``min_tissue``, sorted by row.

    The positions are drawn from ``rng`` (default :func:`slide_rng` of ``seed``: reproducible). A
    position drawn again is not counted twice, so the windows are always at distinct positions (they
    may overlap, by up to all but one pixel row or column). ``overlap=False`` keeps only windows that
    share no pixel with one kept before (random sequential placement: a draw overlapping an earlier
    window is passed over); the draws are the same, so with ``overlap=True`` the positions are those
    of earlier versions. Fewer than ``n`` come back when the tissue is too small to hold that many
    (after ``400 n`` draws).
    """
    _check_size(size)
    if n < 0:
        raise ValueError(f"the number of random patches must be >= 0, not {n}")
    if fractions is None:
        fractions = tissue_fractions(slide, required=min_tissue > 0)
    rng = slide_rng(slide, seed) if rng is None else rng
    lvl = slide.levels[level]
    if lvl.width < size or lvl.height < size or n == 0:
        return []
    ds = lvl.downsample
    chosen: dict[tuple[int, int], float] = {}
    # overlap=False: kept windows by the size x size cell holding their corner; a window overlapping
    # one at (x, y) has its corner in one of the 3 x 3 cells around (x, y)'s
    cells: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def free(x: int, y: int) -> bool:
        cx, cy = x // size, y // size
        return not any(
            abs(px - x) < size and abs(py - y) < size
            for i in (cx - 1, cx, cx + 1)
            for j in (cy - 1, cy, cy + 1)
            for px, py in cells.get((i, j), ())
        )

    draws = 0
    while len(chosen) < n and draws < _DRAWS_PER_PATCH * n:
        batch = max(64, 4 * (n - len(chosen)))
        xs = rng.integers(0, lvl.width - size + 1, batch)
        ys = rng.integers(0, lvl.height - size + 1, batch)
        draws += batch
        f = fractions(np.round(xs * ds), np.round(ys * ds), size * ds)
        for x, y, v in zip(xs[f >= min_tissue], ys[f >= min_tissue], f[f >= min_tissue]):
            if len(chosen) == n:
                break
            x, y = int(x), int(y)
            if overlap:
                chosen.setdefault((x, y), float(v))
            elif free(x, y):
                chosen[x, y] = float(v)
                cells.setdefault((x // size, y // size), []).append((x, y))
    order = sorted(chosen, key=lambda p: (p[1], p[0]))
    xs = np.array([p[0] for p in order], dtype=np.int64)
    ys = np.array([p[1] for p in order], dtype=np.int64)
    return _patches(slide, level, size, xs, ys, np.array([chosen[p] for p in order]))


def plan_patches(
    path: str | os.PathLike[str],
    size: int,
    *,
    level: int | None = None,
    mpp: float | None = None,
    stride: int | None = None,
    min_tissue: float = 0.5,
    random: int | None = None,
    seed: int = 0,
    overlap: bool = True,
    backend: str = "auto",
) -> list[Patch]:
    """Open the slide at ``path`` and place patches on it: :func:`grid_patches`, or ``random`` of them
    with :func:`random_patches` (``overlap=False``: windows that share no pixel), on the level
    :func:`choose_level` picks. The slide is closed again."""
    with open_slide(path, backend=backend) as slide:
        lvl = choose_level(slide, level=level, mpp=mpp)
        if random is None:
            return grid_patches(slide, size, level=lvl, stride=stride, min_tissue=min_tissue)
        return random_patches(slide, size, random, level=lvl, min_tissue=min_tissue, seed=seed, overlap=overlap)


# --------------------------------------------------------------------------------------------------
# pixels


def resolve_normalization(
    method: str | Method | None = None,
    reference: str | os.PathLike[str] | Reference | None = None,
    options: Options = Options(),
    **method_options,
) -> tuple[Method | None, Params | None]:
    """The method (and fixed parameters) that a method name and a reference ask for, resolved as
    ``vipsnorm normalize`` resolves ``--method`` and ``--reference``; ``(None, None)``: no normalization.

    ``reference`` is an image or slide (the target of ``method``, default ``match``), a JSON from
    ``vipsnorm fit`` (a target, or parameters applied unchanged: then ``method`` may be omitted), or a
    loaded :class:`~vipsnorm.reference.Reference`. Options left at ``None`` keep the method's defaults.

    Raises
    ------
    ValueError
        Unknown method or option, or options without a method.
    InvalidReferenceError
        The reference does not fit the method.
    """
    given = {k: v for k, v in method_options.items() if v is not None}
    if isinstance(method, Method):
        if reference is not None or given:
            raise ValueError("give a method name with a reference or options, or a Method instance alone")
        return method, None
    if reference is None:
        if method is None:
            if given:
                names = ", ".join("--" + k.replace("_", "-") for k in given)
                raise ValueError(f"{names} given without a method")
            return None, None
        return build_method(method, **given), None
    where = reference if not isinstance(reference, Reference) else None
    if not isinstance(reference, Reference):
        reference = load_reference(reference, method or "match", options, **given)
    if reference.kind == "params":
        params = reference.params
        if method not in (None, params.method):
            raise InvalidReferenceError(where, f"holds {params.method} parameters but the method is {method}")
        return build_method(params.method), params
    name = method or reference.method
    if name != reference.method:
        raise InvalidReferenceError(where, f"is a {reference.method} target; method {name} cannot use it")
    try:
        return build_method(name, reference, **given), None
    except InvalidReferenceError as exc:
        raise InvalidReferenceError(where, exc.cause) from None


def params_at_level(slide: Slide, params: Params, level: int) -> Params:
    """The parameters that map ``level`` of ``slide`` as ``params`` map level 0.

    Per-pixel methods (LUTs, stain maps) use the same parameters at every level. CLAHE's are tied to
    level 0's size: the same per-region tables are laid over the level with the same grid of regions
    (OpenCV's region geometry for the level's size), so they cover the same tissue.
    """
    if level == 0 or not isinstance(params, ClaheParams):
        return params
    lvl = slide.levels[level]
    tw, th, _, _ = grid_geometry(lvl.width, lvl.height, params.grid)
    return dataclasses.replace(params, width=lvl.width, height=lvl.height, tile=(tw, th))


#: Regions kept per thread (see :func:`_thread_region`), and the largest window read through a kept one.
_REGIONS_PER_THREAD = 8
_KEPT_REGION_PIXELS = 1 << 20
_THREAD = threading.local()


def _thread_region(image: pyvips.Image) -> pyvips.Region:
    """A ``pyvips.Region`` of ``image`` for the calling thread, kept for its next windows: making one
    costs about a tenth of a 256 px fetch. Each thread keeps its few most recent ones (with their
    images), so a region is only ever used and freed by the thread that made it (libvips keeps its
    buffers per thread), and windows larger than :data:`_KEPT_REGION_PIXELS` use a region of their own,
    so no large buffer is held."""
    cache = getattr(_THREAD, "regions", None)
    if cache is None:
        cache = _THREAD.regions = OrderedDict()
    key = id(image)
    hit = cache.get(key)
    if hit is not None and hit[0] is image:
        cache.move_to_end(key)
        return hit[1]
    region = pyvips.Region.new(image)
    cache[key] = (image, region)  # the image is held: its id is not reused while it is here
    while len(cache) > _REGIONS_PER_THREAD:
        cache.popitem(last=False)
    return region


class PatchReader:
    """Windows of one open slide, normalized by fitted ``params`` of ``method`` (or raw without them).

    Parameters
    ----------
    slide : Slide
        An open slide; the reader does not close it.
    method, params : Method and Params, optional
        The slide-level fit (:func:`vipsnorm.engine.fit_slide`), both or neither.

    Notes
    -----
    Each :meth:`read` computes only its window; several threads may call it, and their reads run one at a
    time per process (:data:`vipsnorm.io.slide.FILE_LOCK`: a damaged tile is told only by libvips'
    process-wide error buffer, which any pyvips call of another thread may clear or add to). Raw pixels
    come straight from the level's JPEG tiles where the slide has a checked direct reader for them
    (:meth:`~vipsnorm.io.slide.Slide.jpeg_tiles`: libvips' bytes, decoding only what the window needs),
    otherwise with a ``pyvips.Region`` of the calling thread (kept per thread for the next windows). A
    per-pixel method (every method but CLAHE) maps the raw window by the fit's native kernel program
    (through its cube), or through a :class:`~.colour_table.ColourTable` of the fit: the method's own
    pipeline, run once per colour the slide shows and then looked up, several times cheaper per patch
    than the pipeline and equal to it bit for bit (``colour_table=False``: the lazy pipeline on every
    window). CLAHE's
    windows are fetched from the lazy normalized image of the level, built once and kept. On
    OpenSlide-backed slides the raw level-0 window comes from OpenSlide's ``read_region``; without
    the table it is mapped by ``method.apply_array``, the method's numpy twin of its pipeline (tested
    equal for the LUT methods and Macenko).
    """

    def __init__(
        self, slide: Slide, method: Method | None = None, params: Params | None = None, *, colour_table: bool = True
    ):
        if (method is None) != (params is None):
            raise ValueError("give both the method and its fitted params, or neither (raw pixels)")
        if params is not None and params.method != method.name:
            raise ValueError(f"the params are for {params.method}, not {method.name}")
        self.slide, self.method, self.params = slide, method, params
        self._images: dict[int, pyvips.Image] = {}
        self._raw_images: dict[int, pyvips.Image] = {}
        self._numpy_path = slide.backend == "openslide" and not (method is not None and method.spatial)
        # per-pixel methods share the same params at every level (params_at_level): one table serves all
        self._table = colour_table and per_pixel(method)
        self._table_for: tuple = (None, None, None)  # (method, params, key) the key was made for
        # the native kernel's program for this fit, when the kernel runs the method's map, with a cube of
        # its own when it needs one and a slot is free (see _cube_image): (method, params, program or
        # None, {level: image or None}), replaced whole
        self._cube: tuple | None = None
        self._cube_slot: weakref.finalize | None = None  # calling it gives the slot back
        self._cube_lock = threading.Lock()
        self._local = threading.local()  # this reader's regions of its cube images, per thread

    def level_image(self, level: int) -> pyvips.Image:
        """The lazy (normalized) image of ``level``."""
        image = self._images.get(level)
        if image is None:
            image = self.slide.level_image(level)
            if self.method is not None:
                params = params_at_level(self.slide, self.params, level)
                # a reader (one per slide, many kept by a dataset) holds its images: CLAHE's lean
                # weights keep no block of weights in memory with each
                lean = {"lean": True} if self.method.spatial else {}
                with _native.without_cube():  # nor a 64 MiB colour cube with each (see vipsnorm._native)
                    image = self.method.apply(image, params, **lean)
            image = self._images.setdefault(level, image)
        return image

    def read(self, level: int, x: int, y: int, width: int, height: int | None = None) -> np.ndarray:
        """The ``(height, width, bands)`` uint8 window at ``(x, y)`` of ``level`` (a new, writeable array).

        Raises
        ------
        ValueError
            The window is not wholly inside the level.
        UnreadableImageError
            Its pixels cannot be decoded.
        """
        height = width if height is None else height
        lvl = self.slide.levels[level]
        if not (0 <= x and 0 <= y and width > 0 and height > 0 and x + width <= lvl.width and y + height <= lvl.height):
            raise ValueError(
                f"{self.slide.path}: window {width}x{height} at ({x}, {y}) is not inside level {level} "
                f"({lvl.width}x{lvl.height})"
            )
        # one read at a time per process, as files are (FILE_LOCK): damage libvips lets pass is
        # told by its process-wide error buffer, which every pyvips call of another thread (a pipeline
        # built, a slide opened) may clear or add to
        with FILE_LOCK:
            return self._read(level, x, y, width, height)

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if self._numpy_path and level == 0:
            # above level 0 a window's level-0 position is not a whole number of level pixels when the
            # downsample is not whole, and read_region resamples it: such windows come from the level's
            # virtual TIFF instead, whose tiles are read_region calls too (OpenSlideSlide._read_tile),
            # so they are OpenSlide's rendering of the level, resampled off the first tile row/column
            raw = self.slide.read_region(level, x, y, width, height)  # OpenSlide, straight
            if self.method is None:
                return raw
            if self._table and raw.shape[-1] == 3:
                return self._colour_table()(raw)
            return self.method.apply_array(raw, params_at_level(self.slide, self.params, level))
        if self.method is None or self._table:
            # straight from the file's JPEG tiles, decoding only the window's part of each, where the
            # slide has a checked reader for the level (VipsSlide.jpeg_tiles; None from read: a tile
            # to read through libvips, which says what is wrong with it)
            direct = self.slide.jpeg_tiles(level)
            raw = direct.read(x, y, width, height) if direct is not None else None
            if raw is not None:
                if self.method is None:
                    return raw
                program = self._program()
                if program is not None:
                    return program.run(raw, raw)  # (the program's cube when it has one)
                return self._colour_table()(raw)
        if self._table:
            image = self._cube_image(level)
            if image is not None:  # the kernel's cube inside the fetch: no table to look up after it
                return self._fetch_cube(level, image, x, y, width, height)
            raw_image = self._raw_images.get(level)
            if raw_image is None:
                raw_image = self.slide.level_image(level)
                if raw_image.bands == 3:  # a zero fourth band: the fetched bytes are the table's indices
                    raw_image = raw_image.bandjoin_const([0])
                raw_image = self._raw_images.setdefault(level, raw_image)
            if raw_image.bands == 4:
                raw = self._fetch(raw_image, x, y, width, height, copy=False)  # the table makes a new array
                return self._colour_table().map_rgbx(raw)
        return self._fetch(self.level_image(level), x, y, width, height)

    def _cube_image(self, level: int) -> pyvips.Image | None:
        """The level mapped lazily by the native kernel's program of this reader's fit (through a cube of
        its own, for a program that needs one), or None (the kernel is off or does not run this method,
        the slide is not RGB, or the program needs a cube and every reader slot is taken:
        :data:`vipsnorm._native.READER_CUBES`). Measured on random 256 px patches of a 20000 px slide with
        Macenko: 1.15-1.23 ms CPU a patch, against 1.25-1.30 through the numpy colour table and 1.02-1.10
        for raw ones."""
        state = self._cube_state()
        if state is None or state[2] is None:
            return None
        program, images = state[2], state[3]
        image = images.get(level, False)
        if image is False:
            raw = self.slide.level_image(level)
            made = program.image(raw) if raw.format == "uchar" and raw.bands == 3 else None
            image = images.setdefault(level, made)
        return image

    def _cube_state(self) -> tuple | None:
        """The kernel state of the current fit (see ``_cube``), made on first use; None when the kernel
        is off."""
        if not _native.available():
            return None
        state = self._cube
        if state is None or state[0] is not self.method or state[1] is not self.params:  # first, or a new fit
            with self._cube_lock:
                state = self._cube
                if state is None or state[0] is not self.method or state[1] is not self.params:
                    state = self._cube = self._new_cube()
                    self._local = threading.local()  # (the old fit's regions and images go with the old one)
        return state

    def _program(self):
        """The kernel's program of the current fit (with its cube, when it needs one and has a slot), or
        None (as for :meth:`_cube_image`)."""
        state = self._cube_state()
        return None if state is None else state[2]

    @property
    def cube(self) -> bool:
        """Whether windows of this reader's fit are mapped by a kernel program of its own (so far), through
        a cube of its own when the program needs one."""
        return self._cube is not None and self._cube[2] is not None

    def _new_cube(self) -> tuple:
        """The cube state of the current fit: a slot claimed before a cube is built (for a program that
        needs one), and given back when there is nothing to hold (no kernel program, a program without a
        cube, no memory for a cube, a slide not RGB)."""
        method, params = self.method, self.params
        level0 = self.slide.level_image(0)
        program = None
        if level0.format == "uchar" and level0.bands == 3:
            # (made before a slot is sought: a program that runs faster than a cube, the luma's change
            # alone, needs none; a reader beyond the slots makes a stain program in vain, a few ms a fit)
            program = method.kernel_program(params)
            if program is not None and program.needs_cube:
                if self._cube_slot is None and _native.claim_reader_cube():
                    self._cube_slot = weakref.finalize(self, _native.release_reader_cube)
                try:
                    program = program.build_cube() if self._cube_slot is not None else None
                except MemoryError:
                    program = None
        if (program is None or not program.needs_cube) and self._cube_slot is not None:
            self._cube_slot()  # (runs release_reader_cube once, now)
            self._cube_slot = None
        return (method, params, program, {})

    def _fetch_cube(self, level: int, image: pyvips.Image, x: int, y: int, width: int, height: int) -> np.ndarray:
        """A window of a cube image, through a region kept by this reader for the calling thread (not
        the process-wide per-thread cache, whose images would keep their cubes after the reader)."""
        if width * height > _KEPT_REGION_PIXELS:
            return self._fetch(image, x, y, width, height)  # (a region of its own)
        regions = getattr(self._local, "regions", None)
        if regions is None:
            regions = self._local.regions = {}
        kept = regions.get(level)
        if kept is None or kept[0] is not image:
            kept = regions[level] = (image, pyvips.Region.new(image))
        return self._fetch(image, x, y, width, height, region=kept[1])

    def _colour_table(self):
        """The process's colour table of this reader's fit; its key (a repr of the params, 10 us) is kept
        while ``method`` and ``params`` stay the same objects."""
        method, params, key = self._table_for
        if method is not self.method or params is not self.params:
            key = table_key(self.method, self.params)
            self._table_for = (self.method, self.params, key)
        return shared_colour_table(self.method, self.params, key)

    def _fetch(
        self, image: pyvips.Image, x: int, y: int, width: int, height: int, copy: bool = True, region=None
    ) -> np.ndarray:
        if region is None:
            region = _thread_region(image) if width * height <= _KEPT_REGION_PIXELS else pyvips.Region.new(image)
        data = self.slide.decode(lambda: region.fetch(x, y, width, height))  # (under FILE_LOCK: read)
        return np.frombuffer(bytearray(data) if copy else data, np.uint8).reshape(height, width, image.bands)

    def read_patch(self, patch: Patch) -> np.ndarray:
        """The pixels of ``patch`` (of this slide)."""
        return self.read(patch.level, patch.x, patch.y, patch.size, patch.size)


# --------------------------------------------------------------------------------------------------
# writing one slide


@dataclass(frozen=True)
class PatchJob:
    """What ``vipsnorm patches`` does with every slide (the same for all of them).

    ``random=None`` cuts the grid (``stride``, default ``size``); ``random=N`` draws ``N`` positions
    (``seed``, an integer >= 0; ``overlap=False``: windows that share no pixel). ``format`` is one of
    :data:`FORMATS`; ``shard_size`` samples per tar shard.
    """

    size: int = 256
    level: int | None = None
    mpp: float | None = None
    stride: int | None = None
    min_tissue: float = 0.5
    random: int | None = None
    seed: int = 0
    format: str = "png"
    quality: int = 90
    shard_size: int = 1000
    overlap: bool = True

    def __post_init__(self):
        _check_size(self.size)
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {self.format!r}")
        if self.level is not None and self.mpp is not None:
            raise ValueError("give a level or a pixel size (mpp), not both")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be positive, not {self.stride}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue must be within 0..1, not {self.min_tissue}")
        if self.random is not None and self.random < 1:
            raise ValueError(f"the number of random patches must be positive, not {self.random}")
        _check_seed(self.seed)
        if not self.overlap and self.random is None:
            raise ValueError("overlap=False (--no-overlap) is for random patches: give their number (--random N)")
        if self.shard_size < 1:
            raise ValueError(f"shard size must be positive, not {self.shard_size}")
        if not 1 <= self.quality <= 100:
            raise ValueError("quality must be within 1..100")

    def output_settings(self) -> dict:
        """The settings that decide a slide's outputs, each only where it applies (``quality`` for
        ``jpg``, ``shard_size`` for ``tar``, ``stride`` for the grid, ``seed`` and ``overlap`` for
        random patches; no level and no pixel size both mean level 0): what :func:`patch_config`
        hashes, so that changing an option with no effect redoes nothing."""
        where = {"level": self.level or 0} if self.mpp is None else {"mpp": self.mpp}
        settings = {"size": self.size, **where, "min_tissue": self.min_tissue, "format": self.format}
        if self.random is None:
            settings["stride"] = self.size if self.stride is None else self.stride
        else:
            settings.update(random=self.random, seed=self.seed, overlap=self.overlap)
        if self.format == "jpg":
            settings["quality"] = self.quality
        if self.format == "tar":
            settings["shard_size"] = self.shard_size
        return settings


def patch_config(
    job: PatchJob, method: Method | None = None, params: Params | None = None, options: Options = Options()
) -> str:
    """What makes two runs' patches of a slide the same: the placement and output settings
    (:meth:`PatchJob.output_settings`), the reader backend, and, when the patches are normalized, the
    method with its options and target, fixed parameters and fitting options
    (:func:`vipsnorm.batch.config_hash`). 16 hex digits of a SHA-256.

    ``--format coords`` writes no pixels, so the method does not count there.
    """
    normalized = method is not None and job.format != "coords"
    data = {
        "patches": job.output_settings(),
        "backend": options.backend,
        "normalization": config_hash(method, params, options) if normalized else None,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SlideResult:
    """What happened to one slide: ``status`` ``ok``, ``error`` or ``skipped`` (committed by an earlier
    run with the same ``config`` from the same, unchanged input: its outputs and rows are kept, and
    ``patches`` is empty; ``count`` says how many there are).

    ``outputs`` are the slide's outputs relative to the output folder, each with its size in bytes
    (``None`` for a folder of patch files); ``output_size`` is the bytes of patches written in all.
    """

    input: Path
    name: str = ""
    status: str = "ok"
    error: str | None = None
    patches: list[Patch] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    level: int | None = None
    mpp: float | None = None
    asked: int | None = None
    params: Params | None = None
    seconds: float = 0.0
    config: str = ""
    input_size: int | None = None
    input_mtime_ns: int | None = None
    outputs: list[tuple[str, int | None]] = field(default_factory=list)
    output_size: int | None = None
    count: int = 0
    worker: str = ""

    def rows(self) -> list[dict]:
        """Its rows of the coordinates table."""
        return [p.to_row(f, self.name) for p, f in zip(self.patches, self.files)]

    def line(self) -> str:
        """One line for the command line."""
        if self.status == "error":
            return f"error  {self.error}"
        if self.status == "skipped":
            return f"skip   {self.input} -> {self.count} patches (finished by an earlier run)"
        where = f"level {self.level}" + ("" if self.mpp is None else f", {self.mpp:.3g} um/px")
        short = ""
        if self.asked is not None and self.count < self.asked:
            short = f" of {self.asked} asked (too little tissue for more)"
        return f"ok     {self.input} -> {self.count} patches{short} ({where}, {self.seconds:.1f} s)"

    def record(self) -> dict:
        """What the slide's rows file says of a committed slide (see :func:`extract_slides`)."""
        return {
            "config": self.config,
            "input": os.path.abspath(self.input),
            "input_size": self.input_size,
            "input_mtime_ns": self.input_mtime_ns,
            "level": self.level,
            "mpp": self.mpp,
            "patches": self.count,
            "outputs": [list(o) for o in self.outputs],
            "output_size": self.output_size,
        }

    @classmethod
    def skipped(cls, path: str | os.PathLike[str], name: str, record: dict) -> "SlideResult":
        """The result of a slide that an earlier run committed (``record``: :meth:`record`)."""
        return cls(
            input=Path(path),
            name=name,
            status="skipped",
            level=record.get("level"),
            mpp=record.get("mpp"),
            config=record["config"],
            input_size=record["input_size"],
            input_mtime_ns=record["input_mtime_ns"],
            outputs=[tuple(o) for o in record.get("outputs", ())],
            output_size=record.get("output_size"),
            count=int(record.get("patches") or 0),
        )


def _encode_png(array: np.ndarray) -> bytes:
    return pyvips.Image.new_from_array(np.ascontiguousarray(array)).write_to_buffer(".png")


def _encode(array: np.ndarray, fmt: str, quality: int) -> bytes:
    if fmt == "png":
        return _encode_png(array)
    if fmt == "jpg":
        return pyvips.Image.new_from_array(np.ascontiguousarray(array)).write_to_buffer(".jpg", Q=quality)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _temp_name(directory: Path, name: str, suffix: str = "") -> Path:
    return directory / f".{name}{PART_MARKER}{secrets.token_hex(4)}{suffix}"


@contextlib.contextmanager
def _writing(output: Path, what: str = "the output"):
    """The block's OSErrors as an :class:`OutputError` naming ``output`` (the file as the user knows it,
    not its temporary name): a write on a full disk fails with an error that names no file."""
    try:
        yield
    except OSError as exc:
        raise OutputError(output, f"cannot write {what} ({exc.strerror or exc})") from exc


class _FolderWriter:
    """Patch files in a temporary folder, renamed to ``OUT/NAME`` when the slide is complete."""

    #: Marks a folder this writer made: the only kind a later run may replace.
    MARKER = ".vipsnorm-patches"

    def __init__(self, out_dir: Path, name: str, fmt: str, quality: int):
        self.out_dir, self.name, self.fmt, self.quality = out_dir, name, fmt, quality
        self.size = 0
        self.temp = _temp_name(out_dir, name)
        with _writing(out_dir / name):
            self.temp.mkdir()
            try:
                (self.temp / self.MARKER).write_text(
                    "patches written by vipsnorm; this folder is replaced when they are made again\n"
                )
            except BaseException:
                self.abort()
                raise

    def write(self, key: str, array: np.ndarray, meta: dict) -> str:
        file = f"{key}.{self.fmt}"
        data = _encode(array, self.fmt, self.quality)
        with _writing(self.out_dir / self.name / file):
            (self.temp / file).write_bytes(data)
        self.size += len(data)
        return f"{self.name}/{file}"

    def outputs(self) -> list[tuple[str, int | None]]:
        """What :meth:`commit` made: the folder (no size: a folder's is meaningless)."""
        return [(self.name, None)]

    def planned(self) -> list[str]:
        """The names :meth:`commit` will make, relative to the output folder."""
        return [self.name]

    def commit(self) -> None:
        final = self.out_dir / self.name
        old = None
        if final.exists() or final.is_symlink():
            if not final.is_dir() or final.is_symlink() or not (final / self.MARKER).is_file():
                # never replace a folder vipsnorm did not make (a MIRAX slide's data folder, say)
                raise OutputError(
                    final, "exists and is not a folder of patches made by vipsnorm; move it away or choose another -o folder"
                )
            old = _temp_name(self.out_dir, self.name, ".old")
            with _writing(final):
                os.replace(final, old)
        with _writing(final):
            os.replace(self.temp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.temp, ignore_errors=True)


class _TarWriter:
    """WebDataset-style shards ``OUT/NAME-000000.tar`` (``KEY.png`` and ``KEY.json`` per sample, in
    order), each written under a temporary name and all renamed when the slide is complete."""

    def __init__(self, out_dir: Path, name: str, shard_size: int):
        self.out_dir, self.name, self.shard_size = out_dir, name, shard_size
        self.shards: list[tuple[Path, Path]] = []  # (temp, final)
        self.tar: tarfile.TarFile | None = None
        self.count = 0

    def _add(self, member: str, data: bytes) -> None:
        info = tarfile.TarInfo(member)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, array: np.ndarray, meta: dict) -> str:
        png = _encode_png(array)
        if self.tar is None or self.count == self.shard_size:
            if self.shards:
                with _writing(self.shards[-1][1]):
                    self._close()
            final = self.out_dir / f"{self.name}-{len(self.shards):06d}.tar"
            temp = _temp_name(self.out_dir, final.stem, ".tar")
            self.shards.append((temp, final))
            with _writing(final):
                self.tar = tarfile.open(temp, "w")
            self.count = 0
        with _writing(self.shards[-1][1]):
            self._add(f"{key}.png", png)
            self._add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self.count += 1
        return self.shards[-1][1].name

    def _close(self) -> None:
        tar, self.tar = self.tar, None  # closed once, even when closing fails (the file is closed then)
        if tar is not None:
            tar.close()

    def outputs(self) -> list[tuple[str, int | None]]:
        """What :meth:`commit` made: the shards and their sizes."""
        return [(final.name, final.stat().st_size) for _, final in self.shards]

    def planned(self) -> list[str]:
        """The names :meth:`commit` will make, relative to the output folder."""
        return [final.name for _, final in self.shards]

    @property
    def size(self) -> int:
        return sum(size for _, size in self.outputs())

    def commit(self) -> None:
        if self.shards:
            with _writing(self.shards[-1][1]):
                self._close()
        for temp, final in self.shards:
            with _writing(final):
                os.replace(temp, final)
        # shards of an earlier run of this slide beyond the new last one
        pattern = re.compile(re.escape(self.name) + r"-(\d{6})\.tar")
        for path in self.out_dir.glob(f"{glob.escape(self.name)}-*.tar"):
            match = pattern.fullmatch(path.name)
            if match and int(match.group(1)) >= len(self.shards):
                path.unlink()

    def abort(self) -> None:
        """Delete the temporary shards; never raises (closing a shard on a full disk fails again: the
        error that made the slide fail is the one to report)."""
        with contextlib.suppress(OSError):
            self._close()
        for temp, _ in self.shards:
            with contextlib.suppress(OSError):
                temp.unlink()


class _NoWriter:
    size = None

    def write(self, key: str, array: np.ndarray, meta: dict) -> str:
        return ""

    def outputs(self) -> list[tuple[str, int | None]]:
        return []

    def planned(self) -> list[str]:
        return []

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _writer(out_dir: Path, name: str, job: PatchJob):
    if job.format == "coords":
        return _NoWriter()
    if job.format == "tar":
        return _TarWriter(out_dir, name, job.shard_size)
    return _FolderWriter(out_dir, name, job.format, job.quality)


@one_file_at_a_time
def extract_slide(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    job: PatchJob,
    method: Method | None = None,
    *,
    params: Params | None = None,
    options: Options = Options(),
    name: str | None = None,
    config: str | None = None,
) -> SlideResult:
    """Place, read and write the patches of one slide, and commit them with their rows of the table;
    errors are returned in the result and leave no output behind.

    Parameters
    ----------
    method : Method, optional
        Normalize with it, fitted once on the slide (:func:`vipsnorm.engine.fit_slide` with ``options``:
        the same fit as ``vipsnorm normalize``), or with fixed ``params``. None: raw pixels.
    name : str, optional
        The output name (default: the slide's file name without suffix).
    config : str, optional
        :func:`patch_config` of these settings (computed when not given), recorded with the rows.

    Notes
    -----
    The commit, in this order: the slide's earlier outputs (those its rows file's record lists, and
    those a killed commit left listed) and the new ones are listed in
    ``OUT/.vipsnorm-rows/NAME.uncommitted`` (atomically, by rename); the slide's rows file
    ``OUT/.vipsnorm-rows/NAME.csv`` is deleted (from here on the slide is not finished); the outputs
    written under temporary names are renamed into place (replacing an earlier run's of the same
    names); the rows file is written again (atomically, by rename) with its first line recording the
    settings (``config``), the input's size and mtime as they were before it was read, and the
    outputs; then the listed outputs that are not the new ones (another ``format``: a folder after
    shards or shards after a folder; fewer shards; any for ``coords``) are deleted, and the list. A
    kill at any moment leaves either that complete record or none, and every output that no record
    lists is on the list, deleted by the next run of the slide (redone, or skipped when the kill came
    after the record). Only names of the slide's own outputs are ever deleted: its folder ``NAME``
    when it holds the marker of a folder of patches, and its shards ``NAME-000000.tar``.
    """
    start = time.perf_counter()
    path = Path(path)
    result = SlideResult(input=path, name=name or output_name(path), asked=job.random)
    result.config = patch_config(job, method, params, options) if config is None else config
    out_dir = Path(out_dir)
    writer = None
    try:
        st = os.stat(path)  # before the slide is read: a change while it is read redoes it next time
        result.input_size, result.input_mtime_ns = st.st_size, st.st_mtime_ns
    except OSError:
        pass  # opening the slide reports it
    try:
        if not out_dir.is_dir():
            raise OutputError(out_dir, "output folder does not exist")
        with open_slide(path, max_pixels=options.max_pixels, backend=options.backend) as slide:
            level = choose_level(slide, level=job.level, mpp=job.mpp)
            result.level, result.mpp = level, level_mpp(slide, level)
            if job.random is None:
                patches = grid_patches(slide, job.size, level=level, stride=job.stride, min_tissue=job.min_tissue)
            else:
                patches = random_patches(
                    slide,
                    job.size,
                    job.random,
                    level=level,
                    min_tissue=job.min_tissue,
                    seed=job.seed,
                    overlap=job.overlap,
                )
            if job.format == "coords":
                method = None  # the table alone: no pixels, so nothing to fit
            elif method is not None and params is None:
                params = fit_slide(slide, method, options)
            elif method is not None and params.method != method.name:
                raise ValueError(f"the params are for {params.method}, not {method.name}")
            result.params = params
            reader = PatchReader(slide, method, params) if job.format != "coords" else None
            writer = _writer(out_dir, result.name, job)
            files = []
            for patch in patches:
                row = patch.to_row(name=result.name)
                array = reader.read_patch(patch) if reader is not None else None
                meta = {k: v for k, v in row.items() if k != "file"}
                meta.update(mpp=patch.mpp, tissue=None if math.isnan(patch.tissue) else round(patch.tissue, 4))
                meta["method"] = None if method is None else method.name
                files.append(writer.write(row["key"], array, meta))
            # the slide's rows, next to its outputs: the table is rebuilt from these, and a rerun skips
            # the slide when they record its settings and input (see Notes)
            rows_file = out_dir / ROWS_DIR / f"{result.name}.csv"
            # every output of the slide that may be on disk while no record lists it, so that a run
            # killed in the commit leaves none the next run does not know (see Notes)
            planned = writer.planned()
            at_stake = list(dict.fromkeys([*_earlier_outputs(out_dir, result.name), *planned]))
            if at_stake:
                with _writing(out_dir / ROWS_DIR / f"{result.name}{_UNCOMMITTED_SUFFIX}", "the list of outputs"):
                    _write_uncommitted(out_dir, result.name, at_stake)
            with _writing(rows_file, "the slide's rows"), contextlib.suppress(FileNotFoundError):
                rows_file.unlink()
            writer.commit()
            result.outputs, result.output_size = writer.outputs(), writer.size
            writer = None
            result.patches, result.files, result.count = patches, files, len(patches)
            with _writing(rows_file, "the slide's rows"):
                _write_rows(rows_file, result.rows(), record=result.record())
            _remove_uncommitted(out_dir, result.name, keep=planned)
    except VipsnormError as exc:
        result.status, result.error = "error", str(exc.about(path))
    except pyvips.Error as exc:
        result.status, result.error = "error", str(UnreadableImageError(path, f"libvips: {one_line(str(exc))}"))
    except (OSError, ValueError) as exc:
        result.status, result.error = "error", f"{path}: {one_line(str(exc))}"
    except Exception as exc:  # a bug must not stop the other slides; report it against the file
        result.status, result.error = "error", f"{path}: internal error ({type(exc).__name__}: {exc})"
    finally:
        if writer is not None:
            with contextlib.suppress(Exception):  # never over the error that made the slide fail
                writer.abort()
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------------
# many slides and the table


def read_table(path: str | os.PathLike[str]) -> list[dict]:
    """The rows of a coordinates table (:data:`TABLE_COLUMNS`, as strings)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_table(path: str | os.PathLike[str], rows: Iterable[dict]) -> Path:
    """Write a coordinates table (:data:`TABLE_COLUMNS`) atomically."""
    return _write_rows(Path(path), rows)


def _write_rows(path: Path, rows: Iterable[dict], record: dict | None = None) -> Path:
    """A table (atomically); with ``record``, a slide's rows file: its first line is
    :data:`_RECORD_TAG` and the record as JSON, then the table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        with open(temp, "w", newline="", encoding="utf-8") as f:
            if record is not None:
                f.write(_RECORD_TAG + json.dumps(record, sort_keys=True) + "\n")
            out = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
            out.writeheader()
            out.writerows(rows)
    return path


def _read_rows(path: Path) -> tuple[dict | None, list[dict]]:
    """A slide's rows file: its record (None in a file of an earlier version, which has none) and rows."""
    with open(path, newline="", encoding="utf-8") as f:
        first = f.readline()
        record = json.loads(first[len(_RECORD_TAG) :]) if first.startswith(_RECORD_TAG) else None
        if record is None:
            f.seek(0)
        return record, list(csv.DictReader(f))


def _read_record(path: Path) -> dict | None:
    """The record of a slide's rows file (its first line only), or None: no file, an earlier version's
    file, or one that cannot be read (then the slide is not finished)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        if first.startswith(_RECORD_TAG):
            record = json.loads(first[len(_RECORD_TAG) :])
            return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        pass
    return None


def _rows_files(out: Path) -> list[Path]:
    """The committed rows files (temporary ones, named ``.NAME.vipsnorm-part-...``, left out)."""
    return sorted(p for p in (out / ROWS_DIR).glob("*.csv") if not p.name.startswith("."))


#: A slide's list of its outputs that may be on disk while no record lists them (``OUT/.vipsnorm-rows/NAME``
#: with this suffix; see :func:`extract_slide`).
_UNCOMMITTED_SUFFIX = ".uncommitted"


def _is_output_name(name: str, output) -> bool:
    """True when ``output`` (relative to the output folder) is a name the outputs of the slide ``name``
    take: its folder of patches ``NAME`` or a shard ``NAME-000000.tar``."""
    return isinstance(output, str) and (
        output == name or re.fullmatch(re.escape(name) + r"-\d{6}\.tar", output) is not None
    )


def _listed_uncommitted(out: Path, name: str) -> list:
    """What the slide ``name``'s ``.uncommitted`` file lists ([] when there is none or it is damaged)."""
    try:
        listed = json.loads((out / ROWS_DIR / f"{name}{_UNCOMMITTED_SUFFIX}").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    outputs = listed.get("outputs") if isinstance(listed, dict) else None
    return outputs if isinstance(outputs, list) else []


def _earlier_outputs(out: Path, name: str) -> list[str]:
    """The outputs of earlier runs of the slide ``name``: those its rows file's record lists, and those
    a run killed in its commit left listed in the ``.uncommitted`` file (only names of this slide's
    outputs, whatever a damaged file says)."""
    found = []
    record = _read_record(out / ROWS_DIR / f"{name}.csv")
    if record is not None and isinstance(record.get("outputs"), list):
        found += [o[0] for o in record["outputs"] if isinstance(o, list) and o]
    found += _listed_uncommitted(out, name)
    return [o for o in dict.fromkeys(o for o in found if isinstance(o, str)) if _is_output_name(name, o)]


def _write_uncommitted(out: Path, name: str, outputs: list[str]) -> None:
    """List ``outputs`` of the slide ``name`` as on disk without a record, until its commit ends."""
    path = out / ROWS_DIR / f"{name}{_UNCOMMITTED_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        temp.write_text(json.dumps({"outputs": outputs}) + "\n", encoding="utf-8")


def _remove_uncommitted(out: Path, name: str, keep: Iterable[str]) -> None:
    """Delete the outputs that the slide ``name``'s ``.uncommitted`` file lists, except ``keep`` (those
    its record lists), then the file (kept when an output cannot be deleted: the next run tries
    again). A folder is deleted only if it holds the marker of a folder of patches, and is first
    renamed aside (``.NAME.vipsnorm-part-...``: a run killed while deleting it leaves a temporary
    folder that the next run of the slide deletes, not half a folder of patches)."""
    path = out / ROWS_DIR / f"{name}{_UNCOMMITTED_SUFFIX}"
    if not path.exists():
        return
    keep = set(keep)
    failed = False
    for output in _listed_uncommitted(out, name):
        if output in keep or not _is_output_name(name, output):
            continue
        where = out / output
        try:
            if output == name:
                if where.is_dir() and not where.is_symlink() and (where / _FolderWriter.MARKER).is_file():
                    aside = _temp_name(out, name, ".old")
                    os.replace(where, aside)
                    shutil.rmtree(aside, ignore_errors=True)
            elif where.is_symlink() or where.is_file():
                where.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            failed = True
    if not failed:
        with contextlib.suppress(OSError):
            path.unlink()


def rebuild_table(out_dir: str | os.PathLike[str]) -> Path:
    """``OUT/patches.csv`` from the rows every slide committed (``OUT/.vipsnorm-rows/NAME.csv``, written
    with its outputs), in name order: every slide patched into ``OUT``, by this run or an earlier one.

    Runs rebuilding the table of one ``OUT`` take turns (an advisory lock), so the temporary table of
    one is never taken for a killed run's leftover by another, which deletes those.

    Raises
    ------
    OutputError
        A slide's rows cannot be read, or the table cannot be written (a full disk): the table is left
        as it was.
    """
    out = Path(out_dir)
    table = out / TABLE
    with _table_lock(out) as locked:
        if locked:  # a temporary table now is a killed run's: a live one would hold the lock
            for leftover in out.glob(f".{glob.escape(table.stem)}{PART_MARKER}*{table.suffix}"):
                if PART_FILE.fullmatch(leftover.name) and leftover.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        leftover.unlink()
        with _writing(table, "the table"), atomic_path(table) as temp:
            with open(temp, "w", newline="", encoding="utf-8") as f:  # slide by slide: never every row in memory
                writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                for part in _rows_files(out):
                    try:
                        rows = _read_rows(part)[1]
                    except (OSError, csv.Error, UnicodeDecodeError, ValueError) as exc:
                        cause = f"cannot read these patch rows ({exc}); the table was not rewritten"
                        raise OutputError(part, cause) from None
                    writer.writerows(rows)
    return table


@contextlib.contextmanager
def _table_lock(out: Path):
    """Hold the advisory lock of ``OUT``'s table (``OUT/.vipsnorm-rows/.table.lock``); yields False
    where there is none (Windows)."""
    lock = out / ROWS_DIR / ".table.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(lock, f"cannot lock the table ({exc.strerror or exc})") from None
    fd, locked = open_locked(lock, os.O_RDWR, cannot_open="cannot lock the table ({})", busy=None)
    try:
        yield locked
    finally:
        os.close(fd)  # releases the lock


#: The columns of the manifest of ``vipsnorm patches`` (default ``OUT.manifest.csv``): one row per slide
#: and run (see :func:`extract_slides`).
MANIFEST_COLUMNS = COLUMNS[:9] + (
    "patches", "level", "mpp", "method", "params", "reference", "config", "seconds", "worker",
)  # fmt: skip
_SHARD_STEM = re.compile(r"(?P<name>.+)-\d{6}")


class _SlideTask(NamedTuple):
    """One slide of a batch: its position in the inputs, its path and output name, and the input's size
    and mtime when the batch was planned (None: it could not be read)."""

    index: int
    path: str
    name: str
    size: int | None = None
    mtime_ns: int | None = None


def _extract_group(job: tuple, group: list[_SlideTask]) -> list[tuple[int, SlideResult]]:
    """A batch task (on a worker): :func:`extract_slide` for each slide of the group."""
    out, patch_job, method, params, options, config = job
    worker = worker_id()
    done = []
    for t in group:
        result = extract_slide(
            t.path, out, patch_job, method, params=params, options=options, name=t.name, config=config
        )
        result.worker = worker
        done.append((t.index, result))
    return done


def _other_input(record: dict | None, task: _SlideTask) -> str | None:
    """The input that an earlier run patched under this slide's output name, when it is another file
    than ``task``'s; else None.

    Not another file: the same absolute path; the same file by a link; or the same file moved (an
    archive moved to another disk or folder): the recorded path names no file any more, and the
    recorded file name, size and mtime (nanoseconds) are this input's. A moved slide is then redone
    like a changed one (:func:`_finished` asks for the same path), not skipped: its path is written in
    every patch's metadata and in its rows of the table, which would name the old place. Requiring
    the old path to be gone keeps two different slides of one name that both exist (``labA/x.tif``
    and ``labB/x.tif``: copies of one size, their mtimes equal when a tar gave them whole seconds)
    apart: taking them for one would silently replace the first's patches.
    """
    recorded = None if record is None else record.get("input")
    if not isinstance(recorded, str) or recorded == os.path.abspath(task.path):
        return None
    try:
        if os.path.samefile(recorded, task.path):
            return None
        return recorded  # both exist: two files
    except FileNotFoundError:  # the recorded path names nothing now: moved, if it is the same file
        pass
    except OSError:  # (the recorded path cannot be asked: taken for another input, as before)
        return recorded
    moved = (
        os.path.basename(recorded) == os.path.basename(task.path)
        and task.size is not None
        and record.get("input_size") == task.size
        and record.get("input_mtime_ns") == task.mtime_ns
    )
    return None if moved else recorded


def _finished(out: Path, task: _SlideTask, config: str, record: dict | None) -> dict | None:
    """``record`` (of ``task``'s rows file) if the slide is finished and nothing changed since: it records
    ``config``, this input (absolute path) with the size and mtime it has now, and outputs that are all
    still there (a folder of patches with its marker; shards with their recorded sizes)."""
    if record is None or task.size is None:
        return None
    if record.get("config") != config or record.get("input") != os.path.abspath(task.path):
        return None
    if record.get("input_size") != task.size or record.get("input_mtime_ns") != task.mtime_ns:
        return None
    try:
        for name, size in record.get("outputs", ()):
            where = out / name
            if size is None:
                if not (where / _FolderWriter.MARKER).is_file():
                    return None
            elif where.stat().st_size != size:
                return None
    except (OSError, TypeError, ValueError):  # an output gone, or a record not of this form
        return None
    return record


def _remove_parts(out: Path, names: set[str]) -> None:
    """Delete what runs killed while writing the slides ``names`` into ``out`` left behind: temporary
    patch folders and shards, a folder being replaced (``.old``) and a rows file being written (not a
    temporary table: :func:`rebuild_table` deletes those under its lock). Those of other slides are left
    alone (another run may be writing them)."""
    for folder in (out, out / ROWS_DIR):
        try:
            with os.scandir(folder) as it:
                entries = [e for e in it if e.name.startswith(".") and PART_MARKER in e.name]
        except OSError:
            continue
        for entry in entries:
            match = PART_FILE.fullmatch(entry.name)
            if match is None or (folder == out and entry.name.endswith(Path(TABLE).suffix)):
                continue  # (a .csv here is the table's, even of a slide named like the table)
            stem = match["stem"]
            shard = _SHARD_STEM.fullmatch(stem)
            if stem not in names and (shard is None or shard["name"] not in names):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def extract_slides(
    paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    job: PatchJob,
    method: Method | None = None,
    *,
    params: Params | None = None,
    options: Options = Options(),
    on_result: Callable[[SlideResult], None] | None = None,
    manifest: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    reference: str = "",
    keep_patches: bool = True,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
) -> list[SlideResult]:
    """:func:`extract_slide` for every slide not finished before, through the batch engine, each result
    recorded in the manifest as it arrives; then the coordinates table ``OUT/patches.csv``.

    Parameters
    ----------
    paths : sequence of path-like
        The slides. Two with the same output name (``a/x.svs`` and ``b/x.tif``) would overwrite each
        other: the second is an error, and so is one whose output name an earlier run in ``out_dir``
        gave another input (see Notes).
    out_dir : path-like
        The output folder (created if missing).
    job, method, params, options
        As for :func:`extract_slide`.
    on_result : callable, optional
        Called in this process with each :class:`SlideResult` as it is recorded (``skipped`` ones first).
    manifest : path-like, optional
        The CSV manifest (:data:`MANIFEST_COLUMNS`; default ``OUT.manifest.csv`` beside ``OUT``, as
        :func:`vipsnorm.batch.default_manifest`). One row per slide is appended as its result arrives.
    overwrite : bool
        Redo every slide, even those finished before, and replace the patches of another input that an
        earlier run wrote under a slide's output name.
    reference : str
        What the manifest names as the reference (a file, for the record).
    keep_patches : bool
        False: drop each result's ``patches`` and ``files`` once ``on_result`` has seen it (``count``
        stays), so that a batch of many slides does not hold every patch in memory.
    client, scheduler, workers
        Where the slides run (one task each): one child process for a single slide, this process for
        ``workers=0``, else on a Dask cluster, as :func:`vipsnorm.batch.runner` chooses.

    Returns
    -------
    list of SlideResult
        In input order: ``ok``, ``error``, or ``skipped`` (finished before).

    Raises
    ------
    OutputError
        The manifest cannot be opened (or another run holds it, or it is not a patches manifest), or a
        slide's committed rows cannot be read for the table.

    Notes
    -----
    **One input per output name.** A slide whose output name an earlier run gave another input in
    ``OUT`` (``labA/x.tif``, now ``labB/x.tif``: another absolute path, not a link to the same file) is
    an error, its rows and outputs left as they are, unless ``overwrite`` replaces them. The same input
    changed (size or mtime) or with other settings is redone, and so is the same input moved (the
    recorded path names no file any more, and the file name, size and mtime are the same): its patches
    and rows are written again naming its new path.

    **Resume.** What decides that a slide is finished is its rows file, ``OUT/.vipsnorm-rows/NAME.csv``,
    not the manifest: the worker that writes the outputs commits it (see :func:`extract_slide`: the old
    file deleted before the outputs are renamed into place, the new one written after, atomically),
    so it is finished exactly when its outputs are complete, whatever is killed when (this process,
    a worker, or both), and even when the manifest row of a finished slide was lost with its process.
    A slide is skipped when that file records the same :func:`patch_config`, this input (absolute path)
    with its current size and mtime, and outputs that still exist (shards with their sizes). Temporary
    outputs of a killed run (``.NAME.vipsnorm-part-...``) are deleted for this run's slides when it
    starts and ends, and so are outputs that no record lists which a killed commit left listed (see
    :func:`extract_slide`), of skipped slides too. The manifest is the log of what each run did
    (``skipped`` rows repeat the record).
    """
    from ..batch import runner as batch_runner

    out = Path(os.path.abspath(out_dir))
    manifest_path = Path(os.path.abspath(manifest)) if manifest is not None else default_manifest(out)
    out.mkdir(parents=True, exist_ok=True)
    config = patch_config(job, method, params, options)
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(2)
    normalized = method is not None and job.format != "coords"
    shared = {"run": run_id, "method": method.name if normalized else "", "reference": reference, "config": config}
    results: dict[int, SlideResult] = {}

    # SIGTERM (timeout, SLURM, docker stop) cleans up as Ctrl-C does, then ends the process
    with terminate_as_interrupt(), Manifest.open(manifest_path, columns=MANIFEST_COLUMNS) as book:
        if "patches" not in book.header:
            raise OutputError(
                manifest_path, "is not a manifest of vipsnorm patches (no 'patches' column); choose another --manifest"
            )

        def collect(done: list[tuple[int, SlideResult]]) -> None:
            rows = []
            for index, result in done:
                results[index] = result
                rows.append({**_manifest_row(result, out, fixed=params is not None), **shared})
            book.append(rows)
            for _, result in done:
                if on_result is not None:
                    on_result(result)
                if not keep_patches:
                    result.patches, result.files = [], []

        def error(task: _SlideTask, cause: str) -> tuple[int, SlideResult]:
            result = SlideResult(input=Path(task.path), name=task.name, status="error", error=f"{task.path}: {cause}")
            result.config, result.input_size, result.input_mtime_ns = config, task.size, task.mtime_ns
            return task.index, result

        claimed: dict[str, str] = {}
        mine: set[str] = set()  # the names this run writes: their leftovers are its to delete
        todo: list[_SlideTask] = []
        early: list[tuple[int, SlideResult]] = []
        for index, path in enumerate(paths):
            size, mtime_ns, unusable = input_stat(str(path))
            task = _SlideTask(index, str(path), output_name(path), size, mtime_ns)
            if unusable is not None:
                early.append(error(task, unusable.removeprefix(f"{task.path}: ")))
                continue
            if task.name in claimed:
                early.append(error(task, f"has the same output name ({task.name}) as {claimed[task.name]}; rename one of them"))
                continue
            claimed[task.name] = task.path
            record = _read_record(out / ROWS_DIR / f"{task.name}.csv")
            other = None if overwrite else _other_input(record, task)
            if other is not None:
                cause = (
                    f"has the same output name ({task.name}) as {other}, which an earlier run patched into {out}; "
                    "give another -o folder or rename one of them (--overwrite replaces that slide's patches)"
                )
                early.append(error(task, cause))
                continue
            mine.add(task.name)
            record = None if overwrite else _finished(out, task, config, record)
            if record is None:
                todo.append(task)
            else:
                early.append((index, SlideResult.skipped(task.path, task.name, record)))
                # outputs that a commit killed after writing this record left listed (replaced ones)
                _remove_uncommitted(out, task.name, keep=[o[0] for o in record.get("outputs", ())])
            if len(early) >= 10000:
                collect(early)
                early = []
        collect(early)
        _remove_parts(out, mine)
        ended = False
        try:
            if todo:
                engine = batch_runner(len(todo), client, scheduler, workers)
                try:
                    engine.run(
                        _extract_group, (out, job, method, params, options, config), [[t] for t in todo], collect, error
                    )
                finally:
                    engine.close()
            ended = True
        finally:
            _remove_parts(out, mine)
            if not ended:
                # interrupted (Ctrl-C, SIGTERM) or failed: every slide finished so far committed its
                # rows with its outputs, so the table can list them; never over the error on its way
                with contextlib.suppress(Exception):
                    rebuild_table(out)
        rebuild_table(out)
    return [results[i] for i in sorted(results)]


def _manifest_row(result: SlideResult, out: Path, fixed: bool) -> dict:
    """A slide's manifest row (without the columns every row of a run shares)."""
    ok = result.status == "ok"
    return {
        "input": os.path.abspath(result.input),
        "input_size": result.input_size,
        "input_mtime_ns": result.input_mtime_ns,
        "output": ";".join(str(out / name) for name, _ in result.outputs),
        "output_size": result.output_size,
        "status": result.status,
        "error": result.error,
        "patches": None if result.status == "error" else result.count,
        "level": result.level,
        "mpp": result.mpp,
        "params": result.params.to_json() if ok and not fixed and result.params is not None else "",
        "seconds": round(result.seconds, 3) if result.status != "skipped" else None,
        "worker": result.worker,
    }
