"""Loader of the native colour kernel (``_kernel.c``): the colour methods' per-pixel chains in one pass.

The kernel is optional. It is built at install when a C compiler is present (it needs no libvips
headers); without it, or with ``VIPSNORM_NATIVE=0`` in the environment, every method runs as a chain of
libvips operations (and numpy for arrays), which gives the same bytes. :func:`available` says which.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
import threading
from collections import OrderedDict

import numpy as np
import pyvips

__all__ = ["available", "reason", "switched_off", "Program", "OP", "CUBE"]

_THINSTRIP = 2  # libvips' VIPS_DEMAND_STYLE_THINSTRIP, read from libvips when the kernel loads

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


def _libvips_path() -> str:
    """The file of the libvips pyvips has loaded (Linux: from the process's memory map)."""
    pyvips.Image.black(1, 1)  # loaded and initialized
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split(maxsplit=5)[-1].strip()
            name = os.path.basename(path)
            if name.startswith("libvips") and ".so" in name and "cpp" not in name:
                return path
    raise OSError("libvips is not mapped in this process")


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
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
    pointer = ctypes.c_void_p
    kernel.vk_program_new.restype = pointer
    kernel.vk_program_new.argtypes = [ctypes.POINTER(_Step), ctypes.c_int]
    kernel.vk_program_unref.argtypes = [pointer]
    kernel.vk_cube_alloc.argtypes = [pointer]
    kernel.vk_cube_fill.argtypes = [pointer, ctypes.c_long, ctypes.c_long]
    kernel.vk_cube_ready.argtypes = [pointer]
    kernel.vk_run.argtypes = [pointer, pointer, pointer, ctypes.c_long]
    kernel.vk_image.restype = pointer
    kernel.vk_image.argtypes = [pointer, pointer, ctypes.c_int]
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
_THREADS = max(1, min(8, os.cpu_count() or 1))


class Program:
    """A chain of steps compiled for the kernel (its tables copied into it).

    ``steps``: ``(kind, fields)`` pairs, ``kind`` a key of :data:`OP`; ``fields`` among ``rows``,
    ``n``, ``is_float``, ``source``, ``m`` (3x3) and the tables ``t1``, ``t2`` (see ``_kernel.c``).
    """

    def __init__(self, steps: list[tuple[str, dict]]):
        kernel = _load()[0]
        if kernel is None:
            raise RuntimeError(f"native kernel unavailable: {reason()}")
        self._kernel = kernel
        self._lock = threading.Lock()
        array = (_Step * max(1, len(steps)))()
        keep = []
        for i, (kind, fields) in enumerate(steps):
            s = array[i]
            s.kind = OP[kind]
            for key in ("rows", "n", "is_float", "source"):
                setattr(s, key, int(fields.get(key, 0)))
            if "m" in fields:
                s.m[:] = [float(v) for v in np.asarray(fields["m"], dtype=np.float64).ravel()]
            for key in ("t1", "t2"):
                if fields.get(key) is not None:
                    t = np.ascontiguousarray(fields[key])
                    keep.append(t)
                    setattr(s, key, t.ctypes.data)
        self._pointer = kernel.vk_program_new(array, len(steps))
        if not self._pointer:
            raise MemoryError("cannot allocate the native kernel's program")
        self.has_cube = False

    def __del__(self):
        pointer, self._pointer = getattr(self, "_pointer", None), None
        if pointer:
            self._kernel.vk_program_unref(pointer)

    def build_cube(self) -> "Program":
        """Evaluate the program on every RGB colour (64 MiB, on every core): from then on a pixel is
        one lookup. Returns the program."""
        with self._lock:
            if self.has_cube:
                return self
            if self._kernel.vk_cube_alloc(self._pointer) != 0:
                raise MemoryError("cannot allocate the native kernel's 64 MiB colour cube")
            part = CUBE // _THREADS
            ranges = [(i * part, CUBE - i * part if i == _THREADS - 1 else part) for i in range(_THREADS)]
            # ctypes releases the GIL during a call: the parts fill in parallel
            threads = [threading.Thread(target=self._kernel.vk_cube_fill, args=(self._pointer, start, count))
                       for start, count in ranges]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            self._kernel.vk_cube_ready(self._pointer)
            self.has_cube = True
        return self

    def run(self, array: np.ndarray) -> np.ndarray:
        """The program on a ``(..., 3)`` uint8 array (a new array)."""
        array = np.ascontiguousarray(array)
        if array.dtype != np.uint8 or array.shape[-1:] != (3,):
            raise ValueError(f"expected (..., 3) uint8 pixels, not {array.dtype} {array.shape}")
        out = np.empty_like(array)
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
#: Filling the cube runs the chain on 2^24 colours; a lookup then costs about 2 CPU ns a pixel against
#: 5 (Macenko, luminance equalization) to 18 (Reinhard) for the chain (measured on an 8192 px square of
#: H&E colours): the cube has paid for itself after about twice its own size.
CUBE_PIXELS = 2 * CUBE

_programs: "OrderedDict[object, Program | None]" = OrderedDict()
_programs_lock = threading.Lock()
#: Programs kept for reuse, by key (each with up to a 64 MiB cube).
KEPT = 2


def program(key, make) -> Program | None:
    """The program made by ``make()`` for ``key`` (``None``: the chain has no kernel form), kept for the
    last :data:`KEPT` keys (patches of one slide, and the images of one run, share their params). An
    unhashable key is not kept."""
    try:
        hash(key)
    except TypeError:
        return make()
    with _programs_lock:
        if key in _programs:
            _programs.move_to_end(key)
            return _programs[key]
    made = make()
    with _programs_lock:
        _programs[key] = made
        _programs.move_to_end(key)
        while len(_programs) > KEPT:
            _programs.popitem(last=False)
    return made


def map_image(image: pyvips.Image, key, make) -> pyvips.Image | None:
    """``image`` (uchar RGB) mapped lazily by the program of ``key``, through its cube when the image
    has :data:`CUBE_PIXELS` or more; ``None`` when the kernel is off or the chain has no kernel form."""
    prog = program(key, make) if available() else None
    if prog is None:
        return None
    if image.width * image.height >= CUBE_PIXELS:
        prog.build_cube()
    return prog.image(image)


def map_array(array: np.ndarray, key, make) -> np.ndarray | None:
    """A ``(..., 3)`` uint8 array mapped by the program of ``key`` (through its cube if it has one, or
    if the array has :data:`CUBE_PIXELS` or more); ``None`` as :func:`map_image`."""
    prog = program(key, make) if available() else None
    if prog is None:
        return None
    if array.size // 3 >= CUBE_PIXELS:
        prog.build_cube()
    return prog.run(array)
