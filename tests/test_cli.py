"""The ``vipsnorm`` command line: help, normalize (images and slides), fit + reference, inspect, --json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pyvips

import vipsnorm
from vipsnorm.cli import main
from vipsnorm.methods import METHODS, params_from_dict

METHOD_NAMES = sorted(METHODS)


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def check_pyramid(path: Path, mpp: float) -> None:
    """A pyramidal TIFF that OpenSlide reads as generic-tiff with ``mpp`` and tifffile sees whole."""
    import openslide
    import tifffile

    with openslide.OpenSlide(str(path)) as osr:
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert osr.level_count > 1
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(mpp, abs=1e-6)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(mpp, abs=1e-6)
        dimensions = osr.level_dimensions
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert [(lvl.shape[1], lvl.shape[0]) for lvl in levels] == list(dimensions)
        assert all(lvl.shape[2] == 3 for lvl in levels)
        assert "aperio" not in (tif.pages[0].description or "").lower()


@pytest.fixture(scope="module")
def tile(shared_data) -> Path:
    return shared_data / "tiles" / "kather-template.jpg"


@pytest.fixture(scope="module")
def photo(shared_data) -> Path:
    return shared_data / "images" / "sample.jpg"


@pytest.fixture(scope="module")
def target(shared_data) -> Path:
    return shared_data / "tiles" / "histolab-target.png"


# --------------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize("command", [[], ["normalize"], ["fit"], ["inspect"], ["demo"]], ids=lambda c: c[0] if c else "top")
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vipsnorm")
    if command in ([], ["normalize"]):
        for name in METHOD_NAMES:
            assert name in out
    if not command:
        for sub in ("normalize", "fit", "inspect", "demo"):
            assert sub in out


def test_fit_help_offers_only_what_fit_fits(capsys):
    """clahe is fitted on each image: 'fit' neither lists it nor its options, and states its own default."""
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for name in METHOD_NAMES:
        assert (name in out) == (name != "clahe"), name
    for option in ("--clip-limit", "--grid", "--region"):
        assert option not in out
    assert "default: match" in out and "default: equalize" not in out


def test_normalize_help_says_which_methods_take_an_image_reference(capsys):
    with pytest.raises(SystemExit):
        main(["normalize", "--help"])
    out = capsys.readouterr().out
    reference = " ".join(out.split("--reference REF", 2)[2].split("fitting:")[0].split())
    for name in ("match", "reinhard", "macenko", "vahadane"):
        assert name in reference
    assert "image" in reference and "clahe takes none" in reference
    assert "match for 'fit'" not in " ".join(out.split())


@pytest.mark.parametrize("command", ["normalize", "fit"])
@pytest.mark.parametrize("tiles", ["0", "-4"])
def test_tiles_must_be_positive(command, tiles, tile, tmp_path, capsys):
    out = tmp_path / ("out" if command == "normalize" else "ref.json")
    with pytest.raises(SystemExit) as info:
        main([command, str(tile), "-o", str(out), "--tiles", tiles, "--workers", "0"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--tiles" in err and "1 or more" in err and "internal error" not in err
    assert list(tmp_path.iterdir()) == []


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert vipsnorm.__version__ in capsys.readouterr().out


def test_unknown_method_is_a_usage_error(tile, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["normalize", str(tile), "-o", str(tmp_path), "--method", "staintools"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# normalize


def _method_args(method: str, reference: Path) -> list:
    return ["--method", method] + (["--reference", reference] if method in ("match", "reinhard") else [])


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_normalize_tile(method, tile, target, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, stderr = run(capsys, "normalize", tile, "-o", out, *_method_args(method, target))
    assert rc == 0, stderr
    assert f"ok     {tile} -> {out / tile.name}" in stdout
    assert "1 of 1 inputs normalized, 0 failed" in stderr
    result = pyvips.Image.new_from_file(str(out / tile.name), fail_on="error")
    source = pyvips.Image.new_from_file(str(tile))
    assert (result.width, result.height, result.bands) == (source.width, source.height, 3)
    assert result.get("vips-loader") == "jpegload"
    assert not np.array_equal(result.numpy(), source.numpy())  # something was normalized


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_normalize_slide(method, small_slide, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, stderr = run(capsys, "normalize", small_slide, "-o", out, *_method_args(method, small_slide), "--json")
    assert rc == 0, stderr
    (record,) = json_lines(stdout)
    assert record["status"] == "ok" and record["error"] is None
    assert record["output"] == str(out / "small.tif")
    assert record["params"]["method"] == method
    check_pyramid(out / "small.tif", 0.25)


def test_normalize_aperio_gives_generic_tiff(shared_data, tmp_path, capsys):
    svs = shared_data / "slides" / "CMU-1-Small-Region.svs"
    rc, _, stderr = run(capsys, "normalize", svs, "-o", tmp_path, "--method", "stretch")
    assert rc == 0, stderr
    out = tmp_path / "CMU-1-Small-Region.tif"
    check_pyramid(out, 0.499)
    with vipsnorm.open(out) as slide:
        assert slide.vendor == "generic-tiff"
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx((0.499, 0.499), abs=1e-6)


@pytest.mark.parametrize("method", ["stretch", "equalize"])
def test_deflate_is_lossless(method, small_slide, tmp_path, capsys):
    rc, stdout, stderr = run(
        capsys, "normalize", small_slide, "-o", tmp_path, "--method", method, "--compression", "deflate", "--json"
    )
    assert rc == 0, stderr
    (record,) = json_lines(stdout)
    params = params_from_dict(record["params"])
    with vipsnorm.open(small_slide) as slide:
        expected = METHODS[method]().apply(slide.level_image(0), params).numpy()
    written = pyvips.Image.new_from_file(record["output"], page=0, fail_on="error")
    assert written.get("vips-loader") == "tiffload"
    np.testing.assert_array_equal(written.numpy(), expected)


# --------------------------------------------------------------------------------------------------
# fit, then normalize with the reference


def test_fit_palette_then_match(tile, photo, small_slide, tmp_path, capsys):
    ref = tmp_path / "ref.json"
    rc, stdout, stderr = run(capsys, "fit", tile, photo, small_slide, "-o", ref)
    assert rc == 0, stderr
    assert "fitted on 3 of 3 inputs" in stdout
    data = json.loads(ref.read_text())
    assert data["kind"] == "target" and data["inputs"] == [str(tile), str(photo), str(small_slide)]

    out = tmp_path / "out"
    rc, stdout, stderr = run(capsys, "normalize", tile, small_slide, "-o", out, "--method", "match", "--reference", ref, "--json")
    assert rc == 0, stderr
    records = json_lines(stdout)
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert all(r["params"]["method"] == "match" for r in records)
    assert (out / tile.name).is_file()
    check_pyramid(out / "small.tif", 0.25)


def test_fit_params_applied_unchanged(tile, photo, tmp_path, capsys):
    params_json = tmp_path / "params.json"
    rc, _, stderr = run(capsys, "fit", "--method", "stretch", tile, photo, "-o", params_json)
    assert rc == 0, stderr
    saved = json.loads(params_json.read_text())
    assert saved["kind"] == "params" and saved["params"]["method"] == "stretch"

    rc, stdout, stderr = run(capsys, "normalize", tile, photo, "-o", tmp_path / "out", "--reference", params_json, "--json")
    assert rc == 0, stderr
    records = json_lines(stdout)
    assert len(records) == 2
    assert records[0]["params"] == records[1]["params"] == saved["params"]

    # each output is exactly the fixed params applied to its input (PNG output keeps it lossless)
    rc, stdout, stderr = run(
        capsys, "normalize", tile, "-o", tmp_path / "png", "--reference", params_json, "--format", "png", "--json"
    )
    assert rc == 0, stderr
    (record,) = json_lines(stdout)
    with vipsnorm.open(tile) as slide:
        expected = vipsnorm.Stretch().apply(slide.level_image(0), params_from_dict(saved["params"])).numpy()
    np.testing.assert_array_equal(pyvips.Image.new_from_file(record["output"]).numpy(), expected)


def test_params_reference_with_other_method_is_refused(tile, photo, tmp_path, capsys):
    params_json = tmp_path / "params.json"
    assert run(capsys, "fit", "--method", "stretch", tile, photo, "-o", params_json)[0] == 0
    rc, _, stderr = run(capsys, "normalize", tile, "-o", tmp_path / "out", "--method", "equalize", "--reference", params_json)
    assert rc == 2
    assert str(params_json) in stderr and "stretch" in stderr
    assert not (tmp_path / "out" / tile.name).exists()


def test_match_without_reference_is_refused(tile, tmp_path, capsys):
    rc, _, stderr = run(capsys, "normalize", tile, "-o", tmp_path, "--method", "match")
    assert rc == 2 and "--reference" in stderr
    assert list(tmp_path.iterdir()) == []


def test_same_output_name_twice_keeps_first_result(tmp_path, capsys):
    """a/x.jpg and b/x.jpg both map to OUT/x.jpg: the second must be refused *before* it is written,
    so that the output reported "ok" for a/x.jpg really is a/x.jpg normalized."""
    from vipsnorm.synth import synthetic_slide

    first, second = tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg"
    first.parent.mkdir()
    second.parent.mkdir()
    synthetic_slide(320, 240, seed=1, tissue=0.7).jpegsave(str(first))
    synthetic_slide(200, 150, seed=2, tissue=0.7).jpegsave(str(second))
    out = tmp_path / "out"
    rc, stdout, stderr = run(capsys, "normalize", first, second, "-o", out, "--method", "stretch")
    assert rc == 1
    assert f"ok     {first} -> {out / 'x.jpg'}" in stdout
    (line,) = [x for x in stderr.splitlines() if x.startswith("error")]
    assert str(second) in line and "x.jpg" in line
    written = pyvips.Image.new_from_file(str(out / "x.jpg"))
    assert (written.width, written.height) == (320, 240), "the output of the first input was overwritten"


# --------------------------------------------------------------------------------------------------
# inspect


def test_inspect_text(shared_data, photo, capsys):
    svs = shared_data / "slides" / "CMU-1-Small-Region.svs"
    dcm = shared_data / "slides" / "boxes_0.dcm"
    rc, stdout, stderr = run(capsys, "inspect", svs, dcm, photo)
    assert rc == 0, stderr
    blocks = stdout.split(f"{dcm}\n")
    svs_text, rest = blocks[0], blocks[1]
    dcm_text, photo_text = rest.split(f"{photo}\n")
    assert "backend   libvips (tiffload), vendor: aperio" in svs_text
    assert "0.499 x 0.499 um" in svs_text
    assert "level 0   2220 x 2967" in svs_text
    assert "backend   openslide (openslide), vendor: dicom" in dcm_text
    assert "level 0" in dcm_text
    assert "backend   libvips (jpegload), vendor: none" in photo_text
    assert "pixel     unknown" in photo_text
    for text in (svs_text, dcm_text, photo_text):
        for channel in ("r", "g", "b", "y"):
            assert f"\n  {channel:<5} mean" in text


def test_inspect_json(shared_data, photo, capsys):
    svs = shared_data / "slides" / "CMU-1-Small-Region.svs"
    dcm = shared_data / "slides" / "boxes_0.dcm"
    rc, stdout, stderr = run(capsys, "inspect", "--json", svs, dcm, photo)
    assert rc == 0, stderr
    info = {Path(r["path"]).name: r for r in json_lines(stdout)}
    assert info["CMU-1-Small-Region.svs"]["backend"] == "libvips"
    assert info["CMU-1-Small-Region.svs"]["vendor"] == "aperio"
    assert info["CMU-1-Small-Region.svs"]["mpp"] == [0.499, 0.499]
    assert info["boxes_0.dcm"]["backend"] == "openslide"
    assert info["boxes_0.dcm"]["vendor"] == "dicom"
    assert info["sample.jpg"]["vendor"] is None and info["sample.jpg"]["mpp"] is None
    for record in info.values():
        assert record["levels"][0]["downsample"] == 1.0
        assert set(record["stats"]) == {"r", "g", "b", "y"}
        for st in record["stats"].values():
            assert 0 <= st["min"] <= st["p2"] <= st["median"] <= st["p98"] <= st["max"] <= 255


def test_inspect_glass_slide_reports_no_tissue(glass_slide, capsys):
    rc, stdout, stderr = run(capsys, "inspect", "--json", glass_slide)
    assert rc == 0, stderr
    (record,) = json_lines(stdout)
    assert record["stats"] is None and "no tissue" in record["sample"]


# --------------------------------------------------------------------------------------------------
# exit codes


def test_exit_code_nonzero_when_any_input_fails(photo, tmp_path, capsys):
    missing = tmp_path / "missing.jpg"
    rc, stdout, stderr = run(capsys, "inspect", photo, missing)
    assert rc == 1
    assert str(photo) in stdout
    assert f"error  {missing}: no such file" in stderr

    rc, _, stderr = run(capsys, "normalize", photo, missing, "-o", tmp_path / "out", "--method", "stretch")
    assert rc == 1 and "1 of 2 inputs normalized, 1 failed" in stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == [photo.name]

    rc, _, stderr = run(capsys, "fit", missing, "-o", tmp_path / "ref.json")
    assert rc == 2 and "no reference written" in stderr
    assert not (tmp_path / "ref.json").exists()


def test_a_palette_reference_is_never_ignored(tmp_path, capsys):
    """--reference PALETTE without --method means match; with another method it is an error."""
    rng = np.random.default_rng(5)
    src, ref = tmp_path / "src.png", tmp_path / "ref.png"
    for path, lo in ((src, 20), (ref, 120)):
        pixels = rng.integers(lo, lo + 100, (48, 48, 3), dtype=np.uint8)
        pyvips.Image.new_from_array(pixels).copy(interpretation="srgb").pngsave(str(path))
    assert main(["normalize", str(src), "-o", str(tmp_path / "a"), "--reference", str(ref), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["params"]["method"] == "match"
    assert main(["normalize", str(src), "-o", str(tmp_path / "b"), "--reference", str(ref), "--method", "stretch"]) == 2
    assert "method 'stretch' maps onto no reference image" in capsys.readouterr().err
    assert not (tmp_path / "b" / "src.png").exists()
    # a target JSON made for match is refused by another method, with the reason
    assert main(["fit", str(ref), "-o", str(tmp_path / "palette.json")]) == 0
    capsys.readouterr()
    args = ["normalize", str(src), "-o", str(tmp_path / "c"), "--reference", str(tmp_path / "palette.json")]
    assert main(args + ["--method", "equalize"]) == 2
    assert "is a match target; --method equalize cannot use it" in capsys.readouterr().err
    assert main(args) == 0  # the JSON says which method it is for


# --------------------------------------------------------------------------------------------------
# options that cannot apply are refused, never ignored


@pytest.mark.parametrize("given", [["--mode", "rgb"], ["--low", "30", "--high", "60"], ["--method", "stretch", "--low", "5"]])
def test_params_reference_refuses_method_options(given, tile, tmp_path, capsys):
    """A parameters JSON fixes the method's options: giving them again would be silently ignored."""
    params_json = tmp_path / "params.json"
    assert run(capsys, "fit", "--method", "stretch", tile, "-o", params_json, "--workers", "0")[0] == 0
    rc, _, stderr = run(capsys, "normalize", tile, "-o", tmp_path / "out", "--reference", params_json, *given, "--workers", "0")
    assert rc == 2
    (line,) = stderr.splitlines()
    assert str(params_json) in line and "fitted stretch parameters" in line
    assert all(option in line for option in given if option.startswith("--") and option != "--method")
    assert not (tmp_path / "out" / tile.name).exists()
    # the defaults are not "given": the reference alone, or with its own method, still applies
    for extra in ([], ["--method", "stretch"]):
        rc, _, stderr = run(capsys, "normalize", tile, "-o", tmp_path / "ok", "--reference", params_json, *extra, "--workers", "0")
        assert rc == 0, stderr


def test_fit_refuses_options_the_method_does_not_take(tile, tmp_path, capsys):
    ref = tmp_path / "m.json"
    rc, _, stderr = run(capsys, "fit", tile, "-o", ref, "--method", "macenko", "--mode", "rgb", "--grid", "2x2", "--low", "5", "--workers", "0")
    assert rc == 2 and "method 'macenko' does not take --grid, --low, --mode" in stderr
    assert not ref.exists()
    rc, _, stderr = run(capsys, "fit", tile, "-o", ref, "--method", "reinhard", "--clip-limit", "3", "--workers", "0")
    assert rc == 2 and "does not take --clip-limit" in stderr
    rc, _, stderr = run(capsys, "fit", tile, "-o", ref, "--method", "match", "--mode", "bogus", "--workers", "0")
    assert rc == 2 and "bogus" in stderr
    assert not ref.exists()
    # options the method takes are still accepted (and used)
    assert run(capsys, "fit", tile, "-o", ref, "--method", "match", "--mode", "luminance", "--workers", "0")[0] == 0
    rc, _, stderr = run(capsys, "fit", tile, "-o", ref, "--method", "stretch", "--mode", "rgb", "--low", "5", "--workers", "0")
    assert rc == 0, stderr
    saved = json.loads(ref.read_text())["params"]
    assert saved["method"] == "stretch" and saved["low"] == 5 and saved["space"] == "rgb"


def test_clahe_with_a_reference_says_clahe_takes_none(tile, target, tmp_path, capsys):
    params_json = tmp_path / "params.json"
    assert run(capsys, "fit", "--method", "stretch", tile, "-o", params_json, "--workers", "0")[0] == 0
    for reference in (target, params_json):
        rc, _, stderr = run(capsys, "normalize", tile, "-o", tmp_path / "out", "--method", "clahe", "--reference", reference)
        assert rc == 2
        assert f"{reference}: method 'clahe' takes no reference" in stderr
        assert "parameters JSON" not in stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# -o: a folder for normalize, a JSON file for fit


def test_fit_never_writes_over_an_input(tile, tmp_path, capsys):
    """`vipsnorm fit k.jpg -o k.jpg` turned the image into JSON."""
    image = tmp_path / "k.jpg"
    image.write_bytes(tile.read_bytes())
    before = image.read_bytes()
    rc, _, stderr = run(capsys, "fit", image, "-o", image, "--workers", "0")
    assert rc == 2 and f"{image}: is an input of this fit" in stderr
    assert image.read_bytes() == before
    listed = tmp_path / "list.json"
    listed.write_text(f"{image}\n")
    rc, _, stderr = run(capsys, "fit", "--list", listed, "-o", listed, "--workers", "0")
    assert rc == 2 and "is a --list file" in stderr and listed.read_text() == f"{image}\n"
    rc, _, stderr = run(capsys, "fit", image, "-o", tmp_path / "c.json", "--cache", tmp_path / "c.json", "--workers", "0")
    assert rc == 2 and "is the --cache file" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.jpg", "list.json"]


def test_fit_output_must_be_a_json_file(tile, tmp_path, capsys):
    for name in ("ref.jpg", "ref", "ref.json.tmp"):
        rc, _, stderr = run(capsys, "fit", tile, "-o", tmp_path / name, "--workers", "0")
        assert rc == 2 and ".json" in stderr and len(stderr.splitlines()) == 1, stderr
    folder = tmp_path / "d"
    folder.mkdir()
    rc, _, stderr = run(capsys, "fit", tile, "-o", folder, "--workers", "0")
    assert rc == 2 and f"{folder}: is a folder" in stderr and "vipsnorm-part" not in stderr
    rc, _, stderr = run(capsys, "fit", tile, "-o", tmp_path / "missing" / "ref.json", "--workers", "0")
    assert rc == 2 and "does not exist" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and list(folder.iterdir()) == []


def test_fit_again_replaces_the_reference(tile, photo, tmp_path, capsys):
    ref = tmp_path / "ref.json"
    assert run(capsys, "fit", tile, "-o", ref, "--method", "stretch", "--workers", "0")[0] == 0
    first = json.loads(ref.read_text())
    rc, _, stderr = run(capsys, "fit", tile, photo, "-o", ref, "--method", "equalize", "--workers", "0")
    assert rc == 0, stderr
    second = json.loads(ref.read_text())
    assert first["params"]["method"] == "stretch" and second["params"]["method"] == "equalize"


def test_normalize_output_that_is_a_file(tile, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("junk\n")
    rc, _, stderr = run(capsys, "normalize", tile, "-o", afile, "--workers", "0")
    assert rc == 2
    assert stderr == f"error  {afile}: is a file, not a folder: -o names the output folder (created if missing)\n"
    assert afile.read_text() == "junk\n"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_compression_with_a_format_it_does_not_apply_to_is_refused(fmt, tile, tmp_path, capsys):
    """--compression jpeg with --format png was ignored silently: it is for TIFF outputs only."""
    rc, _, stderr = run(capsys, "normalize", tile, "-o", tmp_path / "out", "--format", fmt, "--compression", "jpeg", "--workers", "0")
    assert rc == 2
    (line,) = stderr.splitlines()
    assert f"--compression is for TIFF outputs only, and --format {fmt} writes none" in line and "leave it out" in line
    assert not (tmp_path / "out").exists()
    # with --format auto it applies to the outputs that are TIFF (slides) and leaves the others alone
    rc, _, stderr = run(capsys, "normalize", tile, "-o", tmp_path / "auto", "--compression", "lzw", "--workers", "0")
    assert rc == 0, stderr


def test_build_method_refuses_a_reference_it_cannot_use(tile, tmp_path, capsys):
    """A stretch parameters reference given to build_method was dropped (the defaults 2, 98 used and
    every image fitted on itself); a macenko target given for equalize was accepted silently."""
    from vipsnorm.errors import InvalidReferenceError

    params_json, target_json = tmp_path / "stretch.json", tmp_path / "macenko.json"
    assert run(capsys, "fit", "--method", "stretch", "--low", "10", "--high", "90", tile, "-o", params_json, "--workers", "0")[0] == 0
    assert run(capsys, "fit", "--method", "macenko", tile, "-o", target_json, "--workers", "0")[0] == 0
    stretch, macenko = vipsnorm.load_reference(params_json), vipsnorm.load_reference(target_json)
    with pytest.raises(InvalidReferenceError, match=r"holds fitted stretch parameters.*params=reference\.params"):
        vipsnorm.build_method("stretch", stretch)
    with pytest.raises(InvalidReferenceError, match="method 'equalize' maps onto no target; the reference holds a macenko target"):
        vipsnorm.build_method("equalize", macenko)
    with pytest.raises(InvalidReferenceError, match="holds stretch parameters"):
        vipsnorm.build_method("equalize", stretch)
    with pytest.raises(InvalidReferenceError, match="method 'clahe' takes no reference"):
        vipsnorm.build_method("clahe", macenko)
    # what the message says to do applies the parameters unchanged
    (tmp_path / "out").mkdir()
    result = vipsnorm.normalize_file(tile, tmp_path / "out", vipsnorm.build_method("stretch"), params=stretch.params)
    assert result.status == "ok", result.error
    assert result.params == stretch.params and (result.params.low, result.params.high) == (10, 90)
