"""Shared fixtures: the real test data folder (skipped when absent) and small synthetic slides."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tifffile

#: ../shared/data from the repository root (CI has the same layout). Never copied into the project.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-image folder, or skip the test with the reason."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA} (expected ../shared/data from the repo root)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_slide(tmp_path_factory) -> Path:
    """A 2048x1536 synthetic H&E pyramidal TIFF (JPEG tiles, mpp 0.25, half tissue)."""
    from vipsnorm.synth import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("slides") / "small.tif", 2048, 1536, seed=0)


@pytest.fixture(scope="session")
def glass_slide(tmp_path_factory) -> Path:
    """A 1024x768 all-glass synthetic pyramidal TIFF (tissue=0): nothing to fit on."""
    from vipsnorm.synth import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("slides") / "glass.tif", 1024, 768, tissue=0)


@pytest.fixture(scope="session")
def damaged_svs(shared_data, tmp_path_factory) -> Path:
    """CMU-1-Small-Region.svs with the second half of JPEG tile 0 of level 0 zeroed (a corner tile: the
    centre window probed at open time stays whole, so only reading the pixels can find it)."""
    path = tmp_path_factory.mktemp("damaged") / "damaged.svs"
    shutil.copyfile(shared_data / "slides" / "CMU-1-Small-Region.svs", path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    with open(path, "r+b") as f:
        f.seek(offset + count // 2)
        f.write(b"\0" * (count - count // 2))
    return path
