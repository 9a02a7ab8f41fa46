"""``vipsnorm patches``: patches equal the same windows of the slide that ``vipsnorm normalize`` writes
(lossless), the level is chosen by pixel size, grid/random placement over the tissue, WebDataset shards,
the coordinates table, bad slides, atomic outputs."""

from __future__ import annotations

import argparse
import csv
import errno
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import pyvips

import vipsnorm
from vipsnorm.cli import main as vipsnorm_main
from vipsnorm.engine import Options, build_method, fit_slide
from vipsnorm.io.write import PART_MARKER
from vipsnorm.training import cli as patches_cli
from vipsnorm.training.patches import (
    TABLE,
    TABLE_COLUMNS,
    Patch,
    PatchJob,
    PatchReader,
    choose_level,
    grid_patches,
    random_patches,
    rebuild_table,
    slide_rng,
)

cv2 = pytest.importorskip("cv2")
tifffile = pytest.importorskip("tifffile")


def run(capsys, *argv) -> tuple[int, str, str]:
    """``vipsnorm patches ARGV`` through the main command line."""
    code = vipsnorm_main(["patches", *(str(a) for a in argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table(out: Path) -> list[dict]:
    with open(out / TABLE, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows


def load_patch(out: Path, row: dict) -> np.ndarray:
    path = out / row["file"]
    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".tar":
        with tarfile.open(path) as tar:
            data = tar.extractfile(f"{row['key']}.png").read()
        path = None
    else:
        data = path.read_bytes()
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # an independent decoder
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def no_part_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if PART_MARKER in p.name or ".old" in p.suffixes]


def openslide_window(path: Path, level: int, x0: int, y0: int, size: int) -> np.ndarray:
    """Raw pixels read by OpenSlide itself (an independent reader)."""
    import openslide

    with openslide.OpenSlide(str(path)) as osr:
        return np.asarray(osr.read_region((x0, y0), level, (size, size)))[..., :3]


# --- pixel for pixel: the normalized slide -------------------------------------------------------


@pytest.mark.parametrize(
    "method, fmt",
    [("equalize", "png"), ("macenko", "npy"), ("clahe", "png"), ("stretch", "tar")],
)
def test_patches_equal_the_same_windows_of_the_normalized_slide(small_slide, tmp_path, capsys, method, fmt):
    from vipsnorm.cli import main as vipsnorm_main

    normalized = tmp_path / "normalized"
    assert (
        vipsnorm_main(
            ["normalize", str(small_slide), "-o", str(normalized), "--method", method, "--compression", "deflate"]
        )
        == 0
    )
    whole = tifffile.imread(normalized / "small.tif", level=0)  # level 0 of the written pyramid
    out = tmp_path / "patches"
    code, stdout, _ = run(
        capsys,
        small_slide,
        "-o",
        out,
        "--method",
        method,
        "--format",
        fmt,
        "--random",
        10,
        "--seed",
        3,
        "--min-tissue",
        0.3,
    )
    assert code == 0 and "ok" in stdout
    rows = table(out)
    assert len(rows) == 10
    raw_differs = 0
    for row in rows:
        x, y, size = int(row["x"]), int(row["y"]), int(row["size"])
        patch = load_patch(out, row)
        np.testing.assert_array_equal(patch, whole[y : y + size, x : x + size])
        raw_differs += not np.array_equal(patch, openslide_window(small_slide, 0, x, y, size))
    assert raw_differs == len(rows)  # (and they are normalized, not the raw pixels)
    assert no_part_files(tmp_path)


def test_mpp_chooses_the_level_and_patches_are_that_level_normalized(small_slide, tmp_path, capsys):
    out = tmp_path / "p"
    code, stdout, _ = run(
        capsys,
        small_slide,
        "-o",
        out,
        "--mpp",
        0.5,
        "--size",
        128,
        "--method",
        "equalize",
        "--format",
        "npy",
        "--random",
        6,
    )
    assert code == 0 and "level 1, 0.5 um/px" in stdout
    rows = table(out)
    method = build_method("equalize")
    with vipsnorm.open(small_slide) as slide:
        params = fit_slide(slide, method, Options())  # the fit 'vipsnorm normalize' makes
    for row in rows:
        assert row["level"] == "1" and float(row["mpp"]) == pytest.approx(0.5)
        x, y, x0, y0 = (int(row[k]) for k in ("x", "y", "x0", "y0"))
        assert (x0, y0) == (2 * x, 2 * y)
        raw = openslide_window(small_slide, 1, x0, y0, 128)
        np.testing.assert_array_equal(np.load(out / row["file"]), method.apply_array(raw, params))
    # --level 1 places the same patches
    code, _, _ = run(
        capsys, small_slide, "-o", tmp_path / "q", "--level", 1, "--size", 128, "--format", "coords", "--random", 6
    )
    assert code == 0 and [r["key"] for r in table(tmp_path / "q")] == [r["key"] for r in rows]


def test_choose_level_by_pixel_size(small_slide, tmp_path):
    with vipsnorm.open(small_slide) as slide:  # 0.25 um/px, downsamples 1, 2, 4, 8
        assert [choose_level(slide, mpp=m) for m in (0.25, 0.3, 0.5, 0.7, 0.75, 1.0, 2.0, 50.0)] == [
            0,
            0,
            1,
            1,
            2,
            2,
            3,
            3,
        ]
        assert choose_level(slide, mpp=0.25 * 2**0.5) == 0  # a tie: the finer level
        assert choose_level(slide) == 0 and choose_level(slide, level=2) == 2
        with pytest.raises(vipsnorm.UnsupportedImageError, match="no level 7"):
            choose_level(slide, level=7)
    image = tmp_path / "plain.png"
    pyvips.Image.new_from_file(str(small_slide)).crop(0, 0, 400, 300).pngsave(str(image))
    with vipsnorm.open(image) as plain:
        with pytest.raises(vipsnorm.UnsupportedImageError, match="pixel size is unknown.*--level"):
            choose_level(plain, mpp=0.5)


def test_levels_above_zero_with_clahe_use_the_level0_tables(small_slide, tmp_path, capsys):
    code, stdout, _ = run(
        capsys,
        small_slide,
        "-o",
        tmp_path / "c",
        "--level",
        1,
        "--size",
        128,
        "--method",
        "clahe",
        "--format",
        "npy",
        "--random",
        4,
    )
    assert code == 0, stdout
    rows = table(tmp_path / "c")
    assert len(rows) == 4 and all(r["level"] == "1" for r in rows)
    method = build_method("clahe")
    with vipsnorm.open(small_slide) as slide:
        params = fit_slide(slide, method, Options())
        level1 = slide.level_image(1).numpy()
    from vipsnorm.training.patches import params_at_level

    with vipsnorm.open(small_slide) as slide:
        at1 = params_at_level(slide, params, 1)
    assert at1.luts == params.luts and at1.grid == params.grid and (at1.width, at1.height) == (1024, 768)
    whole = method.apply_array(level1, at1)  # the numpy twin on the whole (small) level
    for row in rows:
        x, y = int(row["x"]), int(row["y"])
        d = np.abs(np.load(tmp_path / "c" / row["file"]).astype(int) - whole[y : y + 128, x : x + 128])
        assert d.max() <= 1 and np.mean(d > 0) < 0.02  # the pipeline vs numpy tolerance of test_clahe.py


# --- where: grid, random, tissue ----------------------------------------------------------------


def test_grid_stride_and_tissue_filter(small_slide):
    with vipsnorm.open(small_slide) as slide:
        every = grid_patches(slide, 256, stride=192, min_tissue=0.0)
        kept = grid_patches(slide, 256, stride=192, min_tissue=0.6)
        reader = PatchReader(slide)
        # the grid: every 192 px, windows wholly inside the 2048 x 1536 level
        assert {p.x for p in every} == set(range(0, 2048 - 256 + 1, 192))
        assert {p.y for p in every} == set(range(0, 1536 - 256 + 1, 192))
        assert len(every) == len({p.x for p in every}) * len({p.y for p in every})
        # the filter keeps exactly the windows whose fraction reaches 0.6
        assert [p for p in every if p.tissue >= 0.6] == kept and 0 < len(kept) < len(every)
        # and the fraction means tissue: stained pixels (darkest channel below 200, glass is ~235)
        stained = {(p.x, p.y): np.mean(reader.read_patch(p).min(axis=-1) < 200) for p in every}
        dense = [stained[p.x, p.y] for p in every if p.tissue >= 0.95]
        glass = [stained[p.x, p.y] for p in every if p.tissue == 0.0]
        assert dense and glass and min(dense) > 0.5 and max(glass) < 0.05


def test_random_patches_are_seeded_distinct_inside_and_on_tissue(small_slide):
    with vipsnorm.open(small_slide) as slide:
        a = random_patches(slide, 200, 40, seed=1, min_tissue=0.7)
        b = random_patches(slide, 200, 40, seed=1, min_tissue=0.7)
        c = random_patches(slide, 200, 40, seed=2, min_tissue=0.7)
        level2 = random_patches(slide, 64, 20, level=2, seed=1, min_tissue=0.5)
    assert a == b and a != c and len(a) == 40
    assert len({(p.x, p.y) for p in a}) == 40 and len({p.key for p in a}) == 40
    assert all(0 <= p.x <= 2048 - 200 and 0 <= p.y <= 1536 - 200 and p.tissue >= 0.7 for p in a)
    assert [(p.y, p.x) for p in a] == sorted((p.y, p.x) for p in a)  # in rows, for the reader's cache
    assert all(p.level == 2 and 0 <= p.x <= 512 - 64 and (p.x0, p.y0) == (4 * p.x, 4 * p.y) for p in level2)


def test_random_positions_are_never_drawn_twice_and_stay_as_before(small_slide):
    with vipsnorm.open(small_slide) as slide:
        first = random_patches(slide, 200, 8, seed=1, min_tissue=0.0)
        # level 2 is 512 x 384: 133 x 5 = 665 positions of a 380 px window, and 400 000 draws for
        # 1000 asked: drawn with replacement, each position comes up many times
        every = random_patches(slide, 380, 1000, level=2, seed=0, min_tissue=0.0)
    # the positions earlier versions gave (min_tissue 0: the draws alone decide them)
    assert [(p.x, p.y) for p in first] == [
        (355, 107), (181, 241), (286, 330), (1668, 838), (413, 939), (1730, 952), (126, 1089), (1735, 1256)
    ]  # fmt: skip
    assert len(every) == 665 and {(p.x, p.y) for p in every} == {(x, y) for x in range(133) for y in range(5)}


def _overlapping(patches) -> list:
    return [(p, q) for i, p in enumerate(patches) for q in patches[i + 1 :] if abs(p.x - q.x) < p.size and abs(p.y - q.y) < p.size]


def test_random_patches_without_overlap(small_slide, tmp_path, capsys):
    with vipsnorm.open(small_slide) as slide:
        free = random_patches(slide, 200, 30, seed=1, min_tissue=0.0, overlap=False)
        again = random_patches(slide, 200, 30, seed=1, min_tissue=0.0, overlap=False)
        overlapping = random_patches(slide, 200, 30, seed=1, min_tissue=0.0)
        # 100 px windows on the 512 x 384 level: at most 5 x 3 fit side by side
        packed = random_patches(slide, 100, 1000, level=2, seed=0, min_tissue=0.0, overlap=False)
    assert len(free) == 30 and not _overlapping(free) and free == again
    assert _overlapping(overlapping)  # what the option is for
    assert 5 <= len(packed) <= 15 and not _overlapping(packed)
    code, _, _ = run(capsys, small_slide, "-o", tmp_path / "p", "--random", 20, "--size", 128, "--no-overlap", "--format", "coords")
    rows = table(tmp_path / "p")
    assert code == 0 and len(rows) == 20
    assert not _overlapping([Patch.from_row(r) for r in rows])
    code, _, stderr = run(capsys, small_slide, "-o", tmp_path / "q", "--no-overlap")
    assert code == 2 and "--no-overlap" in stderr and "--random" in stderr


def test_random_patches_stop_when_the_tissue_is_too_small(small_slide):
    with vipsnorm.open(small_slide) as slide:
        few = random_patches(slide, 1000, 50, min_tissue=0.99)
    assert len(few) < 50


# --- outputs ------------------------------------------------------------------------------------


def test_tar_shards_hold_webdataset_samples(small_slide, tmp_path, capsys):
    out = tmp_path / "shards"
    code, _, _ = run(
        capsys,
        small_slide,
        "-o",
        out,
        "--format",
        "tar",
        "--random",
        12,
        "--shard-size",
        5,
        "--size",
        64,
        "--method",
        "macenko",
    )
    assert code == 0
    shards = sorted(out.glob("*.tar"))
    assert [s.name for s in shards] == ["small-000000.tar", "small-000001.tar", "small-000002.tar"]
    rows = {r["key"]: r for r in table(out)}
    seen = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            # WebDataset: consecutive members sharing the key before the first dot make one sample
            keys = [n.split(".", 1)[0] for n in names]
            assert names == [f"{k}.{ext}" for k in keys[::2] for ext in ("png", "json")]
            for key in keys[::2]:
                meta = json.load(tar.extractfile(f"{key}.json"))
                assert meta["key"] == key and meta["method"] == "macenko" and meta["slide"] == str(small_slide)
                assert {k: str(meta[k]) for k in ("level", "x", "y", "x0", "y0", "size")} == {
                    k: rows[key][k] for k in ("level", "x", "y", "x0", "y0", "size")
                }
                png = tar.extractfile(f"{key}.png").read()
                assert load_patch(out, rows[key]).shape == (64, 64, 3) and png[:8] == b"\x89PNG\r\n\x1a\n"
                assert rows[key]["file"] == shard.name
                seen.append(key)
    assert sorted(seen) == sorted(rows) and len(seen) == 12


def test_bad_slides_one_line_each_and_the_others_go_on(small_slide, glass_slide, tmp_path, capsys):
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(b"not a slide at all" * 100)
    missing = tmp_path / "missing.tif"
    out = tmp_path / "out"
    code, stdout, stderr = run(
        capsys, missing, garbage, small_slide, glass_slide, "-o", out, "--random", 5, "--method", "equalize"
    )
    assert code == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 3
    # one line each, in the order their tasks end (a cluster runs them at once)
    about = {name: [line for line in errors if f"{name}:" in line] for name in (missing, garbage, glass_slide)}
    assert all(len(lines) == 1 for lines in about.values())
    assert "no such file" in about[missing][0] and "tissue" in about[glass_slide][0]
    assert f"ok     {small_slide}" in stdout and "5 patches from 1 of 4 slides: 1 patched, 3 failed, 0 skipped" in stderr
    assert {r["slide"] for r in table(out)} == {str(small_slide)}
    assert sorted(p.name for p in out.iterdir()) == [".vipsnorm-rows", "patches.csv", "small"]  # nothing of the bad ones
    assert sorted(p.name for p in (out / ".vipsnorm-rows").iterdir()) == [".table.lock", "small.csv"]
    assert no_part_files(out)


def test_tar_shards_on_a_full_disk_one_error_each_and_the_others_go_on(small_slide, tmp_path, capsys, monkeypatch):
    """Before: closing the shard again in the error path raised ENOSPC once more, out of the slide: with
    --workers 0 the whole batch stopped ('error  [Errno 28] No space left on device', no file named,
    the other slides not tried); on a cluster, 'the task failed on the worker (OSError ...)'."""
    slides = [tmp_path / "in" / "a.tif", tmp_path / "in" / "b.tif"]
    slides[0].parent.mkdir()
    for slide in slides:
        slide.write_bytes(Path(small_slide).read_bytes())
    real_close = tarfile.TarFile.close

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close_on_a_full_disk(self):
        real_close(self)  # (the file is closed, as when its last write fails)
        full()

    monkeypatch.setattr(tarfile.TarFile, "addfile", full)
    monkeypatch.setattr(tarfile.TarFile, "close", close_on_a_full_disk)
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, *slides, "-o", out, "--format", "tar", "--random", 3, "--size", 64, "--workers", 0)
    assert code == 1 and stdout == ""
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert errors == [
        f"error  {out / name}-000000.tar: cannot write the output (No space left on device)" for name in ("a", "b")
    ]
    assert "0 patches from 0 of 2 slides: 0 patched, 2 failed" in stderr
    assert not list(out.glob("*.tar")) and no_part_files(out) and table(out) == []


def test_a_table_that_cannot_be_written_is_named_and_left_as_it_was(small_slide, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run(capsys, small_slide, "-o", out, "--random", 2, "--format", "coords", "--workers", 0)[0] == 0
    before = (out / TABLE).read_bytes()

    def full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(csv.DictWriter, "writeheader", full)
    with pytest.raises(vipsnorm.errors.OutputError) as caught:
        rebuild_table(out)
    assert str(caught.value) == f"{out / TABLE}: cannot write the table (No space left on device)"
    assert (out / TABLE).read_bytes() == before and no_part_files(out)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_a_fifo_given_as_a_slide_is_refused_as_such(small_slide, tmp_path, capsys):
    fifo = tmp_path / "pipe.tif"
    os.mkfifo(fifo)
    code, stdout, stderr = run(capsys, fifo, small_slide, "-o", tmp_path / "out", "--random", 2, "--format", "coords", "--workers", 0)
    assert code == 1 and f"ok     {small_slide}" in stdout
    assert f"error  {fifo}: not a regular file (a FIFO, device or socket); nothing read" in stderr


def test_glass_is_kept_with_min_tissue_zero(glass_slide, tmp_path, capsys):
    code, _, _ = run(capsys, glass_slide, "-o", tmp_path / "g", "--min-tissue", 0, "--size", 256, "--format", "coords")
    assert code == 0
    rows = table(tmp_path / "g")
    assert len(rows) == 4 * 3 and all(float(r["tissue"]) == 0.0 for r in rows)  # 1024 x 768: a 4 x 3 grid


def test_rerun_replaces_a_slides_outputs_and_the_table_keeps_the_others(small_slide, tmp_path, capsys):
    other = tmp_path / "other.tif"
    other.write_bytes(Path(small_slide).read_bytes())
    out = tmp_path / "out"
    assert run(capsys, small_slide, other, "-o", out, "--random", 6, "--size", 64)[0] == 0
    first = {r["key"] for r in table(out) if r["slide"] == str(small_slide)}
    assert run(capsys, small_slide, "-o", out, "--random", 3, "--size", 64, "--seed", 9)[0] == 0
    rows = table(out)
    mine = {r["key"] for r in rows if r["slide"] == str(small_slide)}
    assert len(mine) == 3 and mine != first
    assert len([r for r in rows if r["slide"] == str(other)]) == 6  # the other slide's rows are kept
    patch_files = lambda folder: [p for p in folder.iterdir() if not p.name.startswith(".")]  # noqa: E731
    assert sorted(p.stem for p in patch_files(out / "small")) == sorted(mine)  # old files gone
    assert len(patch_files(out / "other")) == 6
    assert (out / "small" / ".vipsnorm-patches").is_file()  # what lets a rerun replace the folder
    assert list(rows[0]) == list(TABLE_COLUMNS)
    assert no_part_files(out)


def test_two_inputs_with_one_output_name(small_slide, tmp_path, capsys):
    twin = tmp_path / "b" / "small.tif"
    twin.parent.mkdir()
    twin.write_bytes(Path(small_slide).read_bytes())
    code, _, stderr = run(capsys, small_slide, twin, "-o", tmp_path / "out", "--random", 2, "--format", "coords")
    assert code == 1 and f"{twin}: has the same output name (small)" in stderr


def test_openslide_backend_gives_the_same_patches(small_slide, tmp_path, capsys):
    """OpenSlide-backed slides are read with OpenSlide's read_region and the numpy twin of the method."""
    for backend in ("libvips", "openslide"):
        code, stdout, _ = run(
            capsys,
            small_slide,
            "-o",
            tmp_path / backend,
            "--backend",
            backend,
            "--method",
            "macenko",
            "--format",
            "npy",
            "--random",
            5,
            "--size",
            96,
        )
        assert code == 0, stdout
    rows = table(tmp_path / "libvips")
    assert [r["key"] for r in rows] == [r["key"] for r in table(tmp_path / "openslide")]
    for row in rows:
        np.testing.assert_array_equal(
            np.load(tmp_path / "libvips" / row["file"]), np.load(tmp_path / "openslide" / row["file"])
        )


def test_openslide_patches_above_level_0_are_crops_of_the_level_image_when_downsamples_are_not_whole(tmp_path):
    """Level 0 is one direct read_region; above it a direct read_region would resample a window whose
    level-0 position is not a whole number of level pixels, so patches are crops of the level image
    (the virtual TIFF that Slide.level_image gives): on a slide of odd size they equal the same crop of
    it. (That image's tiles are read_region calls too: see the test below.)"""
    from vipsnorm.synth import write_synthetic_slide

    path = write_synthetic_slide(tmp_path / "odd.tif", 1537, 1111, seed=2)
    with vipsnorm.open(path, backend="openslide") as slide:
        assert slide.levels[1].downsample != 2.0  # the case that matters
        reader = PatchReader(slide)
        calls = []
        original = slide._osr.read_region
        slide._osr.read_region = lambda *a: calls.append(a) or original(*a)
        reader.read(0, 10, 20, 32)
        assert calls == [((10, 20), 0, (32, 32))]
        for level in (1, 2):
            window = reader.read(level, 30, 17, 64)
            np.testing.assert_array_equal(window, slide.level_image(level).crop(30, 17, 64, 64).numpy())
        method = build_method("macenko")
        params = fit_slide(slide, method, Options())
        normalized = PatchReader(slide, method, params).read(1, 30, 17, 64)
        np.testing.assert_array_equal(normalized, method.apply_array(slide.level_image(1).crop(30, 17, 64, 64).numpy(), params))


def test_openslide_patches_above_level_0_are_the_levels_pixels_when_the_downsample_is_whole(tmp_path):
    """OpenSlide's read_region takes level-0 coordinates and maps them back to the level: exact when
    the downsample is whole; otherwise a sub-pixel offset that it resamples (README: a known limit of
    the OpenSlide path, measured here as well, near the level's own pixels)."""
    from vipsnorm.synth import write_synthetic_slide

    for size, whole in (((2048, 1536), True), ((1537, 1111), False)):
        path = write_synthetic_slide(tmp_path / f"s{size[0]}.tif", *size, seed=2)
        page = pyvips.Image.new_from_file(str(path), page=1).numpy()[..., :3]  # the level's own pixels
        with vipsnorm.open(path, backend="openslide") as slide:
            assert (slide.levels[1].downsample == 2.0) == whole
            window = PatchReader(slide).read(1, 300, 200, 64)
        diff = np.abs(window.astype(int) - page[200:264, 300:364])
        if whole:
            assert diff.max() == 0
        else:  # resampled by a fraction of a pixel: close, not equal (measured mean 0.31, max 11)
            assert 0 < diff.mean() < 1.0


def test_a_folder_of_the_slides_name_not_made_by_vipsnorm_is_never_replaced(small_slide, tmp_path, capsys):
    """A MIRAX slide keeps its data in a folder named after it: writing patches next to it must not
    replace that folder. A folder vipsnorm made is replaced on a rerun."""
    out = tmp_path / "out"
    (out / small_slide.stem).mkdir(parents=True)
    (out / small_slide.stem / "Data0000.dat").write_bytes(b"slide data")
    code, _, err = run(capsys, small_slide, "-o", out, "--random", 3, "--size", 64)
    assert code == 1 and "not a folder of patches made by vipsnorm" in err
    assert (out / small_slide.stem / "Data0000.dat").read_bytes() == b"slide data"
    assert no_part_files(out)
    code, _, _ = run(capsys, small_slide, "-o", tmp_path / "mine", "--random", 3, "--size", 64)
    assert code == 0
    code, _, _ = run(capsys, small_slide, "-o", tmp_path / "mine", "--random", 4, "--size", 64, "--seed", 7)
    assert code == 0 and len(list((tmp_path / "mine" / small_slide.stem).glob("*.png"))) == 4


def test_parser_options_and_errors(small_slide, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="vipsnorm")
    sub = parser.add_subparsers(dest="command")
    patches_cli.add_parser(sub)
    args = parser.parse_args(
        ["patches", "a.svs", "b.svs", "-o", "out", "--mpp", "0.5", "--format", "tar", "--random", "7"]
    )
    assert args.inputs == ["a.svs", "b.svs"] and args.mpp == 0.5 and args.random == 7 and args.run is patches_cli.run
    for bad in (["--level", "1", "--mpp", "0.5"], ["--format", "tiff"], ["--min-tissue", "1.5"], ["--size", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["patches", "a.svs", "-o", "out", *bad])
    capsys.readouterr()
    assert "--min-tissue" in parser._subparsers._group_actions[0].choices["patches"].format_help()
    code, _, stderr = run(capsys, small_slide, "-o", tmp_path / "x", "--low", 5)
    assert code == 2 and "--low given without a method" in stderr
    code, _, stderr = run(capsys, small_slide, "-o", tmp_path / "x", "--method", "match")
    assert code == 2 and "needs --reference" in stderr
    code, _, stderr = run(capsys, small_slide, "-o", tmp_path / "x", "--method", "stretch", "--mode", "hsv")
    assert code == 2 and "hsv" in stderr


def test_a_negative_seed_is_refused_up_front(small_slide, tmp_path, capsys):
    """numpy's generators take no negative seed: --seed -1 is a usage error (exit 2, no slide tried),
    and PatchJob / slide_rng refuse it when made, not slide by slide."""
    out = tmp_path / "x"
    with pytest.raises(SystemExit) as exit_info:
        vipsnorm_main(["patches", str(small_slide), "-o", str(out), "--random", "3", "--seed", "-1"])
    assert exit_info.value.code == 2
    assert "argument --seed: must be an integer >= 0, not -1" in capsys.readouterr().err
    assert not out.exists()
    for bad in (-1, 1.5, "1"):
        with pytest.raises(ValueError, match="seed of random patches must be an integer >= 0"):
            PatchJob(random=3, seed=bad)
    with pytest.raises(ValueError, match="must be an integer >= 0, not -1"):
        slide_rng(small_slide, -1)
    assert PatchJob(random=3, seed=np.int64(4)).seed == 4


def test_match_with_an_image_reference(small_slide, tmp_path, capsys):
    reference = tmp_path / "ref.tif"
    from vipsnorm.synth import write_synthetic_slide

    write_synthetic_slide(reference, 512, 512, lab="dark-pink", seed=4)
    code, stdout, _ = run(
        capsys,
        small_slide,
        "-o",
        tmp_path / "m",
        "--reference",
        reference,
        "--format",
        "npy",
        "--random",
        3,
        "--size",
        64,
    )
    assert code == 0, stdout
    engine_method = build_method("match", vipsnorm.load_reference(reference, "match"))
    with vipsnorm.open(small_slide) as slide:
        params = fit_slide(slide, engine_method, Options())
        for row in table(tmp_path / "m"):
            raw = openslide_window(small_slide, 0, int(row["x0"]), int(row["y0"]), 64)
            np.testing.assert_array_equal(np.load(tmp_path / "m" / row["file"]), engine_method.apply_array(raw, params))


def test_jpg_files_and_the_grid_stride_on_the_command_line(small_slide, tmp_path, capsys):
    for fmt in ("npy", "jpg"):
        args = ("--format", fmt, "--size", 64, "--stride", 512, "--min-tissue", 0, "--method", "equalize")
        assert run(capsys, small_slide, "-o", tmp_path / fmt, *args)[0] == 0
    rows = table(tmp_path / "jpg")
    assert {(int(r["x"]), int(r["y"])) for r in rows} == {(x, y) for x in range(0, 2048, 512) for y in range(0, 1536, 512)}
    for row, exact in zip(rows, table(tmp_path / "npy")):
        assert row["file"].endswith(".jpg") and row["key"] == exact["key"]
        lossy = load_patch(tmp_path / "jpg", row).astype(np.int16)
        assert np.abs(lossy - np.load(tmp_path / "npy" / exact["file"])).mean() < 4  # JPEG Q90


def test_the_table_is_rebuilt_from_each_slides_committed_rows(small_slide, tmp_path, capsys):
    """Each slide's rows are committed with its outputs; patches.csv is rebuilt from them, so a table
    left stale or cut short by an interrupted run is whole again after the next one."""
    other = tmp_path / "other.tif"
    other.write_bytes(Path(small_slide).read_bytes())
    out = tmp_path / "out"
    assert run(capsys, small_slide, other, "-o", out, "--random", 5, "--size", 64, "--workers", 0)[0] == 0
    whole = table(out)
    assert len(whole) == 10
    (out / TABLE).write_text((out / TABLE).read_text()[:200])  # a table cut short
    assert run(capsys, other, "-o", out, "--random", 4, "--size", 64, "--seed", 3)[0] == 0
    rows = table(out)
    assert [r for r in rows if r["slide"] == str(small_slide)] == [r for r in whole if r["slide"] == str(small_slide)]
    assert len([r for r in rows if r["slide"] == str(other)]) == 4
    for row in rows:  # every row names a file that exists
        assert (out / row["file"]).is_file()


def test_coords_with_a_method_is_refused_not_ignored(small_slide, tmp_path, capsys):
    # the table holds positions only: a method would be fitted for nothing
    code, _, err = run(capsys, small_slide, "-o", tmp_path / "c", "--format", "coords", "--method", "macenko", "--random", 2)
    assert code == 2 and "--format coords writes the coordinates table only" in err
    assert not (tmp_path / "c").exists()
