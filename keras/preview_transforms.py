"""Draw a picture of each Models Genesis transform applied to a few cubes.

One row per cube, six columns: the original, a flip, local pixel shuffling, the non-linear
intensity transformation, in-painting and out-painting, each shown by its middle depth slice,
under a row of titles. The transforms are those of `transforms.py` (see docs/transforms.md);
the picture in the README, docs/transforms_preview.png, is made by:

    python keras/preview_transforms.py --cubes generated_cubes/bat_32_s_64x64x32_0.npy \\
        --out docs/transforms_preview.png --n 3 --seed 0

Imports: numpy, the standard library, transforms, genesis_files, and PIL.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

import transforms as T
from genesis_files import atomic_path

__all__ = ["TITLES", "main", "preview"]

TITLES = ("original", "flip", "local shuffle", "non-linear", "in-painting", "out-painting")
HEADER_PX = 14  # height of the row of titles

EXAMPLE = (
    "example: python keras/preview_transforms.py --cubes "
    "generated_cubes/bat_32_s_64x64x32_0.npy --out docs/transforms_preview.png --n 3 --seed 0"
)


def preview(cubes: np.ndarray, n: int = 3, seed: int = 0, zoom: int = 2) -> Any:
    """Picture of each transform applied to a few cubes.

    Args:
        cubes: (N, 1, R, C, D) cubes, values in [0, 1] (e.g. from transforms.load_cubes).
        n: number of cubes (rows), picked at random.
        seed: seed of every random choice.
        zoom: pixels per voxel.

    Returns:
        A greyscale PIL image: one row per cube, columns original, flip, local shuffle,
        non-linear, in-painting, out-painting; the middle depth slice of each, titled.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    n = min(n, cubes.shape[0])
    picks = np.sort(rng.choice(cubes.shape[0], n, replace=False))
    rows = []
    for i in picks:
        x = np.array(cubes[i], dtype=np.float32)
        T.check_values(x, f"cube {i}")
        # A visible flip (rows or columns): axis 0, the channel, would change nothing.
        flipped = T.apply_flip(x, (1 + int(rng.integers(0, 2)),))
        cols = [
            x,
            flipped,
            T.local_pixel_shuffling(x, prob=1.0, rng=rng),
            T.nonlinear_transformation(x, prob=1.0, rng=rng),
            T.image_in_painting(x.copy(), rng=rng),
            T.image_out_painting(x, rng=rng),
        ]
        D = x.shape[-1]
        slices = [np.pad(c[0, :, :, D // 2], 1, constant_values=1.0) for c in cols]
        rows.append(np.concatenate(slices, axis=1))
    grid = np.kron(np.concatenate(rows, axis=0), np.ones((zoom, zoom)))
    body = Image.fromarray(np.clip(np.rint(grid * 255), 0, 255).astype(np.uint8))
    canvas = Image.new("L", (body.width, body.height + HEADER_PX), color=255)
    canvas.paste(body, (0, HEADER_PX))
    draw = ImageDraw.Draw(canvas)
    w = body.width / len(TITLES)
    for k, t in enumerate(TITLES):
        draw.text((k * w + 3, 1), t, fill=0)
    return canvas


def main(argv: Sequence[str] | None = None) -> int:
    """The preview CLI (see --help).

    Args:
        argv: the arguments (default: sys.argv[1:]).

    Returns:
        The exit status: 0, or 2 on bad input.
    """
    parser = argparse.ArgumentParser(
        description="Draw a picture of each Models Genesis transform applied to a few cubes "
        "(middle depth slice of each).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--cubes",
        required=True,
        help=".npy file of cubes (N, R, C, D) or (N, 1, R, C, D), values in [0, 1]",
    )
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--n", type=int, default=3, help="number of cubes (rows); default 3")
    parser.add_argument("--seed", type=int, default=0, help="random seed; default 0")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"Expected --n >= 1. Received: --n {args.n}")
    try:
        img = preview(T.load_cubes(args.cubes), n=args.n, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_path(args.out) as tmp:
        img.save(tmp, format="PNG")
    print(f"wrote {args.out} ({img.width}x{img.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
