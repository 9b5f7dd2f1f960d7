"""What the benchmark scripts share (not a benchmark itself: `make bench` runs bench_*.py).

Every file they write goes through `genesis_files.atomic_path` (a temporary file in the same
folder, then a rename), so an interrupted benchmark never leaves a truncated results file.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

# The project's modules live in keras/ and are imported by bare name.
KERAS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras")
if KERAS_DIR not in sys.path:
    sys.path.append(KERAS_DIR)

from genesis_files import atomic_path  # noqa: E402

__all__ = ["KERAS_DIR", "atomic_path", "save_figure", "write_json", "write_text"]


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
