"""The manifest (CSV, appended row by row) and resuming from it, run in this process (``workers=0``)."""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import pyvips

import vipsnorm
from vipsnorm.batch import COLUMNS, Manifest, default_manifest, fit_batch, normalize_batch, read_manifest
from vipsnorm.batch.inputs import Item
from vipsnorm.batch import run as run_module
from vipsnorm.batch.run import NormalizeJob, config_hash
from vipsnorm.engine import Options, build_method, fit_files
from vipsnorm.errors import OutputError
from vipsnorm.methods import METHODS, Sample


def write_png(path: Path, seed: int, size: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(20 + seed, 200, (size, size, 3), dtype=np.uint8)
    pyvips.Image.new_from_array(pixels).copy(interpretation="srgb").pngsave(str(path))
    return path


@pytest.fixture()
def images(tmp_path) -> Path:
    root = tmp_path / "in"
    for i in range(3):
        write_png(root / f"s{i % 2}" / f"im{i}.png", i)
    (root / "s1" / "bad.png").write_text("not a PNG")
    return root


def run(inputs, out, **kw):
    rows = []
    summary = normalize_batch(inputs, out, kw.pop("method", vipsnorm.Stretch()), workers=0, on_row=rows.append, **kw)
    return summary, rows


def rows_by_input(manifest: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in read_manifest(manifest):
        out.setdefault(row["input"], []).append(row)
    return out


# --------------------------------------------------------------------------------------------------
# the file itself


def test_rows_round_trip_with_quotes_commas_and_line_breaks(tmp_path):
    path = tmp_path / "m.csv"
    with Manifest.open(path) as book:
        book.append([{"input": "/a,b.png", "status": "ok", "params": json.dumps({"x": [1, 2], "s": 'say "hi"'})},
                     {"input": "/c.png", "status": "error", "error": "line one\nline two", "seconds": 0.25}])  # fmt: skip
    text = path.read_text()
    assert text.splitlines()[0] == ",".join(COLUMNS)
    assert len(text.splitlines()) == 3  # one line per row, always
    first, second = read_manifest(path)
    assert first["input"] == "/a,b.png" and json.loads(first["params"]) == {"x": [1, 2], "s": 'say "hi"'}
    assert second["error"] == "line one line two" and second["seconds"] == "0.25"
    assert first["time"].endswith("Z")


def test_a_row_cut_short_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "m.csv"
    with Manifest.open(path) as book:
        book.append([{"input": "/a.png", "status": "ok"}])
    with open(path, "a") as f:
        f.write('run,time,/b.png,12,"{""half')  # no newline: the write was cut short
    assert [r["input"] for r in read_manifest(path)] == ["/a.png"]
    with Manifest.open(path) as book:
        assert set(book.finished) == {"/a.png"}
        book.append([{"input": "/c.png", "status": "ok"}])
    assert [r["input"] for r in read_manifest(path)] == ["/a.png", "/c.png"]
    assert path.read_text().endswith("\n")


def test_one_run_at_a_time(tmp_path):
    path = tmp_path / "m.csv"
    with Manifest.open(path):
        with pytest.raises(OutputError, match="another vipsnorm run"):
            Manifest.open(path)
    Manifest.open(path).close()  # released


def test_another_csv_is_not_taken_for_a_manifest(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("name,value\na,1\n")
    with pytest.raises(OutputError, match="not a vipsnorm manifest"):
        Manifest.open(path)
    assert path.read_text() == "name,value\na,1\n"


@pytest.mark.parametrize(
    "content",
    [
        b"input,output\na.jpg,x\nb.jpg,y",  # a list exported without a final newline
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\n\x00\x89\xfe",  # an image, a newline in its bytes
        b"\xff\xd8\xff\xe0\x00\x10JFIF",  # and one without
        b"run,time,input\n1,2,3\n",  # a CSV with some of the columns only
    ],
)
def test_a_file_that_is_not_a_manifest_is_left_unchanged(tmp_path, content):
    path = tmp_path / "given"
    path.write_bytes(content)
    with pytest.raises(OutputError, match="is not a vipsnorm manifest .*; left unchanged: choose another --manifest"):
        Manifest.open(path)
    assert path.read_bytes() == content  # not cut back to its last newline, nothing appended


def test_the_command_refuses_a_file_that_is_not_a_manifest_with_one_line(images, tmp_path, capsys):
    from vipsnorm.cli import main

    todo = tmp_path / "todo.csv"
    todo.write_bytes(b"input,output\na.jpg,x\nb.jpg,y")
    rc = main(["normalize", str(images), "-o", str(tmp_path / "out"), "--workers", "0", "--manifest", str(todo)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(todo) in err[0] and "is not a vipsnorm manifest" in err[0]
    assert todo.read_bytes() == b"input,output\na.jpg,x\nb.jpg,y"
    assert not list((tmp_path / "out").rglob("*.png"))  # refused before any work


class FullDisk:
    """A manifest's file on a full disk: every write (and the flush of a close) fails with ENOSPC."""

    def __init__(self, file):
        self.file = file

    def __getattr__(self, name):
        return getattr(self.file, name)

    def write(self, text=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    flush = write


def test_write_errors_name_the_manifest_and_its_close_never_hides_the_first(tmp_path):
    """Before: a bare OSError ('No space left on device', no file named)."""
    path = tmp_path / "m.csv"
    cause = f"{path}: cannot write the manifest (No space left on device); once it can be, run the command again"
    with pytest.raises(OutputError) as caught:
        with Manifest.open(path) as book:
            book._file = FullDisk(book._file)
            book.append([{"input": "/a.jpg", "status": "ok"}])
    assert str(caught.value).startswith(cause)  # the append's error, not the failing close's
    assert book._file.file.closed
    with Manifest.open(path) as book:  # released: the lock went with the file
        book._file = FullDisk(book._file)
        with pytest.raises(OutputError) as caught:
            book.close()  # (its last sync)
        assert str(caught.value).startswith(cause)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_a_manifest_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo, link = tmp_path / "fifo.csv", tmp_path / "null.csv"
    os.mkfifo(fifo)
    link.symlink_to(os.devnull)
    for path in (fifo, link, Path(os.devnull)):
        with pytest.raises(OutputError) as caught:
            Manifest.open(path)  # (a FIFO with no writer: never blocks)
        assert str(caught.value) == (
            f"{path}: cannot open the manifest (not a regular file: a FIFO, device or socket); choose another --manifest"
        )


def test_a_header_cut_short_by_a_kill_is_repaired(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(",".join(COLUMNS)[:25])  # the very first write of a new manifest, cut short
    with Manifest.open(path) as book:
        book.append([{"input": "/a.png", "status": "ok"}])
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert [r["input"] for r in read_manifest(path)] == ["/a.png"]


def test_done_requires_the_very_output_file_the_worker_put_in_place(tmp_path):
    (tmp_path / "out").mkdir()
    src, out = write_png(tmp_path / "a.png", 0), write_png(tmp_path / "out" / "a.png", 1)
    root, st, put = tmp_path / "out", src.stat(), out.stat()
    item = Item(0, str(src), "", "a", st.st_size, st.st_mtime_ns)
    row = {"input": str(src), "input_size": st.st_size, "input_mtime_ns": st.st_mtime_ns, "output": str(out),
           "output_size": put.st_size, "status": "ok", "config": "c1"}  # fmt: skip
    identity = {"output_ino": put.st_ino, "output_mtime_ns": put.st_mtime_ns}
    other = tmp_path / "other.png"  # another run's output of the same size, renamed into place
    other.write_bytes(out.read_bytes()[::-1])
    with Manifest.open(tmp_path / "m.csv") as book:
        book.append([{**row, **identity}])
        assert book.done(item, "c1", root) is not None
        assert book.done(item, "c1", root).output_ino == str(put.st_ino)  # carried into "skipped" rows
        os.utime(out, ns=(put.st_atime_ns, put.st_mtime_ns + 1000))  # touched (or written in place)
        assert book.done(item, "c1", root) is None
        os.utime(out, ns=(put.st_atime_ns, put.st_mtime_ns))
        assert book.done(item, "c1", root) is not None
        os.replace(other, out)
        assert out.stat().st_size == put.st_size
        assert book.done(item, "c1", root) is None  # same size, same place: not the file recorded
        # a row written before the identity was recorded falls back to the size (documented)
        book.append([dict(row)])
        assert book.done(item, "c1", root) is not None
    with Manifest.open(tmp_path / "m.csv") as book:  # the same read back
        assert book.done(item, "c1", root) is not None
        book.append([{**row, **identity}])
    with Manifest.open(tmp_path / "m.csv") as book:
        assert book.done(item, "c1", root) is None


def test_a_manifest_begun_before_the_identity_columns_still_resumes(images, tmp_path):
    out = tmp_path / "out"
    run([images], out)
    manifest = default_manifest(out)
    old_columns = [c for c in COLUMNS if c not in ("output_ino", "output_mtime_ns")]
    rows = read_manifest(manifest)
    with open(manifest, "w", newline="") as f:  # as an earlier vipsnorm wrote it
        writer = csv.DictWriter(f, old_columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    summary, _ = run([images], out)
    assert (summary.ok, summary.error, summary.skipped) == (0, 1, 3)
    assert manifest.read_text().splitlines()[0] == ",".join(old_columns)  # its header is kept


def test_done_requires_ok_same_config_same_input_and_whole_output_in_place(tmp_path):
    (tmp_path / "out").mkdir()
    src, out = write_png(tmp_path / "a.png", 0), write_png(tmp_path / "out" / "a.png", 1)
    root = tmp_path / "out"
    st = src.stat()
    item = Item(0, str(src), "", "a", st.st_size, st.st_mtime_ns)
    row = {"input": str(src), "input_size": st.st_size, "input_mtime_ns": st.st_mtime_ns, "output": str(out),
           "output_size": out.stat().st_size, "status": "ok", "config": "c1"}  # fmt: skip
    with Manifest.open(tmp_path / "m.csv") as book:
        assert book.done(item, "c1", root) is None
        book.append([dict(row)])
        assert book.done(item, "c1", root).output == str(out)
        assert book.done(item, "c2", root) is None  # other settings
        assert book.done(Item(0, str(src), "", "a", st.st_size + 1, st.st_mtime_ns), "c1", root) is None
        assert book.done(Item(0, str(src), "", "a", st.st_size, st.st_mtime_ns + 1), "c1", root) is None
        # the output is not where this run puts it: another -o, another sub-folder, another name
        assert book.done(item, "c1", tmp_path / "elsewhere") is None
        assert book.done(Item(0, str(src), "sub", "a", st.st_size, st.st_mtime_ns), "c1", root) is None
        assert book.done(Item(0, str(src), "", "b", st.st_size, st.st_mtime_ns), "c1", root) is None
        book.append([{**row, "status": "skipped"}])
        assert book.done(item, "c1", root) is not None  # skipped = still finished
        with open(out, "ab") as f:
            f.write(b"more")
        assert book.done(item, "c1", root) is None  # the output is not the one recorded
        book.append([{**row, "output_size": out.stat().st_size}])
        out.unlink()
        assert book.done(item, "c1", root) is None
        write_png(out, 1)
        book.append([{**row, "status": "error"}])
        assert book.done(item, "c1", root) is None  # the last word is an error
    with Manifest.open(tmp_path / "m.csv") as book:  # the same state read back
        assert book.done(item, "c1", root) is None and str(src) not in book.finished


# --------------------------------------------------------------------------------------------------
# settings: hashed, picklable


def test_config_hash_changes_with_every_setting():
    base = config_hash(vipsnorm.Stretch(), None, Options())
    assert base == config_hash(vipsnorm.Stretch(), None, Options(overwrite=False))  # not a setting of the output
    others = {
        config_hash(vipsnorm.Stretch(low=1), None, Options()),
        config_hash(vipsnorm.Equalize(), None, Options()),
        config_hash(vipsnorm.Stretch(), None, Options(quality=80)),
        config_hash(vipsnorm.Stretch(), None, Options(seed=1)),
        config_hash(vipsnorm.Stretch(), vipsnorm.Stretch().fit(Sample.from_array(write_png_array())), Options()),
    }
    assert base not in others and len(others) == 5
    # the default compression (None) hashes as "jpeg", the default before None existed: runs begun
    # then resume (the hash such a version recorded, rebuilt)
    opts = {k: v for k, v in dataclasses.asdict(Options()).items() if k != "overwrite"}
    legacy = {"method": "stretch", "state": run_module._canonical(vipsnorm.Stretch()), "params": None,
              "options": {**opts, "compression": "jpeg"}}  # fmt: skip
    assert base == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
    # but "jpeg" given explicitly writes ordinary TIFFs JPEG-compressed, where the default writes
    # deflate: another setting
    explicit = config_hash(vipsnorm.Stretch(), None, Options(compression="jpeg"))
    assert len({base, explicit, config_hash(vipsnorm.Stretch(), None, Options(compression="deflate"))}) == 3
    target = Sample.from_array(np.arange(256, dtype=np.uint8).reshape(16, 16))
    other = Sample.from_array(np.arange(1, 257, dtype=np.uint16).clip(0, 255).astype(np.uint8).reshape(16, 16))
    assert config_hash(vipsnorm.Match(target), None, Options()) != config_hash(vipsnorm.Match(other), None, Options())


def test_an_explicit_jpeg_compression_redoes_tiffs_the_default_wrote_with_deflate(tmp_path):
    """Ordinary images written as TIFF: the default is deflate, ``--compression jpeg`` JPEG-compressed
    TIFF; a resume must not take one for the other (before, both hashed alike and the rerun skipped)."""
    for i in range(2):
        write_png(tmp_path / "in" / f"im{i}.png", i)
    out, default, jpeg = tmp_path / "out", Options(format="tiff"), Options(format="tiff", compression="jpeg")

    def compressions() -> set[int]:  # the TIFF Compression tag: 8 deflate, 7 JPEG
        import tifffile

        found = set()
        for path in out.glob("*.tif"):
            with tifffile.TiffFile(path) as tif:
                found.add(int(tif.pages[0].compression))
        return found

    assert normalize_batch([tmp_path / "in"], out, vipsnorm.Stretch(), options=default, workers=0).ok == 2
    assert compressions() == {8}
    summary = normalize_batch([tmp_path / "in"], out, vipsnorm.Stretch(), options=jpeg, workers=0)
    assert (summary.ok, summary.skipped) == (2, 0) and compressions() == {7}
    summary = normalize_batch([tmp_path / "in"], out, vipsnorm.Stretch(), options=jpeg, workers=0)
    assert (summary.ok, summary.skipped) == (0, 2)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_job_pickles_with_the_same_config(name, tmp_path):
    """Workers receive the method by pickle: it must arrive whole and hash the same there."""
    sample = Sample.from_array(write_png_array())
    cls = METHODS[name]
    if cls.requires_reference:
        method = build_method(name, vipsnorm.Reference(target=cls(None).fit_target([sample]), method=name))
    else:
        method = build_method(name)
    job = NormalizeJob(str(tmp_path), method, None, Options())
    back = pickle.loads(pickle.dumps(job))
    assert type(back.method) is type(method)
    assert config_hash(back.method, None, back.options) == config_hash(method, None, job.options)
    if not METHODS[name].spatial:
        params = method.fit(sample)
        assert pickle.loads(pickle.dumps(params)) == params


def write_png_array() -> np.ndarray:
    rng = np.random.default_rng(0)
    he = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    c = rng.gamma(2.0, 0.4, (64 * 64, 2))
    return np.clip(240 * np.exp(-c @ he), 0, 255).astype(np.uint8).reshape(64, 64, 3)


# --------------------------------------------------------------------------------------------------
# resuming


def test_first_run_then_resume(images, tmp_path):
    out = tmp_path / "out"
    summary, rows = run([images], out)
    manifest = default_manifest(out)
    assert manifest == tmp_path / "out.manifest.csv" and summary.manifest == manifest
    assert (summary.ok, summary.error, summary.skipped) == (3, 1, 0) and summary.engine == "in-process"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["s0", "s0/im0.png", "s0/im2.png", "s1", "s1/im1.png"]
    recorded = rows_by_input(manifest)
    assert len(recorded) == 4 and all(len(v) == 1 for v in recorded.values())
    ok = recorded[str(images / "s0" / "im0.png")][0]
    assert ok["status"] == "ok" and ok["output"] == str(out / "s0" / "im0.png")
    assert int(ok["output_size"]) == (out / "s0" / "im0.png").stat().st_size
    assert json.loads(ok["params"])["method"] == "stretch" and ok["method"] == "stretch"
    assert ok["backend"] == "libvips" and ok["levels"] == "48x48" and ok["worker"] == "in-process"
    bad = recorded[str(images / "s1" / "bad.png")][0]
    assert bad["status"] == "error" and str(images / "s1" / "bad.png") in bad["error"] and bad["output"] == ""
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    summary, rows = run([images], out)  # the same command again: only the error is retried
    assert (summary.ok, summary.error, summary.skipped) == (0, 1, 3)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert {r["output"] for r in skipped} == {str(p) for p in mtimes}
    recorded = rows_by_input(manifest)
    assert all([r["status"] for r in v] == ["ok", "skipped"] for k, v in recorded.items() if "bad" not in k)


def test_what_changed_is_redone(images, tmp_path):
    out = tmp_path / "out"
    run([images], out)
    im0, im1, im2 = images / "s0" / "im0.png", images / "s1" / "im1.png", images / "s0" / "im2.png"
    write_png(im0, 7)  # a new input under the same name
    (out / "s1" / "im1.png").unlink()  # an output deleted
    with open(out / "s0" / "im2.png", "ab") as f:  # an output changed
        f.write(b"\0")
    summary, rows = run([images], out)
    redone = {r["input"] for r in rows if r["status"] == "ok"}
    assert redone == {str(im0), str(im1), str(im2)} and summary.skipped == 0
    assert read_png(out / "s0" / "im2.png").shape == (48, 48, 3)

    summary, rows = run([images], out, method=vipsnorm.Stretch(low=5))  # other settings: everything again
    assert summary.ok == 3 and summary.skipped == 0
    summary, rows = run([images], out, method=vipsnorm.Stretch(low=5), overwrite=True)  # forced
    assert summary.ok == 3 and summary.skipped == 0
    summary, rows = run([images], out, method=vipsnorm.Stretch(low=5))
    assert summary.ok == 0 and summary.skipped == 3


def read_png(path: Path) -> np.ndarray:
    return pyvips.Image.new_from_file(str(path), fail_on="error").numpy()


def test_leftover_part_file_is_removed_and_never_taken_as_output(images, tmp_path):
    out = tmp_path / "out"
    (out / "s0").mkdir(parents=True)
    part = out / "s0" / ".im0.vipsnorm-part-0badc0de.png"
    part.write_bytes(b"\x89PNG half")  # what a SIGKILL during a write leaves
    summary, _ = run([images], out)
    assert summary.ok == 3 and not part.exists()
    assert not [p for p in out.rglob("*") if ".vipsnorm-part-" in p.name]


def test_fixed_params_are_not_repeated_in_every_row(images, tmp_path):
    params = vipsnorm.Stretch().fit(Sample.from_array(write_png_array()))
    summary, rows = run([images], tmp_path / "out", params=params, reference="dataset.json")
    assert summary.ok == 3
    assert all(json.loads(r["params"]) == params.to_dict() for r in rows if r["status"] == "ok")  # for the caller
    for row in read_manifest(default_manifest(tmp_path / "out")):
        assert row["params"] == "" and row["reference"] == "dataset.json"


def test_manifest_elsewhere_and_list_file(images, tmp_path):
    listing = tmp_path / "run.csv"
    listing.write_text(f"input,output\n{images / 's0' / 'im0.png'},train/first.png\n{images / 's1' / 'im1.png'},\n")
    manifest = tmp_path / "records" / "m.csv"
    manifest.parent.mkdir()
    summary, rows = run([], tmp_path / "out", lists=[listing], manifest=manifest)
    assert summary.ok == 2 and manifest.is_file() and not default_manifest(tmp_path / "out").exists()
    # the second row has no output name: its place below the list file's folder is mirrored
    assert {r["output"] for r in rows} == {str(tmp_path / "out" / "train" / "first.png"), str(tmp_path / "out" / "in" / "s1" / "im1.png")}


def test_no_input_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no input"):
        normalize_batch([], tmp_path / "out", vipsnorm.Stretch(), workers=0)


# --------------------------------------------------------------------------------------------------
# fit


def test_fit_batch_is_fit_files(images, tmp_path):
    paths = sorted(images.rglob("*.png"))
    reference, results = fit_batch([images], "match", workers=0)
    expected, expected_results = fit_files(paths, "match")
    assert reference.inputs == expected.inputs and len(reference.inputs) == 3
    np.testing.assert_array_equal(reference.target.hist, expected.target.hist)
    assert [(str(r.input), r.status) for r in results] == [(str(r.input), r.status) for r in expected_results]
    with pytest.raises(ValueError, match="does not take --grid"):
        fit_batch([images], "stretch", method_options={"grid": (2, 2)}, workers=0)
    assert os.listdir(tmp_path) == ["in"]  # fitting writes nothing
