"""Resuming never takes another run's output for this one's, and cleanup never strays (QA defects).

- An output replaced by a run with other settings whose rows never reached the manifest (killed
  mid-task) is redone, not skipped: ``done`` asks for the identity of the file the worker put in place.
- A task that outlives its run (its client was killed; on a cluster given with ``--scheduler`` it goes
  on) never puts its output over that of a later run: it checks the run's marker before the rename.
- Part-file cleanup never follows a symbolic link out of the output folder, reaches only the folders
  the run writes into, and never ends a run over a file it cannot delete.
- A resume with nothing to do writes nothing in the output tree (no live-run marker).

All in this process (``workers=0``) or in one child process: the cluster itself is tested elsewhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pyvips
from test_batch_manifest import write_png  # (tests/ is on the path: pytest's rootdir-relative imports)

import vipsnorm
from vipsnorm.batch import default_manifest, discover, normalize_batch, plan, read_manifest
from vipsnorm.batch import run as run_module
from vipsnorm.batch.run import NormalizeJob, normalize_items
from vipsnorm.engine import Options

# (the marker's names are looked up in the tests that use them, so that the others show their own
# failure on a vipsnorm without them, not an import error)

#: Outputs whose size depends only on their dimensions: a replaced file cannot be told by its size.
UNCOMPRESSED = Options(format="tiff", compression="none")


@pytest.fixture()
def images(tmp_path) -> Path:
    for i in range(3):
        write_png(tmp_path / "in" / f"im{i}.png", i)
    return tmp_path / "in"


def pixels(folder: Path) -> dict[str, bytes]:
    """The pixels of every output (read from bytes: libvips caches what it loads by file name)."""
    files = sorted(folder.glob("*.tif"))
    return {p.name: bytes(pyvips.Image.new_from_buffer(p.read_bytes(), "").write_to_memory()) for p in files}


def part_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".vipsnorm-part-" in p.name]


# --------------------------------------------------------------------------------------------------
# 1. an output replaced by a run whose rows were lost


def test_outputs_of_a_killed_run_with_other_settings_are_redone_not_skipped(images, tmp_path):
    out = tmp_path / "out"
    summary = normalize_batch([images], out, vipsnorm.Stretch(), options=UNCOMPRESSED, workers=0)
    assert summary.ok == 3
    first = pixels(out)
    sizes = {p.name: p.stat().st_size for p in out.glob("*.tif")}
    manifest = default_manifest(out)
    before_b = manifest.read_bytes()

    # run B, other settings, --overwrite: its outputs are renamed into place one by one, but it is killed
    # before its rows reach the manifest (a task's rows arrive when the whole task ends)
    normalize_batch([images], out, vipsnorm.Stretch(low=10, high=90), options=UNCOMPRESSED, workers=0, overwrite=True)
    manifest.write_bytes(before_b)
    assert pixels(out) != first and {p.name: p.stat().st_size for p in out.glob("*.tif")} == sizes

    summary = normalize_batch([images], out, vipsnorm.Stretch(), options=UNCOMPRESSED, workers=0)
    assert (summary.ok, summary.skipped) == (3, 0)  # not "done": the files are not those recorded
    assert pixels(out) == first
    summary = normalize_batch([images], out, vipsnorm.Stretch(), options=UNCOMPRESSED, workers=0)
    assert (summary.ok, summary.skipped) == (0, 3)  # and now they are


def test_rows_record_the_identity_of_the_output_put_in_place(images, tmp_path):
    out = tmp_path / "out"
    normalize_batch([images], out, vipsnorm.Stretch(), workers=0)
    normalize_batch([images], out, vipsnorm.Stretch(), workers=0)
    rows = read_manifest(default_manifest(out))
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["skipped"] * 3
    for row in rows:
        st = os.stat(row["output"])
        assert (row["output_size"], row["output_ino"], row["output_mtime_ns"]) == (
            str(st.st_size), str(st.st_ino), str(st.st_mtime_ns)
        )


# --------------------------------------------------------------------------------------------------
# 2. a task that outlives its run


def capture_jobs(monkeypatch) -> list:
    """Record every (job, items) the run sends to its workers: what a task of that run would hold."""
    sent = []

    def recording(job, items):
        sent.append((job, list(items)))
        return normalize_items(job, items)

    monkeypatch.setattr(run_module, "normalize_items", recording)
    return sent


def test_a_task_of_an_earlier_run_never_replaces_a_later_runs_outputs(images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    sent = capture_jobs(monkeypatch)
    normalize_batch([images], out, vipsnorm.Stretch(low=20, high=80), options=UNCOMPRESSED, workers=0)  # run A
    tasks_of_a = list(sent)
    monkeypatch.undo()
    summary = normalize_batch([images], out, vipsnorm.Stretch(), options=UNCOMPRESSED, workers=0)  # run B
    assert summary.ok == 3
    of_b = pixels(out)

    # A's client was killed while its tasks still ran on the cluster: they end only now
    rows = [row for job, items in tasks_of_a for row in normalize_items(job, items)]
    assert [r["status"] for r in rows] == ["error"] * 3
    assert all("output not put in place: its run ended or a later run" in r["error"] for r in rows)
    assert all(r["error"].startswith(r["input"]) and "run the command again" in r["error"] for r in rows)
    assert pixels(out) == of_b and not part_files(out)
    summary = normalize_batch([images], out, vipsnorm.Stretch(), options=UNCOMPRESSED, workers=0)
    assert (summary.ok, summary.skipped) == (0, 3)  # B's outputs, recorded as B's


def test_the_run_is_checked_just_before_the_rename(images, tmp_path, monkeypatch):
    # a later run takes over while a file is being written (a slide takes minutes): the finished file
    # is not put in place, and the rest of the task is skipped without any work
    out = tmp_path / "out"
    normalize_batch([images], out, vipsnorm.Stretch(), options=UNCOMPRESSED, workers=0)
    kept = pixels(out)
    marker = run_module.live_marker(out, default_manifest(out))
    job = NormalizeJob(str(out), vipsnorm.Stretch(low=20, high=80), None, UNCOMPRESSED, str(marker), "run-a token-a")
    marker.write_text("run-a token-a\n")
    calls = []
    real = run_module.normalize_file

    def written_then_taken_over(*args, **kwargs):
        calls.append(args[0])
        result = real(*args, **kwargs)
        marker.write_text("run-b token-b\n")
        return result

    monkeypatch.setattr(run_module, "normalize_file", written_then_taken_over)
    items = [plan(discover([images]), out)[i] for i in range(3)]
    rows = normalize_items(job, items)
    assert [r["status"] for r in rows] == ["error"] * 3 and len(calls) == 1
    assert pixels(out) == kept and not part_files(out)


def test_a_marker_holds_the_run_while_it_runs_and_is_gone_after(images, tmp_path):
    out = tmp_path / "out"
    manifest = default_manifest(out)
    live_marker, prefix = run_module.live_marker, run_module.LIVE_PREFIX
    seen = []

    def on_row(row):
        seen.append(live_marker(out, manifest).read_text().split())

    summary = normalize_batch([images], out, vipsnorm.Stretch(), workers=0, on_row=on_row)
    run_id = read_manifest(manifest)[0]["run"]
    assert summary.ok == 3 and all(s[0] == run_id for s in seen) and len({tuple(s) for s in seen}) == 1
    assert not list(out.glob(prefix + "*"))  # the output tree holds outputs only, after the run
    # another manifest: another marker (runs with different manifests may share an output folder)
    assert live_marker(out, tmp_path / "other.csv") != live_marker(out, manifest)
    # a job without a marker (a caller of normalize_items) is never refused
    job = NormalizeJob(str(out), vipsnorm.Stretch(), None, Options())
    item = plan(discover([images / "im0.png"]), out)[0]
    assert normalize_items(job, [item])[0]["status"] == "ok"


def test_a_run_that_fails_removes_its_marker_too(images, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def broken(job, items):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "normalize_items", broken)
    with pytest.raises(KeyboardInterrupt):
        normalize_batch([images], out, vipsnorm.Stretch(), workers=0)
    assert not list(out.glob(run_module.LIVE_PREFIX + "*"))


# --------------------------------------------------------------------------------------------------
# 4, 5. part-file cleanup


def test_cleanup_never_follows_a_symbolic_link_out_of_the_output_folder(tmp_path):
    write_png(tmp_path / "in" / "tiles" / "t0.png", 0)
    outside = tmp_path / "outside"
    outside.mkdir()
    theirs = outside / ".other.vipsnorm-part-0123abcd.png"  # another run's output being written
    theirs.write_bytes(b"in progress")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tiles").symlink_to(outside)
    summary = normalize_batch([tmp_path / "in"], tmp_path / "out", vipsnorm.Stretch(), workers=0)
    assert summary.error == 1  # the run refuses to write there
    assert theirs.read_bytes() == b"in progress"  # and deletes nothing there either


def test_cleanup_checks_again_a_folder_that_became_a_link_during_the_run(tmp_path, monkeypatch):
    # the plan refuses a folder that leads out; one swapped for a link while the run goes on (another
    # job reorganizing the tree, say) must not lead the cleanup at the end out of the output folder
    for i in range(2):
        write_png(tmp_path / "in" / "tiles" / f"t{i}.png", i)
    outside = tmp_path / "outside"
    outside.mkdir()
    theirs = outside / ".other.vipsnorm-part-0123abcd.png"
    theirs.write_bytes(b"in progress")
    out = tmp_path / "out"

    def then_swapped(job, items):
        rows = normalize_items(job, items)
        if not (out / "tiles").is_symlink():
            (out / "tiles").rename(tmp_path / "moved")
            (out / "tiles").symlink_to(outside)
        return rows

    monkeypatch.setattr(run_module, "normalize_items", then_swapped)
    normalize_batch([tmp_path / "in"], out, vipsnorm.Stretch(), workers=0)
    assert theirs.read_bytes() == b"in progress"


def test_cleanup_reaches_only_the_folders_this_run_writes_into(tmp_path, monkeypatch):
    """Part files are removed from the folders of inputs with work left, at the start and the end; a
    folder whose inputs are all finished is not even listed: a resume with nothing to do lists no
    folder (each a server round trip, huge ones on NFS), and the staged files of a concurrent run
    with another manifest writing there are left alone. A killed run's leftover in a finished folder
    stays until a run writes there again (hidden: never taken for an input or an output)."""
    for i, sub in enumerate(["a", "a", "b"]):
        write_png(tmp_path / "in" / sub / f"im{i}.png", i)
    out = tmp_path / "out"
    assert normalize_batch([tmp_path / "in"], out, vipsnorm.Stretch(), workers=0).ok == 3
    mine = out / "a" / ".im0.vipsnorm-part-0badc0de.png"  # what a SIGKILL during a write leaves
    theirs = out / "b" / ".im2.vipsnorm-part-0badc0de"  # another run's staged file, or a leftover
    for part in (mine, theirs):
        part.write_bytes(b"half")
    cleaned = []
    real_remove = run_module.remove_part_files

    def remove_part_files(folders):
        folders = list(folders)
        cleaned.append(sorted(str(Path(f).relative_to(out)) for f in folders))
        return real_remove(folders)

    monkeypatch.setattr(run_module, "remove_part_files", remove_part_files)
    summary = normalize_batch([tmp_path / "in"], out, vipsnorm.Stretch(), workers=0)
    assert (summary.ok, summary.skipped) == (0, 3) and cleaned in ([], [[], []])  # nothing listed
    assert mine.exists() and theirs.exists()
    os.utime(tmp_path / "in" / "a" / "im1.png", ns=(0, 10**18))  # changed: a has work left again
    cleaned.clear()
    summary = normalize_batch([tmp_path / "in"], out, vipsnorm.Stretch(), workers=0)
    assert (summary.ok, summary.skipped) == (1, 2) and cleaned == [["a"], ["a"]]  # at the start and the end
    assert not mine.exists() and theirs.read_bytes() == b"half"


def test_a_resume_with_nothing_to_do_writes_nothing_in_the_output_tree(images, tmp_path, monkeypatch):
    """The live-run marker is claimed only when there is work: a resume over a read-only output tree
    (a finished archive on a read-only mount) with nothing left reports every input skipped, not an
    error (before, the marker was written first and the run ended with exit 2)."""
    out = tmp_path / "out"
    assert normalize_batch([images], out, vipsnorm.Stretch(), workers=0).ok == 3
    before = sorted(p.name for p in out.iterdir())

    def read_only(path, mode="r", *args, **kwargs):  # the client's writes in the output tree fail
        if any(c in mode for c in "wax+") and Path(path).is_relative_to(out):
            raise OSError(30, "Read-only file system", str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(run_module, "open", read_only, raising=False)
    summary = normalize_batch([images], out, vipsnorm.Stretch(), workers=0)
    assert (summary.ok, summary.error, summary.skipped) == (0, 0, 3)
    assert sorted(p.name for p in out.iterdir()) == before  # no marker, not even for a moment
    # with work to do, the marker is claimed before any worker starts, and a tree it cannot be
    # written in is refused as before, with nothing done
    calls = []
    monkeypatch.setattr(run_module, "normalize_items", lambda job, items: calls.append(items) or [])
    with pytest.raises(vipsnorm.errors.OutputError, match="marker of the live run"):
        normalize_batch([images], out, vipsnorm.Stretch(), workers=0, overwrite=True)
    assert calls == []


def test_part_files_a_dying_worker_left_in_a_folder_the_run_created_are_removed_at_the_end(tmp_path, monkeypatch):
    write_png(tmp_path / "in" / "new" / "t0.png", 0)
    out = tmp_path / "out"

    def then_died_writing(job, items):
        rows = normalize_items(job, items)
        (out / "new" / ".t9.vipsnorm-part-0badc0de.png").write_bytes(b"half")  # another file's worker died
        return rows

    monkeypatch.setattr(run_module, "normalize_items", then_died_writing)
    assert normalize_batch([tmp_path / "in"], out, vipsnorm.Stretch(), workers=0).ok == 1
    assert not part_files(out)


def test_errors_name_the_output_not_its_staging_name(images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "im0.png").mkdir(parents=True)  # the rename into place fails: a folder has the name
    real = run_module.normalize_file

    def disk_full_on_im1(path, out_dir, method, *, name, **kwargs):
        if Path(path).name == "im1.png":  # as the writer reports a failed write: naming its output
            error = f"{Path(out_dir) / name}.png: cannot write the output (No space left on device)"
            return vipsnorm.engine.Result(Path(path), status="error", error=error)
        return real(path, out_dir, method, name=name, **kwargs)

    monkeypatch.setattr(run_module, "normalize_file", disk_full_on_im1)
    normalize_batch([images], out, vipsnorm.Stretch(), workers=0)
    rows = {Path(r["input"]).name: r for r in read_manifest(default_manifest(out))}
    assert rows["im0.png"]["error"] == f"{out / 'im0.png'}: cannot write the output (Is a directory)"
    assert rows["im1.png"]["error"] == f"{out / 'im1.png'}: cannot write the output (No space left on device)"
    assert rows["im2.png"]["status"] == "ok" and not part_files(out)


def test_no_overwrite_refuses_an_existing_output_before_any_work(images, tmp_path, monkeypatch):
    """Outputs are staged and renamed into place by the worker, but the output's own name is still
    checked first: with --no-overwrite an existing output is an error before the input is fitted."""
    out = tmp_path / "out"
    assert normalize_batch([images], out, vipsnorm.Stretch(), workers=0).ok == 3
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert len(before) == 3

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted although the output exists")

    monkeypatch.setattr(vipsnorm.engine, "fit_slide", no_fit)
    summary = normalize_batch(
        [images], out, vipsnorm.Stretch(), workers=0, overwrite=True, options=Options(overwrite=False)
    )
    assert summary.error == 3
    rows = read_manifest(default_manifest(out))[-3:]
    assert all("already exists" in row["error"] for row in rows)
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before and part_files(out) == []


# --------------------------------------------------------------------------------------------------
# 6. an interrupted run: Ctrl-C, and SIGTERM (timeout, SLURM, docker stop)


class InterruptedEngine:
    """A local cluster's (or the child's) engine whose run is interrupted by Ctrl-C while a task runs:
    the task goes on while the engine shuts down, and ends only in ``close``."""

    description = "interrupted"

    def __init__(self):
        self.in_flight: list[dict] = []

    def threads(self) -> int:
        return 1

    def run(self, fn, job, groups, on_results, fail) -> None:
        self.job, self.items = job, [item for items in groups for item in items]
        raise KeyboardInterrupt

    def close(self) -> None:
        self.in_flight.extend(normalize_items(self.job, self.items))


def test_a_task_in_flight_when_the_run_is_interrupted_puts_nothing_in_place(images, tmp_path, monkeypatch):
    """Before: the engine was closed before the run's marker was released, so the running task found
    its run still live and renamed its output into place after Ctrl-C, with no row recorded."""
    out = tmp_path / "out"
    engine = InterruptedEngine()
    monkeypatch.setattr(run_module, "_engine", lambda *args: engine)
    with pytest.raises(KeyboardInterrupt):
        normalize_batch([images], out, vipsnorm.Stretch(), workers=1)
    assert [r["status"] for r in engine.in_flight] == ["error"] * 3
    assert all("output not put in place: its run ended" in r["error"] for r in engine.in_flight)
    assert os.listdir(out) == []  # no output, no staged file, no marker
    assert read_manifest(default_manifest(out)) == []


def test_sigterm_handling_lasts_the_run_only_and_leaves_a_programs_own_handler(images, tmp_path):
    seen = []
    on_row = lambda row: seen.append(signal.getsignal(signal.SIGTERM))  # noqa: E731
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    normalize_batch([images], tmp_path / "a", vipsnorm.Stretch(), workers=0, on_row=on_row)
    assert callable(seen[0]) and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    mine = lambda signum, frame: None  # noqa: E731
    signal.signal(signal.SIGTERM, mine)
    try:
        normalize_batch([images], tmp_path / "b", vipsnorm.Stretch(), workers=0, on_row=on_row)
        assert seen[-1] is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


SLOW_RUN = """
import sys, time
from pathlib import Path
import vipsnorm.batch.run as run
from vipsnorm.cli import main

real = run.normalize_file

def slow(*args, **kwargs):
    result = real(*args, **kwargs)  # the output is written, staged under its temporary name
    Path(sys.argv[1]).touch()
    time.sleep(60)
    return result

run.normalize_file = slow
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_sigterm_cleans_up_as_ctrl_c_does_then_ends_the_process(images, tmp_path):
    """Before: SIGTERM (what timeout, SLURM and docker stop send) ended the process at once, leaving
    the run's marker and the staged output, as SIGKILL does."""
    out, ready, script = tmp_path / "out", tmp_path / "ready", tmp_path / "slow.py"
    script.write_text(SLOW_RUN)
    argv = [sys.executable, str(script), str(ready), "normalize", str(images), "-o", str(out), "--method", "stretch"]
    process = subprocess.Popen([*argv, "--workers", "0"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), process.stderr.read() if process.poll() is not None else "not ready in 60 s"
        assert [p.name for p in out.iterdir() if p.name.startswith(run_module.LIVE_PREFIX)]  # the run is live
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == -signal.SIGTERM  # it still ends of SIGTERM, for whoever sent it
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert os.listdir(out) == []  # no marker, no staged output
    with vipsnorm.batch.Manifest.open(default_manifest(out)):  # the manifest, closed and unlocked
        pass
