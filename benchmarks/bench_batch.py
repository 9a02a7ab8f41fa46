#!/usr/bin/env python
"""Batch benchmark: many small JPEGs and a few slides, vipsnorm on 1 and 2 Dask workers against the floor.

Two data sets are generated once and cached in ``--workdir`` (not timed): ``--images`` 512x512 JPEGs
(Q90, crops of synthetic H&E, two sub-folders) and ``--slides`` synthetic pyramidal TIFF slides of
``--slide-size`` pixels square. On each set, every case runs in its own fresh Python process:

``floor``
    Plain pyvips decode + encode of the same files, one after the other in one process, with the
    output vipsnorm writes (JPEG Q90 for the images; the pyramidal tiled BigTIFF for the slides).
``in-process``
    ``vipsnorm.batch.normalize_batch(..., workers=0)``: the whole vipsnorm job for every file (open,
    fit, apply, write, manifest), no Dask. The per-file cost of the method itself, apart from the engine.
``1 worker``, ``2 workers``
    The same call on a local Dask cluster of 1 and 2 worker processes (``--workers N``): libvips threads
    per worker = cores / workers. "job" is the whole command (cluster start + work); "work" starts once
    the workers are up and have imported vipsnorm, pyvips and OpenSlide (about 0.5 s per worker, paid
    once per run, in "cluster start").
``no-op, 1 worker``
    The scheduling machinery alone on 1 worker: the same discovery, grouping into tasks, tasks sent
    to the worker and rows returned and appended to a manifest, but each task touches no file. Its work
    time divided by the number of files is the engine's overhead per file.

Goals (issue 5): 1 worker within **1.15x** of the floor; 2 workers at least **1.7x** the throughput of 1;
scheduler overhead per small image under **1 ms**.

Usage::

    python benchmarks/bench_batch.py [--images 2000] [--slides 4] [--slide-size 10000] [--method stretch]
                                     [--rounds 3] [--workdir DIR] [--markdown OUT.md] [--json OUT.json]

Each case runs ``--rounds`` times, the cases interleaved round by round; the table shows each case's best
round (the least disturbed on a shared machine) and lists every round's time.

The driver imports neither pyvips nor vipsnorm: generation and every case run in child processes, which
import a snapshot of ``src/vipsnorm`` (as in ``bench_core.py``), so that the run measures one code
version even while src/ is edited.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core  # noqa: E402  (the code snapshot and the machine description)

GOAL_ONE_WORKER = 1.15
GOAL_TWO_WORKERS = 1.7
GOAL_OVERHEAD_MS = 1.0
CASES = ("floor", "in-process", "1 worker", "2 workers", "no-op, 1 worker")


# --------------------------------------------------------------------------------------------------
# child: one case, one process


def _noop(job, items):
    """A task that touches no file: one row per file, as a real task returns."""
    return [{"index": i.index, "input": i.input, "status": "ok", "worker": "noop"} for i in items]


def _warm_up() -> None:
    import openslide  # noqa: F401
    import pyvips

    import vipsnorm.batch.run  # noqa: F401

    pyvips.Image.black(64, 64).avg()


def _child(case: str, dataset: str, out: str, method_name: str) -> None:
    import resource

    import pyvips

    from vipsnorm.batch import normalize_batch
    from vipsnorm.batch.inputs import discover, plan
    from vipsnorm.engine import build_method

    files = sorted(str(p) for p in Path(dataset).rglob("*") if p.suffix in (".jpg", ".tif"))
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    method = build_method(method_name)
    manifest = out_path.with_name(out_path.name + ".manifest.csv")
    startup, ok = 0.0, 0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    if case == "floor":
        from vipsnorm.io.write import write_pyramid

        t0 = time.perf_counter()
        for path in files:
            target = out_path / Path(path).relative_to(dataset)
            target.parent.mkdir(parents=True, exist_ok=True)
            image = pyvips.Image.new_from_file(path, fail_on="error")
            if path.endswith(".tif"):
                mpp = (1000.0 / image.xres, 1000.0 / image.yres)
                write_pyramid(image, target, mpp=mpp, compression="jpeg", quality=90, tile=256)
            else:
                image.jpegsave(str(target), Q=90)
            ok += 1
        seconds = time.perf_counter() - t0
    elif case == "in-process":
        t0 = time.perf_counter()
        summary = normalize_batch([dataset], out_path, method, workers=0, manifest=manifest)
        seconds, ok = time.perf_counter() - t0, summary.ok
    else:
        from vipsnorm.batch.cluster import DaskRunner, local_size, start_local

        n = 2 if case.startswith("2") else 1
        t0 = time.perf_counter()
        client, cluster = start_local(*local_size(len(files), n))
        client.run(_warm_up)  # what the first file would import, once per worker: a fixed cost, counted in start
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        if case.startswith("no-op"):
            from vipsnorm.batch.manifest import Manifest
            from vipsnorm.batch.run import _group

            items = plan(discover([dataset]), out_path)
            runner = DaskRunner(client)
            counted = []
            with Manifest.open(manifest) as book:
                runner.run(_noop, None, _group(items, runner.threads()), lambda rows: (book.append(rows), counted.extend(rows)),
                           lambda item, cause: {"input": item.input, "status": "error"})  # fmt: skip
            ok = sum(r["status"] == "ok" for r in counted)
        else:
            summary = normalize_batch([dataset], out_path, method, client=client, manifest=manifest)
            ok = summary.ok
        seconds = time.perf_counter() - t1
        client.close()
        cluster.close()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "case": case, "files": len(files), "ok": ok, "seconds": seconds, "startup_seconds": startup,
        "client_cpu_seconds": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
        "concurrency": pyvips.concurrency_get(),
    }), flush=True)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# inputs (cached, not timed)

_GENERATE_JPEGS = """
import sys
from pathlib import Path
from vipsnorm.synth import synthetic_slide
folder, n = Path(sys.argv[1]), int(sys.argv[2])
per_image = 16 * 16  # 512 px crops of one 8192 px synthetic slide
for start in range(0, n, per_image):
    big = synthetic_slide(8192, 8192, seed=start // per_image, tissue=0.8)
    for i in range(start, min(n, start + per_image)):
        k = i - start
        target = folder / ("a" if i % 2 else "b") / f"tile{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        big.crop(512 * (k % 16), 512 * (k // 16), 512, 512).jpegsave(str(target), Q=90)
"""

_GENERATE_SLIDES = """
import sys
from pathlib import Path
from vipsnorm.synth import write_synthetic_slide
folder, n, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
folder.mkdir(parents=True, exist_ok=True)
labs = ("reference", "pale-blue", "dark-pink", "yellow")
for i in range(n):
    write_synthetic_slide(folder / f"slide{i}.tif", size, size, lab=labs[i % 4], seed=i, mpp=0.25)
"""


def _ensure(workdir: Path, name: str, code: str, *args: str) -> Path:
    folder = workdir / f"{name}-{bench_core._code_hash('synth.py')}"
    if not folder.is_dir():
        print(f"generating {folder.name} (not timed) ...", file=sys.stderr, flush=True)
        temp = workdir / f".{folder.name}-{os.getpid()}"
        shutil.rmtree(temp, ignore_errors=True)
        bench_core._helper(code, str(temp), *args)
        os.replace(temp, folder)
    return folder


def _run_child(case: str, dataset: Path, out: Path, method: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--dataset", str(dataset), "--out", str(out),
           "--method", method]  # fmt: skip
    import resource

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=bench_core._child_env())
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    process_seconds = time.perf_counter() - t0
    # user + system CPU of the case's process and every process it waited for (its Dask workers), from
    # start to exit: imports and cluster start included. Steadier than wall time on a shared machine.
    process_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"case {case!r} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    record = json.loads(lines[-1])
    if record["ok"] != record["files"]:
        raise RuntimeError(f"case {case!r}: {record['ok']} of {record['files']} files ok\n{proc.stderr}")
    record.update(process_seconds=process_seconds, process_cpu_seconds=process_cpu, loadavg_1min=[load_before, os.getloadavg()[0]])
    return record


# --------------------------------------------------------------------------------------------------
# report


def _markdown(results: dict[str, dict[str, dict]], machine: dict, args) -> str:
    lines = [
        f"Measured {machine['date']} on {machine['cores']} cores ({machine['cpu']}, {machine['mem_gb']:.0f} GB RAM), "
        f"Python {machine['python']}, pyvips {machine['pyvips']}, libvips {machine['libvips']}. vipsnorm at commit "
        f"{machine['commit']}" + (" with uncommitted changes in src/" if machine["dirty"] else "")
        + f"; method `{args.method}`; each case in a fresh process, {args.rounds} round(s) with the cases interleaved, "
        "the best round of each case in the table (every round's work time below it).",
        "",
    ]
    for name, cases in results.items():
        floor = cases["floor"]
        n = floor["files"]
        lines += [
            f"**{name}** ({n} files)",
            "",
            "| case | job s | cluster start s | work s | files/s (work) | work x floor | job x floor | process CPU s | CPU x floor |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for case, r in cases.items():
            job = r["seconds"] + r["startup_seconds"]
            cpu = r.get("process_cpu_seconds", float("nan"))
            lines.append(
                f"| {case} | {job:.2f} | {r['startup_seconds']:.2f} | {r['seconds']:.2f} | {n / r['seconds']:.1f} | "
                f"{r['seconds'] / floor['seconds']:.2f} | {job / floor['seconds']:.2f} | {cpu:.2f} | "
                f"{cpu / floor.get('process_cpu_seconds', float('nan')):.2f} |"
            )
        one, two, noop = cases.get("1 worker"), cases.get("2 workers"), cases.get("no-op, 1 worker")
        lines.append("")
        if one:
            ratio = one["seconds"] / floor["seconds"]
            verdict = "ok" if ratio <= GOAL_ONE_WORKER else "MISS"
            text = (f"- 1 worker / floor (work): **{ratio:.2f}x** (goal {GOAL_ONE_WORKER}x: {verdict}); "
                    f"whole job {(one['seconds'] + one['startup_seconds']) / floor['seconds']:.2f}x")  # fmt: skip
            here = cases.get("in-process")
            if here:  # the method's own cost per file, and the engine's on top of it
                text += (f"; in-process / floor {here['seconds'] / floor['seconds']:.2f}x, "
                         f"1 worker / in-process {one['seconds'] / here['seconds']:.2f}x")  # fmt: skip
            lines.append(text)
        if one and two:
            speedup = one["seconds"] / two["seconds"]
            verdict = "ok" if speedup >= GOAL_TWO_WORKERS else "MISS"
            lines.append(f"- 2 workers / 1 worker throughput (work): **{speedup:.2f}x** (goal {GOAL_TWO_WORKERS}x: {verdict})")
        if noop:
            per_file = noop["seconds"] / n * 1000
            if "JPEG" in name:
                verdict = f"goal < {GOAL_OVERHEAD_MS} ms: " + ("ok" if per_file < GOAL_OVERHEAD_MS else "MISS")
            else:
                verdict = "one task per slide; the goal is for small images"
            lines.append(f"- engine overhead per file (no-op tasks, same grouping, 1 worker): **{per_file:.3f} ms** ({verdict})")
        lines.append("- work s of every round: " + "; ".join(
            f"{case} " + ", ".join(f"{v:.2f}" for v in r["round_seconds"]) for case, r in cases.items()))  # fmt: skip
        lines.append("- process CPU s: user + system time of the case's process and its workers, start to exit (imports, "
                     "cluster start and data listing included): the steadier figure on a shared machine")
        lines.append("")
    loads = [v for cases in results.values() for r in cases.values() for v in r["loadavg_1min"]]
    lines.append(f"1-minute load average around the cases: {min(loads):.1f} to {max(loads):.1f} on {machine['cores']} cores"
                 + (" (shared machine: wall times are noisy)." if max(loads) > machine["cores"] * 0.75 else "."))  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="512x512 JPEGs (default: %(default)s)")
    parser.add_argument("--slides", type=int, default=4, help="generated slides (default: %(default)s; 0: none)")
    parser.add_argument("--slide-size", type=int, default=10000, help="slide side in pixels (default: %(default)s)")
    parser.add_argument("--method", default="stretch", help="vipsnorm method (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every case, interleaved; the best of each is reported (default: %(default)s)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vipsnorm-bench-batch"), help="inputs and outputs")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--json", type=Path, help="also write every raw measurement to this file")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), metavar="CASE",
                        help=f"subset of cases ('floor' is always run): {', '.join(repr(c) for c in CASES)}")  # fmt: skip
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        _child(args.child, args.dataset, args.out, args.method)
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    bench_core._CODE_DIR, code_info = bench_core._snapshot_code(args.workdir)
    machine = {**bench_core._machine(), **code_info}
    print(f"code: {code_info['code']} (commit {code_info['commit']}{', src/ modified' if code_info['dirty'] else ''})",
          file=sys.stderr, flush=True)  # fmt: skip
    datasets = {}
    if args.images:
        datasets[f"{args.images} JPEGs, 512x512"] = _ensure(args.workdir, f"jpegs-{args.images}", _GENERATE_JPEGS, str(args.images))
    if args.slides:
        name = f"{args.slides} slides, {args.slide_size}x{args.slide_size}"
        datasets[name] = _ensure(args.workdir, f"slides-{args.slides}x{args.slide_size}", _GENERATE_SLIDES, str(args.slides),
                                 str(args.slide_size))  # fmt: skip
    cases = ["floor"] + [c for c in CASES if c in args.cases and c != "floor"]
    results: dict[str, dict[str, dict]] = {}
    for name, folder in datasets.items():
        for path in folder.rglob("*"):  # every case starts with the files in the page cache
            if path.is_file():
                path.read_bytes()
        results[name] = {}
        runs: dict[str, list[dict]] = {case: [] for case in cases}
        for round_ in range(args.rounds):  # cases interleaved round by round: a slow spell hits all of them
            for case in cases:
                out = args.workdir / "out" / case.replace(" ", "_").replace(",", "")
                print(f"[{name}] {case} (round {round_ + 1}/{args.rounds}) ...", end=" ", file=sys.stderr, flush=True)
                record = _run_child(case, folder, out, args.method)
                shutil.rmtree(out, ignore_errors=True)
                out.with_name(out.name + ".manifest.csv").unlink(missing_ok=True)
                runs[case].append(record)
                print(f"{record['seconds']:.2f} s (+{record['startup_seconds']:.2f} s start)", file=sys.stderr, flush=True)
        for case, records in runs.items():  # the best round of each case (least disturbed), with every round's time
            best = dict(min(records, key=lambda r: r["seconds"]))
            best["round_seconds"] = [r["seconds"] for r in records]
            best["loadavg_1min"] = [v for r in records for v in r["loadavg_1min"]]
            results[name][case] = best
    text = _markdown(results, machine, args)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
