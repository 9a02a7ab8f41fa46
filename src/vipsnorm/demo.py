"""``vipsnorm demo``: synthetic slides from differently tinted "labs", normalized onto one palette."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .engine import Options, build_method, load_reference, normalize_file
from .io.slide import open_slide
from .sampling import sample_slide
from .synth import write_synthetic_slide

__all__ = ["run_demo"]

LABS = ("reference", "pale-blue", "dark-pink", "yellow")


def _tissue_mean(path: Path) -> np.ndarray:
    with open_slide(path) as slide:
        sample = sample_slide(slide, n_tiles=64)
    values = np.arange(256)
    return (sample.hist[:3] * values).sum(axis=1) / sample.hist[:3].sum(axis=1)


def run_demo(folder: Path, size: int = 4096) -> int:
    """Generate one slide per lab, fit the palette of the "reference" lab, match every slide onto it."""
    folder = Path(folder)
    inputs, outputs = folder / "input", folder / "normalized"
    inputs.mkdir(parents=True, exist_ok=True)
    outputs.mkdir(parents=True, exist_ok=True)
    print(f"generating {len(LABS)} synthetic H&E slides of {size}x{size} in {inputs}/ ...")
    slides = [
        write_synthetic_slide(inputs / f"{lab}.tif", size, size, lab=lab, seed=i, mpp=0.25)
        for i, lab in enumerate(LABS)
    ]
    options = Options()
    reference = load_reference(slides[0], "match", options)
    method = build_method("match", reference)
    print(f"target palette: tissue of {slides[0].name}; method: histogram matching (per channel)")
    failed = 0
    rows = []
    for path in slides:
        result = normalize_file(path, outputs, method, options=options)
        if result.status != "ok":
            failed += 1
            print(f"error  {result.error}", file=sys.stderr)
            continue
        rows.append((path, result.output, _tissue_mean(path), _tissue_mean(result.output)))
    print()
    print(f"{'lab':<12} {'tissue mean RGB before':>24} {'after':>20}   output")
    for path, out, before, after in rows:
        b = " ".join(f"{v:5.1f}" for v in before)
        a = " ".join(f"{v:5.1f}" for v in after)
        print(f"{path.stem:<12} {b:>24} {a:>20}   {out}")
    if rows:
        spread_before = np.ptp([r[2] for r in rows], axis=0).max()
        spread_after = np.ptp([r[3] for r in rows], axis=0).max()
        print(
            f"\nlargest difference in tissue mean between labs: {spread_before:.1f} grey levels before, "
            f"{spread_after:.1f} after"
        )
    print(f"normalized pyramidal TIFFs (open them in QuPath or OpenSlide): {outputs}/")
    return 1 if failed else 0
