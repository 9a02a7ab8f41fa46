"""Small images mapped in place: the decoded pixels of a small image are handed to the method, which maps
them in their own buffer with the native kernel (no libvips pipeline), and the output is written from
that buffer. The bytes written must be those of the lazy path, the input must never change, and a
buffer the slide does not own (a file libvips maps into memory) is never written to."""

from __future__ import annotations

import gc
import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import pyvips

from vipsnorm import _native
from vipsnorm.errors import UnsupportedImageError
from vipsnorm.engine import Options, build_method, fit_slide, load_reference, normalize_file
from vipsnorm.io.slide import SMALL_IMAGE_PIXELS, open_slide

pytestmark = pytest.mark.skipif(not _native.available(), reason=f"native kernel: {_native.reason()}")

#: label -> (method name, options)
METHODS = {
    "stretch": ("stretch", {}),
    "stretch rgb": ("stretch", {"mode": "rgb"}),
    "equalize": ("equalize", {}),
    "equalize rgb": ("equalize", {"mode": "rgb"}),
    "match": ("match", {}),
    "match luminance": ("match", {"mode": "luminance"}),
    "reinhard": ("reinhard", {}),
    "macenko": ("macenko", {}),
}
STAIN = ("reinhard", "macenko")


@pytest.fixture(scope="module")
def methods(shared_data):
    out = {}
    for label, (name, options) in METHODS.items():
        reference = None
        if name in ("match", "reinhard"):  # (match and reinhard need a target)
            reference = load_reference(shared_data / "tiles" / "histolab-target.png", name)
        out[label] = build_method(name, reference, **options)
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fitted(method, path: Path):
    with open_slide(path) as slide, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fit_slide(slide, method, Options())


# --- memory_pixels ---------------------------------------------------------------------------------


def test_memory_pixels_is_the_image_buffer(shared_data):
    image = pyvips.Image.new_from_file(str(shared_data / "tiles" / "kather-template.jpg"), access="sequential").copy_memory()
    expected = image.numpy()
    view = _native.memory_pixels(image)
    assert view.shape == (image.height, image.width, 3) and view.dtype == np.uint8
    np.testing.assert_array_equal(view, expected)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0, 0, 0] = 1
    # the same memory, not a copy: a writable view's change shows in the image and in the first view
    writable = _native.memory_pixels(image, writable=True)
    writable[0, 0] = (1, 2, 3)
    assert tuple(view[0, 0]) == (1, 2, 3)
    assert bytes(pyvips.Region.new(image).fetch(0, 0, 1, 1)) == bytes((1, 2, 3))
    # the array keeps the image alive (its base holds it)
    assert view.base.image is image
    del image, writable
    gc.collect()
    np.testing.assert_array_equal(view[1:], expected[1:])


def test_memory_pixels_refuses_without_kernel_or_uchar():
    image = pyvips.Image.black(8, 8, bands=3).copy_memory()
    assert _native.memory_pixels(image) is not None
    lazy = pyvips.Image.black(8, 8, bands=3) + 1
    assert _native.memory_pixels(lazy.cast("uchar"), writable=True) is None  # (never computed into memory)
    with _native.switched_off():
        assert _native.memory_pixels(image) is None
    assert _native.memory_pixels(image.cast("ushort").copy_memory()) is None


# --- take_decoded ------------------------------------------------------------------------------------


def test_take_decoded_hands_the_pixels_over(shared_data, tmp_path):
    path = tmp_path / "tile.jpg"
    shutil.copy(shared_data / "tiles" / "kather-template.jpg", path)
    with open_slide(path) as slide:
        assert slide.holds_decoded()
        seen = slide.decoded_pixels().copy()
        image, pixels = slide.take_decoded()
        assert pixels.flags.writeable and pixels.flags.c_contiguous
        np.testing.assert_array_equal(pixels, seen)
        assert (image.width, image.height, image.bands) == (seen.shape[1], seen.shape[0], 3)
        # the slide no longer holds them: nothing it gives later sees a change made to them
        assert not slide.holds_decoded() and slide.decoded_pixels() is None and slide.take_decoded() is None
        pixels[:] = 0
        np.testing.assert_array_equal(slide.level_image(0).numpy(), seen)  # read from the file again


def test_take_decoded_is_off_without_the_kernel(shared_data):
    with _native.switched_off(), open_slide(shared_data / "tiles" / "kather-template.jpg") as slide:
        assert slide.holds_decoded() and slide.take_decoded() is None and slide.holds_decoded()


def test_a_buffer_the_slide_does_not_own_is_never_written(shared_data, tmp_path, methods, monkeypatch):
    """copy_memory hands back an image that is already in memory rather than copying it: such a buffer
    is not the slide's, so it is not handed over, and stays as it was."""
    from vipsnorm.io import slide as slide_module

    source = shared_data / "tiles" / "torchstain-source.png"
    pixels = np.ascontiguousarray(pyvips.Image.new_from_file(str(source)).numpy()[..., :3])
    shared = pyvips.Image.new_from_array(pixels).copy(interpretation="srgb").copy_memory()
    assert shared.copy_memory().pointer == shared.pointer  # (what libvips does with a memory image)
    monkeypatch.setattr(slide_module, "to_processing", lambda image, path=None: shared)
    with open_slide(source) as slide:
        assert slide.holds_decoded() and slide.take_decoded() is None
    (tmp_path / "out").mkdir()
    for label in ("stretch", "macenko"):
        result = normalize_file(source, tmp_path / "out", methods[label], options=Options(format="png"), name=label)
        assert result.status == "ok", result.error
        np.testing.assert_array_equal(shared.numpy(), pixels)
    out = pyvips.Image.new_from_file(str(tmp_path / "out" / "stretch.png")).numpy()
    with open_slide(source) as slide:
        params = fit_slide(slide, methods["stretch"], Options())
    np.testing.assert_array_equal(out, methods["stretch"].apply_array(pixels, params))


# --- apply_in_place ----------------------------------------------------------------------------------


@pytest.mark.parametrize("label", list(METHODS))
def test_apply_in_place_equals_apply(shared_data, methods, label):
    method = methods[label]
    path = shared_data / "tiles" / "histolab-source-medium.png"
    params = _fitted(method, path)
    image = pyvips.Image.new_from_file(str(path)).extract_band(0, n=3).copy(interpretation="srgb")
    expected = method.apply(image, params).numpy()
    pixels = np.ascontiguousarray(image.numpy())
    assert method.apply_in_place(pixels, params)
    np.testing.assert_array_equal(pixels, expected)
    # grey: the LUT methods map it (one LUT); the stain methods leave it to apply, which refuses it
    grey = np.ascontiguousarray(pixels[..., :1])
    kept = grey.copy()
    if METHODS[label][0] in STAIN:
        assert not method.apply_in_place(grey, params)
        np.testing.assert_array_equal(grey, kept)
    elif params.space == "rgb" and params.luts().shape[0] > 1:  # (per channel: which one's for grey?)
        with pytest.raises(UnsupportedImageError, match="grey"):
            method.apply_in_place(grey, params)
    else:
        assert method.apply_in_place(grey, params)
        grey_image = pyvips.Image.new_from_array(kept[..., 0]).copy(interpretation="b-w")
        np.testing.assert_array_equal(grey[..., 0], method.apply(grey_image, params).numpy())


@pytest.mark.parametrize("label", ["stretch", "equalize", "reinhard", "macenko"])
def test_apply_in_place_declines_without_the_kernel(shared_data, methods, label):
    method = methods[label]
    params = _fitted(method, shared_data / "tiles" / "torchstain-source.png")
    pixels = np.ascontiguousarray(pyvips.Image.new_from_file(str(shared_data / "tiles" / "torchstain-source.png")).numpy()[..., :3])
    kept = pixels.copy()
    with _native.switched_off():
        assert not method.apply_in_place(pixels, params)
    np.testing.assert_array_equal(pixels, kept)


def test_spatial_methods_do_not_map_in_place(shared_data):
    method = build_method("clahe")
    pixels = np.zeros((64, 64, 3), np.uint8)
    assert not method.apply_in_place(pixels, None)


# --- the whole job -----------------------------------------------------------------------------------


@pytest.mark.parametrize("label", list(METHODS))
def test_normalize_file_writes_the_bytes_of_the_lazy_path(shared_data, methods, label, tmp_path, monkeypatch):
    """With the kernel, small images are mapped in place; without it, by the libvips chain: the same
    output, byte for byte, and the input untouched (PNG and JPEG inputs, lossless PNG outputs)."""
    method = methods[label]
    mapped = []
    original = type(method).apply_in_place

    def spy(self, pixels, params):
        mapped.append(original(self, pixels, params))
        return mapped[-1]

    monkeypatch.setattr(type(method), "apply_in_place", spy)
    (tmp_path / "fast").mkdir(), (tmp_path / "chain").mkdir()
    for source in ("henorm-example1.png", "kather-template.jpg"):
        path = tmp_path / source
        shutil.copy(shared_data / "tiles" / source, path)
        before = _sha(path)
        fast = normalize_file(path, tmp_path / "fast", method, options=Options(format="png"))
        assert mapped.pop() is True  # (the in-place path was taken)
        with _native.switched_off():
            chain = normalize_file(path, tmp_path / "chain", method, options=Options(format="png"))
        assert fast.status == chain.status == "ok", (fast.error, chain.error)
        assert not mapped  # (and not without the kernel)
        assert fast.params == chain.params
        assert fast.output.read_bytes() == chain.output.read_bytes(), f"{label} on {source}"
        assert _sha(path) == before


def test_jpeg_names_that_hold_other_formats_still_open(shared_data, tmp_path, methods):
    """A file named .jpg is opened first as a JPEG (its header parsed once); a PNG so named opens as a PNG."""
    path = tmp_path / "actually-a-png.jpg"
    (tmp_path / "out").mkdir()
    shutil.copy(shared_data / "tiles" / "torchstain-source.png", path)
    with open_slide(path) as slide:
        assert slide.loader.startswith("pngload") and slide.holds_decoded()
    result = normalize_file(path, tmp_path / "out", methods["stretch"], options=Options(format="png"))
    assert result.status == "ok", result.error


def test_large_jpegs_still_stream(tmp_path):
    side = int(SMALL_IMAGE_PIXELS**0.5) + 64
    path = tmp_path / "large.jpg"
    pyvips.Image.gaussnoise(side, side, mean=128, sigma=30).cast("uchar").bandjoin([128, 128]).copy(
        interpretation="srgb"
    ).jpegsave(str(path))
    with open_slide(path) as slide:
        assert not slide.holds_decoded() and slide._sequential is None
        assert slide.level_image(0).avg() > 0
