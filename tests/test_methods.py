"""The LUT methods at four levels: hand-computed cases, invariants, named references, pyvips == numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pyvips

from vipsnorm.methods import (
    METHODS,
    Equalize,
    EqualizeParams,
    Match,
    Sample,
    Stretch,
    StretchParams,
    params_from_dict,
)
from vipsnorm.errors import InvalidReferenceError, UnsupportedImageError
from vipsnorm.methods._hist import luma_array, luma_image, percentile
from vipsnorm.methods.equalize import equalize_lut
from vipsnorm.methods.match import match_lut
from vipsnorm.methods.stretch import stretch_lut

skimage = pytest.importorskip("skimage")
cv2 = pytest.importorskip("cv2")
from skimage import data, exposure  # noqa: E402

RGB_IMAGES = {"astronaut": data.astronaut, "chelsea": data.chelsea, "ihc": data.immunohistochemistry}


def _fit_apply(method, array):
    params = method.fit(Sample.from_array(array))
    return params, method.apply_array(array, params)


# --- hand-computed cases -------------------------------------------------------------------------


def test_equalize_lut_hand_computed():
    counts = np.zeros(256)
    counts[[10, 20, 30]] = [2, 1, 1]  # N = 4, cdf = 2, 3, 4, cdf_min = 2
    lut = equalize_lut(counts)
    assert lut[10] == 0
    assert lut[20] == 128  # 255 * (3 - 2) / (4 - 2) = 127.5, rounded half up
    assert lut[30] == 255
    assert lut[5] == 0 and lut[200] == 255  # below / above the occupied range


def test_stretch_lut_hand_computed():
    lut = stretch_lut(50.0, 150.0)
    assert lut[50] == 0 and lut[150] == 255
    assert lut[100] == 128  # 127.5 rounded half up
    assert lut[75] == 64  # 63.75
    assert lut[0] == 0 and lut[255] == 255  # clipped, no overflow past 255


def test_stretch_percentiles_hand_computed():
    values = np.arange(101, dtype=np.uint8)  # 0..100
    params = Stretch(low=10, high=90).fit(Sample.from_array(values.reshape(1, -1)))
    assert params.lo == (10.0,) and params.hi == (90.0,)
    params = Stretch(low=0, high=100).fit(Sample.from_array(values.reshape(1, -1)))  # min/max
    assert params.lo == (0.0,) and params.hi == (100.0,)


def test_match_lut_hand_computed():
    source = np.zeros(256)
    source[[0, 100]] = [1, 1]  # quantiles 0.5, 1.0
    target = np.zeros(256)
    target[[50, 150, 250]] = [1, 1, 2]  # quantiles 0.25, 0.5, 1.0
    lut = match_lut(source, target)
    assert lut[0] == 150  # quantile 0.5 -> 150
    assert lut[100] == 250  # quantile 1.0 -> 250
    assert lut[255] == 255  # above the source range: interpolated to white, glass stays white


def test_luma_matches_opencv_fixed_point():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    y_cv = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)[..., 0]
    np.testing.assert_array_equal(luma_array(rgb), y_cv)
    np.testing.assert_array_equal(luma_image(pyvips.Image.new_from_array(rgb)).numpy(), y_cv)


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
@pytest.mark.parametrize("q", [0, 2, 33.3, 50, 98, 100])
def test_percentile_from_histogram_equals_numpy(n, q):
    values = np.random.default_rng(n).integers(0, 256, n)
    assert percentile(np.bincount(values, minlength=256), q) == pytest.approx(np.percentile(values, q), abs=1e-9)


def test_pooled_min_max_is_the_sets_extremes():
    # pooled samples weigh each pixel below 1: the extremes must still be the lowest and highest value seen
    rng = np.random.default_rng(0)
    images = [rng.integers(50, 201, (300, 300, 3)).astype(np.uint8) for _ in range(3)]
    images[1][0, 0, 0] = 250
    pooled = Sample.pooled([Sample.from_array(im) for im in images])
    params = Stretch(0, 100, mode="rgb").fit(pooled)
    whole = Stretch(0, 100, mode="rgb").fit(Sample.from_array(np.concatenate(images)))
    assert params == whole
    assert params.hi[0] == 250 and params.lo[0] == 50
    assert percentile(np.array([0.0, 1 / 3, 0, 2 / 3]), 100) == 3 and percentile(np.array([0.0, 1 / 3, 2 / 3]), 0) == 1


def test_per_channel_luts_on_a_grey_image_are_refused():
    rgb = data.astronaut()
    grey = rgb[..., 1].copy()
    params = Equalize(mode="rgb").fit(Sample.from_array(rgb))
    with pytest.raises(UnsupportedImageError, match="per channel"):
        Equalize(mode="rgb").apply_array(grey, params)
    with pytest.raises(UnsupportedImageError, match="per channel"):
        Equalize(mode="rgb").apply(pyvips.Image.new_from_array(grey), params)
    # per-channel LUTs fitted on a grey image are the same three tables: they apply to grey
    params = Equalize(mode="rgb").fit(Sample.from_array(grey))
    np.testing.assert_array_equal(Equalize(mode="rgb").apply_array(grey, params), Equalize().apply_array(grey, params))
    # one joint LUT applies to grey as before
    params = Stretch(2, 98).fit(Sample.from_array(rgb))
    assert Stretch(2, 98).apply_array(grey, params).shape == grey.shape


@pytest.mark.parametrize("method, single", [(Stretch(mode="rgb"), "joint"), (Equalize(mode="rgb"), "luminance")])
def test_per_channel_luts_on_a_grey_image_name_the_methods_one_lut_mode(method, single):
    # stretch has no mode luminance: the fix named must be one of its own modes
    params = method.fit(Sample.from_array(data.astronaut()))
    with pytest.raises(UnsupportedImageError, match=f"or use mode {single}$"):
        method.apply_array(data.camera(), params)


_TARGET = Sample.from_array(data.immunohistochemistry()[::4, ::4])
LUT_METHODS = {
    "stretch": Stretch(),
    "stretch-rgb": Stretch(mode="rgb"),
    "equalize": Equalize(),
    "equalize-rgb": Equalize(mode="rgb"),
    "match": Match(_TARGET),
    "match-luminance": Match(_TARGET, mode="luminance"),
}


@pytest.mark.parametrize("name", LUT_METHODS)
def test_lut_methods_refuse_what_is_not_8bit_grey_or_rgb(name):
    # a LUT of 256 entries maps 8-bit grey or RGB: alpha, 16-bit and float are refused, never mapped wrong
    method = LUT_METHODS[name]
    rgb = data.astronaut()[::8, ::8]
    params = method.fit(Sample.from_array(rgb))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    for bands in (rgba, rgba[..., :2], rgba[..., :1].repeat(5, axis=-1)):  # RGBA, grey + alpha, 5 bands
        with pytest.raises(UnsupportedImageError, match=rf"^{method.name} needs an \(h, w\), \(h, w, 1\) or \(h, w, 3\) array"):
            method.apply_array(bands, params)
        with pytest.raises(UnsupportedImageError, match=f"^{method.name} needs an 8-bit .* not uchar with {bands.shape[-1]} bands"):
            method.apply(pyvips.Image.new_from_array(bands), params)
    for dtype in (np.uint16, np.float32, np.int64):
        with pytest.raises(TypeError, match=f"^{method.name} needs uint8 pixels, not {np.dtype(dtype)}"):
            method.apply_array(rgb.astype(dtype), params)
    for fmt in ("ushort", "float"):
        with pytest.raises(UnsupportedImageError, match=f"not {fmt} with 3 bands"):
            method.apply(pyvips.Image.new_from_array(rgb).cast(fmt), params)
    # 8-bit grey and RGB still pass
    assert method.apply_array(rgb, params).shape == rgb.shape
    assert method.apply(pyvips.Image.new_from_array(rgb), params).numpy().shape == rgb.shape


def test_fits_that_read_an_uncounted_luma_row_are_refused():
    # sample_slide(..., luma=False) leaves the Y row of a colour image NaN: a fit reading it must say so,
    # not cast the NaN to an all-zero LUT (a near-black image)
    counted = Sample.from_array(data.astronaut()[::4, ::4])
    uncounted = Sample(np.vstack([counted.hist[:3], np.full((1, 256), np.nan)]), 3, "luma=False")
    assert not uncounted.luma_counted
    for method in (Equalize(), Match(counted, mode="luminance")):
        with pytest.raises(ValueError, match=r"luminance\) reads the luma \(Y\) histogram.*luma=True"):
            method.fit(uncounted)
    with pytest.raises(InvalidReferenceError, match="reference's luma"):
        Match(uncounted, mode="luminance").fit(counted)
    # the fits that read R, G and B only still fit on it, as they did
    for method in (Equalize(mode="rgb"), Match(counted), Stretch(), Stretch(mode="rgb")):
        assert method.fit(uncounted) == method.fit(counted)
    # pooling would turn every count NaN (a sample's weight is its pixel count, from the Y row)
    with pytest.raises(ValueError, match="cannot pool a sample whose luma.*luma=True"):
        Sample.pooled([counted, uncounted])


# --- references ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RGB_IMAGES)
def test_stretch_joint_matches_skimage(name):
    img = RGB_IMAGES[name]()
    _, ours = _fit_apply(Stretch(2, 98), img)
    lo, hi = np.percentile(img, (2, 98))
    ref = exposure.rescale_intensity(img.astype(float), in_range=(lo, hi), out_range=(0, 255))
    # skimage is float here; we round to uint8: at most half a level apart
    assert np.abs(ours - ref).max() <= 0.5 + 1e-6


@pytest.mark.parametrize("name", RGB_IMAGES)
def test_stretch_rgb_matches_skimage_per_channel(name):
    img = RGB_IMAGES[name]()
    _, ours = _fit_apply(Stretch(1, 99, mode="rgb"), img)
    for c in range(3):
        lo, hi = np.percentile(img[..., c], (1, 99))
        ref = exposure.rescale_intensity(img[..., c].astype(float), in_range=(lo, hi), out_range=(0, 255))
        assert np.abs(ours[..., c] - ref).max() <= 0.5 + 1e-6


@pytest.mark.parametrize("image", [data.moon, data.camera, lambda: data.astronaut()[..., 1]])
def test_equalize_grey_matches_opencv_and_skimage(image):
    img = image()
    _, ours = _fit_apply(Equalize(), img)
    # OpenCV equalizeHist uses the same definition; it rounds half to even, we round half up
    ref_cv = cv2.equalizeHist(img)
    diff = np.abs(ours.astype(int) - ref_cv)
    assert diff.max() <= 1 and diff.mean() < 0.01
    # skimage returns cdf(v) in (0, 1]; rescaled from [cdf_min, 1] to [0, 255] it is our LUT
    sk = exposure.equalize_hist(img)
    expected = (sk - sk.min()) / (1 - sk.min()) * 255
    assert np.abs(ours - expected).max() <= 0.5 + 1e-6


@pytest.mark.parametrize("name", RGB_IMAGES)
def test_equalize_rgb_matches_skimage_per_channel(name):
    img = RGB_IMAGES[name]()
    _, ours = _fit_apply(Equalize(mode="rgb"), img)
    for c in range(3):
        sk = exposure.equalize_hist(img[..., c])
        expected = (sk - sk.min()) / (1 - sk.min()) * 255
        assert np.abs(ours[..., c] - expected).max() <= 0.5 + 1e-6


@pytest.mark.parametrize("name", RGB_IMAGES)
def test_equalize_luminance_matches_opencv_ycrcb_recipe(name):
    """The common OpenCV recipe: equalize Y of YCrCb, convert back. Its Cr/Cb are rounded to uint8, we
    keep them exact, so the results differ by at most one level."""
    img = RGB_IMAGES[name]()
    _, ours = _fit_apply(Equalize(), img)
    ycc = cv2.cvtColor(img, cv2.COLOR_RGB2YCrCb)
    ycc[..., 0] = cv2.equalizeHist(ycc[..., 0])
    ref = cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB)
    diff = np.abs(ours.astype(int) - ref)
    assert diff.max() <= 1
    assert diff.mean() < 0.5


@pytest.mark.parametrize("source,target", [("astronaut", "chelsea"), ("ihc", "astronaut")])
def test_match_rgb_matches_skimage(source, target):
    src, tgt = RGB_IMAGES[source](), RGB_IMAGES[target]()
    method = Match(Sample.from_array(tgt))
    _, ours = _fit_apply(method, src)
    ref = exposure.match_histograms(src, tgt, channel_axis=-1)  # uint8 (truncated)
    diff = np.abs(ours.astype(int) - ref)
    assert diff.max() <= 1
    # output CDF follows the target CDF (the property matching promises); below the 15th percentile
    # astronaut's many identical black pixels form one value that no LUT can split
    for c in range(3):
        q = np.linspace(15, 95, 21)
        assert np.abs(np.percentile(ours[..., c], q) - np.percentile(tgt[..., c], q)).max() <= 3


# --- invariants ----------------------------------------------------------------------------------


def test_luminance_mode_keeps_chroma():
    img = data.immunohistochemistry()
    _, ours = _fit_apply(Equalize(), img)
    before = cv2.cvtColor(img, cv2.COLOR_RGB2YCrCb).astype(int)
    after = cv2.cvtColor(ours, cv2.COLOR_RGB2YCrCb).astype(int)
    unclipped = (ours > 0).all(axis=-1) & (ours < 255).all(axis=-1)
    chroma_change = np.abs(after[..., 1:] - before[..., 1:])[unclipped]
    assert chroma_change.max() <= 1  # Cr, Cb kept (up to rounding)
    assert unclipped.mean() > 0.8  # equalizing IHC clips its darkest and brightest pixels


def test_joint_stretch_keeps_channel_order():
    img = data.astronaut()
    _, ours = _fit_apply(Stretch(), img)
    r, g = img[..., 0].astype(int), img[..., 1].astype(int)
    r2, g2 = ours[..., 0].astype(int), ours[..., 1].astype(int)
    assert not ((r > g) & (r2 < g2)).any()  # one monotonic map for all channels


@pytest.mark.parametrize("method", [Stretch(), Stretch(mode="rgb"), Equalize(), Equalize(mode="rgb")])
def test_luts_are_monotonic(method):
    params = method.fit(Sample.from_array(data.immunohistochemistry()))
    assert (np.diff(params.luts().astype(int), axis=1) >= 0).all()


def test_equalized_histogram_is_flat():
    ours = _fit_apply(Equalize(), data.moon())[1]
    cdf = np.cumsum(np.bincount(ours.ravel(), minlength=256)) / ours.size
    assert np.abs(cdf - np.linspace(0, 1, 256)).max() < 0.1  # near-uniform (moon has few grey levels)


def test_match_to_itself_is_identity():
    img = data.chelsea()
    _, ours = _fit_apply(Match(Sample.from_array(img)), img)
    assert np.abs(ours.astype(int) - img).max() <= 1


@pytest.mark.parametrize("method", [Stretch(), Stretch(mode="rgb"), Equalize(), Equalize(mode="rgb")])
def test_flat_image_is_identity_with_warning(method):
    flat = np.full((8, 8, 3), 128, np.uint8)
    with pytest.warns(RuntimeWarning, match="flat"):
        params, ours = _fit_apply(method, flat)
    np.testing.assert_array_equal(ours, flat)
    assert np.isfinite(np.asarray(params.luts(), float)).all()


def test_stretch_one_flat_channel_only_that_channel_kept():
    img = data.astronaut().copy()
    img[..., 2] = 77
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[2\]"):
        _, ours = _fit_apply(Stretch(mode="rgb"), img)
    assert (ours[..., 2] == 77).all()
    assert ours[..., 0].min() == 0 and ours[..., 0].max() == 255


# --- code paths and serialization ----------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [Stretch(), Stretch(mode="rgb"), Equalize(), Equalize(mode="rgb")],
    ids=["stretch", "stretch-rgb", "equalize", "equalize-rgb"],
)
@pytest.mark.parametrize("name", ["astronaut", "ihc", "grey"])
def test_pyvips_path_equals_numpy_path(method, name):
    img = data.camera() if name == "grey" else RGB_IMAGES[name]()
    params = method.fit(Sample.from_array(img))
    lazy = method.apply(pyvips.Image.new_from_array(img), params)
    assert lazy.format == "uchar"
    np.testing.assert_array_equal(lazy.numpy(), method.apply_array(img, params))


@pytest.mark.parametrize("mode", ["rgb", "luminance"])
def test_match_pyvips_path_equals_numpy_path(mode):
    img = data.astronaut()
    method = Match(Sample.from_array(data.immunohistochemistry()), mode=mode)
    params = method.fit(Sample.from_array(img))
    np.testing.assert_array_equal(
        method.apply(pyvips.Image.new_from_array(img), params).numpy(), method.apply_array(img, params)
    )


@pytest.mark.parametrize(
    "method",
    [Stretch(5, 95), Equalize(mode="rgb"), Match(Sample.from_array(data.chelsea()), mode="luminance")],
)
def test_params_json_round_trip(method):
    params = method.fit(Sample.from_array(data.astronaut()))
    again = params_from_dict(json.loads(json.dumps(params.to_dict())))
    assert again == params and type(again) is type(params)
    np.testing.assert_array_equal(again.luts(), params.luts())


def test_params_are_frozen():
    params = Stretch().fit(Sample.from_array(data.astronaut()))
    with pytest.raises(Exception):
        params.lo = (0.0,)  # type: ignore[misc]


def test_method_table_is_explicit():
    from vipsnorm.methods import Clahe

    assert {k: METHODS[k] for k in ("stretch", "equalize", "match", "clahe")} == {
        "stretch": Stretch, "equalize": Equalize, "match": Match, "clahe": Clahe
    }
    for name, cls in METHODS.items():
        assert cls.name == name and cls.params_type.method == name
    assert StretchParams.method == "stretch" and EqualizeParams.method == "equalize"


def test_pooled_sample_weights_images_equally():
    small = Sample.from_array(np.zeros((1, 10), np.uint8))
    large = Sample.from_array(np.full((100, 100), 200, np.uint8))
    pooled = Sample.pooled([small, large])
    assert pooled.hist[3][0] == pytest.approx(pooled.hist[3][200])


@pytest.mark.parametrize("bad", [dict(low=50, high=50), dict(low=-1), dict(high=101), dict(mode="hsv")])
def test_stretch_rejects_bad_options(bad):
    with pytest.raises(ValueError):
        Stretch(**bad)


def test_match_sends_source_glass_to_target_glass_monotonically():
    from vipsnorm.methods.match import anchor_glass

    rng = np.random.default_rng(3)
    src = rng.integers(60, 255, (64, 64, 3), dtype=np.uint8)  # pale tissue reaching glass values
    tgt = rng.integers(40, 200, (64, 64, 3), dtype=np.uint8)  # a darker palette
    glass_src, glass_tgt = (240.0, 236.0, 250.0, 240.0), (235.0, 230.0, 232.0, 232.0)
    source = Sample(Sample.from_array(src).hist, 3, "src", glass_src)
    target = Sample(Sample.from_array(tgt).hist, 3, "tgt", glass_tgt)
    luts = Match(target).fit(source).luts().astype(int)
    for c in range(3):
        assert abs(luts[c][int(glass_src[c])] - glass_tgt[c]) <= 1
        assert (np.diff(luts[c]) >= 0).all()
        assert luts[c][255] == 255
    # without a target glass, the source glass is kept where it is
    kept = Match(Sample.from_array(tgt)).fit(source).luts().astype(int)
    assert abs(kept[2][250] - 250) <= 1
    np.testing.assert_allclose(anchor_glass(np.arange(256.0), 200, 200)[200:], np.arange(200, 256))


# --- the numpy fast paths of training patches ------------------------------------------------------


def _patches() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    rgb = data.astronaut()[100:356, 120:376]
    return {
        "rgb": rgb,
        "grey": data.camera()[:200, :131],
        "grey (h, w, 1)": data.camera()[:90, :70, np.newaxis],
        "odd rgb": np.ascontiguousarray(rgb[:97, :53]),
        "strided rgb": rgb[::2, 1::3],
        "noise": rng.integers(0, 256, (33, 65, 3), dtype=np.uint8),
        "one pixel": rng.integers(0, 256, (1, 1, 3), dtype=np.uint8),
    }


@pytest.mark.filterwarnings("ignore:equalize. flat histogram")  # (one pixel)
@pytest.mark.parametrize("mode", ["luminance", "rgb"])
def test_equalize_fit_apply_array_is_fit_then_apply(mode):
    method = Equalize(mode)
    for name, patch in _patches().items():
        _, expected = _fit_apply(method, patch)
        np.testing.assert_array_equal(method.fit_apply_array(patch), expected, err_msg=name)
    flat = np.full((20, 30, 3), 77, np.uint8)
    with pytest.warns(RuntimeWarning, match="flat"):
        np.testing.assert_array_equal(method.fit_apply_array(flat), flat)
    with pytest.raises(TypeError, match="uint8"):
        method.fit_apply_array(flat.astype(np.float32))


def test_histograms_count_the_kept_pixels_of_every_row():
    from vipsnorm.methods._hist import histograms

    rng = np.random.default_rng(5)
    for patch in _patches().values():
        keep = rng.random(patch.shape[:2]) < 0.3
        kept = patch.reshape(-1, 1 if patch.ndim == 2 else patch.shape[-1])[keep.reshape(-1)]
        rows = [kept[:, b] for b in range(kept.shape[1])]
        rows = rows + [luma_array(kept)] if kept.shape[1] == 3 else rows * 4
        expected = np.array([np.bincount(r, minlength=256) for r in rows], dtype=np.float64)
        np.testing.assert_array_equal(histograms(patch, keep), expected)
        np.testing.assert_array_equal(histograms(patch), histograms(patch, np.ones(patch.shape[:2], bool)))
