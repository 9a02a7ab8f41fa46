"""Fitting on tissue: the mask, the sampled statistics against the exact full-resolution fit, glass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pyvips

import vipsnorm
from vipsnorm import sampling
from vipsnorm.methods import Equalize, Match, Sample, Stretch
from vipsnorm.sampling import _tissue_pixels_array, sample_slide, saturation, tissue_mask
from vipsnorm.synth import synthetic_slide, write_synthetic_slide

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def large_slide(tmp_path_factory):
    """A generated slide large enough that 64 tiles are a small fraction of it (~1%)."""
    return write_synthetic_slide(tmp_path_factory.mktemp("large") / "large.tif", 12000, 10000, seed=3)


def _lut_error(slide, **options):
    exact = Equalize().fit(sample_slide(slide, strategy="exact")).luts()[0].astype(int)
    errors = {}
    for strategy in ("tiles", "level"):
        lut = Equalize().fit(sample_slide(slide, strategy=strategy, **options)).luts()[0].astype(int)
        errors[strategy] = np.abs(lut - exact).mean()
    return errors


@pytest.mark.skipif(not DATA.is_dir(), reason="shared test data not found")
def test_default_fit_is_within_2_levels_of_exact_on_real_svs():
    slide = vipsnorm.open(DATA / "slides" / "CMU-1-Small-Region.svs")
    # the default tiles would cover most of this small slide, so it is counted whole: exact
    assert _lut_error(slide)["tiles"] == 0
    # the tile sampler itself, forced to a small share of the slide (32 tiles, ~30% of it)
    errors = _lut_error(slide, n_tiles=32)
    assert errors["tiles"] <= 2.0  # the requirement


def test_default_fit_is_within_2_levels_of_exact_on_large_generated_slide(large_slide):
    slide = vipsnorm.open(large_slide)
    assert len(slide.levels) >= 5
    errors = _lut_error(slide)
    assert errors["tiles"] <= 2.0


def test_tissue_mask_finds_generated_tissue():
    fractions = []
    for tissue in (0.3, 0.6):
        view = synthetic_slide(1024, 1024, tissue=tissue, seed=1).numpy()
        mask = tissue_mask(view)
        # the generator's tissue fraction is approximate and its borders fade out into glass
        assert abs(mask.fraction - tissue) < 0.2
        assert view[~mask.mask].mean() > 225  # what is left out is near-white glass
        assert view[mask.mask].mean() < view[~mask.mask].mean() - 30
        fractions.append(mask.fraction)
    assert fractions[1] > fractions[0] + 0.1


def test_all_glass_slide_has_no_tissue(tmp_path):
    path = write_synthetic_slide(tmp_path / "glass.tif", 2048, 2048, tissue=0.0)
    with pytest.raises(vipsnorm.NoTissueError, match="glass.tif: no tissue"):
        sample_slide(vipsnorm.open(path))


def test_grey_slide_stored_as_rgb_is_masked_as_grey():
    # no chroma, so no saturation to threshold: the intensity rule of a grey slide, by the darkest channel
    grey = synthetic_slide(1024, 1024, tissue=0.4, seed=2).colourspace("b-w").numpy()
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=-1)
    one, three = tissue_mask(grey), tissue_mask(rgb)
    assert (one.rule, three.rule) == ("intensity", "intensity")
    assert three.threshold == one.threshold and np.array_equal(three.mask, one.mask)
    assert abs(three.fraction - 0.4) < 0.2
    np.testing.assert_array_equal(_tissue_pixels_array(rgb, three), _tissue_pixels_array(grey, one))
    image = sampling._tissue_pixels_image(pyvips.Image.new_from_array(rgb), three).numpy()
    np.testing.assert_array_equal(image.astype(bool), _tissue_pixels_array(rgb, three))
    # grey glass stored as RGB is still glass
    glass = np.clip(np.random.default_rng(0).normal(240, 2, (256, 256)), 0, 255).astype(np.uint8)
    with pytest.raises(vipsnorm.NoTissueError):
        tissue_mask(np.repeat(glass[..., np.newaxis], 3, axis=-1))


def test_tinted_all_glass_is_still_glass():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal([245, 232, 238], 2, (256, 256, 3)), 0, 255).astype(np.uint8)  # pinkish glass
    with pytest.raises(vipsnorm.NoTissueError):
        tissue_mask(glass)


def test_saturation_definition():
    px = np.array([[[255, 255, 255], [200, 100, 50], [0, 0, 0]]], np.uint8)
    np.testing.assert_allclose(saturation(px)[0], [0.0, 0.75, 0.0])


def test_sample_is_reproducible_and_seed_dependent(large_slide):
    slide = vipsnorm.open(large_slide)
    a = sample_slide(slide, n_tiles=8, seed=1).hist
    np.testing.assert_array_equal(a, sample_slide(slide, n_tiles=8, seed=1).hist)
    assert not np.array_equal(a, sample_slide(slide, n_tiles=8, seed=2).hist)


def test_tiles_read_on_threads_give_the_sequential_sample(large_slide, monkeypatch):
    slide = vipsnorm.open(large_slide)
    monkeypatch.setattr(sampling, "_cores", lambda: 4)  # threads even on a one-core machine
    threaded = sample_slide(slide, n_tiles=64, seed=4, pixels=5000)
    monkeypatch.setattr(sampling, "SAMPLE_THREADS", 1)
    sequential = sample_slide(slide, n_tiles=64, seed=4, pixels=5000)
    np.testing.assert_array_equal(threaded.hist, sequential.hist)
    np.testing.assert_array_equal(threaded.pixels, sequential.pixels)  # the same pixels, in the same order


def test_sample_excludes_glass(large_slide):
    slide = vipsnorm.open(large_slide)
    tissue_only = sample_slide(slide)
    everything = sample_slide(slide, tissue=False)
    # glass is the bright mode; the tissue sample has far less of it
    bright = slice(225, 256)
    assert tissue_only.hist[3][bright].sum() / tissue_only.n < 0.5 * everything.hist[3][bright].sum() / everything.n


@pytest.mark.parametrize("method", ["stretch", "equalize", "match"])
def test_glass_stays_glass(tmp_path, method):
    image = synthetic_slide(1536, 1536, seed=5, lab="pale-blue")
    path = tmp_path / "s.tif"
    image.tiffsave(str(path), tile=True, pyramid=True, compression="deflate")
    slide = vipsnorm.open(path)
    target = Sample.from_array(synthetic_slide(1024, 1024, seed=9, lab="dark-pink").numpy())
    m = {"stretch": Stretch(), "equalize": Equalize(), "match": Match(target)}[method]
    params = m.fit(sample_slide(slide))
    before = slide.level_image(0).numpy()
    after = m.apply(slide.level_image(0), params).numpy()
    mask = tissue_mask(before[::4, ::4])
    # glass: away from tissue in the overview, and not tissue by the per-pixel rule either
    glass = ~mask.mask & ~_tissue_pixels_array(before[::4, ::4], mask)
    out_glass = after[::4, ::4][glass]
    assert out_glass.mean() >= before[::4, ::4][glass].mean() - 1  # not darkened
    assert out_glass.mean() > 225  # still bright
    # the tissue detector would still call it glass (a linear stretch amplifies a scanner tint a little)
    assert (~_tissue_pixels_array(out_glass, mask)).mean() > 0.9
    assert (np.abs(after.astype(int) - before).mean()) > 1  # and something did change


def _pixel_means_agree(sample, tolerance=1.5):
    """The gathered pixels are a uniform subsample of the counted ones: per-channel means agree."""
    values = np.arange(256)
    for band in range(sample.pixels.shape[1]):
        row = sample.hist[band]
        assert abs(sample.pixels[:, band].mean() - (row * values).sum() / row.sum()) < tolerance


@pytest.mark.parametrize("strategy", ["tiles", "level", "exact"])
def test_sample_gathers_tissue_pixels_on_request(large_slide, strategy):
    slide = vipsnorm.open(large_slide)
    sample = sample_slide(slide, strategy=strategy, n_tiles=16, pixels=20000)
    assert sample.pixels.dtype == np.uint8 and sample.pixels.shape[1] == 3
    assert 10000 <= sample.pixels.shape[0] <= 20000
    view, downsample = vipsnorm.sampling.overview(slide)
    mask = tissue_mask(view, downsample)
    assert _tissue_pixels_array(sample.pixels[np.newaxis], mask).all()  # tissue only, no glass
    _pixel_means_agree(sample, tolerance=1.5 if strategy == "tiles" else 3.0)
    if strategy == "tiles":
        assert sample_slide(slide, n_tiles=16).pixels is None  # histograms only by default
        again = sample_slide(slide, strategy=strategy, n_tiles=16, pixels=20000)
        np.testing.assert_array_equal(sample.pixels, again.pixels)  # reproducible


def test_ordinary_image_gives_every_pixel_when_few(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (60, 50, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    import pyvips

    pyvips.Image.new_from_array(array, interpretation="srgb").write_to_file(str(path))
    sample = sample_slide(vipsnorm.open(path), pixels=10**6)
    assert sample.pixels.shape == (3000, 3)
    np.testing.assert_array_equal(sample.pixels, array.reshape(-1, 3))  # in order, none dropped
    capped = sample_slide(vipsnorm.open(path), pixels=500)
    assert capped.pixels.shape[0] == 500
    _pixel_means_agree(capped, tolerance=12)  # 500 of 3000 uniform values: within ~3 standard errors


def test_pooled_samples_take_as_many_pixels_from_each():
    a = Sample.from_array(np.full((10, 10, 3), 50, np.uint8))
    b = Sample.from_array(np.full((30, 30, 3), 200, np.uint8))
    pooled = Sample.pooled([a, b])
    assert pooled.pixels.shape == (200, 3)
    assert (pooled.pixels[:, 0] == 50).sum() == (pooled.pixels[:, 0] == 200).sum() == 100


def test_colour_slide_with_little_tissue_keeps_the_saturation_rule():
    # under 0.1% stained pixels on clean grey glass: the grey check looks at what could be tissue only
    view = np.full((512, 512, 3), 240, np.uint8)
    view[100:110, 100:110] = [150, 60, 140]
    mask = tissue_mask(view)
    assert mask.rule == "saturation" and mask.mask.sum() == 100


def _gathered_tissue(slide, **options):
    """The sample, and how many tissue pixels it counted (the R row counts each once)."""
    sample = sample_slide(slide, **options)
    return sample, int(sample.hist[0].sum())


@pytest.mark.parametrize("source", ["generated", "svs"])
def test_exact_sample_gathers_n_tissue_pixels_or_every_one(tmp_path, source, monkeypatch):
    # the pixels come from a point subsample sized by the tissue counted, not by the whole image (of
    # which the tissue is a part): n of them when there are more, else every one (README: "up to 2
    # million tissue pixels"), read in strips, never the whole level at once
    if source == "svs":
        if not DATA.is_dir():
            pytest.skip("shared test data not found")
        path = DATA / "slides" / "CMU-1-Small-Region.svs"  # 1.9 M tissue pixels of 6.6 M
    else:
        path = write_synthetic_slide(tmp_path / "s.tif", 2400, 1800, seed=4, tissue=0.3)
    slide = vipsnorm.open(path)
    few, tissue = _gathered_tissue(slide, strategy="exact", pixels=2_000_000)
    assert tissue < 2_000_000
    assert abs(few.pixels.shape[0] - tissue) <= 0.001 * tissue  # every one (libvips' rule and numpy's agree)
    for n in (tissue // 3, 100_000, 5_000):
        sample, _ = _gathered_tissue(slide, strategy="exact", pixels=n)
        assert sample.pixels.shape[0] == n, n
        _pixel_means_agree(sample, tolerance=3.0)
    # read in strips, whose size does not change the draws
    strips, read = [], sampling._strips

    def recorded(image, k=1):
        for strip in read(image, k):
            strips.append(strip.shape[0] * strip.shape[1])
            yield strip

    monkeypatch.setattr(sampling, "_strips", recorded)
    monkeypatch.setattr(sampling, "_STRIP_PIXELS", 40_000)
    np.testing.assert_array_equal(sample_slide(slide, strategy="exact", pixels=5_000).pixels, sample.pixels)
    assert len(strips) > 1 and max(strips) <= 40_000


@pytest.mark.parametrize("stream", [False, True])
def test_image_sample_gathers_n_pixels_just_under_2n(tmp_path, monkeypatch, stream):
    # 3000 pixels, 1400 asked: a step sized to keep about 2n of them kept 750
    import vipsnorm.io.slide as slide_module

    array = np.random.default_rng(1).integers(0, 256, (60, 50, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    pyvips.Image.new_from_array(array, interpretation="srgb").write_to_file(str(path))
    if stream:
        monkeypatch.setattr(slide_module, "SMALL_IMAGE_PIXELS", 0)
    with vipsnorm.open(path) as slide:
        assert slide.holds_decoded() != stream
        sample = sample_slide(slide, pixels=1400)
    assert sample.pixels.shape == (1400, 3)
    _pixel_means_agree(sample, tolerance=12)


def test_sample_without_luma_refuses_a_luminance_fit(tmp_path):
    # luma=False leaves the Y row of a small colour image uncounted (NaN): equalize and match in
    # luminance mode read it, and once cast it to an all-zero LUT (a near-black image)
    path = tmp_path / "t.png"
    synthetic_slide(256, 256, seed=2, tissue=0.7).pngsave(str(path))
    sample = sample_slide(vipsnorm.open(path), luma=False)
    assert not sample.luma_counted
    for method in (Equalize(), Match(sample_slide(vipsnorm.open(path)), mode="luminance")):
        with pytest.raises(ValueError, match=r"luma \(Y\) histogram, which this sample left uncounted.*luma=True"):
            method.fit(sample)
    with pytest.raises(ValueError, match="luma=True"):
        Sample.pooled([sample, sample])


@pytest.mark.parametrize("total, n", [(6, 4), (6, 2), (7, 1)])
def test_choose_draws_every_subset_equally_often(total, n):
    # the pixel subsample keeps n of total uniformly at random: each of the C(total, n) subsets as often
    # as the others (a chi-square test at p = 0.001), exactly n every time; a draw that, say, dropped
    # its surplus from the end would favour the first indices and fail
    from itertools import combinations
    from math import comb

    rng = np.random.default_rng(11)
    draws = 30_000
    seen: dict[tuple[int, ...], int] = {}
    for _ in range(draws):
        keep = sampling._choose(total, n, rng)
        assert keep.dtype == bool and keep.shape == (total,) and keep.sum() == n
        key = tuple(np.flatnonzero(keep))
        seen[key] = seen.get(key, 0) + 1
    subsets = comb(total, n)
    assert set(seen) == set(combinations(range(total), n))
    expected = draws / subsets
    chi2 = sum((count - expected) ** 2 / expected for count in seen.values())
    # chi-square 0.999 quantiles: 14 degrees of freedom 36.1, 6 degrees 22.5
    assert chi2 < {15: 36.1, 7: 22.5}[subsets], (chi2, seen)


def test_limit_keeps_n_rows_in_their_order_with_both_ways_of_drawing():
    values = np.arange(30_000, dtype=np.int64).reshape(-1, 3) // 3 * np.ones(3, np.int64)  # row i holds i
    for n in (9_000, 7_000, 100):  # a large share (kept-or-not draws), a small one (rng.choice)
        kept = sampling._limit(values, n, 5)
        assert kept.shape == (n, 3) and (kept[:, 0] == kept[:, 2]).all()
        assert (np.diff(kept[:, 0]) > 0).all()  # distinct rows, in their original order
        np.testing.assert_array_equal(kept, sampling._limit(values, n, 5))  # seeded
        assert abs(kept[:, 0].mean() - 4999.5) < 5 * 2887 / np.sqrt(n)  # uniform over the rows
    assert sampling._limit(values, 10_000, 5) is values


def _mask_per_pixel(view: np.ndarray) -> tuple[np.ndarray, float]:
    """The saturation rule written per pixel: each pixel's saturation histogrammed, Otsu, s > t."""
    s = saturation(view)
    t = min(max(sampling._otsu(s), sampling._MIN_THRESHOLD), sampling._MAX_THRESHOLD)
    mask = s > t
    if not mask.any() or mask.all() or s[mask].mean(dtype=np.float64) - s[~mask].mean(dtype=np.float64) < sampling._MIN_SEPARATION:
        mask = np.zeros_like(mask)
    return mask, t


def _overviews():
    yield "synthetic", synthetic_slide(700, 500, seed=5).numpy()[..., :3]
    rng = np.random.default_rng(9)
    glass = np.full((300, 400, 3), 236, np.uint8)
    glass[50:200, 60:300] = rng.integers(90, 220, (150, 240, 3), dtype=np.uint8)
    yield "noisy tissue on glass", glass
    if DATA.is_dir():
        for path in sorted((DATA / "tiles").glob("*.png"))[:4] + [DATA / "slides" / "CMU-1-Small-Region.svs"]:
            yield path.name, sampling.overview(vipsnorm.open(path))[0]


def test_tissue_mask_counts_saturation_pairs_as_every_pixel_would():
    # the mask thresholds each (chroma, max) pair's saturation, counted once per pair: the same
    # threshold and mask as each pixel's saturation
    tried = 0
    for name, view in _overviews():
        expected, t = _mask_per_pixel(view)
        mask = tissue_mask(view)
        assert mask.rule == "saturation", name
        assert mask.threshold == t, name
        np.testing.assert_array_equal(mask.mask, expected, err_msg=name)
        tried += 1
    assert tried >= 2
    with pytest.raises(TypeError, match="uint8"):
        tissue_mask(np.zeros((8, 8, 3), np.float32))


def test_cell_sums_agree_with_an_integral_image():
    rng = np.random.default_rng(2)
    mask = rng.random((203, 157)) < 0.4
    integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def reference(x0, x1, y0, y1):
        return integral[np.ix_(y1, x1)] - integral[np.ix_(y0, x1)] - integral[np.ix_(y1, x0)] + integral[np.ix_(y0, x0)]

    # cells that tile the mask (one pass), and cells of one overview pixel that overlap (integral)
    xs, ys = np.array([0, 20, 41, 100, 157]), np.array([0, 7, 60, 203])
    tiling = (xs[:-1], xs[1:], ys[:-1], ys[1:])
    overlapping = (np.array([0, 0, 1]), np.array([1, 1, 2]), np.array([0, 1]), np.array([1, 2]))
    short = (xs[:-1], xs[1:], ys[:-2], ys[1:-1])  # not reaching the last row: not a tiling
    for cells in (tiling, overlapping, short):
        np.testing.assert_array_equal(sampling._cell_sums(mask, *cells), reference(*cells))


def test_rows_refuses_a_mask_of_another_length():
    values = np.arange(12, dtype=np.uint8).reshape(4, 3)
    np.testing.assert_array_equal(sampling._rows(values, np.array([True, False, False, True])), values[[0, 3]])
    with pytest.raises(ValueError, match="mask"):
        sampling._rows(values, np.array([True, False, True]))  # np.compress alone would keep row 0 and 2
