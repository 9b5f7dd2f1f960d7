"""Extraction's sampler: random windows of one volume, the air or foreground test, the cubes.

`infinite_generator_from_one_volume` is the original algorithm, exactly: the same random draws
in the same order and the same cubes (docs/extraction.md). The original's per-voxel Python air
test is replaced by array operations that reach the same decision (`tissue_score_sum`, on the
raw window for integer volumes with `raw_threshold`), and only kept windows are normalised
(`volume_io.normalise_window`), so one scan takes well under a second instead of 30 to 45 s.

Importable on its own::

    from extraction_presets import setup_config
    from extraction_sampler import infinite_generator_from_one_volume
    cubes = infinite_generator_from_one_volume(setup_config(scale=32), hu_xyz, random.Random(1))

Imports: the standard library, NumPy, scikit-image (only when the crop size differs from the
cube size), `extraction_presets` and `volume_io`. Never Keras.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from extraction_presets import setup_config
from volume_io import VolumeError, normalise_window

if TYPE_CHECKING:  # numpy.typing is slow to import; annotations are strings here
    from numpy.typing import DTypeLike

__all__ = [
    "GeneratorRandint",
    "air_test_limit",
    "infinite_generator_from_one_volume",
    "raw_threshold",
    "size_problem",
    "tissue_score_sum",
    "volume_generator",
    "volume_window",
]


def size_problem(config: setup_config, shape: Sequence[int]) -> str | None:
    """Say why a volume of this (x, y, z) shape gives no cube, or None if it can give cubes.

    Args:
        config: the extraction settings.
        shape: the volume's size in (x, y, z) order.

    Returns:
        A sentence naming the size needed and the size received, or None.
    """
    if len(shape) != 3:
        return f"Expected a 3-D volume. Received: shape={tuple(shape)}"
    x, y, z = (int(s) for s in shape)
    need_z = config.input_deps + config.len_depth + 1 + 2 * config.len_border_z
    if z < need_z:
        # The original's "too few slices" case: the volume silently gives nothing.
        return (
            f"too few slices: expected z >= {need_z} (input_deps {config.input_deps} + len_depth "
            f"{config.len_depth} + 1 + 2 * len_border_z {config.len_border_z}). Received: z={z}"
        )
    need_x = 2 * config.len_border + config.crop_rows + 1
    need_y = 2 * config.len_border + config.crop_cols + 1
    if x < need_x or y < need_y:
        # The original crashed here (randint on an empty range); we skip the volume.
        return (
            f"too small for the borders: expected x >= {need_x} and y >= {need_y} "
            f"(2 * len_border {config.len_border} + crop + 1). Received: x={x}, y={y}"
        )
    return None


def raw_threshold(dtype: DTypeLike, hu_min: float, hu_max: float, HU_thred: float) -> int | None:
    """For an integer dtype, the smallest raw value whose normalised value is >= HU_thred.

    ``normalise_window`` is non-decreasing in the raw value (conversion to float64, clipping,
    subtracting and dividing, each correctly rounded, never reverse an order), so
    ``normalise_window(v) >= HU_thred`` exactly when ``v >= raw_threshold(...)``: the air test can
    run on the raw window, with the same decision, and only kept windows need normalising.

    Args:
        dtype: an integer dtype.
        hu_min, hu_max, HU_thred: as in setup_config.

    Returns:
        The threshold, or None when no value of the dtype reaches HU_thred.
    """
    dtype = np.dtype(dtype)
    info = np.iinfo(dtype)

    def reaches(v: int) -> bool:
        return bool(normalise_window(np.array([v], dtype=dtype), hu_min, hu_max)[0] >= HU_thred)

    low, high = int(info.min), int(info.max)
    if not reaches(high):
        return None
    while low < high:  # smallest v in [low, high] that reaches: binary search on a monotone test
        mid = (low + high) // 2
        if reaches(mid):
            high = mid
        else:
            low = mid + 1
    return low


def tissue_score_sum(
    window: np.ndarray, HU_thred: float, input_deps: int, len_depth: int
) -> Fraction:
    """Exact sum of the air test's per-voxel tissue scores (docs/extraction.md), with array
    operations.

    A voxel's score is ``1 - k / (len_depth - 1)`` where ``k`` is the first of the next
    ``len_depth`` slices (itself included) at or above ``HU_thred``, or ``len_depth - 1``.
    Since ``(len_depth - 1) * score = number of j in [0, len_depth - 1) with a hit at an
    offset <= j``, the sum is a count of cumulative hits, divided by ``len_depth - 1``.

    Args:
        window: shape ``(rows, cols, >= input_deps + len_depth - 1)``: a normalised window, or a
            raw integer one when ``HU_thred`` comes from ``raw_threshold``.
        HU_thred: the tissue threshold, in the window's units.
        input_deps: number of voxel planes scored.
        len_depth: slices looked ahead (at least 2).

    Returns:
        The sum as an exact fraction.
    """
    if len_depth < 2:
        raise ValueError(
            "Expected len_depth >= 2 (the score divides by len_depth - 1). "
            f"Received: len_depth={len_depth}"
        )
    hits = window >= HU_thred
    seen = hits[:, :, :input_deps].copy()
    total = int(np.count_nonzero(seen))
    for offset in range(1, len_depth - 1):
        seen |= hits[:, :, offset : offset + input_deps]
        total += int(np.count_nonzero(seen))
    return Fraction(total, len_depth - 1)


def air_test_limit(config: setup_config) -> float:
    """The air test's limit, computed as the original does (left to right, in float)."""
    return config.lung_max * config.input_rows * config.input_cols * config.input_deps


class GeneratorRandint:
    """A ``randint(a, b)`` (both ends included) drawing from a NumPy Generator.

    The sampler only calls ``rng.randint``; this lets it draw from a per-volume
    ``numpy.random.Generator`` (``--processes``) as well as from the original's
    ``random.Random``.

    Args:
        generator: the seeded NumPy generator.
    """

    def __init__(self, generator: np.random.Generator) -> None:
        self.generator = generator

    def randint(self, a: int, b: int) -> int:
        """An integer in [a, b], both included."""
        return int(self.generator.integers(a, b, endpoint=True))


def volume_generator(seed: int, index: int) -> GeneratorRandint:
    """The random stream of volume ``index`` when volumes are cut independently (``--processes``).

    It is ``numpy.random.default_rng`` of child ``index`` of ``SeedSequence(seed)``, the same as
    ``SeedSequence(seed).spawn(n)[index]`` for any ``n > index``: each volume's windows depend only
    on the seed and the volume's place in the sorted input, never on the number of processes.

    Args:
        seed: the run's ``--seed``.
        index: the volume's position in the list of volumes (0-based).

    Returns:
        A ``randint`` source for ``infinite_generator_from_one_volume``.
    """
    child = np.random.SeedSequence(seed, spawn_key=(index,))
    return GeneratorRandint(np.random.default_rng(child))


def volume_window(config: setup_config, img_array: np.ndarray) -> tuple[float, float]:
    """The intensity window ``(low, high)`` a volume is clipped to and scaled from.

    Args:
        config: gives ``hu_min``/``hu_max``, or ``percentiles`` for a per-volume window.
        img_array: the volume.

    Returns:
        ``(hu_min, hu_max)``, or that volume's two percentiles.

    Raises:
        VolumeError: the percentiles are equal (a constant volume: nothing to scale).
    """
    if config.percentiles is None:
        return float(config.hu_min), float(config.hu_max)
    low, high = (float(v) for v in np.percentile(img_array, config.percentiles))
    if not high > low:
        raise VolumeError(
            f"Expected percentiles {config.percentiles} of the voxels to differ. "
            f"Received: both are {low} (a constant volume)"
        )
    return low, high


def infinite_generator_from_one_volume(
    config: setup_config,
    img_array: np.ndarray,
    rng: random.Random | GeneratorRandint | None = None,
    *,
    positions: list[tuple[int, int, int]] | None = None,
) -> np.ndarray | None:
    """Draw up to ``config.scale`` cubes from one CT volume, exactly as the original
    (docs/extraction.md).

    With ``config.test == "air"`` and the original's constants this is the original algorithm
    exactly (the same draws, the same cubes). With ``"foreground"`` the windows are drawn the same
    way, and a window is kept when at least ``foreground_fraction`` of its cube's voxels reach
    ``foreground_threshold`` once scaled to [0, 1].

    Args:
        config: the extraction settings (see ``setup_config``).
        img_array: raw HU values in (x, y, z) order (a transposed view is fine).
        rng: the generator to draw from (anything with ``randint(a, b)``); None uses the global
            ``random`` module. Its state afterwards is what the original algorithm leaves.
        positions: when a list, the ``(x, y, z)`` first voxel of each kept window is appended.

    Returns:
        float64 cubes of shape ``(n, input_rows, input_cols, input_deps)``, values in [0, 1],
        ``1 <= n <= scale``; or None when the volume gives nothing (too few slices, too small
        for the borders, or every window rejected). A volume too small draws no numbers.
    """
    if np.ndim(img_array) != 3:
        raise ValueError(
            "Expected a 3-D array in (x, y, z) order. "
            f"Received: img_array.shape={np.shape(img_array)}"
        )
    if config.len_depth < 2:
        raise ValueError(f"Expected config.len_depth >= 2. Received: len_depth={config.len_depth}")
    if positions is None:
        positions = []
    if size_problem(config, img_array.shape) is not None:
        return None
    randint = (random if rng is None else rng).randint
    size_x, size_y, size_z = img_array.shape
    rows, cols, deps, depth = (
        config.input_rows,
        config.input_cols,
        config.input_deps,
        config.len_depth,
    )
    crop_rows, crop_cols = config.crop_rows, config.crop_cols
    border, border_z = config.len_border, config.len_border_z
    x_high = size_x - crop_rows - 1 - border
    y_high = size_y - crop_cols - 1 - border
    z_high = size_z - deps - depth - 1 - border_z
    hu_min, hu_max = volume_window(config, img_array)
    air = getattr(config, "test", "air") == "air"
    # Reject when score_sum > limit; score_sum = count / (depth - 1) with an integer count, so
    # compare the count with floor(limit * (depth - 1)) computed exactly from the float limit.
    max_count = math.floor(Fraction(air_test_limit(config)) * (depth - 1))
    # The foreground test keeps a cube with at least this many foreground voxels.
    min_foreground = math.ceil(getattr(config, "foreground_fraction", 0.5) * rows * cols * deps)
    need_resize = (crop_rows, crop_cols) != (rows, cols)
    if need_resize:
        from skimage.transform import resize  # only here: a slow import most runs never need
    # Integer volumes (CT) run the air test on the raw window with the equivalent raw threshold
    # and normalise only the windows they keep; others normalise every window first.
    raw_test = air and not need_resize and np.issubdtype(img_array.dtype, np.integer)
    if raw_test:
        threshold = raw_threshold(img_array.dtype, hu_min, hu_max, config.HU_thred)
        if threshold is None:  # nothing reaches tissue: compare with a bound no value reaches
            threshold = float("inf")

    cubes = np.empty((config.scale, rows, cols, deps), dtype=np.float64)
    kept = 0
    attempts = 0
    while kept < config.scale:
        attempts += 1
        if attempts > 50 * config.scale:
            break
        sx = randint(border, x_high)
        sy = randint(border, y_high)
        sz = randint(border_z, z_high)
        raw = img_array[sx : sx + crop_rows, sy : sy + crop_cols, sz : sz + deps + depth]
        if raw_test:
            if tissue_score_sum(raw, threshold, deps, depth) * (depth - 1) > max_count:
                continue
            normalise_window(raw[:, :, :deps], hu_min, hu_max, out=cubes[kept])
        else:
            window = normalise_window(raw, hu_min, hu_max)
            if need_resize:
                window = resize(window, (rows, cols, deps + depth), preserve_range=True)
            if air:
                score = tissue_score_sum(window, config.HU_thred, deps, depth)
                if score * (depth - 1) > max_count:
                    continue
            else:
                cube = window[:, :, :deps]
                if np.count_nonzero(cube >= config.foreground_threshold) < min_foreground:
                    continue
            cubes[kept] = window[:, :, :deps]
        positions.append((sx, sy, sz))
        kept += 1
    if kept == 0:
        return None
    return cubes if kept == config.scale else cubes[:kept].copy()
