#!/usr/bin/env python
"""Speed of extraction from your own data: the 36 sarcoma CTs of ../shared/data/sts_ct, `ct` preset.

Measures, in the same run and on the same machine, each as a subprocess (interpreter start,
imports, reading, sampling, writing):
  1. `infinite_generator_3D.py --input .../imagesTr --output ... --preset ct --processes 1`;
  2. the same with `--processes 2`;
  3. a baseline that only imports SimpleITK and NumPy and reads the same 36 files, one after the
     other: the least any extraction of them must do.
Prints cubes/s of each and the ratio of each to the baseline, and checks that the two process
counts wrote the same bytes. Runs are interleaved so that all kinds see the same machine load.

Example:
    .venv/bin/python benchmarks/bench_extraction_sts.py                 # 3 runs each, median
    .venv/bin/python benchmarks/bench_extraction_sts.py --runs 1 --json benchmarks/results/sts.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "sts_ct" / "imagesTr"
sys.path.insert(0, str(ROOT / "benchmarks"))

READ_ONLY = """
import sys
import SimpleITK as sitk
import numpy as np
for path in sorted(sys.argv[1:]):
    sitk.GetArrayFromImage(sitk.ReadImage(path))
"""


def timed(cmd: list[str]) -> float:
    """Seconds one subprocess takes (its output discarded; a failure raises)."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind (default: 3)")
    parser.add_argument("--scale", type=int, default=32, help="cubes per volume (default: 32)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    files = sorted(str(p) for p in IMAGES.glob("*.nii.gz"))
    if not files:
        print(f"skipped: no sarcoma CT found in {IMAGES}")
        return 0

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:

        def extract_cmd(processes: int) -> list[str]:
            return [
                sys.executable,
                str(ROOT / "infinite_generator_3D.py"),
                "--input",
                str(IMAGES),
                "--output",
                os.path.join(tmp, f"p{processes}", "cubes.npy"),
                "--preset",
                "ct",
                "--scale",
                str(args.scale),
                "--processes",
                str(processes),
                "--no-progress",
            ]

        read_cmd = [sys.executable, "-c", READ_ONLY, *files]
        timed(read_cmd)  # warm the page cache and the interpreter's files
        times: dict[str, list[float]] = {"read": [], "p1": [], "p2": []}
        for _ in range(args.runs):
            times["read"].append(timed(read_cmd))
            times["p1"].append(timed(extract_cmd(1)))
            times["p2"].append(timed(extract_cmd(2)))
        outputs = [Path(tmp, f"p{n}", "cubes.npy").read_bytes() for n in (1, 2)]
        n_cubes = int(np.load(os.path.join(tmp, "p1", "cubes.npy"), mmap_mode="r").shape[0])
    same = outputs[0] == outputs[1]

    median = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{len(files)} sarcoma CTs of {IMAGES}, preset ct, scale {args.scale}: {n_cubes} cubes; "
        f"median of {args.runs} runs; {os.cpu_count()} CPUs"
    )
    print(f"  read only (baseline):  {median['read']:.2f} s")
    for n in (1, 2):
        t = median[f"p{n}"]
        print(
            f"  --processes {n}:         {t:.2f} s   {n_cubes / t:.0f} cubes/s   "
            f"ratio to read only {t / median['read']:.2f}"
        )
    print(f"  --processes 2 / --processes 1: {median['p2'] / median['p1']:.2f}")
    print(f"  same bytes with 1 and 2 processes: {same}")
    if args.json:
        from common import write_json

        write_json(
            args.json,
            {
                "volumes": len(files),
                "cubes": n_cubes,
                "runs": times,
                "median_s": median,
                "cubes_per_s": {n: n_cubes / median[n] for n in ("p1", "p2")},
                "ratio_to_read": {n: median[n] / median["read"] for n in ("p1", "p2")},
                "same_bytes": same,
            },
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
