"""Batches on a real Dask cluster: a scheduler and two workers started as separate processes on
127.0.0.1 (``dask scheduler``, ``dask worker``), then workers and the command itself killed mid-run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pyvips

pytest.importorskip("distributed")

from distributed import Client  # noqa: E402

import vipsnorm  # noqa: E402
from vipsnorm.batch import SCHEDULER_ENV, default_manifest, fit_batch, normalize_batch, read_manifest  # noqa: E402
from vipsnorm.batch.cluster import DaskRunner  # noqa: E402
from vipsnorm.cli import main  # noqa: E402
from vipsnorm.engine import fit_files  # noqa: E402
from vipsnorm.io.write import PART_MARKER  # noqa: E402

#: A task a worker died on this many times more is an error (``allowed-failures`` of the test scheduler).
ALLOWED_FAILURES = 1


@dataclass
class Cluster:
    address: str
    processes: list[subprocess.Popen]
    folder: Path

    def client(self) -> Client:
        return Client(self.address, timeout=30)


def _env() -> dict[str, str]:
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": str(ALLOWED_FAILURES), "VIPS_CONCURRENCY": "1"}
    env.pop(SCHEDULER_ENV, None)
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dask")
    scheduler_file = folder / "scheduler.json"
    log = open(folder / "cluster.log", "wb")
    dask = [sys.executable, "-m", "dask"]
    processes = [
        subprocess.Popen(
            [*dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)],
            stdout=log, stderr=subprocess.STDOUT, env=_env(),
        )
    ]  # fmt: skip
    address = None
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.is_file() or not scheduler_file.read_text().strip():
            assert processes[0].poll() is None, (folder / "cluster.log").read_text()
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        # w1 has two Dask threads, as a cluster of the user's own may: it still works on one file at a time
        for name, threads in (("w0", "1"), ("w1", "2")):
            processes.append(
                subprocess.Popen(
                    [*dask, "worker", address, "--name", name, "--nthreads", threads, "--nworkers", "1",
                     "--host", "127.0.0.1", "--memory-limit", "2GB", "--no-dashboard",
                     "--local-directory", str(folder / name)],
                    stdout=log, stderr=subprocess.STDOUT, env=_env(),
                )
            )  # fmt: skip
        cluster = Cluster(address, processes, folder)
        with cluster.client() as client:
            client.wait_for_workers(2, timeout=60)
        yield cluster
    finally:
        if address is not None:
            with contextlib.suppress(Exception), Client(address, timeout=10) as client:
                client.shutdown()  # the scheduler and the workers
        for p in processes:
            if p.poll() is None:
                p.terminate()
        for p in processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()


@pytest.fixture()
def healthy(cluster) -> Cluster:
    """The cluster with both workers up (a test before may have killed one)."""
    with cluster.client() as client:
        client.wait_for_workers(2, timeout=60)
    return cluster


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 generated slides (2048x2048, pyramidal TIFF) and 60 small JPEGs in two sub-folders."""
    from vipsnorm.synth import synthetic_slide, write_synthetic_slide

    root = tmp_path_factory.mktemp("dataset")
    (root / "slides").mkdir()
    for i, lab in enumerate(("reference", "pale-blue", "dark-pink", "yellow")):
        write_synthetic_slide(root / "slides" / f"slide{i}.tif", 2048, 2048, seed=i, lab=lab)
    big = synthetic_slide(2048, 1280, seed=9, tissue=0.8)
    for i in range(60):
        folder = root / "jpegs" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        big.crop(256 * (i % 8), 256 * (i // 8 % 5), 256, 256).jpegsave(str(folder / f"tile{i:02d}.jpg"), Q=90)
    return root


def inputs_of(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.suffix in (".tif", ".jpg"))


def read_fully(path: str | Path) -> np.ndarray:
    """Every pixel of every level: a truncated or corrupt file fails here."""
    image = pyvips.Image.new_from_file(str(path), fail_on="error")
    pixels = image.numpy()
    if str(path).endswith(".tif"):
        for page in range(1, image.get("n-pages") if "n-pages" in image.get_fields() else 1):
            pyvips.Image.new_from_file(str(path), page=page, fail_on="error").numpy()
    return pixels


def cli(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vipsnorm.cli", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), text=True,
    )  # fmt: skip


def complete_rows(manifest: Path) -> list[dict]:
    return read_manifest(manifest) if manifest.is_file() else []


def wait_for_rows(process: subprocess.Popen, manifest: Path, n: int, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in complete_rows(manifest) if r["status"] == "ok"]
        if len(rows) >= n:
            return rows
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no result arrived"
        time.sleep(0.01)


def check_outputs(rows: list[dict], inputs: list[str], out: Path) -> None:
    """Every input ok exactly once, every output inside ``out`` and readable to the last pixel."""
    ok = [r for r in rows if r["status"] == "ok"]
    assert sorted(r["input"] for r in ok) == inputs, "an input is missing or was recorded ok twice"
    assert not [r for r in rows if r["status"] == "error"]
    for row in ok:
        assert Path(row["output"]).is_relative_to(out)
        assert os.path.getsize(row["output"]) == int(row["output_size"])
        read_fully(row["output"])
    assert not [p for p in out.rglob("*") if PART_MARKER in p.name]


# --------------------------------------------------------------------------------------------------


def test_mixed_batch_on_two_worker_processes(healthy, dataset, shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    bad = shared_data / "bad"
    rc = main(["normalize", str(dataset), str(bad), "-o", str(out), "--method", "stretch", "--scheduler", healthy.address])
    captured = capsys.readouterr()
    assert rc == 1  # the bad files
    summary = captured.err.strip().splitlines()[-1]
    assert summary.startswith("64 of 67 inputs normalized, 3 failed, 0 skipped") and f"Dask cluster at {healthy.address}" in summary

    rows = read_manifest(default_manifest(out))
    assert len(rows) == 67 and len({r["input"] for r in rows}) == 67
    errors = {Path(r["input"]).name: r for r in rows if r["status"] == "error"}
    assert sorted(errors) == sorted(os.listdir(bad))
    for name, row in errors.items():
        assert row["error"].startswith(str(bad / name)) and row["output"] == "" and "\n" not in row["error"]
        assert row["worker"].startswith("tcp://127.0.0.1:")
    check_outputs([r for r in rows if r["status"] != "error"], inputs_of(dataset), out)
    with healthy.client() as client:
        addresses = set(client.scheduler_info()["workers"])
        # libvips settings of the batch in every worker: threads from VIPS_CONCURRENCY, a small cache
        settings = client.run(lambda: (pyvips.concurrency_get(), pyvips.cache_get_max_mem(), pyvips.cache_get_max_files()))
    assert {r["worker"] for r in rows} == addresses  # both workers took part
    assert set(settings.values()) == {(1, 64 << 20, 16)}
    slide = next(r for r in rows if r["input"].endswith("slide0.tif"))
    assert slide["output"] == str(out / "slides" / "slide0.tif")  # the input tree, mirrored
    assert slide["levels"] == "2048x2048 1024x1024 512x512 256x256" and float(slide["mpp_x"]) == 0.25
    assert json.loads(slide["params"])["method"] == "stretch" and slide["backend"] == "libvips"
    assert (out / "jpegs" / "a" / "tile00.jpg").is_file() and (out / "truncated.jpg").exists() is False
    with vipsnorm.open(out / "slides" / "slide0.tif") as written:
        assert len(written.levels) > 1 and written.mpp == pytest.approx((0.25, 0.25))

    # the same files normalized in this process are the same bytes
    here = tmp_path / "here"
    assert normalize_batch([dataset], here, vipsnorm.Stretch(), workers=0).ok == 64
    for row in rows:
        if row["status"] == "ok":
            twin = here / Path(row["output"]).relative_to(out)
            assert twin.read_bytes() == Path(row["output"]).read_bytes(), row["output"]


def test_damage_is_told_on_a_worker_with_two_threads(healthy, damaged_svs, shared_data, tmp_path, capsys):
    """Damaged and healthy slides and broken files over a worker with two Dask threads: each file keeps
    its own verdict (libvips' error buffer is one per process: a worker works on one file at a time)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        shutil.copyfile(damaged_svs, inputs / f"damaged{i}.svs")
    for i in range(5):
        shutil.copyfile(shared_data / "slides" / "CMU-1-Small-Region.svs", inputs / f"good{i}.svs")
    for name in ("truncated.jpg", "unopenable.tiff"):
        shutil.copyfile(shared_data / "bad" / name, inputs / name)
    out = tmp_path / "out"
    rc = main(["normalize", str(inputs), "-o", str(out), "--method", "stretch", "--scheduler", healthy.address])
    assert rc == 1, capsys.readouterr().err
    rows = {Path(r["input"]).name: r for r in read_manifest(default_manifest(out))}
    assert len(rows) == 10
    for name, row in rows.items():
        if name.startswith("good"):
            assert row["status"] == "ok", row["error"]
        else:
            assert row["status"] == "error" and row["error"].startswith(str(inputs / name)), row
            assert ("a JPEG tile is damaged" in row["error"]) == name.startswith("damaged"), row["error"]
    assert sorted(p.name for p in out.iterdir()) == [f"good{i}.tif" for i in range(5)]


def test_a_worker_killed_mid_run(healthy, dataset, tmp_path):
    out = tmp_path / "out"
    manifest = default_manifest(out)
    with healthy.client() as client:
        pids = client.run(os.getpid)
        process = cli("normalize", dataset, "-o", out, "--method", "equalize", "--scheduler", healthy.address)
        first = wait_for_rows(process, manifest, 1)
        busy = [w for w, keys in client.processing().items() if keys]
        assert busy, "no task in flight: the batch ended before the kill"
        os.kill(pids[busy[0]], signal.SIGKILL)
        killed_at = len(first)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert killed_at < 64
    assert "64 of 64 inputs normalized, 0 failed" in stderr, stderr
    check_outputs(read_manifest(manifest), inputs_of(dataset), out)
    with pytest.raises(ProcessLookupError):
        os.kill(pids[busy[0]], 0)


def test_the_command_killed_mid_run_then_run_again(healthy, dataset, tmp_path):
    out = tmp_path / "out"
    manifest = default_manifest(out)
    args = ("normalize", dataset, "-o", out, "--method", "match", "--reference", dataset / "slides" / "slide0.tif",
            "--scheduler", healthy.address)  # fmt: skip
    process = cli(*args)
    wait_for_rows(process, manifest, 1)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    before = read_manifest(manifest)
    finished = {r["input"]: r for r in before if r["status"] == "ok"}
    assert 0 < len(finished) < 64, "the command was not killed mid-run"
    mtimes = {r["output"]: os.stat(r["output"]).st_mtime_ns for r in finished.values()}

    process = cli(*args)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert f"{64 - len(finished)} of 64 inputs normalized, 0 failed, {len(finished)} skipped" in stderr
    rows = read_manifest(manifest)
    check_outputs(rows, inputs_of(dataset), out)  # every input ok exactly once, every output whole
    again = [r for r in rows[len(before):] if r["input"] in finished]
    assert {r["input"] for r in again} == set(finished) and {r["status"] for r in again} == {"skipped"}
    assert {o: os.stat(o).st_mtime_ns for o in mtimes} == mtimes  # nothing finished was recomputed


def test_list_file_names_cannot_leave_the_output_folder(healthy, dataset, tmp_path, monkeypatch, capsys):
    tiles = sorted((dataset / "jpegs" / "a").glob("*.jpg"))[:6]
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "link").symlink_to(outside)
    names = ["../escape.jpg", str(outside / "abs.jpg"), "a/../../escape2.jpg", "..\\escape3.jpg", "link/x.jpg", "fine/ok.jpg"]
    listing = tmp_path / "lists" / "run.csv"
    listing.parent.mkdir()
    listing.write_text("input,output\n" + "".join(f'{t},"{n}"\n' for t, n in zip(tiles, names)))
    before = sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(out))

    monkeypatch.setenv(SCHEDULER_ENV, healthy.address)  # no --scheduler: the environment names the cluster
    rc = main(["normalize", "--list", str(listing), "-o", str(out), "--method", "stretch"])
    err = capsys.readouterr().err
    assert rc == 1 and f"Dask cluster at {healthy.address}" in err
    rows = {r["output"] or r["input"]: r for r in read_manifest(default_manifest(out))}
    assert rows[str(out / "fine" / "ok.jpg")]["status"] == "ok"
    assert sum(r["status"] == "error" for r in rows.values()) == 5
    assert "outside the output folder" in rows[str(tiles[4])]["error"]  # the symbolic link, refused by the worker
    after = sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(out))
    assert after == sorted(before + [default_manifest(out)])  # nothing written outside but the manifest beside it
    assert os.listdir(outside) == []
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["fine", "fine/ok.jpg", "link"]


#: A task that kills its worker process when it meets the file "crash" (as a decoder crash would). Made
#: by ``exec`` in a module that workers cannot import, so that it travels by value (cloudpickle).
_CRASH = """
def crash_on(job, items):
    import os
    if "crash" in items:
        os._exit(13)
    return [(item, job) for item in items]
"""


def test_a_file_that_kills_its_worker_is_isolated_then_an_error(healthy):
    namespace = {"__name__": "vipsnorm_test_crash"}
    exec(_CRASH, namespace)
    results = []
    with healthy.client() as client:
        runner = DaskRunner(client)
        runner.run(namespace["crash_on"], "job", [["a", "crash", "b"], ["c"]], results.extend, lambda item, cause: (item, cause))
        client.wait_for_workers(2, timeout=60)
    by_item = dict(results)
    assert sorted(by_item) == ["a", "b", "c", "crash"]
    assert by_item["a"] == by_item["b"] == by_item["c"] == "job"  # the crash's task companions, rerun alone
    assert "worker process died on every attempt" in by_item["crash"]


#: Tasks that note, in the folder ``job``, the key and worker process of every run of the file "x" (then
#: wait ``slow`` seconds), and a hook of the scheduler that drops the result of each of those runs as it
#: arrives: ``lose`` does what the scheduler does when the worker holding a result dies (the result is
#: ``lost``), ``forget`` what it does to a task it no longer knows (``cancelled``). The drop follows the
#: worker's report at once, so that the client hears of both together and never fetches the result.
#: Made by ``exec``, like ``_CRASH``, so that all of it travels by value.
_DROP = """
import os, time

def note_x(job, items):
    folder, slow = job
    if "x" in items:
        from distributed import get_worker
        with open(os.path.join(folder, "x.runs"), "a") as f:
            f.write(f"{get_worker().get_current_task()} {os.getpid()}\\n")
        time.sleep(slow)
    return list(items)

def runs_of_x(folder):
    try:
        with open(os.path.join(folder, "x.runs")) as f:
            return [line.split() for line in f]
    except FileNotFoundError:
        return []

def drop_x(folder, how, dask_scheduler):
    original = dask_scheduler.stream_handlers["task-finished"]

    def task_finished(key, **msg):
        original(key=key, **msg)
        ts = dask_scheduler.tasks.get(key)
        if ts is None or ts.state != "memory" or key not in {k for k, _ in runs_of_x(folder)}:
            return
        if how == "lose":
            dask_scheduler.transitions({key: "released"}, stimulus_id=f"test-lose-{time.time()}")
        else:
            for cs in list(ts.who_wants or ()):
                dask_scheduler.stimulus_cancel([key], cs.client_key, True, "test", "forgotten by the test")

    task_finished.original = original
    dask_scheduler.stream_handlers["task-finished"] = task_finished

def stop_dropping(dask_scheduler):
    handler = dask_scheduler.stream_handlers["task-finished"]
    dask_scheduler.stream_handlers["task-finished"] = getattr(handler, "original", handler)
"""


def _drop_namespace() -> dict:
    namespace = {"__name__": "vipsnorm_test_drop"}
    exec(_DROP, namespace)
    return namespace


def test_a_result_lost_with_its_worker_is_computed_again(healthy, tmp_path):
    """The worker that ran "x" is killed after x finished and before this client fetched the result
    (while it records y's results, as on a slow disk): x's future is ``lost``, and x is run again, once,
    instead of the batch ending; y, recorded already, is not."""
    ns = _drop_namespace()
    results, killed = [], []

    def record(rows: list) -> None:
        results.extend(rows)
        if rows != ["y"]:
            return
        deadline = time.monotonic() + 30
        while not ns["runs_of_x"](str(tmp_path)) or client.futures.get(ns["runs_of_x"](str(tmp_path))[0][0]) is None:
            assert time.monotonic() < deadline, "x never ran"
            time.sleep(0.01)
        key, pid = ns["runs_of_x"](str(tmp_path))[0]
        state = client.futures[key]
        while state.status != "finished":  # x's result is ready on its worker; this client has not fetched it
            assert time.monotonic() < deadline, f"x did not finish ({state.status})"
            time.sleep(0.01)
        os.kill(int(pid), signal.SIGKILL)
        killed.append(pid)
        while state.status != "lost":  # the scheduler saw the worker go, and told this client
            assert time.monotonic() < deadline, f"x's result was not lost ({state.status})"
            time.sleep(0.01)

    with healthy.client() as client:
        runner = DaskRunner(client)
        runner.run(ns["note_x"], (str(tmp_path), 1.0), [["y"], ["x"]], record, lambda item, cause: (item, cause))
        assert runner.allowed_failures() == ALLOWED_FAILURES  # the scheduler's, not this process's (3)
    assert killed
    assert sorted(results) == ["x", "y"]  # each recorded once: x from its second run
    runs = ns["runs_of_x"](str(tmp_path))
    assert len({key for key, _ in runs}) == 2 and runs[-1][1] != killed[0]


@pytest.mark.parametrize(("how", "cause"), [("lose", "holding this file's finished result died"), ("forget", "dropped this file's task")])
def test_a_result_dropped_on_every_attempt_ends_as_an_error(healthy, tmp_path, how, cause):
    """A task whose result never arrives is submitted again ``allowed-failures`` times, then its file is
    run alone as many times more, then it is an error; the other tasks are recorded once each."""
    ns = _drop_namespace()
    results = []
    with healthy.client() as client:
        client.run_on_scheduler(ns["drop_x"], str(tmp_path), how)
        try:
            runner = DaskRunner(client)
            groups = [["a", "b"], ["x", "c"], ["d"]]
            runner.run(ns["note_x"], (str(tmp_path), 0.0), groups, results.extend, lambda item, cause: (item, cause))
        finally:
            client.run_on_scheduler(ns["stop_dropping"])
    by_item = {}
    for row in results:
        by_item.setdefault(row if isinstance(row, str) else row[0], []).append(row)
    assert sorted(by_item) == ["a", "b", "c", "d", "x"] and all(len(rows) == 1 for rows in by_item.values())
    assert by_item["c"] == ["c"]  # x's companion, run alone, done
    assert cause in by_item["x"][0][1]
    # x with c, then x alone: each submitted once and again ALLOWED_FAILURES times, under fresh keys
    keys = {key for key, _ in ns["runs_of_x"](str(tmp_path))}
    assert len(keys) == 2 * (1 + ALLOWED_FAILURES)


def test_a_cluster_without_workers_is_waited_for_and_said_so(tmp_path, monkeypatch, capsys):
    """No worker yet: one line on stderr after WAIT_NOTICE seconds, and the batch runs when one joins."""
    import threading

    from distributed import LocalCluster
    from distributed.diagnostics.plugin import WorkerPlugin

    from vipsnorm.batch import cluster as cluster_module

    monkeypatch.setattr(cluster_module, "WAIT_NOTICE", 0.5)
    ns = _drop_namespace()
    results = []
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as local, Client(local) as client:
        # no libvips settings: a worker in this process would change them for the tests that follow
        runner = DaskRunner(client, settings=WorkerPlugin())
        joins = threading.Timer(3.0, local.scale, [1])
        joins.start()
        try:
            runner.run(ns["note_x"], (str(tmp_path), 0.0), [["a"], ["b"]], results.extend, lambda item, cause: (item, cause))
        finally:
            joins.cancel()
        address = client.scheduler.address
    assert sorted(results) == ["a", "b"]
    notices = [line for line in capsys.readouterr().err.splitlines() if "waiting for workers" in line]
    notice = (
        f"vipsnorm: waiting for workers on {address}: the Dask cluster has none; the batch goes on when one "
        "joins (Ctrl-C stops it, running it again resumes)"
    )
    assert notices == [notice]


def test_fit_in_parallel_equals_fit_files(healthy, dataset, tmp_path):
    """Per-file samples on the workers, combined here in input order: the same reference as in one process."""
    with healthy.client() as client:
        for method, folders in (("match", ["slides", "jpegs/a"]), ("macenko", ["slides"])):
            reference, results = fit_batch([dataset / f for f in folders], method, client=client)
            expected, _ = fit_files([p for f in folders for p in inputs_of(dataset / f)], method)
            assert reference.to_dict() == expected.to_dict()
            assert len(results) == len(reference.inputs) == (34 if method == "match" else 4)
            assert all(r.status == "ok" for r in results)


def test_default_is_a_local_cluster(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    rng = np.random.default_rng(0)
    for i in range(70):  # more than one task's worth of files
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        pyvips.Image.new_from_array(pixels).copy(interpretation="srgb").pngsave(str(tmp_path / f"p{i:02d}.png"))
    rc = main(["normalize", str(tmp_path), "-o", str(tmp_path / "out"), "--method", "stretch"])
    err = capsys.readouterr().err
    from vipsnorm.batch.cluster import machine

    n = min(machine()[0], 70)
    assert rc == 0 and f"(local Dask cluster, {n} worker{'s' if n > 1 else ''})" in err
    rows = read_manifest(default_manifest(tmp_path / "out"))
    assert len(rows) == 70 and all(r["worker"].startswith("tcp://") for r in rows)
    assert len({r["worker"] for r in rows}) == n


def test_local_cluster_workers_are_spawned_with_the_libvips_settings():
    from vipsnorm.batch.cluster import DaskRunner, VipsSettings, start_local

    client, cluster = start_local(1, 1)
    try:
        DaskRunner(client, settings=VipsSettings(1))
        (info,) = client.run(_worker_info).values()
    finally:
        client.close()
        cluster.close()
    assert "spawn_main" in info["cmdline"]  # spawned, not forked from this process
    assert info["env"] == {"VIPS_CONCURRENCY": "1", "MALLOC_TRIM_THRESHOLD_": None}
    assert info["vips"] == (1, 64 << 20, 16)


def _worker_info() -> dict:
    import psutil

    return {
        "cmdline": " ".join(psutil.Process().cmdline()),
        "env": {k: os.environ.get(k) for k in ("VIPS_CONCURRENCY", "MALLOC_TRIM_THRESHOLD_")},
        "vips": (pyvips.concurrency_get(), pyvips.cache_get_max_mem(), pyvips.cache_get_max_files()),
    }


def test_patches_run_on_the_cluster_as_in_process(healthy, dataset, tmp_path):
    """``vipsnorm patches`` sends one task per slide to the cluster; the patches, their files and the
    coordinates table are those of the same run in this process."""
    from vipsnorm.training.cli import main as patches_main

    slides = sorted((dataset / "slides").glob("*.tif"))[:3]
    common = ["--size", "128", "--stride", "512", "--method", "equalize", "--format", "npy"]
    assert patches_main([*map(str, slides), "-o", str(tmp_path / "local"), *common, "--workers", "0"]) == 0
    assert patches_main([*map(str, slides), "-o", str(tmp_path / "dask"), *common, "--scheduler", healthy.address]) == 0
    local = (tmp_path / "local" / "patches.csv").read_text()
    assert local.count("\n") > 3 and local == (tmp_path / "dask" / "patches.csv").read_text()
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*.npy"))
    assert files == sorted(p.relative_to(tmp_path / "dask") for p in (tmp_path / "dask").rglob("*.npy"))
    for f in files:
        np.testing.assert_array_equal(np.load(tmp_path / "local" / f), np.load(tmp_path / "dask" / f))
