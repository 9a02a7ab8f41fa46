#!/usr/bin/env python
"""Keras 3 end to end: patches from generated slides of two "labs", a normalized batched dataset, the
augmentations as preprocessing layers, and a few training steps of a tiny CNN.

    KERAS_BACKEND=torch python examples/train_keras.py --out /tmp/vipsnorm-keras --steps 50

The same data as ``train_torch.py`` (which explains the steps): ``KerasPatchDataset`` (a
``keras.utils.PyDataset``) yields normalized float batches in [0, 1]; the random stain jitter and CLAHE
run inside the model as layers, only while training, and are saved with it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported; TensorFlow or JAX work too when installed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_torch import make_slides  # noqa: E402  (the same generated slides)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("vipsnorm-keras-example"), help="work folder")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--size", type=int, default=1024, help="slide side in pixels")
    parser.add_argument("--patches", type=int, default=64, help="random patches per slide")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)

    import keras

    from vipsnorm.training import keras_layers
    from vipsnorm.training.cli import main as patches_main
    from vipsnorm.training.datasets import KerasPatchDataset

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    slides = make_slides(args.out, args.size)
    table = args.out / "patches" / "patches.csv"
    options = f"--size 128 --random {args.patches} --min-tissue 0.2 --format coords --seed 0"
    code = patches_main([*map(str, slides), "-o", str(table.parent), *options.split()])  # vipsnorm patches ...
    if code != 0:
        raise SystemExit(f"vipsnorm patches failed (exit {code})")
    dataset = KerasPatchDataset.from_table(
        table, labels=lambda patch: int(patch.tissue >= 0.9), method="macenko", batch_size=args.batch, seed=0
    )

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((128, 128, 3)),
            keras_layers.RandomStainJitter(scale=(0.8, 1.2), shift=0.03, value_range=(0, 1), seed=1),
            keras_layers.RandomClahe(clip_limit=(1.0, 3.0), grid=(4, 4), p=0.5, value_range=(0, 1), seed=2),
            keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(dataset, epochs=1, steps_per_epoch=min(args.steps, len(dataset)), verbose=2)
    losses = [float(v) for v in history.history["loss"]]
    epochs_left = args.steps - min(args.steps, len(dataset))
    if epochs_left > 0:  # more steps than one pass: whole epochs
        more = model.fit(dataset, epochs=-(-epochs_left // len(dataset)), verbose=2)
        losses += [float(v) for v in more.history["loss"]]
    path = args.out / "model.keras"
    model.save(path)  # the augmentation layers are saved with their configuration
    seconds = time.perf_counter() - start
    print(f"{dataset.n_patches} patches, model saved to {path} in {seconds:.1f} s", file=sys.stderr)
    return {"losses": losses, "patches": dataset.n_patches, "model": path, "seconds": seconds}


if __name__ == "__main__":
    main()
