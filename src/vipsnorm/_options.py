"""Command-line options shared by ``vipsnorm normalize``/``fit`` and ``vipsnorm patches``: the method
options and the batch engine's choice of cluster (one definition, one help text)."""

from __future__ import annotations

import argparse

from .batch import SCHEDULER_ENV

__all__ = ["grid", "add_method_options", "method_options", "add_engine_options"]


def grid(text: str) -> tuple[int, int]:
    """``COLSxROWS`` (``8x8``) as ``(cols, rows)``, for argparse."""
    try:
        cols, rows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected COLSxROWS such as 8x8, not {text!r}") from None
    if cols < 1 or rows < 1:
        raise argparse.ArgumentTypeError(f"grid sizes must be positive, not {text!r}")
    return cols, rows


def add_method_options(g) -> None:
    """The options of the methods' constructors (``None`` when not given: the method's default)."""
    g.add_argument("--mode", help="channels: joint|rgb (stretch), luminance|rgb (equalize, match, clahe)")
    g.add_argument("--low", type=float, help="stretch: lower percentile (default 2; 0 = minimum)")
    g.add_argument("--high", type=float, help="stretch: upper percentile (default 98; 100 = maximum)")
    g.add_argument("--clip-limit", type=float, help="clahe: OpenCV's clipLimit (default 2; 0 = no clipping)")
    g.add_argument(
        "--grid", type=grid, metavar="COLSxROWS", help="clahe: regions across and down, as OpenCV's tileGridSize (default 8x8 for images)"
    )
    g.add_argument("--region", type=int, metavar="PX", help="clahe: region side in level-0 pixels (slides; default 1024)")
    g.add_argument(
        "--region-um", type=float, metavar="UM", help="clahe: region side in microns, where the pixel size is known"
    )


def method_options(args) -> dict:
    """The method options given on the command line (``None``: not given, the method's default)."""
    return {
        "mode": args.mode,
        "low": args.low,
        "high": args.high,
        "clip_limit": args.clip_limit,
        "grid": args.grid,
        "region": args.region,
        "region_um": args.region_um,
    }


def add_engine_options(g) -> None:
    """``--workers`` and ``--scheduler``: where the batch engine runs."""
    g.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes of the local cluster (default: one per core, as memory allows, or one plain "
        "child process for a batch of a single task; 0: run in this process, where a decoder crash ends the run)",
    )
    g.add_argument(
        "--scheduler",
        metavar="ADDR",
        help=f"use the Dask cluster at ADDR (tcp://host:port, or a scheduler file) (default: ${SCHEDULER_ENV})",
    )
