"""Volumes in and out: reading with checks, geometry, resampling, intensities, writing.

The one place every command reads volumes through: extraction (``infinite_generator_3D.py``,
LUNA16 folds and ``--input``) and fine-tuning (``train``, ``predict``, ``evaluate``). A volume
that cannot be used raises `VolumeError`, whose message names the file and what is wrong:

- unreadable files, and truncated ones: NIfTI (``.nii``, ``.nii.gz``) shorter than its header
  says, which ITK would fill with zeros; MetaImage data (``.raw``, ``.mha``) short or missing;
- NaN or infinite voxels, also in float NIfTI files, which ITK would read as 0;
- DICOM series with a damaged file (which GDCM would leave out), a missing slice (a gap twice
  the others) or a duplicated one (two files at one position), or fewer than two slices;
- images that are not 3-D, or that hold several values (components) per voxel.

Arrays are in (x, y, z) index order, i.e. (rows, cols, deps): the transpose of
``sitk.GetArrayFromImage`` (which is z, y, x). A patch ``R C D`` runs along x, y and z.

Imports: the standard library, NumPy, ``genesis_files`` and SimpleITK, which is imported only
when a volume is first read or written: importing this module loads NumPy alone, so the
extraction command starts fast. Never Keras.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from genesis_files import atomic_path

if TYPE_CHECKING:  # annotations only: SimpleITK is imported when a volume is read
    import SimpleITK as sitk
    from numpy.typing import DTypeLike

__all__ = [
    "CT_WINDOW",
    "INTENSITY_MODES",
    "INTENSITY_WINDOWS",
    "MRI_WINDOW",
    "VOLUME_SUFFIXES",
    "Geometry",
    "VolumeError",
    "array_to_image",
    "background_value",
    "image_to_array",
    "intensity_mode_for",
    "normalise_intensity",
    "normalise_window",
    "read_geometry",
    "read_image",
    "read_volume",
    "resample_image",
    "write_image",
]

# File suffixes read as one volume each (any case); a folder is read as a DICOM series.
VOLUME_SUFFIXES = (".mhd", ".mha", ".nii", ".nii.gz", ".nrrd")

# The intensity windows the pre-trained weights saw, clipped to and scaled to [0, 1]: CT in
# Hounsfield units (the original's), MRI as the published weights' README gives it. Extraction's
# presets and fine-tuning's intensity modes both take them from here.
INTENSITY_WINDOWS: dict[str, tuple[float, float]] = {
    "ct": (-1000.0, 1000.0),
    "mri": (0.0, 4000.0),
}
CT_WINDOW = INTENSITY_WINDOWS["ct"]
MRI_WINDOW = INTENSITY_WINDOWS["mri"]

# How a channel's intensities are normalised. To [0, 1], as the pre-trained weights expect: CT in
# Hounsfield units, MRI, per-volume min-max, or unchanged ("none"). Standardised, for training
# from scratch: "ct_foreground" (clipped to the data set's foreground percentiles, then z-scored
# with the foreground's mean and std) and "zscore" (each volume by its own mean and std).
INTENSITY_MODES = ("ct", "mri", "minmax", "none", "ct_foreground", "zscore")

# Channel names (dataset.json's channel_names) taken as MRI, compared case-insensitively.
_MRI_NAMES = frozenset(
    {"mri", "mr", "t1", "t2", "t1w", "t2w", "t1c", "t1ce", "t1gd", "flair", "adc", "dwi"}
    | {"pd", "pdw", "swi"}
)


class VolumeError(ValueError):
    """A volume that cannot be used: unreadable, truncated, NaN voxels, a broken DICOM series,
    not 3-D, several components.

    Args:
        problem: what is wrong, e.g. "truncated: the header needs 24352 bytes ...".
        path: the file or DICOM folder, or None when not known where the check runs.

    The message is ``"{path}: {problem}"`` (the problem alone without a path); both parts are
    kept as attributes, so a caller that names the file itself can use ``problem``.
    """

    def __init__(self, problem: str, path: str | os.PathLike | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")


# ----------------------------------------------------------------------------------------------
# Checks on the files' own bytes (what ITK would read without complaint)


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


def _nifti_nonfinite(path: str) -> int | None:
    """The number of NaN or infinite voxels of a floating-point NIfTI file, from its own bytes;
    None for other files (integer NIfTI cannot hold them).

    ITK reads such voxels as 0 without a word, so the bytes are scanned, in chunks.
    """
    import gzip

    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        layout = _nifti_layout(f.read(540))
        if layout is None or layout[1] not in _NIFTI_FLOAT_TYPES:
            return None
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
    return bad


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
            raise VolumeError(f"cannot read: not a valid gzip file ({exc})", path) from None
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
            f"truncated: the header needs {expected} bytes of image data, the file holds {actual}",
            path,
        )


# Bytes per voxel of MetaImage's element types.
_MET_SIZES = {
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
                if line.startswith("ElementDataFile"):  # the last field; binary data may follow
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
            data_path = os.path.join(os.path.dirname(path), data_name)
            offset, where = 0, f"data file {data_name}"
            if not os.path.exists(data_path):
                return f"{where} not found"
        actual = os.path.getsize(data_path) - offset
        if fields.get("CompressedData", "False").lower() == "true":
            expected = int(fields.get("CompressedDataSize", 0) or 0)  # 0: unknown, not checked
        else:
            if fields.get("ElementType") not in _MET_SIZES:
                return ""
            channels = int(fields.get("ElementNumberOfChannels", 1))
            voxels = math.prod(int(s) for s in fields["DimSize"].split())
            expected = voxels * _MET_SIZES[fields["ElementType"]] * channels
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


# ----------------------------------------------------------------------------------------------
# DICOM series


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
                f"(left out of the series, the volume would miss a slice)",
                folder,
            ) from None


def _dicom_positions(files: Sequence[str]) -> list[float] | None:
    """Each slice's position along the slice normal (mm), from its header; None when a file lacks
    the position or orientation tags (the order is then GDCM's, which cannot be checked)."""
    import SimpleITK as sitk

    positions = []
    normal = None
    for path in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.LoadPrivateTagsOff()
        try:
            reader.ReadImageInformation()
            position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
            if normal is None:
                cosines = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
                normal = np.cross(cosines[:3], cosines[3:6])
        except (RuntimeError, ValueError, IndexError):
            return None  # a tag missing or malformed (an unreadable file fails the read itself)
        if len(position) != 3:
            return None
        positions.append(float(np.dot(position, normal)))
    return positions


def _check_dicom_slices(folder: str, files: Sequence[str]) -> None:
    """Raise VolumeError when the series misses a slice or holds one twice.

    ITK stacks whatever files the series has and takes the slice spacing from their average,
    with only a warning: a deleted file gives a volume one slice short with the wrong spacing,
    and a copied file one slice too many. Slices are ordered by their position along the slice
    normal; the usual gap is the median one. A gap over 1.5 times it is a missing slice (a
    series with truly uneven slices is refused too: ITK would give it one spacing, wrongly); a
    gap under 5% of it, two files at one position.
    """
    if len(files) < 3:
        return  # two slices define the spacing: nothing to compare it with
    positions = _dicom_positions(files)
    if positions is None:
        return
    order = np.argsort(positions, kind="stable")
    where = np.asarray(positions)[order]
    names = [os.path.basename(files[i]) for i in order]
    gaps = np.diff(where)
    step = float(np.median(gaps))
    for i, gap in enumerate(gaps.tolist()):
        if gap <= max(1e-3, 0.05 * step):
            raise VolumeError(
                f"duplicated slice: DICOM files {names[i]} and {names[i + 1]} are at the same "
                f"position ({where[i]:g} mm along the slice normal)",
                folder,
            )
        if gap > 1.5 * step:
            missing = max(1, int(round(gap / step)) - 1)
            raise VolumeError(
                f"missing slice: DICOM files {names[i]} and {names[i + 1]} are {gap:g} mm apart, "
                f"the other slices {step:g} mm (about {missing} slice(s) missing)",
                folder,
            )


def _read_dicom_series(folder: str) -> sitk.Image:
    """The first DICOM series (in GDCM's order) of a folder, checked slice by slice."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(folder)
    if not series:
        inner = [n for n in sorted(os.listdir(folder)) if n.lower().endswith(VOLUME_SUFFIXES)]
        if inner:  # e.g. LUNA16's zip unpacked to subset0/subset0/
            raise VolumeError(
                f"no DICOM series found in this folder, but it holds {len(inner)} volume "
                f"files ({inner[0]}, ...): volumes must sit directly in subset{{fold}}/",
                folder,
            )
        raise VolumeError("no DICOM series found in this folder", folder)
    # Several series in one folder: only the first is read.
    files = reader.GetGDCMSeriesFileNames(folder, series[0])
    in_series = {
        os.path.basename(f) for s in series[1:] for f in reader.GetGDCMSeriesFileNames(folder, s)
    }
    _check_dicom_leftovers(folder, in_series | {os.path.basename(f) for f in files})
    _check_dicom_slices(folder, files)
    reader.SetFileNames(files)
    image = reader.Execute()
    if image.GetDimension() == 3 and image.GetSize()[2] < 2:
        raise VolumeError(
            "too few slices: expected a DICOM series of at least 2 slices (a 3-D volume). "
            f"Received: 1 slice ({os.path.basename(files[0])})",
            folder,
        )
    return image


# ----------------------------------------------------------------------------------------------
# Reading


def _check_scalar_3d(components: int, size: Sequence[int], path: str) -> None:
    # One value per voxel and three axes: what every reader here returns.
    if components != 1:
        raise VolumeError(
            "Expected one value per voxel (a scalar volume; one file per channel). "
            f"Received: {components} components",
            path,
        )
    if len(size) != 3:
        raise VolumeError(
            f"Expected a 3-D volume. Received: {len(size)}-D image of size {tuple(size)}",
            path,
        )


def read_image(path: str | os.PathLike, *, values: str = "voxel values") -> sitk.Image:
    """Read one volume, checked: a file in any format SimpleITK reads, or a DICOM series folder.

    Args:
        path: the file, or a folder holding a DICOM series (the first, if it holds several).
        values: what the voxels are, for the message about NaN voxels (e.g. "HU values").

    Returns:
        The image: 3-D, one value per voxel, every value finite.

    Raises:
        FileNotFoundError: `path` does not exist.
        VolumeError: the file cannot be read, is truncated, holds NaN or infinite voxels, is a
            DICOM series with a damaged, missing or duplicated slice or fewer than 2 slices, is
            not 3-D, or has several components per voxel. The message names the file and why.
    """
    import SimpleITK as sitk

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Expected an image file. Received: {path!r}, which does not exist")
    scanned = False  # whether the file's own bytes were scanned for NaN
    try:
        if os.path.isdir(path):
            image = _read_dicom_series(path)
        else:
            _check_nifti_complete(path)
            if path.lower().endswith((".nii", ".nii.gz")):
                bad = _nifti_nonfinite(path)
                scanned = bad is not None
                if bad:
                    raise VolumeError(
                        f"Expected finite {values}. Received: {bad} NaN or infinite voxels", path
                    )
            hint = _mhd_hint(path) if path.lower().endswith((".mhd", ".mha")) else ""
            if hint:  # say it plainly, before ITK prints its own less helpful complaint
                raise VolumeError(f"cannot read: {hint}", path)
            image = sitk.ReadImage(path)
    except RuntimeError as exc:
        raise VolumeError(f"cannot read: {_itk_reason(exc)}", path) from None
    except OSError as exc:  # e.g. a file that cannot be opened
        raise VolumeError(f"cannot read: {exc}", path) from None
    _check_scalar_3d(image.GetNumberOfComponentsPerPixel(), image.GetSize(), path)
    if not scanned:
        view = sitk.GetArrayViewFromImage(image)
        if not np.issubdtype(view.dtype, np.integer):
            bad = view.size - int(np.count_nonzero(np.isfinite(view)))
            if bad:
                raise VolumeError(
                    f"Expected finite {values}. Received: {bad} NaN or infinite voxels", path
                )
    return image


def read_volume(path: str | os.PathLike, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Read one CT volume (a file, or a folder holding one DICOM series) as raw values in
    (x, y, z) order, with the checks of `read_image`.

    Args:
        path: a .mhd/.mha/.nii/.nii.gz/.nrrd file or a DICOM series folder.
        spacing: (x, y, z) voxel size in mm to resample to (`resample_image`, as an image);
            None keeps the native grid.

    Returns:
        The voxel array, a transposed view of SimpleITK's (z, y, x) array (float32 when
        resampled).

    Raises:
        VolumeError: see `read_image`.
    """
    import SimpleITK as sitk

    image = read_image(path, values="HU values")
    if spacing is not None:
        image = resample_image(image, spacing)
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def read_geometry(path: str | os.PathLike) -> Geometry:
    """The geometry of an image file from its header alone (no voxels are read).

    Args:
        path: an image file (a DICOM folder is read whole, with `read_image`'s checks).

    Returns:
        Its Geometry.

    Raises:
        VolumeError: the header cannot be read, or describes a volume that is not 3-D or has
            several components per voxel.
    """
    import SimpleITK as sitk

    path = os.fspath(path)
    if os.path.isdir(path) or not os.path.exists(path):
        return Geometry.of(read_image(path))
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise VolumeError(f"cannot read: {_itk_reason(exc)}", path) from None
    _check_scalar_3d(reader.GetNumberOfComponents(), reader.GetSize(), path)
    return Geometry(
        size=tuple(int(v) for v in reader.GetSize()),
        spacing=tuple(float(v) for v in reader.GetSpacing()),
        origin=tuple(float(v) for v in reader.GetOrigin()),
        direction=tuple(float(v) for v in reader.GetDirection()),
    )


# ----------------------------------------------------------------------------------------------
# Geometry and arrays


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


def image_to_array(image: sitk.Image) -> np.ndarray:
    """The voxels of `image` as an array in (x, y, z) order, in the image's pixel type.

    Args:
        image: a 3D image.

    Returns:
        An array of shape ``image.GetSize()``.
    """
    import SimpleITK as sitk

    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def array_to_image(array_xyz: np.ndarray, geometry: Geometry) -> sitk.Image:
    """An image of `array_xyz` (x, y, z order) on the grid `geometry`.

    Args:
        array_xyz: a 3D array whose shape is ``geometry.size``.
        geometry: spacing, origin and direction to give it.

    Returns:
        The image.
    """
    import SimpleITK as sitk

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
    import SimpleITK as sitk

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


# ----------------------------------------------------------------------------------------------
# Resampling


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"Expected three spacings > 0 (x y z, mm). Received: spacing={spacing}")
    return values


def resample_image(
    image: sitk.Image,
    target: Sequence[float] | Geometry,
    *,
    label: bool = False,
    fill: float | None = None,
) -> sitk.Image:
    """Resample a volume onto a new grid: a voxel spacing, or a whole `Geometry`.

    A spacing (mm, x y z) keeps the origin and direction and covers the same extent:
    ``round(size * old_spacing / new_spacing)`` voxels per axis (at least 1). A Geometry is
    the grid exactly (e.g. a prediction back onto its input's grid).

    Images and labels are resampled differently, on purpose:

    - an image (``label=False``): linear interpolation, output float32 (an integer output would
      truncate the interpolated values). Points outside the input (at most half a voxel at the
      far edges when a spacing is given) take ``fill``, by default the volume's minimum: air in
      CT (about -1000 HU), where 0 would put a rim of water around the volume, and the
      background in MRI.
    - a label map (``label=True``): nearest neighbour, so no value between two classes is made
      up, and the input's pixel type is kept. Points outside are 0 (the background) unless
      ``fill`` says otherwise.

    Args:
        image: a 3-D SimpleITK image.
        target: the new voxel size (x, y, z) in mm, each > 0; or the grid to resample onto.
        label: resample as a label map (see above).
        fill: the value outside the input; None for the default above.

    Returns:
        The resampled image.

    Raises:
        ValueError: the spacing is not three numbers > 0.
    """
    import SimpleITK as sitk

    if isinstance(target, Geometry):
        grid = target
    else:
        spacing = _check_spacing(target)
        extent = zip(image.GetSize(), image.GetSpacing(), spacing, strict=True)
        grid = Geometry(
            size=tuple(max(1, int(round(n * old / new))) for n, old, new in extent),
            spacing=spacing,
            origin=tuple(image.GetOrigin()),
            direction=tuple(image.GetDirection()),
        )
    if fill is None and not label:
        stats = sitk.MinimumMaximumImageFilter()
        stats.Execute(image)
        fill = stats.GetMinimum()
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(v) for v in grid.size])
    resampler.SetOutputSpacing([float(v) for v in grid.spacing])
    resampler.SetOutputOrigin([float(v) for v in grid.origin])
    resampler.SetOutputDirection([float(v) for v in grid.direction])
    resampler.SetTransform(sitk.Transform())
    resampler.SetDefaultPixelValue(float(fill or 0.0))
    resampler.SetOutputPixelType(image.GetPixelID() if label else sitk.sitkFloat32)
    resampler.SetInterpolator(sitk.sitkNearestNeighbor if label else sitk.sitkLinear)
    return resampler.Execute(image)


# ----------------------------------------------------------------------------------------------
# Intensities


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


def normalise_window(
    values: np.ndarray,
    low: float,
    high: float,
    *,
    dtype: DTypeLike = np.float64,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Clip to [low, high] and scale to [0, 1]: ``(clip(v, low, high) - low) / (high - low)``.

    The one normaliser: extraction's cubes (float64, the original's arithmetic, so the cubes are
    the original's bit for bit) and fine-tuning's volumes (float32, half the memory) both go
    through it. Elementwise, so normalising a window gives the same bits as normalising the
    whole volume and then cutting the window.

    Args:
        values: raw values, any real dtype.
        low, high: the window, ``high > low``.
        dtype: the dtype computed in and returned (ignored with `out`).
        out: an array to write into instead (C order, the shape of `values`); integer values
            are converted exactly (every int16 value is a float).

    Returns:
        A new array of `dtype`, or `out`.
    """
    if out is None:
        out = np.asarray(values).astype(dtype)
    else:
        np.copyto(out, values, casting="unsafe")
    np.clip(out, low, high, out=out)
    out -= low
    out /= high - low
    return out


def background_value(mode: str, params: dict[str, Any] | None = None) -> float:
    """What air (outside a volume) normalises to in `mode`: 0 in the [0, 1] windows and for
    "zscore" (the mean); the bottom of the clip, standardised, for "ct_foreground"."""
    if mode == "ct_foreground" and params:
        return (float(params["clip"][0]) - float(params["mean"])) / max(float(params["std"]), 1e-8)
    return 0.0


def normalise_intensity(
    array: np.ndarray, mode: str, params: dict[str, Any] | None = None
) -> np.ndarray:
    """Normalise a volume's intensities in one of `INTENSITY_MODES`.

    Args:
        array: the volume (one channel).
        mode: "ct" clips to `CT_WINDOW` ([-1000, 1000] HU) and scales to [0, 1]; "mri" clips to
            `MRI_WINDOW` ([0, 4000]); "minmax" scales the volume's own min..max to [0, 1] (a
            constant volume gives zeros); "none" only casts; "ct_foreground" clips to
            ``params["clip"]`` (the data set's foreground 0.5 and 99.5 percentiles), subtracts
            ``params["mean"]`` and divides by ``params["std"]`` (the foreground's); "zscore"
            subtracts the volume's own mean and divides by its own standard deviation (a
            constant volume gives zeros).
        params: "ct_foreground"'s clip, mean and std (the plan's); unused by the others.

    Returns:
        A float32 array of the same shape.
    """
    if mode not in INTENSITY_MODES:
        raise ValueError(
            f"Expected an intensity mode in {INTENSITY_MODES}. Received: mode={mode!r}"
        )
    if mode in INTENSITY_WINDOWS:
        low, high = INTENSITY_WINDOWS[mode]
        return normalise_window(array, low, high, dtype=np.float32)
    x = np.asarray(array, dtype=np.float32)
    if mode == "none":
        return x.copy() if x is array else x
    if mode == "ct_foreground":
        missing = [k for k in ("clip", "mean", "std") if not params or k not in params]
        if missing:
            raise ValueError(
                "Expected intensity params with clip, mean and std for 'ct_foreground'. "
                f"Received: params={params!r}"
            )
        lo, hi = (float(v) for v in params["clip"])
        out = np.clip(x, lo, hi)
        out -= np.float32(params["mean"])
        out /= np.float32(max(float(params["std"]), 1e-8))
        return out
    if mode == "zscore":
        out = x - np.float32(x.mean()) if x.size else x.copy()
        std = float(x.std()) if x.size else 0.0
        if std > 0:
            out /= np.float32(std)
        return out
    low = float(np.min(x)) if x.size else 0.0
    high = float(np.max(x)) if x.size else 0.0
    if high <= low:
        return np.zeros_like(x, dtype=np.float32)
    return normalise_window(x, low, high, dtype=np.float32)
