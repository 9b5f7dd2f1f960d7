"""Fine-tuning data: the layouts, their checks, the preprocessed cache, the split and the sampler.

Three kinds of input (docs/finetuning.md):

* a folder of labelled volumes in the nnU-Net (``imagesTr/{case}_0000{ext}``) or Decathlon
  (``imagesTr/{case}{ext}``) layout with ``labelsTr/{case}{ext}`` and ``dataset.json``
  (segmentation);
* the original's arrays: ``x_{train,valid,test}_{R}x{C}x{D}.npy`` with masks ``m_*``
  (segmentation) or labels ``y_*`` (classification);
* a LUNA16-format candidates CSV beside a folder of volumes (classification): cubes centred on
  each candidate (`load_candidate_cubes`).

Volumes are checked (geometry of image and label, label values, pairs, foreground) before any
training, normalised to [0, 1] and cached once as ``.npy`` files that the sampler reads
memory-mapped, so memory does not grow with the number of cases. Arrays are in (x, y, z) order.

Randomness: batch i of epoch e draws from ``np.random.default_rng([seed, e, i])`` alone, so a
batch does not depend on the number of workers or on a resume.

Imports: stdlib, NumPy, Keras (the datasets are ``keras.utils.PyDataset``), finetune_volumes,
genesis_files.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

import unet3d
from finetune_volumes import (
    INTENSITY_MODES,
    Geometry,
    image_to_array,
    intensity_mode_for,
    normalise_intensity,
    read_image,
    resample_image,
)
from genesis_files import atomic_path

__all__ = [
    "ArrayBatches",
    "CandidateSource",
    "Case",
    "FinetuneInputError",
    "PATCH_FACTOR",
    "PreparedCase",
    "SegmentationPatches",
    "SegmentationSource",
    "ArraySource",
    "check_geometries",
    "default_intensity",
    "patch_start",
    "read_dataset_json",
    "split_ending",
    "check_patch",
    "crop_padded",
    "detect_layout",
    "discover_arrays",
    "discover_candidates",
    "discover_segmentation",
    "find_images",
    "foreground_item",
    "load_candidate_cubes",
    "prepare_cases",
    "read_candidates",
    "split_cases",
]

# The U-Net pools three times by 2: every patch size must be a multiple of 8.
PATCH_FACTOR = 8
# nnU-Net's share of patches centred on a foreground voxel.
FOREGROUND_EVERY = 3
# Foreground voxels kept per class and case for the sampler (evenly strided, no randomness).
MAX_FOREGROUND_LOCATIONS = 10000
# Extensions recognised when no file ending is given, longest first.
KNOWN_ENDINGS = (
    ".seg.nrrd",
    ".nii.gz",
    ".nii",
    ".mha",
    ".mhd",
    ".nrrd",
    ".nhdr",
    ".tiff",
    ".tif",
    ".vtk",
    ".hdr",
)
_CACHE_VERSION = 1


class FinetuneInputError(ValueError):
    """Bad fine-tuning input found before training (files, layout, labels, flags)."""


# ------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------


def check_patch(patch: Sequence[int]) -> tuple[int, int, int]:
    """Check a patch size: three positive sizes, each divisible by 8.

    Args:
        patch: (R, C, D).

    Returns:
        The patch as a tuple of ints.

    Raises:
        FinetuneInputError: naming the axis and the nearest valid sizes.
    """
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3:
        raise FinetuneInputError(f"Expected --patch R C D (three sizes). Received: {patch}")
    for axis, size in zip(("R", "C", "D"), patch, strict=True):
        if size < 1 or size % PATCH_FACTOR:
            lower, upper = unet3d.valid_spatial_sizes(size, PATCH_FACTOR)
            nearest = f"{lower}" if lower == upper else f"{lower} or {upper}"
            raise FinetuneInputError(
                f"Expected every --patch size divisible by {PATCH_FACTOR} (the U-Net pools "
                f"three times by 2). Received: --patch {' '.join(map(str, patch))}, "
                f"{axis}={size}; the nearest valid sizes are {nearest}."
            )
    return patch


def split_ending(name: str, file_ending: str | None) -> tuple[str, str] | None:
    """(stem, ending) of a file name, or None when it does not end with the ending.

    Args:
        name: a file name.
        file_ending: e.g. ".nii.gz"; None recognises the usual medical-image extensions.

    Returns:
        The split, or None.
    """
    endings = (file_ending,) if file_ending else KNOWN_ENDINGS
    for ending in endings:
        if name.lower().endswith(ending.lower()) and len(name) > len(ending):
            return name[: -len(ending)], name[-len(ending) :]
    return None


def _visible(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def find_images(
    path_or_files: Sequence[str], file_ending: str | None
) -> list[tuple[str, list[str]]]:
    """The cases of a folder or a list of files, each with its image per channel.

    A folder in nnU-Net naming (``{case}_0000{ext}``, ``{case}_0001{ext}``...) gives one case
    per ``{case}`` with its channels in order; otherwise (Decathlon, ``{case}{ext}``) every file
    is a one-channel case. Explicit files are grouped the same way.

    Args:
        path_or_files: one folder, or image files.
        file_ending: the extension (e.g. ".nii.gz"); None recognises the usual ones.

    Returns:
        [(case id, [image path per channel])], sorted by case id.

    Raises:
        FinetuneInputError: nothing found, a missing channel, or a file that does not exist.
    """
    paths = [os.fspath(p) for p in path_or_files]
    if len(paths) == 1 and os.path.isdir(paths[0]):
        folder = paths[0]
        files = [os.path.join(folder, n) for n in _visible(folder)]
        files = [
            f for f in files if os.path.isfile(f) and split_ending(os.path.basename(f), file_ending)
        ]
        if not files:
            raise FinetuneInputError(
                f"Expected image files ending in {file_ending or ' or '.join(KNOWN_ENDINGS)} in "
                f"{folder}. Received: none"
            )
    else:
        files = paths
        for f in files:
            if not os.path.exists(f):
                raise FinetuneInputError(f"Expected an image file. Received: {f!r} does not exist")
    stems = []
    for f in files:
        split = split_ending(os.path.basename(f.rstrip("/")), file_ending)
        stems.append(split[0] if split else os.path.basename(f.rstrip("/")))
    nnunet = all(_CHANNEL.match(s) for s in stems)
    cases: dict[str, dict[int, str]] = {}
    for f, stem in zip(files, stems, strict=True):
        if nnunet:
            m = _CHANNEL.match(stem)
            case, channel = m.group("case"), int(m.group("channel"))
        else:
            case, channel = stem, 0
        if channel in cases.setdefault(case, {}):
            raise FinetuneInputError(
                f"Expected one image per case and channel. Received: {cases[case][channel]} and "
                f"{f} for case {case!r}"
            )
        cases[case][channel] = f
    n_channels = max(len(ch) for ch in cases.values())
    out = []
    for case in sorted(cases):
        channels = cases[case]
        missing = [c for c in range(n_channels) if c not in channels]
        if missing:
            raise FinetuneInputError(
                f"Expected {n_channels} channels (_0000.._{n_channels - 1:04d}) for case "
                f"{case!r}. Received: channel(s) {missing} missing; found "
                f"{sorted(channels.values())}"
            )
        out.append((case, [channels[c] for c in range(n_channels)]))
    return out


def crop_padded(
    array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float = 0
) -> np.ndarray:
    """The block of `array`'s last three axes from `start` of `size`; outside it, `fill`.

    Args:
        array: (..., X, Y, Z), e.g. a memory-mapped volume.
        start: the first voxel (may be negative or run past the end: padded).
        size: the block's (R, C, D).
        fill: the value outside the volume.

    Returns:
        A new array (..., R, C, D) of `array`'s dtype.
    """
    lead = array.shape[:-3]
    out = np.full(lead + tuple(size), fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, total in zip(start, size, array.shape[-3:], strict=True):
        lo, hi = max(0, s), min(total, s + n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out


def _one_hot(label: np.ndarray, n_classes: int, channel_axis: int) -> np.ndarray:
    eye = np.eye(n_classes, dtype=np.float32)
    out = eye[np.clip(label, 0, n_classes - 1).astype(np.intp)]  # (..., n)
    return out if channel_axis == -1 else np.moveaxis(out, -1, channel_axis)


def _hash(values: Any) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _save_npy(path: str, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _file_stamp(path: str) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


# ------------------------------------------------------------------------------------------
# Folders of volumes (segmentation)
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One labelled case: its image per channel and its label map."""

    case_id: str
    images: list[str]
    label: str


@dataclasses.dataclass
class SegmentationSource:
    """A folder of labelled volumes and its dataset.json.

    Attributes:
        root: the folder.
        cases: the cases, sorted by id.
        channel_names: one name per channel, in channel order.
        labels: dataset.json's name -> value (values 0..n-1, 0 the background).
        file_ending: the volumes' extension.
        layout: "nnunet" or "decathlon".
    """

    root: str
    cases: list[Case]
    channel_names: list[str]
    labels: dict[str, int]
    file_ending: str
    layout: str

    @property
    def n_classes(self) -> int:
        """Classes including the background."""
        return len(self.labels)


def read_dataset_json(folder: str) -> dict:
    """dataset.json of a data set folder, with its fields checked.

    Args:
        folder: the data set folder.

    Returns:
        The parsed JSON (``channel_names``, ``labels`` and ``file_ending`` present).

    Raises:
        FinetuneInputError: missing, unreadable, or a field missing or malformed.
    """
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        raise FinetuneInputError(
            f"Expected {path} with channel_names, labels and file_ending. Received: no such file"
        )
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise FinetuneInputError(f"Expected valid JSON in {path}. Received: {exc}") from None
    for field in ("channel_names", "labels", "file_ending"):
        if field not in meta:
            raise FinetuneInputError(
                f"Expected the field {field!r} in {path}. Received: fields {sorted(meta)}"
            )
    labels = meta["labels"]
    if not isinstance(labels, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in labels.values()
    ):
        raise FinetuneInputError(
            f"Expected 'labels' in {path} to map names to integer values (regions are not "
            f"supported). Received: labels={labels!r}"
        )
    values = sorted(labels.values())
    if values != list(range(len(values))) or len(values) < 2:
        raise FinetuneInputError(
            f"Expected 'labels' in {path} to be the consecutive values 0..n-1 (0 the "
            f"background, at least one foreground class). Received: labels={labels!r}"
        )
    names = meta["channel_names"]
    if not isinstance(names, dict) or sorted(names, key=int) != [str(i) for i in range(len(names))]:
        raise FinetuneInputError(
            f"Expected 'channel_names' in {path} keyed '0', '1'... Received: {names!r}"
        )
    return meta


def discover_segmentation(folder: str) -> SegmentationSource:
    """The cases of a labelled folder, images and labels paired.

    Args:
        folder: holds imagesTr/, labelsTr/ and dataset.json.

    Returns:
        The `SegmentationSource`.

    Raises:
        FinetuneInputError: dataset.json malformed, an image without a label or a label without
            an image, a channel count different from dataset.json's.
    """
    meta = read_dataset_json(folder)
    ending = str(meta["file_ending"])
    images_dir, labels_dir = os.path.join(folder, "imagesTr"), os.path.join(folder, "labelsTr")
    for d in (images_dir, labels_dir):
        if not os.path.isdir(d):
            raise FinetuneInputError(f"Expected the folder {d}. Received: no such folder")
    images = find_images([images_dir], ending)
    labels = {}
    for name in _visible(labels_dir):
        split = split_ending(name, ending)
        if split:
            labels[split[0]] = os.path.join(labels_dir, name)
    names = [str(meta["channel_names"][str(i)]) for i in range(len(meta["channel_names"]))]
    no_label = [case for case, _ in images if case not in labels]
    no_image = sorted(set(labels) - {case for case, _ in images})
    if no_label:
        first = dict(images)[no_label[0]][0]
        raise FinetuneInputError(
            f"Expected a label {os.path.join(labels_dir, no_label[0] + ending)} for the image "
            f"{first}. Received: no such file ({len(no_label)} image(s) without a label)"
        )
    if no_image:
        raise FinetuneInputError(
            f"Expected an image in {images_dir} for the label {labels[no_image[0]]}. Received: "
            f"none ({len(no_image)} label(s) without an image)"
        )
    cases = [Case(case, paths, labels[case]) for case, paths in images]
    if len(cases[0].images) != len(names):
        raise FinetuneInputError(
            f"Expected {len(names)} channel(s) per case, as channel_names in "
            f"{os.path.join(folder, 'dataset.json')}. Received: {len(cases[0].images)} for case "
            f"{cases[0].case_id!r} ({cases[0].images})"
        )
    layout = (
        "nnunet"
        if os.path.basename(cases[0].images[0]).startswith(cases[0].case_id + "_0000")
        else "decathlon"
    )
    labels_map = {str(k): int(v) for k, v in meta["labels"].items()}
    return SegmentationSource(folder, cases, names, labels_map, ending, layout)


def _header(path: str) -> Geometry:
    import SimpleITK as sitk  # the reader only; finetune_volumes reads the voxels

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return Geometry.of(read_image(path))  # its error names the file
    return Geometry(
        size=tuple(int(v) for v in reader.GetSize()),
        spacing=tuple(float(v) for v in reader.GetSpacing()),
        origin=tuple(float(v) for v in reader.GetOrigin()),
        direction=tuple(float(v) for v in reader.GetDirection()),
    )


def check_geometries(cases: Sequence[Case]) -> None:
    """Check that every case's channels and label share one grid (headers only: fast).

    Args:
        cases: the cases.

    Raises:
        FinetuneInputError: naming both files and every differing field.
    """
    for case in cases:
        if os.path.isdir(case.images[0]):
            continue  # a DICOM series has no single header to read; checked when read
        ref = _header(case.images[0])
        for other in case.images[1:] + [case.label]:
            diffs = ref.differences(_header(other))
            if diffs:
                raise FinetuneInputError(
                    f"Expected {other} on the same grid as {case.images[0]}. Received: "
                    + "; ".join(diffs)
                )


# ------------------------------------------------------------------------------------------
# The preprocessed cache
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PreparedCase:
    """One case, preprocessed and memory-mapped.

    Attributes:
        case_id: the case.
        image: float32 (channels, X, Y, Z) in [0, 1] (memory-mapped).
        label: uint8 (X, Y, Z) class indices (memory-mapped).
        foreground: class index -> (K, 3) int32 voxel indices of that class (a strided subset).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    foreground: dict[int, np.ndarray]

    @property
    def has_foreground(self) -> bool:
        """Whether any foreground voxel was found."""
        return any(len(v) for v in self.foreground.values())


def _prepare_one(
    case: Case, n_classes: int, intensity: Sequence[str], spacing: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    label_img = read_image(case.label)
    images = [read_image(p) for p in case.images]
    ref = Geometry.of(images[0])
    for path, img in zip([*case.images[1:], case.label], [*images[1:], label_img], strict=True):
        diffs = ref.differences(Geometry.of(img))
        if diffs:
            raise FinetuneInputError(
                f"Expected {path} on the same grid as {case.images[0]}. Received: "
                + "; ".join(diffs)
            )
    raw_label = image_to_array(label_img)
    values = np.unique(raw_label)
    bad = [v for v in values.tolist() if v not in range(n_classes)]
    if bad:
        raise FinetuneInputError(
            f"Expected label values in dataset.json's labels (0..{n_classes - 1}). Received: "
            f"{bad[:10]} in {case.label}"
        )
    if spacing is not None:
        label_img = resample_image(label_img, spacing, is_label=True)
        images = [resample_image(img, spacing, is_label=False) for img in images]
    label = image_to_array(label_img).astype(np.uint8)
    channels = [
        normalise_intensity(image_to_array(img), mode)
        for img, mode in zip(images, intensity, strict=True)
    ]
    image = np.stack(channels).astype(np.float32)
    foreground = {}
    for c in range(1, n_classes):
        where = np.argwhere(label == c).astype(np.int32)
        step = max(1, -(-len(where) // MAX_FOREGROUND_LOCATIONS))
        foreground[c] = where[::step]
    return image, label, foreground


def prepare_cases(
    source: SegmentationSource,
    cache_dir: str,
    intensity: Sequence[str],
    spacing: Sequence[float] | None = None,
    progress: bool = True,
) -> list[PreparedCase]:
    """Check, normalise and cache every case once; return them memory-mapped.

    A case's cache is reused when its source files (path, size, modification time), the
    intensity modes and the spacing are unchanged; its small JSON record is written last, so an
    interrupted run redoes only the case it was writing. One case is in memory at a time.

    Args:
        source: the data set.
        cache_dir: the cache folder (created).
        intensity: one mode of `INTENSITY_MODES` per channel.
        spacing: resample to this (x, y, z) spacing in mm first; None keeps each case's own.
        progress: show a progress bar.

    Returns:
        The `PreparedCase`s, in `source.cases` order.

    Raises:
        FinetuneInputError: a geometry mismatch, label values outside dataset.json's labels,
            or no foreground in any case.
    """
    if len(intensity) != len(source.channel_names):
        raise FinetuneInputError(
            f"Expected one intensity mode per channel ({len(source.channel_names)}: "
            f"{source.channel_names}). Received: {list(intensity)}"
        )
    for mode in intensity:
        if mode not in INTENSITY_MODES:
            raise FinetuneInputError(
                f"Expected an intensity mode in {INTENSITY_MODES}. Received: {mode!r}"
            )
    os.makedirs(cache_dir, exist_ok=True)
    check_geometries(source.cases)
    iterator = source.cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(source.cases, desc="Preparing cases", unit="case")
    prepared = []
    for case in iterator:
        key = {
            "version": _CACHE_VERSION,
            "files": [_file_stamp(p) for p in [*case.images, case.label]],
            "intensity": list(intensity),
            "spacing": None if spacing is None else [float(s) for s in spacing],
            "n_classes": source.n_classes,
        }
        digest = _hash(key)
        base = os.path.join(cache_dir, f"{case.case_id}-{digest}")
        record = base + ".json"
        if not os.path.isfile(record):
            image, label, fg = _prepare_one(case, source.n_classes, intensity, spacing)
            _save_npy(base + "_image.npy", image)
            _save_npy(base + "_label.npy", label)
            with atomic_path(base + "_fg.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, **{str(c): v for c, v in fg.items()})
            del image, label
            with atomic_path(record) as tmp, open(tmp, "w") as f:
                json.dump(key, f)
        with np.load(base + "_fg.npz") as z:
            fg = {int(c): z[c] for c in z.files}
        prepared.append(
            PreparedCase(
                case.case_id,
                np.load(base + "_image.npy", mmap_mode="r"),
                np.load(base + "_label.npy", mmap_mode="r"),
                fg,
            )
        )
    if not any(p.has_foreground for p in prepared):
        raise FinetuneInputError(
            f"Expected foreground (a label value above 0) in at least one training case of "
            f"{source.root}. Received: every label map in labelsTr/ is all background"
        )
    return prepared


# ------------------------------------------------------------------------------------------
# Split by case
# ------------------------------------------------------------------------------------------


def split_cases(
    case_ids: Sequence[str], fold: int | None = None, folds: int = 5, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Training and validation cases, split by case, deterministically.

    The sorted ids are shuffled by ``np.random.default_rng(seed)``. Without a fold, the last
    20% (at least one case) validate; with ``fold=K`` of ``folds=N``, the K-th of N nearly
    equal parts validates (cross-validation).

    Args:
        case_ids: every case id.
        fold: the validation fold (0-based), or None for the fixed 80/20 split.
        folds: the number of folds.
        seed: the shuffle's seed.

    Returns:
        (training ids, validation ids), each sorted.

    Raises:
        FinetuneInputError: fewer than two cases, or a fold outside 0..folds-1.
    """
    ids = sorted(set(case_ids))
    if len(ids) < 2:
        raise FinetuneInputError(
            f"Expected at least two cases to split into training and validation. "
            f"Received: {len(ids)} ({ids})"
        )
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    if fold is None:
        n_valid = max(1, int(round(0.2 * len(ids))))
        valid = order[-n_valid:]
    else:
        if folds < 2 or not 0 <= fold < folds:
            raise FinetuneInputError(
                f"Expected 0 <= --fold < --folds and --folds >= 2. Received: --fold {fold} "
                f"--folds {folds}"
            )
        if folds > len(ids):
            raise FinetuneInputError(
                f"Expected --folds at most the number of cases ({len(ids)}). Received: "
                f"--folds {folds}"
            )
        valid = [order[i] for i in np.array_split(np.arange(len(ids)), folds)[fold]]
    train = sorted(set(ids) - set(valid))
    return train, sorted(valid)


# ------------------------------------------------------------------------------------------
# The patch sampler (segmentation of volumes)
# ------------------------------------------------------------------------------------------


def foreground_item(k: int) -> bool:
    """Whether item k of an epoch (batch * batch_size + position) is centred on foreground.

    Every third item is: a third of all patches, whatever the batch size (nnU-Net's share).
    """
    return k % FOREGROUND_EVERY == FOREGROUND_EVERY - 1


def patch_start(
    size: Sequence[int], patch: Sequence[int], rng: np.random.Generator, centre=None
) -> list[int]:
    """Where a patch starts: random, or centred on `centre` and kept inside the volume.

    A volume smaller than the patch along an axis is padded: the start is then between
    ``size - patch`` (negative) and 0, so the whole volume lies inside the patch.

    Args:
        size: the volume's (X, Y, Z).
        patch: (R, C, D).
        rng: the generator (used only for random starts).
        centre: a voxel index to centre on, or None.

    Returns:
        The start index per axis.
    """
    start = []
    for a, (n, p) in enumerate(zip(size, patch, strict=True)):
        lo, hi = min(0, n - p), max(0, n - p)
        if centre is None:
            start.append(int(rng.integers(lo, hi + 1)))
        else:
            start.append(int(np.clip(int(centre[a]) - p // 2, lo, hi)))
    return start


class SegmentationPatches(keras.utils.PyDataset):
    """(image patches, one-hot label patches) batches drawn from prepared cases on the fly.

    Batch i of epoch e draws from ``np.random.default_rng([seed, e, i])``: for each item a case
    (uniformly), and for every third item of the epoch (`foreground_item`) a foreground class
    present in the case and one of its voxels to centre on; the others start anywhere.

    Args:
        cases: the `PreparedCase`s to draw from.
        patch: (R, C, D).
        batch_size: patches per batch.
        n_classes: classes including the background (the one-hot depth).
        steps: batches per epoch.
        seed: the seed.
        data_format: "channels_first" or "channels_last".
        fixed_epoch: always draw epoch `fixed_epoch`'s batches (validation: the same patches
            every epoch, so val_loss is comparable); None follows `set_epoch`.
        **kwargs: for `keras.utils.PyDataset` (workers, use_multiprocessing, max_queue_size).
    """

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        patch: Sequence[int],
        batch_size: int,
        n_classes: int,
        steps: int,
        seed: int,
        data_format: str = "channels_first",
        fixed_epoch: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not cases:
            raise FinetuneInputError("Expected at least one case to sample patches from.")
        self.cases = list(cases)
        self.patch = tuple(int(p) for p in patch)
        self.batch_size, self.n_classes, self.steps = int(batch_size), int(n_classes), int(steps)
        self.seed, self.data_format, self.fixed_epoch = int(seed), data_format, fixed_epoch
        self._epoch = 0
        self._with_fg = [i for i, c in enumerate(self.cases) if c.has_foreground]

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch `epoch`'s batches from now on (called before each epoch)."""
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def sample(self, rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """One patch: (image (channels, R, C, D), label (R, C, D), centred on foreground)."""
        on_fg = foreground_item(k) and bool(self._with_fg)
        if on_fg:
            case = self.cases[self._with_fg[int(rng.integers(len(self._with_fg)))]]
            classes = [c for c, v in sorted(case.foreground.items()) if len(v)]
            locations = case.foreground[classes[int(rng.integers(len(classes)))]]
            centre = locations[int(rng.integers(len(locations)))]
        else:
            case = self.cases[int(rng.integers(len(self.cases)))]
            centre = None
        start = patch_start(case.label.shape, self.patch, rng, centre)
        image = crop_padded(case.image, start, self.patch, 0.0)
        label = crop_padded(case.label, start, self.patch, 0)
        return image, label, on_fg

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= int(index) < self.steps:
            raise IndexError(f"Expected a batch index in 0..{self.steps - 1}. Received: {index}")
        epoch = self._epoch if self.fixed_epoch is None else self.fixed_epoch
        rng = np.random.default_rng([self.seed, epoch, int(index)])
        images, labels = [], []
        for j in range(self.batch_size):
            image, label, _ = self.sample(rng, int(index) * self.batch_size + j)
            images.append(image)
            labels.append(label)
        x = np.stack(images).astype(np.float32, copy=False)
        y = _one_hot(np.stack(labels), self.n_classes, 1)
        if self.data_format == "channels_last":
            x, y = np.moveaxis(x, 1, -1), np.moveaxis(y, 1, -1)
        return np.ascontiguousarray(x), np.ascontiguousarray(y)


# ------------------------------------------------------------------------------------------
# The original's arrays
# ------------------------------------------------------------------------------------------

_ARRAY = re.compile(r"^(?P<kind>[xmy])_(?P<part>train|valid|test)(?:_(?P<size>\d+x\d+x\d+))?\.npy$")


@dataclasses.dataclass
class ArraySource:
    """The original's pre-cut arrays.

    Attributes:
        root: the folder.
        task: "segmentation" (``m_*`` masks) or "classification" (``y_*`` labels).
        x: part -> images, memory-mapped, (N, R, C, D) (a channel axis of 1 is dropped).
        t: part -> masks (N, R, C, D) or labels (N,) / one-hot (N, n).
        patch: the arrays' (R, C, D).
        n_classes: 2 for masks; the number of classes for labels.
    """

    root: str
    task: str
    x: dict[str, np.ndarray]
    t: dict[str, np.ndarray]
    patch: tuple[int, int, int]
    n_classes: int


def _squeeze_channel(x: np.ndarray, path: str) -> np.ndarray:
    if x.ndim == 5 and x.shape[1] == 1:
        return x[:, 0]
    if x.ndim == 5 and x.shape[-1] == 1:
        return x[..., 0]
    if x.ndim != 4:
        raise FinetuneInputError(
            f"Expected an array (N, R, C, D) (or with a channel axis of 1) in {path}. "
            f"Received: shape {x.shape}"
        )
    return x


def discover_arrays(folder: str, task: str | None = None) -> ArraySource:
    """The ``x_*``/``m_*`` (or ``y_*``) arrays of a folder, memory-mapped and checked.

    Args:
        folder: holds ``x_train*.npy`` and ``x_valid*.npy`` (``x_test`` is not used here).
        task: "segmentation", "classification" or None (masks mean segmentation).

    Returns:
        The `ArraySource`.

    Raises:
        FinetuneInputError: a missing part, images and targets of different counts or shapes,
            mask values other than 0 and 1.
    """
    found: dict[tuple[str, str], str] = {}
    for name in _visible(folder):
        m = _ARRAY.match(name)
        if m:
            found[(m.group("kind"), m.group("part"))] = os.path.join(folder, name)
    has_m = any(k == "m" for k, _ in found)
    has_y = any(k == "y" for k, _ in found)
    if task is None:
        task = "segmentation" if has_m else "classification"
    kind = "m" if task == "segmentation" else "y"
    x, t = {}, {}
    for part in ("train", "valid"):
        for k in ("x", kind):
            if (k, part) not in found:
                raise FinetuneInputError(
                    f"Expected {k}_{part}_RxCxD.npy in {folder} for {task}"
                    f"{' (masks m_*)' if kind == 'm' else ' (labels y_*)'}. Received: "
                    f"{sorted(os.path.basename(p) for p in found.values()) or 'none'}"
                    + (
                        " (y_* labels found: pass --task classification)"
                        if has_y and not has_m and kind == "m"
                        else ""
                    )
                )
        xp, tp = found[("x", part)], found[(kind, part)]
        x[part] = _squeeze_channel(np.load(xp, mmap_mode="r"), xp)
        target = np.load(tp, mmap_mode="r")
        if len(target) != len(x[part]):
            raise FinetuneInputError(
                f"Expected as many targets in {tp} as images in {xp} ({len(x[part])}). "
                f"Received: {len(target)}"
            )
        if task == "segmentation":
            target = _squeeze_channel(target, tp)
            if target.shape != x[part].shape:
                raise FinetuneInputError(
                    f"Expected masks in {tp} of the images' shape {x[part].shape}. Received: "
                    f"{target.shape}"
                )
            values = np.unique(np.asarray(target[: min(len(target), 64)]))
            if not set(values.tolist()) <= {0, 1}:
                raise FinetuneInputError(
                    f"Expected binary masks (0 and 1) in {tp}. Received: values {values[:10]}"
                )
        t[part] = target
    patch = tuple(int(s) for s in x["train"].shape[1:])
    if tuple(x["valid"].shape[1:]) != patch:
        raise FinetuneInputError(
            f"Expected x_valid of x_train's cube size {patch}. Received: {x['valid'].shape[1:]}"
        )
    if task == "segmentation":
        n_classes = 2
    else:
        y = t["train"]
        n_classes = int(y.shape[1]) if y.ndim == 2 else int(max(np.max(y), np.max(t["valid"]))) + 1
        n_classes = max(n_classes, 2)
    return ArraySource(folder, task, x, t, patch, n_classes)


class ArrayBatches(keras.utils.PyDataset):
    """Batches of pre-cut arrays: images with one-hot masks or one-hot class labels.

    Epoch e visits the items in the order ``default_rng([seed, e]).permutation(N)`` (or in
    order with ``shuffle=False``); the last batch wraps around to stay full.

    Args:
        x: images (N, R, C, D).
        t: masks (N, R, C, D), labels (N,) or one-hot labels (N, n).
        n_classes: the one-hot depth.
        batch_size: items per batch.
        seed: the shuffle's seed.
        data_format: "channels_first" or "channels_last".
        shuffle: shuffle every epoch (training) or not (validation).
        steps: batches per epoch; None: ceil(N / batch_size).
        indices: use only these items (a split of `x`), without copying `x`; None: all.
        **kwargs: for `keras.utils.PyDataset`.
    """

    def __init__(
        self,
        x: np.ndarray,
        t: np.ndarray,
        n_classes: int,
        batch_size: int,
        seed: int,
        data_format: str = "channels_first",
        shuffle: bool = True,
        steps: int | None = None,
        indices: np.ndarray | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.x, self.t, self.n_classes = x, t, int(n_classes)
        self.indices = np.arange(len(x)) if indices is None else np.asarray(indices, np.int64)
        if not len(self.indices):
            raise FinetuneInputError("Expected at least one item to make batches of. Received: 0")
        self.batch_size, self.seed, self.data_format = int(batch_size), int(seed), data_format
        self.shuffle = shuffle
        self.steps = int(steps) if steps else max(1, -(-len(self.indices) // self.batch_size))
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch `epoch`'s order from now on."""
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.indices)
        if self.shuffle:
            order = self.indices[np.random.default_rng([self.seed, self._epoch]).permutation(n)]
        else:
            order = self.indices
        picks = np.sort(
            order[np.arange(index * self.batch_size, (index + 1) * self.batch_size) % n]
        )
        x = np.asarray(self.x[picks], dtype=np.float32)[:, None]
        t = np.asarray(self.t[picks])
        if t.ndim == 2:
            y = t.astype(np.float32)  # already one-hot
        elif t.ndim == 1:
            y = _one_hot(t.astype(np.int64), self.n_classes, -1)
        else:
            y = _one_hot(np.rint(t).astype(np.int64), self.n_classes, 1)
        if self.data_format == "channels_last":
            x = np.moveaxis(x, 1, -1)
            if y.ndim == 5:
                y = np.moveaxis(y, 1, -1)
        return np.ascontiguousarray(x), np.ascontiguousarray(y)


# ------------------------------------------------------------------------------------------
# Candidates (classification): LUNA16's CSV beside a folder of volumes
# ------------------------------------------------------------------------------------------


def read_candidates(csv_path: str) -> tuple[list[dict], bool]:
    """The rows of a LUNA16-format candidates CSV.

    Args:
        csv_path: ``seriesuid,coordX,coordY,coordZ[,class]`` with a header, world mm.

    Returns:
        (rows as dicts with seriesuid, coords (x, y, z) floats, class int or None, row number),
        whether the file has a class column).

    Raises:
        FinetuneInputError: missing columns or a value that is not a number.
    """
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        need = ["seriesuid", "coordX", "coordY", "coordZ"]
        missing = [c for c in need if c not in fields]
        if missing:
            raise FinetuneInputError(
                f"Expected the columns seriesuid,coordX,coordY,coordZ[,class] in {csv_path}. "
                f"Received: {fields} (missing {missing})"
            )
        has_class = "class" in fields
        rows = []
        for i, raw in enumerate(reader):
            raw = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            try:
                coords = tuple(float(raw[c]) for c in need[1:])
                cls = int(float(raw["class"])) if has_class else None
            except ValueError:
                raise FinetuneInputError(
                    f"Expected numbers in row {i + 2} of {csv_path}. Received: {raw}"
                ) from None
            rows.append({"seriesuid": raw["seriesuid"], "coords": coords, "class": cls, "row": i})
    return rows, has_class


def _index_volumes(volume_dir: str) -> dict[str, str]:
    """stem -> path of every volume under `volume_dir` (recursive: LUNA16's subset folders)."""
    found = {}
    for folder, dirs, files in os.walk(volume_dir):
        dirs.sort()
        for name in sorted(files):
            split = split_ending(name, None)
            if split and not name.startswith("."):
                found.setdefault(split[0], os.path.join(folder, name))
    return found


def load_candidate_cubes(
    csv_path: str,
    volume_dir: str,
    patch: tuple[int, int, int],
    intensity: str | Sequence[str] | None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Cubes of the patch size centred on each candidate of a LUNA16-format CSV.

    World coordinates (mm) go to a voxel through SimpleITK's
    ``TransformPhysicalPointToContinuousIndex`` (origin, spacing and direction), rounded to the
    nearest voxel; the cube starts ``patch // 2`` before it and is padded with 0 (after the
    intensity mapping) where it leaves the volume. Each volume is read once, one at a time.

    Args:
        csv_path: the candidates (``seriesuid,coordX,coordY,coordZ[,class]``).
        volume_dir: holds ``{seriesuid}{ext}`` volumes, in sub-folders too.
        patch: (R, C, D).
        intensity: a mode of `INTENSITY_MODES` (or a one-element list); None means "ct".
        progress: show a progress bar over the volumes.

    Returns:
        (cubes float32 (N, R, C, D), labels int64 (N,) or None without a class column,
        ids ``"{seriesuid}:{row}"`` with the CSV's 0-based data row).

    Warns:
        UserWarning: for a candidate outside its volume, or a seriesuid with no volume
            (skipped, named).
    """
    if isinstance(intensity, (list, tuple)):
        intensity = intensity[0] if intensity else None
    mode = intensity or "ct"
    if mode not in INTENSITY_MODES:
        raise FinetuneInputError(
            f"Expected an intensity mode in {INTENSITY_MODES}. Received: {mode!r}"
        )
    patch = tuple(int(p) for p in patch)
    rows, has_class = read_candidates(csv_path)
    volumes = _index_volumes(volume_dir)
    by_uid: dict[str, list[dict]] = {}
    for r in rows:
        by_uid.setdefault(r["seriesuid"], []).append(r)
    cubes, labels, ids = [], [], []
    uids = list(by_uid)
    if progress:
        from tqdm import tqdm

        uids = tqdm(uids, desc="Cutting candidate cubes", unit="volume")
    for uid in uids:
        if uid not in volumes:
            warnings.warn(
                f"No volume {uid}.* under {volume_dir}: skipping its {len(by_uid[uid])} "
                f"candidate(s) of {csv_path}",
                UserWarning,
                stacklevel=2,
            )
            continue
        image = read_image(volumes[uid])
        size = image.GetSize()
        array = normalise_intensity(image_to_array(image), mode)
        for r in by_uid[uid]:
            ci = image.TransformPhysicalPointToContinuousIndex(r["coords"])
            index = [int(np.floor(v + 0.5)) for v in ci]
            if not all(0 <= i < n for i, n in zip(index, size, strict=True)):
                warnings.warn(
                    f"Candidate {uid}:{r['row']} at {r['coords']} mm (voxel {index}) is outside "
                    f"its volume {volumes[uid]} of size {tuple(size)}: skipped",
                    UserWarning,
                    stacklevel=2,
                )
                continue
            start = [i - p // 2 for i, p in zip(index, patch, strict=True)]
            cubes.append(crop_padded(array, start, patch, 0.0))
            labels.append(r["class"])
            ids.append(f"{uid}:{r['row']}")
        del array
    out = np.stack(cubes) if cubes else np.zeros((0,) + patch, np.float32)
    return (
        out.astype(np.float32, copy=False),
        (np.asarray(labels, np.int64) if has_class else None),
        ids,
    )


@dataclasses.dataclass
class CandidateSource:
    """A candidates CSV and its volumes, cut into cached cubes.

    Attributes:
        csv_path, volume_dir: the inputs.
        cubes: float32 (N, R, C, D), memory-mapped from the cache.
        labels: int64 (N,).
        ids: ``"{seriesuid}:{row}"``; the seriesuid is the case the split keeps together.
    """

    csv_path: str
    volume_dir: str
    cubes: np.ndarray
    labels: np.ndarray
    ids: list[str]

    @property
    def case_ids(self) -> list[str]:
        """The seriesuid of every cube."""
        return [i.rsplit(":", 1)[0] for i in self.ids]


def discover_candidates(
    folder: str,
    patch: Sequence[int],
    cache_dir: str,
    intensity: str | None = None,
    csv_path: str | None = None,
) -> CandidateSource:
    """The candidate cubes of a folder with one CSV (or `csv_path`), cut once and cached.

    Args:
        folder: holds the CSV and the volumes (in sub-folders too).
        patch: (R, C, D).
        cache_dir: where the cubes are cached (keyed by the CSV, the patch and the mode).
        intensity: see `load_candidate_cubes`.
        csv_path: the CSV; None takes the one ``*.csv`` in `folder`.

    Returns:
        The `CandidateSource`.
    """
    if csv_path is None:
        csvs = [n for n in _visible(folder) if n.lower().endswith(".csv")]
        if len(csvs) != 1:
            raise FinetuneInputError(
                f"Expected one candidates CSV (seriesuid,coordX,coordY,coordZ,class) in {folder}. "
                f"Received: {csvs or 'none'}"
            )
        csv_path = os.path.join(folder, csvs[0])
    key = {
        "v": _CACHE_VERSION,
        "csv": _file_stamp(csv_path),
        "patch": list(patch),
        "mode": intensity,
    }
    base = os.path.join(cache_dir, f"candidates-{_hash(key)}")
    if not os.path.isfile(base + ".json"):
        cubes, labels, ids = load_candidate_cubes(csv_path, folder, tuple(patch), intensity, True)
        if labels is None:
            raise FinetuneInputError(
                f"Expected a 'class' column in {csv_path} to train on. Received: none"
            )
        if not len(ids):
            raise FinetuneInputError(
                f"Expected candidates inside their volumes in {csv_path}. Received: none"
            )
        os.makedirs(cache_dir, exist_ok=True)
        _save_npy(base + "_cubes.npy", cubes)
        _save_npy(base + "_labels.npy", labels)
        del cubes
        with atomic_path(base + ".json") as tmp, open(tmp, "w") as f:
            json.dump({**key, "ids": ids}, f)
    with open(base + ".json") as f:
        ids = json.load(f)["ids"]
    return CandidateSource(
        csv_path,
        folder,
        np.load(base + "_cubes.npy", mmap_mode="r"),
        np.load(base + "_labels.npy"),
        ids,
    )


# ------------------------------------------------------------------------------------------
# Which layout
# ------------------------------------------------------------------------------------------


def detect_layout(folder: str) -> str:
    """Which kind of data set a folder holds.

    Args:
        folder: the ``--data`` folder.

    Returns:
        "volumes" (imagesTr/ or dataset.json), "arrays" (``x_*.npy``) or "candidates" (a CSV).

    Raises:
        FinetuneInputError: not a folder, or none of them.
    """
    if not os.path.isdir(folder):
        raise FinetuneInputError(f"Expected a data folder. Received: --data {folder!r} is not one")
    names = _visible(folder)
    if "dataset.json" in names or "imagesTr" in names:
        return "volumes"
    if any(_ARRAY.match(n) and n.startswith("x_") for n in names):
        return "arrays"
    if any(n.lower().endswith(".csv") for n in names):
        return "candidates"
    raise FinetuneInputError(
        f"Expected in {folder}: imagesTr/ + labelsTr/ + dataset.json (volumes), "
        "x_{train,valid}_RxCxD.npy with m_* or y_* (arrays), or a candidates CSV beside "
        f"volumes. Received: {names[:10] or 'an empty folder'}"
    )


def default_intensity(channel_names: Sequence[str], override: Sequence[str] | None) -> list[str]:
    """One intensity mode per channel: from the channel names, or the override.

    Args:
        channel_names: dataset.json's names in channel order.
        override: --intensity values: one for all channels, or one per channel; None.

    Returns:
        The modes.
    """
    if not override:
        return [intensity_mode_for(n) for n in channel_names]
    override = list(override)
    if len(override) == 1:
        override = override * len(channel_names)
    if len(override) != len(channel_names):
        raise FinetuneInputError(
            f"Expected one --intensity for all channels or one per channel "
            f"({len(channel_names)}: {list(channel_names)}). Received: {override}"
        )
    for mode in override:
        if mode not in INTENSITY_MODES:
            raise FinetuneInputError(
                f"Expected --intensity in {INTENSITY_MODES}. Received: {mode!r}"
            )
    return override
