"""Extraction's outputs: the cube file, the per-cube CSV and the preview picture.

Every file is written through `genesis_files.atomic_path` (a temporary name, renamed when
complete), so Ctrl-C, an error or ``kill`` never leaves a partial file under the final name.

Imports: the standard library, NumPy, Pillow (only for the preview) and `genesis_files`.
Never Keras.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from genesis_files import atomic_path, cube_file_name

if TYPE_CHECKING:  # numpy.typing is slow to import; annotations are strings here
    from numpy.typing import DTypeLike

__all__ = ["csv_path", "output_path", "save_cubes_atomically", "write_positions", "write_preview"]


def output_path(save: str, scale: int, rows: int, cols: int, deps: int, fold: int) -> str:
    """``{save}/bat_{scale}_s_{rows}x{cols}x{deps}_{fold}.npy`` (the name the trainer reads)."""
    return os.path.join(save, cube_file_name(scale, rows, cols, deps, fold))


def save_cubes_atomically(
    cubes: Sequence[np.ndarray], path: str, dtype: DTypeLike
) -> tuple[int, ...]:
    """Write the cube arrays, concatenated on axis 0, as one .npy file, atomically.

    The data go to a temporary file in the same folder, renamed over ``path`` only when complete;
    on any error or Ctrl-C the temporary file is removed.

    Args:
        cubes: arrays of shape ``(n_i, R, C, D)``.
        path: the final ``.npy`` path.
        dtype: the stored dtype.

    Returns:
        The saved shape.
    """
    total = sum(len(c) for c in cubes)
    shape = (total,) + tuple(cubes[0].shape[1:])
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=shape)
        start = 0
        for c in cubes:
            out[start : start + len(c)] = c
            start += len(c)
        out.flush()
        del out
    return shape


def csv_path(npy_path: str) -> str:
    """The per-cube CSV beside a cube file: ``FILE.npy`` -> ``FILE.csv``."""
    root = npy_path[:-4] if npy_path.lower().endswith(".npy") else npy_path
    return root + ".csv"


def write_positions(path: str, sources: Sequence[str], positions: Sequence[np.ndarray]) -> int:
    """Write the per-cube CSV, ``source,x,y,z``, one row per cube in order, in place to ``path``.

    The caller renames it into place (`atomic_path`) together with the cube file, so the two
    always match.

    Args:
        path: the (temporary) ``.csv`` path.
        sources: the volume path of each block of cubes.
        positions: per block, the ``(n, 3)`` window starts in the volume as cut.

    Returns:
        The number of rows written.
    """
    import csv

    rows = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "x", "y", "z"])
        for source, block in zip(sources, positions, strict=True):
            for x, y, z in np.asarray(block).tolist():
                writer.writerow([source, x, y, z])
                rows += 1
    return rows


def write_preview(
    path: str,
    sources: Sequence[str],
    cubes: Sequence[np.ndarray],
    per_source: int = 4,
    max_sources: int = 48,
) -> tuple[int, int]:
    """A PNG of a few accepted cubes per source: one row per source, two mid slices per cube.

    For each cube the axial mid slice (x-y plane at depth D // 2) and the mid slice across
    depth (x-z plane at column C // 2) are shown side by side, grey levels 0..1 to 0..255; the
    row starts with the source's file name. Written atomically.

    Args:
        path: the ``.png`` path.
        sources: the volume path of each block of cubes.
        cubes: per source, cubes ``(n, R, C, D)`` in [0, 1].
        per_source: cubes shown per source (the first ones).
        max_sources: sources shown (the first ones).

    Returns:
        The picture's (width, height) in pixels.
    """
    from PIL import Image, ImageDraw

    pairs = zip(sources, cubes, strict=True)
    blocks = [(s, c[:per_source]) for s, c in pairs if len(c)][:max_sources]
    if not blocks:
        raise ValueError("Expected at least one cube for the preview. Received: none")
    rows, cols, deps = blocks[0][1].shape[1:]
    gap, label = 4, 160
    tile_w = rows + deps + gap  # axial (rows wide) then across-depth (deps wide)
    tile_h = max(cols, rows)
    width = label + per_source * (tile_w + gap)
    height = len(blocks) * (tile_h + gap) + gap
    canvas = np.full((height, width), 32, dtype=np.uint8)

    def grey(plane: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(plane * 255.0), 0, 255).astype(np.uint8)

    for r, (_, block) in enumerate(blocks):
        top = gap + r * (tile_h + gap)
        for k, cube in enumerate(block):
            left = label + k * (tile_w + gap)
            # Axial: x across, y down. Across depth: z across, x down.
            canvas[top : top + cols, left : left + rows] = grey(cube[:, :, deps // 2]).T
            right = left + rows + gap
            canvas[top : top + rows, right : right + deps] = grey(cube[:, cols // 2, :])
    image = Image.fromarray(canvas, mode="L")
    draw = ImageDraw.Draw(image)
    for r, (source, _) in enumerate(blocks):
        name = os.path.basename(os.path.normpath(source))
        draw.text((4, gap + r * (tile_h + gap) + 2), name[:24], fill=255)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return image.size
