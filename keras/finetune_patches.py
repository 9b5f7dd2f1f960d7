"""Fine-tuning patches: the patch size rule and the sampler of (image, label) patches.

`SegmentationPatches` cuts patches on the fly from the prepared cases (`finetune_cases`):
a share of each epoch's items (`foreground_fraction`, a third by default: nnU-Net's share) is
centred on a foreground voxel, the others start anywhere; volumes smaller than the patch are
padded with `image_fill` (labels with 0).
With `augment` (`finetune_augment.AugmentSettings`), each patch is resampled from the whole
case with a drawn rotation, scaling and mirroring, then its intensities are changed
(`finetune_augment.augment_patch`); without it, a patch is a plain crop.

Randomness: batch i of epoch e draws from ``np.random.default_rng([seed, e, i])`` alone, so a
batch does not depend on the number of workers or on a resume.

Imports: NumPy, Keras (the dataset is a ``keras.utils.PyDataset``), `unet3d` (the
divisible-by-8 rule), `finetune_cases` and `finetune_augment`.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import keras
import numpy as np

import unet3d

# crop_padded lives with the augmentation's crops (one implementation); it is named here too.
from finetune_augment import AugmentSettings, augment_patch, crop_padded
from finetune_cases import FinetuneInputError, PreparedCase

__all__ = [
    "FOREGROUND_FRACTION",
    "PATCH_FACTOR",
    "SegmentationPatches",
    "check_patch",
    "crop_padded",
    "foreground_item",
    "one_hot",
    "patch_start",
]

# The U-Net pools three times by 2: every patch size must be a multiple of 8.
PATCH_FACTOR = 8
# nnU-Net's share of patches centred on a foreground voxel.
FOREGROUND_FRACTION = 1 / 3


def check_patch(patch: Sequence[int]) -> tuple[int, int, int]:
    """Check a patch size: three positive sizes, each divisible by 8.

    Args:
        patch: (R, C, D).

    Returns:
        The patch as a tuple of ints.

    Raises:
        FinetuneInputError: naming the axis and the nearest valid sizes.
    """
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3:
        raise FinetuneInputError(f"Expected --patch R C D (three sizes). Received: {patch}")
    for axis, size in zip(("R", "C", "D"), patch, strict=True):
        if size < 1 or size % PATCH_FACTOR:
            lower, upper = unet3d.valid_spatial_sizes(size, PATCH_FACTOR)
            nearest = f"{lower}" if lower == upper else f"{lower} or {upper}"
            raise FinetuneInputError(
                f"Expected every --patch size divisible by {PATCH_FACTOR} (the U-Net pools "
                f"three times by 2). Received: --patch {' '.join(map(str, patch))}, "
                f"{axis}={size}; the nearest valid sizes are {nearest}."
            )
    return patch


def one_hot(label: np.ndarray, n_classes: int, channel_axis: int) -> np.ndarray:
    """float32 one-hot of class indices (clipped to 0..n_classes-1), the classes on `channel_axis`
    (1 or -1)."""
    eye = np.eye(n_classes, dtype=np.float32)
    out = eye[np.clip(label, 0, n_classes - 1).astype(np.intp)]  # (..., n)
    return out if channel_axis == -1 else np.moveaxis(out, -1, channel_axis)


# ------------------------------------------------------------------------------------------
# The patch sampler (segmentation of volumes)
# ------------------------------------------------------------------------------------------


def foreground_item(k: int, fraction: float = FOREGROUND_FRACTION) -> bool:
    """Whether item k of an epoch (batch * batch_size + position) is centred on foreground.

    Items are forced evenly: item k is when ``floor((k + 1) f) > floor(k f)``, so any run of
    n items holds ``n f`` of them, rounded, whatever the batch size. With a third (nnU-Net's
    share) that is every third item; 0: none; 1: all.

    Args:
        k: the item's index in the epoch.
        fraction: the share of items centred on foreground, in [0, 1].
    """
    # An exact fraction, so that 1/3 gives items 2, 5, 8... with no rounding drift.
    f = Fraction(fraction).limit_denominator(1000)
    return (k + 1) * f.numerator // f.denominator > k * f.numerator // f.denominator


def patch_start(
    size: Sequence[int], patch: Sequence[int], rng: np.random.Generator, centre=None
) -> list[int]:
    """Where a patch starts: random, or centred on `centre` and kept inside the volume.

    A volume smaller than the patch along an axis is padded: the start is then between
    ``size - patch`` (negative) and 0, so the whole volume lies inside the patch.

    Args:
        size: the volume's (X, Y, Z).
        patch: (R, C, D).
        rng: the generator (used only for random starts).
        centre: a voxel index to centre on, or None.

    Returns:
        The start index per axis.
    """
    start = []
    for a, (n, p) in enumerate(zip(size, patch, strict=True)):
        lo, hi = min(0, n - p), max(0, n - p)
        if centre is None:
            start.append(int(rng.integers(lo, hi + 1)))
        else:
            start.append(int(np.clip(int(centre[a]) - p // 2, lo, hi)))
    return start


class SegmentationPatches(keras.utils.PyDataset):
    """(image patches, one-hot label patches) batches drawn from prepared cases on the fly.

    Batch i of epoch e draws from ``np.random.default_rng([seed, e, i])``: for each item a case
    (uniformly), and for a share of the epoch's items (`foreground_item`) a foreground class
    present in the case and one of its voxels to centre on; the others start anywhere.

    Args:
        cases: the `PreparedCase`s to draw from.
        patch: (R, C, D).
        batch_size: patches per batch.
        n_classes: classes including the background (the one-hot depth).
        steps: batches per epoch.
        seed: the seed.
        data_format: "channels_first" or "channels_last".
        fixed_epoch: always draw epoch `fixed_epoch`'s batches (validation: the same patches
            every epoch, so val_loss is comparable); None follows `set_epoch`.
        augment: what to draw for each patch; None (validation, the original's recipe): plain
            crops, and the generator draws exactly what it drew without augmentation.
        image_fill: the image's value outside the volume (0: air in the CT window; the
            normalised minimum for standardised intensities).
        foreground_fraction: the share of patches centred on a foreground voxel, in [0, 1].
        **kwargs: for `keras.utils.PyDataset` (workers, use_multiprocessing, max_queue_size).
    """

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        patch: Sequence[int],
        batch_size: int,
        n_classes: int,
        steps: int,
        seed: int,
        data_format: str = "channels_first",
        fixed_epoch: int | None = None,
        augment: AugmentSettings | None = None,
        image_fill: float = 0.0,
        foreground_fraction: float = FOREGROUND_FRACTION,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not cases:
            raise FinetuneInputError("Expected at least one case to sample patches from.")
        if not 0.0 <= float(foreground_fraction) <= 1.0:
            raise FinetuneInputError(
                "Expected foreground_fraction in [0, 1]. Received: "
                f"foreground_fraction={foreground_fraction!r}"
            )
        self.foreground_fraction = float(foreground_fraction)
        self.cases = list(cases)
        self.patch = tuple(int(p) for p in patch)
        self.batch_size, self.n_classes, self.steps = int(batch_size), int(n_classes), int(steps)
        self.seed, self.data_format, self.fixed_epoch = int(seed), data_format, fixed_epoch
        self.augment, self.image_fill = augment, float(image_fill)
        self._epoch = 0
        self._with_fg = [i for i, c in enumerate(self.cases) if c.has_foreground]

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch `epoch`'s batches from now on (called before each epoch)."""
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def sample(self, rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """One patch: (image (channels, R, C, D), label (R, C, D), centred on foreground)."""
        on_fg = foreground_item(k, self.foreground_fraction) and bool(self._with_fg)
        if on_fg:
            case = self.cases[self._with_fg[int(rng.integers(len(self._with_fg)))]]
            classes = [c for c, v in sorted(case.foreground.items()) if len(v)]
            locations = case.foreground[classes[int(rng.integers(len(classes)))]]
            centre = locations[int(rng.integers(len(locations)))]
        else:
            case = self.cases[int(rng.integers(len(self.cases)))]
            centre = None
        start = patch_start(case.label.shape, self.patch, rng, centre)
        if self.augment is not None:
            middle = [s + p // 2 for s, p in zip(start, self.patch, strict=True)]
            image, label = augment_patch(
                case.image, case.label, middle, self.patch, self.augment, rng, self.image_fill
            )
            return image, label, on_fg
        image = crop_padded(case.image, start, self.patch, self.image_fill)
        label = crop_padded(case.label, start, self.patch, 0)
        return image, label, on_fg

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= int(index) < self.steps:
            raise IndexError(f"Expected a batch index in 0..{self.steps - 1}. Received: {index}")
        epoch = self._epoch if self.fixed_epoch is None else self.fixed_epoch
        rng = np.random.default_rng([self.seed, epoch, int(index)])
        images, labels = [], []
        for j in range(self.batch_size):
            image, label, _ = self.sample(rng, int(index) * self.batch_size + j)
            images.append(image)
            labels.append(label)
        x = np.stack(images).astype(np.float32, copy=False)
        y = one_hot(np.stack(labels), self.n_classes, 1)
        if self.data_format == "channels_last":
            x, y = np.moveaxis(x, 1, -1), np.moveaxis(y, 1, -1)
        return np.ascontiguousarray(x), np.ascontiguousarray(y)
