"""Stain normalization (reinhard, macenko) at four levels: hand-computed cases, invariants, named
references (the published Macenko output, torchstain), pyvips == numpy; and degenerate inputs."""

from __future__ import annotations

import dataclasses
import json

import sys

import numpy as np
import pytest
import pyvips

from vipsnorm.errors import (
    InvalidReferenceError,
    NoTissueError,
    StainSeparationError,
    UnsupportedImageError,
    VipsnormError,
)
from vipsnorm.methods import Sample
from vipsnorm.methods._stain import HE_REF, MAX_C_REF, od_lut, rgb_to_lab
from vipsnorm.methods.stain import (
    Macenko,
    MacenkoParams,
    MacenkoTarget,
    Reinhard,
    ReinhardParams,
    ReinhardTarget,
    _extreme_directions,
    _order_he,
    macenko_stains,
    stain_summary,
)

H = np.array([0.65, 0.70, 0.29])  # Ruifrok & Johnston's hematoxylin and eosin OD vectors
E = np.array([0.07, 0.99, 0.11])
H, E = H / np.linalg.norm(H), E / np.linalg.norm(E)

#: Real H&E tiles of the shared data (RGBA ones are flattened on white).
TILES = [
    "torchstain-source.png",
    "torchstain-target.png",
    "kather-template.jpg",
    "histolab-target.png",
    "histolab-source-low.png",
    "histolab-source-medium.png",
]


def _tile(shared_data, name: str) -> np.ndarray:
    image = pyvips.Image.new_from_file(str(shared_data / "tiles" / name))
    if image.bands == 4:
        image = image.flatten(background=[255, 255, 255])
    return image.numpy()


def _synthetic(h_share: float = 0.5, n: int = 128, seed: int = 0, stains=(H, E), noise: float = 1.0) -> np.ndarray:
    """An ``n x n`` image of pixels mixing two stains (Beer-Lambert, Io = 240) on some glass."""
    rng = np.random.default_rng(seed)
    count = n * n
    is_h = rng.random(count) < h_share
    c = np.zeros((count, 2))
    c[is_h, 0] = rng.gamma(4, 0.3, is_h.sum())
    c[is_h, 1] = rng.gamma(2, 0.1, is_h.sum())
    c[~is_h, 1] = rng.gamma(4, 0.25, (~is_h).sum())
    c[~is_h, 0] = rng.gamma(2, 0.05, (~is_h).sum())
    c[rng.random(count) < 0.2] = 0  # glass
    od = c @ np.stack(stains)
    pixels = 240 * np.exp(-od) - 1 + rng.normal(0, noise, (count, 3))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).reshape(n, n, 3)


#: A Reinhard target for tests that need any (a pinkish-purple H&E palette).
PALETTE = ReinhardTarget(mean=(60.0, 25.0, -10.0), std=(15.0, 8.0, 6.0))


def _both(method, array, params):
    """apply_array and apply on the same pixels; they must agree."""
    ours = method.apply_array(array, params)
    lazy = method.apply(pyvips.Image.new_from_array(array), params).numpy()
    np.testing.assert_array_equal(ours, lazy)
    return ours


@pytest.fixture(scope="module")
def kather_reinhard(shared_data):
    return Reinhard().fit_target([Sample.from_array(_tile(shared_data, "kather-template.jpg"))])


# --- hand-computed cases -------------------------------------------------------------------------


def test_od_lut_hand_computed():
    od = od_lut(240)
    assert od[239] == 0.0  # (239 + 1) / 240 = 1
    assert od[255] == pytest.approx(-np.log(256 / 240))
    assert od[0] == pytest.approx(np.log(240))


def test_lab_matches_skimage():
    from skimage.color import rgb2lab

    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(rgb_to_lab(rgb), rgb2lab(rgb), atol=1e-9)


def test_macenko_od_matrix_hand_computed():
    target = np.array(HE_REF)
    p = MacenkoParams(he=tuple(map(tuple, target.T)), max_c=(1.0, 1.0), target_he=tuple(map(tuple, target.T)),
                      target_max_c=(2.0, 2.0))
    # the same stains, concentrations doubled: M = 2 T pinv(T), the double of a projection
    np.testing.assert_allclose(p.od_matrix(), 2 * target @ np.linalg.pinv(target), atol=1e-12)
    # a pixel on the stain plane: OD doubles, output = floor(Io exp(-2 OD))
    od = target @ np.array([0.3, 0.2])
    pixel = np.floor(240 * np.exp(-od)).astype(np.uint8)  # 150, 125, 150ish
    od_in = od_lut(240)[pixel]
    expected = np.floor(np.minimum(240 * np.exp(-p.od_matrix() @ od_in), 255))
    got = _both(Macenko(), pixel.reshape(1, 1, 3), p)[0, 0]
    assert np.abs(got - expected).max() <= 1  # the exp table quantizes OD to 1e-4


def test_reinhard_hand_computed():
    from skimage.color import lab2rgb

    two = np.array([[[200, 100, 150], [120, 60, 160]]], dtype=np.uint8)
    lab = rgb_to_lab(two.reshape(-1, 3))
    mean, std = lab.mean(axis=0), lab.std(axis=0)  # each channel: two values, std = half the gap
    target = ReinhardTarget(mean=(50.0, 20.0, -10.0), std=(10.0, 5.0, 4.0))
    p = ReinhardParams(mean=tuple(mean), std=tuple(std), target_mean=target.mean, target_std=target.std, glass=None)
    out = _both(Reinhard(target, glass=None), two, p)
    expected_lab = (lab - mean) / std * np.array(target.std) + np.array(target.mean)
    # +-1 std around the target mean, i.e. L 40 and 60
    np.testing.assert_allclose(expected_lab[:, 0], [60.0, 40.0])
    expected = np.floor(lab2rgb(expected_lab[np.newaxis]) * 255 + 0.5)[0]
    assert np.abs(out[0].astype(int) - expected).max() <= 1


# --- references ----------------------------------------------------------------------------------


def test_macenko_reproduces_published_output(shared_data):
    """The canonical Macenko output of henorm-example1.png (fitted on itself, canonical target).
    Measured: mean absolute difference 0.017 grey levels, worst pixel 1 level (the reference sets values
    above 255 to 254, we clip at 255)."""
    img = _tile(shared_data, "henorm-example1.png")
    ref = _tile(shared_data, "henorm-example1-macenko.png")[..., :3]
    method = Macenko()
    out = _both(method, img, method.fit(Sample.from_array(img)))
    diff = np.abs(out.astype(int) - ref)
    assert diff.mean() < 0.05  # goal: <= 1
    assert diff.max() <= 1


@pytest.mark.parametrize("name", TILES)
def test_macenko_matches_torchstain(shared_data, name):
    torchstain = pytest.importorskip("torchstain")
    img = _tile(shared_data, name)
    method = Macenko()
    ours = _both(method, img, method.fit(Sample.from_array(img)))
    ref, _, _ = torchstain.normalizers.MacenkoNormalizer(backend="numpy").normalize(img, stains=False)
    diff = np.abs(ours.astype(int) - ref)
    # both truncate the same float; ours goes through a 65536-entry exp table
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.01


def test_macenko_fitted_target_matches_torchstain(shared_data):
    torchstain = pytest.importorskip("torchstain")
    src, tgt = _tile(shared_data, "torchstain-source.png"), _tile(shared_data, "torchstain-target.png")
    target = Macenko().fit_target([Sample.from_array(tgt)])
    method = Macenko(target)
    ours = _both(method, src, method.fit(Sample.from_array(src)))
    normalizer = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    normalizer.fit(tgt)
    np.testing.assert_allclose(np.array(target.he).T, normalizer.HERef, atol=1e-9)
    np.testing.assert_allclose(target.max_c, normalizer.maxCRef, rtol=1e-9)
    ref, _, _ = normalizer.normalize(src, stains=False)
    diff = np.abs(ours.astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize("name", TILES)
def test_reinhard_matches_torchstain(shared_data, name):
    """Plain Reinhard (no glass protection) against torchstain's numpy backend, kather-template as the
    target: the same CIELAB statistics; outputs differ by rounding (torchstain truncates)."""
    torchstain = pytest.importorskip("torchstain")
    tgt, img = _tile(shared_data, "kather-template.jpg"), _tile(shared_data, name)
    target = Reinhard(glass=None).fit_target([Sample.from_array(tgt)])
    method = Reinhard(target, glass=None)
    ours = _both(method, img, method.fit(Sample.from_array(img)))
    normalizer = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
    normalizer.fit(tgt)
    np.testing.assert_allclose(target.mean, normalizer.target_means, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(target.std, normalizer.target_stds, rtol=1e-5)
    ref = normalizer.normalize(img)
    diff = ours.astype(int) - ref
    assert diff.min() >= 0 and diff.max() <= 1  # round vs truncate


# --- invariants ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [Macenko(), Reinhard(PALETTE)])
def test_pure_white_stays_white(shared_data, method):
    img = _tile(shared_data, "torchstain-source.png").copy()
    img[:8, :8] = 255
    out = _both(method, img, method.fit(Sample.from_array(img)))
    assert (out[:8, :8] == 255).all()


def test_reinhard_glass_protection(shared_data, kather_reinhard):
    """Plain Reinhard tints glass; with protection, pixels at or above the high level are untouched
    and tissue is fully normalized."""
    img = _tile(shared_data, "histolab-source-medium.png")
    protected = Reinhard(kather_reinhard)
    out = _both(protected, img, p := protected.fit(Sample.from_array(img)))
    low, high = p.glass
    assert 228 <= high <= 240 and low == high - 35  # just below the tile's glass
    out_plain = protected.apply_array(img, dataclasses.replace(p, glass=None))  # the same map on every pixel
    glass = img.min(axis=-1) >= high
    tissue = img.min(axis=-1) <= low
    assert glass.mean() > 0.02 and tissue.mean() > 0.2
    np.testing.assert_array_equal(out[glass], img[glass])
    np.testing.assert_array_equal(out[tissue], out_plain[tissue])
    assert np.abs(out_plain[glass].astype(int) - img[glass]).mean() > 5  # what it protects from
    # the statistics are those of the tissue (darkest channel below high): mapped, they are the target's
    lab = rgb_to_lab(out_plain[img.min(axis=-1) < high])
    np.testing.assert_allclose(lab.mean(axis=0), kather_reinhard.mean, atol=1.0)
    np.testing.assert_allclose(lab.std(axis=0), kather_reinhard.std, atol=1.0)


def test_reinhard_glass_levels_follow_the_slide_glass():
    img = _synthetic()
    sample = Sample.from_array(img)
    slide_sample = Sample(sample.hist, 3, "slide", background=(228.0, 226.0, 230.0, 227.0), pixels=sample.pixels)
    target = PALETTE
    level = np.percentile(img.min(axis=-1), 99)  # a tile: its brightest 1 % is the glass
    assert Reinhard(target).fit(sample).glass == (level - 45, level - 10)
    assert Reinhard(target).fit(slide_sample).glass == (181.0, 216.0)  # 10 below its glass's darkest channel
    assert Reinhard(target, glass=(10, 20)).fit(slide_sample).glass == (10.0, 20.0)


def test_reinhard_self_target_is_identity(shared_data):
    img = _tile(shared_data, "histolab-target.png")
    target = Reinhard().fit_target([Sample.from_array(img)])
    method = Reinhard(target)
    out = _both(method, img, method.fit(Sample.from_array(img)))
    assert np.abs(out.astype(int) - img).max() <= 1


def test_macenko_self_target_is_near_identity(shared_data):
    """Fitted on itself, Macenko projects each pixel's OD on the stain plane: tissue changes only by its
    OD residual off that plane."""
    img = _tile(shared_data, "kather-template.jpg")
    target = Macenko().fit_target([Sample.from_array(img)])
    method = Macenko(target)
    out = _both(method, img, method.fit(Sample.from_array(img)))
    diff = np.abs(out.astype(int) - img)
    assert diff.mean() < 2.5
    assert np.median(diff) <= 2


def test_apply_array_equals_apply_on_noise():
    """Every colour, not just H&E: the pyvips path and the numpy twin agree bit for bit."""
    noise = np.random.default_rng(3).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    img = _synthetic()
    for method, params in [
        (Macenko(), Macenko().fit(Sample.from_array(img))),
        (Reinhard(), Reinhard(PALETTE).fit(Sample.from_array(img))),
    ]:
        _both(method, noise, params)


def test_apply_is_lazy():
    """A 100k x 100k virtual image: building the pipeline and reading one corner costs nothing."""
    big = (pyvips.Image.black(100_000, 100_000, bands=3) + [180, 120, 170]).cast("uchar")
    img = _synthetic()
    for method in (Macenko(), Reinhard(PALETTE)):
        out = method.apply(big, method.fit(Sample.from_array(img)))
        assert (out.width, out.height, out.bands, out.format) == (100_000, 100_000, 3, "uchar")
        corner = out.crop(0, 0, 64, 64).numpy()
        assert corner.shape == (64, 64, 3)


OTHER_TARGET = MacenkoTarget(he=((0.6, 0.7, 0.4), (0.2, 0.8, 0.5)), max_c=(1.5, 1.2))


@pytest.mark.parametrize("method", [Macenko(), Macenko(OTHER_TARGET)])
def test_macenko_params_json_round_trip(method):
    img = _synthetic()
    params = method.fit(Sample.from_array(img))
    again = MacenkoParams.from_dict(json.loads(params.to_json()))
    assert again == params
    np.testing.assert_array_equal(method.apply_array(img, again), method.apply_array(img, params))
    target = MacenkoTarget.from_dict(json.loads(method.target.to_json()))
    assert target == method.target


def test_reinhard_params_json_round_trip():
    img = _synthetic()
    target = Reinhard().fit_target([Sample.from_array(img)])
    assert ReinhardTarget.from_dict(json.loads(target.to_json())) == target
    for glass in [(205.0, 240.0), None, "auto"]:
        params = Reinhard(target, glass=glass).fit(Sample.from_array(_synthetic(seed=1)))
        assert ReinhardParams.from_dict(json.loads(params.to_json())) == params


def test_hematoxylin_is_found_whatever_the_angle_order():
    """The two extreme directions come out in an order that depends on the arbitrary sign of an
    eigenvector; a naive "first is H" would swap the stains. Ours does not."""
    img = _synthetic(0.5)
    od = od_lut(240)[img.reshape(-1, 3)]
    odhat = od[(od >= 0.15).all(axis=1)]
    _, vectors = np.linalg.eigh(np.cov(odhat.T))
    plane = vectors[:, 1:3]
    flipped = plane * [-1, 1]
    a1, b1 = _extreme_directions(odhat, plane, 1)
    a2, b2 = _extreme_directions(odhat, flipped, 1)
    assert a1 @ a2 < 0.99  # the naive order flips
    np.testing.assert_allclose(_order_he(a1, b1), _order_he(a2, b2), atol=1e-9)


@pytest.mark.parametrize("h_share", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_macenko_recovers_known_stains(h_share, seed):
    he, max_c, _ = macenko_stains(_synthetic(h_share, seed=seed).reshape(-1, 3))
    assert he[:, 0] @ H > 0.98 and he[:, 1] @ E > 0.98  # never swapped
    assert np.all(max_c > 0)


def test_fit_target_is_the_median():
    samples = [Sample.from_array(_synthetic(s, seed=i)) for i, s in enumerate([0.3, 0.5, 0.7])]
    fits = [macenko_stains(s.pixels) for s in samples]
    target = Macenko().fit_target(samples)
    he = np.median([f[0] for f in fits], axis=0)
    np.testing.assert_allclose(np.array(target.he).T, he / np.linalg.norm(he, axis=0), atol=1e-12)
    np.testing.assert_allclose(target.max_c, np.median([f[1] for f in fits], axis=0), atol=1e-12)
    assert np.allclose(np.linalg.norm(target.he, axis=1), 1)
    rt = Reinhard().fit_target(samples)
    labs = []
    for s in samples:
        darkest = s.pixels.min(axis=1)
        labs.append(rgb_to_lab(s.pixels[darkest < np.percentile(darkest, 99) - 10]))
    np.testing.assert_allclose(rt.mean, np.median([lab.mean(axis=0) for lab in labs], axis=0), atol=1e-9)
    np.testing.assert_allclose(rt.std, np.median([lab.std(axis=0) for lab in labs], axis=0), atol=1e-9)


def test_canonical_target_and_summary():
    method = Macenko()
    assert np.array(method.target.he).T.tolist() == [list(r) for r in HE_REF]
    assert method.target.max_c == MAX_C_REF
    summary = stain_summary(method.fit(Sample.from_array(_synthetic())))
    assert set(summary) >= {"hematoxylin", "eosin", "max_concentrations", "target"}
    json.dumps(summary)
    summary = stain_summary(Reinhard(PALETTE).fit(Sample.from_array(_synthetic())))
    assert summary["target"]["lab_mean"] == [60.0, 25.0, -10.0]


# --- errors and degenerate inputs ----------------------------------------------------------------


def test_reinhard_needs_a_target():
    with pytest.raises(InvalidReferenceError, match="method 'reinhard' needs --reference"):
        Reinhard().fit(Sample.from_array(_synthetic()))


@pytest.mark.parametrize("method", [Macenko(), Reinhard(PALETTE)])
def test_grey_input_is_refused(method):
    grey = np.full((32, 32), 128, np.uint8)
    with pytest.raises(UnsupportedImageError, match="needs a colour"):
        method.fit(Sample.from_array(grey))
    params = method.fit(Sample.from_array(_synthetic()))
    with pytest.raises(UnsupportedImageError, match="needs a colour"):
        method.apply(pyvips.Image.new_from_array(grey), params)
    with pytest.raises(UnsupportedImageError, match="needs a colour"):
        method.apply_array(grey, params)


def test_sample_without_pixels_is_refused():
    sample = Sample(Sample.from_array(_synthetic()).hist)
    with pytest.raises(ValueError, match="pixel colours"):
        Macenko().fit(sample)


def _white(n=64):
    return np.full((n, n, 3), 255, np.uint8)


def _few_stained(count=50):
    img = _white()
    img.reshape(-1, 3)[:count] = [120, 60, 140]
    return img


DEGENERATE = {
    "all white": (_white(), NoTissueError, NoTissueError),
    "too few tissue pixels": (_few_stained(), NoTissueError, NoTissueError),
    # black is grey: Reinhard would only shift it to the target's mean colour
    "blank black tile": (np.zeros((64, 64, 3), np.uint8), StainSeparationError, UnsupportedImageError),
    "eosin only": (_synthetic(0.0, stains=(E, E)), StainSeparationError, None),
}


@pytest.mark.parametrize("case", DEGENERATE)
def test_degenerate_inputs(case):
    img, macenko_error, reinhard_error = DEGENERATE[case]
    sample = Sample.from_array(img)
    with pytest.raises(macenko_error) as info:
        Macenko().fit(sample)
    assert isinstance(info.value, VipsnormError) and info.value.path is None
    with pytest.raises(macenko_error):
        Macenko().fit_target([sample])
    target = PALETTE
    if reinhard_error is not None:
        with pytest.raises(reinhard_error):
            Reinhard(target).fit(sample)
        with pytest.raises(reinhard_error):
            Reinhard().fit_target([sample])
    else:  # documented fallback: a channel without spread is shifted, not scaled; no NaN
        params = Reinhard(target).fit(sample)
        assert np.all(np.isfinite(params.std)) and np.all(np.isfinite(Reinhard().fit_target([sample]).mean))
        out = _both(Reinhard(target), img, params)
        assert out.dtype == np.uint8


def test_eosin_only_message():
    with pytest.raises(StainSeparationError, match="one stain only"):
        Macenko().fit(Sample.from_array(_synthetic(0.0, stains=(E, E))))


def _run_array_reference(array, steps):
    """:func:`run_array` as first written: every step on the stacked bands, in its plain order."""
    from vipsnorm.methods._stain import N16, ColumnMix, Lut, PairSum, Recomb

    x = array
    for step in steps:
        if isinstance(step, ColumnMix):
            x = np.stack([step.diagonal[k][x[..., k]] + step.column[k][x[..., step.source]] for k in range(3)], axis=-1)
        elif isinstance(step, PairSum):
            pair = x[..., 0].astype(np.int64) + 256 * x[..., 1].astype(np.int64)
            if sys.byteorder == "big":
                pair = 256 * x[..., 0].astype(np.int64) + x[..., 1].astype(np.int64)
            x = np.stack([step.rg[k][pair] + step.b[k][x[..., 2]] for k in range(3)], axis=-1)
        elif isinstance(step, Lut):
            t = step.table
            x = t[0][x] if t.shape[0] == 1 else np.stack([t[b][x[..., b]] for b in range(3)], axis=-1)
        elif isinstance(step, Recomb):
            m = step.matrix
            x64 = [x[..., b].astype(np.float64) for b in range(3)]
            x = np.stack([(m[r, 0] * x64[0] + m[r, 1] * x64[1]) + m[r, 2] * x64[2] for r in range(3)], axis=-1)
            x = x.astype(np.float32)
        else:
            x = np.clip(np.trunc(x), 0, N16 - 1).astype(np.uint16)
    return x


def test_run_array_equals_the_plain_pipeline(shared_data):
    from vipsnorm.methods._stain import Lut, Recomb, ToIndex, run_array

    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, (150, 130, 3), dtype=np.uint8)  # more pixels than one step
    params = Macenko().fit(Sample.from_array(_tile(shared_data, TILES[0])))
    rein = Reinhard(Reinhard().fit_target([Sample.from_array(_tile(shared_data, TILES[1]))]), glass=None)
    wild = [  # far below 0 and above 65535 before ToIndex, some rounded up to an integer by float32
        Lut(rng.normal(0, 3e4, (3, 256)).astype(np.float32)),
        Recomb(rng.normal(0, 2.0, (3, 3))),
        ToIndex(),
        Lut(rng.integers(0, 256, (1, 65536)).astype(np.uint8)),
    ]
    for steps in (params.steps(), rein.fit(Sample.from_array(image)).steps(), wild, wild[:2], wild[:1]):
        np.testing.assert_array_equal(run_array(image, steps), _run_array_reference(image, steps))


def test_pair_sum_is_the_table_and_matrix_it_replaces():
    """PairSum on every (R, G) pair (with B cycling through all 256 values) equals ``Lut`` + ``Recomb``
    up to float32 rounding, and the libvips and numpy paths agree bit for bit, ToIndex included."""
    from vipsnorm.methods._stain import Lut, PairSum, Recomb, ToIndex, pair_sum, run_array, run_image

    rng = np.random.default_rng(5)
    r, g = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    b = (np.arange(256 * 256) % 256).astype(np.uint8).reshape(256, 256)[:, ::-1]
    image = np.stack([r, g, b], axis=-1)
    for table in (rng.normal(0, 3e4, (3, 256)), rng.normal(0, 1.0, (1, 256)), od_lut(240.0)[np.newaxis]):
        table = table.astype(np.float32)
        matrix = rng.normal(0, 2.0, (3, 3))
        fused = pair_sum(table, matrix)
        assert isinstance(fused, PairSum) and fused.rg.shape == (3, 65536) and fused.b.shape == (3, 256)
        plain = run_array(image, [Lut(table), Recomb(matrix)]).astype(np.float64)
        got = run_array(image, [fused])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
        lazy = run_image(pyvips.Image.new_from_array(image), [fused]).numpy()
        np.testing.assert_array_equal(lazy, got)
        indexed = [fused, ToIndex()]
        np.testing.assert_array_equal(
            run_image(pyvips.Image.new_from_array(image), indexed).numpy(), run_array(image, indexed)
        )
    with pytest.raises(ValueError, match="uchar RGB"):
        run_image(pyvips.Image.new_from_array(image[..., :1].copy()), [fused])


def test_pair_sum_numpy_path_without_the_table_is_the_table():
    """A small array is mapped by adding the two terms per pixel, without building the 65536-entry
    table (stain jitter makes a fit per patch); a large one through the table: the same float32 values,
    bit for bit, on every (R, G) pair."""
    from vipsnorm.methods._stain import _PAIR_TABLE_PIXELS, pair_sum, run_array

    rng = np.random.default_rng(8)
    r, g = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    image = np.stack([r, g, rng.integers(0, 256, (256, 256), dtype=np.uint8)], axis=-1)
    table, matrix = rng.normal(0, 3e4, (3, 256)).astype(np.float32), rng.normal(0, 2.0, (3, 3))
    small = pair_sum(table, matrix)
    per_pixel = np.concatenate([run_array(image[i : i + 16], [small]) for i in range(0, 256, 16)])
    assert "rg" not in small.__dict__  # never built
    assert 256 * 256 < _PAIR_TABLE_PIXELS
    big = pair_sum(table, matrix)
    big.rg  # built: the numpy path then reads it
    np.testing.assert_array_equal(run_array(image, [big]), per_pixel)
    large = np.tile(image, (5, 1, 1))  # above _PAIR_TABLE_PIXELS: builds the table
    assert large.shape[0] * large.shape[1] >= _PAIR_TABLE_PIXELS
    fresh = pair_sum(table, matrix)
    np.testing.assert_array_equal(run_array(large, [fresh])[:256], per_pixel)
    assert "rg" in fresh.__dict__


def test_column_mix_is_the_table_and_matrix_it_replaces():
    """ColumnMix equals Lut + Recomb up to float32 rounding, the libvips and numpy paths agree bit for
    bit, and Reinhard's written-out Lab map is K^-1 diag(scale) K."""
    from vipsnorm.methods._stain import LAB_K, ColumnMix, Lut, Recomb, ToIndex, column_mix, run_array, run_image

    rng = np.random.default_rng(6)
    image = rng.integers(0, 65536, (90, 70, 3)).astype(np.uint16)
    table = rng.normal(0, 1.0, (3, 65536)).astype(np.float32)
    for source in range(3):
        matrix = np.diag(rng.normal(0, 3e4, 3))
        matrix[[k for k in range(3) if k != source], source] = rng.normal(0, 3e4, 2)
        mix = column_mix(table, matrix)
        assert isinstance(mix, ColumnMix) and mix.source == source and not mix.column[source].any()
        plain = run_array(image, [Lut(table), Recomb(matrix)]).astype(np.float64)
        got = run_array(image, [mix])
        np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
        lazy = run_image(pyvips.Image.new_from_array(image), [mix, ToIndex()]).numpy()
        np.testing.assert_array_equal(lazy, run_array(image, [mix, ToIndex()]))
    np.testing.assert_array_equal(column_mix(table, np.eye(3) * 2).diagonal, (2.0 * table).astype(np.float32))
    with pytest.raises(ValueError, match="more than one column"):
        column_mix(table, np.ones((3, 3)))
    rein = Reinhard(Reinhard().fit_target([Sample.from_array(image[..., :3].astype(np.uint8) // 2 + 60)]), glass=None)
    params = rein.fit(Sample.from_array(image.astype(np.uint8)))
    scale, _ = params.lab_map()
    assert any(isinstance(step, ColumnMix) for step in params.steps())
    s_l, s_a, s_b = scale
    written = np.array([[s_a, s_l - s_a, 0.0], [0.0, s_l, 0.0], [0.0, s_l - s_b, s_b]])
    np.testing.assert_allclose(written, np.linalg.solve(LAB_K, np.diag(scale) @ LAB_K), atol=1e-12)


def test_output_table_is_the_formula_at_every_index():
    from vipsnorm.methods.stain import N16, _output_table

    j = np.arange(N16)[np.newaxis, :] + 0.5
    for io, scale, offset in [(240.0, 11200.0, 0.06), (255.0, 11500.0, 0.0), (200.0, 1e6, 0.4), (37.0, 15000.0, 1.7),
                              (0.5, -9000.0, 0.1)]:  # (the last: no staircase, every entry computed)
        expected = np.floor(np.minimum(io * np.exp(-(j / np.array([[scale]]) - offset)), 255.0)).astype(np.uint8)[0]
        np.testing.assert_array_equal(_output_table(io, scale, offset), expected)


def test_eosin_only_strong_staining_is_one_stain_not_glass():
    # eosin alone leaves red almost clear: its pixels fail Macenko's every-channel OD threshold, which
    # must not read as a blank slide
    rng = np.random.default_rng(3)
    c = rng.uniform(0.2, 1.5, (128, 128))
    img = np.clip(240 * np.exp(-c[..., None] * E) + rng.normal(0, 1.5, (128, 128, 3)), 0, 255).astype(np.uint8)
    with pytest.raises(StainSeparationError, match="one stain only"):
        Macenko().fit(Sample.from_array(img))


def _pale_tile():
    # tissue by the count (darkest channel 195-204 < 205) but all of it above glass protection's level
    rng = np.random.default_rng(0)
    channels = [rng.integers(195, 205, (64, 64)), rng.integers(215, 235, (64, 64)), rng.integers(225, 245, (64, 64))]
    return np.stack(channels, -1).astype(np.uint8)


def test_reinhard_pale_tile_is_no_tissue_not_nan():
    sample = Sample.from_array(_pale_tile())
    with pytest.raises(NoTissueError, match="too pale"):
        Reinhard(PALETTE).fit(sample)
    with pytest.raises(NoTissueError, match="too pale"):
        Reinhard().fit_target([sample])
    params = Reinhard(PALETTE, glass=None).fit(sample)  # without glass protection every pixel counts
    assert np.all(np.isfinite(params.mean)) and np.all(np.isfinite(params.std))


def test_reinhard_refuses_grey_stored_as_rgb():
    grey = _synthetic()[..., 1]
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=-1)
    with pytest.raises(UnsupportedImageError, match="grey stored as RGB"):
        Reinhard(PALETTE).fit(Sample.from_array(rgb))
    with pytest.raises(UnsupportedImageError, match="grey stored as RGB"):  # nor a target that would take colour out
        Reinhard().fit_target([Sample.from_array(rgb)])


def test_params_json_with_nan_is_refused(tmp_path):
    from vipsnorm.reference import Reference, load_reference_json, save_reference

    params = Reinhard(PALETTE).fit(Sample.from_array(_synthetic()))
    bad = dataclasses.replace(params, mean=(float("nan"), 0.0, 0.0))
    assert params.is_finite() and not bad.is_finite()
    with pytest.raises(InvalidReferenceError, match="not finite"):
        save_reference(Reference(params=bad), tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
    data = json.loads(params.to_json())
    data["std"][1] = float("inf")
    (tmp_path / "inf.json").write_text(json.dumps({"kind": "params", "params": data}))
    with pytest.raises(InvalidReferenceError, match="not a finite number"):
        load_reference_json(tmp_path / "inf.json")


def test_reference_image_errors_name_the_reference(tmp_path):
    from vipsnorm.engine import load_reference

    grey = np.repeat(_synthetic()[..., 1:2], 3, axis=-1)
    path = tmp_path / "grey-reference.png"
    pyvips.Image.new_from_array(grey).copy(interpretation="srgb").pngsave(str(path))
    with pytest.raises(UnsupportedImageError, match="grey stored as RGB") as info:
        load_reference(path, "reinhard")
    assert str(info.value.path) == str(path)


def test_a_colour_image_mostly_glass_is_not_taken_for_grey():
    # 300 stained pixels on clean grey glass: the grey check looks at what could be tissue only
    img = np.full((600, 600, 3), 242, np.uint8)
    stained = _synthetic(n=128)[..., :3].reshape(-1, 3)
    stained = stained[stained.min(axis=1) < 180][:300]
    img.reshape(-1, 3)[: stained.shape[0]] = stained
    params = Reinhard(PALETTE).fit(Sample.from_array(img))
    assert np.all(np.isfinite(params.std)) and params.std[1] > 1


@pytest.mark.parametrize("colour_share", [0.0, 0.0005, 0.0009, 0.00095, 0.001, 0.0011, 0.002])
def test_grey_check_is_the_99_9th_percentile_of_the_channel_spread(colour_share):
    # the check counts the spreads of the stained pixels (0..255) instead of np.percentile over them:
    # the same decision on either side of the threshold
    from vipsnorm.methods.stain import GREY_SPREAD, _tissue

    rng = np.random.default_rng(3)
    n = 20_000
    grey = rng.integers(60, 200, n).astype(np.uint8)
    pixels = np.stack([grey, grey + rng.integers(0, GREY_SPREAD + 1, n).astype(np.uint8), grey], axis=1)
    coloured = rng.choice(n, int(round(colour_share * n)), replace=False)
    pixels[coloured, 0] -= 40  # a reddish few
    pixels = np.concatenate([pixels, np.full((500, 3), 240, np.uint8)])  # and glass, not counted
    darkest = pixels.min(axis=1)
    grey_by_numpy = np.percentile(np.ptp(pixels[darkest < 205], axis=1), 99.9) <= GREY_SPREAD
    if grey_by_numpy:
        with pytest.raises(UnsupportedImageError, match="grey stored as RGB"):
            _tissue(pixels, "reinhard", None)
    else:
        assert _tissue(pixels, "reinhard", None) is pixels
    assert grey_by_numpy == (colour_share < 0.001)  # both sides are tried


def test_macenko_keeps_the_same_stained_pixels_for_uint8_and_wider_values():
    # uint8 pixels are kept when their brightest channel is dark enough; any other integer type goes
    # through the per-channel optical density test: the same pixels, so the same stains
    pixels = _synthetic(n=96)[..., :3].reshape(-1, 3)
    for beta in (0.15, 0.0, 0.6):
        a = macenko_stains(pixels, beta=beta)
        b = macenko_stains(pixels.astype(np.int64), beta=beta)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert a[2] == b[2]
        if beta == 0.15:
            assert 0 < a[2] < pixels.shape[0]
