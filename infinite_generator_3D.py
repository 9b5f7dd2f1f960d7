#!/usr/bin/env python
"""Cut Models Genesis training cubes out of CT volumes (docs/extraction.md).

For one LUNA16 fold (``{data}/subset{fold}/``) this reads every CT volume in sorted order,
draws up to ``--scale`` random 64x64x32 windows from each with Python's ``random`` (seeded once
with ``--seed``), keeps those that pass the original's air test (lung windows: little tissue),
and saves all cubes of the fold, stacked to ``(N, rows, cols, deps)`` with values in [0, 1], as
``{save}/bat_{scale}_s_{rows}x{cols}x{deps}_{fold}.npy``.

With ``--input PATH ... --output FILE.npy`` it reads any collection of volumes instead, with a
``--preset`` (``ct-chest``, the original's constants and the default; ``ct``; ``mri``), optional
resampling (``--spacing``), worker processes with one random stream per volume
(``--processes``), a per-cube ``FILE.csv`` (source,x,y,z) and a preview PNG
(docs/own_data.md).

The cubes are exactly those of the original algorithm (same random draws in the same order);
the original's per-voxel Python air test is replaced by array operations that reach the same
decision (on the raw window, for integer volumes), and only kept windows are normalised, so
one scan takes well under a second instead of 30 to 45 s.

Importable sampler::

    from infinite_generator_3D import setup_config, infinite_generator_from_one_volume
    config = setup_config(scale=32)
    cubes = infinite_generator_from_one_volume(config, hu_xyz, random.Random(1))

Imports: NumPy, SimpleITK (lazily), scikit-image (only when the crop size differs from the input
size), tqdm (progress bar) and ``keras/genesis_files.py`` (standard library only: cube-file names
and the atomic writer). It never imports Keras.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

# genesis_files (standard library only) lives in keras/ beside the trainer that reads these files.
# Appended, not prepended, so keras/'s other modules never shadow an installed package.
_KERAS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras")
if _KERAS_DIR not in sys.path:
    sys.path.append(_KERAS_DIR)
from genesis_files import atomic_path, cube_file_name

if TYPE_CHECKING:  # numpy.typing is slow to import; annotations are strings here
    import SimpleITK as sitk
    from numpy.typing import DTypeLike

# File suffixes read as one volume each; folders are read as DICOM series. ".raw" (the data of a
# ".mhd") and anything else is ignored.
VOLUME_SUFFIXES = (".mhd", ".mha", ".nii", ".nii.gz", ".nrrd")

# How a drawn window is accepted: the original's air (lung) test, or a foreground test.
WINDOW_TESTS = ("air", "foreground")

# What the constants mean for a kind of data (docs/own_data.md). `ct-chest` is the original's
# (LUNA16 chest CT); the others drop the 100-voxel border, which most collections are too small
# for, and replace the lung test by a test that the cube is mostly inside the body. A flag given
# on the command line overrides the preset's value.
PRESETS: dict[str, dict[str, object]] = {
    "ct-chest": {
        "hu_min": -1000.0,
        "hu_max": 1000.0,
        "len_border": 100,
        "len_border_z": 30,
        "test": "air",
        "air_hu": -150.0,
        "lung_max": 0.15,
        "percentiles": None,
    },
    "ct": {
        "hu_min": -1000.0,
        "hu_max": 1000.0,
        "len_border": 0,
        "len_border_z": 0,
        "test": "foreground",
        # -500 HU: fat and soft tissue (about -100 HU and above) count, air does not.
        "foreground_threshold": 0.25,
        "foreground_fraction": 0.5,
        "percentiles": None,
    },
    "mri": {
        # The clip the published weights' README gives for MRI.
        "hu_min": 0.0,
        "hu_max": 4000.0,
        "len_border": 0,
        "len_border_z": 0,
        "test": "foreground",
        "foreground_threshold": 0.02,
        "foreground_fraction": 0.5,
        "percentiles": None,
    },
}
DEFAULT_PRESET = "ct-chest"

EXAMPLE = (
    "example (one fold):\n"
    "  python infinite_generator_3D.py --fold 0 --scale 32 --data datasets/luna16 "
    "--save generated_cubes\n"
    "\n"
    "example (all ten LUNA16 folds):\n"
    "  for fold in 0 1 2 3 4 5 6 7 8 9; do\n"
    "    python infinite_generator_3D.py --fold $fold --scale 32 --data /path/to/LUNA16 "
    "--save generated_cubes\n"
    "  done\n"
    "\n"
    "example (your own CT collection, docs/own_data.md):\n"
    "  python infinite_generator_3D.py --input ../shared/data/sts_ct/imagesTr "
    "--output generated_cubes/sts_ct.npy \\\n"
    "      --preset ct --preview generated_cubes/sts_ct_preview.png\n"
    "\n"
    "Writes {save}/bat_{scale}_s_{rows}x{cols}x{deps}_{fold}.npy, "
    "e.g. generated_cubes/bat_32_s_64x64x32_0.npy:\n"
    "float32 (N, rows, cols, deps), values in [0, 1] (HU clipped to [-1000, 1000], then scaled).\n"
    "Exit status: 0 when a cube file was written, 1 when nothing usable was found, "
    "2 for bad flags,\n"
    "130 after Ctrl-C and 143 after SIGTERM (then nothing is written).\n"
)


class setup_config:
    """Settings of the cube extraction, with the original's names (docs/extraction.md).

    Args:
        input_rows, input_cols, input_deps: size of a saved cube.
        crop_rows, crop_cols: size of the window cut from the volume before it is resized to
            ``input_rows x input_cols`` (no resize when equal).
        len_border: voxels kept away from the x and y edges.
        len_border_z: slices kept away from the z ends.
        scale: cubes wanted per volume; at most ``50 * scale`` windows are tried.
        DATA_DIR: the LUNA16 root holding ``subset0`` .. ``subset9`` (informative only).
        train_fold, valid_fold, test_fold: fold lists of the original config (informative only).
        len_depth: slices looked ahead by the air test (at least 2).
        lung_min: kept for compatibility; unused, as in the original.
        lung_max: reject a window whose tissue score exceeds this fraction of its voxels.
        hu_min, hu_max: the intensity window clipped to and scaled to [0, 1] (None: the
            original's -1000 and 1000 HU).
        air_hu: the air test's tissue threshold in the volume's units (-150 HU).
        test: "air" (the original's lung test) or "foreground" (reject windows that are mostly
            background).
        foreground_threshold: a voxel is foreground when its value scaled to [0, 1] is at least
            this (0.25 is -500 HU in the default window).
        foreground_fraction: the foreground test keeps a cube with at least this fraction of
            foreground voxels.
        percentiles: (LOW, HIGH): take each volume's window from these percentiles of its
            voxels instead of hu_min and hu_max (None: the fixed window).

    Attributes ``hu_min = -1000.0``, ``hu_max = 1000.0`` and ``HU_thred``, the normalised value
    of -150 HU (0.425), complete the original's constants.
    """

    hu_min = -1000.0
    hu_max = 1000.0

    def __init__(
        self,
        input_rows: int = 64,
        input_cols: int = 64,
        input_deps: int = 32,
        crop_rows: int = 64,
        crop_cols: int = 64,
        len_border: int = 100,
        len_border_z: int = 30,
        scale: int = 32,
        DATA_DIR: str | None = None,
        train_fold: Sequence[int] = (0, 1, 2, 3, 4),
        valid_fold: Sequence[int] = (5, 6),
        test_fold: Sequence[int] = (7, 8, 9),
        len_depth: int = 3,
        lung_min: float = 0.7,
        lung_max: float = 0.15,
        *,
        hu_min: float | None = None,
        hu_max: float | None = None,
        air_hu: float = -150.0,
        test: str = "air",
        foreground_threshold: float = 0.25,
        foreground_fraction: float = 0.5,
        percentiles: Sequence[float] | None = None,
    ) -> None:
        self.input_rows = input_rows
        self.input_cols = input_cols
        self.input_deps = input_deps
        self.crop_rows = crop_rows
        self.crop_cols = crop_cols
        self.len_border = len_border
        self.len_border_z = len_border_z
        self.scale = scale
        self.DATA_DIR = DATA_DIR
        self.train_fold = list(train_fold)
        self.valid_fold = list(valid_fold)
        self.test_fold = list(test_fold)
        self.len_depth = len_depth
        self.lung_min = lung_min
        self.lung_max = lung_max
        # Only set on the instance when given: the class attributes stay the original's.
        if hu_min is not None:
            self.hu_min = float(hu_min)
        if hu_max is not None:
            self.hu_max = float(hu_max)
        if not self.hu_max > self.hu_min:
            raise ValueError(
                f"Expected hu_max > hu_min. Received: hu_min={self.hu_min}, hu_max={self.hu_max}"
            )
        if test not in WINDOW_TESTS:
            raise ValueError(f"Expected test in {WINDOW_TESTS}. Received: test={test!r}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(
                "Expected foreground_fraction in [0, 1]. "
                f"Received: foreground_fraction={foreground_fraction}"
            )
        if percentiles is not None:
            percentiles = tuple(float(q) for q in percentiles)
            if len(percentiles) != 2 or not 0.0 <= percentiles[0] < percentiles[1] <= 100.0:
                raise ValueError(
                    "Expected percentiles LOW HIGH with 0 <= LOW < HIGH <= 100. "
                    f"Received: percentiles={percentiles}"
                )
        self.air_hu = float(air_hu)
        self.test = test
        self.foreground_threshold = float(foreground_threshold)
        self.foreground_fraction = float(foreground_fraction)
        self.percentiles = percentiles
        # Computed exactly as the original does, so the float matches bit for bit.
        self.HU_thred = (self.air_hu - self.hu_min) / (self.hu_max - self.hu_min)

    def display(self) -> None:
        """Print every setting, one per line."""
        print("\nConfigurations:")
        for name in sorted(dir(self)):
            value = getattr(self, name)
            if not name.startswith("__") and not callable(value):
                print(f"{name:30} {value}")
        print("\n")


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


def normalise_hu(window: np.ndarray, hu_min: float, hu_max: float) -> np.ndarray:
    """Clip HU values to [hu_min, hu_max] and scale to [0, 1] in float64 (the normalisation of
    docs/extraction.md).

    Elementwise, so normalising a window gives the same bits as normalising the whole volume
    and then cutting the window.

    Args:
        window: raw HU values, any real dtype.
        hu_min, hu_max: the clipping range.

    Returns:
        A new float64 array of the same shape.
    """
    out = np.asarray(window).astype(np.float64)
    np.clip(out, hu_min, hu_max, out=out)
    out -= hu_min
    out /= hu_max - hu_min
    return out


def _normalise_into(out: np.ndarray, window: np.ndarray, hu_min: float, hu_max: float) -> None:
    """normalise_hu(window) written into ``out`` (C order): the same operations, so the same
    bits."""
    np.copyto(out, window, casting="unsafe")  # exact: every integer HU value is a float64
    np.clip(out, hu_min, hu_max, out=out)
    out -= hu_min
    out /= hu_max - hu_min


def raw_threshold(dtype: DTypeLike, hu_min: float, hu_max: float, HU_thred: float) -> int | None:
    """For an integer dtype, the smallest raw value whose normalised value is >= HU_thred.

    ``normalise_hu`` is non-decreasing in the raw value (conversion to float64, clipping,
    subtracting and dividing, each correctly rounded, never reverse an order), so
    ``normalise_hu(v) >= HU_thred`` exactly when ``v >= raw_threshold(...)``: the air test can
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
        return bool(normalise_hu(np.array([v], dtype=dtype), hu_min, hu_max)[0] >= HU_thred)

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
        A ``randint`` source for ``sample_volume``.
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


def sample_volume(
    config: setup_config,
    img_array: np.ndarray,
    rng: random.Random | GeneratorRandint | None = None,
) -> tuple[np.ndarray | None, list[tuple[int, int, int]]]:
    """``infinite_generator_from_one_volume``, also saying where each cube was cut.

    Args:
        config: the extraction settings (see ``setup_config``).
        img_array: raw values in (x, y, z) order (a transposed view is fine).
        rng: anything with ``randint(a, b)``; None uses the global ``random`` module.

    Returns:
        ``(cubes or None, positions)``: the ``(x, y, z)`` first voxel of each kept window, in
        order.
    """
    positions: list[tuple[int, int, int]] = []
    cubes = infinite_generator_from_one_volume(config, img_array, rng, positions=positions)
    return cubes, positions


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
            _normalise_into(cubes[kept], raw[:, :, :deps], hu_min, hu_max)
        else:
            window = normalise_hu(raw, hu_min, hu_max)
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


# ----------------------------------------------------------------------------------------------
# Reading volumes


class VolumeError(Exception):
    """A volume that cannot be used; the message says why."""


def list_volumes(fold_dir: str) -> list[str]:
    """The volumes of one fold folder, in sorted name order.

    Files ending in .mhd, .mha, .nii, .nii.gz or .nrrd (any case) are volumes; so is every
    sub-folder (read as a DICOM series). Hidden entries and other files (.raw data) are ignored.

    Args:
        fold_dir: e.g. ``datasets/luna16/subset0``.

    Returns:
        Paths, sorted by name.
    """
    found = []
    for name in sorted(os.listdir(fold_dir)):
        if name.startswith("."):
            continue
        path = os.path.join(fold_dir, name)
        if os.path.isdir(path) or name.lower().endswith(VOLUME_SUFFIXES):
            found.append(path)
    return found


def _nifti_layout(header: bytes) -> tuple[str, int, int, int, int] | None:
    """Parse a NIfTI-1/2 header: ``(byte order, datatype, bitpix, vox_offset, voxel count)``, or
    None."""
    import struct

    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            vox_offset = struct.unpack(order + "f", header[108:112])[0]
        elif len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dims = struct.unpack(order + "8q", header[16:80])
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            vox_offset = struct.unpack(order + "q", header[168:176])[0]
        else:
            continue
        ndim = dims[0]
        if not 1 <= ndim <= 7 or bitpix <= 0:
            return None
        count = 1
        for d in dims[1 : ndim + 1]:
            count *= max(int(d), 1)
        return order, int(datatype), int(bitpix), int(vox_offset), count
    return None


def _nifti_expected_size(header: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file holds before compression (vox_offset + voxel data), or None."""
    layout = _nifti_layout(header)
    if layout is None:
        return None
    _, _, bitpix, vox_offset, count = layout
    return vox_offset + count * bitpix // 8


# NIfTI datatype codes of real floating-point voxels: FLOAT32, FLOAT64.
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _check_nifti_finite(path: str) -> None:
    """Raise VolumeError when a floating-point NIfTI file holds NaN or infinite voxels.

    ITK reads such voxels as 0 (tissue, to the air test) without a word, so the file's own
    bytes are scanned. Integer files (CT as LUNA16 and scanners store it) are not scanned.
    """
    import gzip

    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        layout = _nifti_layout(f.read(540))
        if layout is None or layout[1] not in _NIFTI_FLOAT_TYPES:
            return
        order, datatype, _, vox_offset, count = layout
        dtype = np.dtype(order + _NIFTI_FLOAT_TYPES[datatype])
        f.seek(vox_offset)
        bad = 0
        left = count * dtype.itemsize
        while left > 0:
            chunk = f.read(min(left, 1 << 24))
            usable = len(chunk) - len(chunk) % dtype.itemsize
            if usable == 0:
                break
            values = np.frombuffer(chunk[:usable], dtype=dtype)
            bad += values.size - int(np.count_nonzero(np.isfinite(values)))
            left -= usable
    if bad:
        raise VolumeError(f"Expected finite HU values. Received: {bad} NaN or infinite voxels")


def _check_nifti_complete(path: str) -> None:
    """Raise VolumeError when a NIfTI file is shorter than its header says.

    ITK reads a truncated .nii or .nii.gz without complaint and fills the rest with zeros. For
    .nii.gz the gzip trailer's size field is checked first (cheap); only when it disagrees is
    the stream decompressed to count its bytes.
    """
    import gzip
    import zlib

    lower = path.lower()
    if lower.endswith(".nii"):
        with open(path, "rb") as f:
            expected = _nifti_expected_size(f.read(540))
        actual = os.path.getsize(path)
    elif lower.endswith(".nii.gz"):
        try:
            with gzip.open(path, "rb") as f:
                expected = _nifti_expected_size(f.read(540))
        except (OSError, EOFError, zlib.error) as exc:
            raise VolumeError(f"cannot read: not a valid gzip file ({exc})") from None
        if expected is None:
            return
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            trailer_size = int.from_bytes(f.read(4), "little")
        if trailer_size == expected % 2**32:
            return
        actual = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    actual += len(chunk)
        except (OSError, EOFError, zlib.error):
            pass  # a truncated stream: actual counts what could be decompressed
    else:
        return
    if expected is not None and actual < expected:
        raise VolumeError(
            f"truncated: the header needs {expected} bytes of image data, the file holds {actual}"
        )


def _mhd_hint(path: str) -> str:
    """For a MetaImage (.mhd or .mha) whose data are missing or short, a phrase saying so; else ''.

    ITK's own complaint about a short MetaImage is misleading ("No such file or directory").
    """
    try:
        fields = {}
        with open(path, "rb") as f:
            for raw_line in f:
                line = raw_line.decode("latin-1")
                if "=" in line:
                    key, value = line.split("=", 1)
                    fields[key.strip()] = value.strip()
                if line.startswith(
                    "ElementDataFile"
                ):  # the header's last field; binary data may follow
                    header_bytes = f.tell()
                    break
            else:
                return ""
        data_name = fields.get("ElementDataFile", "")
        if data_name in ("", "LIST") or data_name.startswith("LIST") or "%" in data_name:
            return ""
        if data_name == "LOCAL":  # .mha: the data follow the header in the same file
            data_path, offset, where = path, header_bytes, os.path.basename(path)
        else:
            data_path, offset, where = (
                os.path.join(os.path.dirname(path), data_name),
                0,
                f"data file {data_name}",
            )
            if not os.path.exists(data_path):
                return f"{where} not found"
        actual = os.path.getsize(data_path) - offset
        if fields.get("CompressedData", "False").lower() == "true":
            expected = int(fields.get("CompressedDataSize", 0) or 0)  # 0: unknown, not checked
        else:
            sizes = {
                "MET_CHAR": 1,
                "MET_UCHAR": 1,
                "MET_SHORT": 2,
                "MET_USHORT": 2,
                "MET_INT": 4,
                "MET_UINT": 4,
                "MET_LONG_LONG": 8,
                "MET_ULONG_LONG": 8,
                "MET_FLOAT": 4,
                "MET_DOUBLE": 8,
            }
            if fields.get("ElementType") not in sizes:
                return ""
            channels = int(fields.get("ElementNumberOfChannels", 1))
            expected = (
                math.prod(int(s) for s in fields["DimSize"].split())
                * sizes[fields["ElementType"]]
                * channels
            )
        if actual < expected:
            return f"{where} holds {actual} bytes of image data, expected {expected} (truncated?)"
    except (OSError, ValueError, KeyError):
        pass
    return ""


def _itk_reason(exc: BaseException) -> str:
    """The informative lines of a SimpleITK exception, on one line."""
    lines = []
    for line in str(exc).splitlines():
        line = line.strip()
        if not line or line.startswith("Exception thrown in SimpleITK"):
            continue
        if ": " in line and ("ITK ERROR" in line or "sitk::ERROR" in line):
            line = line.split("): ", 1)[-1] if "): " in line else line.split(": ", 1)[-1]
        lines.append(line)
    return "; ".join(lines[:3]) or type(exc).__name__


def _check_dicom_leftovers(folder: str, in_series: set[str]) -> None:
    """Raise VolumeError when a DICOM file of the folder belongs to no series because it cannot be
    read.

    GDCM leaves a truncated or damaged slice out of the series without a word, and ITK then
    stacks the others as if nothing were missing. Files that are not DICOM (no ``DICM`` marker),
    DICOMDIR, and readable DICOM objects that are not image slices are ignored.
    """
    import SimpleITK as sitk

    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if (
            name in in_series
            or name.startswith(".")
            or name.upper() == "DICOMDIR"
            or not os.path.isfile(full)
        ):
            continue
        try:
            with open(full, "rb") as f:
                is_dicom = f.read(132)[128:] == b"DICM"
        except OSError:
            is_dicom = False
        if not is_dicom:
            continue
        info = sitk.ImageFileReader()
        info.SetFileName(full)
        try:
            info.ReadImageInformation()
        except RuntimeError:
            raise VolumeError(
                f"cannot read: DICOM file {name} in this folder is unreadable or truncated "
                f"(left out of the series, the volume would miss a slice)"
            ) from None


def read_volume(path: str, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Read one CT volume (a file, or a folder holding one DICOM series) as raw values in
    (x, y, z) order.

    Args:
        path: a .mhd/.mha/.nii/.nii.gz/.nrrd file or a DICOM series folder.
        spacing: (x, y, z) voxel size in mm to resample to (``resample_image``); None keeps
            the native grid, as the original.

    Returns:
        The voxel array, a transposed view of SimpleITK's (z, y, x) array (float32 when
        resampled).

    Raises:
        VolumeError: the file cannot be read, is truncated, is not a 3-D scalar volume, or has
            NaN or infinite voxels. The message says which.
    """
    import SimpleITK as sitk

    try:
        if os.path.isdir(path):
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(path)
            if not series:
                inner = [n for n in sorted(os.listdir(path)) if n.lower().endswith(VOLUME_SUFFIXES)]
                if inner:  # e.g. LUNA16's zip unpacked to subset0/subset0/
                    raise VolumeError(
                        f"no DICOM series found in this folder, but it holds {len(inner)} volume "
                        f"files ({inner[0]}, ...): volumes must sit directly in subset{{fold}}/"
                    )
                raise VolumeError("no DICOM series found in this folder")
            # Several series in one folder: only the first (in GDCM's order) is read.
            files = reader.GetGDCMSeriesFileNames(path, series[0])
            in_series = {
                os.path.basename(f)
                for s in series[1:]
                for f in reader.GetGDCMSeriesFileNames(path, s)
            }
            _check_dicom_leftovers(path, in_series | {os.path.basename(f) for f in files})
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            _check_nifti_complete(path)
            if path.lower().endswith((".nii", ".nii.gz")):
                _check_nifti_finite(path)
            hint = _mhd_hint(path) if path.lower().endswith((".mhd", ".mha")) else ""
            if hint:  # say it plainly, before ITK prints its own less helpful complaint
                raise VolumeError(f"cannot read: {hint}")
            image = sitk.ReadImage(path)
    except RuntimeError as exc:  # a MetaImage's missing or short data were named above
        raise VolumeError(f"cannot read: {_itk_reason(exc)}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(
            "Expected one value per voxel (a CT volume). "
            f"Received: {image.GetNumberOfComponentsPerPixel()} components"
        )
    if image.GetDimension() != 3:
        raise VolumeError(
            "Expected a 3-D volume. "
            f"Received: {image.GetDimension()}-D image of size {image.GetSize()}"
        )
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise VolumeError(f"Expected finite HU values. Received: {bad} NaN or infinite voxels")
    if spacing is not None:
        del array
        array = sitk.GetArrayFromImage(resample_image(image, spacing))
    return array.transpose(2, 1, 0)


def resample_image(image: sitk.Image, spacing: Sequence[float]) -> sitk.Image:
    """Resample a volume to ``spacing`` (mm, x y z) with linear interpolation, as float32.

    The new grid keeps the origin and direction and covers the same extent:
    ``round(size * old_spacing / new_spacing)`` voxels per axis. Float32 keeps the interpolated
    values (an integer output would truncate them); points outside the volume, at most half a
    voxel at the far edges, take its minimum.

    Args:
        image: a 3-D SimpleITK image.
        spacing: the new voxel size in mm, (x, y, z), each > 0.

    Returns:
        The resampled float32 image.
    """
    import SimpleITK as sitk

    new_spacing = [float(v) for v in spacing]
    if len(new_spacing) != 3 or not all(v > 0 for v in new_spacing):
        raise ValueError(f"Expected three spacings > 0 (x y z, mm). Received: spacing={spacing}")
    old_size, old_spacing = image.GetSize(), image.GetSpacing()
    extent = zip(old_size, old_spacing, new_spacing, strict=True)
    new_size = [max(1, int(round(n * o / s))) for n, o, s in extent]
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    return sitk.Resample(
        image,
        new_size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        new_spacing,
        image.GetDirection(),
        float(stats.GetMinimum()),
        sitk.sitkFloat32,
    )


def _read_or_reason(
    path: str, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray | None, str | None]:
    try:
        return read_volume(path, spacing), None
    except VolumeError as exc:
        return None, str(exc)
    except (OSError, MemoryError, ValueError) as exc:
        return None, f"cannot read: {exc}"


def iter_volumes(
    paths: Sequence[str], workers: int, spacing: Sequence[float] | None = None
) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """Yield ``(path, array or None, reason or None)`` for each path, in order.

    With ``workers > 0``, that many threads read the next volumes while the caller samples the
    current one (SimpleITK releases the GIL while reading); the order never changes.

    Args:
        paths: volume files or DICOM folders, in the order wanted.
        workers: reading threads (0: read in the caller's thread).
        spacing: resample each volume to this (x, y, z) spacing in mm (None: native).

    Returns:
        An iterator over ``(path, array in (x, y, z) order or None, reason or None)``.
    """
    if workers <= 0:
        for path in paths:
            yield (path, *_read_or_reason(path, spacing))
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read-volume")
    try:
        todo = iter(paths)
        pending: deque = deque()
        for path in todo:
            pending.append((path, pool.submit(_read_or_reason, path, spacing)))
            if len(pending) >= workers:
                break
        while pending:
            path, future = pending.popleft()
            result = future.result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_read_or_reason, nxt, spacing)))
            yield (path, *result)
            del result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# One fold


@dataclass
class VolumeReport:
    """What one volume gave: the number of cubes and, when fewer than wanted, why."""

    path: str
    cubes: int
    reason: str | None = None


@dataclass
class FoldResult:
    """The cubes of one fold (or of a list of volumes) and a report per volume.

    Attributes:
        cubes: one array per volume that gave any cube, in order.
        volumes: one report per volume read, in order.
        sources: the path of each array of ``cubes``.
        positions: for each array of ``cubes``, the ``(n, 3)`` first voxels (x, y, z) of its
            windows in the volume as cut (after any resampling).
    """

    cubes: list[np.ndarray] = field(default_factory=list)
    volumes: list[VolumeReport] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)

    @property
    def n_cubes(self) -> int:
        return sum(len(c) for c in self.cubes)


def _cut_one(
    path: str,
    array: np.ndarray | None,
    reason: str | None,
    config: setup_config,
    rng: random.Random | GeneratorRandint,
    dtype: DTypeLike,
    warn_all_sizes: bool,
) -> tuple[VolumeReport, np.ndarray | None, np.ndarray, list[str]]:
    """Sample one volume already read: (report, cubes or None, positions, warnings)."""
    warnings: list[str] = []
    positions = np.zeros((0, 3), dtype=np.int64)
    if array is None:
        warnings.append(f"warning: skipping {path}: {reason}")
        return VolumeReport(path, 0, reason), None, positions, warnings
    reason = size_problem(config, array.shape)
    # The original gives nothing silently for too few slices; with --input every size problem
    # is named at once, since a preset's borders may not fit a whole collection.
    if reason is not None and (warn_all_sizes or reason.startswith("too small")):
        warnings.append(f"warning: skipping {path}: {reason}")
    cubes = None
    if reason is None:
        where: list[tuple[int, int, int]] = []
        try:
            cubes = infinite_generator_from_one_volume(config, array, rng, positions=where)
        except VolumeError as exc:
            reason = str(exc)
            warnings.append(f"warning: skipping {path}: {reason}")
        else:
            positions = np.asarray(where, dtype=np.int64).reshape(-1, 3)
    del array
    if reason is None and cubes is None:
        what = (
            "failed the air test (too little lung)"
            if config.test == "air"
            else f"failed the foreground test (under {config.foreground_fraction:g} of the "
            f"voxels at or above {config.foreground_threshold:g} once scaled to [0, 1])"
        )
        reason = f"gave no cube: all {50 * config.scale} windows {what}"
    elif cubes is not None and len(cubes) < config.scale:
        reason = f"gave {len(cubes)} of {config.scale} cubes: {50 * config.scale} windows tried"
    if cubes is not None:
        cubes = cubes.astype(dtype, copy=False)
    report = VolumeReport(path, 0 if cubes is None else len(cubes), reason)
    return report, cubes, positions, warnings


def _process_one(
    task: tuple[int, str, setup_config, int, Sequence[float] | None, str, bool],
) -> tuple[VolumeReport, np.ndarray | None, np.ndarray, list[str]]:
    """Read and sample volume ``index`` in a worker process, from its own random stream."""
    index, path, config, seed, spacing, dtype, warn_all_sizes = task
    array, reason = _read_or_reason(path, spacing)
    rng = volume_generator(seed, index)
    return _cut_one(path, array, reason, config, rng, dtype, warn_all_sizes)


def _init_worker(itk_threads: int) -> None:
    """Worker processes leave Ctrl-C to the main process, which stops the pool."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)
    except ImportError:  # read_volume says so, per volume
        pass


def _iter_processes(
    paths: Sequence[str],
    config: setup_config,
    seed: int,
    processes: int,
    spacing: Sequence[float] | None,
    dtype: DTypeLike,
    warn_all_sizes: bool,
) -> Iterator[tuple[VolumeReport, np.ndarray | None, np.ndarray, list[str]]]:
    """The results of ``_process_one`` for each volume, in order, from a pool of processes.

    At most ``2 * processes`` volumes are in flight, so memory stays bounded however many
    volumes there are. Processes are spawned (not forked): a fork of a process whose threads
    hold locks (ITK's, tqdm's) can hang.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    itk_threads = max(1, (os.cpu_count() or 1) // processes)
    pool = ProcessPoolExecutor(
        max_workers=processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(itk_threads,),
    )
    try:
        tasks = iter(
            (i, p, config, seed, spacing, np.dtype(dtype).str, warn_all_sizes)
            for i, p in enumerate(paths)
        )
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(_process_one, task))
            if len(pending) >= 2 * processes:
                break
        while pending:
            result = pending.popleft().result()
            task = next(tasks, None)
            if task is not None:
                pending.append(pool.submit(_process_one, task))
            yield result
            del result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def extract_fold(
    paths: Sequence[str],
    config: setup_config,
    rng: random.Random | None,
    dtype: DTypeLike = np.float32,
    workers: int = 2,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
    *,
    spacing: Sequence[float] | None = None,
    processes: int = 0,
    seed: int | None = None,
    warn_all_sizes: bool = False,
) -> FoldResult:
    """Sample the cubes of every volume in ``paths``, in that order.

    By default one generator, ``rng``, draws every window, volume after volume (the original's
    single stream). With ``processes >= 1`` each volume draws from its own stream,
    ``volume_generator(seed, index)``, in that many worker processes: the cubes then depend on
    the seed and the order of ``paths`` only, not on the number of processes.

    Args:
        paths: volume files or DICOM folders.
        config: the extraction settings.
        rng: the seeded generator, shared by all volumes in order (ignored with processes).
        dtype: dtype of the kept cubes (sampling is in float64; the cast happens per volume).
        workers: threads reading ahead (0: read in this thread); single-stream mode only.
        progress: show a tqdm progress bar over the volumes.
        warn: callable taking a message, for volumes skipped with a problem (default: stderr).
        spacing: resample each volume to this (x, y, z) spacing in mm first (None: native).
        processes: 0 for the single stream; N >= 1 for N worker processes, one stream per
            volume.
        seed: the seed of the per-volume streams (required with processes).
        warn_all_sizes: warn about every volume too small for the settings (default: only
            those too small in x or y, as before).

    Returns:
        A FoldResult with the cubes (one array per volume that gave any), where they were cut,
        and a report per volume.
    """
    if processes and seed is None:
        raise ValueError("Expected a seed for the per-volume streams. Received: seed=None")
    result = FoldResult()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="volume", file=sys.stderr, dynamic_ncols=True)
    if warn is None:
        warn = (
            (lambda m: bar.write(m, file=sys.stderr))
            if bar is not None
            else (lambda m: print(m, file=sys.stderr))
        )
    if processes:
        outcomes = _iter_processes(
            paths, config, int(seed), processes, spacing, dtype, warn_all_sizes
        )
    else:
        outcomes = (
            _cut_one(path, array, reason, config, rng, dtype, warn_all_sizes)
            for path, array, reason in iter_volumes(paths, workers, spacing)
        )
    try:
        for report, cubes, positions, warnings in outcomes:
            for message in warnings:
                warn(message)
            if cubes is not None:
                result.cubes.append(cubes)
                result.sources.append(report.path)
                result.positions.append(positions)
            result.volumes.append(report)
            del cubes
            if bar is not None:
                bar.update(1)
                bar.set_postfix(cubes=result.n_cubes)
    finally:
        close = getattr(outcomes, "close", None)
        if close is not None:
            close()
        if bar is not None:
            bar.close()
    return result


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


def _is_dicom_file(path: str) -> bool:
    """A file with the DICOM marker (``DICM`` at byte 128), or named ``*.dcm``."""
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _volumes_under(folder: str) -> list[str]:
    """Volumes in a folder and its sub-folders, sorted: volume files, and every folder that
    directly holds DICOM files (one series each)."""
    found = []
    seen = set()
    # Linked folders are followed (collections are often assembled from links), each once.
    for here, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        visible = sorted(f for f in files if not f.startswith("."))
        found += [os.path.join(here, f) for f in visible if f.lower().endswith(VOLUME_SUFFIXES)]
        others = [f for f in visible if not f.lower().endswith(VOLUME_SUFFIXES + (".raw",))]
        if any(_is_dicom_file(os.path.join(here, f)) for f in others[:20]):
            found.append(here)
    return sorted(found)


def expand_inputs(items: Sequence[str]) -> list[str]:
    """The volumes named by ``--input``: files, folders searched recursively, glob patterns.

    A folder gives its volume files (.mhd, .mha, .nii, .nii.gz, .nrrd) and every sub-folder
    holding DICOM files, at any depth; a pattern (``*``, ``?``, ``[``; ``**`` for any depth)
    gives what it matches, expanded the same way. Each item's volumes are sorted by path, items
    keep their order, and a volume named twice is read once.

    Args:
        items: the ``--input`` values.

    Returns:
        The volume paths, in extraction order.

    Raises:
        FileNotFoundError: an item names nothing that exists, or a pattern matches nothing.
        ValueError: a file is not a volume, or a folder holds no volume.
    """
    import glob

    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        if any(c in item for c in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(
                    f"Expected --input pattern {item!r} to match volume files or folders. "
                    "Received: no match"
                )
        elif os.path.exists(item):
            matches = [item]
        else:
            raise FileNotFoundError(
                f"Expected --input {item!r} to be a volume file, a folder or a glob pattern. "
                "Received: no such file or folder"
            )
        volumes: list[str] = []
        for match in matches:
            if os.path.isdir(match):
                volumes += _volumes_under(match)
            elif match.lower().endswith(VOLUME_SUFFIXES):
                volumes.append(match)
            elif not any(c in item for c in "*?["):
                raise ValueError(
                    f"Expected --input {item!r} to be a .mhd, .mha, .nii, .nii.gz or .nrrd "
                    "file, or a folder. Received: a file of another type"
                )
        if not volumes:
            raise ValueError(
                f"Expected --input {item!r} to hold .mhd, .mha, .nii, .nii.gz or .nrrd files or "
                "DICOM series folders. Received: none found"
            )
        for v in volumes:
            key = os.path.abspath(v)
            if key not in seen:
                seen.add(key)
                out.append(v)
    return out


def csv_path(npy_path: str) -> str:
    """The per-cube CSV beside a cube file: ``FILE.npy`` -> ``FILE.csv``."""
    root = npy_path[:-4] if npy_path.lower().endswith(".npy") else npy_path
    return root + ".csv"


def save_positions_csv(path: str, sources: Sequence[str], positions: Sequence[np.ndarray]) -> int:
    """Write the per-cube CSV (``source,x,y,z``, one row per cube, in order), atomically.

    Args:
        path: the ``.csv`` path.
        sources: the volume path of each block of cubes.
        positions: per block, the ``(n, 3)`` window starts in the volume as cut.

    Returns:
        The number of rows written.
    """
    with atomic_path(path) as tmp:
        return _write_positions(tmp, sources, positions)


def _write_positions(path: str, sources: Sequence[str], positions: Sequence[np.ndarray]) -> int:
    """save_positions_csv's rows, written in place to ``path``."""
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


def read_positions_csv(path: str) -> list[tuple[str, int, int, int]]:
    """Read a per-cube CSV written by ``save_positions_csv``: ``(source, x, y, z)`` rows."""
    import csv

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != ["source", "x", "y", "z"]:
            raise ValueError(
                f"Expected the columns source,x,y,z in {path}. Received: {reader.fieldnames}"
            )
        return [(r["source"], int(r["x"]), int(r["y"]), int(r["z"])) for r in reader]


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


def config_from_preset(preset: str = DEFAULT_PRESET, **overrides: object) -> setup_config:
    """A ``setup_config`` with a preset's constants, any of them overridden.

    Args:
        preset: a key of ``PRESETS``: "ct-chest" (the original's), "ct" or "mri".
        **overrides: setup_config arguments; None values are ignored (the preset's stand).

    Returns:
        The configuration.
    """
    if preset not in PRESETS:
        raise ValueError(f"Expected preset in {tuple(PRESETS)}. Received: preset={preset!r}")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return setup_config(**values)


def output_path(save: str, scale: int, rows: int, cols: int, deps: int, fold: int) -> str:
    """``{save}/bat_{scale}_s_{rows}x{cols}x{deps}_{fold}.npy`` (the name the trainer reads)."""
    return os.path.join(save, cube_file_name(scale, rows, cols, deps, fold))


# ----------------------------------------------------------------------------------------------
# Command line


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, with a clear message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"Expected {what}. Received: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"Expected {what}. Received: {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags: the original's, plus --seed, --workers and --dtype."""
    parser = argparse.ArgumentParser(
        prog="infinite_generator_3D.py",
        description="Cut Models Genesis training cubes out of the CT volumes of one LUNA16 fold "
        "({data}/subset{fold}/: .mhd, .mha, .nii, .nii.gz, .nrrd files and DICOM series folders), "
        "or out of any collection of CT or MRI volumes (--input ... --output FILE.npy).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--fold",
        type=int,
        default=None,
        choices=range(10),
        metavar="{0..9}",
        help="the LUNA16 fold: reads {data}/subset{fold}/ (required unless --input is given)",
    )
    parser.add_argument(
        "--scale", type=_positive_int, default=32, help="cubes per volume (default: 32)"
    )
    parser.add_argument(
        "--data",
        default="datasets/luna16",
        help="LUNA16 root folder holding subset0 .. subset9 (default: datasets/luna16)",
    )
    parser.add_argument(
        "--save",
        default="generated_cubes",
        help="output folder, created if missing (default: generated_cubes)",
    )
    parser.add_argument(
        "--input_rows", type=_positive_int, default=64, help="cube rows (default: 64)"
    )
    parser.add_argument(
        "--input_cols", type=_positive_int, default=64, help="cube columns (default: 64)"
    )
    parser.add_argument(
        "--input_deps", type=_positive_int, default=32, help="cube depth in slices (default: 32)"
    )
    parser.add_argument(
        "--crop_rows",
        type=_positive_int,
        default=64,
        help="rows cut from the volume, resized to input_rows when different (default: 64)",
    )
    parser.add_argument(
        "--crop_cols",
        type=_positive_int,
        default=64,
        help="columns cut from the volume, resized to input_cols when different (default: 64)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the one random.Random drawing every window (default: 1, as the original)",
    )
    parser.add_argument(
        "--workers",
        type=_non_negative_int,
        default=2,
        help="threads reading the next volumes while the current one is sampled; "
        "0 reads in the main thread. The output does not depend on it (default: 2)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="stored dtype; the original stored float64 (default: float32)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bar"
    )
    own = parser.add_argument_group(
        "your own data (docs/own_data.md)",
        "Flags left out take the preset's value; the default preset is the original's.",
    )
    own.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="volume files, folders (searched recursively: volume files and DICOM series "
        "folders) or glob patterns (quote them; ** for any depth); instead of --data/--fold",
    )
    own.add_argument(
        "--output",
        metavar="FILE.npy",
        help="the cube file to write with --input; the per-cube FILE.csv (source,x,y,z) is "
        "written beside it",
    )
    own.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=DEFAULT_PRESET,
        help="what the constants are: ct-chest (the original's: 100-voxel border, lung test), "
        "ct (HU window, body test, no border) or mri (clip [0, 4000], foreground test, no "
        f"border) (default: {DEFAULT_PRESET})",
    )
    own.add_argument(
        "--border_xy",
        type=_non_negative_int,
        help="voxels kept away from the x and y edges (ct-chest: 100; ct, mri: 0)",
    )
    own.add_argument(
        "--border_z",
        type=_non_negative_int,
        help="slices kept away from the z ends (ct-chest: 30; ct, mri: 0)",
    )
    own.add_argument(
        "--hu_min", type=float, help="window low end, clipped to and scaled to 0 (CT: -1000)"
    )
    own.add_argument(
        "--hu_max", type=float, help="window high end, clipped to and scaled to 1 (CT: 1000)"
    )
    own.add_argument(
        "--percentiles",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="take each volume's window from these percentiles of its voxels instead of "
        "--hu_min/--hu_max, e.g. 0.5 99.5 for MRI",
    )
    own.add_argument(
        "--test",
        choices=WINDOW_TESTS,
        help="how windows are kept: air (the original's lung test) or foreground "
        "(ct-chest: air; ct, mri: foreground)",
    )
    own.add_argument(
        "--air_hu",
        type=float,
        help="air test: voxels at or above this value count as tissue (ct-chest: -150)",
    )
    own.add_argument(
        "--lung_max",
        type=float,
        help="air test: reject a window whose tissue score exceeds this fraction (0.15)",
    )
    own.add_argument(
        "--foreground_threshold",
        type=float,
        help="foreground test: a voxel is foreground when its value scaled to [0, 1] is at "
        "least this (ct: 0.25, which is -500 HU; mri: 0.02)",
    )
    own.add_argument(
        "--foreground_fraction",
        type=float,
        help="foreground test: keep a cube with at least this fraction of foreground voxels (0.5)",
    )
    own.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="resample every volume to this voxel size in mm (SimpleITK, linear) before "
        "cutting (default: native spacing, as the original)",
    )
    own.add_argument(
        "--processes",
        type=_non_negative_int,
        default=0,
        help="cut volumes in N worker processes, each volume from its own random stream "
        "(SeedSequence(seed) child i for volume i), so the cubes do not depend on N. "
        "0 keeps the original's single stream (default: 0)",
    )
    own.add_argument(
        "--preview",
        metavar="FILE.png",
        help="also write a PNG of the first 4 cubes of each source (mid slices)",
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot check alone (exits with status 2 on an error)."""
    if args.input is None:
        if args.fold is None:
            parser.error(
                "the following arguments are required: --fold "
                "(or --input PATH ... --output FILE.npy)"
            )
        if args.output is not None:
            parser.error(
                "Expected --output only with --input (a fold is written to --save). "
                f"Received: --output={args.output!r} with --fold {args.fold}"
            )
    else:
        if args.fold is not None:
            parser.error(
                "Expected either --fold (with --data) or --input, not both. "
                f"Received: --fold {args.fold} and --input {' '.join(args.input)}"
            )
        if args.output is None or not args.output.lower().endswith(".npy"):
            parser.error(
                f"Expected --output FILE.npy with --input. Received: --output={args.output!r}"
            )
    if args.preview is not None and not args.preview.lower().endswith(".png"):
        parser.error(f"Expected --preview FILE.png. Received: --preview={args.preview!r}")
    if args.spacing is not None and not all(v > 0 for v in args.spacing):
        parser.error(f"Expected --spacing X Y Z, each > 0 mm. Received: {args.spacing}")
    for name in ("foreground_threshold", "foreground_fraction", "lung_max"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            parser.error(f"Expected --{name} in [0, 1]. Received: {value}")
    try:
        args.config = _config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))


def _config_from_args(args: argparse.Namespace) -> setup_config:
    """The extraction settings: the preset's, with the flags given."""
    return config_from_preset(
        args.preset,
        input_rows=args.input_rows,
        input_cols=args.input_cols,
        input_deps=args.input_deps,
        crop_rows=args.crop_rows,
        crop_cols=args.crop_cols,
        scale=args.scale,
        DATA_DIR=args.data if args.input is None else None,
        len_border=args.border_xy,
        len_border_z=args.border_z,
        hu_min=args.hu_min,
        hu_max=args.hu_max,
        percentiles=args.percentiles,
        test=args.test,
        air_hu=args.air_hu,
        lung_max=args.lung_max,
        foreground_threshold=args.foreground_threshold,
        foreground_fraction=args.foreground_fraction,
    )


def _sigterm_to_exit() -> Callable[[], None]:
    """Make SIGTERM (``kill``, a scheduler's time limit) raise SystemExit(143) in the main thread.

    The exception unwinds like Ctrl-C does, so a half-written temporary file is removed. Returns
    a function restoring the previous handler (a no-op outside the main thread).
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the extraction for one fold.

    Args:
        argv: the command-line arguments (None: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 when the cube file was written, 1 when nothing usable was found,
        130 after Ctrl-C (bad flags exit with 2 from argparse; SIGTERM with 143).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    restore_sigterm = _sigterm_to_exit()
    try:
        return _run(args)
    finally:
        restore_sigterm()


def _output_folder_problem(folder: str, flag: str, value: str) -> str | None:
    """Why ``folder`` cannot take the output (a file in the way, not writable), or None."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):  # the part of the path that exists must be a folder
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return (
            f"Expected {flag} to be a folder. Received: {flag}={value!r} ({existing!r} is a file)"
        )
    if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
        return f"Expected a writable {flag} folder. Received: {flag}={value!r} (not writable)"
    return None


def _run(args: argparse.Namespace) -> int:
    """The body of main, once the flags are parsed."""
    start = time.perf_counter()

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 1

    own_data = args.input is not None
    if own_data:
        try:
            paths = expand_inputs(args.input)
        except (OSError, ValueError) as exc:
            return fail(str(exc))
        target = args.output
        folder = os.path.dirname(os.path.abspath(target))
        problem = _output_folder_problem(folder, "--output's folder", folder)
        if problem:
            return fail(problem)
        if os.path.isdir(target):
            return fail(f"Expected --output to be a file name. Received: {target!r} is a folder")
        label, where = "input", "--input"
    else:
        if not os.path.isdir(args.data):
            return fail(
                f"Expected --data to be a LUNA16 root folder holding subset0 .. subset9. "
                f"Received: --data={args.data!r} (no such folder)"
            )
        fold_dir = os.path.join(args.data, f"subset{args.fold}")
        if not os.path.isdir(fold_dir):
            return fail(
                f"Expected a fold folder {fold_dir!r} (--data {args.data!r}, --fold {args.fold}). "
                f"Received: no such folder"
            )
        problem = _output_folder_problem(args.save, "--save", args.save)
        if problem:
            return fail(problem)
        paths = list_volumes(fold_dir)
        if not paths:
            return fail(
                f"no volume in {fold_dir!r}: expected .mhd, .mha, .nii, .nii.gz or .nrrd files "
                f"or DICOM series folders"
            )
        folder = args.save
        target = output_path(
            args.save, args.scale, args.input_rows, args.input_cols, args.input_deps, args.fold
        )
        label, where = f"fold {args.fold}", repr(fold_dir)

    config = args.config
    # The single stream is the original's; --processes gives each volume its own stream.
    rng = None if args.processes else random.Random(args.seed)
    dtype = np.dtype(args.dtype)
    written = []
    try:
        result = extract_fold(
            paths,
            config,
            rng,
            dtype=dtype,
            workers=args.workers,
            progress=args.progress,
            spacing=args.spacing,
            processes=args.processes,
            seed=args.seed,
            warn_all_sizes=own_data,
        )
        shape = None
        if result.n_cubes:
            os.makedirs(folder, exist_ok=True)
            if own_data:
                # The CSV is renamed into place right after the cubes, so the two match.
                with atomic_path(csv_path(target)) as tmp_csv:
                    rows = _write_positions(tmp_csv, result.sources, result.positions)
                    shape = save_cubes_atomically(result.cubes, target, dtype)
                written.append(f"saved {csv_path(target)}: {rows} rows (source,x,y,z)")
            else:
                shape = save_cubes_atomically(result.cubes, target, dtype)
            if args.preview:
                size = write_preview(args.preview, result.sources, result.cubes)
                written.append(f"saved {args.preview}: {size[0]}x{size[1]} preview")
    except KeyboardInterrupt:
        print("\ninterrupted: no cube file written", file=sys.stderr)
        return 130
    except OSError as exc:
        if own_data:
            return fail(f"cannot write --output={target!r}: {exc}")
        return fail(f"cannot write the cube file in --save={args.save!r}: {exc}")

    used = [v for v in result.volumes if v.cubes > 0]
    empty = [v for v in result.volumes if v.cubes == 0]
    partial = [v for v in used if v.reason]
    seconds = time.perf_counter() - start
    print(
        f"{label}: {len(paths)} volumes, {len(used)} used, {len(empty)} gave no cube; "
        f"{result.n_cubes} cubes written; {seconds:.1f} s"
    )
    if own_data:  # a collection is new to the user: every source's count, and why if short
        for v in result.volumes:
            why = f" ({v.reason})" if v.reason else ""
            print(f"  {v.cubes:4d} cubes from {v.path}{why}")
    else:
        for v in empty:
            print(f"  no cube from {v.path}: {v.reason}")
        for v in partial:
            print(f"  fewer cubes from {v.path}: {v.reason}")
    if shape is None:
        return fail(f"no cube extracted from the {len(paths)} volumes of {where}; nothing written")
    print(f"saved {target}: {dtype.name} {shape}")
    for line in written:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
