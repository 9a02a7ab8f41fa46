"""Keras 3 preprocessing layers wrapping the augmentations of :mod:`vipsnorm.training.augment`.

Each layer applies its augmentation to every image of a batch when called with ``training=True`` (as
``model.fit`` does) and passes the batch through unchanged otherwise (``predict``, ``evaluate``). The
layers are configurable with the augmentation's own arguments, serializable (``get_config`` /
``from_config``, registered under the package name ``vipsnorm``), and seeded runs are reproducible.

Notes
-----
Inputs are ``(batch, h, w, channels)`` or ``(h, w, channels)`` images, channels last, 1 or 3 channels,
of any dtype with values in ``value_range`` (default 0..255; ``(0, 1)`` for scaled floats). Each
augmented image is quantized to uint8 over that range, transformed by the numpy augmentation and
scaled back to the input's dtype; images the augmentation skips (probability ``p``) are returned
bit for bit. The work is numpy on the CPU, outside any compiled graph: use a backend that runs layers
eagerly (torch, jax, or TensorFlow with ``run_eagerly=True``). Importing this module imports keras.
"""

from __future__ import annotations

try:
    import keras
except ImportError as exc:  # keras missing, or its default backend (TensorFlow) not installed
    raise ImportError(
        f"vipsnorm.training.keras_layers needs Keras 3 and a backend: pip install 'vipsnorm[keras]' and set "
        f"KERAS_BACKEND (e.g. torch) ({exc})"
    ) from exc

import numpy as np

from . import augment

__all__ = [
    "AugmentationLayer",
    "RandomStretch",
    "RandomEqualization",
    "RandomClahe",
    "RandomHistogramMatch",
    "RandomStainJitter",
]


class AugmentationLayer(keras.layers.Layer):
    """Apply a :class:`~vipsnorm.training.augment.Augmentation` to each image while training.

    Subclasses build their augmentation from their own arguments; :meth:`get_config` returns them.
    """

    def __init__(self, augmentation: augment.Augmentation, value_range=(0.0, 255.0), **kwargs):
        super().__init__(**kwargs)
        lo, hi = float(value_range[0]), float(value_range[1])
        if not hi > lo:
            raise ValueError(f"value_range must be (low, high) with high > low, not {value_range!r}")
        self.augmentation = augmentation
        self.value_range = (lo, hi)

    def call(self, inputs, training=True):
        # as Keras' own augmentation layers: on unless told otherwise (fit passes True, predict and
        # evaluate pass False)
        if not training:
            return inputs
        x = keras.ops.convert_to_numpy(inputs)
        single = x.ndim == 3
        batch = x[np.newaxis] if single else x
        if batch.ndim != 4 or batch.shape[-1] not in (1, 3):
            raise ValueError(f"{self.name}: expected (batch, h, w, 1 or 3) images, not shape {x.shape}")
        lo, hi = self.value_range
        out = batch.copy()
        for i, image in enumerate(batch):
            params = self.augmentation.draw(self.augmentation.rng)
            if params is None:
                continue
            if image.dtype == np.uint8 and self.value_range == (0.0, 255.0):
                pixels = image
            else:
                pixels = np.clip(np.rint((image.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(
                    np.uint8
                )
            result = self.augmentation.apply(pixels, **params)
            if out.dtype == np.uint8 and self.value_range == (0.0, 255.0):
                out[i] = result
            else:
                out[i] = (result.astype(np.float64) * ((hi - lo) / 255.0) + lo).astype(out.dtype)
        out = out[0] if single else out
        return keras.ops.convert_to_tensor(out, dtype=inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), **self.augmentation.config(), "value_range": list(self.value_range)}


@keras.saving.register_keras_serializable(package="vipsnorm")
class RandomStretch(AugmentationLayer):
    """:class:`vipsnorm.training.augment.RandomStretch` as a layer (same arguments, plus
    ``value_range`` and the Keras layer arguments)."""

    def __init__(
        self, low=(0.0, 5.0), high=(95.0, 100.0), mode="joint", p=1.0, seed=None, value_range=(0.0, 255.0), **kwargs
    ):
        super().__init__(augment.RandomStretch(low, high, mode, p, seed), value_range, **kwargs)


@keras.saving.register_keras_serializable(package="vipsnorm")
class RandomEqualization(AugmentationLayer):
    """:class:`vipsnorm.training.augment.RandomEqualization` as a layer."""

    def __init__(self, mode="luminance", p=0.5, seed=None, value_range=(0.0, 255.0), **kwargs):
        super().__init__(augment.RandomEqualization(mode, p, seed), value_range, **kwargs)


@keras.saving.register_keras_serializable(package="vipsnorm")
class RandomClahe(AugmentationLayer):
    """:class:`vipsnorm.training.augment.RandomClahe` as a layer."""

    def __init__(
        self, clip_limit=(1.0, 4.0), grid=(8, 8), mode="luminance", p=1.0, seed=None, value_range=(0.0, 255.0), **kwargs
    ):
        super().__init__(augment.RandomClahe(clip_limit, grid, mode, p, seed), value_range, **kwargs)


@keras.saving.register_keras_serializable(package="vipsnorm")
class RandomHistogramMatch(AugmentationLayer):
    """:class:`vipsnorm.training.augment.RandomHistogramMatch` as a layer (its config holds the
    references' histograms)."""

    def __init__(self, references, mode="rgb", p=1.0, seed=None, value_range=(0.0, 255.0), **kwargs):
        super().__init__(augment.RandomHistogramMatch(references, mode, p, seed), value_range, **kwargs)


@keras.saving.register_keras_serializable(package="vipsnorm")
class RandomStainJitter(AugmentationLayer):
    """:class:`vipsnorm.training.augment.RandomStainJitter` as a layer."""

    def __init__(
        self, scale=(0.8, 1.2), shift=0.05, stains="fit", p=1.0, seed=None, value_range=(0.0, 255.0), **kwargs
    ):
        super().__init__(augment.RandomStainJitter(scale, shift, stains, p, seed), value_range, **kwargs)
