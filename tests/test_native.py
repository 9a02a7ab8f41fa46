"""The native colour kernel (vipsnorm._native, _kernel.c) against the chains it stands for.

The kernel runs each colour method's per-pixel chain in one pass, directly or through a cube of all
2^24 colours. Every check here is bit for bit, on every RGB colour: the kernel (lazy image and numpy
array, direct and through its cube) against the chain of libvips operations and the numpy chain that
run when the kernel is off (which are checked against each other on the same colours).
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import sys
import threading
import warnings

import numpy as np
import pytest
import pyvips

from vipsnorm import _native
from vipsnorm.methods import Equalize, EqualizeParams, Macenko, Reinhard, Sample
from vipsnorm.methods._hist import apply_luts_array, apply_luts_image
from vipsnorm.methods._stain import kernel_steps, run_array, run_image

pytestmark = pytest.mark.skipif(
    os.environ.get("VIPSNORM_NATIVE") == "0", reason="VIPSNORM_NATIVE=0: the kernel is switched off for this run"
)


@pytest.fixture(scope="module")
def every_colour() -> np.ndarray:
    """All 2^24 RGB colours as a 4096 x 4096 image (R fastest, then G, then B)."""
    c = np.arange(1 << 24, dtype=np.uint32)
    return np.stack([c & 255, (c >> 8) & 255, c >> 16], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)


@pytest.fixture(scope="module")
def tile(shared_data) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(shared_data / "tiles" / "henorm-example1.png").convert("RGB"))


def _image(array: np.ndarray) -> pyvips.Image:
    return pyvips.Image.new_from_array(array).copy(interpretation="srgb")


def _fitted(name: str, tile: np.ndarray, glass="auto"):
    if name == "macenko":
        method = Macenko()
    else:  # a target from the same tile, flipped and with its bands swapped: a different palette
        target = Reinhard().fit_target([Sample.from_array(np.ascontiguousarray(tile[::-1, :, ::-1]))])
        method = Reinhard(target=target, glass=glass)
    return method, method.fit(Sample.from_array(tile))


@pytest.mark.skipif(
    sys.platform != "linux" or not (shutil.which("cc") or shutil.which("gcc")),
    reason="the kernel is built and loaded on Linux with a C compiler (elsewhere the libvips chains run)",
)
def test_the_kernel_is_built_and_loads():
    # CI builds it (a C compiler is there): a kernel that silently failed to load would leave every
    # method on the slower chains, and the tests below would compare nothing
    assert _native.available(), _native.reason()


@pytest.fixture
def fresh_load(monkeypatch):
    """Load the kernel again within the test (the process's load is put back after)."""
    monkeypatch.setattr(_native, "_loaded", None)
    yield
    # monkeypatch restores _loaded


def test_a_failure_while_loading_is_a_fallback_not_an_error(fresh_load, monkeypatch):
    def broken():
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(_native, "_load_kernel", broken)
    assert not _native.available()
    assert "RuntimeError: something unexpected" in _native.reason()


def test_a_kernel_built_from_other_sources_is_not_used(fresh_load, monkeypatch):
    monkeypatch.setattr(_native, "_VERSION", _native._VERSION + 1)
    assert not _native.available()
    assert "does not match" in _native.reason()


def test_the_cube_fills_the_blocks_of_the_colours_met(tile, every_colour):
    # a block is 32 colours along R at one G and B, filled the first time a pixel needs it
    method, params = _fitted("macenko", tile)
    steps = kernel_steps(params.steps())
    direct = _native.Program(steps)
    cubed = _native.Program(steps).build_cube()
    assert cubed.has_cube and cubed.cube_blocks == 0
    np.testing.assert_array_equal(cubed.run(tile), direct.run(tile))
    r, g, b = (tile[..., c].astype(int) for c in range(3))
    assert cubed.cube_blocks == len(np.unique(r >> 5 | g << 3 | b << 11))
    np.testing.assert_array_equal(cubed.run(every_colour), direct.run(every_colour))
    assert cubed.cube_blocks == 524288


def test_a_block_left_half_filled_is_computed_not_waited_for(tile, every_colour):
    # a fork while a thread fills a block leaves the child with the block marked as being filled and
    # no thread to finish it: its pixels are computed directly, forever, and never waited for
    method, params = _fitted("macenko", tile)
    steps = kernel_steps(params.steps())
    cubed = _native.Program(steps).build_cube()
    cubed._kernel.vk_cube_mark(cubed._pointer, 5 | 200 << 3 | 17 << 11, 1)
    np.testing.assert_array_equal(cubed.run(every_colour), _native.Program(steps).run(every_colour))
    assert cubed.cube_blocks == 524287


def test_threads_filling_one_cube_agree(tile, every_colour):
    # four threads run one program, its cube empty, over all colours in different orders: each block
    # is filled by one of them, while the others compute its pixels directly
    method, params = _fitted("reinhard", tile)
    steps = kernel_steps(params.steps(), params.weight_table())
    expected = _native.Program(steps).run(every_colour)
    cubed = _native.Program(steps).build_cube()
    orders = [every_colour, every_colour[::-1], every_colour[:, ::-1], every_colour[::-1, ::-1]]
    results = [None] * 4

    def run(i):
        results[i] = cubed.run(orders[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for order, result, flip in zip(orders, results, [(), (0,), (1,), (0, 1)]):
        np.testing.assert_array_equal(result, np.flip(expected, flip) if flip else expected)
    assert cubed.cube_blocks == 524288


def test_tables_and_chains_the_kernel_would_read_past_are_refused():
    lut = np.arange(256, dtype=np.uint8)
    with pytest.raises(ValueError, match="t1 must be uint8"):
        _native.Program([("luma", {"t1": lut[:100]})])
    with pytest.raises(ValueError, match="t1 must be float32"):
        _native.Program([("lut", {"rows": 1, "n": 256, "is_float": 1, "t1": lut[np.newaxis]})])
    # a 256-entry table after the float -> ushort index: indices up to 65535
    pair = {"t1": np.zeros((3, 65536), np.float32), "t2": np.zeros((3, 256), np.float32)}
    with pytest.raises(ValueError, match="refuses this chain"):
        _native.Program([("pair", pair), ("index", {}), ("lut", {"rows": 1, "n": 256, "t1": lut[np.newaxis]})])
    with pytest.raises(ValueError, match="refuses this chain"):  # ends in floats, not uchar RGB
        _native.Program([("pair", pair)])


def test_small_arrays_use_the_kernel_only_when_the_program_is_kept_or_cheap(tile):
    method, params = _fitted("macenko", tile)
    _native._programs.clear()
    key = ("stain", params)
    made = []

    def make():
        made.append(1)
        return _native.Program(kernel_steps(params.steps()))

    patch = tile[:64, :64]
    assert _native.map_array(patch, key, make) is None and not made  # one-off params: the numpy chain
    with _native.switched_off():
        expected = method.apply_array(patch, params)
    np.testing.assert_array_equal(method.apply_array(patch, params), expected)
    assert key not in _native._programs  # nor kept: jitter must not push out the slide's program
    np.testing.assert_array_equal(_native.map_array(patch, key, make, cheap=True), expected)
    assert made == [1] and key not in _native._programs
    method.apply(_image(tile), params)  # a slide's apply keeps its program
    assert key in _native._programs
    np.testing.assert_array_equal(_native.map_array(patch, key, make), expected)
    assert made == [1]


def test_without_cube_maps_large_images_per_pixel(tile):
    method, params = _fitted("macenko", tile)
    _native._programs.clear()
    big = _image(tile).replicate(40, 40)
    with _native.without_cube():
        out = method.apply(big, params)
    assert not _native._programs[("stain", params)].has_cube
    with _native.switched_off():
        expected = method.apply_array(tile, params)
    np.testing.assert_array_equal(out.crop(0, 0, tile.shape[1], tile.shape[0]).numpy(), expected)


@pytest.mark.parametrize("name, glass", [("macenko", "auto"), ("reinhard", "auto"), ("reinhard", None)])
def test_stain_kernel_equals_the_chains_on_every_colour(name, glass, tile, every_colour):
    method, params = _fitted(name, tile, glass)
    with _native.switched_off():
        chain = method.apply(_image(every_colour), params).numpy()
        numpy_chain = method.apply_array(every_colour, params)
    np.testing.assert_array_equal(numpy_chain, chain)
    weight = params.weight_table() if name == "reinhard" else None
    assert (weight is None) == (name == "macenko" or glass is None)
    steps = kernel_steps(params.steps(), weight)
    direct = _native.Program(steps)
    np.testing.assert_array_equal(direct.run(every_colour), chain)
    np.testing.assert_array_equal(direct.image(_image(every_colour)).numpy(), chain)
    cubed = _native.Program(steps).build_cube()
    np.testing.assert_array_equal(cubed.run(every_colour), chain)
    np.testing.assert_array_equal(cubed.image(_image(every_colour)).numpy(), chain)
    # the methods themselves (2^24 pixels are below the cube's threshold: the chain run directly)
    assert every_colour.shape[0] * every_colour.shape[1] < _native.CUBE_PIXELS
    np.testing.assert_array_equal(method.apply(_image(every_colour), params).numpy(), chain)
    np.testing.assert_array_equal(method.apply_array(every_colour, params), chain)


def test_luminance_kernel_equals_the_chains_on_every_colour(every_colour):
    rng = np.random.default_rng(3)
    lut = np.sort(rng.integers(0, 256, 256)).astype(np.uint8)[np.newaxis]
    with _native.switched_off():
        chain = apply_luts_image(_image(every_colour), lut, "luminance").numpy()
        numpy_chain = apply_luts_array(every_colour, lut, "luminance")
    np.testing.assert_array_equal(numpy_chain, chain)
    np.testing.assert_array_equal(apply_luts_image(_image(every_colour), lut, "luminance").numpy(), chain)
    np.testing.assert_array_equal(apply_luts_array(every_colour, lut, "luminance"), chain)
    # the luma's change alone runs directly, faster than a cube: none is built for it, and the lazy
    # image (a libvips region a row at a time) gives the chain's bytes, with the SSSE3 loops and without
    program = _native.Program([("luma", {"t1": lut[0]})])
    assert not program.needs_cube
    assert program.build_cube() is program and not program.has_cube and program.cube_blocks == 0
    try:
        for on in (True, False):
            _native.simd(on)
            np.testing.assert_array_equal(program.image(_image(every_colour)).numpy(), chain)
            np.testing.assert_array_equal(program.run(every_colour), chain)
    finally:
        _native.simd(True)
    two = _native.Program([("luma", {"t1": lut[0]}), ("blend", {"t1": np.full(256, 255, np.uint8)})])
    assert two.needs_cube  # any longer chain still does


def test_hand_computed_luminance_pixels():
    # luma (4899 R + 9617 G + 1868 B + 8192) >> 14, its change by the LUT added to every band, clipped
    lut = np.clip(np.arange(256) + 50, 0, 255).astype(np.uint8)
    pixels = np.array([[[0, 0, 0], [255, 255, 255], [200, 10, 10], [10, 250, 10]]], np.uint8)
    # lumas: 0, 255, (979800 + 96170 + 18680 + 8192) >> 14 = 67, (48990 + 2404250 + 18680 + 8192) >> 14 = 151
    expected = np.array([[[50, 50, 50], [255, 255, 255], [250, 60, 60], [60, 255, 60]]], np.uint8)
    out = _native.Program([("luma", {"t1": lut})]).run(pixels)
    np.testing.assert_array_equal(out, expected)


def test_a_large_image_goes_through_the_cube_and_the_program_is_kept(tile):
    method, params = _fitted("macenko", tile)
    big = pyvips.Image.new_from_array(tile).copy(interpretation="srgb").replicate(40, 40)
    assert big.width * big.height >= _native.CUBE_PIXELS
    _native._programs.clear()
    out = method.apply(big, params)
    program = _native._programs[("stain", params)]
    assert program.has_cube
    small = method.apply(pyvips.Image.new_from_array(tile), params)
    assert _native._programs[("stain", params)] is program  # the same, not made again
    np.testing.assert_array_equal(out.crop(0, 0, tile.shape[1], tile.shape[0]).numpy(), small.numpy())


def test_the_image_outlives_its_program(tile):
    method, params = _fitted("macenko", tile)
    with _native.switched_off():
        expected = method.apply_array(tile, params)
    program = _native.Program(kernel_steps(params.steps()))
    image = program.image(_image(tile))
    del program
    _native._programs.clear()
    gc.collect()
    np.testing.assert_array_equal(image.numpy(), expected)


def test_images_computed_in_parallel_threads_stay_apart(tile):
    luts = [np.full(256, v, np.uint8) for v in (0, 255)]  # every pixel to black, or to white
    images = [_native.Program([("luma", {"t1": lut})]).image(_image(tile).replicate(4, 4)) for lut in luts]
    results = [None, None]

    def run(i):
        results[i] = images[i].numpy()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with _native.switched_off():
        for lut, result in zip(luts, results):
            np.testing.assert_array_equal(result, apply_luts_array(np.tile(tile, (4, 4, 1)), lut, "luminance"))
    assert not np.array_equal(results[0], results[1])


def test_a_decode_error_comes_through_the_kernel(shared_data, tile):
    method, params = _fitted("macenko", tile)
    source = pyvips.Image.new_from_file(str(shared_data / "bad" / "truncated.jpg"), fail_on="truncated")
    out = method.apply(source, params)
    with pytest.raises(pyvips.Error):
        out.avg()


def test_switched_off_uses_the_chains(tile):
    method, params = _fitted("macenko", tile)
    with _native.switched_off():
        assert not _native.available()
        assert _native.map_image(_image(tile), ("stain", params), lambda: None) is None
        image = method.apply(_image(tile), params)
    assert _native.available()
    np.testing.assert_array_equal(image.numpy(), _native.map_array(tile, ("stain", params), lambda: None))


def test_chains_the_kernel_does_not_know_run_as_they_are(tile):
    _, params = _fitted("macenko", tile)
    steps = params.steps()
    assert kernel_steps(steps) is not None
    assert kernel_steps(steps[:2]) is None  # ends in float indices, not uchar RGB
    assert kernel_steps(steps[1:]) is None  # starts from floats
    image = run_image(_image(tile), steps[:2])
    assert image.format == "ushort"
    np.testing.assert_array_equal(image.numpy(), run_array(tile, steps[:2]))


def test_the_region_layout_is_checked():
    vips = ctypes.CDLL(_native._libvips_path())
    base = _native._region_base(vips)
    assert _native._region_layout_holds(vips, base)
    assert not _native._region_layout_holds(vips, base + 8)  # a layout off by one field is refused


# --- counting and small maps on arrays ----------------------------------------------------------------


def test_array_functions_equal_numpy_on_random_arrays():
    from vipsnorm.methods._hist import add_luma_change, apply_luts_array, counts, histograms, luma_array
    from vipsnorm.sampling import TissueMask, _tissue_pixels_array

    rng = np.random.default_rng(7)
    # thresholds near float32 rounding and integer values, where float32 and float64 comparisons differ
    # (200.000001 and 127.9999999 differ from their float32 roundings at v = 200 and 128)
    thresholds = [0.1, 0.07, 0.15, 0.123456789, 200.0, 199.99999, 200.00001, 200.000001, 127.9999999, 128.5, 37.0]
    for threshold in thresholds:
        rgb = rng.integers(0, 256, (61, 83, 3)).astype(np.uint8)
        for pixels in (rgb, rgb[..., 1].copy(), rgb[..., :1].copy()):
            for rule in ("saturation", "intensity"):
                bands = 1 if pixels.ndim == 2 else pixels.shape[-1]
                mask = TissueMask(np.zeros((2, 2), bool), 1.0, threshold, bands, rule if bands == 3 else "intensity")
                with _native.switched_off():
                    want = _tissue_pixels_array(pixels, mask)
                    want_hist = histograms(pixels, want)
                    want_all = histograms(pixels)
                np.testing.assert_array_equal(_native.tissue(pixels, mask.rule == "saturation", threshold), want)
                np.testing.assert_array_equal(_native.histograms(pixels, want), want_hist)
                np.testing.assert_array_equal(_native.histograms(pixels), want_all)
        luts = rng.integers(0, 256, (3, 256)).astype(np.uint8)
        with _native.switched_off():
            y = luma_array(rgb)
            want_rgb = apply_luts_array(rgb, luts, "rgb")
            want_luma = add_luma_change(rgb, luts[0], y)
            want_grey = apply_luts_array(rgb[..., 0], luts[:1], "joint")
        hist, luma = _native.counts(rgb, luma=True)
        np.testing.assert_array_equal(luma, y)
        np.testing.assert_array_equal(hist[0], counts(y))
        np.testing.assert_array_equal(_native.counts(rgb)[0], [counts(rgb[..., b]) for b in range(3)])
        np.testing.assert_array_equal(_native.apply_luts(rgb, luts), want_rgb)
        np.testing.assert_array_equal(_native.apply_luma(rgb, luts[0]), want_luma)
        np.testing.assert_array_equal(_native.apply_luma(rgb, luts[0], y), want_luma)
        np.testing.assert_array_equal(_native.apply_luts(rgb[..., 0], luts[:1]), want_grey)


def test_hand_computed_tissue_and_counts():
    pixels = np.array([[[200, 100, 100], [250, 245, 240], [10, 10, 10]]], np.uint8)
    # saturation (max - min) / max: 0.5, 0.04, 0; tissue above 0.3
    np.testing.assert_array_equal(_native.tissue(pixels, True, 0.3), [[True, False, False]])
    # darkest channel below 200: 100, 240, 10
    np.testing.assert_array_equal(_native.tissue(pixels, False, 200.0), [[True, False, True]])
    hist = _native.histograms(pixels, np.array([[True, False, True]]))
    assert hist.sum(axis=1).tolist() == [2, 2, 2, 2]
    # lumas: (979800 + 961700 + 186800 + 8192) >> 14 = 130, and 10
    assert hist[3, 130] == 1 and hist[3, 10] == 1 and hist[0, 200] == 1 and hist[1, 100] == 1


def test_array_functions_say_none_for_what_they_do_not_take():
    assert _native.tissue(np.zeros((4, 4, 4), np.uint8), True, 0.1) is None  # RGBA
    assert _native.histograms(np.zeros((4, 4, 3), np.uint16)) is None
    assert _native.counts(np.zeros((4, 4), np.uint8), luma=True) is None  # grey has no luma to compute
    assert _native.apply_luts(np.zeros((4, 4, 3), np.uint8), np.zeros((2, 256), np.uint8)) is None
    with _native.switched_off():
        assert _native.histograms(np.zeros((4, 4, 3), np.uint8)) is None


def test_add_change_and_in_place_maps_equal_numpy():
    from vipsnorm.methods._hist import add_change, add_luma_change, luma_array

    rng = np.random.default_rng(11)
    rgb = rng.integers(0, 256, (67, 45, 3)).astype(np.uint8)
    rgb[0, :3] = [[0, 0, 0], [255, 255, 255], [0, 255, 128]]  # extremes, where the change clips
    new, old = rng.integers(0, 256, (2, 67, 45)).astype(np.uint8)
    new[0, :3], old[0, :3] = [255, 0, 255], [0, 255, 0]  # the largest changes, both ways
    with _native.switched_off():
        want = add_change(rgb, new, old)
    np.testing.assert_array_equal(_native.add_change(rgb, new, old), want)
    # hand-computed: (10, 200, 250) + (60 - 10) clips at 255; (5, 5, 5) + (0 - 20) clips at 0
    pixels = np.array([[[10, 200, 250], [5, 5, 5]]], np.uint8)
    np.testing.assert_array_equal(
        _native.add_change(pixels, np.array([[60, 0]], np.uint8), np.array([[10, 20]], np.uint8)), [[[60, 250, 255], [0, 0, 0]]]
    )
    assert _native.add_change(rgb, new[:-1], old) is None
    # in place: out is the input itself, each pixel read before it is written
    luts = rng.integers(0, 256, (3, 256)).astype(np.uint8)
    with _native.switched_off():
        want_luma = add_luma_change(rgb, luts[0], luma_array(rgb))
    with _native.switched_off():
        want_luts = apply_luts_array(rgb, luts, "rgb")
    for function, args, expected in (
        (_native.apply_luts, (luts,), want_luts),
        (_native.apply_luma, (luts[0],), want_luma),
    ):
        pixels = rgb.copy()
        assert function(pixels, *args, out=pixels) is pixels
        np.testing.assert_array_equal(pixels, expected)
    with pytest.raises(ValueError, match="writable"):
        _native.apply_luts(rgb, luts, out=np.zeros((3, 3, 3), np.uint8))
    frozen = rgb.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        _native.apply_luts(frozen, luts, out=frozen)
    both = np.zeros((2 * 67, 45, 3), np.uint8)
    with pytest.raises(ValueError, match="overlaps"):  # (the input itself is fine; a shifted view is not)
        _native.apply_luts(both[:67], luts, out=both[1:68])


def _count_calls(monkeypatch, *names):
    """Count the calls of ``_native`` functions (to check that a test ran the kernel at all)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        function = getattr(_native, name)

        def counted(*args, _name=name, _function=function, **kwargs):
            out = _function(*args, **kwargs)
            calls[_name] += out is not None
            return out

        monkeypatch.setattr(_native, name, counted)
    return calls


@pytest.mark.parametrize("mode", ["luminance", "rgb", "grey", "grey fit on colour"])
def test_clahe_interpolation_equals_numpy(shared_data, mode, monkeypatch):
    """The kernel's CLAHE interpolation gives the numpy path's bytes (OpenCV's float32 arithmetic), on
    real tiles and random patches, sizes the grid divides and sizes it does not."""
    from vipsnorm.methods.clahe import Clahe

    calls = _count_calls(monkeypatch, "clahe_map", "region_counts", "clahe_luts")

    rng = np.random.default_rng(3)
    arrays = [pyvips.Image.new_from_file(str(shared_data / "tiles" / "histolab-source-medium.png"))[:3].numpy()]
    arrays += [rng.integers(0, 256, shape).astype(np.uint8) for shape in ((256, 256, 3), (97, 131, 3), (40, 300, 3))]
    for array in arrays:
        if mode.startswith("grey"):
            array = array[..., 1].copy()
        for grid, clip in (((8, 8), 2.0), ((3, 5), 40.0), ((1, 1), 1.0)):
            method = Clahe(clip_limit=clip, grid=grid, mode="rgb" if mode == "rgb" else "luminance")
            params = method.fit_array(array)
            with _native.switched_off():
                want = method.apply_array(array, params)
                want_both = method.fit_apply_array(array)
            np.testing.assert_array_equal(method.apply_array(array, params), want, err_msg=f"{array.shape} {grid}")
            np.testing.assert_array_equal(method.fit_apply_array(array), want_both)
            if mode == "grey fit on colour" and array.ndim == 2:
                colour = np.ascontiguousarray(np.stack([array, array // 2, 255 - array], axis=-1))
                with _native.switched_off():
                    want_colour = method.apply_array(colour, params)
                np.testing.assert_array_equal(method.apply_array(colour, params), want_colour)
    assert min(calls.values()) > 0, calls  # (the kernel ran)


@pytest.mark.parametrize("clip", [0.0, 0.01, 2.0, 40.0, 1e9])
def test_clahe_fit_equals_numpy(shared_data, clip, monkeypatch):
    """Region counts and clipped LUTs in C give the numpy path's params: no clipping, a clip of one count,
    usual clips, a clip above any bin; regions the grid pads (BORDER_REFLECT_101) and regions it does not."""
    from vipsnorm.methods.clahe import Clahe

    calls = _count_calls(monkeypatch, "region_counts", "clahe_luts")
    rng = np.random.default_rng(5)
    tile = pyvips.Image.new_from_file(str(shared_data / "tiles" / "torchstain-source.png"))[:3].numpy()
    for array in (tile, rng.integers(0, 256, (53, 77, 3)).astype(np.uint8), np.full((40, 40, 3), 9, np.uint8)):
        for mode in ("luminance", "rgb"):
            for grid in ((8, 8), (3, 7)):
                method = Clahe(clip_limit=clip, grid=grid, mode=mode)
                with _native.switched_off(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # (the flat array)
                    want = method.fit_array(array)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    got = method.fit_array(array)
                assert got == want, (array.shape, mode, grid)
    assert min(calls.values()) > 0, calls


def test_clahe_luts_of_impossible_counts_clip_as_numpy():
    from vipsnorm.methods.clahe import clahe_luts

    hist = np.zeros((2, 256), np.int64)
    hist[0, 0], hist[0, 10] = -5, 20  # (negative counts: nonsense, but clipped to 0..255 as numpy does)
    hist[1, 3] = 15
    with _native.switched_off():
        want = clahe_luts(hist, 2.0, 15)
    np.testing.assert_array_equal(clahe_luts(hist, 2.0, 15), want)


def test_region_counts_and_luma_by_hand():
    from vipsnorm.methods._hist import luma_array

    # a 2x3 grey plane, one region row of two regions 2 px wide, padded by one column (reflect 101)
    plane = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)[..., np.newaxis]
    counts = _native.region_counts(plane, (2, 1), (2, 2), np.array([0, 1]), np.array([0, 1, 2, 1]))
    assert counts.shape == (1, 1, 2, 256)
    assert {v: counts[0, 0, 0, v] for v in np.flatnonzero(counts[0, 0, 0])} == {1: 1, 2: 1, 4: 1, 5: 1}
    assert {v: counts[0, 0, 1, v] for v in np.flatnonzero(counts[0, 0, 1])} == {3: 1, 2: 1, 6: 1, 5: 1}
    with pytest.raises(ValueError, match="outside"):
        _native.region_counts(plane, (2, 1), (2, 2), np.array([0, 2]), np.array([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="one source index"):
        _native.region_counts(plane, (2, 1), (2, 2), np.array([0]), np.array([0, 1, 2, 1]))
    rgb = np.random.default_rng(2).integers(0, 256, (31, 17, 3)).astype(np.uint8)
    with _native.switched_off():
        want = luma_array(rgb)
    np.testing.assert_array_equal(_native.luma(rgb), want)
    np.testing.assert_array_equal(luma_array(rgb), want)
    # (979800 + 961700 + 186800 + 8192) >> 14 = 130: 200, 100, 100 weighted 4899, 9617, 1868
    assert _native.luma(np.array([[200, 100, 100]], np.uint8)).tolist() == [130]


def test_clahe_geometry_is_checked():
    rows = (np.zeros(4, np.int32), np.zeros(4, np.int32))
    columns = (np.zeros(6, np.int32), np.full(6, 256, np.int32))
    weights = (np.ones(6, np.float32), np.zeros(6, np.float32), np.ones(4, np.float32), np.zeros(4, np.float32))
    geometry = _native.ClaheGeometry(rows, columns, weights)
    assert geometry.reach == 512
    plane = np.arange(24, dtype=np.uint8).reshape(4, 6)
    table = np.arange(512, dtype=np.float32)
    # weight 1 on the first region's LUT, which is the identity here
    np.testing.assert_array_equal(_native.clahe_map(plane, table, geometry), plane)
    with pytest.raises(ValueError, match="reaches entry 511"):
        _native.clahe_map(plane, table[:300], geometry)
    with pytest.raises(ValueError, match="plane"):
        _native.clahe_map(plane[:3], table, geometry)
    with pytest.raises(ValueError, match="negative"):
        _native.ClaheGeometry((np.full(4, -1), rows[1]), columns, weights)
    with pytest.raises(ValueError, match="sizes"):
        _native.ClaheGeometry(rows, columns, weights[:2] + (np.ones(5, np.float32), weights[3]))


def test_fused_luminance_equalization_equals_numpy():
    from vipsnorm.methods import Equalize

    rng = np.random.default_rng(9)
    method = Equalize("luminance")
    arrays = [rng.integers(0, 256, (37, 53, 3)).astype(np.uint8), rng.integers(90, 110, (64, 64, 3)).astype(np.uint8)]
    for array in arrays:
        with _native.switched_off():
            want = method.fit_apply_array(array)
        out, present = _native.equalize_luma(array)
        np.testing.assert_array_equal(out, want)
        assert present == np.unique(luma_of(array)).size
        np.testing.assert_array_equal(method.fit_apply_array(array), want)
    # one luma value: the identity, with the flat-histogram warning
    flat = np.full((8, 8, 3), 77, np.uint8)
    assert _native.equalize_luma(flat)[1] == 1
    with pytest.warns(RuntimeWarning, match="flat"):
        np.testing.assert_array_equal(method.fit_apply_array(flat), flat)
    assert _native.equalize_luma(np.zeros((4, 4), np.uint8)) is None  # grey: counted as it is


def luma_of(array):
    from vipsnorm.methods._hist import luma_array

    with _native.switched_off():
        return luma_array(array)


@pytest.fixture
def simd_restored():
    yield
    _native.simd(True)


def test_ssse3_luma_is_the_integer_luma_of_every_colour(every_colour, simd_restored):
    # the 16-pixel loop (where the CPU has SSSE3) and the scalar one, against the integer formula
    rgb = every_colour.reshape(-1, 3).astype(np.int64)
    want = ((4899 * rgb[:, 0] + 9617 * rgb[:, 1] + 1868 * rgb[:, 2] + 8192) >> 14).astype(np.uint8)
    for on in (True, False):
        _native.simd(on)
        np.testing.assert_array_equal(_native.luma(every_colour).reshape(-1), want, err_msg=f"simd {on}")


@pytest.mark.parametrize("npix", [0, 1, 15, 16, 17, 18, 19, 33, 1023, 1024, 1025, 2063, 65536])
def test_ssse3_luma_change_equals_the_scalar_loop_at_every_length(npix, simd_restored):
    # the SSSE3 loops do 16 pixels at a time (the luma's loads read 4 bytes ahead, so it stops 2 pixels
    # early) and leave the rest to the scalar loop: every length around those edges, given luma or
    # not, into a new array or in place, and the fused equalization
    rng = np.random.default_rng(npix)
    rgb = rng.integers(0, 256, (1, npix, 3)).astype(np.uint8)
    rgb[0, ::7] = 255  # saturating up and down
    rgb[0, 3::11] = 0
    luts = [rng.integers(0, 256, 256).astype(np.uint8), np.full(256, 255, np.uint8), np.zeros(256, np.uint8)]
    results = {}
    for on in (True, False):
        _native.simd(on)
        y = _native.luma(rgb)
        got = [y]
        for lut in luts:
            got.append(_native.apply_luma(rgb, lut, y))
            got.append(_native.apply_luma(rgb, lut))
            copy = rgb.copy()
            _native.apply_luma(copy, lut, out=copy)
            got.append(copy)
        if npix:
            got.extend(_native.equalize_luma(rgb)[:1])
            got.append(_native.counts(rgb, luma=True)[0])
        results[on] = got
    for a, b in zip(results[True], results[False]):
        np.testing.assert_array_equal(a, b)
    # and the scalar loop against the numpy arithmetic
    if npix:
        y = results[False][0].astype(int)
        want = np.clip(rgb.astype(int) + (luts[0].astype(int)[y] - y)[..., np.newaxis], 0, 255)
        np.testing.assert_array_equal(results[False][1], want)


def test_ssse3_loops_are_used_where_the_cpu_has_them(simd_restored):
    import platform

    on = _native.simd(True)
    if platform.machine() in ("x86_64", "AMD64"):
        # SSSE3 is on every x86-64 CPU since 2006 (and on the CI machines): the fast loops are tested
        assert on
    assert _native.simd(False) is False


_GUARD_SCRIPT = r"""
import ctypes, mmap, sys
import numpy as np
from vipsnorm import _native
assert _native.available()
page = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
for n in [int(v) for v in sys.argv[1:]]:
    buffer = mmap.mmap(-1, 2 * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    assert libc.mprotect(base + page, page, 0) == 0  # PROT_NONE: the byte after the pixels faults
    rgb = np.frombuffer(buffer, np.uint8, 3 * n, page - 3 * n).reshape(1, n, 3)
    y = _native.luma(rgb)
    _native.counts(rgb, luma=True)
    _native.equalize_luma(rgb)
    _native.apply_luma(rgb, np.arange(256, dtype=np.uint8)[::-1].copy())
print("ok")
"""


def test_ssse3_luma_never_reads_past_the_pixels():
    # the luma's 16-byte loads read 4 bytes past the 4 pixels they use: pixels that end where a page
    # the process may not read begins must still be read without a fault, at every length near the end
    import subprocess

    lengths = [str(n) for n in (1, 2, 15, 16, 17, 18, 19, 20, 32, 33, 34, 35, 1024, 1025, 1026, 1041)]
    done = subprocess.run([sys.executable, "-c", _GUARD_SCRIPT, *lengths], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


def test_hand_computed_pair_counts_and_mask():
    rgb = np.array([[[200, 100, 50], [10, 10, 10], [255, 0, 0]]], np.uint8)
    pairs, spread = _native.pair_counts(rgb, 205)
    # (chroma, max): (150, 200), (0, 10), (255, 255); darkest below 205: all three
    assert {int(i): int(pairs[i]) for i in np.flatnonzero(pairs)} == {150 << 8 | 200: 1, 10: 1, 255 << 8 | 255: 1}
    assert {int(i): int(spread[i]) for i in np.flatnonzero(spread)} == {150: 1, 0: 1, 255: 1}
    _, spread = _native.pair_counts(rgb, 10)  # (darkest 50, 10, 0: only the last is below 10)
    assert {int(i): int(spread[i]) for i in np.flatnonzero(spread)} == {255: 1}
    table = np.zeros(1 << 16, bool)
    table[150 << 8 | 200] = True
    assert _native.pair_mask(rgb, table).tolist() == [[True, False, False]]


def _overviews(shared_data):
    import vipsnorm
    from vipsnorm.sampling import overview

    rng = np.random.default_rng(11)
    out = {}
    with vipsnorm.open(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        out["CMU-1"] = overview(slide)[0]
    tile = pyvips.Image.new_from_file(str(shared_data / "tiles" / "henorm-example1.png"))[:3].numpy()
    out["H&E tile"] = np.ascontiguousarray(tile)
    out["noise"] = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    pale = np.full((200, 300, 3), 240, np.uint8)
    pale[50:150, 60:200] = (rng.integers(0, 256, (100, 140, 1)) * 0.3 + 120).astype(np.uint8)  # grey tissue
    out["grey as RGB"] = pale
    return out


def test_tissue_mask_same_with_and_without_kernel(shared_data, monkeypatch):
    """sampling.tissue_mask counts in C when it can: the same threshold, rule and mask as numpy's."""
    from vipsnorm.errors import NoTissueError
    from vipsnorm.sampling import tissue_mask

    def masks():
        out = {}
        for name, view in _overviews(shared_data).items():
            try:
                m = tissue_mask(view, 2.0)
                out[name] = (m.threshold, m.rule, m.mask.tobytes())
            except NoTissueError as exc:
                out[name] = str(exc)
        return out

    calls = []
    real = _native.pair_counts
    monkeypatch.setattr(_native, "pair_counts", lambda *a: calls.append(1) or real(*a))
    native = masks()
    assert len(calls) == 4
    monkeypatch.setattr(_native, "pair_counts", lambda *a: None)
    assert masks() == native
    assert native["grey as RGB"][1] == "intensity" and native["CMU-1"][1] == "saturation"
