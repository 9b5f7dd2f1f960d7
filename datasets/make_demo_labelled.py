"""Write a tiny labelled CT data set for the demo's fine-tuning step (nnU-Net layout).

Each case is CT-like noise around -700 HU with one soft-tissue ball (about 60 HU), its mask 1
inside the ball; spacing 0.8 x 0.8 x 2.0 mm. Cases go to OUT/imagesTr/{case}_0000.nii.gz and
OUT/labelsTr/{case}.nii.gz, with OUT/dataset.json. Every file is written atomically.

    python datasets/make_demo_labelled.py --out demo_output/labelled --cases 6 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import SimpleITK as sitk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "keras"))

from genesis_files import atomic_path  # noqa: E402


def make_case(
    size: tuple[int, int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One (x, y, z) volume in HU (int16) and its uint8 mask: one ball of radius 4..7 voxels.

    Args:
        size: the volume's (x, y, z).
        rng: the generator.

    Returns:
        (image, mask).
    """
    radius = rng.uniform(4, 7)
    centre = [rng.uniform(radius, s - radius) for s in size]
    # z voxels are 2.5 times as long as x and y: a ball in millimetres.
    scale = (1.0, 1.0, 2.5)
    grid = np.meshgrid(*[np.arange(s) for s in size], indexing="ij")
    dist2 = sum(((g - c) * k) ** 2 for g, c, k in zip(grid, centre, scale, strict=True))
    mask = (dist2 <= radius**2).astype(np.uint8)
    image = rng.normal(-700.0, 80.0, size)
    image[mask > 0] = rng.normal(60.0, 25.0, int(mask.sum()))
    return image.astype(np.int16), mask


def _write(array_xyz: np.ndarray, path: str) -> None:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    image.SetSpacing((0.8, 0.8, 2.0))
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, tmp, True)


def main(argv: list[str] | None = None) -> int:
    """Write the data set.

    Args:
        argv: the arguments (default: sys.argv[1:]).

    Returns:
        0.
    """
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example:\n  " + __doc__.strip().splitlines()[-1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="the data set folder (created)")
    parser.add_argument("--cases", type=int, default=6, help="number of cases (default: 6)")
    parser.add_argument(
        "--size", type=int, nargs=3, default=(48, 48, 20), help="x y z (default: 48 48 20)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    if args.cases < 2:
        parser.error(
            f"Expected --cases of at least 2 (training and validation). Received: {args.cases}"
        )
    rng = np.random.default_rng(args.seed)
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    for i in range(args.cases):
        image, mask = make_case(tuple(args.size), rng)
        _write(image, os.path.join(args.out, "imagesTr", f"demo_{i:03d}_0000.nii.gz"))
        _write(mask, os.path.join(args.out, "labelsTr", f"demo_{i:03d}.nii.gz"))
    meta = {
        "name": "demo",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "ball": 1},
        "numTraining": args.cases,
        "file_ending": ".nii.gz",
    }
    with atomic_path(os.path.join(args.out, "dataset.json")) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    print(f"Wrote {args.cases} labelled cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
