"""What the benchmark scripts share (not a benchmark itself: `make bench` runs bench_*.py).

Every file they write goes through `genesis_files.atomic_path` (a temporary file in the same
folder, then a rename), so an interrupted benchmark never leaves a truncated results file.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

# The project's modules live in keras/ and are imported by bare name.
KERAS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras")
if KERAS_DIR not in sys.path:
    sys.path.append(KERAS_DIR)

from genesis_files import atomic_path  # noqa: E402

__all__ = [
    "KERAS_DIR",
    "STS_CT",
    "atomic_path",
    "bootstrap_interval",
    "case_folder",
    "save_figure",
    "write_json",
    "write_text",
]

# The labelled sarcoma CTs beside the repository (nnU-Net layout), used by several benchmarks.
STS_CT = Path(KERAS_DIR).parent.parent / "shared" / "data" / "sts_ct"


def case_folder(dst: Path, cases: list[str], src: Path = STS_CT) -> Path:
    """An nnU-Net-layout folder of the given cases of `src` (symbolic links), and its
    dataset.json with numTraining set; an existing `dst` is replaced.

    Args:
        dst: the folder to make.
        cases: case names (``STS_001``), whose files are ``imagesTr/{case}_0000.nii.gz`` and
            ``labelsTr/{case}.nii.gz``.
        src: the data set they come from.

    Returns:
        `dst`.
    """
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    for case in cases:
        name = f"{case}_0000.nii.gz"
        (dst / "imagesTr" / name).symlink_to(src / "imagesTr" / name)
        (dst / "labelsTr" / f"{case}.nii.gz").symlink_to(src / "labelsTr" / f"{case}.nii.gz")
    meta = json.loads((src / "dataset.json").read_text())
    meta["numTraining"] = len(cases)
    write_text(dst / "dataset.json", json.dumps(meta, indent=2))
    return dst


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write `obj` as JSON to `path`, atomically.

    Args:
        path: the results file.
        obj: anything json.dump takes.
        indent: JSON indentation.
    """
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path`, atomically.

    Args:
        path: the file.
        text: its whole content.
    """
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> None:
    """Write a Matplotlib figure as PNG, atomically, and close it.

    Args:
        fig: the figure.
        path: the PNG file (str or Path).
        dpi: resolution.
    """
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def bootstrap_interval(
    diffs: np.ndarray, n: int, rng: np.random.Generator, level: float = 0.95
) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean of a (seeds, cases) table of paired
    differences, resampling seeds and cases (each with replacement) in every draw.

    Args:
        diffs: differences, one row per seed and one column per test case.
        n: number of draws.
        rng: the generator every draw comes from.
        level: the interval's coverage.

    Returns:
        (low, high).
    """
    n_seeds, n_cases = diffs.shape
    means = np.empty(n)
    for i in range(n):
        rows = rng.integers(0, n_seeds, n_seeds)
        cols = rng.integers(0, n_cases, n_cases)
        means[i] = diffs[np.ix_(rows, cols)].mean()
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)
