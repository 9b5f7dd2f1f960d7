#!/usr/bin/env python
"""Speed of cube extraction on the real 512x512x141 chest CT (../shared/data), scale 32.

Measures, in the same run and on the same machine:
  1. the whole command `python infinite_generator_3D.py --fold 0 --scale 32 ...` as a subprocess
     (interpreter start, imports, reading, sampling, writing), the .nii.gz linked into a temporary
     subset0/;
  2. a subprocess that only imports SimpleITK and NumPy, reads the volume and clips it to
     [-1000, 1000] HU: the least any extraction must do;
  3. the air test per attempt: the array version against a per-voxel loop over NumPy elements
     (how the original does it), on windows drawn from the CT.
The original's extraction takes 30 to 45 s per scan; 35 s / 20 = 1.75 s is printed as a reference
for "twenty times faster".

Example:
    .venv/bin/python benchmarks/bench_extraction.py            # 5 runs each, median
    .venv/bin/python benchmarks/bench_extraction.py --runs 3 --max-ratio 1.5 \
  # exit 1 if extraction takes over 1.5x the read+clip baseline
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHEST_CT = ROOT.parent / "shared" / "data" / "chest_ct_512x512x141.nii.gz"
sys.path.insert(0, str(ROOT))

READ_AND_CLIP = """
import sys
import numpy as np
import SimpleITK as sitk
a = sitk.GetArrayFromImage(sitk.ReadImage(sys.argv[1]))
np.clip(a, -1000, 1000)
"""


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def loop_air_test(
    window, HU_thred: float, rows: int, cols: int, deps: int, len_depth: int
) -> float:
    """Per-voxel loop indexing the NumPy array element by element, like the original."""
    total = 0.0
    for d in range(deps):
        for i in range(rows):
            for j in range(cols):
                k = len_depth - 1
                for kk in range(len_depth):
                    if window[i, j, d + kk] >= HU_thred:
                        k = kk
                        break
                total += 1 - k / (len_depth - 1)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="subprocess runs of each kind (default: 5)"
    )
    parser.add_argument(
        "--loop-windows",
        type=int,
        default=4,
        help="windows timed with the loop air test (default: 4)",
    )
    parser.add_argument(
        "--max-ratio",
        type=float,
        default=None,
        help="exit 1 when extraction takes more than this many times read+clip (default: never)",
    )
    args = parser.parse_args()
    if not CHEST_CT.exists():
        print(f"skipped: real CT not found at {CHEST_CT}")
        return 0

    import numpy as np
    import SimpleITK as sitk

    from infinite_generator_3D import (
        infinite_generator_from_one_volume,
        normalise_hu,
        setup_config,
        tissue_score_sum,
    )

    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "subset0"))
        os.symlink(CHEST_CT, os.path.join(tmp, "subset0", CHEST_CT.name))
        extract_cmd = [
            sys.executable,
            str(ROOT / "infinite_generator_3D.py"),
            "--fold",
            "0",
            "--scale",
            "32",
            "--data",
            tmp,
            "--save",
            os.path.join(tmp, "out"),
        ]  # default flags: progress bar too
        read_cmd = [sys.executable, "-c", READ_AND_CLIP, str(CHEST_CT)]
        timed(read_cmd)  # warm the page cache and the interpreter's files
        extraction, baseline = [], []
        for _ in range(args.runs):  # interleaved, so both see the same machine load
            extraction.append(timed(extract_cmd))
            baseline.append(timed(read_cmd))
        cubes = np.load(os.path.join(tmp, "out", "bat_32_s_64x64x32_0.npy"))
        assert cubes.shape == (32, 64, 64, 32), cubes.shape

    # Air test per attempt, on windows a seed-1 run draws.
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(CHEST_CT))).transpose(2, 1, 0)
    config = setup_config(scale=32)
    rng = random.Random(1)
    windows = []
    for _ in range(40):
        sx, sy, sz = rng.randint(100, 347), rng.randint(100, 347), rng.randint(30, 75)
        windows.append(
            normalise_hu(volume[sx : sx + 64, sy : sy + 64, sz : sz + 35], -1000.0, 1000.0)
        )
    start = time.perf_counter()
    for w in windows:
        tissue_score_sum(w, config.HU_thred, 32, 3)
    array_s = (time.perf_counter() - start) / len(windows)
    start = time.perf_counter()
    for w in windows[: args.loop_windows]:
        loop_air_test(w, config.HU_thred, 64, 64, 32, 3)
    loop_s = (time.perf_counter() - start) / args.loop_windows

    # Whole in-process sampling of the volume (draws, window normalisation, air test, cubes).
    counter = {"n": 0}

    class Counting(random.Random):
        def randint(self, a, b):
            counter["n"] += 1
            return super().randint(a, b)

    sample_runs = []
    for _ in range(3):  # the first call also pays for first-touch page faults of the cube buffer
        counter["n"] = 0
        start = time.perf_counter()
        infinite_generator_from_one_volume(config, volume, Counting(1))
        sample_runs.append(time.perf_counter() - start)
    sample_s = min(sample_runs)
    attempts = counter["n"] // 3

    ext, base = statistics.median(extraction), statistics.median(baseline)
    ratio = ext / base
    print(
        f"real chest CT {CHEST_CT.name}, scale 32, seed 1; median of {args.runs} runs; "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"  whole extraction command (subprocess): {ext:.3f} s   "
        f"(runs: {', '.join(f'{t:.2f}' for t in extraction)})"
    )
    print(
        f"  read + clip only (subprocess):         {base:.3f} s   "
        f"(runs: {', '.join(f'{t:.2f}' for t in baseline)})"
    )
    print(
        f"  ratio extraction / read+clip:          {ratio:.2f}   (of the fastest runs: "
        f"{min(extraction) / min(baseline):.2f})"
    )
    print(f"  extraction / (35 s / 20 = 1.75 s):     {ext / 1.75:.2f}")
    print(
        f"  sampling in process: {sample_s:.3f} s for {attempts} attempts "
        f"({1e3 * sample_s / attempts:.2f} ms/attempt; "
        f"first call {sample_runs[0]:.3f} s)"
    )
    print(
        f"  air test per attempt: array {1e3 * array_s:.2f} ms, loop {1e3 * loop_s:.0f} ms; "
        f"loop / array = {loop_s / array_s:.0f}x"
    )
    if args.max_ratio is not None and ratio > args.max_ratio:
        print(f"  ratio {ratio:.2f} is over --max-ratio {args.max_ratio}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
