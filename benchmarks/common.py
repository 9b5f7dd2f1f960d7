"""What the benchmark scripts share (not a benchmark itself: `make bench` runs bench_*.py)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_json(path: str, obj: Any, indent: int = 2) -> None:
    """Write `obj` as JSON to `path` atomically: a temporary file in the same folder, then a
    rename, so an interrupted benchmark never leaves a truncated results file.

    Args:
        path: the results file.
        obj: anything json.dump takes.
        indent: JSON indentation.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def save_figure(fig: Any, path: Any, dpi: int = 110) -> None:
    """Write a Matplotlib figure as PNG atomically (a temporary file, then a rename) and close it.

    Args:
        fig: the figure.
        path: the PNG file (str or Path).
        dpi: resolution.
    """
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.path.basename(path)}")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
