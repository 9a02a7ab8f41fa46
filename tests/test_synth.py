"""Tests for :mod:`vipsnorm.synth` (synthetic H&E slides)."""

from __future__ import annotations

import numpy as np
import pytest
import pyvips

from vipsnorm.synth import (
    DEFAULT_STAINS,
    LABS,
    Lab,
    main,
    synthetic_slide,
    write_synthetic_slide,
)

NEAR_WHITE = 225  # every channel at least this: glass


def _pixels(img: pyvips.Image) -> np.ndarray:
    return img.numpy().reshape(-1, 3).astype(np.float64)


def _glass_fraction(img: pyvips.Image) -> float:
    return float((img.numpy().min(axis=2) >= NEAR_WHITE).mean())


def test_default_stains_are_unit_columns():
    assert DEFAULT_STAINS.shape == (3, 2)
    np.testing.assert_allclose(np.linalg.norm(DEFAULT_STAINS, axis=0), 1.0)
    # Ruifrok hematoxylin direction.
    h = np.array([0.65, 0.70, 0.29])
    np.testing.assert_allclose(DEFAULT_STAINS[:, 0], h / np.linalg.norm(h))


def test_labs_presets():
    assert {"reference", "pale-blue", "dark-pink"} <= set(LABS)
    for name, lab in LABS.items():
        assert isinstance(lab, Lab) and lab.name == name
        m = lab.stain_matrix()
        assert m.shape == (3, 2)
        np.testing.assert_allclose(np.linalg.norm(m, axis=0), 1.0)


@pytest.mark.parametrize("size", [(300, 200), (1, 1), (257, 3), (5, 130)])
def test_size_and_format(size):
    img = synthetic_slide(*size, seed=3)
    assert (img.width, img.height) == size
    assert img.bands == 3
    assert img.format == "uchar"
    assert img.interpretation == "srgb"
    assert img.numpy().shape == (size[1], size[0], 3)


def test_deterministic():
    a = synthetic_slide(320, 240, seed=7).numpy()
    b = synthetic_slide(320, 240, seed=7).numpy()
    c = synthetic_slide(320, 240, seed=8).numpy()
    np.testing.assert_array_equal(a, b)
    assert (a != c).any(axis=2).mean() > 0.5


def test_same_tissue_in_every_lab():
    # The lab only changes colours: glass and tissue are in the same places.
    masks = [
        synthetic_slide(256, 256, seed=2, lab=lab).numpy().min(axis=2) >= NEAR_WHITE
        for lab in ("reference", "pale-blue")
    ]
    assert (masks[0] == masks[1]).mean() > 0.9


@pytest.mark.parametrize("tissue", [0.2, 0.5, 0.8])
def test_glass_fraction_follows_tissue(tissue):
    glass = _glass_fraction(synthetic_slide(384, 384, seed=1, tissue=tissue))
    assert abs(glass - (1.0 - tissue)) < 0.12


def test_glass_fraction_monotonic():
    fractions = [
        _glass_fraction(synthetic_slide(256, 256, seed=4, tissue=t)) for t in (0.1, 0.4, 0.7, 1.0)
    ]
    assert fractions == sorted(fractions, reverse=True)
    assert fractions[-1] < 0.1


def test_all_glass_is_near_white_but_not_flat():
    a = synthetic_slide(256, 256, seed=5, tissue=0.0).numpy()
    assert a.min() > 220
    assert 235 <= a.mean() <= 245
    assert a.std() > 0.5
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 20


def test_nuclei_bluer_than_stroma():
    px = _pixels(synthetic_slide(384, 384, seed=0, tissue=0.9))
    tissue = px[px.min(axis=1) < NEAR_WHITE]
    assert len(tissue) > 0.5 * len(px)
    lum = tissue.sum(axis=1)
    darkest = tissue[lum <= np.quantile(lum, 0.05)]
    pinkness = tissue[:, 0] - tissue[:, 1]
    pinkest = tissue[pinkness >= np.quantile(pinkness, 0.9)]
    blue_dark = (darkest[:, 2] >= darkest[:, 0]).mean()
    blue_pink = (pinkest[:, 2] >= pinkest[:, 0]).mean()
    assert blue_dark > 0.9
    assert blue_dark > blue_pink + 0.3
    # Stroma is pink: red and blue well above green.
    r, g, b = pinkest.mean(axis=0)
    assert r > g + 40 and b > g + 40


def test_labs_give_different_colours():
    means = {
        name: _pixels(synthetic_slide(256, 256, seed=1, lab=name)).mean(axis=0) for name in LABS
    }
    names = list(means)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.linalg.norm(means[a] - means[b]) > 5.0, (a, b)


def test_custom_lab_and_unknown_name():
    lab = Lab("grey", stains=((0.6, 0.6), (0.6, 0.6), (0.6, 0.6)))
    a = synthetic_slide(64, 64, lab=lab, seed=1, tissue=1.0).numpy().astype(int)
    # Identical stain vectors absorb equally: (nearly) grey pixels.
    assert np.abs(a[..., 0] - a[..., 1]).mean() < 3
    with pytest.raises(ValueError, match="unknown lab"):
        synthetic_slide(8, 8, lab="no-such-lab")


@pytest.mark.parametrize("name", sorted(LABS))
def test_beer_lambert_plane(name):
    lab = LABS[name]
    io = 240.0
    px = _pixels(synthetic_slide(256, 256, seed=0, tissue=0.9, lab=lab, io=io))
    gain = io * lab.exposure * np.asarray(lab.tint)
    od = -np.log(np.maximum(px, 1.0) / gain)
    keep = (od.sum(axis=1) > 0.3) & (px.min(axis=1) > 20) & (px.max(axis=1) < 255)
    assert keep.mean() > 0.3
    od = od[keep]

    def residual(stains: np.ndarray) -> np.ndarray:
        n = np.cross(stains[:, 0], stains[:, 1])
        return np.abs(od @ (n / np.linalg.norm(n)))

    own = residual(lab.stain_matrix())
    assert np.median(own) < 0.012
    assert np.quantile(own, 0.95) < 0.04
    # Another lab's plane fits clearly worse (the check can fail).
    for other_name, other in LABS.items():
        if other_name != name:
            assert np.median(residual(other.stain_matrix())) > 2 * np.median(own)


def test_write_openslide_and_tifffile(tmp_path):
    openslide = pytest.importorskip("openslide")
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "slide.tif"
    out = write_synthetic_slide(path, 1100, 700, seed=2, mpp=0.5, tile=256, lab="dark-pink")
    assert out == path and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["slide.tif"]

    with openslide.OpenSlide(str(path)) as slide:
        assert slide.dimensions == (1100, 700)
        assert slide.level_count > 1
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-3)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5, rel=1e-3)
        region = np.asarray(slide.read_region((0, 0), 0, (1100, 700)).convert("RGB"), float)
        level_count = slide.level_count
    expected = synthetic_slide(1100, 700, seed=2, lab="dark-pink").numpy().astype(float)
    assert np.abs(region - expected).mean() < 4.0  # JPEG Q90

    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
        levels = tif.series[0].levels
        assert len(levels) == level_count
        assert levels[0].shape[:2] == (700, 1100)
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 256
        assert page.compression == tifffile.COMPRESSION.JPEG


def test_write_failure_leaves_no_file(tmp_path):
    path = tmp_path / "bad.tif"
    with pytest.raises(ValueError, match="compression"):
        write_synthetic_slide(path, 64, 64, compression="no-such-codec")
    assert list(tmp_path.iterdir()) == []


def test_write_replaces_existing_file(tmp_path):
    path = tmp_path / "s.tif"
    path.write_bytes(b"old")
    write_synthetic_slide(path, 300, 300, compression="deflate")
    assert path.read_bytes()[:2] in (b"II", b"MM")
    assert [p.name for p in tmp_path.iterdir()] == ["s.tif"]


def test_cli(tmp_path, capsys):
    path = tmp_path / "cli.tif"
    assert main([str(path), "--size", "300", "--lab", "pale-blue", "--seed", "1"]) == 0
    assert path.is_file()
    assert "300x300" in capsys.readouterr().out
