"""Volume input and output for fine-tuning: reading, geometry, intensities, resampling, writing.

Standard library, NumPy, SimpleITK and `genesis_files` only (no Keras), so data preparation and
the checks on it run without a deep-learning stack.

Arrays are in (x, y, z) index order, i.e. (rows, cols, deps): the transpose of
``sitk.GetArrayFromImage`` (which is z, y, x). A patch ``R C D`` runs along x, y and z.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from genesis_files import atomic_path

__all__ = [
    "INTENSITY_MODES",
    "Geometry",
    "array_to_image",
    "image_to_array",
    "intensity_mode_for",
    "normalise_intensity",
    "read_geometry",
    "read_image",
    "resample_image",
    "resample_like",
    "write_image",
]

# How a channel's intensities are brought to [0, 1]: CT in Hounsfield units, MRI, per-volume
# min-max, or unchanged.
INTENSITY_MODES = ("ct", "mri", "minmax", "none")

# The windows the pre-trained weights saw: CT [-1000, 1000] HU, MRI [0, 4000].
CT_WINDOW = (-1000.0, 1000.0)
MRI_WINDOW = (0.0, 4000.0)

# Channel names (dataset.json's channel_names) taken as MRI, compared case-insensitively.
_MRI_NAMES = frozenset(
    {
        "mri",
        "mr",
        "t1",
        "t2",
        "t1w",
        "t2w",
        "t1c",
        "t1ce",
        "t1gd",
        "flair",
        "adc",
        "dwi",
        "pd",
        "pdw",
        "swi",
    }
)


@dataclass(frozen=True)
class Geometry:
    """The grid of a volume: size (voxels), spacing (mm), origin (mm) and direction (9 floats).

    All in SimpleITK's (x, y, z) order, the order of the arrays this module returns.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        """The geometry of a 3D SimpleITK image.

        Args:
            image: a 3D image.

        Returns:
            Its Geometry.
        """
        if image.GetDimension() != 3:
            raise ValueError(
                f"Expected a 3D image. Received: an image of dimension {image.GetDimension()}"
            )
        return cls(
            size=tuple(int(v) for v in image.GetSize()),
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    def differences(self, other: Geometry, tol: float = 1e-4) -> list[str]:
        """The fields that differ from `other`, each with both values.

        Sizes must be equal; spacing, origin and direction may differ by `tol` (relative to
        the value for spacing and origin, absolute for the direction cosines), since files
        written by different tools round them differently.

        Args:
            other: the geometry to compare with.
            tol: the tolerance.

        Returns:
            E.g. ``["spacing (1.0, 1.0, 3.0) vs (1.0, 1.0, 2.5)"]``; empty when they agree.
        """
        found = []
        if tuple(self.size) != tuple(other.size):
            found.append(f"size {tuple(self.size)} vs {tuple(other.size)}")
        for name in ("spacing", "origin", "direction"):
            a = np.asarray(getattr(self, name), dtype=np.float64)
            b = np.asarray(getattr(other, name), dtype=np.float64)
            if a.shape != b.shape:
                found.append(f"{name} {_fmt(a)} vs {_fmt(b)}")
                continue
            scale = 1.0 if name == "direction" else np.maximum(1.0, np.abs(a))
            if np.any(np.abs(a - b) > tol * scale):
                found.append(f"{name} {_fmt(a)} vs {_fmt(b)}")
        return found

    def to_json(self) -> dict[str, list]:
        """A JSON-ready dict of the four fields (lists)."""
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Geometry:
        """The Geometry written by `to_json`.

        Args:
            d: a dict with size, spacing, origin and direction.

        Returns:
            The Geometry.
        """
        missing = [k for k in ("size", "spacing", "origin", "direction") if k not in d]
        if missing:
            raise ValueError(
                "Expected a geometry with size, spacing, origin and direction. "
                f"Received: keys={sorted(d)} (missing {missing})"
            )
        return cls(
            size=tuple(int(v) for v in d["size"]),
            spacing=tuple(float(v) for v in d["spacing"]),
            origin=tuple(float(v) for v in d["origin"]),
            direction=tuple(float(v) for v in d["direction"]),
        )


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D image in any format SimpleITK reads (a DICOM folder as well as single files).

    Args:
        path: the file, or a folder holding one DICOM series.

    Returns:
        The image.

    Raises:
        FileNotFoundError: when `path` does not exist.
        ValueError: when SimpleITK cannot read it, or it is not 3D (both name the file).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Expected an image file. Received: {path!r}, which does not exist")
    try:
        if os.path.isdir(path):
            reader = sitk.ImageSeriesReader()
            names = reader.GetGDCMSeriesFileNames(path)
            if not names:
                raise RuntimeError("no DICOM series in the folder")
            reader.SetFileNames(names)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(path)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"Expected an image SimpleITK can read. Received: {path!r} ({first})"
        ) from None
    if image.GetDimension() != 3:
        raise ValueError(
            f"Expected a 3D image. Received: {path!r} of dimension {image.GetDimension()}"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            "Expected a single-component (scalar) image, one file per channel. Received: "
            f"{path!r} with {image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    return image


def read_geometry(path: str | os.PathLike) -> Geometry:
    """The geometry of an image file from its header alone (no voxels are read).

    Args:
        path: an image file (a DICOM folder is read whole).

    Returns:
        Its Geometry.
    """
    path = os.fspath(path)
    if os.path.isdir(path) or not os.path.exists(path):
        return Geometry.of(read_image(path))
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"Expected an image SimpleITK can read. Received: {path!r} ({first})"
        ) from None
    if reader.GetDimension() != 3:
        raise ValueError(
            f"Expected a 3D image. Received: {path!r} of dimension {reader.GetDimension()}"
        )
    return Geometry(
        size=tuple(int(v) for v in reader.GetSize()),
        spacing=tuple(float(v) for v in reader.GetSpacing()),
        origin=tuple(float(v) for v in reader.GetOrigin()),
        direction=tuple(float(v) for v in reader.GetDirection()),
    )


def image_to_array(image: sitk.Image) -> np.ndarray:
    """The voxels of `image` as an array in (x, y, z) order, in the image's pixel type.

    Args:
        image: a 3D image.

    Returns:
        An array of shape ``image.GetSize()``.
    """
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def array_to_image(array_xyz: np.ndarray, geometry: Geometry) -> sitk.Image:
    """An image of `array_xyz` (x, y, z order) on the grid `geometry`.

    Args:
        array_xyz: a 3D array whose shape is ``geometry.size``.
        geometry: spacing, origin and direction to give it.

    Returns:
        The image.
    """
    array_xyz = np.asarray(array_xyz)
    if array_xyz.ndim != 3 or tuple(array_xyz.shape) != tuple(geometry.size):
        raise ValueError(
            f"Expected an array of shape {tuple(geometry.size)} (x, y, z). "
            f"Received: shape={tuple(array_xyz.shape)}"
        )
    if array_xyz.dtype == np.bool_:
        array_xyz = array_xyz.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(v) for v in geometry.spacing))
    image.SetOrigin(tuple(float(v) for v in geometry.origin))
    image.SetDirection(tuple(float(v) for v in geometry.direction))
    return image


def write_image(array_xyz: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> None:
    """Write `array_xyz` on the grid `geometry` to `path`, atomically; ``.nii.gz`` is compressed.

    The file appears under its final name only when complete (a temporary name ending in the
    same extension, then a rename), so an interrupted write leaves nothing behind.

    Args:
        array_xyz: a 3D array in (x, y, z) order of shape ``geometry.size``.
        geometry: the grid.
        path: the output file; its extension chooses the format.
    """
    path = os.fspath(path)
    if path.lower().endswith((".mhd", ".hdr")):
        # A header with a separate data file names that file inside it, so the pair cannot be
        # renamed into place as one file.
        raise ValueError(
            f"Expected a single-file image format (.nii.gz, .nii, .mha, .nrrd). Received: {path!r}"
        )
    image = array_to_image(array_xyz, geometry)
    compress = path.lower().endswith((".gz", ".nrrd", ".mha"))
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, tmp, compress)


def intensity_mode_for(channel_name: str) -> str:
    """The intensity mode for a channel name from dataset.json's ``channel_names``.

    Args:
        channel_name: e.g. "CT", "T2", "FLAIR" (case-insensitive).

    Returns:
        "ct" for CT; "mri" for MRI-like names (MRI, T1, T2, FLAIR, ADC, DWI, T1w, T2w, ..);
        "minmax" for anything else.
    """
    name = str(channel_name).strip().lower()
    if name == "ct":
        return "ct"
    if name in _MRI_NAMES:
        return "mri"
    return "minmax"


def normalise_intensity(array: np.ndarray, mode: str) -> np.ndarray:
    """Bring a volume's intensities to [0, 1] as the pre-trained weights expect.

    Args:
        array: the volume.
        mode: "ct" clips to [-1000, 1000] HU and scales to [0, 1]; "mri" clips to [0, 4000]
            and scales to [0, 1]; "minmax" scales the volume's own min..max to [0, 1] (a
            constant volume gives zeros); "none" only casts.

    Returns:
        A float32 array of the same shape.
    """
    if mode not in INTENSITY_MODES:
        raise ValueError(
            f"Expected an intensity mode in {INTENSITY_MODES}. Received: mode={mode!r}"
        )
    x = np.asarray(array, dtype=np.float32)
    if mode == "none":
        return x.copy() if x is array else x
    if mode in ("ct", "mri"):
        lo, hi = CT_WINDOW if mode == "ct" else MRI_WINDOW
        out = np.clip(x, lo, hi)
        out -= np.float32(lo)
        out *= np.float32(1.0 / (hi - lo))
        return out
    lo = float(np.min(x)) if x.size else 0.0
    hi = float(np.max(x)) if x.size else 0.0
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    out = x - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return out


def _check_spacing(spacing_xyz) -> tuple[float, float, float]:
    try:
        spacing = tuple(float(v) for v in spacing_xyz)
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) != 3 or not all(np.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(
            f"Expected a spacing of three positive numbers (x, y, z) in mm. "
            f"Received: spacing={spacing_xyz!r}"
        )
    return spacing


def resample_image(image: sitk.Image, spacing_xyz, is_label: bool) -> sitk.Image:
    """Resample `image` to the voxel spacing `spacing_xyz`, keeping its origin and direction.

    The new size is ``round(old_size * old_spacing / new_spacing)`` per axis (at least 1).

    Args:
        image: a 3D image.
        spacing_xyz: the target spacing (x, y, z) in mm.
        is_label: nearest-neighbour interpolation (labels) instead of linear (images).

    Returns:
        The resampled image, in the input's pixel type.
    """
    spacing = _check_spacing(spacing_xyz)
    old_size = image.GetSize()
    old_spacing = image.GetSpacing()
    size = [
        max(1, int(round(n * s / t)))
        for n, s, t in zip(old_size, old_spacing, spacing, strict=True)
    ]
    geometry = Geometry(
        size=tuple(size),
        spacing=spacing,
        origin=tuple(image.GetOrigin()),
        direction=tuple(image.GetDirection()),
    )
    return resample_like(image, geometry, is_label)


def resample_like(image: sitk.Image, geometry: Geometry, is_label: bool) -> sitk.Image:
    """Resample `image` onto the grid `geometry` (e.g. back onto an input's own grid).

    Args:
        image: a 3D image.
        geometry: the target grid.
        is_label: nearest-neighbour interpolation (labels) instead of linear.

    Returns:
        The image on the target grid, in the input's pixel type; points outside the input are 0.
    """
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(v) for v in geometry.size])
    resampler.SetOutputSpacing([float(v) for v in geometry.spacing])
    resampler.SetOutputOrigin([float(v) for v in geometry.origin])
    resampler.SetOutputDirection([float(v) for v in geometry.direction])
    resampler.SetTransform(sitk.Transform())
    resampler.SetDefaultPixelValue(0)
    resampler.SetOutputPixelType(image.GetPixelID())
    resampler.SetInterpolator(sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear)
    return resampler.Execute(image)
