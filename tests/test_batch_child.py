"""A batch of one task runs in one child process: a crash there costs only the file it was on."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import textwrap
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pyvips

import vipsnorm
from vipsnorm.batch import normalize_batch
from vipsnorm.batch import child as child_module
from vipsnorm.batch.child import ChildRunner
from vipsnorm.batch.run import SCHEDULER_ENV, default_manifest

#: Task functions and a method that kill their own process on a file named "crash" (with SIGSEGV, as a
#: decoder crash does), importable by the child only through the ``sys.path`` the parent sends it.
_MODULE = '''
import os
import signal
import time
from pathlib import Path

from vipsnorm.methods import Stretch


def crash_on(job, items):
    item = items[0]
    with open(Path(job, "runs"), "a") as f:  # one line per run of a file, by any process
        f.write(item.name + "\\n")
    if item.name == "exit":
        os._exit(5)
    if item.name == "unpicklable":
        return [lambda: None]
    if item.name == "slow":
        time.sleep(30)
        Path(job, "slow-finished").touch()
    if item.name == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if item.name == "once" and not Path(job, "crashed-once").exists():
        Path(job, "crashed-once").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    if item.name == "bug":
        raise ValueError("a bug")
    return [(item.name, os.getpid())]


class CrashingStretch(Stretch):
    """Stretch, except that fitting kills the process on an image with a red channel at 255."""

    def fit(self, sample):
        if sample.hist[0][255] > 0:
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().fit(sample)
'''


@pytest.fixture()
def crashy(tmp_path, monkeypatch):
    folder = tmp_path / "importable"
    folder.mkdir()
    (folder / "vipsnorm_test_crashy.py").write_text(textwrap.dedent(_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    import vipsnorm_test_crashy

    yield vipsnorm_test_crashy
    sys.modules.pop("vipsnorm_test_crashy", None)


def _items(*names: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(index=i, name=name) for i, name in enumerate(names)]


def _runs(folder: Path) -> list[str]:
    return (folder / "runs").read_text().split()


def _run(fn, job, groups) -> tuple[ChildRunner, list]:
    results: list = []
    runner = ChildRunner()
    try:
        runner.run(fn, job, groups, results.extend, lambda item, cause: (item.name, cause))
    finally:
        runner.close()
    return runner, results


def test_a_crash_costs_only_its_file(crashy, tmp_path):
    # groups are flattened and run in input order, whatever their grouping
    runner, results = _run(crashy.crash_on, str(tmp_path), [_items("a", "crash", "b")[::-1], []])
    assert [name for name, _ in results] == ["a", "crash", "b"]
    by_name = dict(results)
    assert by_name["crash"] == (
        "the worker process died on every attempt at this file (killed by SIGSEGV: a decoder crash, or out of memory)"
    )
    assert by_name["a"] != os.getpid() and by_name["b"] != os.getpid()  # run in another process
    assert by_name["a"] != by_name["b"]  # b ran in a fresh child after the crash
    assert runner.description == "1 worker process"


def test_an_exit_or_an_unsendable_result_is_an_error_without_a_retry(crashy, tmp_path):
    _, results = _run(crashy.crash_on, str(tmp_path), [_items("exit", "unpicklable", "b")])
    assert results[0] == ("exit", "the worker process ended on this file (exit status 5)")
    assert results[1][0] == "unpicklable"
    assert results[1][1].startswith("the task failed in the worker process (its result cannot be sent back")
    assert results[2][0] == "b" and isinstance(results[2][1], int)
    assert _runs(tmp_path) == ["exit", "unpicklable", "b"]  # each run once: only a signal is worth a retry


def test_after_a_crash_a_file_never_runs_in_the_caller(crashy, tmp_path, monkeypatch):
    # a crash, then no new child can start (out of processes, say): the files are errors, and never
    # run in this process, where the crash would take the whole batch down
    starts = []
    real = child_module._Child

    def child_that_starts_once(payload):
        starts.append(1)
        if len(starts) > 1:
            raise child_module._Unusable("cannot start it: [Errno 11] Resource temporarily unavailable")
        return real(payload)

    monkeypatch.setattr(child_module, "_Child", child_that_starts_once)
    _, results = _run(crashy.crash_on, str(tmp_path), [_items("a", "crash", "b")])
    assert results[0][0] == "a" and results[0][1] != os.getpid()
    assert [name for name, _ in results[1:]] == ["crash", "b"]
    assert results[1][1] == (
        "the worker process died on this file (killed by SIGSEGV) and no new one could be started "
        "(cannot start it: [Errno 11] Resource temporarily unavailable)"
    )
    assert results[2][1].startswith("no worker process could be started for this file")
    assert _runs(tmp_path) == ["a", "crash"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux) to find the child")
def test_the_child_ends_when_its_parent_is_killed(crashy, tmp_path):
    # the parent runs a file that takes 30 s and is killed; its child must not finish the file alone
    script = (
        "import sys, types; sys.path.insert(0, sys.argv[1]); import vipsnorm_test_crashy as m\n"
        "from vipsnorm.batch.child import ChildRunner\n"
        "item = types.SimpleNamespace(index=0, name='slow')\n"
        "ChildRunner().run(m.crash_on, sys.argv[2], [[item]], print, print)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(crashy.__file__).rsplit("/", 1)[0], str(tmp_path)])
    deadline = time.monotonic() + 30
    while not (tmp_path / "runs").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _runs(tmp_path) == ["slow"]
    children = _children(parent.pid)
    assert len(children) == 1
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(children[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(children[0])
    assert not (tmp_path / "slow-finished").exists()


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:  # ended meanwhile
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie (not yet reaped by init) has ended
    except FileNotFoundError:
        return False


def test_a_file_whose_child_died_once_is_retried(crashy, tmp_path):
    _, results = _run(crashy.crash_on, str(tmp_path), [_items("once", "b")])
    assert [name for name, _ in results] == ["once", "b"]
    assert all(isinstance(pid, int) for _, pid in results)
    assert (tmp_path / "crashed-once").exists()


def test_a_task_function_that_raises_fails_its_file_only(crashy, tmp_path):
    _, results = _run(crashy.crash_on, str(tmp_path), [_items("bug", "b")])
    assert results[0] == ("bug", "the task failed in the worker process (ValueError: a bug)")
    assert results[1][0] == "b" and isinstance(results[1][1], int)


@pytest.mark.parametrize("where", ["nowhere", "only in this process"])
def test_a_job_the_child_cannot_import_runs_here(where, monkeypatch):
    # "nowhere": the function does not pickle at all; "only in this process": it pickles by reference
    # to a module the child cannot import, so the child reports that and the batch runs here instead
    module = types.ModuleType("vipsnorm_not_importable")
    exec("import os\ndef here(job, items):\n    return [(items[0].name, os.getpid())]", module.__dict__)
    if where != "nowhere":
        monkeypatch.setitem(sys.modules, module.__name__, module)
    runner, results = _run(module.here, None, [_items("a", "b")])
    assert results == [("a", os.getpid()), ("b", os.getpid())]
    assert runner.description == "in-process"


def test_a_batch_of_one_task_survives_a_crash_and_records_it(crashy, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "crash", "b"):
        pixels = rng.integers(30, 220, (40, 40, 3), dtype=np.uint8)
        if name == "crash":
            pixels[0, 0] = (255, 0, 0)
        pyvips.Image.new_from_array(pixels).copy(interpretation="srgb").pngsave(str(images / f"{name}.png"))
    out = tmp_path / "out"
    summary = normalize_batch([images], out, crashy.CrashingStretch())
    assert (summary.ok, summary.error, summary.skipped) == (2, 1, 0) and summary.engine == "1 worker process"
    with open(default_manifest(out), newline="") as f:
        rows = {Path(r["input"]).name: r for r in csv.DictReader(f)}
    assert rows["crash.png"]["status"] == "error"
    assert rows["crash.png"]["error"].startswith(f"{images / 'crash.png'}: the worker process died")
    assert "SIGSEGV" in rows["crash.png"]["error"]
    assert rows["a.png"]["worker"].startswith("worker process ") and rows["a.png"]["worker"] != f"worker process {os.getpid()}"
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]  # no partial output of the crash



def _pngs(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        pixels = rng.integers(30, 220, (32, 32, 3), dtype=np.uint8)
        pyvips.Image.new_from_array(pixels).copy(interpretation="srgb").pngsave(str(folder / f"im{i}.png"))
    return folder


def test_the_child_records_the_identity_of_each_output_it_put_in_place(tmp_path, monkeypatch):
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    images, out = _pngs(tmp_path / "in", 2), tmp_path / "out"
    summary = normalize_batch([images], out, vipsnorm.Stretch())
    assert summary.ok == 2 and summary.engine == "1 worker process"
    with open(default_manifest(out), newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        st = os.stat(row["output"])
        assert row["worker"] != "in-process"
        assert (row["output_size"], row["output_ino"], row["output_mtime_ns"]) == (
            str(st.st_size), str(st.st_ino), str(st.st_mtime_ns)
        )
    assert sorted(p.name for p in out.iterdir()) == ["im0.png", "im1.png"]  # no marker, no staged file left


@pytest.mark.parametrize("held", ["this run", "a later run"])
def test_the_child_puts_an_output_in_place_only_while_its_run_is_live(held, tmp_path):
    from vipsnorm.batch import discover, plan
    from vipsnorm.batch.run import NormalizeJob, normalize_items
    from vipsnorm.engine import Options

    images, out = _pngs(tmp_path / "in", 2), tmp_path / "out"
    out.mkdir()
    marker = out / ".vipsnorm-run-test"
    marker.write_text(f"{held}\n")
    job = NormalizeJob(str(out), vipsnorm.Stretch(), None, Options(), str(marker), "this run")  # pickled to the child
    items = plan(discover([images]), out)
    _, rows = _run(normalize_items, job, [items])
    if held == "this run":
        assert [r["status"] for r in rows] == ["ok", "ok"]
        assert all(r["worker"].startswith("worker process") for r in rows)  # run in the child
        assert sorted(p.name for p in out.glob("*.png")) == ["im0.png", "im1.png"]
    else:
        assert [r["status"] for r in rows] == ["error", "error"]
        assert "its run ended or a later run" in rows[0]["error"]
        assert not list(out.glob("*.png")) and not list(out.glob(".*vipsnorm-part*"))
