"""Reading slides: damage that libvips lets pass, animations, the pixel size a name cannot change,
the slide's colour profile through OpenSlide, a TIFF OpenSlide cannot open, and windows outside a level.

Each test fails on the code before its fix: a damaged JPEG tile was filled with grey (libvips) or ended
the level in black (OpenSlide) and normalized as "ok"; an animation lost its other frames; a file named
``x-MPP=9.tif`` was read at 9 um a pixel; the ICC profile was dropped on the OpenSlide path; a WebP TIFF
was refused as "OpenSlide cannot open it" even with ``backend="libvips"``; level -1 read the last level.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import pyvips
import tifffile

import vipsnorm
from vipsnorm.engine import Options, normalize_file
from vipsnorm.errors import UnreadableImageError, UnsupportedImageError
from vipsnorm.io.write import PART_MARKER


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("backend", ["auto", "openslide"])
def test_damaged_jpeg_tile_is_an_error_with_no_output(damaged_svs, shared_data, tmp_path, backend):
    before = _digest(damaged_svs)
    # opens: the damage is away from the probed centre
    slide = vipsnorm.open(damaged_svs, backend=backend)
    with pytest.raises(UnreadableImageError, match="cannot decode pixels") as info:
        slide.read_region(0, 0, 0, 240, 240)
    assert str(damaged_svs) in str(info.value)
    slide.close()
    # fixed parameters (no fit reads the tile first): the write itself must fail, and leave nothing
    method = vipsnorm.Stretch()
    params = method.fit(vipsnorm.sample_slide(vipsnorm.open(shared_data / "slides" / "CMU-1-Small-Region.svs")))
    result = normalize_file(damaged_svs, tmp_path, method, params=params, options=Options(backend=backend))
    assert result.status == "error"
    assert "cannot decode pixels" in result.error and str(damaged_svs) in result.error
    assert list(tmp_path.iterdir()) == []  # neither the output nor a part file
    # fitted on the slide: the same error, not "no tissue found"
    result = normalize_file(damaged_svs, tmp_path, vipsnorm.Equalize(), options=Options(backend=backend))
    assert result.status == "error" and "cannot decode pixels" in result.error, result.error
    assert list(tmp_path.iterdir()) == []
    assert _digest(damaged_svs) == before


def test_whole_slide_still_reads_after_the_damage_check(shared_data, tmp_path):
    # the check looks only at what libvips reports while this slide's pixels are read: a slide read
    # right after a damaged one is fine
    bad = pyvips.Image.new_from_array(np.zeros((8, 8), np.uint8))
    with pytest.raises(pyvips.Error):
        bad.crop(4, 4, 8, 8)  # a failing call of our own leaves libvips' error text in between
    result = normalize_file(shared_data / "slides" / "CMU-1-Small-Region.svs", tmp_path, vipsnorm.Equalize())
    assert result.status == "ok", result.error
    assert not any(PART_MARKER in p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animation_is_refused_not_cut_to_its_first_frame(tmp_path, suffix):
    frames = np.zeros((3 * 40, 40, 3), np.uint8)
    for i, value in enumerate((30, 120, 210)):
        frames[40 * i : 40 * (i + 1)] = value
    image = pyvips.Image.new_from_array(frames).copy(interpretation="srgb")
    image.set_type(pyvips.GValue.gint_type, "page-height", 40)
    path = tmp_path / f"anim{suffix}"
    image.write_to_file(str(path))
    assert pyvips.Image.new_from_file(str(path)).get("n-pages") == 3
    with pytest.raises(UnsupportedImageError, match="3 frames"):
        vipsnorm.open(path)
    # one frame is an ordinary image
    still = tmp_path / f"still{suffix}"
    pyvips.Image.new_from_array(frames[:40]).copy(interpretation="srgb").write_to_file(str(still))
    assert vipsnorm.open(still).dimensions == (40, 40)


def _pyramid(path: Path, mpp: float, description: str | None = None) -> Path:
    """A small synthetic H&E pyramid at ``mpp``, with ``description`` as its ImageDescription."""
    from vipsnorm.synth import synthetic_slide

    image = synthetic_slide(700, 600, seed=3).copy(xres=1000.0 / mpp, yres=1000.0 / mpp)
    if description is not None:
        image.set_type(pyvips.GValue.gstr_type, "image-description", description)
    image.tiffsave(
        str(path), tile=True, pyramid=True, tile_width=256, tile_height=256, compression="deflate", resunit="cm"
    )
    return path


def test_mpp_in_a_file_name_or_note_is_not_a_pixel_size(tmp_path):
    path = _pyramid(tmp_path / "case-MPP=9.tif", 0.5, description="scanned for case-MPP=9 | MPP = 7")
    assert vipsnorm.open(path).mpp == pytest.approx((0.5, 0.5), rel=1e-4)
    # and through a normalize: vipsnorm's own description names the source file
    out = tmp_path / "out"
    out.mkdir()
    result = normalize_file(path, out, vipsnorm.Stretch())
    assert result.status == "ok", result.error
    assert vipsnorm.open(result.output).mpp == pytest.approx((0.5, 0.5), rel=1e-4)
    # an Aperio description still gives its MPP
    aperio = _pyramid(tmp_path / "aperio.tif", 0.5, description="Aperio Image Library v12.0.15\r\n700x600 |MPP = 0.2520")
    assert vipsnorm.open(aperio, backend="libvips").mpp == pytest.approx((0.252, 0.252))


def test_icc_profile_kept_through_openslide(tmp_path):
    from vipsnorm.synth import synthetic_slide

    p3 = pyvips.Image.black(8, 8, bands=3).copy(interpretation="srgb").icc_transform("p3", input_profile="srgb")
    profile = bytes(p3.get("icc-profile-data"))
    pixels = synthetic_slide(512, 512, seed=5).numpy()
    path = tmp_path / "icc.tif"
    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", iccprofile=profile, compression="zlib")
    for backend in ("libvips", "openslide"):
        out = tmp_path / backend
        out.mkdir()
        result = normalize_file(path, out, vipsnorm.Stretch(), options=Options(backend=backend))
        assert result.status == "ok", result.error
        assert result.slide["backend"] == backend
        written = pyvips.Image.new_from_file(str(result.output), revalidate=True)
        assert bytes(written.get("icc-profile-data")) == profile, backend


def test_tiff_openslide_cannot_open_is_read_by_libvips(tmp_path):
    image = pyvips.Image.new_from_array(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8))
    path = tmp_path / "webp.tif"
    image.copy(interpretation="srgb").tiffsave(str(path), tile=True, pyramid=True, compression="webp", lossless=True)
    for backend in ("auto", "libvips"):
        slide = vipsnorm.open(path, backend=backend)
        assert slide.backend == "libvips" and slide.dimensions == (300, 300)
        assert np.array_equal(slide.read_region(0, 0, 0, 300, 300), image.numpy())
    with pytest.raises(UnreadableImageError, match="OpenSlide cannot open it"):
        vipsnorm.open(path, backend="openslide")


@pytest.mark.parametrize("backend", ["libvips", "openslide"])
def test_windows_and_levels_outside_the_slide_are_refused(shared_data, backend):
    slide = vipsnorm.open(shared_data / "slides" / "boxes.tiff", backend=backend)
    last = len(slide.levels) - 1
    w, h = slide.levels[last].width, slide.levels[last].height
    assert slide.read_region(last, 0, 0, w, h).shape[:2] == (h, w)
    assert slide.read_region(0, 5, 5, 10**6, 10**6).shape[:2] == (slide.dimensions[1] - 5, slide.dimensions[0] - 5)
    for level, x, y, width, height in [
        (-1, 0, 0, 10, 10),
        (last + 1, 0, 0, 10, 10),
        (0, -1, 0, 10, 10),
        (0, 0, -3, 10, 10),
        (0, slide.dimensions[0], 0, 10, 10),
        (0, 0, 0, 0, 10),
    ]:
        with pytest.raises(ValueError, match=str(slide.path.name)):
            slide.read_region(level, x, y, width, height)
    with pytest.raises(ValueError, match="no level"):
        slide.level_image(last + 1)
    slide.close()


def test_a_pixel_size_no_output_can_state_is_an_error_naming_the_input(tmp_path):
    # 10^9 pixels a cm: 10^-5 um a pixel, below what libvips can write (it would state another size)
    from vipsnorm.synth import synthetic_slide

    path = tmp_path / "tiny-pixels.tif"
    tifffile.imwrite(
        path, synthetic_slide(300, 300, seed=2).numpy(), photometric="rgb", resolution=(1e9, 1e9), resolutionunit="CENTIMETER"
    )
    assert vipsnorm.open(path).mpp == pytest.approx((1e-5, 1e-5))
    out = tmp_path / "out"
    out.mkdir()
    result = normalize_file(path, out, vipsnorm.Stretch())
    assert result.status == "error"
    assert result.error.startswith(f"{path}: its pixel size") and "outside what an output can state" in result.error
    assert list(out.iterdir()) == []


def test_a_good_slide_read_beside_a_damaged_one_in_threads_is_not_refused(damaged_svs, shared_data, tmp_path):
    # libvips' error buffer is one for the process: files are normalized one at a time per process
    # (vipsnorm.io.slide.FILE_LOCK); before, a damaged slide's trace seen by a good slide's decode on another
    # thread refused the good slide, and the other thread's pyvips calls, which clear the buffer,
    # let the damaged one through (each about half the time here)
    from concurrent.futures import ThreadPoolExecutor

    good = tmp_path / "good.svs"
    shutil.copyfile(shared_data / "slides" / "CMU-1-Small-Region.svs", good)
    method = vipsnorm.Stretch()
    params = method.fit(vipsnorm.sample_slide(vipsnorm.open(good)))

    def run(job):
        index, path = job
        out = tmp_path / f"out{index}"
        out.mkdir()
        return path, normalize_file(path, out, method, params=params)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, enumerate([damaged_svs, good] * 4)))
    for path, result in results:
        if path == good:
            assert result.status == "ok", result.error
        else:
            assert result.status == "error" and "a JPEG tile is damaged" in result.error, result


def test_a_damaged_slide_is_refused_while_other_threads_call_libvips(damaged_svs, shared_data, tmp_path):
    """Another thread's failing libvips calls (a truncated JPEG, over and over) clear libvips' error
    buffer, where the damaged tile's only trace is: files run one at a time per process, so the trace
    stays the damaged slide's, and the truncated JPEG keeps its own error."""
    import threading

    method = vipsnorm.Stretch()
    params = method.fit(vipsnorm.sample_slide(vipsnorm.open(shared_data / "slides" / "CMU-1-Small-Region.svs")))
    truncated = shared_data / "bad" / "truncated.jpg"
    stop, other = threading.Event(), []

    def churn():
        out = tmp_path / "other"
        out.mkdir()
        while not stop.is_set():
            other.append(normalize_file(truncated, out, method, params=params))

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        results = []
        for i in range(6):
            out = tmp_path / f"out{i}"
            out.mkdir()
            results.append(normalize_file(damaged_svs, out, method, params=params))
    finally:
        stop.set()
        thread.join()
    assert all(r.status == "error" and "a JPEG tile is damaged" in r.error for r in results), results
    assert all(not any(d.iterdir()) for d in tmp_path.glob("out*"))
    assert other and all(r.status == "error" and r.error.startswith(str(truncated)) for r in other)
    assert not any("JPEG tile is damaged" in r.error for r in other)


def test_a_damaged_window_is_refused_while_other_threads_call_libvips(damaged_svs, shared_data, tmp_path, monkeypatch):
    """The same for patches fetched through libvips (no direct JPEG reader): the damaged corner tile
    is refused on every read while another thread's failing calls clear libvips' error buffer."""
    import threading

    from vipsnorm.io.slide import VipsSlide
    from vipsnorm.training.patches import PatchReader

    monkeypatch.setattr(VipsSlide, "jpeg_tiles", lambda self, level: None)
    method = vipsnorm.Stretch()
    truncated = shared_data / "bad" / "truncated.jpg"
    stop = threading.Event()

    def churn():
        out = tmp_path / "other"
        out.mkdir()
        while not stop.is_set():
            normalize_file(truncated, out, method)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(20):
            with vipsnorm.open(damaged_svs) as slide:  # (each a new load: nothing of the last read cached)
                with pytest.raises(UnreadableImageError, match="a JPEG tile is damaged"):
                    PatchReader(slide).read(0, 0, 0, 256)
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("direct", [True, False])
def test_a_damaged_slide_kept_open_is_refused_on_every_read(damaged_svs, monkeypatch, direct):
    """libvips keeps the tile it filled with grey in the level's cache: a second read of the window
    (the next epoch of a dataset whose slide stays open) got the grey pixels without a word. A slide
    found damaged is refused on every later read through libvips, of any window; the direct JPEG
    reader checks every tile it decodes itself, and still serves windows of whole tiles."""
    from vipsnorm.io.slide import VipsSlide
    from vipsnorm.training.patches import PatchReader

    if not direct:
        monkeypatch.setattr(VipsSlide, "jpeg_tiles", lambda self, level: None)
    with vipsnorm.open(damaged_svs) as slide:
        far = slide.levels[0].width - 64, slide.levels[0].height - 64
        whole = PatchReader(slide).read(0, *far, 64)  # a whole tile, before the damage is met
        for _ in range(3):
            with pytest.raises(UnreadableImageError, match="a JPEG tile is damaged"):
                PatchReader(slide).read(0, 0, 0, 256)
        if direct:
            np.testing.assert_array_equal(PatchReader(slide).read(0, *far, 64), whole)
        else:
            with pytest.raises(UnreadableImageError, match="a JPEG tile is damaged"):
                PatchReader(slide).read(0, *far, 64)
        with pytest.raises(UnreadableImageError, match="a JPEG tile is damaged"):
            slide.decode(slide.level_image(0).avg)


@pytest.fixture(scope="module")
def centre_damaged_svs(shared_data, tmp_path_factory) -> Path:
    """CMU-1-Small-Region.svs with the second half of its centre JPEG tile of level 0 zeroed: the
    window read when the slide is opened meets it, so opening it leaves a trace in libvips' buffer."""
    path = tmp_path_factory.mktemp("centre") / "centre.svs"
    shutil.copyfile(shared_data / "slides" / "CMU-1-Small-Region.svs", path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        index = page.imagelength // 2 // page.tilelength * across + page.imagewidth // 2 // page.tilewidth
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(offset + count // 2)
        f.write(b"\0" * (count - count // 2))
    return path


def test_a_healthy_slide_is_not_refused_while_another_thread_opens_a_damaged_one(centre_damaged_svs, shared_data):
    """Opening a slide reads pixels (its probe): the trace a damaged one leaves there was taken by a
    healthy slide read at the same time on another thread, and refused it for as long as it was open
    (286 reads in 300). Opening holds FILE_LOCK as reading does."""
    import threading

    from vipsnorm.training.patches import PatchReader

    method = vipsnorm.Stretch()
    good = vipsnorm.open(shared_data / "slides" / "CMU-1-Small-Region.svs")
    reader = PatchReader(good, method, method.fit(vipsnorm.sample_slide(good)), colour_table=False)
    stop, opened = threading.Event(), []

    def open_damaged():
        while not stop.is_set():
            try:
                vipsnorm.open(centre_damaged_svs).close()
                opened.append("opened")
            except UnreadableImageError as exc:
                opened.append(str(exc))

    thread = threading.Thread(target=open_damaged)
    thread.start()
    rng = np.random.default_rng(0)
    try:
        width, height = good.dimensions
        for _ in range(60):
            reader.read(0, int(rng.integers(0, width - 128)), int(rng.integers(0, height - 128)), 128)
    finally:
        stop.set()
        thread.join()
        good.close()
    assert opened and good._damage_found is None


def test_a_child_forked_while_a_thread_reads_can_read(shared_data):
    """A child forked while another thread held FILE_LOCK and a decode (a plain-fork data loader)
    waited for them forever."""
    import threading

    from vipsnorm.io.slide import _DECODES, FILE_LOCK

    held, release = threading.Event(), threading.Event()

    def hold():
        with FILE_LOCK, _DECODES.shared():
            held.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    try:
        pid = os.fork()
        if pid == 0:  # the child: both free, without the thread that held them
            ok = FILE_LOCK.acquire(timeout=5) and _DECODES._active == 0
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        thread.join()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
