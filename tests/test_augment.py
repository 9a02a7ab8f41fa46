"""Augmentations: each at fixed parameters is its method on the patch and agrees with a reference
implementation (OpenCV, scikit-image, the Beer-Lambert formula); random draws stay inside the stated
ranges; seeded runs are reproducible; torchvision and Keras wrappers."""

from __future__ import annotations

import os

import numpy as np
import pytest

from vipsnorm.methods import Clahe, Equalize, Macenko, Match, Sample, Stretch
from vipsnorm.methods._hist import luma_array
from vipsnorm.methods.stain import MacenkoParams, macenko_stains
from vipsnorm.training import augment as A
from vipsnorm.training.patches import PatchReader, random_patches

cv2 = pytest.importorskip("cv2")
# keras' own conversion of torch tensors (keras.ops.convert_to_numpy) warns under numpy 2.4
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


@pytest.fixture(scope="module")
def tiles(small_slide) -> list[np.ndarray]:
    """Six 256 px H&E patches of the generated slide (raw pixels), tissue at least 30%."""
    import vipsnorm

    with vipsnorm.open(small_slide) as slide:
        reader = PatchReader(slide)
        return [reader.read_patch(p) for p in random_patches(slide, 256, 6, seed=0, min_tissue=0.3)]


def _cv_clahe(grey: np.ndarray, clip: float, grid: tuple[int, int]) -> np.ndarray:
    return cv2.createCLAHE(clipLimit=clip, tileGridSize=grid).apply(np.ascontiguousarray(grey))


# --- fixed parameters: the method, and the reference implementations ----------------------------


def test_stretch_at_fixed_percentiles_is_the_method_and_skimage(tiles):
    from skimage import exposure

    for tile in tiles:
        t = A.RandomStretch(low=3.0, high=97.0, mode="joint")
        out = t(tile)
        method = Stretch(3.0, 97.0, "joint")
        np.testing.assert_array_equal(out, method.apply_array(tile, method.fit(Sample.from_array(tile))))
        lo, hi = np.percentile(tile, [3.0, 97.0])
        ref = exposure.rescale_intensity(tile.astype(np.float64), in_range=(lo, hi), out_range=(0.0, 255.0))
        assert np.abs(out - ref).max() <= 0.5 + 1e-9  # we round what skimage leaves as floats


@pytest.mark.parametrize("mode", ["rgb", "luminance"])
def test_equalization_is_the_method_and_opencv(tiles, mode):
    for tile in tiles:
        out = A.RandomEqualization(mode=mode, p=1.0)(tile)
        method = Equalize(mode)
        np.testing.assert_array_equal(out, method.apply_array(tile, method.fit(Sample.from_array(tile))))
        if mode == "rgb":
            ref = np.stack([cv2.equalizeHist(np.ascontiguousarray(tile[..., b])) for b in range(3)], axis=-1)
        else:  # OpenCV's equalizeHist of the luma, its change added to every channel (hue kept)
            y = luma_array(tile)
            ref = np.clip(tile.astype(np.int16) + (cv2.equalizeHist(y).astype(np.int16) - y)[..., None], 0, 255)
        np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("mode", ["rgb", "luminance"])
def test_clahe_at_fixed_clip_limit_is_the_method_and_opencv(tiles, mode):
    for tile, grid in zip(tiles, [(8, 8), (4, 4), (3, 5), (8, 8), (2, 2), (8, 8)]):
        out = A.RandomClahe(clip_limit=2.5, grid=grid, mode=mode)(tile)
        method = Clahe(2.5, grid=grid, mode=mode)
        np.testing.assert_array_equal(out, method.apply_array(tile, method.fit_array(tile)))
        if mode == "rgb":
            ref = np.stack([_cv_clahe(tile[..., b], 2.5, grid) for b in range(3)], axis=-1)
        else:
            y = luma_array(tile)
            ref = np.clip(tile.astype(np.int16) + (_cv_clahe(y, 2.5, grid).astype(np.int16) - y)[..., None], 0, 255)
        # measured bit-exact with OpenCV 5.0; one grey level allowed on an interpolated .5 (test_clahe.py)
        d = np.abs(out.astype(np.int16) - ref)
        assert d.max() <= 1 and d.mean() <= 0.01, (d.max(), d.mean())


@pytest.mark.parametrize("mode", ["rgb", "luminance"])
def test_clahe_at_fixed_clip_limit_and_the_libvips_path_of_normalize_differ_on_halves_only(tiles, mode):
    """What the documentation states: an augmentation at fixed parameters is the method's numpy path
    (OpenCV's CLAHE, tested above); ``normalize --method clahe`` runs the libvips path, which rounds an
    interpolated half up where the numpy path rounds it to even: one grey level up, on about 1% of values."""
    import pyvips

    for tile in tiles:
        out = A.RandomClahe(clip_limit=2.0, grid=(8, 8), mode=mode)(tile)
        method = Clahe(2.0, grid=(8, 8), mode=mode)
        libvips = method.apply(pyvips.Image.new_from_array(tile), method.fit_array(tile)).numpy()
        d = libvips.astype(np.int16) - out
        assert set(np.unique(d)) <= {0, 1} and 0 < np.mean(d != 0) < 0.03, (np.unique(d), np.mean(d != 0))


def test_histogram_match_is_the_method_and_skimage(tiles):
    from skimage import exposure

    references = tiles[:2]
    t = A.RandomHistogramMatch(references, mode="rgb", seed=0)
    for tile in tiles[2:]:
        params = t.draw(np.random.default_rng(1))
        out = t.apply(tile, **params)
        ref_image = references[params["reference"]]
        method = Match(Sample.from_array(ref_image), "rgb")
        np.testing.assert_array_equal(out, method.apply_array(tile, method.fit(Sample.from_array(tile))))
        sk = exposure.match_histograms(tile, ref_image, channel_axis=-1)
        d = np.abs(out.astype(np.float64) - sk)
        assert d.max() <= 1.0 and d.mean() <= 0.6, (d.max(), d.mean())
        # the palette moved onto the reference's: the channels' percentiles 1..99 came closer to its
        q = np.arange(1, 100)
        before, after = (
            np.abs(np.percentile(a, q, axis=(0, 1)) - np.percentile(ref_image, q, axis=(0, 1))).mean()
            for a in (tile, out)
        )
        assert after < 0.5 * before and after < 3.0, (before, after)


def _beer_lambert(
    tile: np.ndarray, w: np.ndarray, target: np.ndarray, scale: np.ndarray, io: float = 240.0
) -> np.ndarray:
    """The stain-jitter map in float64: unmix with ``w`` (rows: stains), scale, remix with ``target``."""
    od = -np.log((tile.reshape(-1, 3).astype(np.float64) + 1.0) / io)
    c = np.linalg.solve(w.T, od.T)  # concentrations, one row per stain
    out = io * np.exp(-(target.T @ (scale[:, None] * c)))
    return np.floor(np.minimum(out, 255.0)).T.reshape(tile.shape)


@pytest.mark.parametrize("stains", ["fit", "hed"])
def test_stain_jitter_at_fixed_parameters_is_the_beer_lambert_map(tiles, stains):
    scale = (1.25, 0.8)
    shift = ((0.05, -0.02, 0.0), (0.0, 0.03, -0.04))
    for tile in tiles[:3]:
        out = A.RandomStainJitter(stains=stains).apply(tile, scale=scale, shift=shift)
        w, _ = A.stain_matrix(tile, stains)
        if stains == "fit":  # the stains are Macenko's, fitted on the patch
            he, _, _ = macenko_stains(tile.reshape(-1, 3))
            np.testing.assert_allclose(w[:2], he.T)
        else:
            np.testing.assert_allclose(w, A.HED_STAINS)
        target = w.copy()
        moved = np.maximum(w[:2] + np.asarray(shift), 0.0)
        target[:2] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
        ref = _beer_lambert(tile, w, target, np.array([*scale, 1.0]))
        d = np.abs(out.astype(np.float64) - ref)
        # the method's 65536-entry tables quantize optical density; measured: max 1, under 2% of pixels
        assert d.max() <= 1 and np.mean(d > 0) < 0.05, (d.max(), np.mean(d > 0))


def test_stain_jitter_scales_the_concentrations(tiles):
    from vipsnorm.methods._stain import od_lut

    for tile in tiles[:3]:
        he, _, _ = macenko_stains(tile.reshape(-1, 3))
        unmix = np.linalg.pinv(he)  # the patch's own stain vectors, kept fixed
        before = unmix @ od_lut(240.0)[tile.reshape(-1, 3)].T
        out = A.stain_jitter(tile, scale=(1.3, 0.7), stains="fit")
        after = unmix @ od_lut(240.0)[out.reshape(-1, 3)].T
        for stain, factor in enumerate((1.3, 0.7)):
            stained = before[stain] > 0.3  # well above the quantization of a grey level
            ratio = np.median(after[stain, stained] / before[stain, stained])
            assert ratio == pytest.approx(factor, rel=0.02), (stain, ratio)


def test_stain_jitter_identity_and_what_it_cannot_unmix(tiles):
    tile = tiles[0]
    for stains in ("fit", "hed"):
        out = A.stain_jitter(tile, (1.0, 1.0), ((0, 0, 0), (0, 0, 0)), stains=stains)
        d = out.astype(np.int16) - tile
        assert d.min() >= 0 and d.max() <= 1  # Macenko's arithmetic: I -> I + 1 at most
    glass = np.full((64, 64, 3), 238, np.uint8)
    assert A.stain_jitter(glass, (1.5, 0.5), stains="fit") is glass  # nothing stained: unchanged
    grey = tile[..., 0]
    assert A.RandomStainJitter(seed=0)(grey) is grey


def test_macenko_params_with_three_stains_are_the_methods_map(tiles):
    """stain_jitter relies on Macenko's map being the same for three stain rows as for two."""
    tile = tiles[1]
    w, c = A.stain_matrix(tile, "fit")
    params = Macenko().fit(Sample.from_array(tile))
    m3 = MacenkoParams(he=tuple(map(tuple, w)), max_c=tuple(c), target_he=tuple(map(tuple, w)), target_max_c=tuple(c))
    np.testing.assert_allclose(m3.od_matrix(), np.eye(3), atol=1e-9)
    assert params.od_matrix().shape == (3, 3)


# --- random draws, probability, reproducibility ---------------------------------------------------


def test_draws_stay_inside_the_stated_ranges():
    rng = np.random.default_rng(0)
    stretch = A.RandomStretch(low=(1.0, 4.0), high=(96.0, 99.5))
    clahe = A.RandomClahe(clip_limit=(0.5, 3.0))
    jitter = A.RandomStainJitter(scale=(0.7, 1.4), shift=0.08)
    match = A.RandomHistogramMatch(
        [np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 9, np.uint8), np.eye(4, dtype=np.uint8)]
    )
    seen_refs = set()
    lows, highs, clips, scales, shifts = [], [], [], [], []
    for _ in range(2000):
        s = stretch.draw(rng)
        lows.append(s["low"])
        highs.append(s["high"])
        clips.append(clahe.draw(rng)["clip_limit"])
        j = jitter.draw(rng)
        scales += j["scale"]
        shifts += np.ravel(j["shift"]).tolist()
        seen_refs.add(match.draw(rng)["reference"])
    assert 1.0 <= min(lows) and max(lows) <= 4.0 and 96.0 <= min(highs) and max(highs) <= 99.5
    assert 0.5 <= min(clips) and max(clips) <= 3.0
    assert 0.7 <= min(scales) and max(scales) <= 1.4
    assert -0.08 <= min(shifts) and max(shifts) <= 0.08
    assert seen_refs == {0, 1, 2}
    # and they cover the ranges (uniform): the extreme 5% of each range are reached
    assert min(lows) < 1.15 and max(lows) > 3.85 and min(clips) < 0.63 and max(clips) > 2.87
    assert min(scales) < 0.735 and max(scales) > 1.365


def test_probability():
    image = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    assert all(A.RandomEqualization(p=0.0, seed=s)(image) is image for s in range(50))
    assert all(A.RandomEqualization(p=1.0, seed=s)(image) is not image for s in range(50))
    t = A.RandomEqualization(p=0.3, seed=0)
    applied = sum(t.draw(t.rng) is not None for _ in range(2000))
    assert 540 <= applied <= 660  # 2000 x 0.3 = 600, +-5.5 standard deviations


def test_seeded_runs_are_reproducible(tiles):
    def run(seed):
        t = A.Compose([A.RandomStainJitter(seed=seed), A.RandomClahe(seed=seed + 1), A.RandomStretch(seed=seed + 2)])
        return [t(tile) for tile in tiles[:3]]

    a, b, c = run(0), run(0), run(5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # an explicit generator replaces the transform's own: same generator state, same result
    t = A.Compose([A.RandomStainJitter(seed=1), A.RandomClahe(seed=2)])
    u = A.Compose([A.RandomStainJitter(seed=3), A.RandomClahe(seed=4)])
    x = t(tiles[0], rng=np.random.default_rng(7))
    y = u(tiles[0], rng=np.random.default_rng(7))
    np.testing.assert_array_equal(x, y)


def test_grey_and_flat_images_and_bad_inputs():
    grey = (np.arange(32 * 48) % 200).astype(np.uint8).reshape(32, 48)
    for t in (
        A.RandomStretch(),
        A.RandomEqualization(p=1),
        A.RandomClahe(),
        A.RandomHistogramMatch([grey], mode="luminance"),
    ):
        out = t(grey)
        assert out.shape == grey.shape and out.dtype == np.uint8
        out1 = t(grey[..., None])
        assert out1.shape == (32, 48, 1)
    flat = np.full((16, 16, 3), 77, np.uint8)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # no warning for a flat patch either
        np.testing.assert_array_equal(A.RandomStretch()(flat), flat)
        np.testing.assert_array_equal(A.RandomEqualization(p=1)(flat), flat)
    with pytest.raises(TypeError, match="uint8"):
        A.RandomClahe()(flat.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        A.RandomClahe()(np.zeros((4, 4, 4), np.uint8))
    for bad in (
        lambda: A.RandomStretch(low=(5, 1)),
        lambda: A.RandomStretch(low=(0, 60), high=(50, 100)),
        lambda: A.RandomClahe(clip_limit=-1),
        lambda: A.RandomEqualization(p=1.5),
        lambda: A.RandomEqualization(mode="hsv"),
        lambda: A.RandomStainJitter(scale=(0, 1)),
        lambda: A.RandomStainJitter(stains="vahadane"),
        lambda: A.RandomHistogramMatch([]),
    ):
        with pytest.raises(ValueError):
            bad()


def test_config_rebuilds_the_same_transform(tiles):
    for t in (
        A.RandomStretch(low=(1, 2), high=(97, 99), mode="rgb", p=0.7, seed=3),
        A.RandomEqualization(mode="rgb", p=0.4, seed=3),
        A.RandomClahe(clip_limit=(1, 2), grid=(4, 2), p=0.9, seed=3),
        A.RandomHistogramMatch(tiles[:2], p=0.8, seed=3),
        A.RandomStainJitter(scale=(0.9, 1.1), shift=0.02, stains="hed", seed=3),
    ):
        u = type(t)(**t.config())
        assert u.config() == t.config()
        for tile in tiles[2:4]:
            np.testing.assert_array_equal(t(tile), u(tile))


def test_plain_callables_in_torchvision_compose(tiles):
    torch = pytest.importorskip("torch")
    try:
        from torchvision import transforms
    except Exception as exc:  # not installed, or a build that does not match torch (CUDA wheel, CPU torch)
        pytest.skip(f"torchvision cannot be imported: {type(exc).__name__}: {exc}")
    pipeline = transforms.Compose([A.RandomClahe(seed=0), A.RandomStainJitter(seed=1), transforms.ToTensor()])
    x = pipeline(tiles[0])
    expected = A.RandomStainJitter(seed=1)(A.RandomClahe(seed=0)(tiles[0]))
    assert isinstance(x, torch.Tensor) and x.shape == (3, 256, 256)
    torch.testing.assert_close(x, torch.from_numpy(expected).permute(2, 0, 1).float() / 255)


# --- Keras layers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_layers():
    if "keras" not in __import__("sys").modules:
        os.environ.setdefault("KERAS_BACKEND", "torch")
    pytest.importorskip("keras")
    from vipsnorm.training import keras_layers

    return keras_layers


def test_keras_layers_train_only_configurable_serializable(keras_layers, tiles):
    import keras

    batch = np.stack(tiles[:4]).astype(np.float32) / 255.0
    layer = keras_layers.RandomClahe(clip_limit=(1.0, 3.0), grid=(4, 4), p=0.5, seed=11, value_range=(0, 1))
    # not training: the batch passes unchanged
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(batch, training=False)), batch)
    out = keras.ops.convert_to_numpy(layer(batch, training=True))
    # what the numpy augmentation gives on the quantized images, for the same draws
    twin = A.RandomClahe(clip_limit=(1.0, 3.0), grid=(4, 4), p=0.5, seed=11)
    applied = 0
    for image, result in zip(batch, out):
        params = twin.draw(twin.rng)
        if params is None:
            np.testing.assert_array_equal(result, image)  # skipped: bit for bit
            continue
        applied += 1
        expected = twin.apply(np.rint(image * 255).astype(np.uint8), **params).astype(np.float32) / 255
        np.testing.assert_allclose(result, expected, atol=1e-6)
    assert 0 < applied < 4  # seed 11 skips some images and augments the others: both paths checked
    # serializable: the config rebuilds the layer, and the same seed gives the same result
    config = keras.saving.serialize_keras_object(layer)
    again = keras.saving.deserialize_keras_object(config)
    assert type(again) is type(layer) and again.get_config()["clip_limit"] == [1.0, 3.0]
    fresh = keras_layers.RandomClahe.from_config(layer.get_config())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fresh(batch, training=True)), out)
    # called directly (a tf.data or PyDataset map), it augments, as Keras' own augmentation layers do
    direct = keras_layers.RandomClahe.from_config(layer.get_config())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(direct(batch)), out)


def test_stain_jitter_shift_is_one_number():
    with pytest.raises(ValueError, match="shift is one number"):
        A.RandomStainJitter(shift=(0.01, 0.05))


def test_every_keras_layer_round_trips(keras_layers, tiles):
    import keras

    batch = np.stack(tiles[:2])  # uint8 in 0..255
    for layer in (
        keras_layers.RandomStretch(seed=0),
        keras_layers.RandomEqualization(p=1.0, seed=0),
        keras_layers.RandomClahe(seed=0),
        keras_layers.RandomHistogramMatch([tiles[3]], seed=0),
        keras_layers.RandomStainJitter(stains="hed", seed=0),
    ):
        out = keras.ops.convert_to_numpy(layer(batch, training=True))
        assert out.shape == batch.shape and out.dtype == np.uint8 and not np.array_equal(out, batch)
        rebuilt = type(layer).from_config(layer.get_config())
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(rebuilt(batch, training=True)), out)
