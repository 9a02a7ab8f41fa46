"""The README's first command: the demo runs end to end and really brings the labs together."""

from __future__ import annotations

import re

import openslide

from vipsnorm.cli import main


def test_demo_matches_labs_onto_one_palette(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path), "--size", "1536"]) == 0
    out = capsys.readouterr().out
    before, after = map(float, re.search(r"([\d.]+) grey levels before, ([\d.]+) after", out).groups())
    assert after < before / 4
    outputs = sorted((tmp_path / "normalized").glob("*.tif"))
    assert len(outputs) == 4
    for path in outputs:
        osr = openslide.OpenSlide(str(path))
        assert osr.level_count > 1 and float(osr.properties["openslide.mpp-x"]) == 0.25
