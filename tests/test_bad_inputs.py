"""Bad inputs: one clear error line each, non-zero exit, no output or partial file, inputs untouched.

Every case runs through ``vipsnorm normalize GOOD BAD GOOD2`` so that a bad file can neither stop the
batch nor leave anything behind, and through the API, which must raise the right exception subclass.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pyvips

import vipsnorm
from vipsnorm.cli import main
from vipsnorm.engine import Options, build_method, fit_slide, normalize_file
from vipsnorm.errors import (
    FlatImageError,
    ImageTooLargeError,
    NoTissueError,
    OutputError,
    UnreadableImageError,
    VipsnormError,
)
from vipsnorm.io.write import PART_MARKER, atomic_path, write_image, write_pyramid

# --------------------------------------------------------------------------------------------------
# helpers


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(width: int = 1_000_000, height: int = 1_000_000) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` RGB pixels, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def fingerprint(path: Path):
    """Content and mtime of a file (or a folder's listing): equal before and after = not modified."""
    if not path.exists():
        return None
    st = path.stat()
    if path.is_dir():
        return ("dir", st.st_mtime_ns, sorted(os.listdir(path)))
    return (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)


def part_files(folder: Path) -> list[str]:
    """Temporary outputs (``.NAME.vipsnorm-part-XXXX.EXT``) anywhere below ``folder``, dotfiles included."""
    found = []
    for root, dirs, files in os.walk(folder):
        found += [os.path.join(root, n) for n in files + dirs if PART_MARKER in n]
    return found


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error")]


def read_fully(path: Path) -> np.ndarray:
    return pyvips.Image.new_from_file(str(path), fail_on="error").numpy()


# --------------------------------------------------------------------------------------------------
# inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Two good ordinary images and every generated bad input, in one folder."""
    from vipsnorm.synth import synthetic_slide

    d = tmp_path_factory.mktemp("inputs")
    synthetic_slide(384, 256, seed=3, tissue=0.7).jpegsave(str(d / "good1.jpg"), Q=90)
    synthetic_slide(320, 240, seed=4, lab="dark-pink", tissue=0.7).pngsave(str(d / "good2.png"))

    (d / "empty.svs").write_bytes(b"")
    (d / "random.svs").write_bytes(np.random.default_rng(1).integers(0, 256, 6000, dtype=np.uint8).tobytes())
    (d / "text.jpg").write_text("this is not a JPEG, just some text\n")
    (d / "folder.tif").mkdir()
    (d / "huge.png").write_bytes(huge_png())
    pyvips.Image.black(64, 48, bands=3).new_from_image([128, 128, 128]).cast("uchar").pngsave(str(d / "flat.png"))
    # A JPEG cut short: libvips opens the header and, unless told to fail, fills the rest with grey.
    big = synthetic_slide(1024, 1024, seed=5, tissue=0.7).jpegsave_buffer(Q=90)
    (d / "truncated-generated.jpg").write_bytes(big[: len(big) * 6 // 10])
    # ... and one that still ends with an end-of-image marker: libjpeg only warns, and fills with grey
    (d / "truncated-eoi.jpg").write_bytes(big[: len(big) // 2] + b"\xff\xd9")
    return d


@dataclass(frozen=True)
class Case:
    where: str  # "shared" (../shared/data/bad), "gen" (inputs folder), "glass", "missing"
    name: str
    keywords: tuple[str, ...]  # one of these (lower case) names the cause
    api_error: type[VipsnormError] | None  # what vipsnorm.open raises (None: opens, fails later)


CASES = {
    "truncated.jpg": Case("shared", "truncated.jpg", ("premature end", "truncated"), UnreadableImageError),
    "unopenable.tiff": Case("shared", "unopenable.tiff", ("cannot open", "not an image"), UnreadableImageError),
    "unreadable.svs": Case("shared", "unreadable.svs", ("cannot decode",), UnreadableImageError),
    "truncated-generated.jpg": Case("gen", "truncated-generated.jpg", ("premature end", "truncated"), UnreadableImageError),
    "truncated-eoi.jpg": Case("gen", "truncated-eoi.jpg", ("premature end",), UnreadableImageError),
    "empty": Case("gen", "empty.svs", ("empty",), UnreadableImageError),
    "random-bytes.svs": Case("gen", "random.svs", ("not an image",), UnreadableImageError),
    "text.jpg": Case("gen", "text.jpg", ("not an image",), UnreadableImageError),
    "directory": Case("gen", "folder.tif", ("directory",), UnreadableImageError),
    "missing": Case("missing", "does-not-exist.png", ("no such file",), UnreadableImageError),
    "huge.png": Case("gen", "huge.png", ("above the limit",), ImageTooLargeError),
    "flat.png": Case("gen", "flat.png", ("flat",), None),
    "glass-slide": Case("glass", "glass.tif", ("no tissue",), None),
}


def bad_path(case: Case, inputs: Path, request) -> Path:
    if case.where == "shared":
        return request.getfixturevalue("shared_data") / "bad" / case.name
    if case.where == "glass":
        return request.getfixturevalue("glass_slide")
    return inputs / case.name


# --------------------------------------------------------------------------------------------------
# through the command line


@pytest.mark.parametrize("method", ["stretch", "equalize"])
@pytest.mark.parametrize("case_id", list(CASES))
def test_cli_bad_input_between_good_ones(case_id, method, inputs, request, tmp_path, capsys):
    case = CASES[case_id]
    bad = bad_path(case, inputs, request)
    good1, good2 = inputs / "good1.jpg", inputs / "good2.png"
    watched = [good1, bad, good2]
    before = [fingerprint(p) for p in watched]
    out = tmp_path / "out"

    rc = main(["normalize", str(good1), str(bad), str(good2), "-o", str(out), "--method", method])
    captured = capsys.readouterr()

    assert rc != 0
    errors = error_lines(captured.err)
    assert len(errors) == 1, captured.err
    assert str(bad) in errors[0], errors[0]
    assert any(k in errors[0].lower() for k in case.keywords), errors[0]
    assert "\n" not in errors[0]
    assert "2 of 3 inputs normalized, 1 failed" in captured.err

    # no output for the bad input, no partial file, both good outputs complete and readable
    assert sorted(os.listdir(out)) == ["good1.jpg", "good2.png"]
    assert part_files(out) == []
    assert read_fully(out / "good1.jpg").shape == (256, 384, 3)
    assert read_fully(out / "good2.png").shape == (240, 320, 3)
    # inputs never modified
    assert [fingerprint(p) for p in watched] == before


def test_cli_json_reports_bad_input(inputs, tmp_path, capsys):
    bad = inputs / "text.jpg"
    rc = main(["normalize", str(inputs / "good1.jpg"), str(bad), "-o", str(tmp_path), "--method", "stretch", "--json"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 1
    assert [r["status"] for r in records] == ["ok", "error"]
    assert records[1]["input"] == str(bad) and records[1]["output"] is None and records[1]["params"] is None
    assert str(bad) in records[1]["error"] and "not an image" in records[1]["error"]
    assert os.listdir(tmp_path) == ["good1.jpg"]


def test_cli_max_pixels_option(inputs, tmp_path, capsys):
    good = inputs / "good1.jpg"  # 384 x 256 = 98,304 pixels
    rc = main(["normalize", str(good), "-o", str(tmp_path / "out"), "--method", "stretch", "--max-pixels", "50000"])
    err = capsys.readouterr().err
    assert rc == 1
    (line,) = error_lines(err)
    assert str(good) in line and "above the limit" in line and "50,000" in line and "--max-pixels" in line
    assert os.listdir(tmp_path / "out") == []


def test_cli_fit_skips_bad_inputs(inputs, tmp_path, capsys):
    ref = tmp_path / "ref.json"
    bad = inputs / "flat.png"
    rc = main(["fit", str(inputs / "good1.jpg"), str(bad), str(inputs / "good2.png"), "-o", str(ref)])
    err = capsys.readouterr().err
    assert rc == 1
    (line,) = error_lines(err)
    assert str(bad) in line and "flat" in line
    data = json.loads(ref.read_text())
    assert data["kind"] == "target" and data["inputs"] == [str(inputs / "good1.jpg"), str(inputs / "good2.png")]
    assert part_files(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# never overwrite an input


@pytest.mark.parametrize("kind", ["image", "slide"])
def test_output_folder_is_input_folder(kind, tmp_path, capsys):
    from vipsnorm.synth import synthetic_slide, write_synthetic_slide

    if kind == "image":
        src = tmp_path / "photo.jpg"
        synthetic_slide(256, 192, seed=6, tissue=0.7).jpegsave(str(src))
    else:
        src = write_synthetic_slide(tmp_path / "slide.tif", 1024, 768, seed=6, tissue=0.6)
    before = fingerprint(src)

    rc = main(["normalize", str(src), "-o", str(tmp_path), "--method", "stretch"])
    err = capsys.readouterr().err
    assert rc != 0
    (line,) = error_lines(err)
    assert str(src) in line and "overwrite the input" in line
    assert fingerprint(src) == before
    assert os.listdir(tmp_path) == [src.name]

    result = normalize_file(src, tmp_path, build_method("equalize"))
    assert result.status == "error" and result.output is None and "overwrite" in result.error
    assert fingerprint(src) == before


# --------------------------------------------------------------------------------------------------
# through the API


@pytest.mark.parametrize("case_id", [c for c, case in CASES.items() if case.api_error is not None])
def test_api_open_raises(case_id, inputs, request):
    case = CASES[case_id]
    path = bad_path(case, inputs, request)
    with pytest.raises(case.api_error) as info:
        vipsnorm.open(path)
    assert info.value.path == str(path)
    assert any(k in info.value.cause.lower() for k in case.keywords)
    assert str(info.value) == f"{path}: {info.value.cause}"


def test_api_max_pixels(inputs):
    with pytest.raises(ImageTooLargeError, match="above the limit"):
        vipsnorm.open(inputs / "good1.jpg", max_pixels=1000)
    with vipsnorm.open(inputs / "good1.jpg", max_pixels=0) as slide:  # 0 = no limit
        assert slide.dimensions == (384, 256)


def test_api_flat_image(inputs, tmp_path):
    flat = inputs / "flat.png"
    with vipsnorm.open(flat) as slide:
        with pytest.raises(FlatImageError, match="flat"):
            fit_slide(slide, build_method("stretch"), Options())
    for method in ("equalize", "clahe"):  # clahe is fitted on the level itself, not on a sample
        result = normalize_file(flat, tmp_path, build_method(method))
        assert result.status == "error" and result.output is None
        assert str(flat) in result.error and "image is flat" in result.error and "pixel is 128" in result.error
        assert os.listdir(tmp_path) == []


def test_api_glass_slide(glass_slide, tmp_path):
    with vipsnorm.open(glass_slide) as slide:
        assert slide.is_slide
        with pytest.raises(NoTissueError, match="no tissue"):
            vipsnorm.sample_slide(slide)
        with pytest.raises(NoTissueError):
            fit_slide(slide, build_method("equalize"), Options())
    result = normalize_file(glass_slide, tmp_path, build_method("stretch"))
    assert result.status == "error" and "no tissue" in result.error and result.output is None
    assert os.listdir(tmp_path) == []


def test_clahe_refuses_an_all_glass_slide(tmp_path):
    """clahe alone normalized an all-glass slide "ok" while every other method found no tissue."""
    from vipsnorm.synth import write_synthetic_slide

    glass = write_synthetic_slide(tmp_path / "glass.tif", 2048, 2048, tissue=0.0)
    out = tmp_path / "out"
    out.mkdir()
    for method in ("clahe", "stretch"):
        result = normalize_file(glass, out, build_method(method))
        assert result.status == "error" and result.output is None, method
        assert result.error.startswith(f"{glass}: no tissue found"), result.error
    assert os.listdir(out) == []
    # tissue masking off: fitted on every pixel, as asked
    result = normalize_file(glass, out, build_method("clahe"), options=Options(tissue=False))
    assert result.status == "ok", result.error


def test_clahe_tissue_check_leaves_the_fit_unchanged(small_slide):
    with vipsnorm.open(small_slide) as slide:
        checked = fit_slide(slide, build_method("clahe"), Options())
        unchecked = fit_slide(slide, build_method("clahe"), Options(tissue=False))
    assert json.dumps(checked.to_dict(), sort_keys=True) == json.dumps(unchecked.to_dict(), sort_keys=True)


# --------------------------------------------------------------------------------------------------
# failures during the final write


def test_atomic_path_failure_leaves_nothing(tmp_path):
    final = tmp_path / "out.tif"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(final) as temp:
            assert temp.parent == tmp_path and PART_MARKER in temp.name and temp != final
            temp.write_bytes(b"half a file")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_path_failure_keeps_previous_output(tmp_path):
    final = tmp_path / "out.png"
    final.write_bytes(b"previous run")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final) as temp:
            temp.write_bytes(b"half a file")
            raise KeyboardInterrupt
    assert final.read_bytes() == b"previous run"
    assert os.listdir(tmp_path) == ["out.png"]


def test_atomic_path_success_renames(tmp_path):
    final = tmp_path / "out.json"
    with atomic_path(final) as temp:
        temp.write_text("{}")
        assert not final.exists()
    assert final.read_text() == "{}"
    assert os.listdir(tmp_path) == ["out.json"]


@pytest.mark.parametrize("name", ["x.tif", "x.png", "x.jpg"])
def test_decode_failure_during_write_leaves_nothing(name, inputs, tmp_path):
    """A JPEG cut short and read sequentially fails in the middle of the save itself."""
    image = pyvips.Image.new_from_file(str(inputs / "truncated-generated.jpg"), fail_on="error", access="sequential")
    with pytest.raises(pyvips.Error):
        if name.endswith(".tif"):
            write_pyramid(image, tmp_path / name, compression="deflate", mpp=(0.5, 0.5))
        else:
            write_image(image, tmp_path / name)
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def corrupt_tile_slide(tmp_path_factory) -> Path:
    """A pyramidal deflate TIFF whose last level-0 tile (bottom-right corner) is garbage.

    The open-time probe (centre window, smallest level) succeeds; the corner tile fails only when it is
    decoded, which with a fixed ``--reference`` happens during the final write.
    """
    import tifffile

    from vipsnorm.synth import synthetic_slide

    d = tmp_path_factory.mktemp("corrupt")
    path = d / "corrupt-tile.tif"
    synthetic_slide(1024, 768, seed=7, tissue=0.6).tiffsave(
        str(path), tile=True, tile_width=256, tile_height=256, pyramid=True, compression="deflate",
        xres=4000.0, yres=4000.0, resunit="cm",
    )
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[-1], tif.pages[0].databytecounts[-1]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))
    return path


def test_corrupt_tile_is_an_error_not_black(corrupt_tile_slide):
    """libvips' tiffload treats a tile that fails to decompress as a *warning*: with fail_on="error" it
    silently returns black pixels for it. Reading the slide must raise instead."""
    with vipsnorm.open(corrupt_tile_slide) as slide:  # the probe does not touch the corner
        with pytest.raises(UnreadableImageError, match="cannot decode"):
            slide.read_region(0, 768, 512, 256, 256)


@pytest.mark.parametrize("fixed_params", [True, False], ids=["reference-params", "fitted"])
def test_cli_corrupt_tile_leaves_no_output(fixed_params, corrupt_tile_slide, inputs, tmp_path, capsys):
    args = ["normalize", str(corrupt_tile_slide), "-o", str(tmp_path / "out"), "--compression", "deflate"]
    if fixed_params:  # no fitting on the slide: the corrupt tile is first decoded by the final write
        params = tmp_path / "params.json"
        assert main(["fit", "--method", "stretch", str(inputs / "good1.jpg"), "-o", str(params)]) == 0
        args += ["--reference", str(params)]
    else:
        args += ["--method", "stretch", "--sample", "exact"]
    before = fingerprint(corrupt_tile_slide)
    capsys.readouterr()

    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 1, err
    (line,) = error_lines(err)
    assert str(corrupt_tile_slide) in line and "cannot decode" in line
    assert os.listdir(tmp_path / "out") == []
    assert part_files(tmp_path) == []
    assert fingerprint(corrupt_tile_slide) == before


def test_an_output_never_overwrites_another_input_of_the_run(tmp_path, capsys):
    """`normalize a.jpg out/a.jpg -o out`: a.jpg's output would be the second input."""
    from vipsnorm.cli import main

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    first = tmp_path / "a.png"
    out = tmp_path / "out"
    out.mkdir()
    second = out / "a.png"
    for p in (first, second):
        pyvips.Image.new_from_array(pixels).copy(interpretation="srgb").pngsave(str(p))
    before = second.read_bytes()
    assert main(["normalize", str(first), str(second), "-o", str(out), "--method", "stretch"]) != 0
    err = capsys.readouterr().err
    assert "another input of this run" in err
    assert second.read_bytes() == before


def test_atomic_path_cleanup_failure_never_hides_the_error(tmp_path, monkeypatch):
    """On a read-only file system deleting the temporary file fails too (EROFS): that must not replace
    the error that made the write fail."""

    def unlink(self, missing_ok=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(tmp_path / "out.png"):
            raise RuntimeError("boom")
    image = pyvips.Image.black(32, 32, bands=3)
    with pytest.raises(OutputError) as info:
        write_image(image, tmp_path / "gone" / "x.png")
    assert str(info.value).startswith(f"{tmp_path / 'gone' / 'x.png'}: cannot write the output")
    assert "No such file or directory" in str(info.value)


_FILE_SIZE_LIMIT = """
import json, os, resource, signal, sys
from vipsnorm.engine import Options, build_method, normalize_file

# every file this process writes stops at 64 kB: a disk that fills up during the save
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
results = []
for path, out in zip(sys.argv[1::2], sys.argv[2::2]):
    r = normalize_file(path, out, build_method("stretch"), options=Options(compression="deflate"))
    results.append([r.status, r.error])
print(json.dumps(results))
"""


def test_a_failing_output_is_an_output_error_not_a_decode_error(inputs, small_slide, tmp_path):
    """Disk full during the save (the save also reads the input, lazily) was reported as "cannot decode
    pixels" of the input; it is an error of the output, named with its cause."""
    pytest.importorskip("resource")
    import subprocess
    import sys

    outs = [tmp_path / "image", tmp_path / "slide"]
    for out in outs:
        out.mkdir()
    argv = [str(inputs / "good2.png"), str(outs[0]), str(small_slide), str(outs[1])]
    done = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMIT, *argv], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (image_status, image_error), (slide_status, slide_error) = json.loads(done.stdout)
    assert image_status == slide_status == "error"
    for error, expected in ((image_error, outs[0] / "good2.png"), (slide_error, outs[1] / "small.tif")):
        assert error == f"{expected}: cannot write the output (write error: File too large)"
    for out in outs:
        assert os.listdir(out) == []  # nor a part file


def _with_benign_warning(data: bytes, kind: str) -> bytes:
    """A JPEG whose decoder warns but whose pixels are whole: stray bytes before the scan, or a
    sequential scan with a spectral start of 1 (libjpeg: 'Invalid SOS parameters')."""
    sos = data.find(b"\xff\xda")
    if kind == "extraneous":
        return data[:sos] + b"\x00\x00\x00" + data[sos:]
    length = int.from_bytes(data[sos + 2 : sos + 4], "big")
    changed = bytearray(data)
    changed[sos + 2 + length - 3] = 1
    return bytes(changed)


@pytest.mark.parametrize("kind", ["extraneous", "sos"])
@pytest.mark.parametrize("size", [(384, 256), (1600, 1200)])  # held in memory, and streamed
def test_jpeg_with_only_harmless_decoder_warnings_is_read(tmp_path, kind, size):
    from vipsnorm.synth import synthetic_slide

    good = synthetic_slide(*size, seed=5, tissue=0.7).jpegsave_buffer(Q=90)
    path = tmp_path / f"{kind}.jpg"
    path.write_bytes(_with_benign_warning(good, kind))
    with pytest.raises(pyvips.Error, match="VipsJpeg"):  # the case: libjpeg warns
        pyvips.Image.new_from_file(str(path), fail_on="warning").avg()
    with vipsnorm.open(path) as slide:
        pixels = slide.level_image(0).numpy()
    np.testing.assert_array_equal(pixels, pyvips.Image.new_from_buffer(good, "").numpy())
    result = normalize_file(path, tmp_path, build_method("equalize"), options=Options(format="png"))
    assert result.status == "ok", result.error


@pytest.mark.parametrize("size", [(384, 256), (1600, 1200)])  # held in memory, and streamed
def test_a_harmless_warning_does_not_excuse_a_cut_jpeg(tmp_path, size):
    from vipsnorm.io.slide import benign_jpeg_warnings, count_jpeg_warnings
    from vipsnorm.synth import synthetic_slide

    good = synthetic_slide(*size, seed=5, tissue=0.7).jpegsave_buffer(Q=90)
    warned = _with_benign_warning(good, "extraneous")
    path = tmp_path / "both.jpg"
    path.write_bytes(warned[: len(warned) // 2] + b"\xff\xd9")
    (tmp_path / "one.jpg").write_bytes(warned)
    assert count_jpeg_warnings(path) == 2 and count_jpeg_warnings(tmp_path / "one.jpg") == 1
    # libvips reports only the first warning (harmless here); the decode failing on errors only counts two
    with pytest.raises(UnreadableImageError, match="libjpeg gave 2 warnings: the first harmless"):
        vipsnorm.open(path)
    result = normalize_file(path, tmp_path, build_method("equalize"), options=Options(format="png"))
    assert result.status == "error" and not (tmp_path / "both.png").exists()
    assert benign_jpeg_warnings("x\n  VipsJpeg: Corrupt JPEG data: 3 extraneous bytes before marker 0xda\njpegload: load error")
    assert not benign_jpeg_warnings(
        "VipsJpeg: Corrupt JPEG data: 3 extraneous bytes before marker 0xda\n"
        "VipsJpeg: Corrupt JPEG data: premature end of data segment"
    )
    assert not benign_jpeg_warnings("tiff2vips: decoding error")


def test_an_uncounted_harmless_warning_is_refused_and_counts_are_per_thread(tmp_path):
    import logging
    import threading

    from vipsnorm.io.slide import count_jpeg_warnings
    from vipsnorm.synth import synthetic_slide

    good = synthetic_slide(384, 256, seed=5, tissue=0.7).jpegsave_buffer(Q=90)
    path = tmp_path / "warned.jpg"
    path.write_bytes(_with_benign_warning(good, "extraneous"))
    warned = _with_benign_warning(good, "extraneous")
    cut = tmp_path / "cut.jpg"  # two warnings: a harmless one, then the cut
    cut.write_bytes(warned[: len(warned) // 2] + b"\xff\xd9")
    logging.disable(logging.WARNING)  # the count is lost: refused, never taken for 0 warnings
    try:
        with pytest.raises(UnreadableImageError, match="could not count"):
            vipsnorm.open(path)
    finally:
        logging.disable(logging.NOTSET)
    # another thread's damaged JPEG read meanwhile is not counted against this file
    stop = threading.Event()

    def other():
        while not stop.is_set():
            count_jpeg_warnings(cut)  # logs "read gave 2 warnings" in its own thread

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert all(count_jpeg_warnings(path) == 1 for _ in range(10))
    finally:
        stop.set()
        thread.join()
