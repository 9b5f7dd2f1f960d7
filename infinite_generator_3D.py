#!/usr/bin/env python
"""Cut Models Genesis training cubes out of CT volumes (docs/extraction.md).

For one LUNA16 fold (``{data}/subset{fold}/``) this reads every CT volume in sorted order,
draws up to ``--scale`` random 64x64x32 windows from each with Python's ``random`` (seeded once
with ``--seed``), keeps those that pass the original's air test (lung windows: little tissue),
and saves all cubes of the fold, stacked to ``(N, rows, cols, deps)`` with values in [0, 1], as
``{save}/bat_{scale}_s_{rows}x{cols}x{deps}_{fold}.npy``.

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
    from numpy.typing import DTypeLike

# File suffixes read as one volume each; folders are read as DICOM series. ".raw" (the data of a
# ".mhd") and anything else is ignored.
VOLUME_SUFFIXES = (".mhd", ".mha", ".nii", ".nii.gz", ".nrrd")

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
        # Computed exactly as the original does, so the float matches bit for bit.
        self.HU_thred = (-150.0 - self.hu_min) / (self.hu_max - self.hu_min)

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


def infinite_generator_from_one_volume(
    config: setup_config, img_array: np.ndarray, rng: random.Random | None = None
) -> np.ndarray | None:
    """Draw up to ``config.scale`` cubes from one CT volume, exactly as the original
    (docs/extraction.md).

    Args:
        config: the extraction settings (see ``setup_config``).
        img_array: raw HU values in (x, y, z) order (a transposed view is fine).
        rng: the generator to draw from; None uses the global ``random`` module. Its state
            afterwards is what the original algorithm leaves.

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
    hu_min, hu_max = float(config.hu_min), float(config.hu_max)
    # Reject when score_sum > limit; score_sum = count / (depth - 1) with an integer count, so
    # compare the count with floor(limit * (depth - 1)) computed exactly from the float limit.
    max_count = math.floor(Fraction(air_test_limit(config)) * (depth - 1))
    need_resize = (crop_rows, crop_cols) != (rows, cols)
    if need_resize:
        from skimage.transform import resize  # only here: a slow import most runs never need
    # Integer volumes (CT) run the air test on the raw window with the equivalent raw threshold
    # and normalise only the windows they keep; others normalise every window first.
    raw_test = not need_resize and np.issubdtype(img_array.dtype, np.integer)
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
            if tissue_score_sum(window, config.HU_thred, deps, depth) * (depth - 1) > max_count:
                continue
            cubes[kept] = window[:, :, :deps]
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


def read_volume(path: str) -> np.ndarray:
    """Read one CT volume (a file, or a folder holding one DICOM series) as raw values in
    (x, y, z) order.

    Args:
        path: a .mhd/.mha/.nii/.nii.gz/.nrrd file or a DICOM series folder.

    Returns:
        The voxel array, a transposed view of SimpleITK's (z, y, x) array.

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
    return array.transpose(2, 1, 0)


def _read_or_reason(path: str) -> tuple[np.ndarray | None, str | None]:
    try:
        return read_volume(path), None
    except VolumeError as exc:
        return None, str(exc)
    except (OSError, MemoryError, ValueError) as exc:
        return None, f"cannot read: {exc}"


def iter_volumes(
    paths: Sequence[str], workers: int
) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """Yield ``(path, array or None, reason or None)`` for each path, in order.

    With ``workers > 0``, that many threads read the next volumes while the caller samples the
    current one (SimpleITK releases the GIL while reading); the order never changes.

    Args:
        paths: volume files or DICOM folders, in the order wanted.
        workers: reading threads (0: read in the caller's thread).

    Returns:
        An iterator over ``(path, array in (x, y, z) order or None, reason or None)``.
    """
    if workers <= 0:
        for path in paths:
            yield (path, *_read_or_reason(path))
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read-volume")
    try:
        todo = iter(paths)
        pending: deque = deque()
        for path in todo:
            pending.append((path, pool.submit(_read_or_reason, path)))
            if len(pending) >= workers:
                break
        while pending:
            path, future = pending.popleft()
            result = future.result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_read_or_reason, nxt)))
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
    """The cubes of one fold and a report per volume."""

    cubes: list[np.ndarray] = field(default_factory=list)
    volumes: list[VolumeReport] = field(default_factory=list)

    @property
    def n_cubes(self) -> int:
        return sum(len(c) for c in self.cubes)


def extract_fold(
    paths: Sequence[str],
    config: setup_config,
    rng: random.Random,
    dtype: DTypeLike = np.float32,
    workers: int = 2,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
) -> FoldResult:
    """Sample the cubes of every volume in ``paths``, in that order, from one generator.

    Args:
        paths: volume files or DICOM folders.
        config: the extraction settings.
        rng: the seeded generator, shared by all volumes in order.
        dtype: dtype of the kept cubes (sampling is in float64; the cast happens per volume).
        workers: threads reading ahead (0: read in this thread).
        progress: show a tqdm progress bar over the volumes.
        warn: callable taking a message, for volumes skipped with a problem (default: stderr).

    Returns:
        A FoldResult with the cubes (one array per volume that gave any) and a report per volume.
    """
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
    try:
        for path, array, reason in iter_volumes(paths, workers):
            if array is None:
                warn(f"warning: skipping {path}: {reason}")
                result.volumes.append(VolumeReport(path, 0, reason))
            else:
                reason = size_problem(config, array.shape)
                if reason is not None and reason.startswith("too small"):
                    warn(f"warning: skipping {path}: {reason}")
                cubes = None if reason else infinite_generator_from_one_volume(config, array, rng)
                del array
                if reason is None and cubes is None:
                    reason = (
                        f"gave no cube: all {50 * config.scale} windows failed the air test "
                        "(too little lung)"
                    )
                elif cubes is not None and len(cubes) < config.scale:
                    reason = (
                        f"gave {len(cubes)} of {config.scale} cubes: "
                        f"{50 * config.scale} windows tried"
                    )
                if cubes is not None:
                    result.cubes.append(cubes.astype(dtype, copy=False))
                result.volumes.append(
                    VolumeReport(path, 0 if cubes is None else len(cubes), reason)
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(cubes=result.n_cubes)
    finally:
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
        "({data}/subset{fold}/: .mhd, .mha, .nii, .nii.gz, .nrrd files and DICOM series folders).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--fold",
        type=int,
        required=True,
        choices=range(10),
        metavar="{0..9}",
        help="the LUNA16 fold: reads {data}/subset{fold}/ (required)",
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
    return parser


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
    args = build_parser().parse_args(argv)
    restore_sigterm = _sigterm_to_exit()
    try:
        return _run(args)
    finally:
        restore_sigterm()


def _run(args: argparse.Namespace) -> int:
    """The body of main, once the flags are parsed."""
    start = time.perf_counter()

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 1

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
    existing = os.path.abspath(args.save)
    while not os.path.exists(existing):  # the part of --save that exists must be a folder
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return fail(
            "Expected --save to be a folder. "
            f"Received: --save={args.save!r} ({existing!r} is a file)"
        )
    if os.path.isdir(args.save) and not os.access(args.save, os.W_OK | os.X_OK):
        return fail(
            f"Expected a writable --save folder. Received: --save={args.save!r} (not writable)"
        )
    paths = list_volumes(fold_dir)
    if not paths:
        return fail(
            f"no volume in {fold_dir!r}: expected .mhd, .mha, .nii, .nii.gz or .nrrd files "
            f"or DICOM series folders"
        )

    config = setup_config(
        input_rows=args.input_rows,
        input_cols=args.input_cols,
        input_deps=args.input_deps,
        crop_rows=args.crop_rows,
        crop_cols=args.crop_cols,
        scale=args.scale,
        DATA_DIR=args.data,
    )
    rng = random.Random(args.seed)
    dtype = np.dtype(args.dtype)
    try:
        result = extract_fold(
            paths, config, rng, dtype=dtype, workers=args.workers, progress=args.progress
        )
        target = output_path(
            args.save, args.scale, args.input_rows, args.input_cols, args.input_deps, args.fold
        )
        shape = None
        if result.n_cubes:
            os.makedirs(args.save, exist_ok=True)
            shape = save_cubes_atomically(result.cubes, target, dtype)
    except KeyboardInterrupt:
        print("\ninterrupted: no cube file written", file=sys.stderr)
        return 130
    except OSError as exc:
        return fail(f"cannot write the cube file in --save={args.save!r}: {exc}")

    used = [v for v in result.volumes if v.cubes > 0]
    empty = [v for v in result.volumes if v.cubes == 0]
    partial = [v for v in used if v.reason]
    seconds = time.perf_counter() - start
    print(
        f"fold {args.fold}: {len(paths)} volumes, {len(used)} used, {len(empty)} gave no cube; "
        f"{result.n_cubes} cubes written; {seconds:.1f} s"
    )
    for v in empty:
        print(f"  no cube from {v.path}: {v.reason}")
    for v in partial:
        print(f"  fewer cubes from {v.path}: {v.reason}")
    if shape is None:
        return fail(
            f"no cube extracted from the {len(paths)} volumes of {fold_dir!r}; nothing written"
        )
    print(f"saved {target}: {dtype.name} {shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
