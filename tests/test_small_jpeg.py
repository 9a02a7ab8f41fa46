"""Small JPEGs decoded with libjpeg-turbo directly (vipsnorm.io.small_jpeg): libvips' bytes and metadata
on every layout it takes (JPEGs written by another encoder than its own check's: Pillow's), other
layouts and damaged files left to libvips, the process check able to fail, and outputs of the whole
job identical with and without it. And encoded (small_jpeg.save): files byte for byte libvips'
jpegsave's, whatever their metadata, quality and bands; a coder that differs is noticed (process
check, per-fields check) and left unused; a failed write leaves nothing.

The decoder lives in the optional JPEG extension: tests that need it skip where it is not built
(``test_jpeg_tiles.test_built_where_libjpeg_is`` fails when the headers are present and it was not).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pyvips
from PIL import Image

from vipsnorm.engine import build_method, load_reference, normalize_file
from vipsnorm.io import jpeg_tiles, small_jpeg
from vipsnorm.io.slide import open_slide

needs_decoder = pytest.mark.skipif(not small_jpeg.available(), reason=f"small JPEG decoder: {small_jpeg.reason()}")


def test_on_where_the_extension_is():
    if jpeg_tiles.available():
        assert small_jpeg.available(), small_jpeg.reason()
        assert small_jpeg.reason() == "checked against libvips"


def _photo(width: int, height: int) -> np.ndarray:
    """An RGB picture with ramps, edges and noise (what chroma upsampling would show differences on)."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), ((x // 7 + y // 5) % 2) * 200 + 30], -1)
    return np.clip(image + rng.integers(-30, 31, image.shape), 0, 255).astype(np.uint8)


#: name -> Pillow save options for an RGB picture
PIL_LAYOUTS = {
    "444": dict(quality=92, subsampling=0),
    "422": dict(quality=85, subsampling=1),
    "420": dict(quality=75, subsampling=2),
    "420 progressive optimized": dict(quality=80, subsampling=2, progressive=True, optimize=True),
    "422 progressive": dict(quality=70, subsampling=1, progressive=True),
}


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory, shared_data) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("small-jpeg")
    out = {"kather": shared_data / "tiles" / "kather-template.jpg", "sample": shared_data / "images" / "sample.jpg"}
    for size in ((512, 512), (333, 217), (1, 1), (17, 9)):
        picture = Image.fromarray(_photo(*size)) if min(size) > 1 else Image.new("RGB", size, (200, 40, 90))
        for name, options in PIL_LAYOUTS.items():
            path = folder / f"pil-{name.replace(' ', '-')}-{size[0]}x{size[1]}.jpg"
            picture.save(path, "JPEG", **options)
            out[f"{name} {size[0]}x{size[1]}"] = path
    grey = folder / "grey.jpg"
    Image.fromarray(_photo(120, 80)[..., 0]).save(grey, "JPEG", quality=90)
    out["grey"] = grey
    # metadata libvips carries through: EXIF (with an orientation), an ICC profile, a comment
    tagged = folder / "tagged.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: kept as metadata, never applied by vipsnorm
    exif[0x010F] = "vipsnorm test camera"
    profile = pyvips.Image.new_from_file(str(shared_data / "images" / "sample.jpg")).get("icc-profile-data")
    options = dict(quality=88, exif=exif.tobytes(), comment=b"a comment", icc_profile=profile)
    Image.fromarray(_photo(96, 64)).save(tagged, "JPEG", **options)
    out["tagged"] = tagged
    return out


@needs_decoder
@pytest.mark.parametrize("restart", [False, True])
def test_pixels_and_fields_are_libvips(jpegs, restart, tmp_path):
    for name, path in jpegs.items():
        if restart:  # restart markers, as some cameras and scanners write them
            path = _with_restarts(path, tmp_path / f"rst-{path.name}")
            if path is None:
                continue
        header = pyvips.Image.jpegload(str(path), access="sequential", fail_on="warning")
        image = small_jpeg.decode(path, header)
        assert image is not None, name
        expected = pyvips.Image.new_from_file(str(path), fail_on="warning")
        assert image.write_to_memory() == expected.write_to_memory(), name
        assert image.get_fields() == header.get_fields(), name
        for field in header.get_fields():
            if field != "filename":
                assert image.get(field) == header.get(field), (name, field)


def _with_restarts(path: Path, out: Path) -> Path | None:
    array = pyvips.Image.new_from_file(str(path)).numpy()
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    import cv2

    if array.ndim == 3:
        array = array[..., ::-1]
    ok, data = cv2.imencode(".jpg", array, [cv2.IMWRITE_JPEG_QUALITY, 85, cv2.IMWRITE_JPEG_RST_INTERVAL, 2])
    if not ok:
        return None
    out.write_bytes(data.tobytes())
    assert b"\xff\xdd" in out.read_bytes()  # a DRI marker: restart intervals are really there
    return out


@needs_decoder
def test_the_metadata_survives_the_whole_job(jpegs, tmp_path):
    """EXIF, orientation, ICC profile, resolution written as the libvips path writes them."""
    path = jpegs["tagged"]
    header = pyvips.Image.jpegload(str(path), access="sequential")
    assert header.get("orientation") == 6 and header.get_typeof("exif-data")
    method = build_method("stretch")
    (tmp_path / "fast").mkdir()
    fast = normalize_file(path, tmp_path / "fast", method)
    assert fast.status == "ok", fast.error
    written = pyvips.Image.new_from_file(str(fast.output))
    assert written.get("orientation") == 6
    assert "vipsnorm test camera" in written.get("exif-ifd0-Make")
    assert written.get_typeof("icc-profile-data") == header.get_typeof("icc-profile-data")


def _slow(monkeypatch):
    """Turn the direct decoder and coder off for the libvips path (small_jpeg.decode always declines,
    small_jpeg.save is libvips' jpegsave)."""
    monkeypatch.setattr(small_jpeg, "decode", lambda path, header: None)
    monkeypatch.setattr(small_jpeg, "save", lambda image, path, quality, pixels=None: image.jpegsave(str(path), Q=quality))


@needs_decoder
@pytest.mark.parametrize("method_name", ["stretch", "equalize", "match", "reinhard", "macenko", "clahe"])
def test_outputs_are_byte_identical(jpegs, method_name, shared_data, tmp_path, monkeypatch):
    reference = None
    if method_name in ("match", "reinhard"):
        reference = load_reference(shared_data / "tiles" / "histolab-target.png", method_name)
    method = build_method(method_name, reference)
    (tmp_path / "fast").mkdir()
    (tmp_path / "slow").mkdir()
    names = ["kather", "sample", "tagged", "grey", "420 333x217", "422 progressive 512x512", "444 17x9"]
    fast = {}
    for name in names:
        fast[name] = normalize_file(jpegs[name], tmp_path / "fast", method, name=name.replace(" ", "-"))
    with monkeypatch.context() as patch:
        _slow(patch)
        for name in names:
            slow = normalize_file(jpegs[name], tmp_path / "slow", method, name=name.replace(" ", "-"))
            assert (fast[name].status, fast[name].error) == (slow.status, slow.error), name
            if slow.status == "ok":
                assert fast[name].output.read_bytes() == slow.output.read_bytes(), name
                assert fast[name].params == slow.params, name
    assert any(r.status == "ok" for r in fast.values())


@needs_decoder
def test_the_decoded_buffer_is_the_slides_own(jpegs):
    """Mapped in place by the methods that can (no copy): the buffer is the slide's own, writable."""
    with open_slide(jpegs["kather"]) as slide:
        slide.probe()
        assert slide.holds_decoded()
        pixels = slide.decoded_pixels()
        expected = pyvips.Image.new_from_file(str(jpegs["kather"])).numpy()
        assert np.array_equal(pixels, expected)
        taken = slide.take_decoded()
        assert taken is not None and taken[1].flags.writeable
        taken[1][0, 0] = 0  # changes the image's pixels: the view is over its buffer
        assert taken[0].crop(0, 0, 1, 1).numpy().ravel().tolist() == [0, 0, 0]


def test_other_layouts_are_left_to_libvips(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(_photo(64, 48)).convert("CMYK").save(cmyk, "JPEG", quality=90)
    header = pyvips.Image.jpegload(str(cmyk), access="sequential")
    assert header.bands == 4
    assert small_jpeg.decode(cmyk, header) is None
    # a header that does not describe the file (another size): declined by the decoder's own check
    other = tmp_path / "other.jpg"
    Image.fromarray(_photo(64, 48)).save(other, "JPEG")
    wrong = pyvips.Image.jpegload(str(tmp_path / "other.jpg"), access="sequential")
    Image.fromarray(_photo(65, 48)).save(other, "JPEG")  # replaced after the header was read
    assert small_jpeg.decode(other, wrong) is None
    with open_slide(cmyk) as slide:  # and such a file is still read (by libvips), converted to sRGB
        assert slide.level_image(0).bands == 3


@needs_decoder
def test_damage_is_left_to_libvips(shared_data, jpegs, tmp_path):
    truncated = shared_data / "bad" / "truncated.jpg"
    header = pyvips.Image.jpegload(str(truncated), access="sequential")
    assert small_jpeg.decode(truncated, header) is None
    data = jpegs["420 512x512"].read_bytes()
    assert data[2:4] == b"\xff\xe0"  # Pillow's JFIF segment first
    after_app0 = 4 + int.from_bytes(data[4:6], "big")
    cases = {
        "cut": data[: len(data) // 2],
        "cut, end marker kept": data[: len(data) // 2] + b"\xff\xd9",
        "garbled": data[:2000] + bytes(reversed(data[2000:4000])) + data[4000:],
        # (harmless: libjpeg warns, libvips then reads the file leniently, the job succeeds)
        "stray bytes before a marker": data[:after_app0] + b"\x00\x01\x02" + data[after_app0:],
    }
    for name, damaged in cases.items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(damaged)
        header = pyvips.Image.jpegload(str(path), access="sequential")
        assert small_jpeg.decode(path, header) is None, name
        # and the job says what libvips says, with or without the decoder
        (tmp_path / "out").mkdir(exist_ok=True)
        result = normalize_file(path, tmp_path / "out", build_method("stretch"), name=name.replace(" ", "-"))
        if name == "stray bytes before a marker":
            assert result.status == "ok", result.error
        else:
            assert result.status == "error" and str(path) in result.error, name
    # the file vanished between header and pixels
    path = tmp_path / "gone.jpg"
    path.write_bytes(data)
    header = pyvips.Image.jpegload(str(path), access="sequential")
    path.unlink()
    assert small_jpeg.decode(path, header) is None


class _Skewed:
    """The extension with a decoder that differs from libvips' by one grey level in one pixel of one
    layout: the process check must notice and turn the decoder off."""

    def __init__(self, lib, layout_bands: int):
        self._lib, self._bands = lib, layout_bands

    def __getattr__(self, name):
        return getattr(self._lib, name)

    def vj_decode(self, path, data, length, width, height, bands, out):
        status = self._lib.vj_decode(path, data, length, width, height, bands, out)
        if bands == self._bands and width > 20:
            pixel = ctypes.c_uint8.from_address(out + width * bands * (height // 2))
            pixel.value ^= 1
        return status


@needs_decoder
@pytest.mark.parametrize("bands, layout", [(1, "grey"), (3, "RGB")])
def test_the_process_check_can_fail(bands, layout):
    lib = jpeg_tiles._load()[0]
    assert small_jpeg._self_check(lib) == (True, "checked against libvips")
    ok, why = small_jpeg._self_check(_Skewed(lib, bands))
    assert not ok and layout in why


def test_switched_off_by_the_environment(jpegs):
    code = (
        "import sys, pyvips; from vipsnorm.io import small_jpeg; p = sys.argv[1];"
        "h = pyvips.Image.jpegload(p, access='sequential');"
        "print(small_jpeg.available(), small_jpeg.decode(p, h) is None, small_jpeg.reason())"
    )
    env = dict(os.environ, VIPSNORM_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code, str(jpegs["kather"])], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False True off:"), out.stdout


def test_pillow_wrote_the_layouts_it_was_asked_for(jpegs):
    """The fixture's files are what their names say (else the tests above would test less)."""
    from PIL import JpegImagePlugin

    for name, path in jpegs.items():
        if name.startswith(("444", "422", "420")):
            with Image.open(path) as image:
                want = {"444": 0, "422": 1, "420": 2}[name[:3]]
                assert JpegImagePlugin.get_sampling(image) == want, name
                assert bool(image.info.get("progressive")) == ("progressive" in name), name


@needs_decoder
def test_the_job_uses_it(jpegs, tmp_path, monkeypatch):
    """normalize_file decodes a small JPEG here (not silently through libvips every time)."""
    made = []
    decode = small_jpeg.decode

    def counted(path, header):
        made.append(decode(path, header))
        return made[-1]

    monkeypatch.setattr(small_jpeg, "decode", counted)
    result = normalize_file(jpegs["kather"], tmp_path, build_method("equalize"))
    assert result.status == "ok", result.error
    assert len(made) == 1 and made[0] is not None


# --------------------------------------------------------------------------------------------------
# encoding: small_jpeg.save

needs_coder = pytest.mark.skipif(not small_jpeg._save_state()[0], reason=f"JPEG coder: {small_jpeg._save_state()[1]}")


@pytest.fixture
def fresh_saves(monkeypatch):
    """small_jpeg.save with nothing checked yet in this process (its caches are module-wide)."""
    monkeypatch.setattr(small_jpeg, "_headers", {})
    monkeypatch.setattr(small_jpeg, "_counts", {"checks": 0, "hits": 0})
    return small_jpeg


def test_coder_on_where_the_decoder_is():
    if small_jpeg.available():
        assert small_jpeg._save_state() == (True, "checked against libvips")


def _in_memory(image: pyvips.Image) -> tuple[pyvips.Image, np.ndarray]:
    from vipsnorm import _native

    # (a copy: copy_memory of an image already in memory gives back that image, and one made with
    # new_from_memory would no longer keep its Python buffer alive)
    image = image.copy().copy_memory()
    pixels = _native.memory_pixels(image)
    assert pixels is not None
    return image, pixels


def _saved_both_ways(image: pyvips.Image, folder: Path, name: str, quality: int) -> tuple[bytes, bytes]:
    image, pixels = _in_memory(image)
    ours, theirs = folder / f"{name}-ours.jpg", folder / f"{name}-libvips.jpg"
    small_jpeg.save(image, ours, quality, pixels)
    image.jpegsave(str(theirs), Q=quality)
    return ours.read_bytes(), theirs.read_bytes()


@needs_coder
@pytest.mark.parametrize("quality", [90, 75, 100, 89, 1])
def test_saves_are_libvips_bytes(jpegs, quality, tmp_path, fresh_saves):
    """Every file libvips' own, at qualities with (below 90) and without chroma subsampling; the second
    and third images of each kind are coded here (hits), not saved by libvips."""
    kinds = {
        "sample": pyvips.Image.new_from_file(str(jpegs["sample"])),  # a camera's JPEG
        "tagged": pyvips.Image.new_from_file(str(jpegs["tagged"])),  # EXIF with an orientation, ICC, a comment
        "grey": pyvips.Image.new_from_file(str(jpegs["grey"])),
        "odd": pyvips.Image.new_from_file(str(jpegs["444 17x9"])),
        "bare": pyvips.Image.new_from_memory(_photo(40, 24).tobytes(), 40, 24, 3, "uchar"),  # no fields at all
    }
    for name, image in kinds.items():
        for round_ in range(3):  # new pixels each time (same fields): the coded part changes
            image = image.invert() if round_ % 2 else image.flip("horizontal")
            ours, theirs = _saved_both_ways(image, tmp_path, f"{name}{round_}", quality)
            assert ours == theirs, (name, round_)
    assert small_jpeg._counts == {"checks": len(kinds), "hits": 2 * len(kinds)}
    assert all(small_jpeg._headers.values())


@needs_coder
def test_other_fields_get_their_own_markers(jpegs, tmp_path, fresh_saves):
    """Images of one size with other metadata (EXIF, orientation, resolution, ICC profile) never get
    the markers checked for another's."""
    base = pyvips.Image.new_from_file(str(jpegs["tagged"])).copy_memory()
    variants = {
        "as is": base,
        "orientation 3": base.copy(),
        "other resolution": base.copy(xres=11.811, yres=11.811),
        "no EXIF": base.copy(),
        "no ICC": base.copy(),
    }
    variants["orientation 3"].set_type(pyvips.GValue.gint_type, "orientation", 3)
    variants["no EXIF"].remove("exif-data")
    variants["no ICC"].remove("icc-profile-data")
    for name, image in list(variants.items()) * 2:
        ours, theirs = _saved_both_ways(image, tmp_path, name.replace(" ", "-"), 90)
        assert ours == theirs, name
    assert small_jpeg._counts == {"checks": len(variants), "hits": len(variants)}
    assert len(set(small_jpeg._headers.values())) == len(variants)


class _Recoded:
    """The extension with a coder whose output differs from libvips' by one bit of coded data."""

    def __init__(self, lib, when=lambda width: True):
        self._lib, self._when = lib, when

    def __getattr__(self, name):
        return getattr(self._lib, name)

    def vj_save(self, pixels, width, height, bands, quality, out, size):
        status = self._lib.vj_save(pixels, width, height, bands, quality, out, size)
        if status == 0 and self._when(width):
            byte = ctypes.c_uint8.from_address(out._obj.value + size._obj.value - 10)
            byte.value ^= 1
        return status


@needs_coder
def test_the_coders_process_check_can_fail():
    lib = jpeg_tiles._load()[0]
    assert small_jpeg._save_self_check(lib) == (True, "checked against libvips")
    ok, why = small_jpeg._save_self_check(_Recoded(lib, when=lambda width: width == 300))
    assert not ok and "coded otherwise" in why


@needs_coder
def test_fields_whose_coding_differs_stay_with_libvips(jpegs, tmp_path, fresh_saves, monkeypatch):
    """The per-fields check compares the whole coded part: one bit off, and those fields are left to
    libvips for good (every file still libvips' own)."""
    lib = jpeg_tiles._load()[0]
    monkeypatch.setattr(jpeg_tiles, "_load", lambda: (_Recoded(lib), "loaded"))
    image = pyvips.Image.new_from_file(str(jpegs["kather"]))
    for round_ in range(3):
        ours, theirs = _saved_both_ways(image.invert() if round_ == 1 else image, tmp_path, f"k{round_}", 90)
        assert ours == theirs
    assert list(small_jpeg._headers.values()) == [False]
    assert small_jpeg._counts == {"checks": 1, "hits": 0}


@needs_coder
def test_checks_stop_when_fields_never_repeat(tmp_path, fresh_saves):
    """Every image of other fields (here: other sizes): after the free checks, none more (each would
    cost a second coding), and every file is still libvips' own."""
    for width in range(16, 16 + small_jpeg._FREE_CHECKS + 4):
        image = pyvips.Image.new_from_memory(_photo(width, 20).tobytes(), width, 20, 3, "uchar")
        ours, theirs = _saved_both_ways(image, tmp_path, f"w{width}", 90)
        assert ours == theirs
    assert small_jpeg._counts == {"checks": small_jpeg._FREE_CHECKS, "hits": 0}


def test_lazy_images_and_other_kinds_are_left_to_libvips(jpegs, tmp_path, fresh_saves):
    """No pixels in memory, 2 or 4 bands, 16 bits, another colour space: libvips saves, nothing checked."""
    image = pyvips.Image.new_from_file(str(jpegs["kather"]))
    cases = {
        "lazy": (image.invert(), None),
        "alpha": _in_memory(image.bandjoin(255)),
        "16-bit": (wide := image.cast("ushort").copy(interpretation="rgb16").copy_memory(), wide.numpy()),
        "lab": _in_memory(image.colourspace("lab").cast("uchar")),
    }
    for name, (picture, pixels) in cases.items():
        ours, theirs = tmp_path / f"{name}-ours.jpg", tmp_path / f"{name}-libvips.jpg"
        small_jpeg.save(picture, ours, 90, pixels)
        picture.jpegsave(str(theirs), Q=90)
        assert ours.read_bytes() == theirs.read_bytes(), name
    assert small_jpeg._counts == {"checks": 0, "hits": 0} and not small_jpeg._headers


@needs_coder
def test_a_failed_write_leaves_nothing(jpegs, tmp_path, fresh_saves, monkeypatch):
    """A coded file that cannot be written (disk full) is an OutputError naming the output, and no
    file, finished or not, is left."""
    from vipsnorm.errors import OutputError
    from vipsnorm.io.write import write_image

    image, _ = _in_memory(pyvips.Image.new_from_file(str(jpegs["kather"])))
    write_image(image, tmp_path / "first.jpg")  # checked: the next is coded here
    assert small_jpeg._counts["checks"] == 1

    class Full:
        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(small_jpeg, "open", Full, raising=False)
    with pytest.raises(OutputError, match="No space left") as info:
        write_image(image, tmp_path / "second.jpg")
    assert str(tmp_path / "second.jpg") in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.jpg"]


@needs_coder
def test_the_job_codes_its_jpegs(jpegs, tmp_path, fresh_saves):
    """normalize_file's JPEG outputs are coded here once their fields are checked, and are what the
    libvips path writes (test_outputs_are_byte_identical compares whole jobs)."""
    method = build_method("stretch")
    for i in range(3):
        result = normalize_file(jpegs["kather"], tmp_path, method, name=f"k{i}")
        assert result.status == "ok", result.error
    assert small_jpeg._counts == {"checks": 1, "hits": 2}
    assert len({(tmp_path / f"k{i}.jpg").read_bytes() for i in range(3)}) == 1


@needs_coder
def test_fields_it_cannot_read_never_stop_a_save(tmp_path, fresh_saves):
    """A field pyvips cannot read (a guint) or that is no plain value (an image): libvips saves the file,
    as it would without this module, and nothing is checked."""
    from pyvips import GValue, type_from_name, vips_lib

    image, pixels = _in_memory(pyvips.Image.new_from_memory(_photo(40, 24).tobytes(), 40, 24, 3, "uchar"))
    unreadable = image.copy()
    value = GValue()
    value.set_type(type_from_name("guint"))
    assert vips_lib.vips_image_set(unreadable.pointer, b"some-uint", value.pointer) is None
    with pytest.raises(pyvips.Error):
        unreadable.get("some-uint")
    pictured = image.copy()
    pictured.set_type(pyvips.GValue.image_type, "a-picture", image)
    for name, picture in {"unreadable": unreadable, "pictured": pictured}.items():
        small_jpeg.save(picture, tmp_path / f"{name}.jpg", 90, pixels)  # (pixels: the copies' source's, as write_image)
        picture.jpegsave(str(tmp_path / f"{name}-libvips.jpg"), Q=90)
        assert (tmp_path / f"{name}.jpg").read_bytes() == (tmp_path / f"{name}-libvips.jpg").read_bytes(), name
    assert small_jpeg._counts == {"checks": 0, "hits": 0} and not small_jpeg._headers
    small_jpeg.save(image, tmp_path / "plain.jpg", 90, pixels)  # the same pixels with readable fields: checked
    assert small_jpeg._counts == {"checks": 1, "hits": 0}


@needs_coder
def test_a_file_it_cannot_read_back_stays_libvips(jpegs, tmp_path, fresh_saves, monkeypatch):
    """The check reads the file libvips wrote: when it cannot, that file stays (the save succeeded) and
    the fields are left unchecked."""

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(small_jpeg, "_read_back", unreadable)
    ours, theirs = _saved_both_ways(pyvips.Image.new_from_file(str(jpegs["kather"])), tmp_path, "k", 90)
    assert ours == theirs
    assert small_jpeg._counts == {"checks": 1, "hits": 0} and not small_jpeg._headers


@needs_coder
def test_a_coder_failing_on_a_hit_leaves_the_file_to_libvips(jpegs, tmp_path, fresh_saves, monkeypatch):
    image = pyvips.Image.new_from_file(str(jpegs["kather"]))
    assert _saved_both_ways(image, tmp_path, "first", 90)[0] == _saved_both_ways(image, tmp_path, "again", 90)[1]
    assert small_jpeg._counts == {"checks": 1, "hits": 1}
    monkeypatch.setattr(small_jpeg, "_save_encode", lambda lib, pixels, quality: None)
    ours, theirs = _saved_both_ways(image.invert(), tmp_path, "failed", 90)
    assert ours == theirs and small_jpeg._counts == {"checks": 1, "hits": 1}


@needs_coder
def test_a_coded_file_larger_than_the_first_buffer(tmp_path, fresh_saves):
    """Noise at Q100 outgrows the coder's first buffer (half the raw bytes): the buffer grows, the file
    is libvips' all the same."""
    noise = np.random.default_rng(3).integers(0, 256, (384, 512, 3), dtype=np.uint8)
    for round_, pixels in enumerate((noise, noise[::-1].copy())):
        image = pyvips.Image.new_from_memory(pixels.tobytes(), 512, 384, 3, "uchar")
        ours, theirs = _saved_both_ways(image.copy(interpretation="srgb"), tmp_path, f"noise{round_}", 100)
        assert ours == theirs and len(ours) > noise.nbytes // 2 + 65536
    assert small_jpeg._counts == {"checks": 1, "hits": 1}


@needs_coder
def test_threads_saving_at_once(jpegs, tmp_path, fresh_saves):
    from concurrent.futures import ThreadPoolExecutor

    base = pyvips.Image.new_from_file(str(jpegs["kather"])).copy_memory()

    def one(i: int) -> bool:
        image = base.linear(1, i % 40).cast("uchar") if i % 3 else base.invert()
        ours, theirs = _saved_both_ways(image, tmp_path, f"t{i}", 90)
        return ours == theirs

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(one, range(60)))
    assert small_jpeg._counts["hits"] >= 50


@needs_coder
def test_at_most_so_many_sets_are_kept(tmp_path, fresh_saves, monkeypatch):
    monkeypatch.setattr(small_jpeg, "_MAX_HEADERS", 3)
    for width in range(16, 22):
        image = pyvips.Image.new_from_memory(_photo(width, 20).tobytes(), width, 20, 3, "uchar")
        ours, theirs = _saved_both_ways(image, tmp_path, f"w{width}", 90)
        assert ours == theirs
    assert small_jpeg._counts == {"checks": 3, "hits": 0} and len(small_jpeg._headers) == 3
