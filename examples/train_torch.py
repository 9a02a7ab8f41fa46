#!/usr/bin/env python
"""PyTorch end to end: patches from generated slides of two "labs", a normalized dataset with random
augmentations, and a few training steps of a tiny CNN.

    python examples/train_torch.py --out /tmp/vipsnorm-torch --steps 50 --workers 2

1. Two synthetic H&E slides, one per lab (``vipsnorm.synth``: the same tissue model, each lab's own stain
   colours), cached in OUT.
2. ``vipsnorm patches --format coords``: random 128 px patch positions over the tissue, in a table.
3. ``PatchDataset``: every slide fitted once with Macenko (onto the canonical H&E target), patches read
   through the normalized slide, then augmented (stain jitter, CLAHE, equalization) with per-item
   generators (``seed``), so the run is reproducible with any number of loader workers.
4. A tiny CNN learns a stand-in task: does the patch lie fully inside the tissue (tissue fraction at
   least 0.9) or on its border? Both labs are mixed, so it must not rely on their colours.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

LABS = {"reference": 0, "dark-pink": 1}


def make_slides(out: Path, size: int) -> list[Path]:
    """One generated slide per lab (cached)."""
    from vipsnorm.synth import write_synthetic_slide

    slides = []
    for lab in LABS:
        path = out / f"slide-{lab}-{size}.tif"
        if not path.exists():
            write_synthetic_slide(path, size, size, lab=lab, seed=LABS[lab], tissue=0.5)
        slides.append(path)
    return slides


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("vipsnorm-torch-example"), help="work folder")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--size", type=int, default=1024, help="slide side in pixels")
    parser.add_argument("--patches", type=int, default=64, help="random patches per slide")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args(argv)

    import torch
    from torch import nn

    from vipsnorm.training import Compose, RandomClahe, RandomEqualization, RandomStainJitter
    from vipsnorm.training.cli import main as patches_main
    from vipsnorm.training.datasets import PatchDataset

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    slides = make_slides(args.out, args.size)
    table = args.out / "patches" / "patches.csv"
    options = f"--size 128 --random {args.patches} --min-tissue 0.2 --format coords --seed 0"
    code = patches_main([*map(str, slides), "-o", str(table.parent), *options.split()])  # vipsnorm patches ...
    if code != 0:
        raise SystemExit(f"vipsnorm patches failed (exit {code})")

    augment = Compose(
        [
            RandomStainJitter(scale=(0.8, 1.2), shift=0.03),
            RandomClahe(clip_limit=(1.0, 3.0), grid=(4, 4), p=0.5),
            RandomEqualization(p=0.2),
        ]
    )
    dataset = PatchDataset.from_table(
        table,
        labels=lambda patch: int(patch.tissue >= 0.9),
        method="macenko",
        transform=augment,
        seed=0,
        as_tensor=True,
    )
    torch.manual_seed(0)
    # worker processes start from a fork server, not forked from this process (libvips' threads do not
    # survive a fork); every other argument is torch's DataLoader's
    loader = dataset.loader(
        batch_size=args.batch, shuffle=True, num_workers=args.workers, generator=torch.Generator().manual_seed(0)
    )
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses: list[float] = []
    epoch = 0
    while len(losses) < args.steps:
        dataset.set_epoch(epoch)  # new augmentations each epoch, the same in every run
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            print(f"step {len(losses):3d}  loss {losses[-1]:.4f}", flush=True)
            if len(losses) == args.steps:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    print(f"{len(dataset)} patches, {args.steps} steps in {seconds:.1f} s", file=sys.stderr)
    return {"losses": losses, "patches": len(dataset), "batch_shape": tuple(x.shape), "seconds": seconds}


if __name__ == "__main__":  # (DataLoader workers re-import this file when they are spawned)
    main()
