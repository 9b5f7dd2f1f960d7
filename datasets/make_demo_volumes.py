#!/usr/bin/env python
"""Write small synthetic chest CT volumes in LUNA16's layout, for the demo and for tests.

Each volume is ``{out}/subset{N}/{uid}.mhd`` + ``.raw`` (MetaImage, uncompressed int16 HU, as
LUNA16 ships them), with in-plane spacing 0.8 mm and 2.5 mm slices: air around a body (fat
layer, soft tissue, spine and ribs, mediastinum), and two lungs of about -850 HU with smooth
texture and a network of vessels. Lungs fill the middle of the field of view, so that the
extraction's air test (which keeps lung windows) accepts cubes even though the volume is small
enough to write and read in a fraction of a second.

Everything comes from ``numpy.random.default_rng([seed, subset, index])``: the same arguments
give the same bytes, and adding volumes does not change the others. The output folder appears
only when complete (written next to it under a temporary name, then renamed).

Example:
    python datasets/make_demo_volumes.py --out demo_output/luna16 --subsets 0 1 --per-subset 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence

import numpy as np

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras"))
from genesis_files import atomic_path


def _smooth_noise(
    rng: np.random.Generator, shape: Sequence[int], factor: Sequence[int], sigma: Sequence[float]
) -> np.ndarray:
    """Zero-mean, unit-variance smooth noise of ``shape``, made at a lower resolution and
    upsampled."""
    from scipy import ndimage

    small = [-(-s // f) for s, f in zip(shape, factor, strict=True)]
    field = ndimage.gaussian_filter(
        rng.standard_normal(small).astype(np.float32), sigma, mode="wrap"
    )
    field /= field.std() + 1e-12
    for axis, f in enumerate(factor):
        if f > 1:
            field = field.repeat(f, axis=axis)
    return field[tuple(slice(0, s) for s in shape)]


def synthetic_chest_ct(shape_xyz: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """One synthetic chest CT volume.

    Args:
        shape_xyz: size (x, y, z); with the 100-voxel border, 64x64 windows reach the lungs from
            about 384.
        rng: the generator every random choice comes from.

    Returns:
        int16 HU values in SimpleITK's (z, y, x) order.
    """
    nx, ny, nz = (int(s) for s in shape_xyz)
    # Normalised coordinates: u across the body (x), v front to back (y), t from the lung base
    # (t = 0) to the apex (t = 1).
    u = ((np.arange(nx, dtype=np.float32) + 0.5) / nx * 2 - 1)[None, None, :]
    v = ((np.arange(ny, dtype=np.float32) + 0.5) / ny * 2 - 1)[None, :, None]
    t = np.linspace(-0.08, 1.08, nz, dtype=np.float32)[:, None, None]
    jitter = lambda scale: 1 + scale * rng.uniform(-1, 1)  # noqa: E731 - per-volume anatomy variation

    def superellipse(cu: float, cv: float, au, av, p: float = 2.4) -> np.ndarray:
        return (np.abs((u - cu) / au) ** p + np.abs((v - cv) / av) ** p) <= 1

    hu = np.full((nz, ny, nx), -1000.0, dtype=np.float32)
    body_a, body_b = 0.94 * jitter(0.02), 0.70 * jitter(0.03)
    body = np.broadcast_to(superellipse(0, 0, body_a, body_b, 2.2), hu.shape)
    inner = np.broadcast_to(superellipse(0, 0, body_a - 0.07, body_b - 0.07, 2.2), hu.shape)
    hu[body] = -100.0  # subcutaneous fat
    hu[inner] = 45.0  # muscle, mediastinum, organs

    # Lungs shrink towards the apex and end in a dome over the diaphragm.
    taper = np.maximum(np.clip(np.sin(np.pi * np.clip(t, 0, 1)), 0, 1) ** 0.3, 1e-3)
    lung = np.zeros(hu.shape, dtype=bool)
    for side in (-1, 1):
        cu = side * 0.43 * jitter(0.03)
        lung |= superellipse(
            cu, -0.03, 0.37 * jitter(0.03) * taper, 0.55 * jitter(0.03) * taper, 2.6
        )
    lung &= inner
    texture = 25.0 * _smooth_noise(rng, hu.shape, (2, 8, 8), (1.0, 1.5, 1.5))
    hu[lung] = -850.0 + texture[lung]

    # Vessels: where two independent smooth fields both cross zero, a network of tubes.
    f1 = _smooth_noise(rng, hu.shape, (1, 2, 2), (1.2, 3.0, 3.0))
    f2 = _smooth_noise(rng, hu.shape, (1, 2, 2), (1.2, 3.0, 3.0))
    vessel_width = 0.22
    closeness = np.maximum(np.abs(f1), np.abs(f2)) / vessel_width
    vessel = lung & (closeness < 1)
    hu[vessel] = -850.0 + (40.0 + 850.0) * (
        1 - closeness[vessel] ** 4
    )  # soft edges (partial volume)

    # Spine behind the mediastinum and ribs just inside the fat layer, both bone.
    spine = superellipse(0, body_b - 0.22, 0.09, 0.09, 2.0)
    hu[np.broadcast_to(spine, hu.shape)] = 700.0
    ring = superellipse(0, 0, body_a - 0.08, body_b - 0.08, 2.2) & ~superellipse(
        0, 0, body_a - 0.12, body_b - 0.12, 2.2
    )
    angle = np.arctan2(v, u)
    rib_phase = rng.uniform(0, 2 * np.pi)
    ribs = ring & (np.sin(9 * angle + rib_phase + 28 * t) > 0.55)
    hu[ribs] = 600.0

    hu += rng.normal(0.0, 15.0, size=hu.shape).astype(np.float32)  # scanner noise
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def fake_series_uid(rng: np.random.Generator) -> str:
    """A LUNA16-like file name: a DICOM UID under the '2.25' root (no real organisation's)."""
    return "2.25." + "".join(str(d) for d in rng.integers(0, 10, size=38)).lstrip("0")


def write_volumes(
    out: str,
    subsets: Sequence[int],
    per_subset: int,
    shape_xyz: Sequence[int],
    spacing: Sequence[float],
    seed: int,
) -> list[str]:
    """Write the volumes under ``out`` (which must not exist yet), atomically as a whole.

    Args:
        out: the LUNA16-style root to create, holding ``subset{N}/``.
        subsets: the subset numbers to fill.
        per_subset: volumes per subset.
        shape_xyz: volume size (x, y, z).
        spacing: voxel spacing (x, y, z) in mm.
        seed: the base seed.

    Returns:
        The written .mhd paths (under ``out``).
    """
    import SimpleITK as sitk

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    written = []
    with atomic_path(out) as tmp:
        for subset in subsets:
            os.makedirs(os.path.join(tmp, f"subset{subset}"))
            for index in range(per_subset):
                rng = np.random.default_rng([seed, subset, index])
                image = sitk.GetImageFromArray(synthetic_chest_ct(shape_xyz, rng))
                image.SetSpacing(tuple(float(s) for s in spacing))
                # LUNA16-like origin (mm): centred in x and y, the scan starting below the lungs.
                image.SetOrigin(
                    (-shape_xyz[0] * spacing[0] / 2, -shape_xyz[1] * spacing[1] / 2, -300.0)
                )
                name = fake_series_uid(rng) + ".mhd"
                sitk.WriteImage(
                    image, os.path.join(tmp, f"subset{subset}", name), useCompression=False
                )
                written.append(os.path.join(out, f"subset{subset}", name))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see --help."""
    parser = argparse.ArgumentParser(
        description="Write synthetic chest CT volumes in LUNA16's layout "
        "({out}/subsetN/*.mhd + .raw, int16 HU).",
        epilog="example:\n"
        "  python datasets/make_demo_volumes.py --out demo_output/luna16 "
        "--subsets 0 1 --per-subset 2\n"
        "then:\n"
        "  python infinite_generator_3D.py --fold 0 --data demo_output/luna16 "
        "--save demo_output/generated_cubes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        default="datasets/demo_luna16",
        help="root folder to create (must not exist unless --overwrite) "
        "(default: datasets/demo_luna16)",
    )
    parser.add_argument(
        "--subsets", type=int, nargs="+", default=[0, 1], help="subset numbers (default: 0 1)"
    )
    parser.add_argument("--per-subset", type=int, default=2, help="volumes per subset (default: 2)")
    parser.add_argument(
        "--size",
        type=int,
        nargs=3,
        default=[384, 384, 112],
        metavar=("X", "Y", "Z"),
        help="volume size in voxels; z >= 96 for 64x64x32 cubes, and x, y >= 384 so that the lungs "
        "reach into the region the 100-voxel border leaves to 64x64 windows "
        "(default: 384 384 112)",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=[0.8, 0.8, 2.5],
        metavar=("SX", "SY", "SZ"),
        help="voxel spacing in mm (default: 0.8 0.8 2.5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    if any(s not in range(10) for s in args.subsets):
        parser.error(
            "Expected subset numbers in 0..9. "
            f"Received: --subsets {' '.join(map(str, args.subsets))}"
        )
    if args.per_subset < 1:
        parser.error(f"Expected --per-subset >= 1. Received: {args.per_subset}")
    if min(args.size) < 1 or min(args.spacing) <= 0:
        parser.error(
            "Expected positive sizes and spacings. "
            f"Received: --size {args.size} --spacing {args.spacing}"
        )
    if os.path.exists(args.out):
        if not args.overwrite:
            print(
                f"error: Expected --out to be a new folder. Received: --out={args.out!r} exists "
                f"(pass --overwrite to replace it)",
                file=sys.stderr,
            )
            return 1
        shutil.rmtree(args.out)
    start = time.perf_counter()
    paths = write_volumes(
        args.out, args.subsets, args.per_subset, args.size, args.spacing, args.seed
    )
    print(
        f"wrote {len(paths)} volumes of {'x'.join(map(str, args.size))} voxels under {args.out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
