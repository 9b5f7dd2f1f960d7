"""Patch sampler throughput: 64x64x32 patches per second on one core, from the cache.

Baseline, in the same run: copying the same number of 64x64x32 float32 blocks out of an
in-memory array (no sampling, no one-hot), so the ratio shows what the sampler adds.

    python benchmarks/bench_patch_sampler.py --seconds 20
Uses ../shared/data/sts_ct (the first 8 cases) when present, else synthetic volumes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "keras"), os.path.join(ROOT, "tests"), ROOT]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from benchmarks.common import write_json  # noqa: E402
from finetune_cases import discover_segmentation, prepare_cases  # noqa: E402
from finetune_patches import SegmentationPatches  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Measure and write benchmarks/results/patch_sampler.json."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example:\n  python benchmarks/bench_patch_sampler.py --seconds 20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="time per measurement")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    data = os.path.join(os.path.dirname(ROOT), "shared", "data", "sts_ct")
    with tempfile.TemporaryDirectory() as tmp:
        if os.path.isdir(data):
            source = discover_segmentation(data)
            source.cases = source.cases[:8]
            what = "sts_ct, first 8 cases"
        else:
            from finetune_helpers import make_segmentation_folder

            source = discover_segmentation(
                str(make_segmentation_folder(os.path.join(tmp, "d"), 8, (160, 160, 64)))
            )
            what = "synthetic 160x160x64, 8 cases"
        cases = prepare_cases(source, os.path.join(tmp, "cache"), ["ct"], progress=False)
        patch = (64, 64, 32)
        ds = SegmentationPatches(cases, patch, args.batch_size, 2, steps=10**6, seed=0)
        ds[0]
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            ds[n // args.batch_size]
            n += args.batch_size
        sampler = n / (time.perf_counter() - start)
        block = np.asarray(cases[0].image[0])
        m, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            for _ in range(args.batch_size):
                np.ascontiguousarray(block[:64, :64, :32]).copy()
            m += args.batch_size
        baseline = m / (time.perf_counter() - start)
    result = {
        "data": what,
        "patch": list(patch),
        "batch_size": args.batch_size,
        "sampler_patches_per_s": round(sampler, 1),
        "baseline_copy_patches_per_s": round(baseline, 1),
        "sampler_over_baseline_time": round(baseline / sampler, 2),
        "target_patches_per_s": 300,
    }
    print(result)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "patch_sampler.json"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
