"""More inputs: a multi-level Aperio SVS, WebP, resolution without a unit, an image as match reference."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import pyvips

import vipsnorm
from vipsnorm.cli import main

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
APERIO = "Aperio Image Library v12.0.0\r\n"


def _aperio_svs(path: Path) -> np.ndarray:
    """An Aperio-style SVS: level 0, a strip thumbnail, two tiled levels, a label (as scanners write)."""
    level0 = np.random.default_rng(0).integers(0, 256, (1024, 1536, 3), dtype=np.uint8)
    jpeg = dict(compression="jpeg", photometric="rgb", metadata=None, subsampling=(1, 1))
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, tile=(256, 256), description=APERIO + "1536x1024 (256x256) JPEG/RGB|MPP = 0.4990", **jpeg)
        tif.write(level0[::8, ::8].copy(), description=APERIO + "1536x1024 -> 192x128 - |MPP = 0.4990", **jpeg)
        tif.write(level0[::4, ::4].copy(), tile=(256, 256), description=APERIO + "-> 384x256 JPEG/RGB", **jpeg)
        tif.write(level0[::16, ::16].copy(), tile=(256, 256), description=APERIO + "-> 96x64 JPEG/RGB", **jpeg)
        tif.write(np.zeros((100, 120, 3), np.uint8), photometric="rgb", compression="lzw", metadata=None,
                  description=APERIO + "label 120x100", subfiletype=1)
    return level0


def test_multilevel_aperio_svs_pages_become_levels(tmp_path):
    path = tmp_path / "a.svs"
    _aperio_svs(path)
    slide = vipsnorm.open(path)
    assert slide.backend == "libvips" and slide.vendor == "aperio"
    assert [(lvl.width, lvl.height) for lvl in slide.levels] == [(1536, 1024), (384, 256), (96, 64)]
    assert [lvl.downsample for lvl in slide.levels] == [1.0, 4.0, 16.0]
    assert set(slide.associated) == {"label", "thumbnail"}  # the strip pages are not levels
    assert slide.mpp == (0.499, 0.499)
    osr = openslide.OpenSlide(str(path))
    for level in range(3):
        expected = np.asarray(osr.read_region((0, 0), level, osr.level_dimensions[level]))[..., :3]
        np.testing.assert_array_equal(slide.level_image(level).numpy(), expected)


def test_normalized_svs_keeps_pixel_size_and_is_no_longer_aperio(tmp_path):
    path = tmp_path / "a.svs"
    _aperio_svs(path)
    assert main(["normalize", str(path), "-o", str(tmp_path / "out"), "--method", "stretch"]) == 0
    osr = openslide.OpenSlide(str(tmp_path / "out" / "a.tif"))
    assert osr.properties["openslide.vendor"] == "generic-tiff"
    assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.499, rel=1e-4)


def test_webp_in_webp_out(tmp_path):
    pixels = np.random.default_rng(1).integers(40, 200, (64, 96, 3), dtype=np.uint8)
    src = tmp_path / "in.webp"
    pyvips.Image.new_from_array(pixels).copy(interpretation="srgb").webpsave(str(src), lossless=True)
    assert vipsnorm.open(src).loader.startswith("webpload")
    assert main(["normalize", str(src), "-o", str(tmp_path / "out"), "--method", "stretch", "--low", "0", "--high", "100"]) == 0
    out = pyvips.Image.new_from_file(str(tmp_path / "out" / "in.webp"))
    assert out.get("vips-loader").startswith("webpload")
    assert out.numpy().min() <= 2 and out.numpy().max() >= 253  # min/max stretched to the full range


def test_tiff_resolution_without_unit_is_not_a_pixel_size(tmp_path):
    path = tmp_path / "nounit.tif"
    tifffile.imwrite(path, np.zeros((32, 32, 3), np.uint8), photometric="rgb", resolution=(4000, 4000),
                     resolutionunit="NONE", metadata=None)
    assert vipsnorm.open(path).mpp is None
    with_unit = tmp_path / "unit.tif"  # another name: libvips caches what it opened by file name
    tifffile.imwrite(with_unit, np.zeros((32, 32, 3), np.uint8), photometric="rgb", resolution=(40000, 40000),
                     resolutionunit="CENTIMETER", metadata=None)
    assert vipsnorm.open(with_unit).mpp == pytest.approx((0.25, 0.25))


@pytest.mark.skipif(not DATA.is_dir(), reason="shared test data not found")
def test_match_to_a_reference_image(tmp_path):
    source = DATA / "tiles" / "histolab-source-low.png"
    target = DATA / "tiles" / "kather-template.jpg"
    assert main(["normalize", str(source), "-o", str(tmp_path), "--method", "match", "--reference", str(target)]) == 0
    before = vipsnorm.open(source).level_image(0).numpy().reshape(-1, 3).astype(float)
    after = pyvips.Image.new_from_file(str(tmp_path / "histolab-source-low.png")).numpy().reshape(-1, 3).astype(float)
    goal = pyvips.Image.new_from_file(str(target)).numpy().reshape(-1, 3).astype(float)
    q = np.linspace(5, 95, 19)
    gap_before = np.abs(np.percentile(before, q, axis=0) - np.percentile(goal, q, axis=0)).mean()
    gap_after = np.abs(np.percentile(after, q, axis=0) - np.percentile(goal, q, axis=0)).mean()
    # a very dark source has few distinct values, so its top quantiles land coarsely (measured 104 -> 2.8)
    assert gap_after < 4 and gap_after < gap_before / 20


# --------------------------------------------------------------------------------------------------
# ordinary images written as TIFF, and formats too small for the image


def _tiff_page(path: Path):
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        return page.compression.name, page.predictor, len(tif.pages)


@pytest.mark.parametrize("source", ["png", "tif"])
def test_ordinary_tiff_output_honours_compression_and_quality(source, tmp_path):
    """--compression and --quality were ignored for ordinary images written as TIFF (always deflate)."""
    from vipsnorm.synth import synthetic_slide

    pixels = synthetic_slide(384, 256, seed=2, tissue=0.7).numpy()
    src = tmp_path / f"in.{source}"
    image = pyvips.Image.new_from_array(pixels).copy(interpretation="srgb")
    image.pngsave(str(src)) if source == "png" else image.tiffsave(str(src), compression="lzw")
    args = ["normalize", str(src), "--method", "stretch", "--workers", "0"] + (["--format", "tiff"] if source == "png" else [])

    def normalized(name: str, *extra: str) -> Path:
        assert main([*args, "-o", str(tmp_path / name), *extra]) == 0
        return tmp_path / name / "in.tif"

    default = normalized("default")
    assert _tiff_page(default) == ("ADOBE_DEFLATE", tifffile.PREDICTOR.HORIZONTAL, 1)  # lossless by default
    assert _tiff_page(normalized("lzw", "--compression", "lzw"))[:2] == ("LZW", tifffile.PREDICTOR.HORIZONTAL)
    assert _tiff_page(normalized("none", "--compression", "none"))[0] == "NONE"
    low = normalized("q20", "--compression", "jpeg", "--quality", "20")
    high = normalized("q95", "--compression", "jpeg", "--quality", "95")
    assert _tiff_page(low)[0] == _tiff_page(high)[0] == "JPEG"
    assert low.stat().st_size < high.stat().st_size * 0.6  # the quality is used
    lossless = pyvips.Image.new_from_file(str(default)).numpy()
    for path in (tmp_path / "lzw" / "in.tif", tmp_path / "none" / "in.tif"):
        np.testing.assert_array_equal(pyvips.Image.new_from_file(str(path)).numpy(), lossless)
    assert np.abs(pyvips.Image.new_from_file(str(high)).numpy().astype(int) - lossless).mean() < 3


@pytest.mark.parametrize("fmt, width, limit", [("jpeg", 65501, 65500), ("webp", 16384, 16383)])
@pytest.mark.parametrize("kind", ["image", "slide"])
def test_too_large_for_the_format_is_refused_before_any_work(fmt, width, limit, kind, tmp_path, capsys):
    """libvips failed only in the save, reported as "cannot decode pixels" of the input."""
    src = tmp_path / ("wide.tif" if kind == "slide" else "wide.png")
    wide = pyvips.Image.black(width, 32, bands=3).cast("uchar")
    if kind == "slide":
        wide.tiffsave(str(src), tile=True, pyramid=True, compression="deflate")
    else:
        wide.pngsave(str(src))
    assert vipsnorm.open(src).is_slide == (kind == "slide")
    out = tmp_path / "out"
    assert main(["normalize", str(src), "-o", str(out), "--format", fmt, "--method", "stretch", "--workers", "0"]) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    suffix = ".jpg" if fmt == "jpeg" else ".webp"
    assert line.startswith(f"error  {out / ('wide' + suffix)}: ")
    assert f"at most {limit} px a side" in line and f"{width}x32" in line and "--format tiff" in line
    assert "decode" not in line and os.listdir(out) == []


# --------------------------------------------------------------------------------------------------
# the pixel size of outputs, and lossless WebP


def _normalize(src: Path, out: Path, *extra: str) -> Path:
    assert main(["normalize", str(src), "-o", str(out), "--method", "stretch", "--workers", "0", *extra]) == 0
    (written,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    return written


def test_ordinary_images_written_as_tiff_state_no_made_up_pixel_size(tmp_path):
    """A TIFF without resolution tags came out at 1000 um a pixel (libvips' default 1 px/mm), a 300 dpi
    JPEG as TIFF at 84.67 um: resolutions that are no pixel size became one."""
    from PIL import Image

    pixels = np.random.default_rng(4).integers(30, 220, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "nores.tif")
    Image.fromarray(pixels).save(tmp_path / "print.jpg", dpi=(300, 300))
    assert vipsnorm.open(tmp_path / "nores.tif").mpp is None and vipsnorm.open(tmp_path / "print.jpg").mpp is None
    assert vipsnorm.open(_normalize(tmp_path / "nores.tif", tmp_path / "a")).mpp is None
    assert vipsnorm.open(_normalize(tmp_path / "print.jpg", tmp_path / "b", "--format", "tiff")).mpp is None
    # a JPEG kept a JPEG keeps its own dpi
    with Image.open(_normalize(tmp_path / "print.jpg", tmp_path / "c")) as kept:
        assert kept.info["dpi"] == pytest.approx((300, 300))
    # a TIFF that states a pixel size keeps it
    tifffile.imwrite(tmp_path / "unit.tif", pixels, photometric="rgb", resolution=(40000, 40000),
                     resolutionunit="CENTIMETER", metadata=None)
    assert vipsnorm.open(_normalize(tmp_path / "unit.tif", tmp_path / "d")).mpp == pytest.approx((0.25, 0.25))


@pytest.mark.parametrize("fmt", ["png", "jpeg", "tiff"])
def test_a_slide_written_as_an_ordinary_image_keeps_its_pixel_size(fmt, tmp_path):
    """A slide (mpp 0.499) written with --format png said 1000 um a pixel."""
    from PIL import Image

    path = tmp_path / "a.svs"
    _aperio_svs(path)
    out = _normalize(path, tmp_path / "out", "--format", fmt)
    if fmt == "tiff":  # a pyramid, as before
        assert vipsnorm.open(out).mpp == pytest.approx((0.499, 0.499), rel=1e-6)
    else:
        with Image.open(out) as written:
            assert written.info["dpi"] == pytest.approx((25400 / 0.499,) * 2, rel=1e-6)


def test_a_lossless_webp_stays_lossless(tmp_path):
    """A lossless WebP input came out lossy (21 grey levels off): it is written lossless, the same
    pixels as the lossless PNG of the same run; a lossy one stays lossy, at --quality."""
    from vipsnorm.io.write import lossless_webp
    from vipsnorm.synth import synthetic_slide

    image = synthetic_slide(192, 128, seed=3, tissue=0.7)
    image.webpsave(str(tmp_path / "ll.webp"), lossless=True)
    image.webpsave(str(tmp_path / "ly.webp"), Q=90)
    out = _normalize(tmp_path / "ll.webp", tmp_path / "ll")
    assert out.name == "ll.webp" and lossless_webp(out)
    png = _normalize(tmp_path / "ll.webp", tmp_path / "png", "--format", "png")
    np.testing.assert_array_equal(pyvips.Image.new_from_file(str(out)).numpy(), pyvips.Image.new_from_file(str(png)).numpy())
    assert not lossless_webp(_normalize(tmp_path / "ly.webp", tmp_path / "ly"))
    assert lossless_webp(_normalize(tmp_path / "ll.webp", tmp_path / "ll2", "--format", "webp"))
