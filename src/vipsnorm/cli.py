"""The ``vipsnorm`` command line: normalize, fit, inspect, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .batch import SCHEDULER_ENV, fit_batch, normalize_batch
from .batch.fitcache import default_cache
from ._options import add_engine_options, add_method_options, method_options
from .engine import FORMATS, Options, build_method, load_reference, shares_target
from .errors import InvalidReferenceError, OutputError, VipsnormError
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


#: The methods 'vipsnorm fit' makes a dataset reference for (clahe is fitted on each image's own layout).
_FIT_METHODS = sorted(name for name, cls in METHODS.items() if not cls.spatial)


def _fit_method(name: str) -> str:
    """``fit --method``: any method name, so that clahe is refused by :func:`~vipsnorm.engine.check_fit`
    with the reason; the usage and the help list only the methods it fits."""
    if name not in METHODS:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(_FIT_METHODS)})")
    return name


def _positive_int(text: str) -> int:
    """A count of 1 or more, for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _add_fit_options(p: argparse.ArgumentParser, fit: bool = False) -> None:
    g = p.add_argument_group("fitting")
    if fit:
        g.add_argument(
            "--method",
            type=_fit_method,
            metavar="{" + ",".join(_FIT_METHODS) + "}",
            help="what to fit (default: match): match, its tissue palette; reinhard, macenko or vahadane, "
            "their stain target; stretch or equalize, their parameters, applied unchanged to every image",
        )
    else:
        g.add_argument(
            "--method",
            choices=sorted(METHODS),
            help="normalization method (default: equalize; match when --reference is an image or a palette "
            "JSON; the fitted method when --reference is a parameters JSON)",
        )
    add_method_options(g)
    if fit:
        # clahe's options stay accepted, to be refused by check_fit with the reason, but are not offered:
        # no method that 'fit' fits takes them
        for action in g._group_actions:
            if action.dest in ("clip_limit", "grid", "region", "region_um"):
                action.help = argparse.SUPPRESS
            elif action.dest == "mode":
                action.help = "channels: joint|rgb (stretch), luminance|rgb (equalize, match)"
    g.add_argument(
        "--sample",
        choices=STRATEGIES,
        default="tiles",
        help="slides: fit on random full-resolution tissue tiles (default), the low-resolution level, "
        "or every tissue pixel (exact, one extra full pass). Ordinary images always use every pixel.",
    )
    g.add_argument("--tiles", type=_positive_int, default=256, help="number of tiles sampled (default: %(default)s)")
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
        help="match, reinhard, macenko, vahadane: an image or slide whose tissue is the target, or a target "
        "JSON from 'vipsnorm fit'; stretch, equalize: a parameters JSON from 'vipsnorm fit', applied "
        "unchanged to every input (its method and options are the fitted ones); clahe takes none",
    )
    _add_fit_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=FORMATS, default="auto", help="auto: pyramidal TIFF for slides, input format for images")
    g.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        help="TIFF outputs only: jpeg (lossy, --quality), deflate or lzw (lossless), none (default: jpeg for slide "
        "pyramids, deflate for ordinary images written as TIFF); refused with --format jpeg, png or webp",
    )
    g.add_argument(
        "--quality",
        type=int,
        default=90,
        help="JPEG and lossy WebP quality, and TIFF's with --compression jpeg (default: %(default)s); a lossless "
        "WebP input stays lossless",
    )
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
        "reinhard, macenko or vahadane the stain target they map onto; with stretch/equalize it is their "
        "parameters, applied unchanged to every image.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="slides, images, or folders of them (searched recursively)")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="REF.json",
        help="the reference, a JSON file (replaced if it exists; never one of the inputs)",
    )
    _add_fit_options(p, fit=True)
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


def _check_output_folder(out: Path) -> None:
    """``normalize -o``: a folder, or a path to create one at."""
    if out.exists() and not out.is_dir():
        raise OutputError(out, "is a file, not a folder: -o names the output folder (created if missing)")


def _check_reference_file(args) -> None:
    """``fit -o``: a JSON file name in an existing folder, never a folder nor a file this fit reads (an
    existing reference is replaced, as a rerun must)."""
    out: Path = args.output
    if out.is_dir():
        raise OutputError(out, f"is a folder; -o names the reference's JSON file, such as {out / 'reference.json'}")
    read = [("an input of this fit", p) for p in args.inputs] + [("a --list file", p) for p in args.list]
    if args.cache is not None:  # written during the fit, so perhaps not there yet
        read.append(("the --cache file", args.cache))
    for what, path in read:
        if _same_file(path, out):
            raise OutputError(out, f"is {what}; writing the reference there would replace it: choose another -o")
    if out.suffix.lower() != ".json":
        raise OutputError(out, "the reference is written as JSON: give -o a file name ending in .json")
    if not out.parent.is_dir():
        raise OutputError(out, f"folder {out.parent} does not exist; create it or choose another -o")


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether paths ``a`` and ``b`` name one file (through links when both exist)."""
    if os.path.isfile(a) and os.path.isfile(b):
        return os.path.samefile(a, b)
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def _normalize(args) -> int:
    _check_inputs(args)
    _check_output_folder(args.output)
    options = _options(args)
    if args.reference and args.method and METHODS[args.method].spatial:
        raise InvalidReferenceError(
            args.reference, f"method {args.method!r} takes no reference: it is fitted on each image itself; leave out --reference"
        )
    reference = None
    if args.reference:
        # an image reference is the target of the chosen method (default: match, its palette)
        reference = load_reference(args.reference, args.method or "match", options, **method_options(args))
    params = reference.params if reference is not None and reference.kind == "params" else None
    if params is not None:
        if args.method not in (None, params.method):
            raise InvalidReferenceError(args.reference, f"holds {params.method} parameters but --method is {args.method}")
        build_method(params.method, **method_options(args))  # options the method takes at all
        given = [k for k, v in method_options(args).items() if v is not None]
        if given:  # never ignored silently: the fitted parameters already settle what they would
            names = ", ".join("--" + k.replace("_", "-") for k in given)
            raise InvalidReferenceError(
                args.reference,
                f"holds fitted {params.method} parameters, which fix what {names} would set: leave "
                f"{'it' if len(given) == 1 else 'them'} out, or give {'it' if len(given) == 1 else 'them'} "
                f"to 'vipsnorm fit --method {params.method}' and normalize with the new reference",
            )
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
    _check_reference_file(args)
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
