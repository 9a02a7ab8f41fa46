"""Colour arithmetic of the stain methods, and the one per-pixel pipeline both backends run.

A stain method's apply step is a short chain of steps of five kinds, described once as data and run
by two small interpreters, so the lazy pyvips path and the numpy path cannot drift apart:

``Lut(table)``
    Index a table with the (uchar or ushort) pixel values; ``table`` is ``(1 or 3, n)`` float32 or uint8.
``Recomb(matrix)``
    A 3x3 matrix on the bands: accumulated in float64, stored as float32 (what libvips' ``recomb``
    does).
``ToIndex()``
    float -> ushort: truncated towards zero and clipped to 0..65535 (libvips' ``cast``).
``PairSum(r, g, b)``
    A per-channel table followed by a 3x3 matrix, on uchar RGB, as two lookups and one add: band ``k``
    is ``rg[k, R + 256 G] + b[k, B]`` (float32 tables, float32 sum). The (R, G) pair of a pixel is read
    as one ushort (its two bytes, reinterpreted), so one ``maplut`` of a 65536-entry table does what
    three table reads and six multiply-adds do in ``Lut`` + ``Recomb``; a ``recomb`` costs libvips
    about 7 ns a pixel, more than the decode (measured on a 8192 px square in memory, 2 cores: Macenko's
    whole map 12.2 -> 7.4 CPU ns a pixel, reading the input included). Built by :func:`pair_sum` from
    the ``Lut`` and ``Recomb`` it replaces;
    the sums round once more to float32 than ``Recomb``'s (a difference of about one part in 10^7).
``ColumnMix(diagonal, column, source)``
    A ``Lut`` followed by a ``Recomb`` whose matrix is diagonal but for one column (Reinhard's Lab map
    in companded coordinates: ``f'_x`` and ``f'_z`` take a multiple of ``f_y``): band ``k`` is
    ``diagonal[k, i_k] + column[k, i_source]``, two lookups and one add instead of a ``recomb``
    (Reinhard's whole map 28.7 -> 25.1 CPU ns a pixel on a 8192 px square). Built by :func:`column_mix`.

A non-linear function of a float (``exp``, a cube root) is a ``ToIndex`` then a ushort-indexed ``Lut``:
libvips looks up a 65536-entry table faster than it evaluates ``exp``, and the quantization error (one
part in 65536 of the range) is far below one output grey level.

Notes
-----
Colour space of :func:`rgb_to_lab`: CIELAB, D65 white (0.95047, 1, 1.08883), 2 degree observer, from
sRGB uchar through the sRGB transfer curve and the sRGB->XYZ matrix of ``skimage.color.rgb2lab`` (which
torchstain's numpy backend copies): L in [0, 100], a and b unscaled. Optical density is
``OD = -ln((I + 1) / Io)`` per channel, as the reference Macenko implementation.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import numpy as np
import pyvips

from ._hist import STEP

__all__ = [
    "HE_REF",
    "MAX_C_REF",
    "WHITE_D65",
    "RGB_TO_XYZ",
    "od_lut",
    "srgb_to_linear",
    "linear_to_srgb",
    "lab_f",
    "lab_f_inverse",
    "rgb_to_lab",
    "Lut",
    "Recomb",
    "ToIndex",
    "PairSum",
    "pair_sum",
    "ColumnMix",
    "column_mix",
    "kernel_steps",
    "run_image",
    "run_array",
    "blend_image",
    "blend_array",
]

#: The canonical Macenko target (Macenko et al. 2009; HEnorm_python, torchstain): columns H, E.
HE_REF = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
#: Its 99th-percentile concentrations of H and E.
MAX_C_REF = (1.9705, 1.0308)

WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
#: sRGB (linear) -> XYZ, as ``skimage.color.colorconv.xyz_from_rgb``.
RGB_TO_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
#: Lab = LAB_K @ f + LAB_C, with f = lab_f(XYZ / white).
LAB_K = np.array([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]])
LAB_C = np.array([-16.0, 0.0, 0.0])

_V = np.arange(256, dtype=np.float64)
#: Size of a ushort-indexed table.
N16 = 65536


def od_lut(io: float) -> np.ndarray:
    """Optical density ``-ln((v + 1) / io)`` of every uchar value ``v`` (float64, 256 entries)."""
    return -np.log((_V + 1.0) / io)


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """sRGB transfer curve, inverse: [0, 1] gamma-encoded -> [0, 1] linear."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """sRGB transfer curve: [0, 1] linear -> [0, 1] gamma-encoded (values outside are clipped)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    return np.where(x > 0.0031308, 1.055 * x ** (1 / 2.4) - 0.055, 12.92 * x)


def lab_f(t: np.ndarray) -> np.ndarray:
    """The CIELAB companding function (cube root with its linear toe, skimage's constants)."""
    t = np.asarray(t, dtype=np.float64)
    return np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16.0 / 116.0)


def lab_f_inverse(f: np.ndarray) -> np.ndarray:
    """Inverse of :func:`lab_f` (skimage's ``lab2xyz`` rule)."""
    f = np.asarray(f, dtype=np.float64)
    return np.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)


#: :func:`srgb_to_linear` of every uchar value over 255 (float64): the same values, looked up.
_LINEAR = srgb_to_linear(_V / 255.0)
_LINEAR.flags.writeable = False


def rgb_to_lab(pixels: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of uint8 sRGB ``(..., 3)`` pixels, float64; equal to ``skimage.color.rgb2lab``."""
    pixels = np.asarray(pixels)
    if pixels.dtype == np.uint8:  # a lookup, not a power per value (0.38 s -> 0.03 s for 2M pixels)
        linear = np.take(_LINEAR, pixels)
    else:
        linear = srgb_to_linear(np.asarray(pixels, dtype=np.float64) / 255.0)
    f = lab_f(linear @ (RGB_TO_XYZ / WHITE_D65[:, np.newaxis]).T)
    return f @ LAB_K.T + LAB_C


# --- the pipeline ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Lut:
    """Index ``table`` (``(1 or 3, n)``, float32 or uint8) with the pixel values, band by band."""

    table: np.ndarray


@dataclass(frozen=True, eq=False)
class Recomb:
    """Multiply the bands by a 3x3 matrix (float64 accumulation, float32 result)."""

    matrix: np.ndarray


@dataclass(frozen=True)
class ToIndex:
    """float -> ushort, truncated and clipped to 0..65535."""


@dataclass(frozen=True, eq=False)
class PairSum:
    """Band ``k`` of the output: ``rg[k, R + 256 G] + b[k, B]`` of a uchar RGB input (float32), where
    ``rg[k, R + 256 G] = float32(r[k, R] + g[k, G])`` (the sum in float64).

    ``r``, ``g`` are the R and G terms (``(3, 256)`` float64: a matrix column times a table row), ``b``
    the B term (float32). The 65536-entry :attr:`rg` is built on first use (0.4 ms; libvips needs it),
    so that a fit made for one patch (stain jitter draws one per patch) does not pay for it: the numpy
    path adds the two terms per pixel instead, with the same float64 sum and rounding.
    """

    r: np.ndarray  # (3, 256) float64, indexed by R
    g: np.ndarray  # (3, 256) float64, indexed by G
    b: np.ndarray  # (3, 256) float32, indexed by B

    @functools.cached_property
    def rg(self) -> np.ndarray:
        """(3, 65536) float32, indexed by the ushort of a pixel's bytes R, G (this machine's order)."""
        rg = (self.r[:, _PAIR_R] + self.g[:, _PAIR_G]).astype(np.float32)
        rg.flags.writeable = False
        return rg


def pair_sum(table: np.ndarray, matrix: np.ndarray) -> PairSum:
    """The :class:`PairSum` of ``Lut(table)`` then ``Recomb(matrix)`` on uchar RGB.

    ``table`` is ``(1 or 3, 256)`` (one row for every band, or one per band), ``matrix`` 3x3. The R and
    G terms are summed in float64 and stored as float32; the B term likewise; the pipeline adds the two
    in float32.
    """
    t = np.asarray(table, dtype=np.float64).reshape(-1, 256)
    t = np.broadcast_to(t, (3, 256))
    m = np.asarray(matrix, dtype=np.float64).reshape(3, 3)
    r = np.stack([m[k, 0] * t[0] for k in range(3)])
    g = np.stack([m[k, 1] * t[1] for k in range(3)])
    b = np.stack([m[k, 2] * t[2] for k in range(3)]).astype(np.float32)
    return PairSum(r, g, b)


# R and G of each ushort index of a pixel's first two bytes, in this machine's byte order.
_PAIR_INDEX = np.arange(N16, dtype=np.uint16).view(np.uint8).reshape(N16, 2)
_PAIR_R, _PAIR_G = _PAIR_INDEX[:, 0].copy(), _PAIR_INDEX[:, 1].copy()
_PAIR_R.flags.writeable = False
_PAIR_G.flags.writeable = False
#: Pixels from which the numpy path looks pairs up in :attr:`PairSum.rg` (building it if need be)
#: rather than adding the two terms per pixel: about where building the table costs what it saves.
_PAIR_TABLE_PIXELS = 1 << 18


@dataclass(frozen=True, eq=False)
class ColumnMix:
    """Band ``k``: ``diagonal[k, i_k] + column[k, i_source]`` of index bands ``i`` (float32)."""

    diagonal: np.ndarray  # (3, n) float32
    column: np.ndarray  # (3, n) float32, zero in row `source`
    source: int


def column_mix(table: np.ndarray, matrix: np.ndarray) -> ColumnMix:
    """The :class:`ColumnMix` of ``Lut(table)`` then ``Recomb(matrix)``, for a ``matrix`` that is zero
    off its diagonal except in one column (ValueError otherwise). Each product is stored as float32;
    the pipeline adds the two in float32."""
    t = np.asarray(table, dtype=np.float64)
    t = np.broadcast_to(t.reshape(-1, t.shape[-1]), (3, t.shape[-1]))
    m = np.asarray(matrix, dtype=np.float64).reshape(3, 3)
    off = m - np.diag(np.diag(m))
    columns = [c for c in range(3) if np.any(off[:, c] != 0)]
    if len(columns) > 1:
        raise ValueError(f"matrix has off-diagonal terms in more than one column: {m.tolist()}")
    source = columns[0] if columns else 0
    diagonal = (np.diag(m)[:, np.newaxis] * t).astype(np.float32)
    column = (off[:, source][:, np.newaxis] * t[source][np.newaxis, :]).astype(np.float32)
    return ColumnMix(diagonal, column, source)


Step = Lut | Recomb | ToIndex | PairSum | ColumnMix


def _lut_image(table: np.ndarray) -> pyvips.Image:
    # (bands, n) -> an n x 1 image with `bands` bands
    return pyvips.Image.new_from_array(np.ascontiguousarray(table.T[np.newaxis]))


def kernel_steps(steps: list[Step], weight: np.ndarray | None = None) -> list[tuple[str, dict]] | None:
    """``steps`` (then the glass blend of :func:`blend_image` by the ``(1, 256)`` uint8 ``weight`` of a
    pixel's darkest band, if given) in the form of :class:`vipsnorm._native.Program`, or ``None`` if the
    chain does not map uchar RGB to uchar RGB the way the kernel knows (it then runs as it is)."""
    out: list[tuple[str, dict]] = []
    state = "rgb8"  # what the pixels are between steps, as in the kernel
    for step in steps:
        if isinstance(step, PairSum) and state == "rgb8":
            out.append(("pair", dict(t1=np.ascontiguousarray(step.rg, np.float32), t2=np.ascontiguousarray(step.b, np.float32))))
            state = "f32"
        elif isinstance(step, ToIndex) and state == "f32":
            out.append(("index", {}))
            state = "u16"
        elif isinstance(step, ColumnMix) and state == "u16" and step.diagonal.shape == step.column.shape:
            n = step.diagonal.shape[1]
            if n != N16 or step.diagonal.shape[0] != 3:
                return None
            t1, t2 = (np.ascontiguousarray(t, np.float32) for t in (step.diagonal, step.column))
            out.append(("mix", dict(n=n, source=step.source, t1=t1, t2=t2)))
            state = "f32"
        elif isinstance(step, Lut) and state in ("rgb8", "u8", "u16"):
            table = step.table
            rows, n = table.shape
            if rows not in (1, 3) or n != (N16 if state == "u16" else 256) or table.dtype not in (np.float32, np.uint8):
                return None
            is_float = table.dtype == np.float32
            out.append(("lut", dict(rows=rows, n=n, is_float=int(is_float), t1=np.ascontiguousarray(table))))
            state = "f32" if is_float else "u8"
        elif isinstance(step, Recomb) and state == "f32":
            out.append(("recomb", dict(m=np.asarray(step.matrix, dtype=np.float64).reshape(3, 3))))
        else:
            return None
    if state != "u8":
        return None
    if weight is not None:
        out.append(("blend", dict(t1=np.ascontiguousarray(np.asarray(weight, np.uint8).reshape(256)))))
    return out


def run_image(image: pyvips.Image, steps: list[Step]) -> pyvips.Image:
    """Run ``steps`` lazily on a pyvips image."""
    for step in steps:
        if isinstance(step, PairSum):
            if image.format != "uchar" or image.bands != 3:
                raise ValueError(f"PairSum maps uchar RGB, not {image.format} with {image.bands} bands")
            # bytes R, G of each pixel read as one ushort (a reinterpretation: no pixels copied)
            pair = image.extract_band(0, n=2).copy(format="ushort", bands=1)
            image = pair.maplut(_lut_image(step.rg)) + image[2].maplut(_lut_image(step.b))
        elif isinstance(step, ColumnMix):
            image = image.maplut(_lut_image(step.diagonal)) + image[step.source].maplut(_lut_image(step.column))
        elif isinstance(step, Lut):
            image = image.maplut(_lut_image(step.table))
        elif isinstance(step, Recomb):
            image = image.recomb(step.matrix.tolist())
        else:
            image = image.cast("ushort")
    return image


def run_array(array: np.ndarray, steps: list[Step]) -> np.ndarray:
    """Run ``steps`` on a ``(..., 3)`` numpy array, with the arithmetic of :func:`run_image`.

    The pixels go through band by band (``np.take`` lookups, no stacking of the bands between steps), in
    steps of :data:`~._hist.STEP` pixels (float64 temporaries below glibc's mmap threshold). Two
    shortcuts give the same values: a small float32 table followed by a ``Recomb`` is read in float64
    (the values ``Recomb`` casts it to), and a ``Recomb`` followed by ``ToIndex`` clips in float64 before
    rounding to float32 (0 and 65535 are float32 values, so clipping before or after the rounding is the
    same, and the uint16 cast truncates as ``ToIndex`` does).
    """
    if not steps:
        return array
    plan = []
    for i, step in enumerate(steps):
        following = steps[i + 1] if i + 1 < len(steps) else None
        if isinstance(step, PairSum):
            plan.append(("pair", step, int(np.prod(array.shape[:-1])), isinstance(following, ToIndex)))
        elif isinstance(step, ColumnMix):
            plan.append(("mix", step, isinstance(following, ToIndex)))
        elif isinstance(step, Lut):
            t = step.table
            if t.dtype == np.float32 and t.shape[-1] <= 256 and isinstance(following, Recomb):
                t = t.astype(np.float64)
            plan.append(("lut", t))
        elif isinstance(step, Recomb):
            plan.append(("recomb", step.matrix, isinstance(following, ToIndex)))
        elif not (i > 0 and isinstance(steps[i - 1], (Recomb, PairSum, ColumnMix))):  # else done by it
            plan.append(("index",))
    flat = array.reshape(-1, array.shape[-1])
    n = flat.shape[0]
    out = None
    for start in range(0, max(n, 1), STEP):
        planes = [flat[start : start + STEP, b] for b in range(flat.shape[1])]
        for op in plan:
            planes = _run_step(op, planes)
        if out is None:
            out = np.empty((n, len(planes)), planes[0].dtype)
        for b, plane in enumerate(planes):
            out[start : start + STEP, b] = plane
    return out.reshape(array.shape[:-1] + (out.shape[1],))


def _run_step(op: tuple, planes: list[np.ndarray]) -> list[np.ndarray]:
    if op[0] == "pair":
        step, total, to_index = op[1], op[2], op[3]
        if len(planes) != 3 or planes[0].dtype != np.uint8:
            raise ValueError("PairSum maps uint8 RGB")
        out = []
        if "rg" in step.__dict__ or total >= _PAIR_TABLE_PIXELS:  # the table, built or worth building
            low, high = (planes[0], planes[1]) if sys.byteorder == "little" else (planes[1], planes[0])
            index = np.left_shift(high, 8, dtype=np.uint16)
            index |= low
            for k in range(3):
                x = np.take(step.rg[k], index)
                x += np.take(step.b[k], planes[2])
                out.append(_to_index(x) if to_index else x)
            return out
        # the same float64 sum of the two terms, rounded to float32, per pixel (each index converted to
        # intp once, not once per take)
        r, g, b = (p.astype(np.intp) for p in planes)
        for k in range(3):
            x = np.take(step.r[k], r)
            x += np.take(step.g[k], g)
            x = x.astype(np.float32)
            x += np.take(step.b[k], b)
            out.append(_to_index(x) if to_index else x)
        return out
    if op[0] == "mix":
        step, to_index = op[1], op[2]
        out = []
        for k in range(3):
            x = _lookup(step.diagonal[k], planes[k])
            x += _lookup(step.column[k], planes[step.source])
            out.append(_to_index(x) if to_index else x)
        return out
    if op[0] == "lut":
        t = op[1]
        return [_lookup(t[0] if t.shape[0] == 1 else t[b], x) for b, x in enumerate(planes)]
    if op[0] == "recomb":
        # libvips accumulates left to right in double, then stores float
        m, to_index = op[1], op[2]
        x = [p if p.dtype == np.float64 else p.astype(np.float64) for p in planes[:3]]
        term = np.empty_like(x[0])
        out = []
        for r in range(3):
            acc = np.multiply(x[0], m[r, 0])
            acc += np.multiply(x[1], m[r, 1], out=term)
            acc += np.multiply(x[2], m[r, 2], out=term)
            if to_index:
                out.append(np.clip(acc, 0, N16 - 1, out=acc).astype(np.float32).astype(np.uint16))
            else:
                out.append(acc.astype(np.float32))
        return out
    return [np.clip(np.trunc(x), 0, N16 - 1).astype(np.uint16) for x in planes]


def _to_index(x: np.ndarray) -> np.ndarray:
    """``ToIndex`` of a float32 plane, in place where it can: clipping to 0..65535 before truncating is
    truncating then clipping (both bounds are integers), and the uint16 cast truncates."""
    return np.clip(x, 0, N16 - 1, out=x).astype(np.uint16)


def _lookup(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``table[index]``; by ``np.take`` (faster) when every value of the index's dtype is in range."""
    if index.dtype.kind == "u" and table.shape[0] > np.iinfo(index.dtype).max:
        return np.take(table, index, mode="wrap")
    return table[index]


def blend_image(weight: pyvips.Image, a: pyvips.Image, b: pyvips.Image) -> pyvips.Image:
    """``(w a + (255 - w) b + 128) // 255`` for a uchar 1-band weight ``w``, uchar result."""
    return weight.ifthenelse(a, b, blend=True)


def blend_array(weight: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The numpy twin of :func:`blend_image` (libvips' integer arithmetic, bit-exact)."""
    w = weight.astype(np.int32)[..., np.newaxis]
    return ((w * a + (255 - w) * b.astype(np.int32) + 128) // 255).astype(np.uint8)
