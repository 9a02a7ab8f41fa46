"""The ``vipsnorm`` command line: normalize, fit, inspect, demo."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from . import __version__
from .batch import SCHEDULER_ENV, fit_batch, normalize_batch
from .batch.fitcache import default_cache
from ._options import add_engine_options, add_method_options, method_options
from .engine import FORMATS, Options, build_method, load_reference, shares_target
from .errors import InvalidReferenceError, VipsnormError
from .io.slide import BACKENDS, DEFAULT_MAX_PIXELS
from .io.write import COMPRESSIONS
from .methods import METHODS, Macenko, stain_summary
from .reference import save_reference
from .sampling import STRATEGIES
from .training import cli as patches_cli

__all__ = ["main"]

_DESCRIPTION = """\
Normalize the exposure and colour of whole-slide images and ordinary pictures, streaming at full
resolution. Slides (SVS, NDPI, MRXS, DICOM, pyramidal TIFF, ...) are fitted on their tissue only and
written as pyramidal tiled TIFF with the pixel size kept; ordinary images keep their format.

examples:
  vipsnorm normalize slide.svs -o out/ --method equalize
  vipsnorm normalize archive/ -o out/ --include '*.svs'       # a whole tree, in parallel, resumable
  vipsnorm fit lab1/*.svs lab2/*.svs -o palette.json            # one palette for a whole set
  vipsnorm normalize lab*/*.svs -o out/ --method match --reference palette.json
  vipsnorm inspect slide.svs
  vipsnorm patches slides/*.svs -o patches/ --mpp 0.5 --method macenko   # normalized training patches
  vipsnorm demo -o demo/                                         # synthetic slides, end to end
"""

_METHODS_HELP = """\
methods:
  stretch   linear contrast stretch between the --low and --high percentiles (default 2, 98);
            --mode joint (default: one map for all channels, keeps hue) or rgb (per channel)
  equalize  histogram equalization; --mode luminance (default: luma only, keeps hue) or rgb
  match     histogram matching onto --reference (an image, or a JSON from 'vipsnorm fit');
            --mode rgb (default: matches the colour palette) or luminance
  reinhard  H&E stain normalization: Lab (CIELAB D65) mean and std of the tissue mapped onto
            --reference's (an image, or a JSON from 'vipsnorm fit --method reinhard'); glass kept
  macenko   H&E stain normalization: stain vectors and concentrations from optical density, mapped
            onto the canonical H&E target, or --reference's (image or 'vipsnorm fit' JSON)
  vahadane  H&E stain normalization as macenko (same target and apply step), the stain vectors
            found by sparse non-negative dictionary learning (Vahadane et al. 2016)
  clahe     adaptive equalization (OpenCV's CLAHE, computed over the whole slide, no seams):
            --clip-limit (default 2); --grid COLSxROWS (images, default 8x8) or --region PX /
            --region-um UM (slides: default 1024 px regions); --mode luminance (default) or rgb
"""


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fitting")
    g.add_argument(
        "--method",
        choices=sorted(METHODS),
        help="normalization method (default: equalize; match when --reference is an image or a palette "
        "JSON; the fitted method when --reference is a parameters JSON; match for 'fit')",
    )
    add_method_options(g)
    g.add_argument(
        "--sample",
        choices=STRATEGIES,
        default="tiles",
        help="slides: fit on random full-resolution tissue tiles (default), the low-resolution level, "
        "or every tissue pixel (exact, one extra full pass). Ordinary images always use every pixel.",
    )
    g.add_argument("--tiles", type=int, default=256, help="number of tiles sampled (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="which tiles are sampled (default: %(default)s)")
    g.add_argument(
        "--no-tissue-mask", action="store_true", help="fit slides on all pixels, glass included (not recommended)"
    )
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="reader: auto (libvips where it decodes, else OpenSlide; default), or force one",
    )
    g.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse images larger than this many pixels (default: %(default)s; 0 = no limit)",
    )


def _add_batch_options(p: argparse.ArgumentParser, normalize: bool) -> None:
    g = p.add_argument_group(
        "batch",
        "Inputs run in parallel on Dask: by default a local cluster sized to the machine (or one worker\n"
        f"process when the batch is a single task); --scheduler or ${SCHEDULER_ENV} for a running cluster.",
    )
    g.add_argument(
        "--list",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="more inputs from FILE: a .csv with an 'input' column and an optional 'output' column (path "
        "relative to OUTDIR), or one path per line; relative paths are relative to FILE's folder (repeatable)",
    )
    g.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="files to take from INPUT folders (repeatable; default: common slide and image suffixes)",
    )
    g.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="files to leave out of INPUT folders (repeatable)")
    add_engine_options(g)
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: only when stderr is a terminal)",
    )
    if not normalize:
        g.add_argument(
            "--cache",
            type=Path,
            metavar="JSONL",
            help="where each input's summary is kept as it is made, so that a rerun samples only new or changed "
            "inputs (default: REF.inputs.jsonl beside -o REF.json)",
        )
        g.add_argument(
            "--overwrite", action="store_true", help="sample every input again, even those the cache holds"
        )
    if normalize:
        g.add_argument(
            "--manifest",
            type=Path,
            metavar="CSV",
            help="the manifest: one row per input and run (default: OUTDIR.manifest.csv beside OUTDIR); a rerun "
            "skips what it records as finished",
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vipsnorm",
        description=_DESCRIPTION,
        epilog=_METHODS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vipsnorm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "normalize",
        help="normalize images into an output folder",
        description="Normalize every INPUT into OUTDIR (inputs are never modified). Exit code 0 only if every input succeeded.",
        epilog=_METHODS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="slides, images, or folders of them (searched recursively)")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="OUTDIR",
        help="output folder (created if missing); folders given as INPUT are mirrored below it",
    )
    p.add_argument(
        "--reference",
        metavar="REF",
        help="match: target image or JSON from 'vipsnorm fit'; other methods: a JSON of fitted parameters "
        "applied unchanged to every input",
    )
    _add_fit_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=FORMATS, default="auto", help="auto: pyramidal TIFF for slides, input format for images")
    g.add_argument("--compression", choices=COMPRESSIONS, default="jpeg", help="pyramidal TIFF tiles (default: %(default)s; deflate/lzw are lossless)")
    g.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality (default: %(default)s)")
    overwrite = g.add_mutually_exclusive_group()
    overwrite.add_argument(
        "--overwrite", action="store_true", help="redo every input, even those the manifest records as finished"
    )
    overwrite.add_argument(
        "--no-overwrite", action="store_true", help="fail for inputs whose output exists but is not recorded as finished"
    )
    g.add_argument("--json", action="store_true", help="print one JSON line per input instead of text")
    _add_batch_options(p, normalize=True)

    p = sub.add_parser(
        "fit",
        help="fit one reference (palette or parameters) over many images",
        description="Fit one reference over every INPUT and save it as JSON. With --method match (default) it is "
        "the pooled tissue palette that 'normalize --method match --reference' maps every image onto; with "
        "stretch/equalize it is their parameters, applied unchanged to every image.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="slides, images, or folders of them (searched recursively)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="REF.json")
    _add_fit_options(p)
    _add_batch_options(p, normalize=False)
    p.set_defaults(method="match")

    p = sub.add_parser("inspect", help="show levels, pixel size, backend and tissue statistics")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help=argparse.SUPPRESS)

    patches_cli.add_parser(sub)

    p = sub.add_parser("demo", help="generate slides from four 'labs', normalize them onto one palette")
    p.add_argument("-o", "--output", type=Path, default=Path("vipsnorm-demo"), help="folder (default: %(default)s)")
    p.add_argument("--size", type=int, default=4096, help="slide width and height in pixels (default: %(default)s)")
    return parser


def _options(args) -> Options:
    return Options(
        strategy=args.sample,
        n_tiles=args.tiles,
        seed=args.seed,
        tissue=False if args.no_tissue_mask else None,
        max_pixels=args.max_pixels,
        backend=args.backend,
        **(
            dict(
                compression=args.compression,
                quality=args.quality,
                format=args.format,
                overwrite=not args.no_overwrite,
            )
            if args.command == "normalize"
            else {}
        ),
    )


def _report(row: dict, as_json: bool) -> None:
    """One line for one input: stdout for ok and skipped, stderr for errors (``--json``: all on stdout)."""
    from tqdm import tqdm  # writes around a progress bar, if one is shown

    if as_json:
        params = row.get("params")
        record = {
            "input": row["input"],
            "output": row.get("output"),
            "status": row["status"],
            "error": row.get("error"),
            "seconds": row.get("seconds"),
            "params": json.loads(params) if params else None,
        }
        tqdm.write(json.dumps(record), file=sys.stdout)
    elif row["status"] == "ok":
        tqdm.write(f"ok     {row['input']} -> {row['output']} ({row['seconds']:.1f} s)", file=sys.stdout)
    elif row["status"] == "skipped":
        tqdm.write(f"skip   {row['input']} -> {row['output']} (finished by an earlier run)", file=sys.stdout)
    else:
        tqdm.write(f"error  {row['error']}", file=sys.stderr)


def _check_inputs(args) -> None:
    if not args.inputs and not args.list:
        raise ValueError(f"no input: give files or folders, or --list FILE (see 'vipsnorm {args.command} --help')")


def _normalize(args) -> int:
    _check_inputs(args)
    options = _options(args)
    reference = None
    if args.reference:
        # an image reference is the target of the chosen method (default: match, its palette)
        reference = load_reference(args.reference, args.method or "match", options, **method_options(args))
    params = reference.params if reference is not None and reference.kind == "params" else None
    if params is not None:
        if args.method not in (None, params.method):
            raise InvalidReferenceError(args.reference, f"holds {params.method} parameters but --method is {args.method}")
        method = build_method(params.method)
    else:
        name = args.method or (reference.method if reference is not None else "equalize")
        if reference is not None and not shares_target(reference.method, name):
            # never ignore a reference silently
            raise InvalidReferenceError(args.reference, f"is a {reference.method} target; --method {name} cannot use it")
        try:
            method = build_method(name, reference, **method_options(args))
        except InvalidReferenceError as exc:
            raise InvalidReferenceError(args.reference, exc.cause) from None
    summary = normalize_batch(
        args.inputs,
        args.output,
        method,
        params=params,
        options=options,
        lists=args.list,
        include=args.include,
        exclude=args.exclude,
        manifest=args.manifest,
        overwrite=args.overwrite,
        scheduler=args.scheduler,
        workers=args.workers,
        reference=str(args.reference or ""),
        progress=args.progress,
        on_row=lambda row: _report(row, args.json),
    )
    print(summary.line(), file=sys.stderr)
    return 1 if summary.error else 0


def _fit(args) -> int:
    _check_inputs(args)
    options = _options(args)
    cache = args.cache if args.cache is not None else default_cache(args.output)
    reference, results = fit_batch(
        args.inputs,
        args.method,
        method_options=method_options(args),
        options=options,
        lists=args.list,
        include=args.include,
        exclude=args.exclude,
        cache=cache,
        overwrite=args.overwrite,
        scheduler=args.scheduler,
        workers=args.workers,
        progress=args.progress,
    )
    for result in results:
        if result.status == "error":
            print(f"error  {result.error}", file=sys.stderr)
    save_reference(reference, args.output)
    failed = sum(r.status == "error" for r in results)
    kept = sum(r.status == "skipped" for r in results)
    print(
        f"{args.method} reference fitted on {len(results) - failed} of {len(results)} inputs "
        f"({kept} summarized by an earlier run, kept in {cache}) -> {args.output}"
    )
    return 1 if failed else 0


def _inspect(args) -> int:
    from .io.slide import open_slide
    from .sampling import sample_slide

    failed = 0
    for path in args.inputs:
        try:
            with open_slide(path, max_pixels=args.max_pixels) as slide:
                info = slide.describe()
                try:
                    sample = sample_slide(slide, pixels=Macenko.sample_pixels)
                    info["sample"] = sample.source
                    info["stats"] = sample.stats()
                except VipsnormError as exc:
                    info["stats"] = None
                    info["sample"] = exc.cause
                    sample = None
                info["stains"] = None
                if sample is not None and sample.bands == 3:
                    try:
                        info["stains"] = stain_summary(Macenko().fit(sample))
                    except VipsnormError as exc:
                        info["stains"] = exc.cause
        except VipsnormError as exc:
            failed += 1
            print(f"error  {exc}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(info))
            continue
        print(f"{info['path']}")
        print(f"  backend   {info['backend']} ({info['loader']}), vendor: {info['vendor'] or 'none (ordinary image)'}")
        mpp = info["mpp"]
        print(f"  pixel     {'unknown' if mpp is None else f'{mpp[0]:g} x {mpp[1]:g} um'}")
        for i, lvl in enumerate(info["levels"]):
            print(f"  level {i:<3} {lvl['width']} x {lvl['height']}  (downsample {lvl['downsample']:g})")
        if info["associated"]:
            print(f"  associated images (not processed): {', '.join(info['associated'])}")
        print(f"  sample    {info['sample']}")
        stains = info["stains"]
        if isinstance(stains, str):
            print(f"  stains    {stains}")
        elif stains:
            print(f"  stains    {_format_stains(stains)}")
        for name, st in (info["stats"] or {}).items():
            print(
                f"  {name:<5} mean {st['mean']:7.2f}  std {st['std']:6.2f}  min {st['min']:3d}  "
                f"p2 {st['p2']:6.1f}  median {st['median']:6.1f}  p98 {st['p98']:6.1f}  max {st['max']:3d}"
            )
    return 1 if failed else 0


def _format_stains(stains: dict) -> str:
    """One line: the fitted Macenko stain vectors (optical density, RGB) and 99th-percentile concentrations."""
    vector = lambda v: "(" + ", ".join(f"{x:.3f}" for x in v) + ")"  # noqa: E731
    c = stains["max_concentrations"]
    return (
        f"Macenko H {vector(stains['hematoxylin'])} E {vector(stains['eosin'])}, "
        f"max concentration H {c['hematoxylin']:.2f} E {c['eosin']:.2f}"
    )


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.output, args.size)


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 are shown, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = _parser().parse_args(argv)
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    try:
        commands = {"normalize": _normalize, "fit": _fit, "inspect": _inspect, "patches": patches_cli.run, "demo": _demo}
        return commands[args.command](args)
    except VipsnormError as exc:
        print(f"error  {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad option values
        print(f"error  {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output folder, the manifest or the table cannot be written
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error  {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
