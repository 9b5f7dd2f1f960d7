"""Tiny synthetic fine-tuning data sets, written with SimpleITK (not with the code under test).

* `make_segmentation_folder`: imagesTr/labelsTr/dataset.json in the nnU-Net or Decathlon
  layout, one blob of foreground per case, with a non-trivial spacing, origin and direction;
* `make_segmentation_arrays`: the original's `x_*`/`m_*` arrays;
* `make_classification_arrays`: `x_*`/`y_*` arrays;
* `make_candidates`: a few volumes beside a LUNA16-format candidates CSV.

The volumes are (x, y, z) arrays; SimpleITK is given their transpose, as it stores (z, y, x).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# A rotation about z by 30 degrees: the direction is not the identity, so any code that
# ignores it maps world points to the wrong voxels.
_C, _S = float(np.cos(np.pi / 6)), float(np.sin(np.pi / 6))
DIRECTION = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0)
SPACING = (0.8, 0.9, 2.5)
ORIGIN = (-10.0, 20.0, 5.0)


def write_xyz(array_xyz: np.ndarray, path: Path, spacing=SPACING, origin=ORIGIN, direction=None):
    """Write an (x, y, z) array with the given geometry through SimpleITK."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_xyz, (2, 1, 0))))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(DIRECTION if direction is None else tuple(direction))
    sitk.WriteImage(image, str(path), True)


def read_xyz(path: Path) -> np.ndarray:
    """Read a volume as an (x, y, z) array through SimpleITK."""
    return np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), (2, 1, 0))


def blob_case(size, rng: np.random.Generator, radius: float = 4.0, value: int = 1):
    """A CT-like volume in HU (int16) and its uint8 mask: one ball of `value` in the middle."""
    size = tuple(int(s) for s in size)
    grid = np.meshgrid(*[np.arange(s) for s in size], indexing="ij")
    centre = [rng.uniform(radius, s - radius) if s > 2 * radius else s / 2 for s in size]
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    mask = (dist2 <= radius**2).astype(np.uint8) * value
    image = rng.normal(-700.0, 60.0, size)
    image[mask > 0] = rng.normal(60.0, 20.0, int((mask > 0).sum()))
    return np.clip(image, -1024, 3000).astype(np.int16), mask


def make_segmentation_folder(
    root,
    n_cases: int = 4,
    size=(24, 24, 16),
    layout: str = "nnunet",
    seed: int = 0,
    n_channels: int = 1,
    channel_names=None,
    file_ending: str = ".nii.gz",
    labels=None,
) -> Path:
    """Write a labelled data set: `imagesTr/`, `labelsTr/` and `dataset.json` under `root`.

    Args:
        root: the folder (created).
        n_cases: how many cases (`case_000`, `case_001`...).
        size: the (x, y, z) size of every volume.
        layout: "nnunet" (`{case}_0000{ending}` per channel) or "decathlon" (`{case}{ending}`,
            one channel).
        seed: the blobs' positions and noise.
        n_channels: channels per case (nnU-Net layout only for more than one).
        channel_names: dataset.json's channel names (default "CT", then "T1", "T2"...).
        file_ending: the volumes' extension.
        labels: dataset.json's labels (default background 0, tumour 1).

    Returns:
        `root` as a Path.
    """
    if layout not in ("nnunet", "decathlon"):
        raise ValueError(f"layout must be 'nnunet' or 'decathlon', not {layout!r}")
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = channel_names or (["CT"] + [f"T{i}" for i in range(1, n_channels)])[:n_channels]
    for i in range(n_cases):
        case = f"case_{i:03d}"
        image, mask = blob_case(size, rng)
        for ch in range(n_channels):
            channel = image if ch == 0 else (image.astype(np.int32) + 1000 * ch).astype(np.int16)
            name = f"{case}_{ch:04d}{file_ending}" if layout == "nnunet" else case + file_ending
            write_xyz(channel, root / "imagesTr" / name)
        write_xyz(mask, root / "labelsTr" / f"{case}{file_ending}")
    dataset = {
        "channel_names": {str(i): n for i, n in enumerate(names)},
        "labels": labels or {"background": 0, "tumour": 1},
        "numTraining": n_cases,
        "file_ending": file_ending,
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return root


def make_segmentation_arrays(root, n=(6, 4, 2), shape=(16, 16, 8), seed: int = 0) -> Path:
    """The original's arrays: `x_{train,valid,test}_{R}x{C}x{D}.npy` in [0, 1], `m_*` 0/1."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tag = "x".join(str(s) for s in shape)
    for part, count in zip(("train", "valid", "test"), n, strict=True):
        pairs = [blob_case(shape, rng, radius=3.0) for _ in range(count)]
        x = np.stack([(np.clip(p[0], -1000, 1000) + 1000) / 2000 for p in pairs]).astype("f4")
        m = np.stack([p[1] for p in pairs]).astype(np.float32)
        np.save(root / f"x_{part}_{tag}.npy", x)
        np.save(root / f"m_{part}_{tag}.npy", m)
    return root


def make_classification_arrays(root, n=(8, 4, 2), shape=(16, 16, 8), seed: int = 0) -> Path:
    """`x_{train,valid,test}_{R}x{C}x{D}.npy` in [0, 1] with labels `y_*.npy` (0/1, (N,))."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tag = "x".join(str(s) for s in shape)
    for part, count in zip(("train", "valid", "test"), n, strict=True):
        y = np.arange(count) % 2
        x = rng.random((count,) + tuple(shape)).astype(np.float32) * 0.2
        x[y == 1] += 0.6  # the positive class is brighter
        np.save(root / f"x_{part}_{tag}.npy", x)
        np.save(root / f"y_{part}_{tag}.npy", y)
    return root


def make_candidates(
    root, n_volumes: int = 2, size=(40, 40, 24), per_volume: int = 4, seed: int = 0, extra=()
) -> tuple[Path, Path, list[dict]]:
    """Volumes `{seriesuid}.mha` in `root/volumes/` and `root/candidates.csv` in LUNA16's format.

    Each volume is CT-like noise with a bright ball at every positive candidate. Coordinates are
    world millimetres of voxel centres, computed with SimpleITK's index-to-point mapping.

    Args:
        root: the folder (created).
        n_volumes, size, per_volume: how many volumes, their (x, y, z) size, candidates each.
        seed: positions and noise.
        extra: more CSV rows (dicts with seriesuid, coordX, coordY, coordZ, class).

    Returns:
        (the CSV path, the volume folder, the rows written, each with its voxel `index`).
    """
    root = Path(root)
    vol_dir = root / "volumes"
    vol_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for v in range(n_volumes):
        uid = f"1.3.6.1.4.{v}"
        image = rng.normal(-700.0, 50.0, size)
        path = vol_dir / f"{uid}.mha"
        write_xyz(image.astype(np.int16), path)
        ref = sitk.ReadImage(str(path))
        for k in range(per_volume):
            index = tuple(int(rng.integers(2, s - 2)) for s in size)
            cls = k % 2
            if cls:
                lo = [max(0, i - 2) for i in index]
                image[lo[0] : index[0] + 3, lo[1] : index[1] + 3, lo[2] : index[2] + 3] = 200.0
            point = ref.TransformIndexToPhysicalPoint(index)
            rows.append(
                dict(
                    seriesuid=uid,
                    coordX=point[0],
                    coordY=point[1],
                    coordZ=point[2],
                    **{"class": cls},
                    index=index,
                )
            )
        write_xyz(image.astype(np.int16), path)
    rows.extend(extra)
    csv_path = root / "candidates.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "class"])
        for r in rows:
            writer.writerow([r["seriesuid"], r["coordX"], r["coordY"], r["coordZ"], r["class"]])
    return csv_path, vol_dir, rows
