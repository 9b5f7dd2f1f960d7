#!/usr/bin/env python
"""A trivial segmentation baseline that looks at no voxel: a centred ellipsoid.

Each test volume gets an ellipsoid centred in its grid. Its semi-axes (in mm) come from the
training masks, in one of two ways:

* "margin" (default): the training crops leave a margin between the foreground's bounding box
  and the volume's edge; the ellipsoid fills the test volume less that median margin, axis by
  axis. On a data set cropped around its lesions (sts_ct: 5 cm around each tumour) this reads
  the lesion's size off the crop's size, without looking at any voxel.
* "fixed": half the median foreground extent of the training masks, the same for every case.

A model is only useful where it beats this prior on the same cases.

Example:
    .venv/bin/python benchmarks/centred_prior.py --labels ../shared/data/sts_ct/labelsTr \
        --train STS_001 STS_002 STS_003 --test STS_004 STS_005
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "keras"))


def foreground_extent_mm(mask: np.ndarray, spacing: Sequence[float]) -> tuple[float, ...]:
    """The extent of the mask's foreground bounding box along each axis, in mm.

    Args:
        mask: a 3D label array (foreground: any value > 0).
        spacing: the voxel size along each axis of `mask`, in mm.

    Returns:
        (number of voxels spanned) x spacing per axis; zeros when there is no foreground.
    """
    where = np.nonzero(mask > 0)
    if not where[0].size:
        return tuple(0.0 for _ in spacing)
    return tuple(float((w.max() - w.min() + 1) * s) for w, s in zip(where, spacing, strict=True))


def ellipsoid_mask(
    shape: Sequence[int], spacing: Sequence[float], semi_axes_mm: Sequence[float]
) -> np.ndarray:
    """A boolean ellipsoid centred in a grid: voxel centres within the semi-axes (mm).

    Args:
        shape: the grid's size per axis.
        spacing: the voxel size per axis, in mm.
        semi_axes_mm: the ellipsoid's semi-axis per axis, in mm (each > 0).

    Returns:
        A bool array of `shape`.
    """
    if any(a <= 0 for a in semi_axes_mm):
        raise ValueError(f"Expected positive semi-axes. Received: semi_axes_mm={semi_axes_mm}")
    grids = np.meshgrid(
        *[
            ((np.arange(n) - (n - 1) / 2.0) * s / a) ** 2
            for n, s, a in zip(shape, spacing, semi_axes_mm, strict=True)
        ],
        indexing="ij",
        sparse=True,
    )
    return (grids[0] + grids[1] + grids[2]) <= 1.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _read(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    import volume_io

    image = volume_io.read_image(path)
    return volume_io.image_to_array(image), tuple(image.GetSpacing())


def training_sizes(train_labels: Sequence[Path]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """From the training masks, per axis (mm): the median foreground extent, and the median
    margin between the foreground's bounding box and the volume's edge (on one side)."""
    extents, margins = [], []
    for path in train_labels:
        mask, spacing = _read(path)
        extent = foreground_extent_mm(mask, spacing)
        if any(extent):
            extents.append(extent)
            size = [n * s for n, s in zip(mask.shape, spacing, strict=True)]
            margins.append([(v - e) / 2.0 for v, e in zip(size, extent, strict=True)])
    if not extents:
        raise ValueError("Expected at least one training mask with foreground.")
    return (
        tuple(statistics.median(e[a] for e in extents) for a in range(3)),
        tuple(statistics.median(m[a] for m in margins) for a in range(3)),
    )


def prior_semi_axes(train_labels: Sequence[Path]) -> tuple[float, float, float]:
    """Half the median foreground extent (mm) per axis over the training masks ("fixed")."""
    extent, _ = training_sizes(train_labels)
    return tuple(e / 2.0 for e in extent)


def semi_axes_for(
    shape: Sequence[int],
    spacing: Sequence[float],
    extent: Sequence[float],
    margin: Sequence[float],
    mode: str,
) -> tuple[float, ...]:
    """The ellipsoid's semi-axes (mm) for one volume: "fixed" (half the median extent) or
    "margin" (half the volume's extent less twice the median margin, at least one voxel)."""
    if mode == "fixed":
        return tuple(e / 2.0 for e in extent)
    if mode != "margin":
        raise ValueError(f"Expected mode 'margin' or 'fixed'. Received: mode={mode!r}")
    return tuple(
        max(n * s - 2.0 * m, s) / 2.0 for n, s, m in zip(shape, spacing, margin, strict=True)
    )


def score_prior(
    train_labels: Sequence[Path], test_labels: Sequence[Path], mode: str = "margin"
) -> dict[str, float]:
    """The prior sized from `train_labels`, scored on `test_labels`.

    Returns:
        {case name: Dice of the foreground}.
    """
    extent, margin = training_sizes(train_labels)
    scores = {}
    for path in test_labels:
        mask, spacing = _read(path)
        case = path.name.split(".")[0]
        semi = semi_axes_for(mask.shape, spacing, extent, margin, mode)
        scores[case] = dice(ellipsoid_mask(mask.shape, spacing, semi), mask > 0)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--labels", required=True, type=Path, help="folder of {case}.nii.gz")
    parser.add_argument("--train", nargs="+", required=True, help="cases that size the prior")
    parser.add_argument("--test", nargs="+", required=True, help="cases to score it on")
    parser.add_argument("--mode", choices=("margin", "fixed"), default="margin")
    args = parser.parse_args(argv)
    scores = score_prior(
        [args.labels / f"{c}.nii.gz" for c in args.train],
        [args.labels / f"{c}.nii.gz" for c in args.test],
        args.mode,
    )
    for case, value in scores.items():
        print(f"{case}  {value:.3f}")
    print(f"mean Dice {statistics.fmean(scores.values()):.3f} over {len(scores)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
