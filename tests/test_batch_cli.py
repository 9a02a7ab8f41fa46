"""The batch options of the command line, in this process (``--workers 0``) unless a test says otherwise."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import pyvips

from vipsnorm.batch import SCHEDULER_ENV, Manifest, default_manifest, read_manifest
from vipsnorm.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture()
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    for i, sub in enumerate(["x", "x", "y/z"]):
        (tmp_path / "in" / sub).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(10 * i, 180 + 10 * i, (40, 56, 3), dtype=np.uint8)
        pyvips.Image.new_from_array(pixels).copy(interpretation="srgb").pngsave(str(tmp_path / "in" / sub / f"im{i}.png"))
    return tmp_path / "in"


@pytest.fixture(autouse=True)
def no_scheduler_from_the_environment(monkeypatch):
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)


def test_folder_in_process_then_resumed(folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, stderr = run(capsys, "normalize", folder, "-o", out, "--method", "stretch", "--workers", "0")
    assert rc == 0, stderr
    summary = stderr.strip().splitlines()[-1]
    assert summary.startswith("3 of 3 inputs normalized, 0 failed, 0 skipped") and "(in-process)" in summary
    assert f"manifest: {default_manifest(out)}" in summary
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["x/im0.png", "x/im1.png", "y/z/im2.png"]
    assert f"ok     {folder / 'y' / 'z' / 'im2.png'} -> {out / 'y' / 'z' / 'im2.png'}" in stdout

    rc, stdout, stderr = run(capsys, "normalize", folder, "-o", out, "--method", "stretch", "--workers", "0", "--json")
    assert rc == 0 and "0 of 3 inputs normalized, 0 failed, 3 skipped" in stderr
    records = [json.loads(line) for line in stdout.splitlines()]
    assert {r["status"] for r in records} == {"skipped"} and all(Path(r["output"]).is_file() for r in records)

    rc, stdout, stderr = run(capsys, "normalize", folder, "-o", out, "--method", "stretch", "--workers", "0", "--overwrite")
    assert rc == 0 and "3 of 3 inputs normalized, 0 failed, 0 skipped" in stderr
    assert [r["status"] for r in read_manifest(default_manifest(out))] == ["ok"] * 3 + ["skipped"] * 3 + ["ok"] * 3


def test_include_list_and_manifest_options(folder, tmp_path, capsys):
    listing = tmp_path / "files.txt"
    listing.write_text("in/x/im0.png\n# a comment\n")
    manifest = tmp_path / "records.csv"
    rc, stdout, stderr = run(capsys, "normalize", folder, "--include", "im2.*", "--list", listing, "-o", tmp_path / "out",
                             "--manifest", manifest, "--method", "equalize", "--workers", "0")  # fmt: skip
    assert rc == 0, stderr
    rows = read_manifest(manifest)
    assert sorted(Path(r["output"]).relative_to(tmp_path / "out").as_posix() for r in rows) == ["in/x/im0.png", "y/z/im2.png"]
    assert {r["method"] for r in rows} == {"equalize"}
    assert not default_manifest(tmp_path / "out").exists()


def test_a_manifest_in_use_is_refused(folder, tmp_path, capsys):
    with Manifest.open(default_manifest(tmp_path / "out")):
        rc, _, stderr = run(capsys, "normalize", folder, "-o", tmp_path / "out", "--method", "stretch", "--workers", "0")
    assert rc == 2 and "another vipsnorm run is writing this manifest" in stderr
    assert not list((tmp_path / "out").rglob("*.png"))


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no input"),
        (["--workers", "1", "--scheduler", "tcp://127.0.0.1:1"], "cannot be combined with --scheduler"),
        (["--workers", "-1"], "--workers must be 0 or more"),
    ],
)
def test_usage_errors(args, message, tmp_path, capsys):
    inputs = [] if not args else [str(tmp_path / "missing.png"), str(tmp_path / "other.png")]
    rc, _, stderr = run(capsys, "normalize", *inputs, "-o", tmp_path / "out", "--method", "stretch", *args)
    assert rc == 2 and message in stderr


def test_overwrite_and_no_overwrite_exclude_each_other(folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["normalize", str(folder), "-o", str(tmp_path / "out"), "--overwrite", "--no-overwrite"])
    assert info.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_progress_bar_only_when_asked_or_on_a_terminal(folder, tmp_path, capsys):
    args = ["normalize", folder, "-o", tmp_path / "a", "--method", "stretch", "--workers", "0"]
    rc, _, stderr = run(capsys, *args)
    assert rc == 0 and "3/3" not in stderr  # stderr is not a terminal here
    rc, _, stderr = run(capsys, *args[:3], tmp_path / "b", *args[4:], "--progress")
    assert rc == 0 and "3/3" in stderr and "file/s" in stderr


def test_fit_over_a_folder(folder, tmp_path, capsys):
    rc, stdout, stderr = run(capsys, "fit", folder, "-o", tmp_path / "ref.json", "--workers", "0")
    assert rc == 0, stderr
    data = json.loads((tmp_path / "ref.json").read_text())
    assert data["kind"] == "target" and len(data["inputs"]) == 3
    assert "fitted on 3 of 3 inputs" in stdout
    assert sorted(os.listdir(tmp_path)) == ["in", "ref.inputs.jsonl", "ref.json"]  # no manifest: the kept summaries


def test_resume_only_skips_outputs_where_this_run_puts_them(tmp_path, capsys):
    """A record of an output in another place (another -o, or the same folder given at another depth)
    is not "done": the input is normalized again, into this run's tree."""
    src = tmp_path / "in" / "sub"
    src.mkdir(parents=True)
    pyvips.Image.black(64, 48, bands=3).draw_rect([200, 120, 40], 8, 8, 30, 20, fill=True).write_to_file(str(src / "x.png"))
    manifest = tmp_path / "m.csv"
    assert main(["normalize", str(src), "-o", str(tmp_path / "out"), "--manifest", str(manifest), "--workers", "0"]) == 0
    assert (tmp_path / "out" / "x.png").is_file()
    # the parent folder as input: x.png now belongs in out/sub/
    assert main(["normalize", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--manifest", str(manifest), "--workers", "0"]) == 0
    assert (tmp_path / "out" / "sub" / "x.png").is_file()
    # another output folder with the same manifest
    assert main(["normalize", str(src), "-o", str(tmp_path / "out2"), "--manifest", str(manifest), "--workers", "0"]) == 0
    assert (tmp_path / "out2" / "x.png").is_file()
    capsys.readouterr()
    rows = read_manifest(manifest)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]


def test_symlinked_folders_are_followed_once_and_odd_names_are_kept(tmp_path, capsys):
    root = tmp_path / "archive"
    (root / "real").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    image = pyvips.Image.black(32, 32, bands=3).draw_rect([180, 90, 60], 4, 4, 12, 12, fill=True)
    image.write_to_file(str(elsewhere / "linked.png"))
    image.write_to_file(str(root / "real" / "ok.png"))
    image.write_to_file(str(root / "real" / "latin1.png"))
    os.rename(root / "real" / "latin1.png", root / "real" / "caf\udce9.png")  # a name that is not UTF-8
    (root / "disk2").symlink_to(elsewhere, target_is_directory=True)
    (root / "real" / "loop").symlink_to(root, target_is_directory=True)  # a cycle
    out = tmp_path / "out"
    assert main(["normalize", str(root), "-o", str(out), "--workers", "0"]) == 1
    assert (out / "disk2" / "linked.png").is_file() and (out / "real" / "ok.png").is_file()
    rows = read_manifest(default_manifest(out))
    assert sorted(r["status"] for r in rows) == ["error", "ok", "ok"]  # the cycle adds nothing
    (bad,) = [r for r in rows if r["status"] == "error"]
    # recorded under its own name (round-trips through the manifest), with the cause
    assert bad["input"].endswith("caf\udce9.png") and "not valid UTF-8" in bad["error"]
    assert "caf\\udce9.png" in capsys.readouterr().err  # shown escaped, not a crash


def test_one_file_linked_into_train_and_val_is_normalized_into_both_and_fitted_once(tmp_path, capsys):
    """An ML layout: ds/train/cat/x.png and ds/val/cat/x.png both link to pool/x.png. normalize writes
    both outputs (before: val/cat/x.png was never written, no row, exit 0); fit pools the file once."""
    pool = tmp_path / "pool"
    pool.mkdir()
    rng = np.random.default_rng(3)
    for name in ("x", "y"):
        pixels = rng.integers(20, 200, (32, 40, 3), dtype=np.uint8)
        pyvips.Image.new_from_array(pixels).copy(interpretation="srgb").pngsave(str(pool / f"{name}.png"))
    ds = tmp_path / "ds"
    for split in ("train", "val"):
        (ds / split / "cat").mkdir(parents=True)
        (ds / split / "cat" / "x.png").symlink_to(pool / "x.png")
    (ds / "train" / "cat" / "y.png").symlink_to(pool / "y.png")
    out = tmp_path / "out"
    rc, _, stderr = run(capsys, "normalize", ds, "-o", out, "--method", "stretch", "--workers", "0")
    assert rc == 0, stderr
    expected = ["train/cat/x.png", "train/cat/y.png", "val/cat/x.png"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == expected
    rows = read_manifest(default_manifest(out))
    assert sorted(os.path.relpath(r["input"], ds) for r in rows if r["status"] == "ok") == expected
    rc, stdout, stderr = run(capsys, "fit", ds, "-o", tmp_path / "ref.json", "--workers", "0")
    assert rc == 0, stderr
    assert len(json.loads((tmp_path / "ref.json").read_text())["inputs"]) == 2  # x once, and y


def write_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(20, 200, (24, 32, 3), dtype=np.uint8)
    pyvips.Image.new_from_array(pixels).copy(interpretation="srgb").pngsave(str(path))
    return path


def test_an_input_named_like_a_temporary_file_is_an_error_not_a_silent_loss(tmp_path, capsys):
    """Before: normalized, reported ok (exit 0), then its output deleted by the run's own cleanup of
    temporary files, on every run, given by name or in a text list."""
    odd = write_image(tmp_path / "odd" / ".y.vipsnorm-part-deadbeef.png", 1)
    (tmp_path / "odd" / "run.txt").write_text(odd.name + "\n")
    for given in ([odd], ["--list", tmp_path / "odd" / "run.txt"]):
        out = tmp_path / f"out{len(given)}"
        rc, stdout, stderr = run(capsys, "normalize", *given, "-o", out, "--method", "stretch", "--workers", "0")
        assert rc == 1 and "ok " not in stdout
        assert f"error  {odd}: output {out / odd.stem}.* would have a name vipsnorm keeps" in stderr
        assert "0 of 1 inputs normalized, 1 failed" in stderr
        assert os.listdir(out) == []
        (row,) = read_manifest(default_manifest(out))
        assert row["status"] == "error" and row["input"] == str(odd)


def test_list_entries_name_files_exactly(tmp_path, capsys):
    """Before: " lead.png" in a list (a text line, or a quoted CSV value) processed "lead.png"."""
    spaced, plain = write_image(tmp_path / "sp" / " lead.png", 1), write_image(tmp_path / "sp" / "lead.png", 2)
    trail = write_image(tmp_path / "sp" / "trail.png ", 3)
    (tmp_path / "sp" / "run.txt").write_text(" lead.png\ntrail.png \n")
    (tmp_path / "sp" / "run.csv").write_text('input,output\n" lead.png",csv/ lead.png\n')
    for listing in ("run.txt", "run.csv"):
        out = tmp_path / f"out-{listing}"
        rc, _, stderr = run(capsys, "normalize", "--list", tmp_path / "sp" / listing, "-o", out, "--method", "stretch", "--workers", "0")
        assert rc == 0, stderr
        rows = read_manifest(default_manifest(out))
        assert [r["input"] for r in rows] == [str(spaced), str(trail)][: len(rows)] and str(plain) not in stderr
        expected = {"run.txt": [" lead.png", "trail.png"], "run.csv": ["csv/ lead.png"]}[listing]
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == expected


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_a_fifo_or_a_device_given_as_input_is_refused_as_such(tmp_path, capsys):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    rc, _, stderr = run(capsys, "normalize", fifo, "/dev/zero", "-o", out, "--method", "stretch", "--workers", "0")
    assert rc == 1
    for given in (fifo, "/dev/zero"):
        assert f"error  {given}: not a regular file (a FIFO, device or socket); nothing read" in stderr
    assert "empty" not in stderr and os.listdir(out) == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
@pytest.mark.parametrize("kind", ["devnull", "fifo"])
def test_a_manifest_that_is_not_a_regular_file_is_refused_before_any_work(kind, folder, tmp_path, capsys):
    """Before: a link to /dev/null printed ok lines, then 'error  Invalid argument' (its fsync); a FIFO
    'error  Illegal seek'; neither named the manifest."""
    manifest = tmp_path / "m.csv"
    if kind == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to(os.devnull)
    out = tmp_path / "out"
    rc, stdout, stderr = run(capsys, "normalize", folder, "-o", out, "--manifest", manifest, "--method", "stretch", "--workers", "0")
    assert rc == 2 and stdout == ""
    assert stderr.strip() == f"error  {manifest}: cannot open the manifest (not a regular file: a FIFO, device or socket); choose another --manifest"
    assert not list(out.rglob("*.png"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to tell the manifest's descriptor")
def test_a_manifest_on_a_full_disk_is_named_in_the_error(folder, tmp_path, capsys, monkeypatch):
    """Before: 'error  No space left on device', naming no file."""
    manifest = tmp_path / "m.csv"
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(manifest):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rc, _, stderr = run(capsys, "normalize", folder, "-o", tmp_path / "out", "--manifest", manifest, "--method", "stretch", "--workers", "0")
    assert rc == 2
    assert stderr.splitlines()[-1].startswith(f"error  {manifest}: cannot write the manifest (No space left on device)")
