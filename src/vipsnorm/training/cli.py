"""``vipsnorm patches``: normalized training patches from slides, with a coordinates table.

:func:`add_parser` adds the subcommand to the main command line's subparsers and :func:`run` runs it
(exit code 0 only if every slide succeeded); :func:`main` runs it on its own
(``python -m vipsnorm.training.cli SLIDES... -o OUT``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .._options import add_engine_options, add_method_options, method_options
from ..batch import default_manifest
from ..engine import Options
from ..errors import VipsnormError
from ..io.slide import BACKENDS, DEFAULT_MAX_PIXELS
from ..methods import METHODS
from ..sampling import STRATEGIES
from .patches import FORMATS, TABLE, PatchJob, SlideResult, extract_slides, resolve_normalization

__all__ = ["add_parser", "run", "main"]

_DESCRIPTION = """\
Cut training patches from slides: a grid (or --random N positions) of --size pixel windows on one level,
kept where the tissue mask (from a low-resolution level) covers at least --min-tissue of the window.
With --method, each slide is fitted once (as 'vipsnorm normalize' fits it) and every patch is the same
window of the normalized slide, pixel for pixel; without it, patches are the slide's own pixels.

Output (-o OUT): OUT/SLIDE/KEY.png|jpg|npy per patch, or WebDataset-style shards OUT/SLIDE-000000.tar
(KEY.png + KEY.json per sample) with --format tar, and the coordinates table OUT/patches.csv (key, slide,
level, x, y on the level, x0, y0 on level 0, size, mpp, tissue fraction, file). Every slide's output is
written under a temporary name and renamed when complete. Exit code 0 only if every slide succeeded.

Resume: running the same command again skips every slide finished by an earlier run with the same
settings from the same, unchanged input (size and modification time); other settings, a changed input
or --overwrite redo it, and its earlier outputs (of any --format) are removed once the new ones are in.
A slide whose output name (file name without suffix) an earlier run gave another input in OUT
(labA/x.tif, then labB/x.tif) is an error: choose another -o, rename one, or --overwrite to replace it.
One manifest row per slide and run (ok, error or skipped) goes to OUT.manifest.csv beside OUT.

examples:
  vipsnorm patches slides/*.svs -o patches/ --size 256 --mpp 0.5 --min-tissue 0.5
  vipsnorm patches a.svs b.ndpi -o shards/ --method macenko --format tar --random 500 --seed 1
  vipsnorm patches lab*/*.svs -o p/ --method match --reference palette.json --format npy
"""


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    return parse


def _seed(text: str) -> int:
    """``--seed``: numpy's generators take integers >= 0 only (refused here, not by every slide)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, not {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0..1, not {text}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``patches`` subcommand (all its options and help) to ``subparsers``; returns its parser."""
    p = subparsers.add_parser(
        "patches",
        help="cut normalized training patches from slides, with a coordinates table",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="SLIDE", help="slides or images")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="output folder (created if missing)")

    g = p.add_argument_group("where")
    g.add_argument(
        "--size", type=_positive(int), default=256, help="patch side in pixels of the level (default: %(default)s)"
    )
    level = g.add_mutually_exclusive_group()
    level.add_argument("--level", type=int, help="pyramid level to cut from (default: 0, full resolution)")
    level.add_argument(
        "--mpp",
        type=_positive(float),
        metavar="UM",
        help="cut from the level whose pixel size is closest to UM microns per pixel (slides that record it)",
    )
    g.add_argument(
        "--stride", type=_positive(int), help="grid step in pixels of the level (default: --size, no overlap)"
    )
    g.add_argument(
        "--min-tissue",
        type=_fraction,
        default=0.5,
        help="keep patches whose tissue fraction is at least this (0..1; 0 keeps glass too; default: %(default)s)",
    )
    g.add_argument(
        "--random", type=_positive(int), metavar="N", help="N patches at random positions instead of the grid"
    )
    g.add_argument(
        "--seed", type=_seed, default=0, help="random patches: which positions (>= 0; default: %(default)s)"
    )
    g.add_argument(
        "--no-overlap",
        action="store_true",
        help="random patches: only windows that share no pixel with one drawn before (fewer may come back)",
    )

    g = p.add_argument_group("normalization (default: none, the slide's own pixels)")
    g.add_argument("--method", choices=sorted(METHODS), help="normalization method, fitted once per slide")
    g.add_argument(
        "--reference",
        metavar="REF",
        help="match and the stain methods: target image or JSON from 'vipsnorm fit'; other methods: a JSON of "
        "fitted parameters applied unchanged to every slide (implies --method when it names one)",
    )
    add_method_options(g)
    g.add_argument(
        "--sample",
        choices=STRATEGIES,
        default="tiles",
        help="how slides are sampled for the fit (default: %(default)s)",
    )
    g.add_argument("--tiles", type=int, default=256, help="tiles sampled for the fit (default: %(default)s)")
    g.add_argument(
        "--fit-seed", type=int, default=0, help="which tiles the fit samples (default: %(default)s, as 'normalize')"
    )

    g = p.add_argument_group("output")
    g.add_argument(
        "--format",
        choices=FORMATS,
        default="png",
        help="png, jpg or npy files per patch, WebDataset tar shards, or coords: the table only (default: %(default)s)",
    )
    g.add_argument("--quality", type=int, default=90, help="jpg quality (default: %(default)s)")
    g.add_argument(
        "--shard-size", type=_positive(int), default=1000, help="tar: samples per shard (default: %(default)s)"
    )
    g.add_argument("--backend", choices=BACKENDS, default="auto", help="reader (default: %(default)s)")
    g.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse images larger than this many pixels (default: %(default)s; 0 = no limit)",
    )
    g = p.add_argument_group(
        "batch", "Slides run in parallel on Dask, one task each (as 'vipsnorm normalize' runs its inputs)."
    )
    add_engine_options(g)
    g.add_argument(
        "--manifest",
        type=Path,
        metavar="CSV",
        help="the manifest: one row per slide and run (default: OUT.manifest.csv beside OUT)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="redo every slide, even those an earlier run finished with these settings, and replace the patches "
        "that an earlier run wrote for another input of the same output name",
    )
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    """Run ``vipsnorm patches``: one line per slide (errors on stderr), then a summary.

    Returns 0 only if every slide succeeded, 1 if any failed, 2 for a bad option or reference.
    """
    try:
        options = Options(
            strategy=args.sample,
            n_tiles=args.tiles,
            seed=args.fit_seed,
            max_pixels=args.max_pixels,
            backend=args.backend,
        )
        job = PatchJob(
            size=args.size,
            level=args.level,
            mpp=args.mpp,
            stride=args.stride,
            min_tissue=args.min_tissue,
            random=args.random,
            seed=args.seed,
            format=args.format,
            quality=args.quality,
            shard_size=args.shard_size,
            overlap=not args.no_overlap,
        )
        if args.format == "coords" and (args.method or args.reference):
            # the table holds positions only: a normalization would be fitted and never used
            raise ValueError(
                "--format coords writes the coordinates table only, with no pixels: --method and --reference "
                "do nothing with it; leave them out (a dataset made from the table takes its own method)"
            )
        method, params = resolve_normalization(args.method, args.reference, options, **method_options(args))
    except (VipsnormError, ValueError) as exc:
        print(f"error  {exc}", file=sys.stderr)
        return 2

    def report(result: SlideResult) -> None:
        print(result.line(), file=sys.stderr if result.status == "error" else sys.stdout, flush=True)

    try:
        manifest = args.manifest if args.manifest is not None else default_manifest(args.output)
        results = extract_slides(
            args.inputs,
            args.output,
            job,
            method,
            params=params,
            options=options,
            on_result=report,
            manifest=manifest,
            overwrite=args.overwrite,
            reference=str(args.reference or ""),
            keep_patches=False,
            scheduler=args.scheduler,
            workers=args.workers,
        )
    except (OSError, VipsnormError, ValueError) as exc:  # the output folder, manifest or table; --workers
        print(f"error  {exc}", file=sys.stderr)
        return 2
    counts = {status: sum(r.status == status for r in results) for status in ("ok", "error", "skipped")}
    n = sum(r.count for r in results)
    print(
        f"{n} patches from {counts['ok'] + counts['skipped']} of {len(results)} slides: {counts['ok']} patched, "
        f"{counts['error']} failed, {counts['skipped']} skipped (done before); table: {Path(args.output) / TABLE}; "
        f"manifest: {manifest}",
        file=sys.stderr,
    )
    return 1 if counts["error"] else 0


def main(argv: list[str] | None = None) -> int:
    """``vipsnorm patches`` on its own: ``main(["slide.svs", "-o", "out"])``."""
    parser = argparse.ArgumentParser(prog="vipsnorm")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "patches":
        argv = ["patches", *argv]
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        try:
            return run(args)
        except KeyboardInterrupt:  # Ctrl-C: the run cleaned up on its way out (as 'vipsnorm' returns)
            return 130


if __name__ == "__main__":
    sys.exit(main())
