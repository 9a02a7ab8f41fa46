"""Reading (both backends, pixel conversions, pixel size) and writing (pyramids, atomic outputs)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import pyvips

import vipsnorm
from vipsnorm.errors import OutputError
from vipsnorm.io.slide import OpenSlideSlide, VipsSlide
from vipsnorm.io.write import PART_MARKER, atomic_path, check_name, write_image, write_pyramid

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")


@needs_data
def test_aperio_svs_with_jpeg_tiles_reads_through_libvips():
    slide = vipsnorm.open(DATA / "slides" / "CMU-1-Small-Region.svs")
    assert isinstance(slide, VipsSlide) and slide.backend == "libvips"
    assert slide.vendor == "aperio" and slide.is_slide
    assert slide.dimensions == (2220, 2967) and len(slide.levels) == 1
    assert slide.mpp == (0.499, 0.499)
    assert set(slide.associated) == {"label", "macro", "thumbnail"}  # listed, not processed
    image = slide.level_image(0)
    assert (image.width, image.height, image.bands, image.format) == (2220, 2967, 3, "uchar")
    # same pixels as OpenSlide decodes
    region = np.asarray(openslide.OpenSlide(str(slide.path)).read_region((1000, 1200), 0, (64, 48)))[..., :3]
    np.testing.assert_array_equal(slide.read_region(0, 1000, 1200, 64, 48), region)


@needs_data
def test_generic_pyramidal_tiff_levels_and_pixel_size_from_resolution_tags():
    slide = vipsnorm.open(DATA / "slides" / "boxes.tiff")
    assert slide.backend == "libvips" and slide.vendor == "generic-tiff"
    assert [(lvl.width, lvl.height) for lvl in slide.levels] == [(300, 250), (150, 125), (75, 62), (37, 31)]
    osr = openslide.OpenSlide(str(slide.path))
    assert slide.mpp == pytest.approx((float(osr.properties["openslide.mpp-x"]),) * 2)
    for level in range(4):
        w, h = slide.levels[level].width, slide.levels[level].height
        expected = np.asarray(osr.read_region((0, 0), level, (w, h)))[..., :3]
        np.testing.assert_array_equal(slide.level_image(level).numpy(), expected)


@needs_data
def test_dicom_reads_through_openslide_streaming():
    slide = vipsnorm.open(DATA / "slides" / "boxes_0.dcm")
    assert isinstance(slide, OpenSlideSlide) and slide.vendor == "dicom"
    expected = np.asarray(openslide.OpenSlide(str(slide.path)).read_region((0, 0), 0, slide.dimensions))[..., :3]
    np.testing.assert_array_equal(slide.level_image(0).numpy(), expected)


def test_openslide_backend_streams_a_level_through_the_virtual_tiff(tmp_path):
    """A multi-tile level read by OpenSlide equals what libvips reads of the same TIFF, at every level."""
    from vipsnorm.synth import write_synthetic_slide

    path = write_synthetic_slide(tmp_path / "s.tif", 1500, 1100, compression="deflate", tile=256)
    osr = openslide.OpenSlide(str(path))
    forced = OpenSlideSlide(path, osr)
    native = vipsnorm.open(path)
    assert len(forced.levels) == len(native.levels) > 1
    for level in range(len(forced.levels)):
        np.testing.assert_array_equal(forced.level_image(level).numpy(), native.level_image(level).numpy())
    # random access works too (not a sequential stream)
    np.testing.assert_array_equal(forced.read_region(0, 700, 600, 300, 200), native.read_region(0, 700, 600, 300, 200))


def test_jpeg2000_svs_falls_back_to_openslide(tmp_path):
    """libvips opens a JPEG 2000 SVS header but cannot decode its tiles: the probe must notice."""
    imagecodecs = pytest.importorskip("imagecodecs")
    h, w, t = 512, 768, 256
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    tiles = [
        imagecodecs.jpeg2k_encode(
            np.ascontiguousarray(pixels[y : y + t, x : x + t]), level=0, codecformat=imagecodecs.JPEG2K.CODEC.J2K
        )
        for y in range(0, h, t)
        for x in range(0, w, t)
    ]
    path = tmp_path / "j2k.svs"
    description = "Aperio Image Library v12.0.0\r\n768x512 [0,0 768x512] (256x256) J2K/KDU Q=70|AppMag = 20|MPP = 0.5"
    tifffile.imwrite(
        path, data=iter(tiles), shape=(h, w, 3), dtype="uint8", tile=(t, t), compression=33005,
        photometric="rgb", description=description, metadata=None,
    )
    header = pyvips.Image.new_from_file(str(path))
    with pytest.raises(pyvips.Error):
        header.avg()  # the trap: header fine, pixels fail
    slide = vipsnorm.open(path)
    assert slide.backend == "openslide" and slide.vendor == "aperio" and slide.mpp == (0.5, 0.5)
    np.testing.assert_array_equal(slide.level_image(0).numpy(), pixels)  # lossless J2K


@needs_data
@pytest.mark.parametrize(
    "name,bands",
    [("images/rgba.png", 3), ("images/1bit.tif", 1), ("images/sample.jpg", 3)],
)
def test_pixels_become_uchar_grey_or_rgb(name, bands):
    image = vipsnorm.open(DATA / name).level_image(0)
    assert image.format == "uchar" and image.bands == bands


@needs_data
def test_alpha_is_flattened_on_white():
    raw = pyvips.Image.new_from_file(str(DATA / "images" / "rgba.png")).numpy()
    out = vipsnorm.open(DATA / "images" / "rgba.png").level_image(0).numpy()
    transparent = raw[..., 3] == 0
    assert transparent.any()
    assert (out[transparent] == 255).all()
    opaque = raw[..., 3] == 255
    np.testing.assert_array_equal(out[opaque], raw[..., :3][opaque])


@needs_data
def test_signed_8bit_is_shifted_not_clipped(tmp_path):
    # one plane of the shared signed 8-bit OME-TIFF
    raw = pyvips.Image.new_from_file(str(DATA / "images" / "multi-channel-z-series.ome.tif"))
    assert raw.format == "char"
    raw.tiffsave(str(tmp_path / "plane.tif"))
    out = vipsnorm.open(tmp_path / "plane.tif").level_image(0).numpy().astype(int)
    np.testing.assert_array_equal(out, raw.numpy().astype(int) + 128)


@needs_data
def test_multi_plane_tiff_is_refused_not_cut_to_its_first_plane(tmp_path):
    with pytest.raises(vipsnorm.UnsupportedImageError, match="holds 15 planes of 439x167"):
        vipsnorm.open(DATA / "images" / "multi-channel-z-series.ome.tif")
    # a generated stack of equal pages
    page = pyvips.Image.new_from_array(np.arange(64 * 48, dtype=np.uint8).reshape(48, 64) % 251)
    stack = pyvips.Image.arrayjoin([page, page], across=1).copy()
    stack.set_type(pyvips.GValue.gint_type, "page-height", 48)
    stack.tiffsave(str(tmp_path / "stack.tif"))
    with pytest.raises(vipsnorm.UnsupportedImageError, match="holds 2 planes of 64x48"):
        vipsnorm.open(tmp_path / "stack.tif")


def test_16bit_is_scaled_over_the_full_range(tmp_path):
    values = np.array([[0, 257, 32896, 65535, 1000]], dtype=np.uint16)
    path = tmp_path / "u16.png"
    pyvips.Image.new_from_array(values).copy(interpretation="grey16").pngsave(str(path))
    out = vipsnorm.open(path).level_image(0).numpy()
    np.testing.assert_array_equal(out, [[0, 1, 128, 255, 4]])  # round(v / 257)


def test_cmyk_and_palette_become_rgb(tmp_path):
    rgb = pyvips.Image.new_from_array(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    rgb = rgb.copy(interpretation="srgb")
    rgb.colourspace("cmyk").jpegsave(str(tmp_path / "cmyk.jpg"))
    rgb.pngsave(str(tmp_path / "palette.png"), palette=True)
    for name in ("cmyk.jpg", "palette.png"):
        image = vipsnorm.open(tmp_path / name).level_image(0)
        assert image.bands == 3 and image.format == "uchar"
        assert np.abs(image.numpy().astype(int) - rgb.numpy()).mean() < 40  # same picture, roughly


def test_float_pixels_are_refused_clearly(tmp_path):
    path = tmp_path / "f.tif"
    pyvips.Image.new_from_array(np.ones((4, 4), np.float32)).tiffsave(str(path))
    with pytest.raises(vipsnorm.UnsupportedImageError, match=r"f\.tif: float pixels"):
        vipsnorm.open(path).level_image(0)
    # RGB float: libvips calls every one scRGB (linear, 0..1), whatever range its writer used
    import tifffile

    rgb = np.random.default_rng(0).random((40, 60, 3)).astype(np.float32)
    for scale in (1, 255, 65535):
        path = tmp_path / f"rgb{scale}.tif"
        tifffile.imwrite(path, rgb * scale, photometric="rgb")
        with pytest.raises(vipsnorm.UnsupportedImageError, match="float pixels have no defined range"):
            vipsnorm.open(path).level_image(0)


def test_jpeg_resolution_is_not_a_pixel_size(tmp_path):
    path = tmp_path / "a.jpg"
    pyvips.Image.black(8, 8).jpegsave(str(path))
    assert vipsnorm.open(path).mpp is None


def test_written_pyramid_opens_in_openslide_and_tifffile_with_pixel_size(tmp_path):
    image = pyvips.Image.new_from_array(np.random.default_rng(0).integers(0, 256, (1500, 2100, 3), dtype=np.uint8))
    out = write_pyramid(image.copy(interpretation="srgb"), tmp_path / "p.tif", mpp=(0.25, 0.26))
    osr = openslide.OpenSlide(str(out))
    assert osr.properties["openslide.vendor"] == "generic-tiff"
    assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-4)
    assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.26, rel=1e-4)
    assert osr.level_count >= 3
    with tifffile.TiffFile(out) as tif:
        levels = tif.series[0].levels
        assert len(levels) == osr.level_count
        assert levels[0].shape == (1500, 2100, 3)
        assert tif.pages[0].tilewidth == 256 and tif.is_bigtiff
    assert not list(tmp_path.glob(f"*{PART_MARKER}*"))


def test_pyramid_without_pixel_size_claims_none(tmp_path):
    image = pyvips.Image.new_from_array(np.zeros((600, 600, 3), np.uint8)).copy(interpretation="srgb")
    out = write_pyramid(image, tmp_path / "p.tif", mpp=None, compression="deflate")
    assert "openslide.mpp-x" not in openslide.OpenSlide(str(out)).properties
    assert vipsnorm.open(out).mpp is None


@needs_data
def test_vendor_description_is_not_copied(tmp_path):
    slide = vipsnorm.open(DATA / "slides" / "CMU-1-Small-Region.svs")
    out = write_pyramid(slide.level_image(0), tmp_path / "c.tif", mpp=slide.mpp)
    osr = openslide.OpenSlide(str(out))
    assert osr.properties["openslide.vendor"] == "generic-tiff"  # an Aperio description would say aperio
    assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.499, rel=1e-4)


def test_lossless_pyramid_round_trips(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (700, 900, 3), dtype=np.uint8)
    for compression in ("deflate", "lzw"):
        out = write_pyramid(pyvips.Image.new_from_array(pixels).copy(interpretation="srgb"), tmp_path / f"{compression}.tif", compression=compression)
        np.testing.assert_array_equal(pyvips.Image.new_from_file(str(out)).numpy(), pixels)


def test_failed_write_leaves_nothing(tmp_path):
    # a pipeline that fails while pixels are computed, mid-write
    truncated = tmp_path / "t.jpg"
    pyvips.Image.black(2000, 2000, bands=3).jpegsave(str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:3000])
    image = pyvips.Image.new_from_file(str(truncated), fail_on="error")
    with pytest.raises(pyvips.Error):
        write_pyramid(image, tmp_path / "out.tif")
    with pytest.raises(pyvips.Error):
        write_image(image, tmp_path / "out.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jpg"]


@pytest.mark.parametrize(
    "stem, kept_bytes",
    # 255 - ".vipsnorm-part-XXXXXXXX" (24) - ".png" (4) = 227 bytes for NAME; an "é" takes 2, kept whole
    [
        ("L" * 227, 227),
        ("L" * 231, 227),
        ("L" * 251, 227),
        ("é" * 125 + "L", 226),
        ("L" + "é" * 125, 227),
        ("x" * 240 + "\udcff", 227),  # an undecodable byte, as os.listdir gives it
    ],
)
def test_temporary_names_fit_in_a_file_name_whenever_the_output_name_does(tmp_path, stem, kept_bytes):
    """An output name of up to 255 bytes is written: its temporary name (24 bytes more) is cut short in
    its NAME part, never inside a UTF-8 character, keeping the marker and the suffix."""
    path = tmp_path / f"{stem}.png"
    assert len(os.fsencode(path.name)) <= 255
    with atomic_path(path) as temp:
        name = os.fsencode(temp.name)
        assert len(name) <= 255 and temp.suffix == ".png" and temp.parent == tmp_path
        kept = os.fsdecode(name.split(os.fsencode(PART_MARKER))[0][1:])
        assert stem.startswith(kept) and len(os.fsencode(kept)) == kept_bytes
        pyvips.Image.black(4, 4).pngsave(str(temp))
    assert path.is_file() and sorted(os.listdir(tmp_path)) == [path.name]


def test_an_image_with_the_longest_name_is_written(tmp_path):
    out = write_image(pyvips.Image.black(8, 8, bands=3), tmp_path / ("L" * 251 + ".jpg"))
    assert pyvips.Image.new_from_file(str(out)).width == 8 and os.listdir(tmp_path) == [out.name]


def test_an_output_name_too_long_is_one_error_naming_it(tmp_path):
    path = tmp_path / ("L" * 252 + ".tiff")
    with pytest.raises(OutputError) as caught:
        write_image(pyvips.Image.black(8, 8), path)
    assert str(caught.value) == f"{path}: the output name is 257 bytes, more than the 255 a file name can have here; give a shorter name"
    with pytest.raises(OutputError, match="rename the input$"):
        check_name(path, fix="rename the input")
    check_name(tmp_path / ("L" * 251 + ".tif"))
    assert os.listdir(tmp_path) == []


def forget_name_limits() -> None:
    """Empty the cache of the name limits of folders (:func:`vipsnorm.io.write.name_max`)."""
    from vipsnorm.io import write

    cached = getattr(write, "_pathconf_name_max", None)
    if cached is not None:
        cached.cache_clear()


def test_the_file_system_is_asked_for_its_name_limit_once_per_folder_and_not_for_short_names(tmp_path, monkeypatch):
    """``pathconf`` is a ``statfs``, a server round trip on NFS: a batch used to ask three times per
    output (the engine's check of the final name, the writer's check and its temporary name)."""
    from vipsnorm.engine import build_method, normalize_file
    from vipsnorm.io import write

    calls = []
    real = os.pathconf

    def pathconf(path, name):
        calls.append(os.fspath(path))
        return real(path, name)

    monkeypatch.setattr(os, "pathconf", pathconf)
    forget_name_limits()
    pixels = np.random.default_rng(0).integers(20, 200, (16, 16, 3), dtype=np.uint8)
    image = pyvips.Image.new_from_array(pixels).copy(interpretation="srgb")
    src = tmp_path / "in.png"
    image.pngsave(str(src))
    (tmp_path / "out").mkdir()
    for i in range(3):  # names that fit, with their temporary names, in any file system's names: not asked
        write_image(image, tmp_path / "out" / f"short{i}.tif")
        assert normalize_file(src, tmp_path / "out", build_method("stretch"), name=f"n{i}").status == "ok"
    assert calls == []
    for i in range(3):  # long ones: the folder is asked once
        write_image(image, tmp_path / "out" / (f"{i}" + "L" * 200 + ".png"))
    assert calls == [str(tmp_path / "out")]
    # a folder that cannot be asked (not created yet) is asked again once it exists
    calls.clear()
    later = tmp_path / "later"
    assert write.name_max(later) == write.NAME_MAX and calls == [str(later)]
    later.mkdir()
    write.name_max(later)
    write.name_max(later)  # answered from the cache
    assert calls == [str(later), str(later)]


def test_a_short_name_limit_is_still_found_for_long_names(tmp_path, monkeypatch):
    """eCryptfs takes 143 bytes: the names not asked about are those that fit there."""
    monkeypatch.setattr(os, "pathconf", lambda path, name: 143)
    forget_name_limits()
    try:
        check_name(tmp_path / ("L" * 99 + ".tif"))  # 103 + 40 <= 143: not asked, and it fits
        check_name(tmp_path / ("L" * 139 + ".tif"))  # 143 bytes: asked, and it fits
        with pytest.raises(OutputError, match="144 bytes, more than the 143"):
            check_name(tmp_path / ("L" * 140 + ".tif"))
        with atomic_path(tmp_path / ("L" * 139 + ".tif")) as temp:
            assert len(os.fsencode(temp.name)) <= 143
            temp.write_bytes(b"done")
    finally:
        forget_name_limits()  # not this fake's answers for the next test's folders


def test_ome_tiff_subifd_pyramid_levels_and_physical_size(tmp_path):
    pixels = np.random.default_rng(4).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    path = tmp_path / "p.ome.tif"
    image = pyvips.Image.new_from_array(pixels).copy(interpretation="srgb")
    ome = (
        '<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
        '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="1600" SizeY="1200" '
        'SizeC="3" SizeZ="1" SizeT="1" PhysicalSizeX="0.325" PhysicalSizeY="0.33" PhysicalSizeXUnit="µm">'
        "</Pixels></Image></OME>"
    )
    image.set_type(pyvips.GValue.gstr_type, "image-description", ome)
    image.tiffsave(str(path), tile=True, pyramid=True, subifd=True, compression="deflate")
    slide = vipsnorm.open(path)
    assert [lvl.width for lvl in slide.levels] == [1600, 800, 400, 200, 100]
    assert slide.mpp == pytest.approx((0.325, 0.33))
    np.testing.assert_array_equal(slide.level_image(0).numpy(), pixels)
    assert slide.level_image(2).width == 400


def test_backend_can_be_forced(tmp_path):
    from vipsnorm.synth import write_synthetic_slide

    path = write_synthetic_slide(tmp_path / "s.tif", 900, 700, compression="deflate")
    forced = vipsnorm.open(path, backend="openslide")
    native = vipsnorm.open(path, backend="libvips")
    assert (forced.backend, native.backend) == ("openslide", "libvips")
    np.testing.assert_array_equal(forced.level_image(0).numpy(), native.level_image(0).numpy())
    plain = tmp_path / "plain.png"
    pyvips.Image.black(8, 8).pngsave(str(plain))
    with pytest.raises(vipsnorm.UnsupportedImageError, match="OpenSlide does not recognise"):
        vipsnorm.open(plain, backend="openslide")
    with pytest.raises(ValueError):
        vipsnorm.open(plain, backend="bioformats")


def test_a_replaced_file_is_read_again_not_from_the_libvips_cache(tmp_path):
    import os

    path = tmp_path / "x.png"
    pyvips.Image.black(10, 10).pngsave(str(path))
    assert vipsnorm.open(path).level_image(0).avg() == 0
    replacement = tmp_path / "y.png"
    (pyvips.Image.black(20, 20) + 255).cast("uchar").pngsave(str(replacement))
    os.replace(replacement, path)  # as an atomic writer (or a re-run) would
    slide = vipsnorm.open(path)
    assert slide.dimensions == (20, 20) and slide.level_image(0).avg() == 255


def test_an_output_name_too_long_for_the_file_system_is_one_line_naming_it(tmp_path):
    from vipsnorm.engine import Options, build_method, normalize_file

    src = tmp_path / ("a" * 251 + ".jpg")  # 255 bytes: the longest name; as .webp it would be 256
    pyvips.Image.black(64, 48, bands=3).new_from_image([200, 100, 50]).cast("uchar").jpegsave(str(src))
    (tmp_path / "out").mkdir()
    result = normalize_file(src, tmp_path / "out", build_method("equalize"), options=Options(format="webp"))
    assert result.status == "error" and "internal error" not in result.error
    assert "256 bytes" in result.error and "rename the input" in result.error
    assert os.listdir(tmp_path / "out") == []


def test_float_scrgb_outside_tiff_is_linear_light(tmp_path):
    # scRGB is linear 0..1 by its format's definition (a libvips .v file here): converted, not refused
    linear = np.random.default_rng(0).random((20, 30, 3)).astype(np.float32)
    pyvips.Image.new_from_array(linear).copy(interpretation="scrgb").write_to_file(str(tmp_path / "x.v"))
    out = vipsnorm.open(tmp_path / "x.v").level_image(0)
    assert out.format == "uchar" and out.bands == 3
    expected = pyvips.Image.new_from_array(linear).copy(interpretation="scrgb").colourspace("srgb").numpy()
    np.testing.assert_array_equal(out.numpy(), expected)


# --------------------------------------------------------------------------------------------------
# the pixel size of ordinary images, and what the writers refuse


def _read(path: Path) -> pyvips.Image:
    return pyvips.Image.new_from_file(str(path), access="sequential")  # (each test file has its own name)


@pytest.mark.parametrize("suffix", [".tif", ".png", ".jpg", ".webp"])
def test_write_image_states_the_pixel_size_it_is_given(suffix, tmp_path):
    """write_image had no mpp: a TIFF took the input's dpi (a JPEG's 300 dpi) or libvips' default
    1 px/mm for a pixel size; a slide written as PNG said 1000 um a pixel."""
    from PIL import Image

    image = pyvips.Image.black(16, 12, bands=3).copy(interpretation="srgb", xres=300 / 25.4, yres=300 / 25.4)
    out = write_image(image, tmp_path / f"mpp{suffix}", mpp=(0.499, 0.5))
    if suffix == ".tif":
        assert vipsnorm.open(out).mpp == pytest.approx((0.499, 0.5), rel=1e-6)
        with tifffile.TiffFile(out) as tif:
            tags = tif.pages[0].tags
            assert tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            x, y = (tags[name].value[0] / tags[name].value[1] for name in ("XResolution", "YResolution"))
            assert (1e4 / x, 1e4 / y) == pytest.approx((0.499, 0.5), rel=1e-6)
    elif suffix == ".webp":  # libvips writes it into the EXIF only, in dots per inch
        assert _read(out).get("exif-ifd0-XResolution").startswith("50901803/1000 ")  # 25400 / 0.499
        assert _read(out).get("exif-ifd0-YResolution").startswith("50800000/1000 ")
    else:
        assert (1000 / _read(out).xres, 1000 / _read(out).yres) == pytest.approx((0.499, 0.5), rel=1e-6)
        with Image.open(out) as written:
            assert written.info["dpi"][0] == pytest.approx(25400 / 0.499, rel=1e-6)
    if suffix != ".tif":
        assert vipsnorm.open(out).mpp is None  # a JPEG's, PNG's or WebP's resolution is never read as a pixel size


@pytest.mark.parametrize("suffix", [".tif", ".png", ".jpg"])
def test_write_image_without_a_pixel_size_claims_none(suffix, tmp_path):
    """A TIFF says "no unit" (its resolution is no pixel size); a JPEG or PNG keeps the input's dpi."""
    image = pyvips.Image.black(16, 12, bands=3).copy(interpretation="srgb", xres=300 / 25.4, yres=300 / 25.4)
    out = write_image(image, tmp_path / f"none{suffix}")
    assert vipsnorm.open(out).mpp is None
    if suffix == ".tif":
        with tifffile.TiffFile(out) as tif:
            assert tif.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE
    else:
        assert _read(out).xres == pytest.approx(300 / 25.4, rel=1e-3)


@pytest.mark.parametrize("mpp", [(0, 0), (-1, -1), (float("nan"),) * 2, (float("inf"),) * 2, (1e-12, 1e-12), (0.5,), (0.25, 2e6)])
def test_writers_refuse_a_pixel_size_they_cannot_state(mpp, tmp_path):
    """(0, 0) was a ZeroDivisionError; a negative, NaN, infinite or tiny one a GLib-CRITICAL and 72 dpi."""
    image = pyvips.Image.black(16, 16, bands=3).copy(interpretation="srgb")
    with pytest.raises(ValueError, match=r"mpp must be None .* from 0\.01 to 1e\+?0?6"):
        write_pyramid(image, tmp_path / "p.tif", mpp=mpp)
    with pytest.raises(ValueError, match="mpp must be None"):
        write_image(image, tmp_path / "i.tif", mpp=mpp)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("quality", [0, 101, 1000, -5, 2.5, True])
def test_writers_refuse_a_quality_outside_1_to_100(quality, tmp_path):
    """quality=0 or 1000 was dropped silently (libvips' default used)."""
    image = pyvips.Image.black(16, 16, bands=3).copy(interpretation="srgb")
    with pytest.raises(ValueError, match="quality must be a whole number from 1 to 100"):
        write_pyramid(image, tmp_path / "p.tif", quality=quality)
    for name in ("i.jpg", "i.webp", "i.tif"):
        with pytest.raises(ValueError, match="quality must be a whole number from 1 to 100"):
            write_image(image, tmp_path / name, quality=quality)
    assert list(tmp_path.iterdir()) == []


def test_write_image_refuses_options_its_format_does_not_take(tmp_path):
    image = pyvips.Image.black(16, 16, bands=3).copy(interpretation="srgb")
    for name in ("a.png", "a.jpg", "a.webp"):
        with pytest.raises(ValueError, match="compression is for TIFF outputs only"):
            write_image(image, tmp_path / name, compression="jpeg")
    for name in ("a.png", "a.jpg", "a.tif"):
        with pytest.raises(ValueError, match="lossless is for WebP outputs only"):
            write_image(image, tmp_path / name, lossless=True)
    assert list(tmp_path.iterdir()) == []


def test_lossless_webp_is_told_from_the_file(tmp_path):
    from vipsnorm.io.write import lossless_webp

    pixels = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    image = pyvips.Image.new_from_array(pixels).copy(interpretation="srgb")
    image.webpsave(str(tmp_path / "ll.webp"), lossless=True)
    image.webpsave(str(tmp_path / "ly.webp"), Q=95)
    image.bandjoin(255).webpsave(str(tmp_path / "ll-alpha.webp"), lossless=True)  # extended (VP8X) files
    image.bandjoin(255).webpsave(str(tmp_path / "ly-alpha.webp"), Q=95)
    (tmp_path / "bad.webp").write_bytes(b"RIFF\x04\x00\x00\x00WEBP")
    assert [lossless_webp(tmp_path / n) for n in ("ll.webp", "ly.webp", "ll-alpha.webp", "ly-alpha.webp", "bad.webp")] == [
        True, False, True, False, False
    ]
    assert not lossless_webp(tmp_path / "missing.webp")
    out = write_image(image, tmp_path / "out.webp", lossless=True)
    assert lossless_webp(out)
    np.testing.assert_array_equal(_read(out).numpy(), pixels)
