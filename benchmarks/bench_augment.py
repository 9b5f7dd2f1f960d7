"""Fine-tuning augmentation throughput: 64x64x32 patches per second on one core.

Cuts patches from a 256x256x80 float32 volume (synthetic, CT-like: smooth blobs and noise,
memory-mapped as the fine-tuning cache is) with `finetune_augment.augment_patch`:

- plain crop: `AugmentSettings.none()` (the baseline; the ratio is what augmentation costs),
- default settings (nnU-Net's probabilities; linear image interpolation),
- default settings with cubic image interpolation (`image_order=3`),
- rotation and scaling on every patch (the spatial path alone, its worst case), linear and
  cubic,
- elastic deformation on every patch (off by default).

When `batchgenerators` is importable (it is not a dependency: install it in a separate
environment to compare), its `SpatialTransform` with rotation and scaling on every patch is
timed too, from a 96x96x56 box around the patch (as nnU-Net feeds it) and from the whole
volume.

The process is pinned to one CPU and numba/OpenMP/BLAS to one thread; the variants run in
interleaved slices (--rounds) so that on a shared machine they see the same load.

example: taskset -c 0 .venv/bin/python benchmarks/bench_augment.py --seconds 5
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "keras"), ROOT]

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from benchmarks.common import write_json  # noqa: E402
from finetune_augment import AugmentSettings, augment_patch  # noqa: E402

PATCH = (64, 64, 32)
VOLUME = (256, 256, 80)
TARGET = 20  # patches/s one core must exceed to keep a small U-Net's CPU steps fed


def ct_like_volume(shape, rng: np.random.Generator) -> np.ndarray:
    """A smooth volume with noise, in about [0, 1]."""
    coarse = rng.random(tuple(max(2, n // 16) for n in shape))
    vol = ndimage.zoom(coarse, [n / c for n, c in zip(shape, coarse.shape, strict=True)], order=1)
    vol = vol + 0.05 * rng.standard_normal(shape)
    return np.clip(vol, 0, 1).astype(np.float32)


def our_variant(image, label, settings: AugmentSettings) -> Callable[[np.random.Generator], None]:
    def one(rng: np.random.Generator) -> None:
        centre = [int(rng.integers(0, n)) for n in VOLUME]
        augment_patch(image, label, centre, PATCH, settings, rng)

    return one


def batchgenerators_variants(image, label) -> dict[str, Callable[[np.random.Generator], None]]:
    """batchgenerators' SpatialTransform, rotation (+-30 degrees) and scaling every patch."""
    try:
        from batchgenerators.transforms.spatial_transforms import SpatialTransform
    except ImportError:
        return {}
    box = (96, 96, 56)
    data, seg = np.asarray(image)[None], np.asarray(label, dtype=np.float32)[None, None]
    variants = {}
    for order in (1, 3):
        angle = (-np.pi / 6, np.pi / 6)
        transform = SpatialTransform(
            PATCH, patch_center_dist_from_border=None, do_elastic_deform=False,
            do_rotation=True, angle_x=angle, angle_y=angle, angle_z=angle, do_scale=True,
            scale=(0.7, 1.4), border_mode_data="constant", order_data=order, order_seg=0,
            random_crop=False,
        )  # fmt: skip

        def from_box(rng, transform=transform):
            lo = [int(rng.integers(0, n - b + 1)) for n, b in zip(VOLUME, box, strict=True)]
            cut = tuple(slice(a, a + b) for a, b in zip(lo, box, strict=True))
            transform(data=data[(..., *cut)].copy(), seg=seg[(..., *cut)].copy())

        def from_volume(rng, transform=transform):
            transform(data=data, seg=seg)

        variants[f"batchgenerators rotation+scale every patch, order {order}, 96x96x56 box"] = (
            from_box
        )
        variants[f"batchgenerators rotation+scale every patch, order {order}, whole volume"] = (
            from_volume
        )
    return variants


def main(argv: list[str] | None = None) -> int:
    """Measure and write benchmarks/results/augment.json."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example:\n  taskset -c 0 python benchmarks/bench_augment.py --seconds 5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="time per variant")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved slices per variant")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass  # the environment variables above already ask for one thread

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        vol = ct_like_volume(VOLUME, rng)
        np.save(os.path.join(tmp, "image.npy"), vol[None])
        np.save(os.path.join(tmp, "label.npy"), (vol > 0.6).astype(np.uint8))
        image = np.load(os.path.join(tmp, "image.npy"), mmap_mode="r")
        label = np.load(os.path.join(tmp, "label.npy"), mmap_mode="r")
        default = AugmentSettings()
        spatial = dataclasses.replace(AugmentSettings.none(), p_rotation=1.0, p_scale=1.0)
        elastic = dataclasses.replace(AugmentSettings.none(), p_elastic=1.0)
        variants = {
            "plain crop": our_variant(image, label, AugmentSettings.none()),
            "default settings": our_variant(image, label, default),
            "default settings, cubic image": our_variant(
                image, label, AugmentSettings(image_order=3)
            ),
            "rotation+scale every patch": our_variant(image, label, spatial),
            "rotation+scale every patch, cubic image": our_variant(
                image, label, dataclasses.replace(spatial, image_order=3)
            ),
            "elastic every patch": our_variant(image, label, elastic),
        }
        variants.update(batchgenerators_variants(image, label))
        counts = dict.fromkeys(variants, 0)
        times = dict.fromkeys(variants, 0.0)
        for r in range(args.rounds):
            for name, one in variants.items():
                draw = np.random.default_rng([r, len(name)])
                one(draw)  # warm the page cache and the imports
                start = time.perf_counter()
                while time.perf_counter() - start < args.seconds / args.rounds:
                    one(draw)
                    counts[name] += 1
                times[name] += time.perf_counter() - start
    rates = {name: counts[name] / times[name] for name in variants}
    width = max(len(n) for n in rates)
    for name, rate in rates.items():
        print(f"{name:<{width}}  {rate:8.1f} patches/s")
    ratio = rates["plain crop"] / rates["default settings"]
    print(f"default settings take {ratio:.1f}x the time of a plain crop")
    result = {
        "patch": list(PATCH),
        "volume": list(VOLUME),
        "patches_per_s": {name: round(rate, 1) for name, rate in rates.items()},
        "default_over_plain_time": round(ratio, 2),
        "target_patches_per_s": TARGET,
    }
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "augment.json"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
