"""``vipsnorm patches`` resumes and keeps a manifest: a rerun skips the slides an earlier run finished
with the same settings from the same input (nothing is recomputed), other settings, ``--overwrite``
and a modified input redo a slide, bad slides are errors while the others go on, and a run killed at
any step of a slide's commit never leaves that slide looking finished."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vipsnorm.batch import default_manifest, read_manifest
from vipsnorm.cli import main as vipsnorm_main
from vipsnorm.io.write import PART_MARKER
from vipsnorm.training import patches as patches_module
from vipsnorm.training.patches import MANIFEST_COLUMNS, ROWS_DIR, TABLE, read_table

FAST = ("--size", 64, "--random", 3, "--workers", 0)


def run(capsys, *argv) -> tuple[int, str, str]:
    """``vipsnorm patches ARGV`` through the main command line."""
    code = vipsnorm_main(["patches", *(str(a) for a in argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def manifest_rows(out: Path) -> list[dict]:
    return read_manifest(default_manifest(out))


def last_run(out: Path) -> dict[str, dict]:
    """The rows of the latest run in the manifest, by input file name."""
    rows = manifest_rows(out)
    return {Path(r["input"]).name: r for r in rows if r["run"] == rows[-1]["run"]}


def fingerprint(out: Path) -> dict[str, tuple[int, int]]:
    """Inode and mtime of every file and folder below ``out`` except the table (rebuilt by every run,
    which changes ``out`` itself): what a redo changes (outputs are written anew and renamed into place)."""
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*") if p.name != TABLE}


def no_part_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if PART_MARKER in p.name]


@pytest.fixture
def two_slides(small_slide, tmp_path) -> list[Path]:
    """Two slides of this test's own (copies: their mtimes may be changed)."""
    paths = [tmp_path / "in" / "a.tif", tmp_path / "in" / "b.tif"]
    paths[0].parent.mkdir()
    for path in paths:
        shutil.copyfile(small_slide, path)
    return paths


def test_a_rerun_skips_finished_slides_and_recomputes_nothing(two_slides, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, *two_slides, "-o", out, *FAST, "--method", "equalize")
    assert code == 0, stderr
    assert "6 patches from 2 of 2 slides: 2 patched, 0 failed, 0 skipped" in stderr
    assert f"manifest: {default_manifest(out)}" in stderr
    first_table = read_table(out / TABLE)
    before = fingerprint(out)
    rows = manifest_rows(out)
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for row, slide in zip(rows, two_slides):
        assert row["input"] == str(slide) and row["output"] == str(out / slide.stem)
        assert (row["input_size"], row["input_mtime_ns"]) == (str(slide.stat().st_size), str(slide.stat().st_mtime_ns))
        assert row["patches"] == "3" and row["level"] == "0" and float(row["mpp"]) == pytest.approx(0.25)
        assert row["method"] == "equalize" and '"method": "equalize"' in row["params"] and len(row["config"]) == 16
        assert int(row["output_size"]) == sum(p.stat().st_size for p in (out / slide.stem).glob("*.png"))
        assert float(row["seconds"]) > 0 and row["worker"] == "in-process"

    # the rerun opens no slide: anything that did would fail here
    def no_slide(*args, **kwargs):
        raise AssertionError("a finished slide was opened again")

    monkeypatch.setattr(patches_module, "open_slide", no_slide)
    code, stdout, stderr = run(capsys, *two_slides, "-o", out, *FAST, "--method", "equalize")
    assert code == 0, stderr
    assert stdout.count("skip   ") == 2 and "3 patches (finished by an earlier run)" in stdout
    assert "6 patches from 2 of 2 slides: 0 patched, 0 failed, 2 skipped (done before)" in stderr
    assert fingerprint(out) == before  # not one output written again
    assert read_table(out / TABLE) == first_table  # the skipped slides keep their rows
    rows = manifest_rows(out)
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped", "skipped"] and rows[0]["run"] != rows[2]["run"]
    for ok, skipped in zip(rows[:2], rows[2:]):
        same = ("input", "input_size", "input_mtime_ns", "output", "output_size", "patches", "level", "mpp", "config")
        assert {k: skipped[k] for k in same} == {k: ok[k] for k in same}
        assert skipped["params"] == "" and skipped["seconds"] == ""


def test_a_single_slide_in_its_worker_process_resumes_too(two_slides, tmp_path, capsys):
    # the default engine for one slide: one child process (the other tests run in this one)
    out = tmp_path / "out"
    argv = (two_slides[0], "-o", out, "--size", 64, "--random", 3, "--method", "equalize")
    code, _, stderr = run(capsys, *argv)
    assert code == 0, stderr
    (row,) = manifest_rows(out)
    assert row["status"] == "ok" and row["worker"].startswith("worker process ")
    assert row["worker"] != f"worker process {os.getpid()}"
    before = fingerprint(out)
    code, stdout, stderr = run(capsys, *argv)
    assert code == 0 and "0 patched, 0 failed, 1 skipped" in stderr, stderr
    assert fingerprint(out) == before and [r["status"] for r in manifest_rows(out)] == ["ok", "skipped"]


def test_other_settings_redo_and_options_without_effect_do_not(two_slides, tmp_path, capsys):
    out = tmp_path / "out"
    a, b = two_slides
    assert run(capsys, a, b, "-o", out, *FAST)[0] == 0
    old_keys = {r["key"] for r in read_table(out / TABLE)}
    before = fingerprint(out)
    # png ignores --quality and random patches ignore --stride: nothing to redo
    assert run(capsys, a, b, "-o", out, *FAST, "--quality", 50, "--stride", 100)[0] == 0
    assert {r["status"] for r in last_run(out).values()} == {"skipped"} and fingerprint(out) == before
    # another seed places other patches: both slides redone, their old files replaced
    code, stdout, _ = run(capsys, a, b, "-o", out, *FAST, "--seed", 5)
    assert code == 0 and stdout.count("ok     ") == 2
    assert {r["status"] for r in last_run(out).values()} == {"ok"}
    table = read_table(out / TABLE)
    assert len(table) == 6 and not {r["key"] for r in table} & old_keys
    for slide in (a, b):
        assert sorted(p.stem for p in (out / slide.stem).glob("*.png")) == sorted(
            r["key"] for r in table if r["slide"] == str(slide)
        )
        assert fingerprint(out)[slide.stem] != before[slide.stem]  # a new folder, renamed into place
    # a method (or another one) changes the pixels: redone
    configs = set()
    for method in ("equalize", "stretch"):
        assert run(capsys, a, "-o", out, *FAST, "--seed", 5, "--method", method)[0] == 0
        (row,) = last_run(out).values()
        assert row["status"] == "ok" and row["method"] == method
        configs.add(row["config"])
    assert len(configs) == 2
    # the same settings again: skipped
    assert run(capsys, a, "-o", out, *FAST, "--seed", 5, "--method", "stretch")[0] == 0
    assert [r["status"] for r in last_run(out).values()] == ["skipped"]


def test_overwrite_redoes_finished_slides(two_slides, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, *two_slides, "-o", out, *FAST)[0] == 0
    table = read_table(out / TABLE)
    before = fingerprint(out)
    code, stdout, _ = run(capsys, *two_slides, "-o", out, *FAST, "--overwrite")
    assert code == 0 and stdout.count("ok     ") == 2
    assert {r["status"] for r in last_run(out).values()} == {"ok"}
    after = fingerprint(out)
    for slide in two_slides:
        assert after[slide.stem] != before[slide.stem]
        assert after[f"{ROWS_DIR}/{slide.stem}.csv"] != before[f"{ROWS_DIR}/{slide.stem}.csv"]
    assert read_table(out / TABLE) == table  # the same settings give the same patches


def test_an_input_modified_after_the_first_run_is_redone(two_slides, tmp_path, capsys):
    out = tmp_path / "out"
    a, b = two_slides
    assert run(capsys, a, b, "-o", out, *FAST)[0] == 0
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, another mtime
    assert run(capsys, a, b, "-o", out, *FAST)[0] == 0
    rows = last_run(out)
    assert (rows["a.tif"]["status"], rows["b.tif"]["status"]) == ("ok", "skipped")
    assert rows["a.tif"]["input_mtime_ns"] == str(st.st_mtime_ns + 10**9)
    # another slide under the same name (other bytes and size): redone
    from vipsnorm.synth import write_synthetic_slide

    write_synthetic_slide(b, 1024, 1024, seed=7)
    assert run(capsys, a, b, "-o", out, *FAST)[0] == 0
    rows = last_run(out)
    assert (rows["a.tif"]["status"], rows["b.tif"]["status"]) == ("skipped", "ok")
    assert all(int(r["x"]) <= 1024 - 64 for r in read_table(out / TABLE) if r["slide"] == str(b))
    # an input now missing is an error, and its old outputs are not counted as finished
    a.unlink()
    code, _, stderr = run(capsys, a, b, "-o", out, *FAST)
    rows = last_run(out)
    assert code == 1 and (rows["a.tif"]["status"], rows["b.tif"]["status"]) == ("error", "skipped")
    assert str(a) in rows["a.tif"]["error"] and "error  " in stderr


def test_bad_slides_are_errors_and_the_others_go_on(shared_data, two_slides, tmp_path, capsys):
    bad = [shared_data / "bad" / name for name in ("truncated.jpg", "unopenable.tiff", "unreadable.svs")]
    out = tmp_path / "out"
    inputs = [two_slides[0], *bad, two_slides[1]]
    code, _, stderr = run(capsys, *inputs, "-o", out, *FAST)
    assert code == 1
    assert "6 patches from 2 of 5 slides: 2 patched, 3 failed, 0 skipped" in stderr
    rows = last_run(out)
    assert [rows[p.name]["status"] for p in inputs] == ["ok", "error", "error", "error", "ok"]
    for path in bad:
        row = rows[path.name]
        assert row["error"].startswith(f"{path}: ") and row["patches"] == "" and row["output"] == ""
        assert row["input_size"] == str(path.stat().st_size)
        assert f"error  {path}: " in stderr
    assert {r["slide"] for r in read_table(out / TABLE)} == {str(p) for p in two_slides}
    assert not any((out / p.stem).exists() or (out / ROWS_DIR / f"{p.stem}.csv").exists() for p in bad)
    # a rerun tries the bad slides again and skips the good ones
    code, _, stderr = run(capsys, *inputs, "-o", out, *FAST)
    rows = last_run(out)
    assert code == 1 and [rows[p.name]["status"] for p in inputs] == ["skipped", "error", "error", "error", "skipped"]
    assert "0 patched, 3 failed, 2 skipped" in stderr and len(read_table(out / TABLE)) == 6


def test_the_table_is_complete_after_resuming_and_leftovers_are_removed(two_slides, tmp_path, capsys):
    """A run that did one slide, then one with both: the table holds both. Leftovers of a killed run
    (a temporary folder, a rows file being written) are removed, and never enter the table."""
    out = tmp_path / "out"
    a, b = two_slides
    assert run(capsys, a, "-o", out, *FAST)[0] == 0
    leftovers = [out / f".b{PART_MARKER}0123abcd", out / ROWS_DIR / f".b{PART_MARKER}0123abcd.csv"]
    leftovers[0].mkdir()
    (leftovers[0] / "b_L0_0_0.png").write_bytes(b"half a patch")
    shutil.copyfile(out / ROWS_DIR / "a.csv", leftovers[1])  # would double a's rows if it were read
    # of a slide of no run here (another run may be writing them): left alone, and never read
    others = [out / f".c{PART_MARKER}0123abcd", out / ROWS_DIR / f".c{PART_MARKER}0123abcd.csv"]
    others[0].mkdir()
    shutil.copyfile(out / ROWS_DIR / "a.csv", others[1])
    assert run(capsys, a, b, "-o", out, *FAST)[0] == 0
    assert [r["status"] for r in last_run(out).values()] == ["skipped", "ok"]
    table = read_table(out / TABLE)
    assert [r["slide"] for r in table] == [str(a)] * 3 + [str(b)] * 3
    assert all((out / r["file"]).is_file() for r in table)
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in others)
    # a table cut short or deleted is rebuilt whole by a run that redoes nothing
    (out / TABLE).unlink()
    assert run(capsys, a, b, "-o", out, *FAST)[0] == 0
    assert read_table(out / TABLE) == table


def test_the_manifest_path_and_a_manifest_of_another_command(two_slides, tmp_path, capsys):
    out = tmp_path / "out"
    elsewhere = tmp_path / "logs" / "p.csv"
    elsewhere.parent.mkdir()
    assert run(capsys, two_slides[0], "-o", out, *FAST, "--manifest", elsewhere)[0] == 0
    assert not default_manifest(out).exists() and [r["status"] for r in read_manifest(elsewhere)] == ["ok"]
    # resuming does not depend on the manifest: the slide's own record says it is finished
    assert run(capsys, two_slides[0], "-o", out, *FAST)[0] == 0
    assert [r["status"] for r in manifest_rows(out)] == ["skipped"]
    # a manifest of 'vipsnorm normalize' is not appended to
    normalized = tmp_path / "norm"
    assert vipsnorm_main(["normalize", str(two_slides[0]), "-o", str(normalized), "--workers", "0"]) == 0
    code, _, stderr = run(capsys, two_slides[1], "-o", out, *FAST, "--manifest", default_manifest(normalized))
    assert code == 2 and "is not a manifest of vipsnorm patches" in stderr
    assert str(default_manifest(normalized)) in stderr
    # ... nor the other way round
    code = vipsnorm_main(["normalize", str(two_slides[1]), "-o", str(normalized), "--workers", "0", "--manifest", str(elsewhere)])
    assert code == 2 and "is a manifest of vipsnorm patches" in capsys.readouterr().err
    # an empty file (made by hand, or a run killed as it created it) becomes a patches manifest
    empty = tmp_path / "logs" / "empty.csv"
    empty.touch()
    assert run(capsys, two_slides[1], "-o", tmp_path / "out2", *FAST, "--manifest", empty)[0] == 0
    assert list(read_manifest(empty)[0]) == list(MANIFEST_COLUMNS)


_KILLED = 9
_KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from vipsnorm.cli import main

    kill_at, calls, real = int(sys.argv[1]), [0], os.replace

    def replace(src, dst):  # the process dies instead of the kill_at-th rename, as by SIGKILL: no cleanup
        calls[0] += 1
        if calls[0] == kill_at:
            os._exit({killed})
        real(src, dst)

    os.replace = replace
    sys.exit(main(["patches", *sys.argv[2:]]))
    """
).format(killed=_KILLED)


_COMMON = {
    "tar": ("--format", "tar", "--shard-size", 2, "--size", 64, "--random", 4, "--workers", 0),
    "png": ("--format", "png", "--size", 64, "--random", 4, "--workers", 0),
}
_SETTINGS = {"A": ("--seed", 1), "B": ("--seed", 2)}


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory, small_slide) -> tuple[Path, dict[tuple[str, str], Path]]:
    """A slide and the output folders of uninterrupted runs with settings A and B, in each format (2
    shards each, or a folder of 4 patches)."""
    folder = tmp_path_factory.mktemp("kill")
    slide = folder / "s.tif"
    shutil.copyfile(small_slide, slide)
    outs = {}
    for fmt, common in _COMMON.items():
        for which, settings in _SETTINGS.items():
            outs[fmt, which] = folder / f"clean-{fmt}-{which}"
            code = vipsnorm_main(["patches", *(str(a) for a in (slide, "-o", outs[fmt, which], *common, *settings))])
            assert code == 0
    return slide, outs


def _state(out: Path) -> tuple[list[dict], dict[str, bytes]]:
    """The table and every output file (shards, or the patches in the slide's folder)."""
    files = {
        str(p.relative_to(out)): p.read_bytes()
        for p in out.rglob("*")
        if p.is_file() and p.name != TABLE and not any(part.startswith(".") for part in p.relative_to(out).parts)
    }
    return read_table(out / TABLE), files


@pytest.mark.parametrize("fmt", ["tar", "png"])
@pytest.mark.parametrize("first", ["A", "B"])
@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 5])
def test_a_run_killed_during_a_commit_never_leaves_a_slide_looking_finished(clean_runs, tmp_path, capsys, kill_at, first, fmt):
    """Settings A are committed; a run with settings B dies at its 1st to 5th rename (the list of the
    slide's outputs at stake; tar: shard 0, shard 1; png: the old folder aside, the new folder in; then
    the rows file and the table), as if killed there. Whatever was renamed by then, a rerun with A (the
    old settings: half its shards may be B's now) or with B ends with exactly the outputs and table of
    an uninterrupted run, and skips the slide only if B's commit was complete (or, with A, had not
    begun)."""
    slide, clean = clean_runs
    common = _COMMON[fmt]
    expected = {which: _state(clean[fmt, which]) for which in _SETTINGS}
    assert expected["A"] != expected["B"] and len(expected["A"][1]) == (2 if fmt == "tar" else 4)
    out = tmp_path / "out"
    shutil.copytree(clean[fmt, "A"], out)
    argv = [str(a) for a in (slide, "-o", out, *common, *_SETTINGS["B"])]
    killed = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(kill_at), *argv], capture_output=True, text=True)
    assert killed.returncode == _KILLED, killed.stderr
    a_intact = kill_at == 1  # A's rows file is deleted after the 1st rename
    b_committed = kill_at > 4  # the 4th rename commits the rows file

    second = "A" if first == "B" else "B"
    first_status = "skipped" if (first == "B" and b_committed) or (first == "A" and a_intact) else "ok"
    for which, status in ((first, first_status), (second, "ok"), (second, "skipped")):
        assert run(capsys, slide, "-o", out, *common, *_SETTINGS[which])[0] == 0
        (row,) = last_run(out).values()
        assert row["status"] == status, (which, row)
        assert _state(out) == expected[which]
        assert no_part_files(out)
        assert not list((out / ROWS_DIR).glob("*.uncommitted"))


# renames of a commit that changes the format, the last first: (old, new) -> the rows file's, and in all
_FORMAT_CHANGES = {
    # the list at stake, the new folder in, the rows file; the shards deleted (no rename); the table
    ("tar", "png"): (3, 4),
    # the list at stake, shard 0, shard 1, the rows file, the old folder aside (then deleted); the table
    ("png", "tar"): (4, 6),
}


@pytest.mark.parametrize(
    "old, new, kill_at", [(*pair, k) for pair, (_, n) in _FORMAT_CHANGES.items() for k in range(1, n + 1)]
)
def test_a_run_killed_while_changing_the_format_leaves_no_output_of_either_behind(
    clean_runs, tmp_path, capsys, old, new, kill_at
):
    """Settings A in one format are committed; a run with A in the other format dies at each rename
    of its commit. A rerun in the new format (skipped if the rows file was committed) and then one in
    the old format each end with exactly the outputs of an uninterrupted run: no shard or folder of the
    other format is left over, whatever was renamed or deleted by then."""
    slide, clean = clean_runs
    rows_at, _ = _FORMAT_CHANGES[old, new]
    expected = {fmt: _state(clean[fmt, "A"]) for fmt in (old, new)}
    out = tmp_path / "out"
    shutil.copytree(clean[old, "A"], out)
    argv = [str(a) for a in (slide, "-o", out, *_COMMON[new], *_SETTINGS["A"])]
    killed = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(kill_at), *argv], capture_output=True, text=True)
    assert killed.returncode == _KILLED, killed.stderr
    for fmt, status in ((new, "skipped" if kill_at > rows_at else "ok"), (old, "ok"), (new, "ok")):
        assert run(capsys, slide, "-o", out, *_COMMON[fmt], *_SETTINGS["A"])[0] == 0
        (row,) = last_run(out).values()
        assert row["status"] == status, (fmt, row)
        assert _state(out) == expected[fmt]
        assert no_part_files(out) and not list((out / ROWS_DIR).glob("*.uncommitted"))


def test_another_format_replaces_the_old_outputs_and_nothing_else(two_slides, tmp_path, capsys):
    """A slide redone in another format loses the outputs of the old one (shards after a folder, a
    folder after shards, shards beyond the new last one, all of them for coords) once the new ones are
    committed; another slide's outputs and files that are not the slide's outputs stay."""
    out = tmp_path / "out"
    a, b = two_slides
    tar = ("--format", "tar", "--shard-size", 2)
    assert run(capsys, a, b, "-o", out, *FAST, *tar)[0] == 0
    strangers = [out / "a-notes.tar", out / "a-0000001.tar", out / "a-000000.tar.bak", out / "a.txt", out / "ab"]
    for path in strangers[:-1]:
        path.write_bytes(b"not a patch")
    strangers[-1].mkdir()
    b_outputs = {p.name: p.read_bytes() for p in out.glob("b-*.tar")}
    assert sorted(b_outputs) == ["b-000000.tar", "b-000001.tar"]

    def a_outputs() -> list[str]:
        return sorted(p.name for p in out.iterdir() if p.name.startswith("a") and p not in strangers)

    def check(files: set[str]) -> None:
        rows = [r for r in read_table(out / TABLE) if r["slide"] == str(a)]
        assert len(rows) == 3 and {r["file"].split("/")[0] for r in rows} == files
        assert {p.name: p.read_bytes() for p in out.glob("b-*.tar")} == b_outputs
        assert all(p.exists() for p in strangers) and no_part_files(out)
        assert not list((out / ROWS_DIR).glob("*.uncommitted"))

    assert a_outputs() == ["a-000000.tar", "a-000001.tar"]
    # tar -> png: the shards go
    assert run(capsys, a, "-o", out, *FAST, "--format", "png")[0] == 0
    assert a_outputs() == ["a"] and len(list((out / "a").glob("*.png"))) == 3
    check({"a"})
    # png -> tar: the folder goes
    assert run(capsys, a, "-o", out, *FAST, "--format", "tar", "--shard-size", 1)[0] == 0
    assert a_outputs() == ["a-000000.tar", "a-000001.tar", "a-000002.tar"]
    check({"a-000000.tar", "a-000001.tar", "a-000002.tar"})
    # fewer shards: those beyond the new last one go
    assert run(capsys, a, "-o", out, *FAST, *tar)[0] == 0
    assert a_outputs() == ["a-000000.tar", "a-000001.tar"]
    check({"a-000000.tar", "a-000001.tar"})
    # npy, then the table only: no file of the slide is left
    assert run(capsys, a, "-o", out, *FAST, "--format", "npy")[0] == 0
    assert a_outputs() == ["a"] and len(list((out / "a").glob("*.npy"))) == 3
    assert run(capsys, a, "-o", out, *FAST, "--format", "coords")[0] == 0
    assert a_outputs() == []
    check({""})
    (row,) = last_run(out).values()
    assert row["status"] == "ok" and row["output"] == ""


def test_another_input_under_the_same_output_name_is_refused_across_runs(small_slide, tmp_path, capsys):
    """labA/x.tif, then labB/x.tif into one OUT: the second would replace the first's patches and rows,
    so it is an error (one line naming both), unless --overwrite. The same input changed, or with other
    settings, is redone; the same file by another path (a link) is not refused."""
    lab_a, lab_b = tmp_path / "labA" / "x.tif", tmp_path / "labB" / "x.tif"
    for path in (lab_a, lab_b):
        path.parent.mkdir()
        shutil.copyfile(small_slide, path)
    out = tmp_path / "out"
    assert run(capsys, lab_a, "-o", out, *FAST)[0] == 0
    table = read_table(out / TABLE)
    before = fingerprint(out)
    code, stdout, stderr = run(capsys, lab_b, "-o", out, *FAST)
    assert code == 1 and "0 patched, 1 failed" in stderr
    (line,) = [l for l in stderr.splitlines() if l.startswith("error  ")]
    assert line.startswith(f"error  {lab_b}: has the same output name (x) as {lab_a}, which an earlier run patched")
    assert "another -o" in line and "rename" in line and "--overwrite" in line
    assert read_table(out / TABLE) == table and fingerprint(out) == before  # labA's patches and rows stay
    (row,) = last_run(out).values()
    assert row["status"] == "error" and row["input"] == str(lab_b)
    # in a run with other slides, only that slide is an error
    code, stdout, _ = run(capsys, lab_b, small_slide, "-o", out, *FAST)
    assert code == 1 and [r["status"] for r in last_run(out).values()] == ["error", "ok"]
    # the same input with other settings, or changed, is redone as before
    assert run(capsys, lab_a, "-o", out, *FAST, "--seed", 3)[0] == 0
    assert last_run(out)["x.tif"]["status"] == "ok"
    st = lab_a.stat()
    os.utime(lab_a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert run(capsys, lab_a, "-o", out, *FAST, "--seed", 3)[0] == 0
    assert last_run(out)["x.tif"]["status"] == "ok"
    # the same file by a link: not another input
    link = tmp_path / "linked" / "x.tif"
    link.parent.mkdir()
    link.symlink_to(lab_a)
    assert run(capsys, link, "-o", out, *FAST, "--seed", 3)[0] == 0
    assert last_run(out)["x.tif"]["status"] == "ok"
    # --overwrite replaces it explicitly; then labA is the other input
    assert run(capsys, lab_b, "-o", out, *FAST, "--overwrite")[0] == 0
    assert {r["slide"] for r in read_table(out / TABLE) if r["key"].startswith("x_")} == {str(lab_b)}
    code, _, stderr = run(capsys, lab_a, "-o", out, *FAST)
    assert code == 1 and f"as {lab_b}, which an earlier run" in stderr


def test_a_slide_archive_moved_elsewhere_is_the_same_input_not_another(small_slide, tmp_path, capsys):
    """The archive moved (another disk, a renamed folder): each slide's recorded path names no file any
    more, and a file of the same name, size and mtime is here. The same input moved, not another
    input (before: every finished slide an error, only --overwrite helped); redone, so that its
    patches and rows name its new path, then skipped as usual."""
    old = tmp_path / "archive" / "x.tif"
    old.parent.mkdir()
    shutil.copy2(small_slide, old)
    out = tmp_path / "out"
    assert run(capsys, old, "-o", out, *FAST)[0] == 0
    new = tmp_path / "disk2" / "archive" / "x.tif"
    new.parent.parent.mkdir()
    os.rename(old.parent, new.parent)  # a move keeps the size and mtime
    code, _, stderr = run(capsys, new, "-o", out, *FAST)
    assert code == 0, stderr
    (row,) = last_run(out).values()
    assert row["status"] == "ok" and row["input"] == str(new)
    assert {r["slide"] for r in read_table(out / TABLE)} == {str(new)}
    assert run(capsys, new, "-o", out, *FAST)[0] == 0 and last_run(out)["x.tif"]["status"] == "skipped"
    # a file of that name elsewhere, changed (another size or mtime), is another input, as before
    other = tmp_path / "labB" / "x.tif"
    other.parent.mkdir()
    shutil.copyfile(small_slide, other)
    os.utime(other, ns=(0, new.stat().st_mtime_ns + 10**9))
    new.rename(tmp_path / "gone.tif")
    code, _, stderr = run(capsys, other, "-o", out, *FAST)
    assert code == 1 and f"as {new}, which an earlier run" in stderr


def test_two_existing_slides_of_one_name_size_and_mtime_are_still_two_inputs(small_slide, tmp_path, capsys):
    """Copies whose mtimes are equal (a tar gives whole seconds) are not taken for a moved one while the
    recorded one still exists: taking them for one would silently replace the first's patches."""
    lab_a, lab_b = tmp_path / "labA" / "x.tif", tmp_path / "labB" / "x.tif"
    for path in (lab_a, lab_b):
        path.parent.mkdir()
        shutil.copyfile(small_slide, path)
        os.utime(path, ns=(10**18, 10**18))
    out = tmp_path / "out"
    assert run(capsys, lab_a, "-o", out, *FAST)[0] == 0
    code, _, stderr = run(capsys, lab_b, "-o", out, *FAST)
    assert code == 1 and f"as {lab_a}, which an earlier run" in stderr


def test_a_slide_named_like_the_table_and_a_killed_runs_table(small_slide, tmp_path, capsys):
    # a slide called "patches" has parts named like the table's; neither cleanup takes the other's
    slide = tmp_path / "in" / "patches.tif"
    slide.parent.mkdir()
    shutil.copyfile(small_slide, slide)
    out = tmp_path / "out"
    out.mkdir()
    table_part = out / f".patches{PART_MARKER}0123abcd.csv"  # a killed run's temporary table
    slide_part = out / f".patches{PART_MARKER}4567cdef"  # a killed run's temporary patch folder
    slide_part.mkdir()
    table_part.write_text("partial")
    code, _, stderr = run(capsys, slide, "-o", out, *FAST)
    assert code == 0, stderr
    assert not table_part.exists() and not slide_part.exists() and no_part_files(out)
    assert {r["slide"] for r in read_table(out / TABLE)} == {str(slide)} and (out / "patches").is_dir()


def test_the_table_lists_the_finished_slides_after_ctrl_c(two_slides, tmp_path, capsys, monkeypatch):
    """Before: the table was rebuilt only after the last slide, so Ctrl-C left it missing (or stale)
    although the finished slides' rows were committed."""
    out = tmp_path / "out"
    a, b = two_slides
    real = patches_module.extract_slide

    def ctrl_c_on_b(path, *args, **kwargs):
        if Path(path) == b:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(patches_module, "extract_slide", ctrl_c_on_b)
    assert run(capsys, a, b, "-o", out, *FAST)[0] == 130
    assert [r["slide"] for r in read_table(out / TABLE)] == [str(a)] * 3
    assert no_part_files(out)


SLOW_SLIDE = """
import sys, time
from pathlib import Path
from vipsnorm.cli import main
from vipsnorm.training import patches

real = patches.extract_slide

def slow_second(path, *args, **kwargs):
    if Path(path).name == "b.tif":
        Path(sys.argv[1]).touch()
        time.sleep(60)
    return real(path, *args, **kwargs)

patches.extract_slide = slow_second
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_sigterm_rebuilds_the_table_and_cleans_up_then_ends_the_process(two_slides, tmp_path):
    """Before: SIGTERM (timeout, SLURM, docker stop) ended the process at once: no table."""
    out, ready, script = tmp_path / "out", tmp_path / "ready", tmp_path / "slow.py"
    script.write_text(SLOW_SLIDE)
    a, b = two_slides
    argv = [sys.executable, str(script), str(ready), "patches", str(a), str(b), "-o", str(out)]
    process = subprocess.Popen([*argv, *map(str, FAST)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), process.stderr.read() if process.poll() is not None else "not ready in 60 s"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert [r["slide"] for r in read_table(out / TABLE)] == [str(a)] * 3
    assert no_part_files(out)
    assert [r["status"] for r in manifest_rows(out)] == ["ok"]
