"""The batch engine: many inputs normalized (or sampled for ``vipsnorm fit``) in parallel on Dask,
resumable from a CSV manifest.

- :mod:`.inputs`: inputs from paths, folders and list files; the output tree; part-file cleanup.
- :mod:`.manifest`: the append-only CSV of what happened to every input.
- :mod:`.run`: :func:`normalize_batch` and :func:`fit_batch`.
- :mod:`.cluster`: Dask (imported only when a cluster is used).
"""

from .inputs import DEFAULT_INCLUDE, discover, plan, safe_relative
from .manifest import COLUMNS, Manifest, read_manifest
from .run import SCHEDULER_ENV, BatchSummary, default_manifest, fit_batch, normalize_batch, runner

__all__ = [
    "normalize_batch",
    "fit_batch",
    "runner",
    "BatchSummary",
    "default_manifest",
    "read_manifest",
    "Manifest",
    "COLUMNS",
    "discover",
    "plan",
    "safe_relative",
    "DEFAULT_INCLUDE",
    "SCHEDULER_ENV",
]
