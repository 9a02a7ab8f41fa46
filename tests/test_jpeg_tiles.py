"""Direct windows of JPEG-tiled levels (vipsnorm.io.jpeg_tiles): the TIFF directory read as tifffile
reads it, windows equal to libvips' bytes for the colour layouts slides use (RGB JPEG, YCbCr 4:2:0,
Aperio's RGB with subsampled chroma, OME sub-IFDs in a BigTIFF), a level used only once checked, damage
left to libvips to report, and patch readers giving the same pixels with and without it.

The decoder is an optional extension: tests that need it skip where it is not built, and
``test_built_where_libjpeg_is`` fails when libjpeg-turbo's headers are present but it was not built.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import pyvips
import tifffile

import vipsnorm
from vipsnorm.engine import Options, build_method, fit_slide, normalize_file
from vipsnorm.errors import UnreadableImageError
from vipsnorm.io import jpeg_tiles
from vipsnorm.io.slide import VipsSlide
from vipsnorm.training.patches import PatchReader

needs_decoder = pytest.mark.skipif(not jpeg_tiles.available(), reason=f"direct JPEG tiles: {jpeg_tiles.reason()}")


@pytest.fixture
def budget():
    """Set the process's store of kept tiles to a budget in MB for the test (the list of tiles met starts
    again), and back to the default afterwards."""
    yield jpeg_tiles.set_kept_budget
    jpeg_tiles.set_kept_budget(jpeg_tiles._budget_from_environment() / (1 << 20))


def test_built_where_libjpeg_is():
    if not Path("/usr/include/jpeglib.h").is_file():
        pytest.skip("no libjpeg headers here: the decoder is optional")
    if os.environ.get("VIPSNORM_NATIVE") == "0":
        pytest.skip("switched off by VIPSNORM_NATIVE=0")
    assert jpeg_tiles.available(), jpeg_tiles.reason()


def test_keeping_built_where_its_headers_are():
    """Kept tiles need libjpeg-turbo's internal jpegint.h and 2.1.4 or later (see _jpegtiles.c): where
    the headers here say so, the decoder must have been built with them."""
    import re

    config = next((p for p in Path("/usr/include").glob("**/jconfig.h")), None)
    if not Path("/usr/include/jpegint.h").is_file() or config is None or not jpeg_tiles.available():
        pytest.skip("no jpegint.h, jconfig.h or decoder here: keeping is optional")
    version = re.search(r"LIBJPEG_TURBO_VERSION_NUMBER\s+(\d+)", config.read_text())
    if version is None or not 2001004 <= int(version.group(1)) < 4000000:
        pytest.skip(f"libjpeg-turbo {version and version.group(1)}: keeping is not built against it")
    assert jpeg_tiles.keeping_supported()


@pytest.fixture(scope="module")
def variants(small_slide, shared_data, tmp_path_factory) -> dict[str, Path]:
    """The generated slide as written (RGB JPEG tiles), and re-saved by libvips in other layouts."""
    folder = tmp_path_factory.mktemp("jpeg-tiles")
    image = pyvips.Image.new_from_file(str(small_slide))
    out = {"rgb": small_slide, "aperio": shared_data / "slides" / "CMU-1-Small-Region.svs"}
    common = dict(tile=True, compression="jpeg", pyramid=True)
    # Q < 90: YCbCr with 4:2:0 chroma (where cropping needs its margin)
    out["ycbcr420"] = folder / "ycbcr420.tif"
    image.tiffsave(str(out["ycbcr420"]), Q=75, tile_width=256, tile_height=256, **common)
    # 240 px tiles (not a power of two, as Aperio's), RGB JPEG with subsampled chroma
    out["rgb240"] = folder / "rgb240.tif"
    image.tiffsave(str(out["rgb240"]), Q=80, rgbjpeg=True, tile_width=240, tile_height=240, **common)
    # an OME-style pyramid: levels in sub-IFDs of a BigTIFF
    out["subifd"] = folder / "subifd.tif"
    image.tiffsave(str(out["subifd"]), Q=92, subifd=True, bigtiff=True, tile_width=128, tile_height=128, **common)
    return out


@pytest.mark.parametrize("name", ["rgb", "aperio", "ycbcr420", "rgb240", "subifd"])
def test_layout_is_what_tifffile_reads(variants, name):
    path = variants[name]
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        pages = [(dict(page=0), page)]
        if name == "subifd":
            pages += [(dict(page=0, subifd=i), p) for i, p in enumerate(page.pages)]
        elif name != "aperio":
            pages += [(dict(page=i), p) for i, p in enumerate(tif.pages) if i > 0]
        assert len(pages) > (1 if name != "aperio" else 0)
        for where, p in pages:
            layout = jpeg_tiles.read_layout(path, **where)
            assert layout is not None, where
            assert (layout.width, layout.height) == (p.imagewidth, p.imagelength)
            assert (layout.tile_width, layout.tile_height) == (p.tilewidth, p.tilelength)
            assert layout.rgb == (p.photometric == tifffile.PHOTOMETRIC.RGB)
            np.testing.assert_array_equal(layout.offsets, p.dataoffsets)
            np.testing.assert_array_equal(layout.counts, p.databytecounts)
            assert layout.tables == p.tags["JPEGTables"].value


def test_layout_is_none_for_what_it_does_not_read(shared_data, tmp_path):
    # deflate tiles, a JPEG-compressed strip image, and the label (not tiled) of an SVS
    assert jpeg_tiles.read_layout(shared_data / "slides" / "boxes.tiff") is None
    strips = tmp_path / "strips.tif"
    pyvips.Image.black(64, 64, bands=3).tiffsave(str(strips), compression="jpeg")
    assert jpeg_tiles.read_layout(strips) is None
    assert jpeg_tiles.read_layout(shared_data / "slides" / "CMU-1-Small-Region.svs", page=1) is None
    grey = tmp_path / "grey.tif"
    pyvips.Image.black(64, 64).tiffsave(str(grey), compression="jpeg", tile=True, tile_width=16, tile_height=16)
    assert jpeg_tiles.read_layout(grey) is None  # one sample
    png = tmp_path / "x.png"
    pyvips.Image.black(8, 8).pngsave(str(png))
    assert jpeg_tiles.read_layout(png) is None  # not a TIFF


def test_damaged_directories_are_value_errors(small_slide, tmp_path):
    cut = tmp_path / "cut.tif"
    data = small_slide.read_bytes()
    with tifffile.TiffFile(small_slide) as tif:
        first = tif.pages[0].offset
    cut.write_bytes(data[: first + 20])  # the first directory cut short
    with pytest.raises(ValueError):
        jpeg_tiles.read_layout(cut)
    header = tmp_path / "header.tif"  # the first directory's entry count cut in half
    header.write_bytes(data[: first + 1])
    with pytest.raises(ValueError, match="damaged"):
        jpeg_tiles.read_layout(header)
    with pytest.raises(ValueError, match="no page 99"):
        jpeg_tiles.read_layout(small_slide, page=99)
    looped = tmp_path / "looped.tif"  # the first directory's next pointer back to itself
    raw = bytearray(data)
    big = raw[2:4] == b"\x2b\x00"
    if big:
        (count,) = np.frombuffer(bytes(raw[first:first + 8]), "<u8")
        at = first + 8 + int(count) * 20
        raw[at:at + 8] = int(first).to_bytes(8, "little")
    else:
        (count,) = np.frombuffer(bytes(raw[first:first + 2]), "<u2")
        at = first + 2 + int(count) * 12
        raw[at:at + 4] = int(first).to_bytes(4, "little")
    looped.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="chain"):
        jpeg_tiles.read_layout(looped, page=3)


def _windows(width: int, height: int, tile: int, rng: np.random.Generator, n: int) -> list[tuple[int, int, int, int]]:
    """Random windows, and the awkward ones: single pixels at the corners, a whole level, one tile
    exactly, windows on tile edges and in the partial last row and column of tiles."""
    out = [(0, 0, 1, 1), (width - 1, height - 1, 1, 1), (0, height - 1, width, 1), (width - 1, 0, 1, height),
           (0, 0, width, height), (0, 0, min(tile, width), min(tile, height))]
    if width > tile and height > tile:
        out += [(tile - 1, tile - 1, 2, 2), (tile, tile, min(tile, width - tile), min(tile, height - tile)),
                (width - 37, height - 53, 37, 53)]
    for _ in range(n):
        w, h = int(rng.integers(1, min(width, 3 * tile) + 1)), int(rng.integers(1, min(height, 3 * tile) + 1))
        out.append((int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h))
    return out


@needs_decoder
@pytest.mark.parametrize("keep", ["off", "as read"])
@pytest.mark.parametrize("name", ["rgb", "aperio", "ycbcr420", "rgb240", "subifd"])
def test_windows_equal_libvips(variants, name, keep):
    """Every level, every layout: windows decoded without keeping tiles (the decode of each tile from its
    start), and as read() reads them (kept while reads meet tiles again; see the kept tiles' own tests)."""
    slide = vipsnorm.open(variants[name])
    assert isinstance(slide, VipsSlide)
    rng = np.random.default_rng(7)
    try:
        for level in range(len(slide.levels)):
            direct = slide.jpeg_tiles(level)
            assert direct is not None, f"level {level} not read directly"
            lvl = slide.levels[level]
            for x, y, w, h in _windows(lvl.width, lvl.height, direct.layout.tile_width, rng, 40 if level == 0 else 8):
                got = direct.read(x, y, w, h) if keep == "as read" else direct._read(x, y, w, h, jpeg_tiles.KEEP_OFF)
                assert got is not None
                np.testing.assert_array_equal(got, slide.read_region(level, x, y, w, h),
                                              err_msg=f"{name} {level} {(x, y, w, h)}")
    finally:
        slide.close()


@needs_decoder
@pytest.mark.parametrize("keep", [jpeg_tiles.KEEP_OFF, jpeg_tiles.KEEP_ALWAYS])
def test_crop_margin_matters_for_subsampled_chroma(variants, keep):
    """The one-iMCU margin kept when cropping subsampled tiles is what makes them exact: measured as a
    change of the decoder (without it, 4:2:0 windows differ by up to 6 levels at their edge columns),
    and here as the fact that the windows most exposed to it, narrow ones at odd columns, are exact."""
    slide = vipsnorm.open(variants["ycbcr420"])
    direct = slide.jpeg_tiles(0)
    for x in range(1, 40, 3):
        np.testing.assert_array_equal(direct._read(300 + x, 301, 5, 7, keep), slide.read_region(0, 300 + x, 301, 5, 7))


@needs_decoder
def test_a_level_is_used_only_once_checked(small_slide, monkeypatch):
    real = jpeg_tiles.JpegTiles.read

    def off_by_one(self, x, y, w, h):
        got = real(self, x, y, w, h)
        if got is not None:
            got[0, 0, 0] ^= 1
        return got

    monkeypatch.setattr(jpeg_tiles.JpegTiles, "read", off_by_one)
    slide = vipsnorm.open(small_slide)
    assert slide.jpeg_tiles(0) is None
    # and patches still come, through libvips
    np.testing.assert_array_equal(PatchReader(slide).read(0, 10, 20, 64), slide.read_region(0, 10, 20, 64, 64))


def test_none_where_there_are_no_jpeg_tiles(shared_data, tmp_path):
    slide = vipsnorm.open(shared_data / "slides" / "boxes.tiff")
    assert all(slide.jpeg_tiles(level) is None for level in range(len(slide.levels)))
    png = tmp_path / "x.png"
    pyvips.Image.black(300, 200, bands=3).pngsave(str(png))
    assert vipsnorm.open(png).jpeg_tiles(0) is None
    with pytest.raises(ValueError):
        vipsnorm.open(png).jpeg_tiles(1)


@needs_decoder
@pytest.mark.parametrize("kept_mb", [0, 48])
def test_damaged_tile_is_left_to_libvips(damaged_svs, kept_mb, budget):
    """Half of tile 0 zeroed (conftest), the last tile pointing past the end of the file: a direct read
    of any part of them gives None (it never fills in grey, nor returns what it decoded before the
    damage) and the patch reader reports the damage as libvips finds it. Without kept tiles (budget 0:
    each tile decoded from its start, to its end the first time) and with them."""
    budget(kept_mb)
    path = damaged_svs
    slide = vipsnorm.open(path)
    direct = slide.jpeg_tiles(0)
    assert direct.keeping == (kept_mb > 0 and jpeg_tiles.keeping_supported())
    assert direct is not None  # the checked window, in the middle, is whole
    assert direct.valid_tiles() == 4  # (the four tiles of the checked window, decoded to their ends)
    # a window in the rows above the damage: a tile's data are decoded to their end the first time it
    # is read (garbled data can decode to wrong pixels with no warning until further down), so the
    # damage is found whatever the window
    assert direct.read(10, 10, 5, 5) is None
    assert direct.read(0, 0, 240, 240) is None
    assert direct.valid_tiles() == 4
    with pytest.raises(UnreadableImageError, match="cannot decode pixels"):
        PatchReader(slide).read(0, 0, 0, 240)
    # a tile's bytes past the end of the file
    layout = direct.layout
    bad = jpeg_tiles.TileLayout(**{**layout.__dict__, "offsets": layout.offsets.copy()})
    bad.offsets[-1] = path.stat().st_size - 10
    reader = jpeg_tiles.JpegTiles(path, bad)
    try:
        assert reader.read(layout.width - 1, layout.height - 1, 1, 1) is None
    finally:
        reader.close()
    slide.close()


@needs_decoder
def test_closed_reader_gives_none_and_bounds_are_checked(small_slide):
    slide = vipsnorm.open(small_slide)
    direct = slide.jpeg_tiles(0)
    with pytest.raises(ValueError):
        direct.read(2040, 0, 16, 16)
    with pytest.raises(ValueError):
        direct.read(0, 0, 0, 16)
    slide.close()
    assert direct.read(0, 0, 16, 16) is None


@needs_decoder
def test_threads_read_the_same_windows(small_slide):
    slide = vipsnorm.open(small_slide)
    direct = slide.jpeg_tiles(0)
    rng = np.random.default_rng(3)
    windows = _windows(2048, 1536, 256, rng, 60)
    expected = [slide.read_region(0, *w) for w in windows]
    failures = []

    def work(order):
        for i in order:
            if not np.array_equal(direct.read(*windows[i]), expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=work, args=(np.random.default_rng(s).permutation(len(windows)),)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@needs_decoder
@pytest.mark.parametrize("name, options", [(None, {}), ("macenko", {}), ("equalize", {}), ("equalize", {"mode": "rgb"}), ("stretch", {})])
def test_patch_reader_same_with_and_without(small_slide, monkeypatch, name, options):
    """Raw and normalized patches are the same bytes through the direct reader and through libvips."""
    slide = vipsnorm.open(small_slide)
    if name is None:
        method = params = None
    else:
        method = build_method(name, **options)
        params = fit_slide(slide, method, Options())
    reader = PatchReader(slide, method, params)
    rng = np.random.default_rng(11)
    windows = [(level, *w) for level in (0, 1) for w in _windows(*map(int, (slide.levels[level].width, slide.levels[level].height)), 256, rng, 10)]
    direct = [reader.read(level, x, y, w, h) for level, x, y, w, h in windows]
    assert slide.jpeg_tiles(0) is not None
    monkeypatch.setattr(VipsSlide, "jpeg_tiles", lambda self, level: None)
    plain = PatchReader(slide, method, params)
    for (level, x, y, w, h), got in zip(windows, direct):
        np.testing.assert_array_equal(got, plain.read(level, x, y, w, h), err_msg=str((level, x, y, w, h)))
    if method is not None:  # and the lazy pipeline itself, no table or kernel
        lazy = PatchReader(slide, method, params, colour_table=False)
        level, x, y, w, h = windows[-1]
        np.testing.assert_array_equal(direct[-1], lazy.read(level, x, y, w, h))


def test_switched_off_with_native_off(small_slide):
    code = (
        "import vipsnorm, numpy as np\n"
        "from vipsnorm.io import jpeg_tiles\n"
        "from vipsnorm.training.patches import PatchReader\n"
        f"s = vipsnorm.open({str(small_slide)!r})\n"
        "assert not jpeg_tiles.available() and 'VIPSNORM_NATIVE=0' in jpeg_tiles.reason()\n"
        "assert s.jpeg_tiles(0) is None\n"
        "assert PatchReader(s).read(0, 5, 7, 32).shape == (32, 32, 3)\n"
    )
    env = {**os.environ, "VIPSNORM_NATIVE": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@needs_decoder
@pytest.mark.parametrize("name", ["equalize", "macenko", "stretch"])
def test_slide_fits_same_with_and_without(small_slide, monkeypatch, name):
    """The fit's full-resolution tiles (sampling._sample_tiles) come from the direct reader: the same
    fitted parameters as through libvips, to the last bit."""
    slide = vipsnorm.open(small_slide)
    method = build_method(name)
    options = Options(n_tiles=8)  # (few enough tiles that the slide is sampled, not counted whole)
    calls = []
    real = jpeg_tiles.JpegTiles.read
    monkeypatch.setattr(jpeg_tiles.JpegTiles, "read", lambda self, *window: calls.append(window) or real(self, *window))
    direct = fit_slide(slide, method, options)
    assert len(calls) >= 8  # (the check at first use, and the sampled tiles)
    monkeypatch.setattr(VipsSlide, "jpeg_tiles", lambda self, level: None)
    assert fit_slide(vipsnorm.open(small_slide), method, options) == direct


def _jpeg_segments(stream: bytes) -> list[tuple[int, bytes]]:
    """The marker segments of a JPEG stream up to its scan (which runs to the end), after SOI."""
    out, i = [], 2
    while True:
        marker = stream[i + 1]
        if marker == 0xDA:
            out.append((marker, stream[i:]))
            return out
        length = int.from_bytes(stream[i + 2:i + 4], "big")
        out.append((marker, stream[i:i + 2 + length]))
        i += 2 + length


@needs_decoder
def test_each_tile_starts_from_the_shared_tables(small_slide, tmp_path):
    """TIFF Technical Note 2: JPEGTables are the default for every tile that carries no tables of its
    own. One tile here carries its own (quality 20, among quality 90 tiles that rely on the shared
    tables): the tiles read after it in the same window must not decode with its tables."""
    size = 256
    image = pyvips.Image.new_from_file(str(small_slide)).crop(0, 0, 4 * size, 4 * size).numpy()
    odd = (1, 2)  # (tile row, tile column) with tables of its own

    def encode(tile: np.ndarray, quality: int) -> bytes:
        return pyvips.Image.new_from_array(tile, interpretation="srgb").jpegsave_buffer(Q=quality, subsample_mode="on")

    shared = b"\xff\xd8" + b"".join(
        seg for marker, seg in _jpeg_segments(encode(image[:size, :size], 90)) if marker in (0xDB, 0xC4)
    ) + b"\xff\xd9"

    def tiles():
        for ty in range(4):
            for tx in range(4):
                tile = np.ascontiguousarray(image[ty * size:(ty + 1) * size, tx * size:(tx + 1) * size])
                if (ty, tx) == odd:
                    yield encode(tile, 20)  # a whole stream, its own tables
                else:  # abbreviated: the shared tables left out
                    segments = _jpeg_segments(encode(tile, 90))
                    yield b"\xff\xd8" + b"".join(seg for marker, seg in segments if marker not in (0xDB, 0xC4))

    path = tmp_path / "own-tables.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(tiles(), shape=image.shape, dtype=np.uint8, tile=(size, size), compression="jpeg",
                  photometric="ycbcr", subsampling=(2, 2), jpegtables=shared)
    with tifffile.TiffFile(path, mode="r+b") as tif:  # (the streams hold YCbCr: say so)
        if tif.pages[0].photometric != tifffile.PHOTOMETRIC.YCBCR:
            tif.pages[0].tags["PhotometricInterpretation"].overwrite(6)
    slide = vipsnorm.open(path)
    direct = slide.jpeg_tiles(0)
    assert direct is not None
    oy, ox = odd[0] * size, odd[1] * size
    for window in [(ox + 200, oy + 10, 200, 100), (ox + 10, oy + 200, 100, 150), (ox - 50, oy - 50, 400, 400)]:
        np.testing.assert_array_equal(direct.read(*window), slide.read_region(0, *window), err_msg=str(window))


@needs_decoder
def test_a_dropped_slide_closes_its_file(small_slide):
    """Datasets drop slides rather than close them (a thread may still read one): the file the levels'
    readers share is closed with the last of them, and stays open while a reader is held."""
    import gc

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc/self/fd here")
    slide = vipsnorm.open(small_slide)
    slide.jpeg_tiles(0), slide.jpeg_tiles(1)
    fd = slide._direct_file.fd
    held = slide.jpeg_tiles(1)
    del slide
    gc.collect()
    os.fstat(fd)  # still open: a reader holds it
    assert held.read(0, 0, 8, 8) is not None
    del held
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)
    # many slides opened and dropped: no descriptor left behind (after a first round, in which
    # libvips' own operation cache takes the descriptors it keeps)
    counts = []
    for _ in range(2):
        for _ in range(20):
            vipsnorm.open(small_slide).jpeg_tiles(0)
        gc.collect()
        counts.append(open_fds())
    assert counts[1] <= counts[0] + 1


# --- whole levels streamed to libvips (Slide.stream_image) ---------------------------------------------


def _decoded(image: pyvips.Image) -> np.ndarray:
    return np.frombuffer(image.write_to_memory(), np.uint8).reshape(image.height, image.width, image.bands)


@needs_decoder
@pytest.mark.parametrize("name", ["rgb", "aperio", "ycbcr420", "rgb240", "subifd"])
def test_streamed_levels_equal_libvips(variants, name):
    """Every level, whole: libvips' bytes, and the image libvips' own fields (size, resolution, ...)."""
    slide = vipsnorm.open(variants[name])
    for level in range(len(slide.levels)):
        reference = slide.level_image(level)
        streamed = slide.stream_image(level)
        if slide.jpeg_tiles(level) is None:
            assert streamed is reference
            continue
        assert streamed is not reference, level  # (the direct source, not libvips' loader)
        assert streamed.get_fields() == reference.get_fields()
        assert (streamed.xres, streamed.yres, streamed.interpretation) == (reference.xres, reference.yres, "srgb")
        assert np.array_equal(_decoded(streamed), _decoded(reference)), (name, level)
    slide.close()


@needs_decoder
def test_streamed_level_in_any_order_and_from_threads(small_slide):
    """Made for one pass from top to bottom, but right for any access: windows across tile rows, rows
    evicted and decoded again (bottom to top), several threads at once."""
    slide = vipsnorm.open(small_slide)
    reference = _decoded(slide.level_image(0))
    streamed = slide.stream_image(0)
    h, w = reference.shape[:2]
    rng = np.random.default_rng(3)
    windows = [(x, y, 300, 300) for x, y in zip(rng.integers(0, w - 300, 12), rng.integers(0, h - 300, 12))]
    windows += [(0, y, w, 40) for y in range(h - 40, -1, -200)]  # bottom to top, full width, across rows
    for x, y, ww, hh in windows:
        got = _decoded(streamed.crop(int(x), int(y), ww, hh))
        assert np.array_equal(got, reference[y:y + hh, x:x + ww]), (x, y)
    errors = []

    def read(seed):
        r = np.random.default_rng(seed)
        for _ in range(6):
            x, y = int(r.integers(0, w - 256)), int(r.integers(0, h - 256))
            region = pyvips.Region.new(streamed).fetch(x, y, 256, 256)
            if not np.array_equal(np.frombuffer(region, np.uint8).reshape(256, 256, 3), reference[y:y + 256, x:x + 256]):
                errors.append((x, y))

    threads = [threading.Thread(target=read, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    slide.close()


@needs_decoder
def test_streamed_level_outlives_its_slide(small_slide):
    """The image holds its own copy of the level and its own descriptor: read after the slide is closed,
    and the descriptor closed once the image is gone."""
    import gc

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc/self/fd here")

    def open_on_slide() -> int:  # descriptors open on the slide's file (libvips' own included)
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += os.readlink(f"/proc/self/fd/{fd}") == str(Path(small_slide).resolve())
            except OSError:
                pass
        return count

    slide = vipsnorm.open(small_slide)
    reference = _decoded(slide.level_image(0))
    assert slide.jpeg_tiles(0) is not None  # (its file opened)
    before = open_on_slide()
    streamed = slide.stream_image(0)
    assert open_on_slide() == before + 1
    assert np.array_equal(_decoded(streamed.crop(0, 0, 512, 300)), reference[:300, :512])
    (native,) = slide._streams
    slide._direct_file.close()  # (the readers' shared file, which close() would close as well)
    held = open_on_slide()
    slide.close()  # its descriptor and decoded rows given back, though the image is still held
    assert native.pointer == 0 and open_on_slide() == held - 1
    assert np.array_equal(_decoded(streamed), reference)  # read on, through libvips' loader
    del streamed
    gc.collect()
    # a dropped slide (never closed) lets go of them too
    slide = vipsnorm.open(small_slide)
    streamed = slide.stream_image(0)
    opened = open_on_slide()
    del slide
    gc.collect()
    assert open_on_slide() < opened
    assert np.array_equal(_decoded(streamed), reference)


@needs_decoder
def test_jobs_leave_no_level_behind(small_slide, tmp_path):
    """libvips' operation cache keeps the last pipelines, and with them the streamed image: the level's
    descriptor and memory must still go with the job's slide."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc/self/fd here")
    target = str(Path(small_slide).resolve())

    def open_on_slide() -> int:
        return sum(os.path.realpath(f"/proc/self/fd/{fd}") == target for fd in os.listdir("/proc/self/fd"))

    method = build_method("macenko")
    counts = []
    for i in range(6):
        assert normalize_file(small_slide, tmp_path, method, name=f"out{i}").status == "ok"
        counts.append(open_on_slide())
    # libvips' own cached loads vary a little; one level kept a job would add one a job
    assert max(counts[3:]) <= max(counts[:3]), counts


@needs_decoder
def test_streamed_damage_is_reported_as_before(damaged_svs, tmp_path, monkeypatch):
    """A damaged tile: the direct source gives its requests to libvips' loader, which fails on it as it
    always did, and the job's error is the same with the source and without."""
    slide = vipsnorm.open(damaged_svs)
    streamed = slide.stream_image(0)
    assert streamed is not slide.level_image(0)
    # (libvips' TIFF loader fills a damaged tile with grey and leaves a warning: Slide.decode finds it)
    with pytest.raises(UnreadableImageError, match="damaged"):
        slide.decode(lambda: streamed.crop(0, 0, 64, 64).avg())
    slide.close()
    method = build_method("stretch")
    with_source = normalize_file(damaged_svs, tmp_path, method, options=Options(n_tiles=8))
    monkeypatch.setattr(VipsSlide, "stream_image", lambda self, level=0: self.level_image(level))
    without = normalize_file(damaged_svs, tmp_path, method, options=Options(n_tiles=8))
    assert with_source.status == without.status == "error"
    assert with_source.error == without.error
    assert "damaged" in with_source.error
    assert not list(tmp_path.iterdir())  # nothing left behind


@needs_decoder
@pytest.mark.parametrize("name", ["stretch", "macenko"])
def test_normalized_slides_identical_with_and_without(small_slide, tmp_path, monkeypatch, name):
    """The whole job writes the same slide (lossless output, compared pixel for pixel on every level)."""
    import tifffile

    method = build_method(name)
    options = Options(compression="deflate")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    calls = []
    real = VipsSlide.stream_image
    monkeypatch.setattr(VipsSlide, "stream_image", lambda self, level=0: calls.append(level) or real(self, level))
    first = normalize_file(small_slide, tmp_path / "a", method, options=options)
    assert first.status == "ok" and calls == [0]
    monkeypatch.setattr(VipsSlide, "stream_image", lambda self, level=0: self.level_image(level))
    second = normalize_file(small_slide, tmp_path / "b", method, options=options)
    assert second.status == "ok"
    with tifffile.TiffFile(first.output) as a, tifffile.TiffFile(second.output) as b:
        assert len(a.pages) == len(b.pages) > 1
        for pa, pb in zip(a.pages, b.pages):
            assert np.array_equal(pa.asarray(), pb.asarray())


# --- tiles kept as coefficients (JpegTiles.keeping) --------------------------------------------------

needs_keeping = pytest.mark.skipif(
    not jpeg_tiles.keeping_supported(), reason="the decoder cannot keep tiles (libjpeg-turbo 2.x or 3.x needed)"
)


def _sorted_windows(width, height, tile, seed, n):
    """Awkward and random windows (see _windows), each twice, in row order: tiles are met again, by the
    same window and by others, cropped and not."""
    windows = _windows(width, height, tile, np.random.default_rng(seed), n)
    return sorted(windows + windows[::3], key=lambda w: (w[1], w[0]))


@needs_keeping
@pytest.mark.parametrize("name", ["rgb", "aperio", "ycbcr420", "rgb240", "subifd"])
def test_kept_tiles_give_libvips_bytes(variants, name, budget):
    """Every level of every layout: windows read from kept tiles (an output pass over stored
    coefficients, cropped and skipped) are libvips' bytes, whatever window of the tile came before."""
    budget(64)
    slide = vipsnorm.open(variants[name])
    try:
        for level in range(len(slide.levels)):
            direct = slide.jpeg_tiles(level)
            assert direct is not None and direct.keeping, f"level {level} does not keep tiles"
            before = jpeg_tiles.kept_stats()
            lvl = slide.levels[level]
            for x, y, w, h in _sorted_windows(lvl.width, lvl.height, direct.layout.tile_width, level, 30):
                got = direct._read(x, y, w, h, jpeg_tiles.KEEP_ALWAYS)
                assert got is not None
                np.testing.assert_array_equal(got, slide.read_region(level, x, y, w, h),
                                              err_msg=f"{name} {level} {(x, y, w, h)}")
            after = jpeg_tiles.kept_stats()
            assert after["hits"] - before["hits"] > 10  # (tiles were met again while kept)
    finally:
        slide.close()


@needs_keeping
def test_tiles_are_kept_only_while_reads_meet_them_again(small_slide, budget):
    """Adaptive keeping: reads cycling over more tiles than the list of tiles met holds (48 tiles, a
    list of 16 at a 2 MB budget) soon stop keeping tiles and decode them the other way; reads that meet
    the same tiles again keep them again. The bytes stay libvips' either way."""
    budget(2)
    slide = vipsnorm.open(small_slide)
    direct = slide.jpeg_tiles(0)
    assert direct.keeping
    budget(2)  # (the check at open met and kept its tiles: start the list again, without them)
    direct.forget_kept()
    tiles = [(tx * 256, ty * 256) for ty in range(6) for tx in range(8)]
    expected = {xy: slide.read_region(0, *xy, 256, 256) for xy in tiles}
    start = jpeg_tiles.kept_stats()
    for _ in range(4):
        for xy in tiles:
            np.testing.assert_array_equal(direct.read(*xy, 256, 256), expected[xy])
    cycled = jpeg_tiles.kept_stats()
    # no tile met again within 16 others: once the share of reads meeting one fell below a fifth (about
    # 100 reads), the rest were decoded without keeping (and the last tiles kept were found kept)
    assert cycled["others"] - start["others"] > 60
    assert cycled["loads"] - start["loads"] < 130 and cycled["hits"] - start["hits"] <= 8
    assert cycled["bytes"] <= 2 << 20
    direct.forget_kept()
    for _ in range(60):  # one tile over and over: met again, kept again
        np.testing.assert_array_equal(direct.read(*tiles[5], 256, 256), expected[tiles[5]])
    again = jpeg_tiles.kept_stats()
    assert again["loads"] > cycled["loads"] and again["hits"] - cycled["hits"] > 30
    slide.close()


@needs_keeping
def test_the_store_keeps_within_its_budget_and_closing_gives_back(small_slide, budget):
    budget(1)  # two 256 px RGB tiles (416 KB each)
    slide = vipsnorm.open(small_slide)
    direct = slide.jpeg_tiles(0)
    rng = np.random.default_rng(5)
    for x, y, w, h in _sorted_windows(2048, 1536, 256, 5, 40):
        direct._read(x, y, w, h, jpeg_tiles.KEEP_ALWAYS)
        assert jpeg_tiles.kept_stats()["bytes"] <= 1 << 20
    assert 0 < direct.kept_bytes() <= 1 << 20
    budget(0)  # nothing kept from now on, and what was is given back
    assert direct.kept_bytes() == 0
    x, y = int(rng.integers(0, 1800)), int(rng.integers(0, 1300))
    np.testing.assert_array_equal(direct._read(x, y, 200, 200, jpeg_tiles.KEEP_ALWAYS),
                                  slide.read_region(0, x, y, 200, 200))
    assert jpeg_tiles.kept_stats()["tiles"] == 0
    budget(8)
    direct._read(300, 300, 300, 300, jpeg_tiles.KEEP_ALWAYS)
    assert direct.kept_bytes() > 0
    slide.close()
    assert direct.kept_bytes() == 0
    # a slide opened while the budget is 0 never keeps; nor one whose tiles do not fit the budget
    budget(0)
    with vipsnorm.open(small_slide) as other:
        assert other.jpeg_tiles(0).keeping is False
    budget(0.3)  # (a 256 px RGB tile keeps 416 KB)
    with vipsnorm.open(small_slide) as other:
        direct = other.jpeg_tiles(0)
        assert direct.keeping is False
        before = jpeg_tiles.kept_stats()
        np.testing.assert_array_equal(direct._read(100, 100, 300, 300, jpeg_tiles.KEEP_ALWAYS),
                                      other.read_region(0, 100, 100, 300, 300))
        after = jpeg_tiles.kept_stats()
        assert after["loads"] == before["loads"] and after["others"] == before["others"] + 4
        assert direct.kept_bytes() == 0


@needs_keeping
def test_a_damaged_tile_is_never_kept(damaged_svs, budget):
    """Loading a tile consumes all its data, failing on any warning: the damaged tile is refused however
    often it is read, and nothing of it is kept."""
    budget(64)
    slide = vipsnorm.open(damaged_svs)
    direct = slide.jpeg_tiles(0)
    assert direct.keeping
    held = direct.kept_bytes()
    for _ in range(3):
        assert direct._read(10, 10, 5, 5, jpeg_tiles.KEEP_ALWAYS) is None
        assert direct.read(0, 0, 240, 240) is None
    assert direct.kept_bytes() == held and direct.valid_tiles() == 4
    with pytest.raises(UnreadableImageError, match="cannot decode pixels"):
        PatchReader(slide).read(0, 0, 0, 240)
    slide.close()


@needs_keeping
def test_a_level_keeps_tiles_only_once_checked(small_slide, monkeypatch, budget):
    """A kept tile that came out different from libvips in the check at open leaves the level read
    directly without keeping."""
    budget(64)
    real = jpeg_tiles.JpegTiles._read

    def off_when_kept(self, x, y, w, h, keep):
        got = real(self, x, y, w, h, keep)
        if got is not None and keep == jpeg_tiles.KEEP_ALWAYS:
            got[-1, -1, 2] ^= 1
        return got

    monkeypatch.setattr(jpeg_tiles.JpegTiles, "_read", off_when_kept)
    slide = vipsnorm.open(small_slide)
    direct = slide.jpeg_tiles(0)
    assert direct is not None and direct.keeping is False and direct.kept_bytes() == 0
    monkeypatch.undo()
    np.testing.assert_array_equal(PatchReader(slide).read(0, 10, 20, 64), slide.read_region(0, 10, 20, 64, 64))
    slide.close()


_FORK_CHILD = r"""
import hashlib, os, sys, threading
import numpy as np
import vipsnorm
from vipsnorm.io import jpeg_tiles

jpeg_tiles.set_kept_budget(16)
slide = vipsnorm.open(sys.argv[1])
direct = slide.jpeg_tiles(0)
assert direct.keeping
windows = [(x, y, 300, 200) for y in range(0, 1300, 170) for x in range(0, 1700, 230)]
def digest():
    return hashlib.sha256(b"".join(direct._read(*w, jpeg_tiles.KEEP_ALWAYS).tobytes() for w in windows)).hexdigest()
expected = digest()
stop = False
def churn():  # another thread reading kept tiles whenever the main thread forks
    while not stop:
        direct._read(123, 456, 500, 400, jpeg_tiles.KEEP_ALWAYS)
thread = threading.Thread(target=churn, daemon=True)
thread.start()
try:
    for _ in range(8):
        pid = os.fork()
        if pid == 0:  # the child reads from the store it inherited (and new tiles)
            os._exit(0 if digest() == expected else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
finally:
    stop = True
    thread.join()
print("ok")
"""


@needs_keeping
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_reads_kept_tiles_while_another_thread_reads(small_slide):
    """A child forked while another thread reads kept tiles gets a whole store (the fork waits for it)
    and reads the parent's bytes; a store copied mid-read could hang the child or give it wrong pixels."""
    proc = subprocess.run([sys.executable, "-c", _FORK_CHILD, str(small_slide)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_budget_from_the_environment(small_slide):
    code = ("from vipsnorm.io import jpeg_tiles as j; import vipsnorm, sys; s = vipsnorm.open(sys.argv[1]); "
            "r = s.jpeg_tiles(0); print(j.kept_stats()['budget'], r is not None and r.keeping)")
    for value, budget_bytes, keeping in (("0", 0, False), ("3", 3 << 20, True), ("", 48 << 20, True)):
        env = {**os.environ, "VIPSNORM_KEPT_TILES_MB": value}
        proc = subprocess.run([sys.executable, "-c", code, str(small_slide)], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        got_budget, got_keeping = proc.stdout.split()
        if not (jpeg_tiles.available() and jpeg_tiles.keeping_supported()):
            keeping = False
        assert got_keeping == str(keeping)
        if jpeg_tiles.keeping_supported():
            assert int(got_budget) == budget_bytes


def test_budgets_that_are_not_budgets(small_slide):
    """VIPSNORM_KEPT_TILES_MB that is not a number of MB >= 0 keeps the default, with a warning, and
    reading goes on; "inf" is a terabyte. set_kept_budget refuses them."""
    code = ("import warnings, sys; warnings.simplefilter('always'); from vipsnorm.io import jpeg_tiles as j; "
            "import vipsnorm; s = vipsnorm.open(sys.argv[1]); print(j.available(), j.kept_stats()['budget'], "
            "s.jpeg_tiles(0) is not None)")
    for value, expected in (("inf", 1 << 40), ("nan", 48 << 20), ("lots", 48 << 20), ("-3", 48 << 20)):
        env = {**os.environ, "VIPSNORM_KEPT_TILES_MB": value}
        proc = subprocess.run([sys.executable, "-c", code, str(small_slide)], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        ok, got, direct = proc.stdout.split()
        assert ok == direct == str(jpeg_tiles.available())
        if jpeg_tiles.keeping_supported():
            assert int(got) == expected, value
        assert ("not a number of MB" in proc.stderr) == (value != "inf" and jpeg_tiles.available()), value
    for bad in (float("nan"), -1):
        with pytest.raises(ValueError):
            jpeg_tiles.set_kept_budget(bad)
