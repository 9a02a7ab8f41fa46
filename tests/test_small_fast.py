"""The small-image path without needless work: a fit that does not read the luma does not count it, and a
luminance apply reuses the luma the fit counted. Results must be those of the full computation, bit for bit."""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest

import vipsnorm
from vipsnorm import _native
from vipsnorm.engine import Options, build_method, fit_slide, load_reference, normalize_file, sample_file
from vipsnorm.io import slide as slide_module
from vipsnorm.io.slide import open_slide
from vipsnorm.io.write import write_image
from vipsnorm.methods import Sample
from vipsnorm.methods._hist import apply_luts_image, luma_array
from vipsnorm.sampling import sample_slide

#: method label -> (name, options, whether its fit reads the luma row)
METHODS = {
    "stretch": ("stretch", {}, False),
    "stretch rgb": ("stretch", {"mode": "rgb"}, False),
    "equalize": ("equalize", {}, True),
    "equalize rgb": ("equalize", {"mode": "rgb"}, False),
    "match": ("match", {}, False),
    "match luminance": ("match", {"mode": "luminance"}, True),
}


@pytest.fixture(scope="module")
def tiles(shared_data) -> list[Path]:
    paths = sorted((shared_data / "tiles").glob("*.*"))
    assert len(paths) >= 5
    return paths


@pytest.fixture(scope="module")
def methods(shared_data):
    reference = load_reference(shared_data / "tiles" / "histolab-target.png", "match")
    out = {}
    for label, (name, options, _) in METHODS.items():
        out[label] = build_method(name, reference if name == "match" else None, **options)
    return out


def _grey(tmp_path: Path, src: Path) -> Path:
    import pyvips

    path = tmp_path / f"grey-{src.stem}.png"
    pyvips.Image.new_from_file(str(src)).colourspace("b-w").pngsave(str(path))
    return path


@pytest.mark.parametrize("label", list(METHODS))
def test_methods_declare_what_they_read(methods, label):
    assert methods[label].needs_luma is METHODS[label][2]


@pytest.mark.parametrize("label", list(METHODS))
def test_fit_equals_fit_on_the_full_sample(tiles, methods, label, tmp_path):
    """The params fitted on the small-image path (luma left uncounted where the method does not read it)
    are those fitted on every pixel's full R, G, B, Y histograms."""
    method = methods[label]
    inputs = tiles + [_grey(tmp_path, tiles[0])]
    for path in inputs:
        with open_slide(path) as slide:
            assert slide.holds_decoded()
            pixels = slide.decoded_pixels()
            bands = pixels.shape[-1]
            partial = sample_slide(slide, luma=method.needs_luma)
            # the luma is skipped exactly when the method does not read it, and only for colour
            assert partial.luma_counted == (method.needs_luma or bands == 1), path.name
            full = Sample.from_array(pixels if bands == 3 else pixels[..., 0])
            np.testing.assert_array_equal(partial.hist[:3], full.hist[:3])
            if partial.luma_counted:
                np.testing.assert_array_equal(partial.hist, full.hist)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                assert method.fit(partial) == method.fit(full), f"{label} on {path.name}"
                assert fit_slide(slide, method, Options()) == method.fit(full), f"{label} on {path.name}"


@pytest.mark.parametrize("label", list(METHODS))
def test_output_is_the_full_computation(tiles, methods, label, tmp_path):
    """normalize_file writes the bytes that the plain computation writes: params fitted on the full
    histograms, applied by apply_luts_image (luma computed by libvips), written by write_image."""
    method = methods[label]
    for path in tiles + [_grey(tmp_path, tiles[1])]:
        out = tmp_path / "out" / label.replace(" ", "_")
        out.mkdir(parents=True, exist_ok=True)
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        result = normalize_file(path, out, method)
        assert result.status == "ok", result.error
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # input untouched
        image = vipsnorm.open(path).level_image(0)
        full = Sample.from_array(image.numpy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            params = method.fit(full)
        assert result.params == params
        expected = write_image(apply_luts_image(image, params.luts(), params.space), tmp_path / ("expected" + result.output.suffix))
        assert result.output.read_bytes() == expected.read_bytes(), f"{label} on {path.name}"
        assert not list(out.glob(".*vipsnorm-part*"))


@pytest.mark.parametrize("kernel", ["native kernel", "libvips chain"])
def test_apply_with_given_luma_is_bit_identical(tiles, methods, kernel):
    # (the native kernel computes luma itself; the libvips chain takes the given one)
    with contextlib.nullcontext() if kernel == "native kernel" else _native.switched_off():
        _given_luma_is_bit_identical(tiles, methods)


def _given_luma_is_bit_identical(tiles, methods):
    method = methods["equalize"]
    for path in tiles:
        with open_slide(path) as slide:
            if not slide.holds_decoded() or slide.level_image(0).bands != 3:
                continue
            params = fit_slide(slide, method, Options())
            image = slide.level_image(0)
            luma = slide.decoded_luma()
            assert luma is not None and luma.shape == (image.height, image.width) and not luma.flags.writeable
            assert slide.decoded_luma() is luma  # computed once
            np.testing.assert_array_equal(luma, luma_array(slide.decoded_pixels()))
            with_luma = method.apply(image, params, luma=luma).numpy()
            without = method.apply(image, params).numpy()
            np.testing.assert_array_equal(with_luma, without)
            np.testing.assert_array_equal(with_luma, method.apply_array(slide.decoded_pixels(), params))
    with pytest.raises(ValueError, match="luma must be uint8"):
        method.apply(image, params, luma=luma[:-1])


def test_streaming_slides_hold_no_luma(small_slide):
    with open_slide(small_slide) as slide:
        assert not slide.holds_decoded() and slide.decoded_luma() is None


def test_dataset_samples_keep_every_row(tiles):
    """vipsnorm fit (sample_file) saves and pools its samples: they always count the luma, whatever the
    method reads."""
    for name in ("stretch", "equalize"):
        result, sample = sample_file(tiles[0], name)
        assert result.status == "ok" and sample.luma_counted and not np.isnan(sample.hist).any()
        assert sample.n == sample.hist[0].sum() > 0


def test_uncounted_luma_is_nan_and_flatness_ignores_it():
    hist = np.zeros((4, 256))
    hist[0, 10] = hist[1, 20] = hist[2, 30] = 5
    hist[3] = np.nan
    sample = Sample(hist, 3)
    assert not sample.luma_counted and sample.is_flat()
    assert np.isnan(sample.n)  # any use of the missing row shows
    hist[1, 21] = 1
    assert not Sample(hist, 3).is_flat()


@pytest.mark.parametrize("colour", [(200, 120, 90), (17, 17, 17)])
def test_flat_image_is_the_same_error(colour, tmp_path, monkeypatch):
    """A flat image names the same value whether or not its luma was counted (and streamed)."""
    import pyvips

    path = tmp_path / "flat.png"
    (pyvips.Image.black(64, 48, bands=3) + list(colour)).cast("uchar").pngsave(str(path))
    errors = set()
    for name in ("stretch", "equalize"):
        for threshold in (slide_module.SMALL_IMAGE_PIXELS, 0):
            monkeypatch.setattr(slide_module, "SMALL_IMAGE_PIXELS", threshold)
            (tmp_path / "out").mkdir(exist_ok=True)
            result = normalize_file(path, tmp_path / "out", build_method(name))
            assert result.status == "error" and not list((tmp_path / "out").iterdir())
            errors.add(result.error)
    assert len(errors) == 1, errors
    (error,) = errors
    y = (4899 * colour[0] + 9617 * colour[1] + 1868 * colour[2] + 8192) >> 14
    assert f"every sampled pixel is {y})" in error and "\n" not in error


def test_bad_files_fail_alike_for_every_method(shared_data, methods, tmp_path):
    """Truncated, corrupt and unreadable files: one-line errors, no output, input untouched, the same
    error whichever method (whether or not it skips the luma)."""
    bad = sorted((shared_data / "bad").iterdir())
    assert bad
    for path in bad:
        before = hashlib.sha256(path.read_bytes()).hexdigest()
        errors = set()
        for label, method in methods.items():
            out = tmp_path / label.replace(" ", "_")
            out.mkdir(exist_ok=True)
            result = normalize_file(path, out, method)
            assert result.status == "error" and result.error and "\n" not in result.error, (path.name, label)
            assert str(path) in result.error
            assert not list(out.iterdir()), (path.name, label)
            # libvips appends "; jpegload: load error" or not depending on what the process opened
            # before (see test_fastpath._first_cause): compare the first cause
            errors.add(result.error.split(";")[0].rstrip(")"))
        assert len(errors) == 1, (path.name, errors)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before
