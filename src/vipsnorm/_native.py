"""Loader of the native colour kernel (``_kernel.c``): the colour methods' per-pixel chains in one pass.

The stain methods and luminance equalization describe their apply step as a chain of lookups and 3x3
matrices (:mod:`vipsnorm.methods._stain`, :mod:`vipsnorm.methods._hist`), which libvips runs as one
operation a step. A :class:`Program` is such a chain compiled for the kernel, which runs it on each
pixel with the same arithmetic, or once on every RGB colour into a 64 MiB cube (:meth:`Program.build_cube`)
after which a pixel is one lookup. :func:`map_image` makes a lazy libvips image of it (through the cube
for images of :data:`CUBE_PIXELS` or more), :func:`map_array` maps a numpy array.

The kernel is optional. It is built at install when a C compiler is present (it needs no libvips
headers: this module finds the libvips pyvips loaded and passes the kernel the functions it calls, and
checks the one struct layout it assumes on a prepared region). Without it, with ``VIPSNORM_NATIVE=0`` in
the environment, within :func:`switched_off`, or when anything about loading it fails, every method
runs as its chain of libvips operations (and numpy for arrays), which gives the same bytes.
:func:`available` and :func:`reason` say which.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import threading
from collections import OrderedDict

import numpy as np
import pyvips

__all__ = [
    "available",
    "reason",
    "switched_off",
    "without_cube",
    "Program",
    "program",
    "map_image",
    "map_array",
    "map_in_place",
    "memory_pixels",
    "OP",
    "CUBE",
    "CUBE_PIXELS",
    "CHAIN_PIXELS",
]

_THINSTRIP = 2  # libvips' VIPS_DEMAND_STYLE_THINSTRIP, read from libvips when the kernel loads
_ANY = 3  # VIPS_DEMAND_STYLE_ANY, read from libvips when the kernel loads
_SMALLTILE = 0  # VIPS_DEMAND_STYLE_SMALLTILE, read from libvips when the kernel loads
#: VK_VERSION of _kernel.c (with the sizes of the structs passed to it: vk_abi).
_VERSION = 10

OP = {"pair": 1, "index": 2, "mix": 3, "lut": 4, "recomb": 5, "luma": 6, "blend": 7}


class _Api(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "image_new", "pipelinev", "generate", "start_one", "stop_one", "region_prepare", "set_data_full",
        "object_ref", "object_unref",
    )] + [(name, ctypes.c_long) for name in ("valid_offset", "data_offset", "bpl_offset")]


class _RegionFields(ctypes.Structure):
    """The public fields of libvips' VipsRegion after its VipsObject (region.h, stable through 8.x)."""

    _fields_ = [("im", ctypes.c_void_p), ("valid", ctypes.c_int * 4), ("type", ctypes.c_int),
                ("data", ctypes.c_void_p), ("bpl", ctypes.c_int)]


class _Step(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int),
        ("rows", ctypes.c_int),
        ("n", ctypes.c_int),
        ("is_float", ctypes.c_int),
        ("source", ctypes.c_int),
        ("m", ctypes.c_double * 9),
        ("t1", ctypes.c_void_p),
        ("t2", ctypes.c_void_p),
    ]


class _TypeQuery(ctypes.Structure):
    _fields_ = [("type", ctypes.c_size_t), ("type_name", ctypes.c_char_p), ("class_size", ctypes.c_uint),
                ("instance_size", ctypes.c_uint)]


def _libvips_candidates() -> list[str]:
    """Files named like libvips mapped in this process (Linux: from its memory map), in map order."""
    pyvips.Image.black(1, 1)  # loaded and initialized
    paths: list[str] = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split(maxsplit=5)[-1].strip()
            name = os.path.basename(path)
            if name.startswith("libvips") and ".so" in name and "cpp" not in name and path not in paths:
                paths.append(path)
    return paths


def _libvips_path() -> str:
    """The file of the libvips pyvips uses: a mapped libvips whose GType of ``VipsImage`` is pyvips's
    (another copy in the process would have a type system of its own)."""
    want = pyvips.type_from_name("VipsImage")
    for path in _libvips_candidates():
        vips = ctypes.CDLL(path)
        vips.g_type_from_name.restype = ctypes.c_size_t
        vips.g_type_from_name.argtypes = [ctypes.c_char_p]
        if vips.g_type_from_name(b"VipsImage") == want:
            return path
    raise OSError("the libvips pyvips uses is not found in this process's memory map")


_loaded: tuple[ctypes.CDLL | None, str] | None = None
_vips: ctypes.CDLL | None = None  # the libvips pyvips uses, once the kernel is loaded
_load_lock = threading.Lock()


def _load() -> tuple[ctypes.CDLL | None, str]:
    """The kernel, loaded and initialized once per process, or ``None`` and why not. Never raises: any
    failure leaves the methods on their libvips chains."""
    global _loaded
    if _loaded is None:
        with _load_lock:
            if _loaded is None:
                try:
                    _loaded = _load_kernel()
                except Exception as error:  # noqa: BLE001 - the kernel is an optimization, never a failure
                    _loaded = (None, f"cannot load: {type(error).__name__}: {error}")
    return _loaded


def _load_kernel() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("VIPSNORM_NATIVE", "1") == "0":
        return None, "VIPSNORM_NATIVE=0"
    spec = importlib.util.find_spec("vipsnorm._kernel")
    if spec is None or spec.origin is None:
        return None, "the native kernel was not built (no C compiler at install)"
    try:
        kernel = ctypes.CDLL(spec.origin)
        vips = ctypes.CDLL(_libvips_path())
    except OSError as error:
        return None, f"cannot load: {error}"
    kernel.vk_abi.restype = ctypes.c_long
    abi = _VERSION * 1_000_000 + ctypes.sizeof(_Step) * 1000 + ctypes.sizeof(_Api)
    if kernel.vk_abi() != abi:  # a kernel built from other sources than this module (rebuild it)
        return None, f"the built kernel does not match this vipsnorm (ABI {kernel.vk_abi()}, expected {abi}): reinstall"
    api = _Api()
    for name, symbol in (
        ("image_new", "vips_image_new"), ("pipelinev", "vips_image_pipelinev"), ("generate", "vips_image_generate"),
        ("start_one", "vips_start_one"), ("stop_one", "vips_stop_one"), ("region_prepare", "vips_region_prepare"),
        ("set_data_full", "g_object_set_data_full"),
        ("object_ref", "g_object_ref"), ("object_unref", "g_object_unref"),
    ):
        try:
            setattr(api, name, ctypes.cast(getattr(vips, symbol), ctypes.c_void_p).value)
        except AttributeError:
            return None, f"libvips has no {symbol}"
    base = _region_base(vips)
    api.valid_offset = base + _RegionFields.valid.offset
    api.data_offset = base + _RegionFields.data.offset
    api.bpl_offset = base + _RegionFields.bpl.offset
    if not _region_layout_holds(vips, base):
        return None, "libvips' VipsRegion layout is not the one the kernel knows"
    global _THINSTRIP
    _THINSTRIP = pyvips.vips_lib.vips_enum_from_nick(b"vipsnorm", pyvips.type_from_name("VipsDemandStyle"), b"thinstrip")
    kernel.vk_init(ctypes.byref(api))
    vips.vips_image_get_data.restype = ctypes.c_void_p
    vips.vips_image_get_data.argtypes = [ctypes.c_void_p]
    vips.vips_image_ispartial.restype = ctypes.c_int
    vips.vips_image_ispartial.argtypes = [ctypes.c_void_p]
    vips.vips_image_pipeline_array.restype = ctypes.c_int
    vips.vips_image_pipeline_array.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    global _ANY, _SMALLTILE
    _ANY = pyvips.vips_lib.vips_enum_from_nick(b"vipsnorm", pyvips.type_from_name("VipsDemandStyle"), b"any")
    _SMALLTILE = pyvips.vips_lib.vips_enum_from_nick(
        b"vipsnorm", pyvips.type_from_name("VipsDemandStyle"), b"smalltile"
    )
    global _vips
    _vips = vips
    pointer = ctypes.c_void_p
    kernel.vk_program_new.restype = pointer
    kernel.vk_program_new.argtypes = [ctypes.POINTER(_Step), ctypes.c_int]
    kernel.vk_program_unref.argtypes = [pointer]
    kernel.vk_cube_alloc.argtypes = [pointer]
    kernel.vk_cube_ready.argtypes = [pointer]
    kernel.vk_cube_blocks.argtypes = [pointer]
    kernel.vk_cube_mark.argtypes = [pointer, ctypes.c_int, ctypes.c_int]
    kernel.vk_run.argtypes = [pointer, pointer, pointer, ctypes.c_long]
    kernel.vk_image.restype = pointer
    kernel.vk_image.argtypes = [pointer, pointer, ctypes.c_int]
    kernel.vk_source.restype = pointer
    kernel.vk_source.argtypes = [pointer, pointer, pointer, pointer, ctypes.c_int]
    kernel.vk_tissue.argtypes = [pointer, ctypes.c_int, ctypes.c_long, ctypes.c_int, ctypes.c_double, pointer]
    kernel.vk_histograms.argtypes = [pointer, ctypes.c_int, ctypes.c_long, pointer, pointer]
    kernel.vk_counts.argtypes = [pointer, ctypes.c_int, ctypes.c_long, ctypes.c_int, pointer, pointer]
    kernel.vk_apply_luts.argtypes = [pointer, ctypes.c_int, ctypes.c_long, pointer, ctypes.c_int, pointer]
    kernel.vk_apply_luma.argtypes = [pointer, pointer, ctypes.c_long, pointer, pointer]
    kernel.vk_add_change.argtypes = [pointer, pointer, pointer, ctypes.c_long, pointer]
    kernel.vk_clahe_map.argtypes = [pointer, ctypes.c_int, ctypes.c_int] + [pointer] * 10
    kernel.vk_luma.argtypes = [pointer, ctypes.c_long, pointer]
    kernel.vk_equalize_luma.argtypes = [pointer, ctypes.c_long, pointer, pointer]
    kernel.vk_equalize_luma.restype = ctypes.c_int
    kernel.vk_simd.argtypes = [ctypes.c_int]
    kernel.vk_simd.restype = ctypes.c_int
    kernel.vk_region_counts.argtypes = [pointer] + [ctypes.c_int] * 6 + [pointer] * 3
    kernel.vk_clahe_luts.argtypes = [pointer, ctypes.c_long, ctypes.c_long, ctypes.c_float, pointer]
    kernel.vk_pair_counts.argtypes = [pointer, ctypes.c_long, ctypes.c_int, pointer, pointer]
    kernel.vk_pair_mask.argtypes = [pointer, ctypes.c_long, pointer, pointer]
    for function in (
        kernel.vk_tissue, kernel.vk_histograms, kernel.vk_counts, kernel.vk_apply_luts, kernel.vk_apply_luma,
        kernel.vk_add_change, kernel.vk_clahe_map, kernel.vk_region_counts, kernel.vk_clahe_luts, kernel.vk_luma,
        kernel.vk_pair_counts, kernel.vk_pair_mask,
    ):  # fmt: skip
        function.restype = None
    return kernel, "loaded"


def _region_base(vips: ctypes.CDLL) -> int:
    """Offset of :class:`_RegionFields` in a VipsRegion: the size of a VipsObject, as GObject reports it."""
    vips.vips_object_get_type.restype = ctypes.c_size_t
    query = _TypeQuery()
    vips.g_type_query(ctypes.c_size_t(vips.vips_object_get_type()), ctypes.byref(query))
    align = ctypes.alignment(_RegionFields)
    return -(-query.instance_size // align) * align


def _address(gobject) -> int:
    return int(pyvips.ffi.cast("uintptr_t", gobject.pointer))


def _region_layout_holds(vips: ctypes.CDLL, base: int) -> bool:
    """Prepare a region of a known rectangle of known pixels, then read its rectangle and pixels back
    through :class:`_RegionFields` at ``base``."""
    pixels = (np.arange(64 * 48 * 3, dtype=np.uint32) * 2654435761 >> 24).astype(np.uint8).reshape(48, 64, 3)
    image = pyvips.Image.new_from_array(pixels).copy(interpretation="srgb") + 0  # computed, not memory
    image = image.cast("uchar")
    region = pyvips.Region.new(image)
    vips.vips_region_prepare.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    rect = (ctypes.c_int * 4)(3, 5, 7, 11)
    if vips.vips_region_prepare(_address(region), rect) != 0:
        return False
    fields = _RegionFields.from_address(_address(region) + base)
    left, top, width, height = fields.valid
    if fields.im != _address(image) or not (left <= 3 and top <= 5 and left + width >= 10 and top + height >= 16):
        return False
    if fields.bpl < width * 3 or not fields.data:
        return False
    for y in range(5, 16):
        row = (ctypes.c_uint8 * 21).from_address(fields.data + (y - top) * fields.bpl + (3 - left) * 3)
        if bytes(row) != pixels[y, 3:10].tobytes():
            return False
    return True


def available() -> bool:
    """Whether the native kernel is loaded (and not switched off)."""
    return _load()[0] is not None and not _off


def reason() -> str:
    """Why the native kernel is or is not in use, in a few words."""
    return "switched off (vipsnorm._native.switched_off)" if _off else _load()[1]


_off = False


@contextlib.contextmanager
def switched_off():
    """Run the libvips/numpy chains instead of the kernel within the block (tests, benchmarks)."""
    global _off
    before, _off = _off, True
    try:
        yield
    finally:
        _off = before


#: Entries of a cube.
CUBE = 1 << 24
#: Table (dtype, shape) each step kind needs: rows x entries. ``rows`` and ``n`` from the step's fields.
_TABLES = {
    "pair": lambda f: ((np.float32, (3, 65536)), (np.float32, (3, 256))),
    "mix": lambda f: ((np.float32, (3, f.get("n", 0))), (np.float32, (3, f.get("n", 0)))),
    "lut": lambda f: ((np.float32 if f.get("is_float") else np.uint8, (f.get("rows", 0), f.get("n", 0))), None),
    "luma": lambda f: ((np.uint8, (256,)), None),
    "blend": lambda f: ((np.uint8, (256,)), None),
    "index": lambda f: (None, None),
    "recomb": lambda f: (None, None),
}


class Program:
    """A chain of steps compiled for the kernel (its tables copied into it).

    ``steps``: ``(kind, fields)`` pairs, ``kind`` a key of :data:`OP`; ``fields`` among ``rows``,
    ``n``, ``is_float``, ``source``, ``m`` (3x3) and the tables ``t1``, ``t2`` (see ``_kernel.c``).

    Raises
    ------
    ValueError
        A table of the wrong type or size, or a chain that does not map uchar RGB to uchar RGB (the
        kernel refuses what it would read past a table for).
    """

    def __init__(self, steps: list[tuple[str, dict]]):
        kernel = _load()[0]
        if kernel is None:
            raise RuntimeError(f"native kernel unavailable: {reason()}")
        self._kernel = kernel
        self._lock = threading.Lock()
        self._pointer = None
        array = (_Step * max(1, len(steps)))()
        keep = []
        for i, (kind, fields) in enumerate(steps):
            s = array[i]
            s.kind = OP[kind]
            for key in ("rows", "n", "is_float", "source"):
                setattr(s, key, int(fields.get(key, 0)))
            if "m" in fields:
                s.m[:] = [float(v) for v in np.asarray(fields["m"], dtype=np.float64).reshape(9)]
            for key, want in zip(("t1", "t2"), _TABLES[kind](fields)):
                if want is None:
                    continue
                t = np.ascontiguousarray(fields.get(key))
                if t.dtype != want[0] or t.shape != want[1]:
                    raise ValueError(f"{kind} step: {key} must be {np.dtype(want[0])} {want[1]}, not {t.dtype} {t.shape}")
                keep.append(t)
                setattr(s, key, t.ctypes.data)
        self._pointer = kernel.vk_program_new(array, len(steps))
        if not self._pointer:
            raise ValueError(f"the native kernel refuses this chain: {[kind for kind, _ in steps]}")
        self.has_cube = False
        #: False for a program whose step runs faster per pixel than a cube lookup, with SSSE3 or
        #: without (the luma's change alone): :meth:`build_cube` leaves such a program without one.
        self.needs_cube = not (len(steps) == 1 and steps[0][0] == "luma")

    def __del__(self):
        pointer, self._pointer = getattr(self, "_pointer", None), None
        if pointer:
            self._kernel.vk_program_unref(pointer)

    def build_cube(self) -> "Program":
        """Give the program its cube: from then on pixels are looked up, each block of 32 colours
        (along R, at one G and B) computed the first time a pixel needs it (all 524288 blocks cost what
        running the chain on 2^24 pixels does). Returns the program.

        A program that does not need a cube (:attr:`needs_cube`) is returned as it is.

        Raises
        ------
        MemoryError
            The cube's 64 MiB cannot be allocated (the program is unchanged and runs per pixel).
        """
        if not self.needs_cube:
            return self
        with self._lock:
            if not self.has_cube:
                if self._kernel.vk_cube_alloc(self._pointer) != 0:
                    raise MemoryError("cannot allocate the native kernel's 64 MiB colour cube")
                self._kernel.vk_cube_ready(self._pointer)
                self.has_cube = True
        return self

    @property
    def cube_blocks(self) -> int:
        """Blocks of the cube filled so far (of 524288: 32 colours along R at one G and B each)."""
        return self._kernel.vk_cube_blocks(self._pointer) if self.has_cube else 0

    def run(self, array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The program on a ``(..., 3)`` uint8 array: into a new array, or into ``out`` (a C-contiguous
        writable uint8 array of the same shape, ``array`` itself included: each pixel is read before it
        is written)."""
        array = np.ascontiguousarray(array)
        if array.dtype != np.uint8 or array.shape[-1:] != (3,):
            raise ValueError(f"expected (..., 3) uint8 pixels, not {array.dtype} {array.shape}")
        out = np.empty_like(array) if out is None else _writable_like(out, array)
        self._kernel.vk_run(self._pointer, array.ctypes.data, out.ctypes.data, array.size // 3)
        return out

    def image(self, image: pyvips.Image) -> pyvips.Image:
        """The program run lazily on ``image`` (uchar RGB); the image keeps the program alive."""
        if image.format != "uchar" or image.bands != 3:
            raise ValueError(f"expected a uchar RGB image, not {image.format} with {image.bands} bands")
        out = self._kernel.vk_image(_address(image), self._pointer, _THINSTRIP)
        if not out:
            raise pyvips.Error("native kernel: cannot make the image")
        return pyvips.Image(pyvips.ffi.cast("VipsImage *", out))


#: Pixels from which an image is mapped through a cube rather than by running the chain per pixel.
#: A cube block runs the chain on 32 colours along R the first time a pixel needs it (1000 patches of the
#: benchmark slide meet 12,000 blocks, 0.39 million colours of the 155,000 they show); a lookup
#: then costs about 2 CPU ns a pixel against 5 (Macenko, luminance equalization) to 18 (Reinhard) for the
#: chain (measured on an 8192 px square of H&E colours). The threshold dates from blocks of 65536
#: colours (one B value), when the cube paid for itself after about twice its own size.
CUBE_PIXELS = 2 * CUBE

_programs: "OrderedDict[object, Program | None]" = OrderedDict()
_programs_lock = threading.Lock()
#: Programs kept for reuse, by key (each with up to a 64 MiB cube).
KEPT = 2
_local = threading.local()


def _after_fork_in_child() -> None:
    # a fork while another thread held a lock would leave it held forever in the child
    global _programs_lock, _load_lock
    _programs_lock, _load_lock = threading.Lock(), threading.Lock()
    for prog in _programs.values():
        if prog is not None:
            prog._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def without_cube():
    """Map images per pixel within the block, whatever their size: for lazy images kept long and read
    in small windows (a patch reader per slide), where a 64 MiB cube each would add up."""
    before = getattr(_local, "no_cube", False)
    _local.no_cube = True
    try:
        yield
    finally:
        _local.no_cube = before


#: Patch readers that may hold a cube of their own at once (64 MiB each): a dataset keeps one reader
#: per slide, and beyond these its readers map patches through the shared colour tables instead.
READER_CUBES = 2
_reader_cubes = 0


def claim_reader_cube() -> bool:
    """Take one of the :data:`READER_CUBES` slots (False when none is free)."""
    global _reader_cubes
    with _programs_lock:
        if _reader_cubes >= READER_CUBES:
            return False
        _reader_cubes += 1
        return True


def release_reader_cube() -> None:
    """Give a slot back (its reader is gone)."""
    global _reader_cubes
    with _programs_lock:
        _reader_cubes = max(0, _reader_cubes - 1)


def program(key, make, keep: bool = True) -> Program | None:
    """The program made by ``make()`` for ``key`` (``None``: the chain has no kernel form), kept for the
    last :data:`KEPT` keys (the images of one run share their params) when ``keep``; an unhashable key
    is not kept. A program already kept is found whether or not ``keep``."""
    try:
        hash(key)
    except TypeError:
        return make()
    with _programs_lock:
        if key in _programs:
            _programs.move_to_end(key)
            return _programs[key]
    made = make()
    if not keep:
        return made
    with _programs_lock:
        made = _programs.setdefault(key, made)  # (another thread's, if it made one meanwhile)
        _programs.move_to_end(key)
        while len(_programs) > KEPT:
            _programs.popitem(last=False)
    return made


def _kept(key) -> Program | None:
    try:
        with _programs_lock:
            return _programs.get(key)
    except TypeError:
        return None


def map_image(image: pyvips.Image, key, make) -> pyvips.Image | None:
    """``image`` (uchar RGB) mapped lazily by the program of ``key``, through its cube when the image
    has :data:`CUBE_PIXELS` or more (not within :func:`without_cube`; per pixel if the cube cannot be
    allocated); ``None`` when the kernel is off or the chain has no kernel form."""
    prog = program(key, make) if available() else None
    if prog is None:
        return None
    if image.width * image.height >= CUBE_PIXELS and not getattr(_local, "no_cube", False):
        try:
            prog.build_cube()
        except MemoryError:
            pass
    return prog.image(image)


def map_array(array: np.ndarray, key, make, *, cheap: bool = False, out: np.ndarray | None = None) -> np.ndarray | None:
    """A ``(..., 3)`` uint8 array mapped by the program of ``key`` (through its cube if it has one, or
    if the array has :data:`CUBE_PIXELS` or more); ``None`` when the kernel is off, the chain has no
    kernel form, or the program is neither kept nor ``cheap`` to make for an array this small (stain
    jitter draws new params for every patch: building their tables, over a MiB, would cost more than
    the numpy chain saves on a patch, and keeping them would push the slide's program out). ``out``: as
    for :meth:`Program.run`."""
    if not available():
        return None
    large = array.size // 3 >= CUBE_PIXELS
    prog = _kept(key)
    if prog is None:
        if not (large or cheap or array.size // 3 >= CHAIN_PIXELS):
            return None
        prog = program(key, make, keep=large)
    if prog is None:
        return None
    if large:
        try:
            prog.build_cube()
        except MemoryError:
            pass
    return prog.run(array, out)


def map_in_place(pixels: np.ndarray, key, make) -> bool:
    """Map ``pixels``, a writable C-contiguous ``(..., 3)`` uint8 array, in place by the program of
    ``key``, made and kept as :func:`map_image` does (through its cube from :data:`CUBE_PIXELS`); False,
    the pixels untouched, when the kernel is off or the chain has no kernel form."""
    prog = program(key, make) if available() else None
    if prog is None:
        return False
    if pixels.size // 3 >= CUBE_PIXELS and not getattr(_local, "no_cube", False):
        try:
            prog.build_cube()
        except MemoryError:
            pass
    prog.run(pixels, pixels)
    return True


#: Pixels from which an array is mapped by the kernel even when its program must be made for it.
CHAIN_PIXELS = 1 << 18


# --- counting and small maps on arrays (fits of tiles and patches; the same numbers as numpy's) -------


def _writable_like(out: np.ndarray, array: np.ndarray) -> np.ndarray:
    """``out`` checked as a destination for the pixels of ``array`` (ValueError otherwise)."""
    if not (
        isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == array.shape
        and out.flags.c_contiguous and out.flags.writeable
    ):  # fmt: skip
        raise ValueError(f"out must be a writable C-contiguous uint8 array of shape {array.shape}")
    if out is not array and np.may_share_memory(out, array):  # (the same array is fine: pixel by pixel)
        raise ValueError("out overlaps the input without being it")
    return out


class _Buffer:
    """The pixel buffer of a libvips image, for numpy (``__array_interface__``); the array made from it
    keeps it, and so the image, alive."""

    __slots__ = ("__array_interface__", "image")

    def __init__(self, image: pyvips.Image, address: int, writable: bool):
        self.image = image
        shape = (image.height, image.width, image.bands)
        self.__array_interface__ = {"data": (address, not writable), "shape": shape, "typestr": "|u1", "version": 3}


def memory_pixels(image: pyvips.Image, writable: bool = False) -> np.ndarray | None:
    """The pixels of ``image``, an image libvips holds in memory (``copy_memory``'s), as an
    ``(h, w, bands)`` uint8 numpy array over its own buffer (no copy; the array keeps the image alive),
    or None (the kernel is off, a lazy image, or not a uchar image). Read-only unless ``writable``: only
    for a buffer the caller owns (a ``copy_memory`` made from a lazy image, which nothing else shares)."""
    if not available() or _vips is None or image.format != "uchar":
        return None
    if _vips.vips_image_ispartial(_address(image)):  # lazy: libvips would turn it into memory in place
        return None
    address = _vips.vips_image_get_data(_address(image))
    if not address:
        return None
    return np.asarray(_Buffer(image, address, writable))


def adopt_fields(image: pyvips.Image, source: pyvips.Image) -> bool:
    """Give ``image``, a memory image just made (``new_from_memory``) of ``source``'s size, bands and
    format, every header field and all the metadata of ``source`` (resolution, interpretation, EXIF, ICC
    profile, ...), in place, as libvips gives an operation's output those of its input (5 us, where
    copying ~20 fields through pyvips took 0.2 ms). False (and ``image`` unchanged) when the kernel is
    off or the two differ in size, bands, format or coding."""
    if not available() or _vips is None:
        return False
    if (image.width, image.height, image.bands, image.format, image.coding) != (
        source.width, source.height, source.bands, source.format, source.coding
    ):
        return False
    inputs = (ctypes.c_void_p * 2)(_address(source), None)
    return _vips.vips_image_pipeline_array(_address(image), _ANY, inputs) == 0


def tile_source(image: pyvips.Image, level: int, read: int, free: int) -> pyvips.Image | None:
    """A lazy image with the size, fields and metadata of ``image`` (uchar RGB) whose pixels the C
    function at ``read`` decodes from ``level`` (``int read(level, x, y, w, h, out, stride)``, 0 on
    success), in libvips' worker threads, and ``image`` gives where it fails (libvips then reports what
    is wrong, as it would have). The image is one holder of ``level``, and lets go of it with ``free``
    when it is freed (or at once, on failure). None when the kernel is off or the image cannot be made."""
    kernel = _load()[0]
    if kernel is None or image.format != "uchar" or image.bands != 3 or image.coding != "none":
        ctypes.CFUNCTYPE(None, ctypes.c_void_p)(free)(level)
        return None
    out = kernel.vk_source(_address(image), read, level, free, _SMALLTILE)
    if not out:
        return None
    return pyvips.Image(pyvips.ffi.cast("VipsImage *", out))


def _pixels(array: np.ndarray) -> tuple[np.ndarray, int, int] | None:
    """``array`` as C-contiguous uint8 pixels with 1 or 3 bands, its bands and pixel count, or None."""
    if array.dtype != np.uint8:
        return None
    bands = 1 if array.ndim == 2 else array.shape[-1]
    if bands not in (1, 3) or array.ndim not in (2, 3):
        return None
    array = np.ascontiguousarray(array)
    return array, bands, array.size // bands


def pair_counts(rgb: np.ndarray, dark_below: int) -> tuple[np.ndarray, np.ndarray] | None:
    """For :func:`vipsnorm.sampling.tissue_mask`, in one pass over a uint8 ``(h, w, 3)`` array: int64
    counts of each pixel's ``(chroma << 8) | max`` (65536), and of the chroma of the pixels whose darkest
    channel is below ``dark_below`` (256); None (kernel off, other array)."""
    kernel = _load()[0] if available() else None
    got = _pixels(rgb) if kernel is not None and rgb.ndim == 3 else None
    if got is None or got[1] != 3:
        return None
    array, _, n = got
    pairs, spread = np.zeros(1 << 16, np.int64), np.zeros(256, np.int64)
    kernel.vk_pair_counts(array.ctypes.data, n, int(dark_below), pairs.ctypes.data, spread.ctypes.data)
    return pairs, spread


def pair_mask(rgb: np.ndarray, table: np.ndarray) -> np.ndarray | None:
    """Boolean ``(h, w)``: ``table[(chroma << 8) | max]`` of each pixel of a uint8 ``(h, w, 3)`` array
    (``table``: 65536 bools), or None (kernel off, other array)."""
    kernel = _load()[0] if available() else None
    got = _pixels(rgb) if kernel is not None and rgb.ndim == 3 else None
    if got is None or got[1] != 3 or table.shape != (1 << 16,):
        return None
    array, _, n = got
    lookup = np.ascontiguousarray(table, np.uint8)
    keep = np.empty(array.shape[:2], np.bool_)
    kernel.vk_pair_mask(array.ctypes.data, n, lookup.ctypes.data, keep.ctypes.data)
    return keep


def tissue(pixels: np.ndarray, saturation: bool, threshold: float) -> np.ndarray | None:
    """Boolean ``(h, w)``: where a pixel of a uint8 ``(h, w[, bands])`` array is tissue, as
    :func:`vipsnorm.sampling._tissue_pixels_array` computes it (saturation above ``threshold`` for colour
    with ``saturation``, else the darkest channel below it), or None (kernel off, other array)."""
    kernel = _load()[0] if available() else None
    got = _pixels(pixels) if kernel is not None else None
    if got is None:
        return None
    array, bands, n = got
    keep = np.empty(array.shape[:2], np.bool_)
    kernel.vk_tissue(array.ctypes.data, bands, n, 0 if saturation else 1, float(threshold), keep.ctypes.data)
    return keep


def histograms(pixels: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray | None:
    """``(4, 256)`` int64 R, G, B, Y counts (grey: the value in every row) of the pixels of a uint8
    ``(h, w[, bands])`` array where the boolean ``keep`` (its ``(h, w)``) is True, or None."""
    kernel = _load()[0] if available() else None
    got = _pixels(pixels) if kernel is not None else None
    if got is None:
        return None
    array, bands, n = got
    mask = None
    if keep is not None:
        mask = np.ascontiguousarray(keep, dtype=np.bool_)
        if mask.size != n:
            return None
    out = np.zeros((4, 256), np.int64)
    kernel.vk_histograms(array.ctypes.data, bands, n, None if mask is None else mask.ctypes.data, out.ctypes.data)
    return out


def counts(pixels: np.ndarray, luma: bool = False) -> tuple[np.ndarray, np.ndarray | None] | None:
    """``(bands, 256)`` int64 counts of each band of a uint8 ``(h, w[, bands])`` array, or with ``luma``
    (RGB) the ``(1, 256)`` counts of its luma and the luma itself (uint8 ``(h, w)``); or None."""
    kernel = _load()[0] if available() else None
    got = _pixels(pixels) if kernel is not None else None
    if got is None or (luma and got[1] != 3):
        return None
    array, bands, n = got
    out = np.zeros((1 if luma else bands, 256), np.int64)
    y = np.empty(array.shape[:2], np.uint8) if luma else None
    kernel.vk_counts(array.ctypes.data, bands, n, int(luma), out.ctypes.data, None if y is None else y.ctypes.data)
    return out, y


def apply_luts(pixels: np.ndarray, luts: np.ndarray, out: np.ndarray | None = None) -> np.ndarray | None:
    """``luts[band][value]`` of a uint8 ``(h, w[, bands])`` array (``luts``: ``(1 or bands, 256)`` uint8),
    or None; into ``out`` if given (as for :meth:`Program.run`: ``pixels`` itself, to map in place)."""
    kernel = _load()[0] if available() else None
    got = _pixels(pixels) if kernel is not None else None
    if got is None:
        return None
    array, bands, n = got
    table = np.ascontiguousarray(luts, dtype=np.uint8).reshape(-1, 256)
    if table.shape[0] not in (1, bands):
        return None
    out = np.empty(array.shape, np.uint8) if out is None else _writable_like(out, array)
    kernel.vk_apply_luts(array.ctypes.data, bands, n, table.ctypes.data, table.shape[0], out.ctypes.data)
    return out


def apply_luma(
    pixels: np.ndarray, lut: np.ndarray, y: np.ndarray | None = None, out: np.ndarray | None = None
) -> np.ndarray | None:
    """``clip(rgb + lut[y] - y)`` of a uint8 ``(h, w, 3)`` array, ``y`` its luma (given, or computed),
    or None; into ``out`` if given (as for :meth:`Program.run`: ``pixels`` itself, to map in place)."""
    kernel = _load()[0] if available() else None
    got = _pixels(pixels) if kernel is not None else None
    if got is None or got[1] != 3:
        return None
    array, _, n = got
    table = np.ascontiguousarray(lut, dtype=np.uint8).reshape(256)
    luma = None if y is None else np.ascontiguousarray(y, dtype=np.uint8)
    if luma is not None and luma.size != n:
        return None
    out = np.empty(array.shape, np.uint8) if out is None else _writable_like(out, array)
    kernel.vk_apply_luma(array.ctypes.data, None if luma is None else luma.ctypes.data, n, table.ctypes.data, out.ctypes.data)
    return out


def luma(rgb: np.ndarray) -> np.ndarray | None:
    """The luma (:func:`vipsnorm.methods._hist.luma_array`) of a uint8 ``(..., 3)`` array, or None."""
    kernel = _load()[0] if available() else None
    if kernel is None or rgb.dtype != np.uint8 or rgb.shape[-1:] != (3,):
        return None
    rgb = np.ascontiguousarray(rgb)
    out = np.empty(rgb.shape[:-1], np.uint8)
    kernel.vk_luma(rgb.ctypes.data, rgb.size // 3, out.ctypes.data)
    return out


def simd(on: bool) -> bool:
    """Tests: switch the kernel's SSSE3 loops (luma, luma change) off, or back on where the CPU has
    SSSE3; returns whether they are on (False when the kernel is not loaded)."""
    kernel = _load()[0] if available() else None
    return bool(kernel.vk_simd(int(on))) if kernel is not None else False


def equalize_luma(rgb: np.ndarray) -> tuple[np.ndarray, int] | None:
    """Luminance equalization of a uint8 ``(h, w, 3)`` array fitted on itself, in one call
    (:meth:`vipsnorm.methods.Equalize.fit_apply_array`'s luminance mode), and how many luma values occur
    (one or none: the input unchanged); or None."""
    kernel = _load()[0] if available() else None
    got = _pixels(rgb) if kernel is not None else None
    if got is None or got[1] != 3 or rgb.ndim != 3:
        return None
    array, _, n = got
    y = np.empty(n, np.uint8)
    out = np.empty(array.shape, np.uint8)
    present = kernel.vk_equalize_luma(array.ctypes.data, n, y.ctypes.data, out.ctypes.data)
    return out, present


def add_change(rgb: np.ndarray, new: np.ndarray, old: np.ndarray) -> np.ndarray | None:
    """``clip(rgb + new - old)`` of a uint8 ``(h, w, 3)`` array and the new and old uint8 ``(h, w)`` values
    of its pixels (:func:`vipsnorm.methods._hist.add_change`), or None."""
    kernel = _load()[0] if available() else None
    got = _pixels(rgb) if kernel is not None else None
    if got is None or got[1] != 3:
        return None
    array, _, n = got
    new, old = np.ascontiguousarray(new, dtype=np.uint8), np.ascontiguousarray(old, dtype=np.uint8)
    if new.size != n or old.size != n:
        return None
    out = np.empty(array.shape, np.uint8)
    kernel.vk_add_change(array.ctypes.data, new.ctypes.data, old.ctypes.data, n, out.ctypes.data)
    return out


class ClaheGeometry:
    """Where each value of a ``(h, w)`` plane finds its four region LUTs in CLAHE's interpolation, and its
    weights, checked once for :func:`clahe_map`: the two int32 LUT bases of each row (``rows``) and of
    each value column (``columns``), the float32 weights ``(1 - a, a)`` across (``(w,)``) and
    ``(1 - b, b)`` down (``(h,)``).

    Raises
    ------
    ValueError
        Arrays of other sizes, or a negative base."""

    def __init__(self, rows: tuple, columns: tuple, weights: tuple):
        self.rows = tuple(np.ascontiguousarray(r, dtype=np.int32).reshape(-1) for r in rows)
        self.columns = tuple(np.ascontiguousarray(c, dtype=np.int32).reshape(-1) for c in columns)
        self.weights = tuple(np.ascontiguousarray(w, dtype=np.float32).reshape(-1) for w in weights)
        (r1, r2), (c1, c2), (xa1, xa, ya1, ya) = self.rows, self.columns, self.weights
        self.height, self.width = r1.size, c1.size
        if not (r2.size == ya1.size == ya.size == self.height and c2.size == xa1.size == xa.size == self.width):
            raise ValueError("CLAHE geometry: bases and weights of different sizes")
        if min(int(a.min()) for a in (r1, r2, c1, c2)) < 0:
            raise ValueError("CLAHE geometry: negative LUT base")
        #: one past the largest table index a value can reach
        self.reach = max(int(r1.max()), int(r2.max())) + max(int(c1.max()), int(c2.max())) + 256


def clahe_map(plane: np.ndarray, table: np.ndarray, geometry: ClaheGeometry) -> np.ndarray | None:
    """CLAHE's interpolation (:func:`vipsnorm.methods.clahe._map_array`) of a uint8 ``(h, w)`` plane of
    values through ``table``, the flat float32 region LUTs, at ``geometry``'s places and weights; or None
    (kernel off).

    Raises
    ------
    ValueError
        The plane is not the geometry's size, or the table too short for its bases."""
    kernel = _load()[0] if available() else None
    if kernel is None or max(geometry.height, geometry.width) >= 1 << 31:  # (C ints: numpy maps it)
        return None
    if plane.dtype != np.uint8 or plane.shape != (geometry.height, geometry.width):
        raise ValueError(f"clahe_map: expected a uint8 {(geometry.height, geometry.width)} plane, not {plane.dtype} {plane.shape}")
    table = np.ascontiguousarray(table, dtype=np.float32)
    if geometry.reach > table.size:
        raise ValueError(f"clahe_map: the geometry reaches entry {geometry.reach - 1} of a table of {table.size}")
    plane = np.ascontiguousarray(plane)
    (r1, r2), (c1, c2), (xa1, xa, ya1, ya) = geometry.rows, geometry.columns, geometry.weights
    out = np.empty(plane.shape, np.uint8)
    kernel.vk_clahe_map(
        plane.ctypes.data, geometry.height, geometry.width, table.ctypes.data, r1.ctypes.data, r2.ctypes.data,
        c1.ctypes.data, c2.ctypes.data, xa1.ctypes.data, xa.ctypes.data, ya1.ctypes.data, ya.ctypes.data,
        out.ctypes.data,
    )  # fmt: skip
    return out


def region_counts(planes: np.ndarray, grid: tuple[int, int], tile: tuple[int, int], ys: np.ndarray, xs: np.ndarray) -> np.ndarray | None:
    """CLAHE's ``(channels, rows, cols, 256)`` int64 region counts of uint8 ``(h, w, channels)`` planes read
    through a padded grid (:func:`vipsnorm.methods.clahe._region_histograms_array`): padded row ``y`` is
    source row ``ys[y]`` (``rows * th`` of them), padded column ``x`` source column ``xs[x]``; or None.

    Raises
    ------
    ValueError
        Source indices outside the planes, or not one per padded row and column."""
    kernel = _load()[0] if available() else None
    if kernel is None or planes.dtype != np.uint8 or planes.ndim != 3:
        return None
    (cols, rows), (tw, th) = grid, tile
    height, width, channels = planes.shape
    if width * channels >= 1 << 31 or rows * th >= 1 << 31 or cols * tw >= 1 << 31:
        return None  # (C ints: numpy counts it)
    ys, xs = np.ascontiguousarray(ys, dtype=np.int32), np.ascontiguousarray(xs, dtype=np.int32)
    if ys.shape != (rows * th,) or xs.shape != (cols * tw,):
        raise ValueError("region_counts: one source index per padded row and column")
    if min(ys.min(), xs.min()) < 0 or ys.max() >= height or xs.max() >= width:
        raise ValueError("region_counts: source index outside the planes")
    planes = np.ascontiguousarray(planes)
    out = np.zeros((channels, rows, cols, 256), np.int64)
    kernel.vk_region_counts(planes.ctypes.data, width, channels, cols, rows, tw, th, ys.ctypes.data, xs.ctypes.data, out.ctypes.data)
    return out


def clahe_luts(hist: np.ndarray, clip: int, scale: np.float32) -> np.ndarray | None:
    """OpenCV's clipped-equalization LUTs (:func:`vipsnorm.methods.clahe.clahe_luts`) of ``(..., 256)``
    region counts: bins clipped at ``clip`` (0: not clipped), cumulative counts times the float32
    ``scale``; uint8, or None."""
    kernel = _load()[0] if available() else None
    if kernel is None:
        return None
    counts = np.ascontiguousarray(hist, dtype=np.int64)
    if counts.shape[-1:] != (256,):
        return None
    out = np.empty(counts.shape, np.uint8)
    kernel.vk_clahe_luts(counts.ctypes.data, counts.size // 256, int(clip), ctypes.c_float(scale), out.ctypes.data)
    return out
