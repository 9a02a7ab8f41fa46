#!/usr/bin/env python
"""Patch benchmark: random training patches per second, and augmentation throughput per patch.

One synthetic H&E slide (``vipsnorm.synth``, lab "reference", seed 0, 0.25 um/px, pyramidal JPEG Q90
BigTIFF, 256 px tiles) is generated once and cached in ``--workdir`` (not timed; the same file and name as
``bench_core.py`` uses, so its cache is reused). ``--patches`` random positions of ``--patch`` px windows
with at least half tissue are drawn once (``vipsnorm.training.patches.random_patches``, seed 0) and every
case reads the same ones, in the same order (sorted by row, as ``vipsnorm patches`` reads them). The
cases marked ", shuffled" read them in a random order (seed 1), as a shuffling training loader does:
decoders that keep tiles (libvips, OpenSlide) then find fewer of them kept.

Reading cases, each in its own fresh Python process (its own caches; the file is in the page cache for
all of them), side by side in one run, ``--repeat`` times in rotation:

``openslide read_region``
    ``openslide.OpenSlide(path).read_region((x, y), 0, (size, size))`` as a numpy RGB array: what a
    training loader does without vipsnorm.
``vipsnorm raw``
    ``PatchReader(slide).read(0, x, y, size)``, no normalization: the window decoded straight from the
    slide's JPEG tiles, only the part of each tile it needs (``vipsnorm.io.jpeg_tiles``; "direct" in the
    table), tiles kept as their coefficients for later windows while reads meet them again (the default
    48 MB store), or where that reader is not built a libvips ``Region`` fetch in the calling thread.
``vipsnorm raw, none kept``
    Reference: the same with no tiles kept as coefficients (``VIPSNORM_KEPT_TILES_MB=0``): every window
    decodes its tiles from their start, as the direct reader did before it kept tiles.
``pyvips Region.fetch``
    Reference, no vipsnorm code: ``pyvips.Region.new(pyvips.Image.new_from_file(path)).fetch(x, y, size,
    size)`` as a numpy array, one Region for all patches: what libvips itself costs for a window, so
    that ``vipsnorm raw`` can be told apart from its decoder.
``vipsnorm macenko``
    The same window normalized by Macenko (fitted once per slide; the fit, a fixed cost of about a
    second, is reported on its own and not in the rate): ``PatchReader(slide, method, params)``, which
    maps the raw window through the fit's colour table, filled as patches show new colours (it starts
    empty in each case's fresh process, so the rate includes filling it).
``vipsnorm equalize``
    Extra: a LUT method, for comparison.

Goals (issue 6): vipsnorm raw >= 2x OpenSlide; vipsnorm macenko >= 0.8x vipsnorm raw. A slide small
enough for libvips' tile cache (a 4096 px smoke run: 256 tiles) makes raw reads nearly free and these
ratios unrepresentative; measure on the 20000 px slide.

Augmentation cases (one process, numpy's BLAS and OpenCV on one thread each, as in a data-loader
worker; ``--aug-patches`` patches read once by ``vipsnorm raw``, each transform's CPU time per patch on
all of them, interleaved with its counterpart ``--repeat`` times; best of the repeats): vipsnorm's
``RandomEqualization`` (``rgb``: per channel; ``luminance``) and ``RandomClahe`` (clip limit 2, 8x8 grid,
``luminance`` and ``rgb``) against albumentations' ``Equalize`` (``by_channels`` True and False, OpenCV's
``equalizeHist``) and ``CLAHE`` (clip limit 2, 8x8; OpenCV on the L of Lab), all with ``p=1``;
vipsnorm's ``RandomStainJitter`` (fitted stains, and HED) beside albumentations' ``HEStain`` for
information. Goal: no slower than albumentations.

Usage::

    python benchmarks/bench_patches.py --size 20000 [--patches 1000] [--repeat 3] [--markdown OUT.md]
    python benchmarks/bench_patches.py --size 4096 --patches 300 --aug-patches 100   # a smoke run
    python benchmarks/bench_patches.py --size 20000 --augment-only --repeat 5          # augmentations alone
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RAW_GOAL = 2.0  # vipsnorm raw / OpenSlide
NORMALIZED_GOAL = 0.8  # vipsnorm macenko / vipsnorm raw
AUG_GOAL = 1.0  # vipsnorm / albumentations
READ_CASES = [
    "openslide read_region", "vipsnorm raw", "vipsnorm raw, none kept", "pyvips Region.fetch", "vipsnorm macenko",
    "vipsnorm equalize", "openslide read_region, shuffled", "vipsnorm raw, shuffled",
    "vipsnorm raw, none kept, shuffled", "pyvips Region.fetch, shuffled",
]
SHUFFLED = ", shuffled"
NONE_KEPT = ", none kept"
SRC = Path(__file__).resolve().parents[1] / "src"


def slide_path(workdir: Path, size: int) -> Path:
    """The cached slide: ``bench_core.py``'s name (generator hash included), generated if missing."""
    digest = hashlib.sha256((SRC / "vipsnorm" / "synth.py").read_bytes()).hexdigest()[:8]
    path = workdir / f"synth-reference-s0-{size}-{digest}.tif"
    if not path.exists():
        print(f"generating {path.name} ({size}x{size}, not timed) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        run_child("--generate", str(path), str(size))
        print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return path


def generate(path: str, size: str) -> dict:
    from vipsnorm.synth import write_synthetic_slide

    size = int(size)
    write_synthetic_slide(
        path, size, size, lab="reference", seed=0, tissue=0.5, mpp=0.25, compression="jpeg", quality=90, tile=256
    )
    return {"path": path}


def place(path: str, patch: str, n: str, out: str) -> dict:
    """Random positions with at least half tissue (seed 0), written to ``out`` as JSON."""
    import pyvips

    import vipsnorm
    from vipsnorm.training.patches import random_patches

    with vipsnorm.open(path) as slide:
        patches = random_patches(slide, int(patch), int(n), seed=0, min_tissue=0.5)
    Path(out).write_text(json.dumps({"size": int(patch), "xy": [[p.x, p.y] for p in patches]}))
    return {"patches": len(patches), "libvips": f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"}


# --------------------------------------------------------------------------------------------------
# the child: one reading case


def child(case: str, path: str, positions_file: str) -> dict:
    import numpy as np

    positions = json.loads(Path(positions_file).read_text())
    size = positions["size"]
    xy = positions["xy"]
    if case.endswith(SHUFFLED):
        case = case[: -len(SHUFFLED)]
        xy = [xy[i] for i in np.random.default_rng(1).permutation(len(xy))]
    if case.endswith(NONE_KEPT):  # the direct reader keeping no tiles (as before it kept any)
        case = case[: -len(NONE_KEPT)]
        os.environ["VIPSNORM_KEPT_TILES_MB"] = "0"
    fit_seconds = None
    direct = None
    start_open = time.perf_counter()
    if case == "openslide read_region":
        import openslide

        osr = openslide.OpenSlide(path)

        def read(x, y):
            return np.asarray(osr.read_region((x, y), 0, (size, size)))[..., :3]

    elif case == "pyvips Region.fetch":
        import pyvips

        region = pyvips.Region.new(pyvips.Image.new_from_file(path))

        def read(x, y):
            return np.frombuffer(region.fetch(x, y, size, size), np.uint8).reshape(size, size, 3)

    else:
        import vipsnorm
        from vipsnorm.engine import Options, build_method, fit_slide
        from vipsnorm.training.patches import PatchReader

        slide = vipsnorm.open(path)
        if case == "vipsnorm raw":
            reader = PatchReader(slide)
        else:
            method = build_method(case.split()[1])
            t0 = time.perf_counter()
            params = fit_slide(slide, method, Options())
            fit_seconds = time.perf_counter() - t0
            reader = PatchReader(slide, method, params)

        direct = slide.jpeg_tiles(0) is not None

        def read(x, y):
            return reader.read(0, x, y, size, size)

    open_seconds = time.perf_counter() - start_open - (fit_seconds or 0.0)
    checksum = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for x, y in xy:
        checksum += int(read(x, y)[size // 2, size // 2, 0])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "case": case,
        "patches": len(xy),
        "seconds": wall,
        "cpu_seconds": cpu,
        "rate": len(xy) / wall,
        "fit_seconds": fit_seconds,
        "open_seconds": open_seconds,
        "direct": direct,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "checksum": checksum,
    }


def run_child(*args: str, single_thread: bool = False) -> dict:
    """Run ``bench_patches.py ARGS`` in a fresh interpreter (so that its peak RSS is its own); its last
    line of output is JSON. ``single_thread``: numpy's BLAS and OpenMP on one thread."""
    env = dict(os.environ)
    if single_thread:
        env.update({name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# augmentations (one process)


def augmentation_cases(path: str, positions_file: str, n: str, repeat: str) -> list[dict]:
    import warnings

    import vipsnorm
    from vipsnorm.training import augment as A

    try:
        import albumentations as alb
        import cv2

        cv2.setNumThreads(1)  # one thread each, as in a data-loader worker: CPU time is then comparable
    except ImportError:
        alb = None
        print("albumentations is not installed: its cases are skipped (pip install albumentations)", file=sys.stderr)

    positions = json.loads(Path(positions_file).read_text())
    n, repeat = int(n), int(repeat)
    size = positions["size"]
    with vipsnorm.open(path) as slide:
        from vipsnorm.training.patches import PatchReader

        reader = PatchReader(slide)
        tiles = [reader.read(0, x, y, size, size) for x, y in positions["xy"][:n]]

    def albu(transform):
        return lambda image: transform(image=image)["image"]

    pairs = [
        (
            "equalize, per channel",
            A.RandomEqualization(mode="rgb", p=1.0),
            alb and albu(alb.Equalize(mode="cv", by_channels=True, p=1.0)),
        ),
        (
            "equalize, luminance",
            A.RandomEqualization(mode="luminance", p=1.0),
            alb and albu(alb.Equalize(mode="cv", by_channels=False, p=1.0)),
        ),
        (
            "CLAHE, luminance (alb.: L of Lab)",
            A.RandomClahe(clip_limit=2.0, grid=(8, 8), mode="luminance"),
            alb and albu(alb.CLAHE(clip_limit=(2.0, 2.0), tile_grid_size=(8, 8), p=1.0)),
        ),
        (
            "CLAHE, per channel (alb.: L of Lab)",
            A.RandomClahe(clip_limit=2.0, grid=(8, 8), mode="rgb"),
            alb and albu(alb.CLAHE(clip_limit=(2.0, 2.0), tile_grid_size=(8, 8), p=1.0)),
        ),
        ("stain jitter, fitted stains (alb.: HEStain)", A.RandomStainJitter(seed=0), alb and albu(alb.HEStain(p=1.0))),
        (
            "stain jitter, HED (alb.: HEStain)",
            A.RandomStainJitter(stains="hed", seed=0),
            alb and albu(alb.HEStain(p=1.0)),
        ),
    ]
    rows = []
    for name, ours, theirs in pairs:
        best = {"vipsnorm": float("inf"), "albumentations": float("inf")}
        for _ in range(repeat):
            for who, fn in (("vipsnorm", ours), ("albumentations", theirs)):
                if fn is None:
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn(tiles[0])  # warm-up
                    c0 = time.process_time()
                    for tile in tiles:
                        fn(tile)
                    best[who] = min(best[who], (time.process_time() - c0) / len(tiles))
        ms = {k: (v * 1000 if v != float("inf") else None) for k, v in best.items()}
        ratio = ms["albumentations"] / ms["vipsnorm"] if ms["albumentations"] else None
        rows.append(
            {
                "case": name,
                "vipsnorm_ms": ms["vipsnorm"],
                "albumentations_ms": ms["albumentations"],
                "speed_ratio": ratio,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------
# the parent


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    children = {"--child": child, "--generate": generate, "--place": place, "--augment": augmentation_cases}
    if argv and argv[0] in children:
        print(json.dumps(children[argv[0]](*argv[1:])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20000, help="slide side in pixels (default: %(default)s)")
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/vipsnorm-bench"), help="slide cache (shared with bench_core.py)"
    )
    parser.add_argument("--patches", type=int, default=1000, help="random patches read per case (default: %(default)s)")
    parser.add_argument("--patch", type=int, default=256, help="patch side (default: %(default)s)")
    parser.add_argument(
        "--aug-patches", type=int, default=200, help="patches each augmentation is timed on (default: %(default)s)"
    )
    parser.add_argument("--repeat", type=int, default=2, help="rounds of every case (default: %(default)s)")
    parser.add_argument(
        "--augment-only", action="store_true", help="only the augmentation cases (no reading cases)"
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, help="write the tables as Markdown")
    args = parser.parse_args(argv)

    # this process stays small (no pyvips, no slide): children inherit its peak RSS at their start
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = slide_path(args.workdir, args.size)
    positions_file = args.workdir / f"positions-{path.stem}-{args.patch}-{args.patches}.json"
    placed = run_child("--place", path, args.patch, args.patches, positions_file)
    n_patches = placed["patches"]
    with open(path, "rb") as f:  # the page cache holds the file for every case alike
        while f.read(1 << 24):
            pass

    read_cases = [] if args.augment_only else READ_CASES
    results: dict[str, list[dict]] = {case: [] for case in read_cases}
    for round_ in range(args.repeat if read_cases else 0):
        for case in read_cases:
            result = run_child("--child", case, path, positions_file)
            results[case].append(result)
            cpu_ms = result["cpu_seconds"] / result["patches"] * 1000
            print(
                f"round {round_ + 1}: {case:24s} {result['rate']:7.1f} patches/s  ({cpu_ms:.2f} ms CPU each, "
                f"peak RSS {result['peak_rss_mb']:.0f} MB)",
                file=sys.stderr,
                flush=True,
            )
    same_pixels = {
        r["checksum"]
        for case in ("openslide read_region", "vipsnorm raw", "vipsnorm raw" + NONE_KEPT, "pyvips Region.fetch")
        for r in results.get(case, []) + results.get(case + SHUFFLED, [])
    }
    if len(same_pixels) > 1:
        print("warning: OpenSlide and vipsnorm read different raw pixels", file=sys.stderr)
    best = {case: max(rs, key=lambda r: r["rate"]) for case, rs in results.items()}
    rate = {case: r["rate"] for case, r in best.items()}
    n_aug = min(args.aug_patches, n_patches)
    augment_rows = run_child("--augment", path, positions_file, n_aug, args.repeat, single_thread=True)

    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "slide": f"{args.size}x{args.size} synthetic, JPEG Q90 tiles 256",
        "patch": args.patch,
        "patches": n_patches,
        "repeat": args.repeat,
        "libvips": placed["libvips"],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }
    lines = [] if not read_cases else [
        f"Random {args.patch} px patches from a {args.size}x{args.size} generated slide ({n_patches} positions with at "
        f"least half tissue, best of {args.repeat} rounds, each case in its own process; libvips {info['libvips']}, "
        f"{info['cpus']} cores, load average {info['load_average'][0]:.1f}):",
        "",
        "| reader | patches/s | ms CPU per patch | peak RSS MB | ratio | goal |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for case in read_cases:
        r = best[case]
        order = SHUFFLED if case.endswith(SHUFFLED) else ""
        base = case[: -len(order)] if order else case
        if base == "openslide read_region":
            ratio, goal = "1.00 (OpenSlide)", ""
        elif base == "vipsnorm raw" + NONE_KEPT:
            ratio = f"{rate[case] / rate['openslide read_region' + order]:.2f} x OpenSlide"
            goal = "reference: no tiles kept"
        elif base == "vipsnorm raw":
            ratio = f"{rate[case] / rate['openslide read_region' + order]:.2f} x OpenSlide"
            met = rate[case] >= RAW_GOAL * rate["openslide read_region" + order]
            goal = f">= {RAW_GOAL}x OpenSlide: {'met' if met else 'MISSED'}"
        else:
            ratio = f"{rate[case] / rate['vipsnorm raw' + order]:.2f} x raw"
            goal = "reference: libvips alone" if case == "pyvips Region.fetch" else ""
            if base == "vipsnorm macenko":
                met = rate[case] >= NORMALIZED_GOAL * rate["vipsnorm raw"]
                goal = f">= {NORMALIZED_GOAL}x raw: {'met' if met else 'MISSED'}"
        fit = f" (fit {r['fit_seconds']:.2f} s, once)" if r["fit_seconds"] else ""
        if r.get("direct") is not None:
            fit += ", direct" if r["direct"] else ", libvips"
        cpu_ms = r["cpu_seconds"] / r["patches"] * 1000
        lines.append(f"| {case}{fit} | {r['rate']:.0f} | {cpu_ms:.2f} | {r['peak_rss_mb']:.0f} | {ratio} | {goal} |")
    lines += [
        *([""] if lines else []),
        f"Augmentations on {n_aug} of these patches (uint8 {args.patch}x{args.patch}x3, CPU time per "
        f"patch, best of {args.repeat}):",
        "",
        "| transform | vipsnorm ms | albumentations ms | vipsnorm speed vs albumentations | goal (>= 1) |",
        "|---|---:|---:|---:|---|",
    ]
    for row in augment_rows:
        theirs = "—" if row["albumentations_ms"] is None else f"{row['albumentations_ms']:.2f}"
        ratio = "—" if row["speed_ratio"] is None else f"{row['speed_ratio']:.2f}"
        goal = ""
        if row["speed_ratio"] is not None and not row["case"].startswith("stain"):
            goal = "met" if row["speed_ratio"] >= AUG_GOAL else "MISSED"
        lines.append(f"| {row['case']} | {row['vipsnorm_ms']:.2f} | {theirs} | {ratio} | {goal} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "read": results, "augment": augment_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
