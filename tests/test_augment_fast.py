"""The numpy fast paths of the augmentations and the LUT helpers are the plain computations bit for
bit: band-keyed counting and mapping (equalization per channel), OpenCV's clipped CLAHE LUTs in int32."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from vipsnorm.methods import Clahe, Equalize, Sample
from vipsnorm.methods._hist import STEP, apply_luts_array, band_keys, counts, keyed_counts, take_keyed
from vipsnorm.methods.clahe import _residual_bins, clahe_luts
from vipsnorm.training import augment as A


def _images():
    rng = np.random.default_rng(3)
    smooth = np.clip(rng.normal(150, 40, (256, 256, 3)), 0, 255).astype(np.uint8)
    yield smooth
    yield rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    yield rng.integers(0, 256, (STEP // 3 + 1, 2, 3), dtype=np.uint8)  # a step boundary inside a pixel run
    yield rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)
    yield rng.integers(0, 256, (257, 255, 3), dtype=np.uint8)
    yield smooth[::2, ::3]  # not contiguous
    yield np.asfortranarray(smooth)
    yield np.full((64, 64, 3), 7, np.uint8)  # flat
    yield np.stack([np.full((33, 40), 9, np.uint8), np.full((33, 40), 9, np.uint8), smooth[:33, :40, 2]], -1)
    yield np.repeat(smooth[..., :1], 3, axis=-1)  # grey in three bands


@pytest.mark.parametrize("index", range(10))
def test_band_keys_count_and_map_each_band(index):
    image = list(_images())[index]
    keys = band_keys(image)
    np.testing.assert_array_equal(keyed_counts(keys), np.stack([counts(image[..., b]) for b in range(3)]))
    luts = np.random.default_rng(index).integers(0, 256, (3, 256)).astype(np.uint8)
    mapped = take_keyed(luts, keys, image.shape)
    np.testing.assert_array_equal(mapped, np.stack([luts[b][image[..., b]] for b in range(3)], axis=-1))
    np.testing.assert_array_equal(apply_luts_array(image, luts, "rgb"), mapped)


@pytest.mark.parametrize("mode", ["rgb", "luminance"])
def test_equalize_fast_path_is_the_method(mode):
    rng = np.random.default_rng(0)
    for image in [*_images(), rng.integers(0, 256, (40, 30), dtype=np.uint8), np.full((8, 8, 1), 3, np.uint8)]:
        method = Equalize(mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            expected = method.apply_array(image, method.fit(Sample.from_array(image)))
            fitted = method.fit_apply_array(image)
        out = A.equalize(image, mode)
        assert out.shape == image.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(out, fitted)


def _clahe_luts_int64(hist, clip_limit, area):
    """The LUTs as first written: int64 counts, the excess as the sum of what exceeds the clip."""
    h = np.array(hist, dtype=np.int64).reshape(-1, 256)
    if clip_limit > 0:
        clip = max(int(clip_limit * area / 256), 1)
        excess = np.maximum(h - clip, 0).sum(axis=-1)
        np.minimum(h, clip, out=h)
        batch, residual = np.divmod(excess, 256)
        h += batch[:, np.newaxis]
        h += _residual_bins()[residual]
    lut = np.cumsum(h, axis=-1).astype(np.float32) * (np.float32(255) / np.float32(area))
    return np.clip(np.rint(lut), 0, 255).astype(np.uint8).reshape(np.shape(hist))


@pytest.mark.parametrize("area", [1, 16, 1024, 4096, 65536])
def test_clahe_luts_equal_the_int64_computation(area):
    rng = np.random.default_rng(area)
    regions = 300  # more than one step of regions
    hist = np.stack([np.bincount(rng.integers(0, rng.integers(1, 257), area), minlength=256) for _ in range(regions)])
    hist[0] = 0
    hist[0, 17] = area  # a flat region
    for clip_limit in (0.0, 0.3, 1.0, 2.0, 4.0, 40.0):
        np.testing.assert_array_equal(clahe_luts(hist, clip_limit, area), _clahe_luts_int64(hist, clip_limit, area))
        np.testing.assert_array_equal(
            clahe_luts(hist.reshape(3, 10, 10, 256), clip_limit, area),
            _clahe_luts_int64(hist, clip_limit, area).reshape(3, 10, 10, 256),
        )
    scaled = hist * (1.0 + rng.random((regions, 1)) * 1e-3)  # float counts (a reduced fit), truncated
    np.testing.assert_array_equal(clahe_luts(scaled, 2.0, area), _clahe_luts_int64(scaled, 2.0, area))


@pytest.mark.parametrize("mode", ["rgb", "luminance"])
def test_clahe_augmentation_is_fit_then_apply(mode):
    for image in _images():
        for grid in [(8, 8), (3, 5)]:
            method = Clahe(2.0, grid=grid, mode=mode)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                expected = method.apply_array(image, method.fit_array(image))
            np.testing.assert_array_equal(A.clahe(image, 2.0, grid, mode), expected)
