"""The small-image fast path: an ordinary image of at most ``SMALL_IMAGE_PIXELS`` is decoded once, into
memory, and that one image serves the probe, the fit and the write. It must change nothing but the time:
the same samples, the same parameters, the same output bytes and the same errors as streaming, which every
test here forces by setting the threshold to 0. Slides and larger images keep streaming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pyvips

import vipsnorm
import vipsnorm.io.slide as slide_module
from vipsnorm.engine import build_method, load_reference, normalize_file
from vipsnorm.errors import UnreadableImageError, UnsupportedImageError
from vipsnorm.methods._hist import STEP, counts, luma_array, luma_image
from vipsnorm.sampling import sample_slide
from vipsnorm.synth import synthetic_slide, write_synthetic_slide

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")


@pytest.fixture
def streaming(monkeypatch):
    """``streaming(True)``: from then on every image streams (the code path before the fast path existed);
    ``streaming(False)``: back to the fast path."""

    threshold = slide_module.SMALL_IMAGE_PIXELS

    def use(on: bool):
        monkeypatch.setattr(slide_module, "SMALL_IMAGE_PIXELS", 0 if on else threshold)

    return use


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Ordinary images of every kind the fast path meets: real tiles (JPEG, PNG with alpha), grey, grey
    with alpha, 16-bit colour and grey, signed 8-bit, 1-bit, palette."""
    d = tmp_path_factory.mktemp("fast")
    found: dict[str, Path] = {}
    if DATA.is_dir():
        for name in ("tiles/kather-template.jpg", "tiles/henorm-example1.png", "tiles/histolab-source-low.png",
                     "tiles/torchstain-source.png", "images/sample.jpg", "images/rgba.png", "images/1bit.tif"):
            found[name] = DATA / name
    tile = synthetic_slide(320, 240, seed=11, tissue=0.7)
    grey = tile.colourspace("b-w")
    tile.jpegsave(str(d / "synthetic.jpg"), Q=85)
    grey.jpegsave(str(d / "grey.jpg"), Q=90)
    grey.bandjoin((grey > 200).ifthenelse(0, 255).cast("uchar")).copy(interpretation="b-w").pngsave(str(d / "grey-alpha.png"))
    rng = np.random.default_rng(0)
    wide = tile.numpy().astype(np.uint16) * 257 + rng.integers(0, 257, (240, 320, 3), dtype=np.uint16)
    pyvips.Image.new_from_array(wide).copy(interpretation="rgb16").pngsave(str(d / "rgb16.png"))
    pyvips.Image.new_from_array(wide[..., 1]).copy(interpretation="grey16").pngsave(str(d / "grey16.png"))
    tile.pngsave(str(d / "palette.png"), palette=True)
    for name in ("synthetic.jpg", "grey.jpg", "grey-alpha.png", "rgb16.png", "grey16.png", "palette.png"):
        found[name] = d / name
    return found


def _sample(path: Path, **options):
    with vipsnorm.open(path) as slide:
        return sample_slide(slide, **options), slide.decoded_pixels() is not None


def _assert_same_sample(a, b):
    np.testing.assert_array_equal(a.hist, b.hist)
    assert (a.bands, a.source, a.background) == (b.bands, b.source, b.background)
    if a.pixels is None:
        assert b.pixels is None
    else:
        np.testing.assert_array_equal(a.pixels, b.pixels)


# --------------------------------------------------------------------------------------------------
# the same samples


@pytest.mark.parametrize("pixels", [0, 500, 2_000_000])
def test_fast_sample_equals_streaming_sample(images, streaming, pixels):
    for name, path in images.items():
        fast, in_memory = _sample(path, pixels=pixels)
        assert in_memory, name
        streaming(True)
        slow, in_memory = _sample(path, pixels=pixels)
        streaming(False)
        assert not in_memory
        _assert_same_sample(fast, slow)


def test_fast_sample_with_tissue_equals_streaming(images, streaming):
    """``--tissue`` on an ordinary image goes through the tissue mask on the in-memory image."""
    path = images["synthetic.jpg"]
    fast, in_memory = _sample(path, tissue=True, pixels=1000)
    assert in_memory
    streaming(True)
    slow, _ = _sample(path, tissue=True, pixels=1000)
    _assert_same_sample(fast, slow)


def test_in_memory_pixels_are_the_streamed_pixels(images, streaming):
    for name, path in images.items():
        slide = vipsnorm.open(path)
        array = slide.decoded_pixels()
        streaming(True)
        streamed = vipsnorm.open(path)
        streaming(False)
        assert streamed.decoded_pixels() is None
        expected = streamed.level_image(0).numpy()
        np.testing.assert_array_equal(array.reshape(expected.shape), expected, err_msg=name)
        assert slide.level_image(0) is slide.level_image(0)  # the one decoded image, every time
        np.testing.assert_array_equal(slide.read_region(0, 3, 2, 50, 40), streamed.read_region(0, 3, 2, 50, 40))


# --------------------------------------------------------------------------------------------------
# the same outputs, byte for byte


@pytest.fixture(scope="module")
def methods(tmp_path_factory):
    reference = DATA / "tiles" / "histolab-target.png"
    if not reference.is_file():
        reference = tmp_path_factory.mktemp("ref") / "reference.png"
        synthetic_slide(256, 256, seed=2, lab="pale-blue", tissue=0.8).pngsave(str(reference))
    return {
        "equalize": build_method("equalize"),
        "equalize rgb": build_method("equalize", mode="rgb"),
        "stretch": build_method("stretch"),
        "stretch rgb": build_method("stretch", mode="rgb"),
        "match": build_method("match", load_reference(reference, "match")),
        "reinhard": build_method("reinhard", load_reference(reference, "reinhard")),
        "macenko": build_method("macenko"),
    }


@pytest.mark.parametrize("method", ["equalize", "equalize rgb", "stretch", "stretch rgb", "match", "reinhard", "macenko"])
def test_fast_output_is_byte_identical(images, methods, method, streaming, tmp_path):
    colour_only = method in ("reinhard", "macenko")
    for name, path in images.items():
        fast_dir, slow_dir = tmp_path / "fast" / name, tmp_path / "slow" / name
        fast_dir.mkdir(parents=True)
        slow_dir.mkdir(parents=True)
        fast = normalize_file(path, fast_dir, methods[method])
        streaming(True)
        slow = normalize_file(path, slow_dir, methods[method])
        streaming(False)
        assert (fast.status, fast.error) == (slow.status, slow.error), name
        if colour_only and slow.status == "error":
            continue  # grey images: "needs a colour image", the same error both ways
        assert fast.status == "ok", fast.error
        assert fast.params == slow.params, name
        assert fast.output.name == slow.output.name
        assert fast.output.read_bytes() == slow.output.read_bytes(), f"{method} on {name}"


# --------------------------------------------------------------------------------------------------
# the same errors, at the same place


def _truncated(tmp_path: Path, kind: str) -> Path:
    image = synthetic_slide(400, 300, seed=5, tissue=0.7)
    data = image.jpegsave_buffer(Q=90) if kind == "jpg" else image.pngsave_buffer()
    path = tmp_path / f"truncated.{kind}"
    path.write_bytes(data[: len(data) * 6 // 10])
    return path


def _first_cause(error: UnreadableImageError) -> str:
    # libvips appends "jpegload: load error" or not depending on what the process did before (the same
    # file opened twice by the code before the fast path gives both), so compare the first cause only
    return error.cause.split(";")[0].rstrip(")")


@pytest.mark.parametrize("kind,cause", [("jpg", "VipsJpeg: premature end of JPEG image"), ("png", "vipspng: libpng read error")])
def test_truncated_small_image_is_the_same_error(kind, cause, tmp_path, streaming):
    """libvips fills a truncated JPEG with grey unless told to fail: the one decode must fail instead,
    with the cause the streaming probe gives."""
    path = _truncated(tmp_path, kind)
    with pytest.raises(UnreadableImageError) as fast:
        vipsnorm.open(path)
    streaming(True)
    with pytest.raises(UnreadableImageError) as slow:
        vipsnorm.open(path)
    assert _first_cause(fast.value) == _first_cause(slow.value) == f"cannot decode pixels ({cause}"
    assert fast.value.path == slow.value.path == str(path)


@needs_data
def test_shared_truncated_jpeg_is_the_same_error(streaming):
    path = DATA / "bad" / "truncated.jpg"
    with pytest.raises(UnreadableImageError) as fast:
        vipsnorm.open(path)
    streaming(True)
    with pytest.raises(UnreadableImageError) as slow:
        vipsnorm.open(path)
    assert _first_cause(fast.value) == _first_cause(slow.value)
    assert "premature end" in fast.value.cause.lower()


def test_unsupported_pixels_still_fail_where_they_did(tmp_path):
    """Float pixels open (the header is fine) and are refused when read, as when streaming."""
    path = tmp_path / "f.tif"
    pyvips.Image.new_from_array(np.ones((4, 4), np.float32)).tiffsave(str(path))
    slide = vipsnorm.open(path)
    assert slide.decoded_pixels() is None
    with pytest.raises(UnsupportedImageError, match="float pixels"):
        slide.level_image(0)


# --------------------------------------------------------------------------------------------------
# what streams


def test_slides_and_large_images_stream(small_slide, tmp_path, monkeypatch):
    with vipsnorm.open(small_slide) as slide:
        assert slide.is_slide and slide.decoded_pixels() is None
    # a flat (one-level) TIFF is an ordinary image: held in memory only up to the threshold
    path = tmp_path / "flat.tif"
    synthetic_slide(300, 200, seed=1).tiffsave(str(path))
    assert vipsnorm.open(path).decoded_pixels() is not None
    monkeypatch.setattr(slide_module, "SMALL_IMAGE_PIXELS", 300 * 200 - 1)
    assert vipsnorm.open(path).decoded_pixels() is None


def test_openslide_is_still_asked_about_files_that_only_look_plain(tmp_path):
    """Vendor detection is skipped only for a JPEG or PNG signature under its own suffix."""
    disguised = write_synthetic_slide(tmp_path / "slide.jpg", 1024, 768, seed=2)
    slide = vipsnorm.open(disguised)
    assert slide.vendor == "generic-tiff" and slide.is_slide
    jpeg_as_png = tmp_path / "photo.png"
    synthetic_slide(64, 48, seed=1).jpegsave(str(jpeg_as_png))
    slide = vipsnorm.open(jpeg_as_png)
    assert slide.vendor is None and slide.loader.startswith("jpegload")


# --------------------------------------------------------------------------------------------------
# the arithmetic it relies on


def test_luma_image_is_exact_for_every_colour():
    """The libvips luma (a per-band linear and a band mean in float) equals the integer formula for all
    2**24 colours."""
    v = np.arange(256, dtype=np.uint8)
    cube = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(4096, 4096, 3)
    np.testing.assert_array_equal(luma_image(pyvips.Image.new_from_array(cube)).numpy(), luma_array(cube))


@pytest.mark.parametrize("n", [1, 7, 2 * STEP - 1, 2 * STEP, 2 * STEP + 1, 6 * STEP + 5])
def test_luma_counts_in_steps(n):
    """The luma row of a small image's sample: luma in steps, then counted (what the fit uses)."""
    rgb = np.random.default_rng(n).integers(0, 256, (n, 1, 3), dtype=np.uint8)
    np.testing.assert_array_equal(counts(luma_array(rgb)), np.bincount(luma_array(rgb).reshape(-1), minlength=256))
