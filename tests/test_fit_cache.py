"""``vipsnorm fit`` keeps each input's summary as it is made, so a rerun samples only new or changed
inputs and fits the same reference as a run from scratch."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from vipsnorm.batch import fit_batch
from vipsnorm.batch import run as batch_run
from vipsnorm.batch.fitcache import SummaryCache, default_cache, fit_config
from vipsnorm.cli import main
from vipsnorm.engine import Options
from vipsnorm.errors import OutputError

TILES = ("henorm-example1.png", "kather-template.jpg", "torchstain-target.png")


@pytest.fixture
def tiles(shared_data, tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in TILES:
        shutil.copyfile(shared_data / "tiles" / name, folder / name)
    return folder


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """Every input the fit samples (in this process: the tests run with --workers 0)."""
    calls: list[str] = []
    real = batch_run.summarize_file

    def summarize_file(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(batch_run, "summarize_file", summarize_file)
    return calls


def fit(capsys, *argv) -> tuple[int, str, str]:
    code = main(["fit", *(str(a) for a in argv), "--workers", "0"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("method", ["macenko", "reinhard", "match", "equalize"])
def test_a_rerun_samples_only_new_or_changed_inputs_and_fits_the_same(tiles, tmp_path, capsys, counted, method):
    ref = tmp_path / "ref.json"
    code, out, _ = fit(capsys, tiles, "--method", method, "-o", ref)
    assert code == 0 and sorted(counted) == sorted(TILES)
    assert default_cache(ref) == tmp_path / "ref.inputs.jsonl" and f"kept in {default_cache(ref)}" in out
    first = ref.read_bytes()

    counted.clear()
    code, out, _ = fit(capsys, tiles, "--method", method, "-o", ref)
    assert code == 0 and counted == [] and "(3 summarized by an earlier run" in out
    assert ref.read_bytes() == first  # the same reference, from the kept summaries alone

    os.utime(tiles / TILES[1], ns=(1, 1))  # a changed input is sampled again, the others are not
    shutil.copyfile(tiles / TILES[0], tiles / "new.png")  # and a new one
    counted.clear()
    assert fit(capsys, tiles, "--method", method, "-o", ref)[0] == 0
    assert sorted(counted) == sorted([TILES[1], "new.png"])
    fresh = tmp_path / "fresh.json"
    assert fit(capsys, tiles, "--method", method, "-o", fresh, "--cache", tmp_path / "other.jsonl")[0] == 0
    assert ref.read_bytes() == fresh.read_bytes()  # kept and new summaries: what a run from scratch fits


def test_other_settings_and_overwrite_sample_everything_again(tiles, tmp_path, capsys, counted):
    ref = tmp_path / "ref.json"
    assert fit(capsys, tiles, "--method", "macenko", "-o", ref)[0] == 0
    counted.clear()
    assert fit(capsys, tiles, "--method", "macenko", "--seed", "1", "-o", ref)[0] == 0
    assert sorted(counted) == sorted(TILES)
    counted.clear()
    assert fit(capsys, tiles, "--method", "macenko", "-o", ref, "--overwrite")[0] == 0
    assert sorted(counted) == sorted(TILES)
    counted.clear()
    assert fit(capsys, tiles, "--method", "macenko", "-o", ref)[0] == 0 and counted == []


def test_a_line_cut_short_by_a_kill_is_dropped_and_errors_are_retried(tiles, tmp_path, capsys, counted):
    ref = tmp_path / "ref.json"
    (tiles / "broken.png").write_bytes(b"not a png")
    code, _, err = fit(capsys, tiles, "--method", "match", "-o", ref)
    assert code == 1 and "broken.png" in err
    cache = default_cache(ref)
    lines = cache.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3  # errors are not kept
    cache.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed while writing the last
    counted.clear()
    code, _, _ = fit(capsys, tiles, "--method", "match", "-o", ref)
    assert code == 1 and sorted(counted) == sorted([Path(json.loads(lines[2])["input"]).name, "broken.png"])
    assert all(json.loads(line) for line in cache.read_bytes().splitlines())  # the torn line is gone
    assert len(cache.read_bytes().splitlines()) == 3


def test_one_fit_at_a_time_per_cache(tiles, tmp_path):
    cache = tmp_path / "c.jsonl"
    config = fit_config("match", {}, Options())
    with SummaryCache.open(cache, config):
        with pytest.raises(OutputError, match="another vipsnorm fit is using this file"):
            fit_batch([tiles], "match", cache=cache, workers=0)


@pytest.mark.parametrize(
    "content",
    [b"input,output\na.jpg,x\nb.jpg,y", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)), b'{"a": 1}\n{"b"'],
    ids=["csv-without-final-newline", "jpeg", "other-json-lines"],
)
def test_a_file_that_is_not_a_cache_is_refused_and_left_unchanged(tiles, tmp_path, capsys, counted, content):
    cache = tmp_path / "todo.csv"
    cache.write_bytes(content)
    code, _, err = fit(capsys, tiles, "--method", "match", "-o", tmp_path / "ref.json", "--cache", cache)
    assert code != 0 and counted == [] and not (tmp_path / "ref.json").exists()
    assert err.strip().splitlines()[-1].endswith(
        f"{cache}: is not a file of fitted inputs of vipsnorm fit (its first line is not one of its records); "
        "left unchanged: give --cache a new file name, or delete this file if it is a damaged one"
    )
    assert cache.read_bytes() == content
    with pytest.raises(OutputError, match="is not a file of fitted inputs"):
        SummaryCache.open(cache, fit_config("match", {}, Options()), reuse=False)
    assert cache.read_bytes() == content


def test_a_first_line_cut_short_by_a_kill_is_still_a_cache(tiles, tmp_path, capsys, counted):
    ref = tmp_path / "ref.json"
    assert fit(capsys, tiles, "--method", "match", "-o", ref)[0] == 0
    cache = default_cache(ref)
    first = cache.read_bytes().splitlines(keepends=True)[0]
    cache.write_bytes(first[: len(first) // 2])  # killed while writing the first summary
    counted.clear()
    assert fit(capsys, tiles, "--method", "match", "-o", ref)[0] == 0 and sorted(counted) == sorted(TILES)
    assert len(cache.read_bytes().splitlines()) == 3 and all(json.loads(x) for x in cache.read_bytes().splitlines())
