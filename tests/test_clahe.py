"""CLAHE at four levels: hand-computed LUTs and geometry, invariants, OpenCV as the named reference,
and agreement between the streaming pyvips path and the numpy path (on a generated slide: no seams)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import pyvips

from vipsnorm.methods import Sample
from vipsnorm.methods._hist import luma_array, luma_image
from vipsnorm.methods.clahe import Clahe, ClaheParams, clahe_luts, grid_geometry

skimage = pytest.importorskip("skimage")
cv2 = pytest.importorskip("cv2")
from skimage import data  # noqa: E402

#: numpy path vs OpenCV: measured bit-exact with OpenCV 5.0 (MAD 0, max 0); the bounds leave room for
#: another OpenCV build rounding an interpolated x.5 the other way.
NUMPY_CV_MAD, NUMPY_CV_MAX = 0.01, 1
#: pyvips path vs numpy path (and so vs OpenCV): libvips sums the four weighted LUT values in another
#: order, with the cell weights in exact arithmetic (OpenCV's are float32), and rounds half up; measured
#: MAD <= 0.012, max 1, at most 1.2 % of the pixels differ (by 1). (Regions of a few pixels, far from
#: these cases, put many values on exact half-integers, which OpenCV's float32 coordinates round one way
#: or the other: 2.6 % of the pixels differ with 7 x 49 px regions, 0.9 % when the lazy path used the
#: same float32 weights; with 1000 px regions 0.04 %, as before.)
VIPS_MAD, VIPS_MAX, VIPS_FRACTION = 0.02, 1, 0.02


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[float, int, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), int(d.max()), float(np.mean(d > 0))


def _vips(array: np.ndarray) -> pyvips.Image:
    return pyvips.Image.new_from_array(np.ascontiguousarray(array))


def _opencv(grey: np.ndarray, clip: float, grid: tuple[int, int]) -> np.ndarray:
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=grid).apply(grey)


# --- hand-computed cases -------------------------------------------------------------------------


def test_clahe_lut_hand_computed():
    hist = np.zeros(256, np.int64)
    hist[[10, 20]] = [12, 4]  # a 4x4 region: area 16
    # clip_limit 128 -> clip = int(128 * 16 / 256) = 8: 4 counts clipped from bin 10, no even batch
    # (4 // 256 = 0), remainder 4 -> one count every 256 // 4 = 64 bins from bin 0: bins 0, 64, 128, 192.
    lut = clahe_luts(hist, 128.0, 16)
    scale = np.float32(255) / np.float32(16)  # 15.9375
    assert lut[0] == 16  # cdf 1 -> 15.94
    assert lut[10] == 143  # cdf 1 + 8 = 9 -> 143.44
    assert lut[20] == 207  # cdf 13 -> 207.19
    assert lut[64] == 223 and lut[128] == 239  # 14 -> 223.1, 15 -> 239.1
    assert lut[192] == lut[255] == 255  # 16
    assert lut[5] == round(1 * scale)
    # no clipping: plain equalization of the region, cdf * 255 / area
    lut = clahe_luts(hist, 0.0, 16)
    assert lut[9] == 0 and lut[10] == 191 and lut[20] == 255  # 12 * 15.9375 = 191.25


def test_clip_limit_is_at_least_one_count():
    hist = np.zeros(256, np.int64)
    hist[100] = 16  # clip_limit 0.01 -> int(0.01 * 16 / 256) = 0 -> 1
    lut = clahe_luts(hist, 0.01, 16)
    # 15 clipped counts: batch 0, remainder 15, step 256 // 15 = 17 -> bins 0, 17, ..., 238 (15 of them)
    expected = np.zeros(256, np.int64)
    expected[100] = 1
    expected[0:255:17] += 1
    expected_lut = np.rint(np.cumsum(expected).astype(np.float32) * (np.float32(255) / np.float32(16)))
    np.testing.assert_array_equal(lut, expected_lut.astype(np.uint8))


def test_grid_geometry_pads_like_opencv():
    assert grid_geometry(512, 512, (8, 8)) == (64, 64, 0, 0)
    # 407 % 6 = 5 -> pad 1, 301 % 9 = 4 -> pad 5
    assert grid_geometry(407, 301, (6, 9)) == (68, 34, 1, 5)
    # one axis divisible, the other not: OpenCV still pads the divisible axis by a whole grid step
    assert grid_geometry(400, 301, (8, 9)) == (51, 34, 8, 5)
    assert grid_geometry(6, 5, (8, 8)) == (1, 1, 2, 3)  # smaller than the grid: 1-pixel regions


def test_region_sets_the_grid():
    assert Clahe(region=1000).grid_for(2048, 1536) == (2, 2)
    assert Clahe(region=(512, 256)).grid_for(2048, 1536) == (4, 6)
    assert Clahe(region=100000).grid_for(2048, 1536) == (1, 1)
    assert Clahe(region_um=256).grid_for(20000, 8000, mpp=0.25) == (20, 8)  # 1024 px
    assert Clahe(region_um=256).grid_for(20000, 8000, mpp=(0.5, 0.25)) == (39, 8)
    assert Clahe(region_um=256, region=2000).grid_for(20000, 8000) == (10, 4)  # no mpp: pixels
    assert Clahe(grid=(3, 5)).grid_for(20000, 8000, mpp=0.25) == (3, 5)
    with pytest.raises(ValueError, match="pixel size"):
        Clahe(region_um=256).grid_for(20000, 8000)


# --- OpenCV as the reference ---------------------------------------------------------------------

GREY_CASES = {
    "moon 2.0 8x8": (lambda: data.moon(), 2.0, (8, 8)),
    "moon 3.0 5x7": (lambda: data.moon(), 3.0, (5, 7)),
    "moon no clip": (lambda: data.moon(), 0.0, (8, 8)),
    "moon odd size 4.0 6x9": (lambda: data.moon()[:301, :407], 4.0, (6, 9)),
    "moon 40 (OpenCV default) 16x4": (lambda: data.moon()[:, :500], 40.0, (16, 4)),
    "tiny 6x5 under the grid": (lambda: data.moon()[200:205, 200:206], 2.0, (8, 8)),
    "retina luma": (lambda: luma_array(data.retina()), 2.0, (8, 8)),
    "camera 1.0 3x3": (lambda: data.camera(), 1.0, (3, 3)),
}


@pytest.mark.parametrize("case", list(GREY_CASES))
def test_grey_matches_opencv(case):
    load, clip, grid = GREY_CASES[case]
    grey = load()
    ref = _opencv(grey, clip, grid)
    method = Clahe(clip_limit=clip, grid=grid)
    params = method.fit_array(grey)
    assert params.grid == grid and params.mode == "grey"
    mad, worst, _ = _diff(method.apply_array(grey, params), ref)
    assert mad <= NUMPY_CV_MAD and worst <= NUMPY_CV_MAX, (mad, worst)
    streamed = method.apply(_vips(grey), method.fit_level(_vips(grey))).numpy()
    mad, worst, fraction = _diff(streamed, ref)
    assert mad <= VIPS_MAD and worst <= VIPS_MAX and fraction <= VIPS_FRACTION, (mad, worst, fraction)


def _shared_tiles(shared_data):
    tiles = {}
    for name in ("kather-template.jpg", "henorm-example1.png", "histolab-target.png", "torchstain-source.png"):
        path = shared_data / "tiles" / name
        if path.exists():
            image = pyvips.Image.new_from_file(str(path))
            tiles[name] = image[:3].numpy()  # RGBA tiles: drop alpha
    return tiles


def _luminance_against_opencv(rgb: np.ndarray, clip: float, grid: tuple[int, int]) -> None:
    method = Clahe(clip_limit=clip, grid=grid)
    params = method.fit_array(rgb)
    assert params.mode == "luminance"
    y = luma_array(rgb)
    # the luminance LUTs are the grey LUTs of the luma ...
    np.testing.assert_array_equal(params.lut_array(), method.fit_array(y).lut_array())
    new_y = method.apply_array(y, method.fit_array(y))
    ref = _opencv(y, clip, grid)
    mad, worst, _ = _diff(new_y, ref)
    assert mad <= NUMPY_CV_MAD and worst <= NUMPY_CV_MAX, (mad, worst)
    # ... and every band moves by Y' - Y (hue kept), except where it clips at 0 or 255
    out = method.apply_array(rgb, params).astype(np.int16)
    shift = rgb.astype(np.int16) + (new_y.astype(np.int16) - y)[..., np.newaxis]
    np.testing.assert_array_equal(out, np.clip(shift, 0, 255))
    # the streaming path: the same within VIPS_* tolerances
    streamed = method.apply(_vips(rgb), method.fit_level(_vips(rgb))).numpy()
    mad, worst, fraction = _diff(streamed, out.astype(np.uint8))
    assert mad <= VIPS_MAD and worst <= VIPS_MAX and fraction <= VIPS_FRACTION, (mad, worst, fraction)


def test_luminance_matches_opencv_on_luma_retina():
    _luminance_against_opencv(data.retina(), 2.0, (8, 8))


def test_luminance_matches_opencv_on_luma_shared_tiles(shared_data):
    tiles = _shared_tiles(shared_data)
    assert tiles, "no shared H&E tiles found"
    for name, rgb in tiles.items():
        _luminance_against_opencv(rgb, 2.0, (8, 8))


def test_rgb_mode_is_opencv_per_channel():
    rgb = data.astronaut()[::2, ::2]
    method = Clahe(clip_limit=3.0, grid=(4, 6), mode="rgb")
    params = method.fit_array(rgb)
    out = method.apply_array(rgb, params)
    for b in range(3):
        mad, worst, _ = _diff(out[..., b], _opencv(np.ascontiguousarray(rgb[..., b]), 3.0, (4, 6)))
        assert mad <= NUMPY_CV_MAD and worst <= NUMPY_CV_MAX, (b, mad, worst)
    streamed = method.apply(_vips(rgb), method.fit_level(_vips(rgb))).numpy()
    mad, worst, fraction = _diff(streamed, out)
    assert mad <= VIPS_MAD and worst <= VIPS_MAX and fraction <= VIPS_FRACTION


# --- invariants and the two paths ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["luminance", "rgb"])
def test_fit_level_equals_fit_array(mode):
    rng = np.random.default_rng(0)
    rgb = data.chelsea()
    for array, grid in [(rgb, (5, 3)), (luma_array(rgb), (7, 7)), (rng.integers(0, 256, (9, 7, 3), dtype=np.uint8), (8, 8))]:
        method = Clahe(clip_limit=2.5, grid=grid, mode=mode)
        assert method.fit_level(_vips(array)) == method.fit_array(array)


def test_fit_level_blocks_of_more_than_256_regions():
    """Several keyed hist_find passes (17 x 20 = 340 regions) give the same histograms as numpy."""
    grey = data.camera()
    method = Clahe(grid=(17, 20))
    assert method.fit_level(_vips(grey)) == method.fit_array(grey)


def test_apply_is_lazy_uchar_same_bands():
    rgb = data.chelsea()
    method = Clahe()
    params = method.fit_array(rgb)
    out = method.apply(_vips(rgb), params)
    assert isinstance(out, pyvips.Image)
    assert (out.width, out.height, out.bands, out.format) == (rgb.shape[1], rgb.shape[0], 3, "uchar")


def test_luts_are_monotonic():
    params = Clahe().fit_array(data.moon())
    assert np.all(np.diff(params.lut_array().astype(int), axis=-1) >= 0)


def test_params_json_round_trip():
    params = Clahe(clip_limit=2.5, region=100, mode="rgb").fit_array(data.chelsea())
    data_ = json.loads(params.to_json())
    assert data_["method"] == "clahe" and isinstance(data_["luts"], str)
    again = ClaheParams.from_dict(data_)
    assert again == params
    np.testing.assert_array_equal(again.lut_array(), params.lut_array())
    assert again.lut_array().shape == (3, params.grid[1], params.grid[0], 256)


# --- the streaming path: cell geometry, weights, LUT chunks ------------------------------------------


@pytest.mark.parametrize(
    "size, tile, regions",
    [(512, 64, 8), (407, 68, 6), (301, 34, 9), (6, 1, 8), (2048, 7, 293), (20_000, 1000, 20), (100_000, 1021, 98)],
)
def test_exact_cells_are_opencvs_up_to_float_error(size, tile, regions):
    """The lazy path's cells and weights (exact) are OpenCV's float32 ones up to float error: a pixel whose
    ``x / tile - 0.5`` is an integer may be in the cell before with ``a`` just below 1 for OpenCV (the same
    value), and elsewhere the weights differ by float32 rounding. The replicated weight block holds each
    pixel's weight at the phase ``(x + tile // 2) % tile``."""
    from vipsnorm.methods.clahe import _axis_cells, _cell_weights, _cells

    cell, _, _, a32 = _axis_cells(size, tile, regions)
    exact = _cells(size, tile)
    x = np.arange(size)
    twice_a = 2 * x + tile - 2 * tile * exact  # 2 * tile * a, an integer
    assert np.all((twice_a >= 0) & (twice_a < 2 * tile)) and exact.max() <= regions
    np.testing.assert_array_equal(_cell_weights(tile)[(x + tile // 2) % tile], (twice_a / (2 * tile)).astype(np.float32))
    tol = 4 * np.finfo(np.float32).eps * (size / tile + 1)
    same = cell == exact
    assert np.all(np.abs(a32[same] - twice_a[same] / (2 * tile)) <= tol)
    assert np.all((cell[~same] == exact[~same] - 1) & (twice_a[~same] == 0) & (a32[~same] >= 1 - tol))


@pytest.mark.parametrize("mode", ["luminance", "rgb"])
def test_apply_weight_block_equals_zoomed_weights(monkeypatch, mode):
    """Regions too large for a weight block in memory take zoomed weights instead: the same image."""
    from vipsnorm.methods import clahe

    rgb = np.ascontiguousarray(data.astronaut()[:301, :407])
    method = Clahe(grid=(6, 9), mode=mode)  # odd-sized regions (68 x 34), padded image
    params = method.fit_array(rgb)
    block = method.apply(_vips(rgb), params).numpy()
    np.testing.assert_array_equal(method.apply(_vips(rgb), params, lean=True).numpy(), block)  # no block
    monkeypatch.setattr(clahe, "_BLOCK_BYTES", 0)
    np.testing.assert_array_equal(method.apply(_vips(rgb), params).numpy(), block)
    grey_fit = Clahe(grid=(1, 5)).fit_array(rgb[..., 1])  # a grey fit on three bands (k = 3), a 1xN grid
    monkeypatch.setattr(clahe, "_BLOCK_BYTES", 64 << 20)
    blocked = Clahe(grid=(1, 5)).apply(_vips(rgb), grey_fit).numpy()
    np.testing.assert_array_equal(Clahe(grid=(1, 5)).apply(_vips(rgb), grey_fit, lean=True).numpy(), blocked)


def test_patch_readers_keep_no_weight_block(monkeypatch, clahe_slide):
    """A patch reader's CLAHE images take lean weights (readers are kept in numbers by datasets)."""
    from vipsnorm.methods import clahe
    from vipsnorm.training.patches import PatchReader

    slide, level0, _ = clahe_slide
    method = Clahe(clip_limit=2.0, region=700)
    params = method.fit_level(level0)
    leans = []
    original = clahe._weight_image
    monkeypatch.setattr(clahe, "_weight_image", lambda *a, **k: leans.append(a[2] if len(a) > 2 else k.get("lean")) or original(*a, **k))
    window = PatchReader(slide, method, params).read(0, 300, 200, 128)
    assert leans == [True]
    np.testing.assert_array_equal(window, method.apply(level0, params).crop(300, 200, 128, 128).numpy())


@pytest.mark.parametrize("mode", ["luminance", "rgb"])
def test_apply_in_lut_chunks_equals_one_lut(monkeypatch, mode):
    """A cell row of more cells than one ``maplut`` keys (256, 85 in rgb mode: a 100,000 px slide has 99)
    is mapped in chunks: the same image, bit for bit."""
    from vipsnorm.methods import clahe

    rgb = data.astronaut()
    method = Clahe(grid=(7, 5), mode=mode)
    params = method.fit_array(rgb)
    whole = method.apply(_vips(rgb), params).numpy()
    monkeypatch.setattr(clahe, "_CELLS_PER_LUT", 3)  # 3 cells per chunk, 1 in rgb mode
    np.testing.assert_array_equal(method.apply(_vips(rgb), params).numpy(), whole)


def test_apply_grey_fit_on_three_bands_maps_each_band_alike():
    grey = data.moon()
    method = Clahe(grid=(5, 7))
    params = method.fit_array(grey)
    rgb = np.ascontiguousarray(data.astronaut()[:, :, :3])
    out = method.apply(_vips(rgb), params).numpy()
    for b in range(3):
        np.testing.assert_array_equal(out[..., b], method.apply(_vips(np.ascontiguousarray(rgb[..., b])), params).numpy())


def test_apply_luminance_changes_of_any_size():
    """Without clipping, equalization moves a dark and a bright half by up to ~250 grey levels either way:
    the change (Y' - Y, kept as ``round(Y' - Y) + 256`` in ushort) and the clipping at 0 and 255 of every
    band agree with the numpy path."""
    rng = np.random.default_rng(1)
    dark = rng.integers(0, 12, (64, 64, 3))
    bright = rng.integers(244, 256, (64, 64, 3))
    rgb = np.concatenate([dark, bright], axis=1).astype(np.uint8)
    method = Clahe(clip_limit=0.0, grid=(2, 1))
    params = method.fit_array(rgb)
    expected = method.apply_array(rgb, params)
    change = luma_array(expected).astype(int) - luma_array(rgb)
    assert change.max() > 200 and change.min() < -200
    mad, worst, fraction = _diff(method.apply(_vips(rgb), params).numpy(), expected)
    assert mad <= VIPS_MAD and worst <= VIPS_MAX and fraction <= VIPS_FRACTION, (mad, worst, fraction)


# --- bad inputs ---------------------------------------------------------------------------------


def test_fit_on_sample_says_clahe_is_spatial():
    assert Clahe.spatial is True
    with pytest.raises(TypeError, match="fit_level"):
        Clahe().fit(Sample.from_array(data.moon()))


def test_flat_image_is_left_unchanged_with_a_warning():
    flat = np.full((64, 80, 3), 137, np.uint8)
    method = Clahe()
    with pytest.warns(RuntimeWarning, match="same value"):
        params = method.fit_array(flat)
    np.testing.assert_array_equal(method.apply_array(flat, params), flat)
    with pytest.warns(RuntimeWarning, match="same value"):
        params = method.fit_level(_vips(flat))
    np.testing.assert_array_equal(method.apply(_vips(flat), params).numpy(), flat)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="mode"):
        Clahe(mode="hsv")
    with pytest.raises(ValueError, match="clip_limit"):
        Clahe(clip_limit=-1)
    with pytest.raises(ValueError, match="grid"):
        Clahe(grid=(0, 8))
    with pytest.raises(TypeError, match="uint8"):
        Clahe().fit_array(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="1 or 3 bands"):
        Clahe().fit_level(_vips(np.zeros((8, 8, 2), np.uint8)))
    params = Clahe().fit_array(data.moon())
    with pytest.raises(ValueError, match="fitted on a 512x512 image"):
        Clahe().apply_array(data.moon()[:100], params)
    with pytest.raises(ValueError, match="fitted on a 512x512 image"):
        Clahe().apply(_vips(data.moon()[:, :100]), params)


# --- a generated slide: streaming == in memory == OpenCV on the whole image, no seams -------------


@pytest.fixture(scope="module")
def clahe_slide(tmp_path_factory):
    """A 3072x2304 synthetic H&E slide (JPEG tiles of 256, mpp 0.25) and its level-0 pixels."""
    import vipsnorm
    from vipsnorm.synth import write_synthetic_slide

    path = write_synthetic_slide(tmp_path_factory.mktemp("clahe") / "slide.tif", 3072, 2304, seed=3)
    slide = vipsnorm.open(path)
    level0 = slide.level_image(0)
    return slide, level0, level0.numpy()


@pytest.mark.parametrize("region, mode", [(300, "luminance"), (700, "rgb"), (1100, "luminance")])
def test_fit_from_independent_loaders_counts_the_same(clahe_slide, region, mode):
    """Counting bands of regions concurrently from other loaders of the level gives the same params, on
    level 0 (exact) and on the 2x level (reduced), with more instances than one pass needs."""
    from vipsnorm.engine import Options, fit_slide

    slide, level0, _ = clahe_slide
    method = Clahe(clip_limit=2.0, region=region, mode=mode)
    copies = [slide.independent_level_image(0) for _ in range(3)]
    assert all(c is not None and c is not level0 for c in copies)
    assert method.fit_level(level0, copies=copies) == method.fit_level(level0)
    level = slide.best_level_for_downsample(2.0)
    reduced = slide.level_image(level)
    copy = slide.independent_level_image(level)
    assert (copy.width, copy.height) == (reduced.width, reduced.height)
    one = method.fit_level(reduced, size=slide.dimensions)
    assert method.fit_level(reduced, size=slide.dimensions, copies=[copy]) == one
    # what normalize does (two loaders on a machine with two cores or more)
    assert fit_slide(slide, method, Options(strategy="exact")) == method.fit_level(level0)
    with pytest.raises(ValueError, match="copies must have"):
        method.fit_level(level0, copies=[reduced])


def test_no_independent_loader_for_pixels_held_in_memory(tmp_path):
    import vipsnorm

    path = tmp_path / "small.png"
    pyvips.Image.new_from_array(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).pngsave(str(path))
    with vipsnorm.open(path) as small:
        assert small.holds_decoded()
        assert small.independent_level_image(0) is None


def test_slide_streaming_equals_in_memory_and_opencv(clahe_slide):
    slide, level0, pixels = clahe_slide
    method = Clahe(clip_limit=2.0, region_um=200)  # 800 px at 0.25 um/px
    params = method.fit_level(level0, mpp=slide.mpp)
    assert params.grid == (4, 3)  # round(3072 / 800), round(2304 / 800)
    assert params == method.fit_array(pixels, mpp=slide.mpp)
    streamed = method.apply(level0, params).numpy()
    in_memory = method.apply_array(pixels, params)
    mad, worst, fraction = _diff(streamed, in_memory)
    assert mad <= VIPS_MAD and worst <= VIPS_MAX and fraction <= VIPS_FRACTION, (mad, worst, fraction)
    # CLAHE of the whole image at once (OpenCV on the luma, same grid): Y' agrees
    y = luma_array(pixels)
    new_y = Clahe(grid=params.grid).apply_array(y, Clahe(grid=params.grid).fit_array(y))
    mad, worst, _ = _diff(new_y, _opencv(y, 2.0, params.grid))
    assert mad <= NUMPY_CV_MAD and worst <= NUMPY_CV_MAX


def _column_jumps(y: np.ndarray) -> np.ndarray:
    """Mean |difference| between each pair of adjacent columns (index x: columns x and x + 1)."""
    return np.abs(np.diff(y.astype(np.float64), axis=1)).mean(axis=0) + 1e-9


def test_slide_has_no_seams_at_tile_boundaries(clahe_slide):
    """Across the boundaries of 256-px tiles (and of 512-px regions) the output changes no more, relative
    to the input, than between any other two adjacent columns: CLAHE amplifies local contrast by about 2x
    everywhere, and by no more at a tile boundary. Per-tile CLAHE fails the same check."""
    _, level0, pixels = clahe_slide
    y = luma_array(pixels)
    method = Clahe(region=512)  # 6 x 4.5 regions: region and tile (256) boundaries inside the image
    out = luma_array(method.apply(level0, method.fit_level(level0)).numpy())
    gain = _column_jumps(out) / _column_jumps(y)
    boundaries = np.arange(255, y.shape[1] - 1, 256)  # columns 255|256, 511|512, ...
    inside = np.setdiff1d(np.arange(gain.size), np.concatenate([boundaries - 1, boundaries, boundaries + 1]))
    typical = np.percentile(gain[inside], 99)
    assert gain[boundaries].max() <= 1.2 * typical, (gain[boundaries], typical)
    # the same check catches per-tile CLAHE (each 512 px tile on its own), the seams the issue is about
    tiled = np.zeros_like(y)
    for y0 in range(0, y.shape[0], 512):
        for x0 in range(0, y.shape[1], 512):
            tile = np.ascontiguousarray(y[y0 : y0 + 512, x0 : x0 + 512])
            tiled[y0 : y0 + 512, x0 : x0 + 512] = _opencv(tile, 2.0, (1, 1))
    tiled_gain = _column_jumps(tiled) / _column_jumps(y)
    seams = np.arange(511, y.shape[1] - 1, 512)
    assert tiled_gain[seams].max() > 1.5 * np.percentile(tiled_gain[inside], 99)


def test_default_grid_is_opencvs_for_images_and_regions_for_slides():
    clahe = Clahe()
    assert clahe.grid_for(4000, 3000) == (8, 8)  # OpenCV's tileGridSize default
    assert clahe.grid_for(100_000, 80_000) == (98, 78)  # ~1024 px regions on a slide
    assert Clahe(grid=(4, 2)).grid_for(100_000, 80_000) == (4, 2)  # an explicit grid is kept
    assert Clahe(region_um=256).grid_for(40_000, 20_000, mpp=0.25) == (39, 20)


def test_cli_normalizes_a_slide_with_clahe_and_refuses_a_dataset_fit(small_slide, tmp_path, capsys):
    import pyvips

    from vipsnorm.cli import main

    out = tmp_path / "out"
    assert main(["normalize", str(small_slide), "-o", str(out), "--method", "clahe", "--region", "512",
                 "--clip-limit", "3", "--compression", "deflate", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["params"]["method"] == "clahe" and line["params"]["clip_limit"] == 3.0
    assert tuple(line["params"]["grid"]) == (4, 3)  # 2048 x 1536 in 512 px regions
    written = pyvips.Image.new_from_file(str(out / "small.tif")).numpy()
    original = pyvips.Image.new_from_file(str(small_slide)).numpy()
    params = ClaheParams.from_dict(line["params"])
    import vipsnorm

    lazy = Clahe().apply(vipsnorm.open(small_slide).level_image(0), params).numpy()
    np.testing.assert_array_equal(written, lazy)  # lossless output: exactly the streaming result
    assert np.abs(written.astype(int) - Clahe().apply_array(original, params)).max() <= 1  # numpy twin
    assert main(["fit", str(small_slide), "-o", str(tmp_path / "ref.json"), "--method", "clahe"]) == 2
    assert "fitted on each image's own layout" in capsys.readouterr().err
    assert main(["normalize", str(small_slide), "-o", str(out), "--method", "clahe", "--low", "5"]) == 2
    assert "does not take --low" in capsys.readouterr().err


# --- fitting on a downsampled pyramid level -------------------------------------------------------


def test_reduced_fit_equals_exact_when_level0_is_the_level_upsampled():
    """Hand-checkable case: if every 2x2 block of level 0 repeats one pixel of the 2x level, the level's
    region counts scaled by 4 are level 0's counts exactly, so the fit is the exact fit."""
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (150, 200), dtype=np.uint8)  # the "2x level"
    level0 = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)  # 400 x 300, regions 100 x 100
    method = Clahe(grid=(4, 3))
    exact = method.fit_level(_vips(level0))
    reduced = method.fit_level(_vips(small), size=(400, 300))
    assert reduced == exact


def test_reduced_fit_on_the_2x_level_is_close_to_exact(clahe_slide):
    """On the generated slide's 2x level (libvips' box-filtered, JPEG re-encoded pyramid) the LUTs agree
    with the level-0 fit to 1.5 grey levels on average over the pixels, worst 8 (measured 1.1 / 5 on a
    20,000-pixel slide)."""
    from vipsnorm.methods.clahe import _pad_image, _region_histograms_image

    slide, level0, _ = clahe_slide
    method = Clahe(region=512)
    assert method.fit_downsample(*slide.dimensions) == 2.0
    assert slide.levels[1].downsample == 2.0
    exact = method.fit_level(level0)
    reduced = method.fit_level(slide.level_image(1), size=slide.dimensions)
    assert (reduced.grid, reduced.tile, reduced.width, reduced.height) == (exact.grid, exact.tile, 3072, 2304)
    tw, th, px, py = grid_geometry(3072, 2304, exact.grid)
    counts = _region_histograms_image([_pad_image(luma_image(level0), px, py)], exact.grid, (tw, th))[0]
    d = np.abs(reduced.lut_array()[0].astype(int) - exact.lut_array()[0].astype(int))
    weighted = float((d * counts).sum() / counts.sum())  # mean |difference| over the slide's pixels
    assert 0 < weighted <= 1.5 and d[counts > 0].max() <= 8, (weighted, d[counts > 0].max())


def test_fit_downsample_needs_large_regions():
    assert Clahe().fit_downsample(4000, 3000) == 1.0  # 8x8 regions of 500 x 375: too small to halve
    assert Clahe().fit_downsample(20_000, 20_000) == 2.0  # 1000-px regions
    assert Clahe(region=300).fit_downsample(20_000, 20_000) == 1.0


def test_engine_fits_clahe_on_the_2x_level_unless_exact(clahe_slide, monkeypatch):
    from vipsnorm.engine import Options, fit_slide

    slide, _, _ = clahe_slide
    seen = []
    original = Clahe.fit_level

    def spy(self, image, **kwargs):
        seen.append((image.width, kwargs.get("size")))
        return original(self, image, **kwargs)

    monkeypatch.setattr(Clahe, "fit_level", spy)
    fast = fit_slide(slide, Clahe(region=512), Options())
    exact = fit_slide(slide, Clahe(region=512), Options(strategy="exact"))
    small = fit_slide(slide, Clahe(region=256), Options())  # 256-px regions: fitted on level 0
    assert seen == [(1536, (3072, 2304)), (3072, (3072, 2304)), (3072, (3072, 2304))]
    assert fast.grid == exact.grid and fast != exact and small.grid == (12, 9)


@pytest.mark.parametrize("mode", ["luminance", "rgb"])
def test_fit_apply_array_is_fit_array_then_apply_array(mode):
    rgb = data.astronaut()[60:316, 40:296]
    cases = [
        (rgb, (8, 8)),
        (np.ascontiguousarray(rgb[:101, :67]), (8, 8)),  # padded by reflection
        (rgb[::3, ::2], (3, 5)),
        (data.moon()[:90, :120], (4, 4)),
        (rgb[:7, :5], (8, 8)),  # regions of a single pixel
        (rgb, (40, 3)),  # more than 65536 keys in rgb mode
    ]
    for array, grid in cases:
        method = Clahe(2.5, grid=grid, mode=mode)
        expected = method.apply_array(array, method.fit_array(array))
        np.testing.assert_array_equal(method.fit_apply_array(array), expected, err_msg=f"{array.shape} {grid}")


def test_apply_array_takes_params_holding_lists():
    # params made by hand (or read from JSON by other code) may hold lists: they must map as tuples do
    a = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    method = Clahe(grid=(4, 4))
    params = method.fit_array(a)
    listed = dataclasses.replace(params, grid=list(params.grid), tile=list(params.tile))
    np.testing.assert_array_equal(method.apply_array(a, listed), method.apply_array(a, params))
