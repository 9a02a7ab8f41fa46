"""Colour tables (``vipsnorm.training.colour_table``): a per-pixel method looked up per colour equals its
libvips pipeline bit for bit: on every one of the 2**24 colours, on windows of real and generated
slides read by :class:`PatchReader` (libvips and OpenSlide), with colours repeated within a patch,
and from several threads at once."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import pyvips

import vipsnorm
from vipsnorm.engine import Options, build_method, fit_slide, load_reference
from vipsnorm.synth import synthetic_slide
from vipsnorm.training import colour_table as ct
from vipsnorm.training.colour_table import ColourTable, colour_table, per_pixel
from vipsnorm.training.patches import PatchReader

METHODS = ["equalize", "equalize rgb", "stretch", "stretch rgb", "match", "reinhard", "macenko", "vahadane"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "reference.png"
    synthetic_slide(256, 256, seed=2, lab="pale-blue", tissue=0.8).pngsave(str(path))
    return path


def make(name: str, reference: Path):
    if name == "vahadane":
        pytest.importorskip("sklearn")
    base, _, mode = name.partition(" ")
    options = {"mode": mode} if mode else {}
    if base in ("match", "reinhard"):
        return build_method(base, load_reference(reference, base), **options)
    return build_method(base, **options)


def all_colours() -> np.ndarray:
    """Every RGB colour once, as a 4096x4096x3 uint8 array."""
    v = np.arange(1 << 24, dtype=np.uint32)
    return np.stack([v >> 16, (v >> 8) & 255, v & 255], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)


def test_every_colour_equals_the_pipeline(small_slide, reference):
    """All 2**24 colours through a fresh table (filled from scratch, with colours in 256 chunks of
    65,536) against the lazy pipeline on the same image."""
    with vipsnorm.open(small_slide) as slide:
        method = make("macenko", reference)
        params = fit_slide(slide, method, Options())
    colours = all_colours()
    expected = method.apply(pyvips.Image.new_from_array(colours), params).numpy()
    table = ColourTable(method, params)
    np.testing.assert_array_equal(table(colours), expected)
    assert table.filled == 1 << 24
    # a second pass reads every entry back (nothing is computed again)
    table._compute = None  # would fail if called
    np.testing.assert_array_equal(table(colours[::7, ::5]), expected[::7, ::5])


@pytest.mark.parametrize("name", METHODS)
def test_reader_with_table_equals_the_pipeline(small_slide, reference, name):
    """Windows of a generated slide at levels 0 and 1, read through the table (filled by the first
    windows) and through the lazy pipeline: identical."""
    method = make(name, reference)
    with vipsnorm.open(small_slide) as slide:
        params = fit_slide(slide, method, Options())
        table, plain = PatchReader(slide, method, params), PatchReader(slide, method, params, colour_table=False)
        rng = np.random.default_rng(0)
        for level in (0, 0, 0, 1):
            lvl = slide.levels[level]
            for _ in range(6):
                size = int(rng.integers(1, 200))
                x, y = int(rng.integers(0, lvl.width - size)), int(rng.integers(0, lvl.height - size))
                np.testing.assert_array_equal(table.read(level, x, y, size), plain.read(level, x, y, size))
        # the table was used, or (stain methods and luminance LUTs) the native kernel's cube
        assert colour_table(method, params).filled > 0 or table.cube


def test_real_slide_windows_and_openslide_reader(shared_data, reference):
    """A real Aperio slide, read by libvips and by OpenSlide: the table's windows equal the pipeline's
    (libvips) and the numpy twin's (OpenSlide, level 0)."""
    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    method = make("reinhard", reference)
    with vipsnorm.open(path) as slide:
        params = fit_slide(slide, method, Options())
        a, b = PatchReader(slide, method, params), PatchReader(slide, method, params, colour_table=False)
        for x, y in [(0, 0), (700, 900), (1500, 1200), (1700, 1)]:
            np.testing.assert_array_equal(a.read(0, x, y, 256), b.read(0, x, y, 256))
    with vipsnorm.open(path, backend="openslide") as slide:
        a, b = PatchReader(slide, method, params), PatchReader(slide, method, params, colour_table=False)
        for x, y in [(10, 20), (900, 700)]:
            np.testing.assert_array_equal(a.read(0, x, y, 256), b.read(0, x, y, 256))


def test_repeated_colours_in_one_patch_are_computed_once(reference):
    """A patch of three colours repeated thousands of times: three colours computed, every pixel right."""
    method = make("macenko", reference)
    colours = np.array([[200, 120, 180], [90, 40, 140], [240, 238, 241]], np.uint8)
    patch = colours[np.random.default_rng(1).integers(0, 3, (300, 300))]
    params = method.fit(vipsnorm.methods.Sample.from_array(synthetic_slide(256, 256, seed=4).numpy()))
    table = ColourTable(method, params)
    computed = []
    original = table._compute
    table._compute = lambda c: computed.append(len(c)) or original(c)
    out = table(patch)
    assert computed == [3]
    expected = method.apply(pyvips.Image.new_from_array(colours[np.newaxis]), params).numpy()[0]
    np.testing.assert_array_equal(out, expected[np.random.default_rng(1).integers(0, 3, (300, 300))])


def test_empty_arrays_map_to_empty_arrays(reference):
    method = make("macenko", reference)
    params = method.fit(vipsnorm.methods.Sample.from_array(synthetic_slide(256, 256, seed=4).numpy()))
    table = ColourTable(method, params)
    assert table(np.zeros((0, 5, 3), np.uint8)).shape == (0, 5, 3)
    assert table.map_rgbx(np.zeros((0, 4, 4), np.uint8)).shape == (0, 4, 3)
    assert table.filled == 0


def test_reader_follows_a_replaced_fit(small_slide, reference):
    """The reader keeps its table key only while its method and params are the same objects."""
    method = make("stretch", reference)
    slide = vipsnorm.open(small_slide)
    fits = [method.fit(vipsnorm.methods.Sample.from_array(synthetic_slide(128, 128, seed=s).numpy())) for s in (1, 2)]
    reader = PatchReader(slide, method, fits[0])
    first = reader.read(0, 10, 20, 64)
    reader.params = fits[1]
    np.testing.assert_array_equal(reader.read(0, 10, 20, 64), PatchReader(slide, method, fits[1]).read(0, 10, 20, 64))
    assert not np.array_equal(first, reader.read(0, 10, 20, 64))


def test_threads_filling_one_table_agree(small_slide, reference):
    """Eight threads reading overlapping windows through one fresh table: every window equals the
    pipeline's (marks of one filler are never read as colours by another)."""
    method = make("match", reference)
    with vipsnorm.open(small_slide) as slide:
        params = fit_slide(slide, method, Options())
        plain = PatchReader(slide, method, params, colour_table=False)
        windows = [(int(x), int(y)) for x, y in np.random.default_rng(2).integers(0, 1200, (48, 2))]
        expected = [plain.read(0, x, y, 160) for x, y in windows]
        ct._TABLES.clear()
        reader = PatchReader(slide, method, params)
        results: dict[int, np.ndarray] = {}

        def work(k: int) -> None:
            for i in range(k, len(windows), 8):
                results[i] = reader.read(0, *windows[i], 160)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, window in enumerate(expected):
        np.testing.assert_array_equal(results[i], window)


def test_tables_are_shared_per_fit_and_bounded(reference):
    ct._TABLES.clear()
    method = make("stretch", reference)
    fits = [method.fit(vipsnorm.methods.Sample.from_array(synthetic_slide(128, 128, seed=s).numpy())) for s in range(6)]
    assert colour_table(method, fits[0]) is colour_table(build_method("stretch"), fits[0])
    for params in fits:
        colour_table(method, params)
    assert len(ct._TABLES) == ct.MAX_TABLES
    assert colour_table(method, fits[-1]) is list(ct._TABLES.values())[-1]


def test_spatial_methods_and_bad_arrays_are_refused(small_slide, reference):
    clahe = build_method("clahe")
    assert not per_pixel(clahe) and not per_pixel(None) and per_pixel(build_method("macenko"))
    with vipsnorm.open(small_slide) as slide:
        params = fit_slide(slide, clahe, Options())
        with pytest.raises(ValueError, match="not a per-pixel method"):
            ColourTable(clahe, params)
        # CLAHE patches still come from the lazy pipeline
        reader = PatchReader(slide, clahe, params)
        assert reader.read(0, 100, 100, 64).shape == (64, 64, 3)
    method = make("stretch", reference)
    table = ColourTable(method, method.fit(vipsnorm.methods.Sample.from_array(synthetic_slide(64, 64).numpy())))
    with pytest.raises(ValueError, match=r"\(h, w, 3\) uint8"):
        table(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\(h, w, 3\) uint8"):
        table(np.zeros((4, 4, 3), np.uint16))
    with pytest.raises(IndexError):
        table.map_rgbx(np.full((2, 2, 4), 1, np.uint8))
    np.testing.assert_array_equal(
        table.map_rgbx(np.zeros((2, 2, 4), np.uint8)), table(np.zeros((2, 2, 3), np.uint8))
    )


def test_a_huge_clahe_clip_limit_clips_nothing_and_does_not_overflow():
    """A clip limit whose clip exceeds 2**31 (int32) is the same as one that clips nothing."""
    from vipsnorm.training import augment

    image = synthetic_slide(64, 64, seed=3).numpy()
    np.testing.assert_array_equal(augment.clahe(image, clip_limit=1e10), augment.clahe(image, clip_limit=1e4))


def test_datasets_use_tables_only_when_every_fit_has_one(small_slide, tmp_path):
    """More distinct fits than a process keeps tables would drop and refill them on every read: the
    dataset's readers then run the pipeline."""
    from vipsnorm.training.datasets import PatchSource
    from vipsnorm.training.patches import Patch

    patches = [Patch(slide=str(small_slide), level=0, x=100, y=100, x0=100, y0=100, size=32)]
    source = PatchSource(patches, method="stretch")
    assert source._reader(str(small_slide))._table
    source.params.update({f"other{i}": params for i, params in enumerate(
        build_method("stretch").fit(vipsnorm.methods.Sample.from_array(synthetic_slide(64, 64, seed=s).numpy()))
        for s in range(ct.MAX_TABLES))})
    source.close()
    assert not source._reader(str(small_slide))._table


def test_readers_take_kernel_cubes_up_to_the_slots_then_tables(small_slide, reference):
    """Patch readers of a fit the native kernel runs map their windows through its cube, at most
    READER_CUBES readers at a time (64 MiB each); the others use the colour tables; the same pixels."""
    from vipsnorm import _native

    if not _native.available():
        pytest.skip(f"native kernel: {_native.reason()}")
    import gc

    gc.collect()
    method = make("macenko", reference)
    with vipsnorm.open(small_slide) as slide:
        params = fit_slide(slide, method, Options())
        before = _native._reader_cubes
        readers = [PatchReader(slide, method, params) for _ in range(_native.READER_CUBES - before + 1)]
        windows = [reader.read(0, 300, 400, 96) for reader in readers]
        with_cube = [reader.cube for reader in readers]
        assert with_cube == [True] * (len(readers) - 1) + [False]
        assert _native._reader_cubes == _native.READER_CUBES
        for window in windows[1:]:
            np.testing.assert_array_equal(window, windows[0])
        with _native.switched_off():
            np.testing.assert_array_equal(windows[0], PatchReader(slide, method, params, colour_table=False).read(0, 300, 400, 96))
        # the table path of the same fit, with the kernel off (cube readers also step aside then)
        with _native.switched_off():
            np.testing.assert_array_equal(readers[0].read(0, 300, 400, 96), windows[0])
        del readers, windows
        gc.collect()
        assert _native._reader_cubes == before  # the readers' slots are free again


def test_a_reader_gives_its_slot_back_when_it_has_no_cube_to_hold(small_slide, reference):
    from vipsnorm import _native

    if not _native.available():
        pytest.skip(f"native kernel: {_native.reason()}")
    import gc

    gc.collect()
    before = _native._reader_cubes
    with vipsnorm.open(small_slide) as slide:
        stain = make("macenko", reference)
        stain_params = fit_slide(slide, stain, Options())
        lut = make("stretch", reference)  # one LUT a band: libvips' own maplut, no kernel program
        reader = PatchReader(slide, lut, fit_slide(slide, lut, Options()))
        reader.read(0, 10, 10, 64)
        assert not reader.cube and _native._reader_cubes == before
        reader.method, reader.params = stain, stain_params  # a replaced fit the kernel runs
        reader.read(0, 10, 10, 64)
        assert reader.cube and _native._reader_cubes == before + 1
        reader.method, reader.params = lut, fit_slide(slide, lut, Options())  # and back: the slot goes
        reader.read(0, 10, 10, 64)
        assert not reader.cube and _native._reader_cubes == before


def test_a_luminance_reader_maps_with_the_kernel_without_taking_a_cube_slot(small_slide, reference):
    # luminance equalization's program (the luma's change alone) runs faster than a cube lookup: a
    # reader maps its windows with it whatever the slots, and holds none; the windows are the slide's
    from vipsnorm import _native

    if not _native.available():
        pytest.skip(f"native kernel: {_native.reason()}")
    import gc

    gc.collect()
    before = _native._reader_cubes
    method = make("equalize", reference)
    with vipsnorm.open(small_slide) as slide:
        params = fit_slide(slide, method, Options())
        readers = [PatchReader(slide, method, params) for _ in range(_native.READER_CUBES + 1)]
        windows = [reader.read(0, 300, 400, 96) for reader in readers]
        assert all(reader.cube for reader in readers)
        assert _native._reader_cubes == before
        expected = method.apply(slide.level_image(0), params).crop(300, 400, 96, 96).numpy()
        for window in windows:
            np.testing.assert_array_equal(window, expected)
        with _native.switched_off():
            np.testing.assert_array_equal(PatchReader(slide, method, params, colour_table=False).read(0, 300, 400, 96), expected)
