"""Feeding training: normalized patches from slides, datasets for PyTorch and Keras, and random
augmentations built on the normalization methods.

- :mod:`.patches`: where patches go (grid or random over the tissue), their normalized pixels
  (:class:`~.patches.PatchReader`) and how they are written (files, WebDataset shards, a coordinates table).
- :mod:`.augment`: random transforms on uint8 HWC numpy arrays (stretch, equalization, CLAHE,
  histogram matching, stain jitter), each a thin class over a pure function of the methods' numpy paths.
- :mod:`.datasets`: a PyTorch map-style dataset and a Keras ``PyDataset`` over (slide, coordinates);
  torch and keras are imported only when these are used.
- :mod:`.keras_layers`: Keras 3 preprocessing layers wrapping the augmentations (imports keras).
- :mod:`.cli`: the ``vipsnorm patches`` subcommand.
"""

from .augment import (
    Augmentation,
    Compose,
    RandomClahe,
    RandomEqualization,
    RandomHistogramMatch,
    RandomStainJitter,
    RandomStretch,
)
from .patches import Patch, PatchJob, PatchReader, extract_slides, grid_patches, plan_patches, random_patches

__all__ = [
    "Patch",
    "PatchJob",
    "PatchReader",
    "grid_patches",
    "random_patches",
    "plan_patches",
    "extract_slides",
    "Augmentation",
    "Compose",
    "RandomStretch",
    "RandomEqualization",
    "RandomClahe",
    "RandomHistogramMatch",
    "RandomStainJitter",
]
