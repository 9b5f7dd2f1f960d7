"""A plain, slow, obviously-correct reading of the extraction algorithm, for tests only.

It normalises the whole volume in float64, scores every voxel with explicit loops and sums
the scores in Python floats, exactly as docs/extraction.md words it. Nothing here is shared
with infinite_generator_3D.py except the config object.
"""

from __future__ import annotations

import random

import numpy as np


def normalise_volume(volume_xyz: np.ndarray, hu_min: float, hu_max: float) -> np.ndarray:
    """The normalisation on the whole volume: clip, then (v - hu_min) / (hu_max - hu_min) in
    float64."""
    v = volume_xyz.astype(np.float64)
    v = np.clip(v, hu_min, hu_max)
    return (v - hu_min) / (hu_max - hu_min)


def tissue_score_sum_loop(
    window: np.ndarray,
    HU_thred: float,
    input_rows: int,
    input_cols: int,
    input_deps: int,
    len_depth: int,
) -> float:
    """The air test's tissue score, voxel by voxel: sum of 1 - k / (len_depth - 1)."""
    w = window.tolist()  # nested Python lists: the same float values, faster to index
    total = 0.0
    for i in range(input_rows):
        for j in range(input_cols):
            column = w[i][j]
            for d in range(input_deps):
                k = len_depth - 1
                for kk in range(len_depth):
                    if column[d + kk] >= HU_thred:
                        k = kk
                        break
                total += 1 - k / (len_depth - 1)
    return total


def tissue_score_sum_argmax(
    window: np.ndarray, HU_thred: float, input_deps: int, len_depth: int
) -> float:
    """The same sum as tissue_score_sum_loop, from an explicit per-voxel k array (a fast second
    reference)."""
    stacked = np.stack(
        [window[:, :, kk : kk + input_deps] >= HU_thred for kk in range(len_depth)], axis=-1
    )
    k = np.where(stacked.any(axis=-1), stacked.argmax(axis=-1), len_depth - 1)
    scores = 1 - k / (len_depth - 1)
    return float(scores.sum())


def reference_cubes(config, volume_xyz: np.ndarray, rng: random.Random, air_test: str = "loop"):
    """The whole sampler for one volume. Returns float64 cubes (n, R, C, D) or None.

    Args:
        config: a setup_config.
        volume_xyz: raw HU in (x, y, z) order.
        rng: the random.Random to draw from.
        air_test: "loop" (per-voxel loops) or "argmax" (k array; quicker, for long runs).
    """
    X, Y, Z = volume_xyz.shape
    rows, cols, deps, L = config.input_rows, config.input_cols, config.input_deps, config.len_depth
    if Z - deps - L - 1 - config.len_border_z < config.len_border_z:
        return None
    v = normalise_volume(volume_xyz, config.hu_min, config.hu_max)
    cubes = []
    counter = 0
    while len(cubes) < config.scale:
        counter += 1
        if counter > 50 * config.scale:
            break
        sx = rng.randint(config.len_border, X - config.crop_rows - 1 - config.len_border)
        sy = rng.randint(config.len_border, Y - config.crop_cols - 1 - config.len_border)
        sz = rng.randint(config.len_border_z, Z - deps - L - 1 - config.len_border_z)
        window = v[sx : sx + config.crop_rows, sy : sy + config.crop_cols, sz : sz + deps + L]
        if (config.crop_rows, config.crop_cols) != (rows, cols):
            from skimage.transform import resize

            window = resize(window, (rows, cols, deps + L), preserve_range=True)
        if air_test == "loop":
            total = tissue_score_sum_loop(window, config.HU_thred, rows, cols, deps, L)
        else:
            total = tissue_score_sum_argmax(window, config.HU_thred, deps, L)
        if total > config.lung_max * rows * cols * deps:
            continue
        cubes.append(window[:, :, :deps])
    if not cubes:
        return None
    return np.array(cubes)
