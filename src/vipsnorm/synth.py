"""Synthetic H&E whole-slide images built as lazy pyvips pipelines.

The generator models a brightfield scan with Beer-Lambert stain mixing: every
pixel carries a hematoxylin concentration ``C_H`` and an eosin concentration
``C_E``; its optical density is ``OD = C_H * h + C_E * e`` (``h`` and ``e`` are
unit OD vectors) and its intensity is ``I = Io * exposure * tint * exp(-OD)``
per channel.

Design
------
Nothing is computed at full resolution except the final, cheap steps, so a
40000 x 40000 slide streams through :meth:`pyvips.Image.tiffsave` in bounded
memory:

* A *low grid* (16+ output pixels per cell, at most ~4096 cells on the long
  side) holds a multi-octave Perlin field that defines tissue islands and
  holes.  It is evaluated eagerly (it is small) so that the threshold giving
  the requested tissue fraction can be taken as a quantile.
* A *half-resolution grid* combines the upscaled tissue field with Perlin
  noise (boundary roughness, stroma fibres, stain variation, cellularity) and
  two seamless, replicated nuclei tiles of different periods (drawn with numpy
  as jittered-grid ellipses with chromatin texture).  Non-repeating gates hide
  different nuclei in every repetition so the tiling is not visible.  The two
  concentrations are encoded as uchar codes ``255 * sqrt(C / C_max)``.
* At full resolution the 2-band code image is upscaled x2 (bilinear, as a
  nearest zoom plus a vectorised integer box filter), reinterpreted (free) as
  one ``ushort`` index per pixel, and mapped through a 65536-entry RGB
  lookup table holding the Beer-Lambert model of the chosen :class:`Lab`.
  Finally a replicated tile of per-channel Gaussian pixel noise is added.

Because the lab only enters through the lookup table, the same ``seed`` gives
the same tissue in every lab, only the colours differ.

Command line (for benchmarks)::

    python -m vipsnorm.synth OUT.tif --size 20000 --lab pale-blue --seed 1
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyvips

from .io.write import write_pyramid

__all__ = [
    "DEFAULT_STAINS",
    "LABS",
    "Lab",
    "main",
    "synthetic_slide",
    "write_synthetic_slide",
]

#: Ruifrok & Johnston hematoxylin and eosin OD vectors, unit length, as the
#: columns of a 3 x 2 matrix (rows R, G, B).
DEFAULT_STAINS: np.ndarray = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
DEFAULT_STAINS /= np.linalg.norm(DEFAULT_STAINS, axis=0)

# Largest concentration representable by the 8-bit codes.
_C_MAX = 3.0
# Output pixels per half-resolution pixel (the detail grid).
_DETAIL = 2
# Half-resolution pixels per low-grid cell (at least).
_LOW_MIN_FACTOR = 8
# Longest side of the low grid.
_LOW_MAX_SIDE = 4096
# Faint background stain on glass (mounting medium, dust), concentration units.
_GLASS_H = 0.004
_GLASS_E = 0.005
# Standard deviation of the per-channel pixel noise, grey levels.
_NOISE_SIGMA = 1.6
# Size of the replicated pixel-noise tile (primes, so it never aligns).
_NOISE_TILE = (509, 503)


@dataclass(frozen=True)
class Lab:
    """Appearance preset of a staining lab and scanner.

    Parameters
    ----------
    name : str
        Preset name.
    stains : tuple of tuple of float
        3 x 2 optical-density matrix, rows R, G, B and columns hematoxylin and
        eosin.  Columns are normalised to unit length when used.
    tint : tuple of float, default (1, 1, 1)
        Per-channel multiplicative scanner tint.
    exposure : float, default 1
        Multiplies the intensity of every channel.
    h_scale : float, default 1
        Scales the hematoxylin concentration.
    e_scale : float, default 1
        Scales the eosin concentration.
    """

    name: str
    stains: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    exposure: float = 1.0
    h_scale: float = 1.0
    e_scale: float = 1.0

    def __post_init__(self) -> None:
        m = np.asarray(self.stains, dtype=np.float64)
        if m.shape != (3, 2) or not np.all(np.isfinite(m)):
            raise ValueError(f"stains must be a finite 3 x 2 matrix, got {self.stains!r}")
        if np.any(np.linalg.norm(m, axis=0) == 0):
            raise ValueError("stain vectors must be non-zero")
        if len(self.tint) != 3 or self.exposure <= 0:
            raise ValueError("tint needs 3 values and exposure must be positive")

    def stain_matrix(self) -> np.ndarray:
        """Return the stain matrix with unit-length columns.

        Returns
        -------
        numpy.ndarray
            3 x 2 float64 array, columns hematoxylin and eosin.
        """
        m = np.asarray(self.stains, dtype=np.float64).reshape(3, 2)
        return m / np.linalg.norm(m, axis=0, keepdims=True)


def _stains(
    h: Sequence[float], e: Sequence[float]
) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """Build a ``Lab.stains`` tuple from two (not necessarily unit) vectors."""
    m = np.stack([np.asarray(h, float), np.asarray(e, float)], axis=1)
    m = m / np.linalg.norm(m, axis=0, keepdims=True)
    r, g, b = (tuple(float(x) for x in row) for row in m)
    return (r, g, b)  # type: ignore[return-value]


#: Built-in lab presets.
LABS: dict[str, Lab] = {
    lab.name: lab
    for lab in (
        Lab("reference", _stains(DEFAULT_STAINS[:, 0], DEFAULT_STAINS[:, 1])),
        # Weak, bluish hematoxylin and pale eosin, bright bluish scanner.
        Lab(
            "pale-blue",
            _stains([0.55, 0.68, 0.48], [0.12, 0.95, 0.20]),
            tint=(0.95, 0.99, 1.03),
            exposure=1.02,
            h_scale=0.75,
            e_scale=0.55,
        ),
        # Strong, red-shifted eosin and dark hematoxylin, dim warm scanner.
        Lab(
            "dark-pink",
            _stains([0.70, 0.68, 0.22], [0.03, 0.97, 0.24]),
            tint=(1.03, 0.96, 0.98),
            exposure=0.92,
            h_scale=1.25,
            e_scale=1.45,
        ),
        # Yellowed (aged) slide on a warm scanner, brownish hematoxylin.
        Lab(
            "yellow",
            _stains([0.60, 0.72, 0.35], [0.05, 0.92, 0.38]),
            tint=(1.02, 1.0, 0.91),
            exposure=0.98,
            h_scale=1.05,
            e_scale=0.9,
        ),
    )
}


# --------------------------------------------------------------------------
# helpers


def _resolve_lab(lab: Lab | str) -> Lab:
    """Return ``lab`` itself or the preset of that name."""
    if isinstance(lab, Lab):
        return lab
    try:
        return LABS[lab]
    except KeyError:
        raise ValueError(f"unknown lab {lab!r}; choose one of {sorted(LABS)}") from None


def _seeds(seed: int, n: int) -> list[int]:
    """Derive ``n`` independent non-negative int32 seeds from ``seed``."""
    state = np.random.SeedSequence(int(seed) % (1 << 64)).generate_state(n)
    return [int(s) & 0x7FFFFFFF for s in state]


def _from_numpy(a: np.ndarray) -> pyvips.Image:
    """Wrap a 2-D or 3-D (H, W, bands) numpy array as a memory vips image."""
    a = np.ascontiguousarray(a)
    bands = 1 if a.ndim == 2 else a.shape[2]
    fmt = {
        np.dtype(np.uint8): "uchar",
        np.dtype(np.int8): "char",
        np.dtype(np.float32): "float",
    }[a.dtype]
    return pyvips.Image.new_from_memory(a.tobytes(), a.shape[1], a.shape[0], bands, fmt)


def _tile(img: pyvips.Image, width: int, height: int) -> pyvips.Image:
    """Repeat ``img`` to cover ``width`` x ``height`` and crop to exactly that."""
    across = -(-width // img.width)
    down = -(-height // img.height)
    if across > 1 or down > 1:
        img = img.replicate(across, down)
    return img.crop(0, 0, width, height)


def _upsample(img: pyvips.Image, fx: int, fy: int) -> pyvips.Image:
    """Bilinear integer-factor upsampling of a uchar image.

    A nearest-neighbour ``zoom`` followed by a box filter as wide as the
    factor is exactly linear interpolation; with a uchar image libvips runs
    the filter as vectorised integer code, several times faster than
    ``resize(kernel="linear")`` (which gives the same pixels for x2).

    Parameters
    ----------
    img : pyvips.Image
        uchar image.
    fx, fy : int
        Horizontal and vertical factors (>= 1).

    Returns
    -------
    pyvips.Image
        Lazy uchar image ``fx`` times wider and ``fy`` times taller.
    """
    out = img.zoom(fx, fy)
    if fx == fy and fx > 1:
        box = pyvips.Image.new_from_array([[1] * fx], scale=fx)
        return out.convsep(box, precision="integer")
    if fx > 1:
        out = out.conv(pyvips.Image.new_from_array([[1] * fx], scale=fx), precision="integer")
    if fy > 1:
        out = out.conv(pyvips.Image.new_from_array([[1]] * fy, scale=fy), precision="integer")
    return out


def _clamp01(img: pyvips.Image) -> pyvips.Image:
    """Clamp a float image to [0, 1]."""
    return img.clamp(min=0.0, max=1.0)


def _lut(lab: Lab, io: float) -> pyvips.Image:
    """Beer-Lambert lookup table from packed concentration codes to RGB.

    Parameters
    ----------
    lab : Lab
        Appearance preset.
    io : float
        Incident light intensity (glass brightness before tint and exposure).

    Returns
    -------
    pyvips.Image
        65536 x 1, 3-band uchar.  Entry ``i`` holds the colour for hematoxylin
        code ``i & 255`` and eosin code ``i >> 8`` on little-endian machines
        (swapped on big-endian ones), matching a 2-band uchar image
        reinterpreted as 1-band ushort.
    """
    codes = np.arange(256, dtype=np.float64)
    conc = _C_MAX * (codes / 255.0) ** 2
    low, high = np.meshgrid(conc, conc, indexing="xy")  # high varies along rows
    c_h, c_e = (low, high) if sys.byteorder == "little" else (high, low)
    m = lab.stain_matrix()
    od = (
        (c_h * lab.h_scale)[..., None] * m[:, 0]
        + (c_e * lab.e_scale)[..., None] * m[:, 1]
    )
    gain = io * lab.exposure * np.asarray(lab.tint, dtype=np.float64)
    rgb = np.clip(np.rint(gain * np.exp(-od)), 0, 255).astype(np.uint8)
    return _from_numpy(rgb.reshape(1, 65536, 3))


def _noise_tile(seed: int) -> pyvips.Image:
    """Replicable 3-band ``char`` tile of Gaussian pixel noise."""
    rng = np.random.default_rng(seed)
    h, w = _NOISE_TILE
    noise = np.rint(rng.normal(0.0, _NOISE_SIGMA, size=(h, w, 3)))
    return _from_numpy(np.clip(noise, -127, 127).astype(np.int8))


def _periodic_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Box blur with wrap-around (keeps a tile seamless)."""
    out = a.copy()
    for axis in (0, 1):
        acc = out.copy()
        for k in range(1, radius + 1):
            acc += np.roll(out, k, axis=axis) + np.roll(out, -k, axis=axis)
        out = acc / (2 * radius + 1)
    return out


def _nuclei_tile(
    seed: int,
    spacing: int,
    cells: tuple[int, int],
    presence: float,
    radius: tuple[float, float],
    elongation: tuple[float, float],
) -> np.ndarray:
    """Draw a seamless tile of nuclei on a jittered grid.

    Parameters
    ----------
    seed : int
        Random seed.
    spacing : int
        Grid cell size in pixels (one candidate nucleus per cell).
    cells : tuple of int
        Number of grid cells down and across; the tile is ``spacing`` times
        larger and wraps around seamlessly.
    presence : float
        Probability that a cell holds a nucleus.
    radius : tuple of float
        Range of the mean nucleus radius in pixels.  The longest semi-axis,
        ``radius * sqrt(elongation)``, must stay below ``spacing`` so that
        searching the 3 x 3 neighbouring cells finds every covering nucleus.
    elongation : tuple of float
        Range of the axis ratio of the ellipses.

    Returns
    -------
    numpy.ndarray
        uint8 tile, 0 outside nuclei, up to 255 in the darkest chromatin.
    """
    rng = np.random.default_rng(seed)
    ny, nx = cells
    shape = (ny, nx)
    f32 = np.float32
    jy = rng.uniform(0.2, 0.8, shape).astype(f32) * spacing
    jx = rng.uniform(0.2, 0.8, shape).astype(f32) * spacing
    present = rng.random(shape) < presence
    rad = rng.uniform(*radius, shape)
    ratio = np.sqrt(rng.uniform(*elongation, shape))
    theta = rng.uniform(0.0, np.pi, shape)
    dark = np.where(present, rng.uniform(0.55, 1.0, shape), 0.0).astype(f32)
    # Inverse semi-axes along and across the ellipse, and the rotation.
    ia = (1.0 / (rad * ratio)).astype(f32)
    ib = (ratio / rad).astype(f32)
    cos = np.cos(theta).astype(f32)
    sin = np.sin(theta).astype(f32)
    sharp = (rad / 1.2).astype(f32)  # ~1.2 px anti-aliased border

    # Pixels laid out as (cell row, row in cell, cell column, column in cell);
    # the parameters of a neighbouring cell are a roll away, so everything
    # broadcasts without gathers.
    local = np.arange(spacing, dtype=f32) + 0.5
    ly = local[None, :, None, None]
    lx = local[None, None, None, :]
    best = np.zeros((ny, spacing, nx, spacing), dtype=f32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            # Parameters of the neighbouring cell (dy, dx), wrapping around.
            p_jy, p_jx, p_cos, p_sin, p_ia, p_ib, p_sharp, p_dark = (
                np.roll(a, (-dy, -dx), axis=(0, 1))[:, None, :, None]
                for a in (jy, jx, cos, sin, ia, ib, sharp, dark)
            )
            oy = ly - (p_jy + dy * spacing)
            ox = lx - (p_jx + dx * spacing)
            u = (ox * p_cos + oy * p_sin) * p_ia
            v = (oy * p_cos - ox * p_sin) * p_ib
            d = np.sqrt(u * u + v * v)
            # Soft disc, slightly darker towards the nuclear membrane.
            body = np.clip((1.0 - d) * p_sharp, 0.0, 1.0)
            val = body * (0.78 + 0.22 * np.minimum(d, 1.0) ** 2) * p_dark
            np.maximum(best, val, out=best)
    h, w = ny * spacing, nx * spacing
    best = best.reshape(h, w)
    # Coarse chromatin texture.
    grain = _periodic_blur(rng.random((h, w), dtype=np.float32), 1)
    grain = (grain - grain.mean()) / (grain.std() + 1e-6)
    best *= np.clip(0.85 + 0.22 * grain, 0.4, 1.3)
    return np.clip(np.rint(best * 230.0), 0, 255).astype(np.uint8)


def _fibres(width: int, height: int, orient: pyvips.Image, seed: int) -> pyvips.Image:
    """Wavy collagen fibre bundles, 0 (between fibres) to 1.

    Ridges (``1 - |noise|``) of stretched Perlin noise give long wavy strands.
    The noise is made at a quarter of the size along the fibres and upsampled
    as uchar, which is cheap.  A horizontal and a vertical family are blended
    by ``orient`` so bundles change direction across the slide.

    Parameters
    ----------
    width, height : int
        Image size.
    orient : pyvips.Image
        Blend weight in [0, 1] of the horizontal family.
    seed : int
        Seed.

    Returns
    -------
    pyvips.Image
        Lazy float image.
    """
    stretch = 4
    seeds = _seeds(seed, 4)

    def ridges(w: int, h: int, k: int) -> pyvips.Image:
        # Two octaves with incommensurate cells hide Perlin's grid lattice.
        noise = pyvips.Image.perlin(w, h, cell_size=9, seed=seeds[k]) + pyvips.Image.perlin(
            w, h, cell_size=14, seed=seeds[k + 1]
        ) * 0.8
        return (1.0 - noise.abs() * 3.5).clamp(min=0.0, max=1.0) * 255.0 + 0.5

    across = -(-width // stretch) + 1
    down = -(-height // stretch) + 1
    ridge_h = _upsample(ridges(across, height, 0).cast("uchar"), stretch, 1)
    ridge_v = _upsample(ridges(width, down, 2).cast("uchar"), 1, stretch)
    ridge_h = ridge_h.crop(0, 0, width, height)
    ridge_v = ridge_v.crop(0, 0, width, height)
    return (ridge_h - ridge_v) * (orient * (1.0 / 255.0)) + ridge_v * (1.0 / 255.0)


def _low_fields(
    width: int, height: int, seeds: list[int], tissue: float
) -> tuple[pyvips.Image, int]:
    """Low-grid tissue presence, signed and encoded as uchar.

    The field is small (at most ~4096 cells on the long side) and is
    evaluated here, in a few streaming passes, to find the threshold that
    gives the requested tissue fraction.

    Parameters
    ----------
    width, height : int
        Size of the half-resolution grid.
    seeds : list of int
        13 seeds: Perlin octaves (0-9), holes (10, 11), hole density (12).
    tissue : float
        Target tissue fraction in (0, 1].

    Returns
    -------
    tuple of (pyvips.Image, int)
        Memory uchar image of the presence field (128 on the tissue boundary,
        more inside tissue) and the upscaling factor to the half-resolution
        grid.
    """
    # A power of two keeps the integer box filter of _upsample exact.
    factor = _LOW_MIN_FACTOR
    while max(width, height) > factor * _LOW_MAX_SIDE:
        factor *= 2
    lw = -(-width // factor) + 2
    lh = -(-height // factor) + 2
    side = max(lw, lh)

    def perlin(cell: float, k: int) -> pyvips.Image:
        return pyvips.Image.perlin(lw, lh, cell_size=max(2, int(round(cell))), seed=seeds[k])

    # Fractal Brownian field: amplitude roughly proportional to cell size
    # gives an irregular boundary at every scale.  Macro cells: ~3 per slide
    # side; octaves stop at 6 cells (96 output px) so the field upsamples
    # smoothly, finer boundary detail comes from the half-resolution roughness.
    field = perlin(max(6.0, side / 3.0), 0)
    cell, amp = side / 3.0, 1.0
    for k in range(1, 10):
        if cell <= 6.0:
            break
        cell, amp = max(6.0, cell / 2.0), amp * 0.6
        field = field + perlin(cell, k) * amp
    field = field.copy_memory()
    spread = max(float(field.deviate()), 1e-6)

    # Holes (lumens, fat, tears): peaks of a separate mid-frequency field are
    # carved out of the tissue (hole cells ~200-500 output px); a broad
    # density field makes some regions riddled with holes, others solid.
    hole_cell = max(6.0, 200.0 / factor)
    holes = perlin(hole_cell, 10) + perlin(max(4.0, hole_cell / 2), 11) * 0.4
    holes = holes + perlin(max(6.0, side / 5.0), 12) * 0.4
    hole = _clamp01((holes - 0.32) * (1.0 / 0.12))
    eff = (field - hole * (3.0 * spread)).copy_memory()
    del field

    # Threshold for the tissue fraction: quantile of a point subsample.
    valid = eff.crop(0, 0, -(-width // factor), -(-height // factor))
    step = max(1, int(math.sqrt(valid.width * valid.height / 1e6)))
    sample = valid.subsample(step, step).numpy() if step > 1 else valid.numpy()
    thr = float(np.quantile(sample, 1.0 - tissue))

    # Boundary zone: +-1 maps to +-120 around 128.  Its half-width is ~2
    # low-grid cells whatever the slide size: scale it by the mean gradient
    # of the field where it crosses the threshold.
    kx = pyvips.Image.new_from_array([[-0.5, 0.0, 0.5]])
    ky = pyvips.Image.new_from_array([[-0.5], [0.0], [0.5]])
    grad = (eff.conv(kx, precision="float") ** 2 + eff.conv(ky, precision="float") ** 2) ** 0.5
    near = ((eff - thr).abs() < 0.1 * spread).ifthenelse(1.0, 0.0)
    frac = near.avg()
    mean_grad = (grad * near).avg() / frac if frac > 0 else grad.avg()
    zone = 2.2 * mean_grad + 1e-6
    code = ((eff - thr) * (120.0 / zone)).clamp(min=-120.0, max=120.0) + 128.5
    return code.cast("uchar").copy_memory(), factor


def _concentration_codes(width: int, height: int, seed: int, tissue: float) -> pyvips.Image:
    """Half-resolution 2-band uchar concentration codes (H, E).

    Parameters
    ----------
    width, height : int
        Size of the half-resolution grid.
    seed : int
        Master seed.
    tissue : float
        Target tissue fraction in [0, 1].

    Returns
    -------
    pyvips.Image
        Lazy 2-band uchar image, code ``v`` meaning ``C = C_max * (v/255)**2``.
    """
    s = _seeds(seed, 32)

    def perlin(cell: int, k: int) -> pyvips.Image:
        return pyvips.Image.perlin(width, height, cell_size=cell, seed=s[k])

    # Slowly varying fields: tissue type (cellular vs stroma), stain uptake.
    big = max(8, min(width, height, 1200) // 2)
    broad = perlin(big, 15) + perlin(max(4, big // 4), 16) * 0.3
    # Glass is not perfectly clean: a faint, uneven background stain.
    glass_h = _GLASS_H
    glass_e = broad * (_GLASS_E * 0.8) + _GLASS_E
    if tissue <= 0.0:
        c_h = pyvips.Image.black(width, height) + glass_h
        return _encode(c_h.bandjoin(glass_e))

    # Tissue mask: upscaled low-grid presence plus fine roughness that frays
    # the boundary; the steep ramp keeps the edge sharp (a few pixels).
    low, factor = _low_fields(width, height, s[:13], min(tissue, 1.0))
    up = _upsample(low, factor, factor).crop(0, 0, width, height)
    rough = perlin(14, 13) + perlin(5, 14) * 0.35
    mask = _clamp01((up - 128.0) * (1.0 / 30.0) + rough * 2.0 + 0.5)

    mid = perlin(60, 17)
    cellular = _clamp01(broad * 5.0 + 0.3)
    fibre = _fibres(width, height, _clamp01(broad * 4.0 + mid * 1.0 + 0.5), s[18])

    # Nuclei: two seamless tiles with different periods, each hidden by
    # different non-repeating gates so repetitions never look identical.
    # Tile a: sparse, often spindle-shaped (stroma); tile b: dense, round.
    # (Small slides only need part of a tile.)
    def cells(spacing: int, ny: int, nx: int) -> tuple[int, int]:
        return min(ny, -(-height // spacing)), min(nx, -(-width // spacing))

    tile_a = _from_numpy(
        _nuclei_tile(s[21], 20, cells(20, 37, 41), 0.8, (3.2, 5.0), (1.0, 3.5))
    )
    tile_b = _from_numpy(
        _nuclei_tile(s[22], 11, cells(11, 61, 67), 0.9, (3.0, 4.3), (1.0, 1.5))
    )
    nuc_a = _tile(tile_a, width, height)
    nuc_b = _tile(tile_b, width, height)
    gate = perlin(22, 23)
    gate_a = _clamp01(gate * 6.0 + 0.6)
    gate_b = _clamp01((0.3 - gate) * 6.0) * cellular
    nuc = (nuc_a * gate_a).maxpair(nuc_b * gate_b) * (1.0 / 255.0)

    # Concentrations inside tissue: pink fibrous stroma, purple-pink cellular
    # regions, hematoxylin-rich nuclei.
    tone = mid * 1.2 + broad * 0.6 + 1.0  # ~0.5 .. 1.5
    e_stroma = fibre * 0.55 + 0.12
    e_cell = mid * 0.15 + 0.32
    c_e = (e_stroma + (e_cell - e_stroma) * cellular) * tone * (1.0 - nuc * 0.6)
    c_h = nuc * 1.45 + cellular * 0.10 + 0.03

    c_h = c_h * mask + glass_h
    c_e = c_e * mask + glass_e
    return _encode(c_h.bandjoin(c_e))


def _encode(conc: pyvips.Image) -> pyvips.Image:
    """Encode concentrations as uchar codes ``255 * sqrt(C / C_max)``.

    The square root spends more codes on low concentrations (glass, pale
    tissue), where a step is most visible.  Computed as a linear scaling to
    ushort (which clips) and a lookup table, cheaper than ``pow``.

    Parameters
    ----------
    conc : pyvips.Image
        Float concentrations (any number of bands).

    Returns
    -------
    pyvips.Image
        Lazy uchar image of the same size and bands.
    """
    scaled = (conc * (65535.0 / _C_MAX) + 0.5).cast("ushort")
    table = np.rint(255.0 * np.sqrt(np.arange(65536) / 65535.0)).astype(np.uint8)
    return scaled.maplut(_from_numpy(table.reshape(1, -1)))


# --------------------------------------------------------------------------
# public API


def synthetic_slide(
    width: int,
    height: int,
    *,
    lab: Lab | str = "reference",
    seed: int = 0,
    tissue: float = 0.5,
    io: float = 240.0,
) -> pyvips.Image:
    """Build a lazy synthetic H&E whole-slide image.

    Parameters
    ----------
    width, height : int
        Size in pixels (any size; tens of gigapixels stream fine).
    lab : Lab or str, default "reference"
        Appearance preset or the name of one in :data:`LABS`.
    seed : int, default 0
        Seed; the output is a deterministic function of all arguments.  The
        tissue layout depends on ``seed``, ``tissue`` and the size only, not on
        ``lab`` or ``io``.
    tissue : float, default 0.5
        Approximate fraction of the area covered by tissue; 0 gives an
        all-glass slide, 1 a slide (almost) fully covered.
    io : float, default 240
        Incident intensity, i.e. the brightness of glass before tint and
        exposure.

    Returns
    -------
    pyvips.Image
        Lazy 3-band uchar image with interpretation ``srgb``.
    """
    width, height = int(width), int(height)
    if width < 1 or height < 1:
        raise ValueError(f"slide size must be positive, got {width} x {height}")
    tissue = float(np.clip(tissue, 0.0, 1.0))
    lab = _resolve_lab(lab)

    hw = -(-width // _DETAIL)
    hh = -(-height // _DETAIL)
    codes = _concentration_codes(hw, hh, seed, tissue)
    full = _upsample(codes, _DETAIL, _DETAIL).crop(0, 0, width, height)
    index = full.copy(format="ushort", bands=1)
    rgb = index.maplut(_lut(lab, io))
    noise = _tile(_noise_tile(_seeds(seed, 32)[31]), width, height)
    out = (rgb + noise).cast("uchar")
    return out.copy(interpretation="srgb")


def write_synthetic_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    *,
    lab: Lab | str = "reference",
    seed: int = 0,
    tissue: float = 0.5,
    mpp: float = 0.25,
    compression: str = "jpeg",
    quality: int = 90,
    tile: int = 256,
) -> pathlib.Path:
    """Write a synthetic slide as a pyramidal tiled BigTIFF.

    Parameters
    ----------
    path : str or os.PathLike
        Output file.  The image is written under a temporary name in the same
        folder and renamed at the end, so ``path`` never holds a partial file.
    width, height : int
        Size in pixels.
    lab, seed, tissue
        As for :func:`synthetic_slide`.
    mpp : float, default 0.25
        Pixel size in micrometres, stored in the TIFF resolution tags.
    compression : str, default "jpeg"
        pyvips ``tiffsave`` compression.
    quality : int, default 90
        Compression quality (``Q``).
    tile : int, default 256
        Tile width and height.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    path = pathlib.Path(path)
    image = synthetic_slide(width, height, lab=lab, seed=seed, tissue=tissue)
    # the same writer as normalized slides: temporary name, then rename
    write_pyramid(image, path, mpp=(mpp, mpp), compression=compression, quality=quality, tile=tile)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m vipsnorm.synth OUT.tif``.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m vipsnorm.synth",
        description="Write a synthetic H&E whole-slide image (pyramidal BigTIFF).",
    )
    parser.add_argument("out", type=pathlib.Path, help="output .tif")
    parser.add_argument("--size", type=int, default=4096, help="width in pixels")
    parser.add_argument("--height", type=int, default=None, help="height (default: size)")
    parser.add_argument("--lab", default="reference", choices=sorted(LABS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tissue", type=float, default=0.5)
    parser.add_argument("--mpp", type=float, default=0.25)
    parser.add_argument("--compression", default="jpeg")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--tile", type=int, default=256)
    args = parser.parse_args(argv)

    height = args.height if args.height is not None else args.size
    start = time.perf_counter()
    write_synthetic_slide(
        args.out,
        args.size,
        height,
        lab=args.lab,
        seed=args.seed,
        tissue=args.tissue,
        mpp=args.mpp,
        compression=args.compression,
        quality=args.quality,
        tile=args.tile,
    )
    elapsed = time.perf_counter() - start
    mpx = args.size * height / 1e6
    print(f"{args.out}: {args.size}x{height} in {elapsed:.2f} s ({mpx / elapsed:.1f} Mpx/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
