"""vipsnorm: streaming exposure and colour normalization for whole-slide images and image collections.

>>> import vipsnorm
>>> slide = vipsnorm.open("slide.svs")                         # doctest: +SKIP
>>> method = vipsnorm.Equalize()
>>> params = method.fit(vipsnorm.sample_slide(slide))           # doctest: +SKIP
>>> image = method.apply(slide.level_image(0), params)         # lazy pyvips.Image  # doctest: +SKIP
"""

__version__ = "0.1.0"

from .batch import BatchSummary, fit_batch, normalize_batch, read_manifest  # noqa: E402
from .engine import Options, Result, build_method, fit_files, load_reference, normalize_file  # noqa: E402
from .errors import (  # noqa: E402
    FlatImageError,
    ImageTooLargeError,
    InvalidReferenceError,
    NoTissueError,
    OutputError,
    UnreadableImageError,
    UnsupportedImageError,
    VipsnormError,
)
from .io.slide import Level, Slide, open_slide  # noqa: E402
from .io.write import write_image, write_pyramid  # noqa: E402
from .methods import METHODS, Equalize, Match, Params, Sample, Stretch  # noqa: E402
from .reference import Reference, load_reference_json, save_reference  # noqa: E402
from .sampling import sample_slide, tissue_mask  # noqa: E402

#: ``vipsnorm.open(path)``: the one entry point for reading (see :func:`open_slide`).
open = open_slide  # noqa: A001

__all__ = [
    "open",
    "open_slide",
    "Slide",
    "Level",
    "sample_slide",
    "tissue_mask",
    "METHODS",
    "Stretch",
    "Equalize",
    "Match",
    "Params",
    "Sample",
    "Reference",
    "save_reference",
    "load_reference_json",
    "load_reference",
    "build_method",
    "normalize_file",
    "fit_files",
    "normalize_batch",
    "fit_batch",
    "BatchSummary",
    "read_manifest",
    "Options",
    "Result",
    "write_pyramid",
    "write_image",
    "VipsnormError",
    "UnreadableImageError",
    "UnsupportedImageError",
    "ImageTooLargeError",
    "NoTissueError",
    "FlatImageError",
    "OutputError",
    "InvalidReferenceError",
]
