#!/usr/bin/env python
"""CLAHE benchmark: vipsnorm ``clahe`` against a plain copy, libvips ``hist_local`` and scikit-image.

One synthetic H&E slide (``vipsnorm.synth``, lab "reference", seed 0, 0.25 um/px, pyramidal JPEG Q90
BigTIFF) is generated once and cached in ``--workdir`` (not timed; the cache is shared with
``bench_core.py``). Every case then runs in its own fresh Python process, so that its peak resident memory
(``ru_maxrss``) is its own; the child prints one JSON line.

Cases
-----
``copy``
    The floor: ``vipsnorm.open(slide).level_image(0)`` written as a pyramid (``write_pyramid``: tiled
    BigTIFF, tile 256, JPEG Q90). Nothing is computed.
``clahe``
    What ``vipsnorm normalize --method clahe`` does: ``params = vipsnorm.engine.fit_slide(slide, Clahe(...),
    options)``, i.e. ``Clahe.fit_level`` on the 2x pyramid level (one streaming pass over a quarter of the
    pixels, in two concurrent halves read by two loaders of the level; see ``Clahe.fit_downsample``),
    then ``write_pyramid(Clahe(...).apply(level0, params))``; the fit time is reported separately. Region
    1024 px, clip limit 2, luminance mode.
``clahe --sample exact``
    The same, fitted on level 0 (exact region histograms: one more full-resolution pass).
``clahe --mode rgb``
    The same, one LUT set per channel.
``hist_local``
    libvips' sliding-window AHE on the luma, window = the CLAHE region (1024 px), ``max_slope=2``, on a
    ``--crop`` square of level 0 held in memory; the time is extrapolated linearly to the whole slide
    (hist_local's cost per pixel does not depend on the image size).
``skimage``
    ``skimage.exposure.equalize_adapthist`` on the luma of the same crop (kernel 1024, ``clip_limit=0.01``
    its own normalized clip), extrapolated in the same way. It needs the whole image in memory as float64
    (at least 8 bytes per pixel: 3.2 GB for a 20k slide before its temporaries).

Usage::

    python benchmarks/bench_clahe.py --size 20000 [--crop 2048] [--repeat 1] [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RATIO_GOAL = 2.0
HIST_LOCAL_GOAL = 100.0
RSS_GOAL_MB = 500.0
REGION = 1024
CLIP = 2.0
MB = 1024.0 * 1024.0

CASES = ["copy", "clahe", "clahe --sample exact", "clahe --mode rgb", "hist_local", "skimage"]


# --------------------------------------------------------------------------------------------------
# child: one case, one process


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _child(case: str, slide: str, out_dir: str, crop: int) -> None:
    import pyvips

    import vipsnorm
    from vipsnorm.engine import Options, fit_slide
    from vipsnorm.io.write import write_pyramid
    from vipsnorm.methods._hist import luma_image
    from vipsnorm.methods.clahe import Clahe

    out_dir_path = Path(out_dir)
    out_dir_path.mkdir(parents=True, exist_ok=True)
    out = out_dir_path / (Path(slide).stem + ".tif")
    record: dict = {"case": case}
    s = vipsnorm.open(slide)
    level0 = s.level_image(0)
    pixels = level0.width * level0.height

    cpu0, t0 = _cpu(), time.perf_counter()
    if case == "copy":
        write_pyramid(level0, out, mpp=s.mpp)
    elif case.startswith("clahe"):
        mode = "rgb" if case.endswith("rgb") else "luminance"
        method = Clahe(clip_limit=CLIP, region=REGION, mode=mode)
        # vipsnorm.engine.fit_slide, as the CLI: the 2x level where the regions are large enough (level 0
        # if exact), counted in two concurrent halves from two loaders of it
        level = 0 if "exact" in case else s.best_level_for_downsample(method.fit_downsample(*s.dimensions, s.mpp))
        record["fit_level_downsample"] = s.levels[level].downsample
        params = fit_slide(s, method, Options(strategy="exact" if "exact" in case else "tiles"))
        record["fit_seconds"] = time.perf_counter() - t0
        record["fit_cpu_seconds"] = _cpu() - cpu0
        record["regions"] = list(params.grid)
        record["params_json_mb"] = len(params.to_json()) / MB
        write_pyramid(Clahe(clip_limit=CLIP, region=REGION, mode=mode).apply(level0, params), out, mpp=s.mpp)
    else:
        x0, y0 = (level0.width - crop) // 2, (level0.height - crop) // 2
        y = luma_image(level0.crop(x0, y0, crop, crop)).copy_memory()  # decode not timed
        cpu0, t0 = _cpu(), time.perf_counter()
        if case == "hist_local":
            y.hist_local(REGION, REGION, max_slope=int(CLIP)).copy_memory()
        else:
            from skimage import exposure

            exposure.equalize_adapthist(y.numpy(), kernel_size=REGION, clip_limit=0.01)
        record["crop"] = crop
        record["extrapolated_from_seconds"] = time.perf_counter() - t0
        scale = pixels / (crop * crop)
        record["seconds"] = record["extrapolated_from_seconds"] * scale
        record["cpu_seconds"] = (_cpu() - cpu0) * scale
    if "seconds" not in record:
        record["seconds"] = time.perf_counter() - t0
        record["cpu_seconds"] = _cpu() - cpu0
        record["output_mb"] = out.stat().st_size / MB if out.exists() else None
    record["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    record["concurrency"] = pyvips.concurrency_get()
    record["pixels"] = pixels
    print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------------------------------
# driver (never imports pyvips/numpy: a forked child inherits the parent's peak RSS on Linux)


def _ensure_slide(workdir: Path, size: int) -> Path:
    """The bench_core.py cache: synth-reference-s0-<size>-<hash of synth.py>.tif."""
    import hashlib

    synth = Path(__file__).resolve().parents[1] / "src" / "vipsnorm" / "synth.py"
    digest = hashlib.sha256(synth.read_bytes()).hexdigest()[:8]
    path = workdir / f"synth-reference-s0-{size}-{digest}.tif"
    if not path.exists():
        print(f"generating {path.name} (not timed) ...", file=sys.stderr, flush=True)
        code = (
            "import sys; from vipsnorm.synth import write_synthetic_slide; "
            "write_synthetic_slide(sys.argv[1], int(sys.argv[2]), int(sys.argv[2]), lab='reference', seed=0, "
            "tissue=0.5, mpp=0.25, compression='jpeg', quality=90, tile=256)"
        )
        subprocess.run([sys.executable, "-c", code, str(path), str(size)], check=True)
    return path


def _run_child(case: str, slide: Path, out_dir: Path, crop: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--slide", str(slide), "--out-dir", str(out_dir),
           "--crop", str(crop)]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"case {case!r} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    record = json.loads(lines[-1])
    record["loadavg"] = [load, os.getloadavg()[0]]
    return record


def _markdown(results: dict[str, dict], size: int, crop: int, repeat: int) -> str:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    copy = results["copy"]
    mpx = copy["pixels"] / 1e6
    loads = [v for r in results.values() for v in r["loadavg"]]
    lines = [
        f"{size} x {size} synthetic H&E ({mpx:,.0f} Mpx), {os.cpu_count()} cores ({cpu}), libvips concurrency "
        f"{copy['concurrency']}; best of {repeat} run(s), each case in a fresh process; 1-minute load average "
        f"{min(loads):.1f} to {max(loads):.1f}. CLAHE region {REGION} px, clip limit {CLIP}.",
        "",
        f"Goals (issue #4): clahe within **{RATIO_GOAL}x** of `copy`, at least **{HIST_LOCAL_GOAL:.0f}x** faster than "
        f"`hist_local`, peak RSS under **{RSS_GOAL_MB:.0f} MB**.",
        "",
        "| case | seconds | x copy | Mpx/s | CPU s | CPU x copy | peak RSS MB | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        notes = []
        if "fit_seconds" in r:
            notes.append(f"fit on the {r['fit_level_downsample']:g}x level {r['fit_seconds']:.1f} s (CPU {r['fit_cpu_seconds']:.1f} s), "
                         f"{r['regions'][0]}x{r['regions'][1]} regions, params {r['params_json_mb']:.2f} MB JSON")
        if "crop" in r:
            notes.append(f"extrapolated from {r['extrapolated_from_seconds']:.1f} s on a {r['crop']}² crop in memory; "
                         "RSS is the crop's")
        if name == "clahe" and "hist_local" in results:
            notes.append(f"**{results['hist_local']['seconds'] / r['seconds']:.0f}x faster than hist_local**")
        if name == "clahe" and "skimage" in results:
            notes.append(f"{results['skimage']['seconds'] / r['seconds']:.0f}x faster than skimage")
        lines.append(
            f"| {name} | {r['seconds']:.1f} | {r['seconds'] / copy['seconds']:.2f} | {mpx / r['seconds']:.2f} | "
            f"{r['cpu_seconds']:.1f} | {r['cpu_seconds'] / copy['cpu_seconds']:.2f} | {r['maxrss_mb']:.0f} | "
            f"{'; '.join(notes)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20000, help="slide side (px)")
    parser.add_argument("--crop", type=int, default=2048, help="crop side for hist_local and skimage (px)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vipsnorm-bench"))
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; fastest time, largest RSS")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--slide", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.slide, args.out_dir, args.crop)
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    slide = _ensure_slide(args.workdir, args.size)
    with open(slide, "rb") as f:  # page cache: fair to the first case
        while f.read(16 * 1024 * 1024):
            pass
    cases = ["copy"] + [c for c in args.cases if c != "copy"]
    results: dict[str, dict] = {}
    raw = []
    for run in range(args.repeat):
        for case in cases:
            out_dir = args.workdir / "out-clahe" / case.replace(" ", "_").replace("-", "")
            print(f"{case} (run {run + 1}/{args.repeat}) ...", end=" ", file=sys.stderr, flush=True)
            record = _run_child(case, slide, out_dir, args.crop)
            shutil.rmtree(out_dir, ignore_errors=True)
            raw.append(record)
            print(f"{record['seconds']:.1f} s, CPU {record['cpu_seconds']:.1f} s, RSS {record['maxrss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
            best = results.get(case)
            if best is None:
                results[case] = dict(record)
            else:
                rss = max(best["maxrss_mb"], record["maxrss_mb"])
                loads = best["loadavg"] + record["loadavg"]
                if record["seconds"] < best["seconds"]:
                    results[case] = dict(record)
                results[case].update(maxrss_mb=rss, loadavg=loads)
    text = _markdown(results, args.size, args.crop, args.repeat)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
