"""Datasets over (slide, coordinates) that return normalized patches: PyTorch and Keras.

:class:`PatchSource` holds what a dataset needs and nothing that cannot be pickled: the patches
(:class:`~vipsnorm.training.patches.Patch`, e.g. from :func:`~vipsnorm.training.patches.plan_patches` or
the ``patches.csv`` of ``vipsnorm patches``), their labels, the normalization method and every slide's
fitted parameters (fitted once, when the dataset is made, as ``vipsnorm normalize`` fits them), and an
optional transform. Slides are opened lazily, once per process, the first time a patch of theirs is
read (at most ``max_open`` at a time), and never pickled: a dataset is safe to hand to DataLoader
workers, forked or spawned, and to Keras' multiprocessing.

``PatchDataset`` (PyTorch, a map-style ``torch.utils.data.Dataset``) and ``KerasPatchDataset`` (a Keras 3
``keras.utils.PyDataset`` of batches) are made on first use: torch and keras are imported then, not
with this module (``pip install 'vipsnorm[torch]'`` / ``'vipsnorm[keras]'``).

Worker processes
    libvips cannot be used in a process forked from one whose libvips worker threads were running (any
    slide read or fit starts them): the child hangs on its first libvips call. Such forked workers get
    a clear error instead; start them with ``multiprocessing_context="forkserver"`` (what
    ``PatchDataset.loader`` does) or ``"spawn"``, or, with Keras, use threads
    (``use_multiprocessing=False``, the default) or the ``spawn`` start method. Threads of one process
    read patches one at a time (:data:`vipsnorm.io.slide.FILE_LOCK`: a damaged tile is told only by
    libvips' process-wide error buffer); the augmentations run in parallel beside them.

Random augmentations
    With ``seed`` set, item ``i`` of epoch ``e`` is transformed with its own generator
    ``numpy.random.default_rng([seed, e, i])``, passed as ``transform(image, rng=...)`` to a transform
    that takes an ``rng`` keyword: :mod:`.augment`'s augmentations and its
    :class:`~vipsnorm.training.augment.Compose` (which hands the generator to each of its members that
    takes one and calls the others, torchvision's transforms say, as ``t(image)``). For those the
    result does not depend on the number of workers or the order of reads;
    :meth:`PatchSource.set_epoch` moves to the next epoch (``KerasPatchDataset`` does it at each epoch's
    end). A transform without an ``rng`` keyword, such as ``torchvision.transforms.Compose`` (even of
    vipsnorm augmentations), is called as ``transform(image)`` and its members draw from their own
    generators: results then depend on the number of workers and the order of reads, and a warning
    says so when the dataset is made; use :class:`~vipsnorm.training.augment.Compose` instead.
    Without ``seed`` every transform draws from its own generators, which every DataLoader worker
    receives as a copy in the same state: the workers then repeat each other's draws. Give a ``seed``.
"""

from __future__ import annotations

import math
import operator
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..engine import Options, fit_slide
from ..io.slide import FILE_LOCK, open_slide
from ..methods import Method, Params
from .augment import takes_rng
from .colour_table import MAX_TABLES
from .patches import Patch, PatchReader, read_table, resolve_normalization

__all__ = ["PatchSource", "PatchDataset", "KerasPatchDataset", "patches_from_table", "ForkedWorkerError"]

#: True in a process forked while libvips worker threads were running in its parent (set at fork).
_FORKED_FROM_LIBVIPS = False
_LIBVIPS_AT_FORK = False


def _libvips_threads_running() -> bool:
    """True when this process has libvips worker threads (Linux: their names in /proc)."""
    try:
        return any(comm.read_text().startswith("libvips") for comm in Path("/proc/self/task").glob("*/comm"))
    except OSError:
        return False


def _before_fork() -> None:
    global _LIBVIPS_AT_FORK
    _LIBVIPS_AT_FORK = _libvips_threads_running()


def _after_fork_in_child() -> None:
    global _FORKED_FROM_LIBVIPS
    _FORKED_FROM_LIBVIPS = _FORKED_FROM_LIBVIPS or _LIBVIPS_AT_FORK


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


class ForkedWorkerError(RuntimeError):
    """A dataset was read in a process forked while libvips threads ran in its parent."""


def patches_from_table(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> list[Patch]:
    """The patches of a coordinates table (``patches.csv`` of ``vipsnorm patches``); relative slide
    paths are taken relative to ``root`` when given (the patches' ``slide`` is then that path)."""
    return _table_patches(path, root)[0]


def _table_patches(path, root) -> tuple[list[Patch], dict[str, str]]:
    """The patches of a table, and the slides that ``root`` moved: ``{as in the table: path used}``."""
    patches = [Patch.from_row(row) for row in read_table(path)]
    moved: dict[str, str] = {}
    if root is not None:
        root = Path(root)
        for slide in dict.fromkeys(p.slide for p in patches):
            if not Path(slide).is_absolute():
                moved[slide] = str(root / slide)
        patches = [_with_slide(p, moved[p.slide]) if p.slide in moved else p for p in patches]
    return patches, moved


def _keyed_by_table(mapping, moved: Mapping[str, str], what: str, table) -> Any:
    """``mapping`` (labels or params by slide) with its keys as written in the table's ``slide`` column
    taken to the paths the patches use under ``root`` (``moved``); keys that are those paths already
    (or absolute paths in the table) stay. Anything but a mapping is returned as it is."""
    if not isinstance(mapping, Mapping) or not moved:
        return mapping
    keyed: dict = {}
    spelled: dict = {}
    for key, value in mapping.items():
        slide = moved.get(key, key)
        if slide in keyed and not _same_value(keyed[slide], value):
            raise ValueError(
                f"{table}: the {what} give slide {slide} two different values, under {spelled[slide]!r} and "
                f"{key!r} (the table's path and the path under root); keep one of them"
            )
        keyed[slide], spelled[slide] = value, key
    return keyed


def _same_value(a, b) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # arrays and the like: not known to be the same
        return False


def _from_table(cls, path, labels, root, kwargs):
    """``cls`` (a dataset) of the patches of the table ``path``, with ``labels`` and a ``params``
    mapping keyed by the table's ``slide`` column or by the paths under ``root``."""
    patches, moved = _table_patches(path, root)
    labels = _keyed_by_table(labels, moved, "labels", path)
    if isinstance(kwargs.get("params"), Mapping):
        kwargs = {**kwargs, "params": _keyed_by_table(kwargs["params"], moved, "params", path)}
    return cls(patches, labels, **kwargs)


def _check_seed(seed) -> int | None:
    """``seed`` as an int: None or an integer >= 0 (what numpy's generators take), else ValueError."""
    if seed is None:
        return None
    try:
        value = operator.index(seed)
    except TypeError:
        value = None
    if value is None or isinstance(seed, bool) or value < 0:
        raise ValueError(f"seed must be None or an integer >= 0 (numpy generators take no other), not {seed!r}")
    return value


def _with_slide(patch: Patch, slide: str) -> Patch:
    import dataclasses

    return dataclasses.replace(patch, slide=slide)


def _labels(labels, patches: Sequence[Patch]) -> list | None:
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        missing = sorted({p.slide for p in patches} - set(labels))
        if missing:
            raise ValueError(
                f"no label for slide(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}: labels are keyed by "
                "the patches' slide paths (from_table: as in the table's slide column, or the path under root)"
            )
        return [labels[p.slide] for p in patches]
    if callable(labels):
        return [labels(p) for p in patches]
    labels = list(labels)
    if len(labels) != len(patches):
        raise ValueError(f"{len(labels)} labels for {len(patches)} patches")
    return labels


def _outside_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller name the first frame outside this
    module (the user's line that made the dataset)."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    return level


#: Transform types warned about (:func:`_warn_no_rng`): once per process each.
_WARNED_NO_RNG: set[str] = set()


def _warn_no_rng(seed: int, transform) -> None:
    """Warn, once per process and type of transform, that ``seed`` cannot reach ``transform``."""
    name = _type_name(transform)
    if name in _WARNED_NO_RNG:
        return
    _WARNED_NO_RNG.add(name)
    warnings.warn(
        f"seed={seed} gives every item its own random generator, but the transform {name} takes no rng "
        "keyword, so it is called as transform(image) and draws from its own generators: results depend "
        "on the number of loader workers (each worker repeats the same draws) and on the order of reads. "
        "Use vipsnorm.training.Compose([...]) instead of torchvision's Compose (it passes the item's "
        "generator to the vipsnorm augmentations and calls the other transforms as they are), or a "
        "transform taking rng=",
        UserWarning,
        stacklevel=_outside_stacklevel(),
    )


def _type_name(obj) -> str:
    """``module.Class`` of ``obj`` (``Class`` for a builtin)."""
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _check_params_keys(given: Mapping, patches: Sequence[Patch]) -> None:
    """Refuse a params mapping that misses: keys that are no patch's slide while some slide has no entry
    (it would be fitted, or given the reference's fixed parameters, silently)."""
    if not given:
        return
    slides = dict.fromkeys(p.slide for p in patches)
    unknown = [k for k in given if k not in slides]
    without = [s for s in slides if s not in given]
    if unknown and without:
        raise ValueError(
            f"params has entries for {_few(unknown)}, which no patch is of, and none for {_few(without)}, "
            "which would be fitted (or get the reference's parameters): key params by the patches' slide "
            "paths (from_table: as in the table's slide column, or the path under root)"
        )


def _few(items: Sequence, n: int = 3) -> str:
    return f"slide(s) {list(items)[:n]}{' ...' if len(items) > n else ''}"


class PatchSource:
    """Normalized patches of many slides, read lazily; the base of the PyTorch and Keras datasets.

    Parameters
    ----------
    patches : sequence of Patch
        What to read (any slides, levels and sizes).
    labels : sequence, mapping or callable, optional
        One label per patch, a ``{slide path: label}`` mapping (every slide of the patches needs one),
        or a function of the patch.
    method : str or Method, optional
        Normalization method (``None``: the slides' own pixels), with ``reference`` and
        ``method_options`` as for ``vipsnorm normalize`` (see
        :func:`~vipsnorm.training.patches.resolve_normalization`).
    params : Params or mapping of slide path to Params, optional
        Parameters fitted beforehand (one set for all slides, or one per slide, keyed by the patches'
        slide paths); the slides without are fitted when the dataset is made. A mapping with keys
        that are no patch's slide while some slide has none is an error (a misspelt key would have
        that slide fitted silently).
    options : Options
        How slides are opened and fitted (sampling, backend, ...): the engine's defaults.
    transform : callable, optional
        Applied to every uint8 ``(h, w, bands)`` patch (augmentations of :mod:`.augment`,
        ``torchvision.transforms.Compose``, any callable).
    seed : int, optional
        Per-item generators (an integer >= 0), passed to a transform that takes an ``rng`` keyword
        (see the module documentation; a transform without one gets a warning).
    max_open : int
        Slides kept open per process (least recently used closed first).
    """

    def __init__(
        self,
        patches: Sequence[Patch],
        labels=None,
        *,
        method: str | Method | None = None,
        reference=None,
        method_options: Mapping[str, Any] | None = None,
        params: Params | Mapping[str, Params] | None = None,
        options: Options = Options(),
        transform: Callable | None = None,
        seed: int | None = None,
        max_open: int = 32,
    ):
        seed = _check_seed(seed)  # before any slide is fitted
        self.patches = list(patches)
        self.labels = _labels(labels, self.patches)
        self.options = options
        self.method, fixed = resolve_normalization(method, reference, options, **dict(method_options or {}))
        self.params: dict[str, Params] = {}
        if self.method is not None:
            given = params if isinstance(params, Mapping) else {}
            fixed = params if isinstance(params, Params) else fixed
            _check_params_keys(given, self.patches)
            for slide in dict.fromkeys(p.slide for p in self.patches):
                if slide in given:
                    self.params[slide] = given[slide]
                elif fixed is not None:
                    self.params[slide] = fixed
                else:
                    with FILE_LOCK:  # (the fit reads pixels: one file at a time per process)
                        with open_slide(slide, max_pixels=options.max_pixels, backend=options.backend) as opened:
                            self.params[slide] = fit_slide(opened, self.method, options)
        elif params is not None:
            raise ValueError("params given without a method")
        self.transform = transform
        self._transform_takes_rng = transform is not None and takes_rng(transform)
        self.seed = seed
        if self.seed is not None and transform is not None and not self._transform_takes_rng:
            _warn_no_rng(self.seed, transform)
        self.epoch = 0
        if max_open < 1:
            raise ValueError(f"max_open must be positive, not {max_open}")
        self.max_open = max_open
        self._readers: OrderedDict[str, tuple[Any, PatchReader]] = OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.Lock()  # Keras runs batches in threads

    # -- pickling: slides are per process, never pickled ---------------------------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()
        state["_pid"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _reader(self, slide: str) -> PatchReader:
        with self._lock:
            if self._pid != os.getpid():
                if _FORKED_FROM_LIBVIPS:
                    raise ForkedWorkerError(
                        "this worker process was forked while libvips threads were running in its parent, and "
                        "libvips would hang in it: start the workers with multiprocessing_context='forkserver' "
                        "(PatchDataset.loader does) or 'spawn'; with Keras use threads (use_multiprocessing=False) "
                        "or multiprocessing.set_start_method('spawn')"
                    )
                # a new process (forked with the parent's open slides, or unpickled): open our own
                self._readers = OrderedDict()
                self._pid = os.getpid()
            if slide in self._readers:
                self._readers.move_to_end(slide)
                return self._readers[slide][1]
            while len(self._readers) >= self.max_open:
                # dropped, not closed: a thread may still be reading it; it is released with its last reference
                self._readers.popitem(last=False)
            # one colour table per slide fit; with more fits than a process keeps tables, they would
            # be dropped and refilled over and over: the pipeline is then cheaper
            tables = len(set(map(repr, self.params.values()))) <= MAX_TABLES
            with FILE_LOCK:  # (opening reads pixels, and a reader makes pipelines: as every read)
                opened = open_slide(slide, max_pixels=self.options.max_pixels, backend=self.options.backend)
                reader = PatchReader(opened, self.method, self.params.get(slide), colour_table=tables)
            self._readers[slide] = (opened, reader)
            return reader

    def close(self) -> None:
        """Close the slides this process opened."""
        with self._lock:
            if self._pid == os.getpid():
                for opened, _ in self._readers.values():
                    opened.close()
            self._readers = OrderedDict()

    # -- items ---------------------------------------------------------------------------------------

    @property
    def n_patches(self) -> int:
        return len(self.patches)

    def set_epoch(self, epoch: int) -> None:
        """Use the per-item generators of ``epoch`` (with ``seed``). Call it before each epoch's loader
        iterator is made: workers copy the dataset then (``persistent_workers=True`` keeps the first)."""
        self.epoch = int(epoch)

    def item_rng(self, index: int) -> np.random.Generator | None:
        """The generator of item ``index`` this epoch (None without ``seed``)."""
        if self.seed is None:
            return None
        return np.random.default_rng([int(self.seed), self.epoch, int(index)])

    def image(self, index: int) -> np.ndarray:
        """Patch ``index``: normalized, then transformed; uint8 ``(h, w, bands)`` (or whatever the
        transform returns)."""
        patch = self.patches[index]
        image = self._reader(patch.slide).read_patch(patch)
        if self.transform is None:
            return image
        rng = self.item_rng(index)
        if rng is not None and self._transform_takes_rng:
            return self.transform(image, rng=rng)
        return self.transform(image)

    def label(self, index: int):
        return None if self.labels is None else self.labels[index]

    def __repr__(self) -> str:
        method = "raw" if self.method is None else self.method.name
        slides = len({p.slide for p in self.patches})
        return f"<{type(self).__name__} {len(self.patches)} patches of {slides} slides, {method}>"


class _TorchPatches(PatchSource):
    """PyTorch map-style dataset: item ``i`` is ``(image, label)`` (or ``image`` without labels).

    ``as_tensor=False`` (default): the uint8 ``(h, w, bands)`` numpy patch (after the transform).
    ``as_tensor=True``: a float32 ``(bands, h, w)`` tensor in [0, 1]. Every other argument is
    :class:`PatchSource`'s.
    """

    def __init__(self, patches: Sequence[Patch], labels=None, *, as_tensor: bool = False, **kwargs):
        PatchSource.__init__(self, patches, labels, **kwargs)
        self.as_tensor = as_tensor

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int):
        if not -len(self.patches) <= index < len(self.patches):
            raise IndexError(f"patch {index} of {len(self.patches)}")
        index %= len(self.patches)
        image = self.image(index)
        if self.as_tensor:
            import torch

            array = np.asarray(image)
            if array.ndim == 2:
                array = array[..., np.newaxis]
            image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(255.0)
        return image if self.labels is None else (image, self.labels[index])

    @classmethod
    def from_table(cls, path, labels=None, *, root=None, **kwargs):
        """The dataset of a coordinates table (``patches.csv``; see :func:`patches_from_table`).

        ``labels`` and a ``params`` mapping are keyed by slide: by the table's ``slide`` column as
        written, or by the paths the patches use (relative ones under ``root``; absolute ones as they
        are). A callable ``labels`` gets patches with those paths."""
        return _from_table(cls, path, labels, root, kwargs)

    def loader(self, batch_size: int = 32, *, num_workers: int = 0, **kwargs):
        """A ``torch.utils.data.DataLoader`` of this dataset whose worker processes (``num_workers``)
        start from a fork server that has imported torch and vipsnorm, not forked from this process
        (see the module documentation); every other argument is the DataLoader's."""
        import multiprocessing

        import torch

        if num_workers > 0 and "multiprocessing_context" not in kwargs:
            if "forkserver" in multiprocessing.get_all_start_methods():
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(["torch", __name__])
            else:
                context = multiprocessing.get_context("spawn")
            kwargs["multiprocessing_context"] = context
        return torch.utils.data.DataLoader(self, batch_size=batch_size, num_workers=num_workers, **kwargs)


class _KerasPatches(PatchSource):
    """Keras 3 ``PyDataset`` of batches: item ``b`` is ``(x, y)`` (or ``x`` without labels), ``x`` a
    ``(batch, h, w, bands)`` array, ``y`` the labels as a numpy array.

    Parameters
    ----------
    batch_size : int
    shuffle : bool
        Visit the patches in a new random order every epoch (from ``seed``, reproducible).
    dtype : {"float32", "uint8"}
        float32 scaled to [0, 1] (default) or the uint8 patches as they are.
    workers, use_multiprocessing, max_queue_size
        Keras' ``PyDataset`` arguments (how ``fit`` runs the batches in parallel).

    Every other argument is :class:`PatchSource`'s; all patches of a batch must have one shape.
    """

    def __init__(
        self,
        patches: Sequence[Patch],
        labels=None,
        *,
        batch_size: int = 32,
        shuffle: bool = True,
        dtype: str = "float32",
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
        **kwargs,
    ):
        import keras

        PatchSource.__init__(self, patches, labels, **kwargs)
        keras.utils.PyDataset.__init__(
            self, workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size
        )
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        if dtype not in ("float32", "uint8"):
            raise ValueError(f"dtype must be 'float32' or 'uint8', not {dtype!r}")
        self.batch_size, self.shuffle, self.dtype = int(batch_size), bool(shuffle), dtype
        self._order = self._make_order()

    def _make_order(self) -> np.ndarray:
        n = len(self.patches)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([0 if self.seed is None else int(self.seed), self.epoch]).permutation(n)

    def set_epoch(self, epoch: int) -> None:
        PatchSource.set_epoch(self, epoch)
        self._order = self._make_order()

    def on_epoch_end(self) -> None:
        self.set_epoch(self.epoch + 1)

    def __len__(self) -> int:
        return math.ceil(len(self.patches) / self.batch_size)

    def __getitem__(self, batch: int):
        if not 0 <= batch < len(self):
            raise IndexError(f"batch {batch} of {len(self)}")
        indices = self._order[batch * self.batch_size : (batch + 1) * self.batch_size]
        images = [np.asarray(self.image(int(i))) for i in indices]
        x = np.stack([a[..., np.newaxis] if a.ndim == 2 else a for a in images])
        if self.dtype == "float32":
            x = x.astype(np.float32) / np.float32(255.0)
        if self.labels is None:
            return x
        return x, np.asarray([self.labels[int(i)] for i in indices])

    @classmethod
    def from_table(cls, path, labels=None, *, root=None, **kwargs):
        """The dataset of a coordinates table (``patches.csv``; see :func:`patches_from_table`).

        ``labels`` and a ``params`` mapping are keyed by slide: by the table's ``slide`` column as
        written, or by the paths the patches use (relative ones under ``root``; absolute ones as they
        are). A callable ``labels`` gets patches with those paths."""
        return _from_table(cls, path, labels, root, kwargs)


def _build(name: str):
    """Make ``PatchDataset`` (on torch's Dataset) or ``KerasPatchDataset`` (on keras' PyDataset)."""
    if name == "PatchDataset":
        try:
            from torch.utils.data import Dataset
        except ImportError as exc:
            raise ImportError(
                f"vipsnorm.training.datasets.PatchDataset needs PyTorch: pip install 'vipsnorm[torch]' ({exc})"
            ) from exc
        bases, doc = (_TorchPatches, Dataset), _TorchPatches.__doc__
    else:
        try:
            import keras
        except ImportError as exc:
            raise ImportError(
                f"vipsnorm.training.datasets.KerasPatchDataset needs Keras 3 and a backend: pip install "
                f"'vipsnorm[keras]' and set KERAS_BACKEND (e.g. torch) ({exc})"
            ) from exc
        bases, doc = (_KerasPatches, keras.utils.PyDataset), _KerasPatches.__doc__
    cls = type(name, bases, {"__module__": __name__, "__qualname__": name, "__doc__": doc})
    globals()[name] = cls  # pickle finds it by name, here and in spawned workers
    return cls


def __getattr__(name: str):
    if name in ("PatchDataset", "KerasPatchDataset"):
        return _build(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
