"""Fine-tuning cases: the layouts, dataset.json, finding and checking cases, the cache, the split.

A data set is a folder of labelled volumes in the nnU-Net (``imagesTr/{case}_0000{ext}``) or
Decathlon (``imagesTr/{case}{ext}``) layout with ``labelsTr/{case}{ext}`` and ``dataset.json``
(docs/finetuning.md); `detect_layout` also recognises the original's arrays and candidate CSVs
(`finetune_arrays`).

Every case is checked before any training: image and label pairs, one grid for all its files
(headers only), the label values against dataset.json, some foreground, and each volume as
`volume_io.read_image` reads it (truncated files, NaN voxels, broken DICOM series, not 3-D,
several components: `volume_io.VolumeError`, naming the file). Then it is normalised to [0, 1]
and cached once as ``.npy`` files that the patch sampler (`finetune_patches`) reads
memory-mapped, so memory does not grow with the number of cases. Arrays are in (x, y, z) order.

Imports: the standard library, NumPy, tqdm (the progress bar), `volume_io` and
`genesis_files`. No Keras: the data can be checked and prepared without a deep-learning stack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from genesis_files import atomic_path
from volume_io import (
    INTENSITY_MODES,
    Geometry,
    image_to_array,
    intensity_mode_for,
    normalise_intensity,
    read_geometry,
    read_image,
    resample_image,
)

__all__ = [
    "ARRAY_NAME",
    "CACHE_VERSION",
    "KNOWN_ENDINGS",
    "Case",
    "FinetuneInputError",
    "PreparedCase",
    "SegmentationSource",
    "cache_digest",
    "check_geometries",
    "default_intensity",
    "detect_layout",
    "discover_segmentation",
    "file_stamp",
    "find_images",
    "list_visible",
    "prepare_cases",
    "read_dataset_json",
    "save_npy",
    "split_cases",
    "split_ending",
]

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
# Bumped when preparation changes what it writes (2: images resampled to float32, the
# normaliser computed in float32 by division).
CACHE_VERSION = 2


class FinetuneInputError(ValueError):
    """Bad fine-tuning input found before training (files, layout, labels, flags)."""


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


def list_visible(folder: str) -> list[str]:
    """The names in `folder` that do not start with a dot, sorted."""
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
        files = [os.path.join(folder, n) for n in list_visible(folder)]
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


def cache_digest(values: Any) -> str:
    """A short digest of a JSON-able cache key (16 hex digits)."""
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def save_npy(path: str, array: np.ndarray) -> None:
    """Save `array` as a .npy file, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def file_stamp(path: str) -> list:
    """[absolute path, size, modification time]: a cache entry is redone when one changes."""
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
    for name in list_visible(labels_dir):
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


def check_geometries(cases: Sequence[Case]) -> None:
    """Check that every case's channels and label share one grid (headers only: fast).

    Args:
        cases: the cases.

    Raises:
        FinetuneInputError: naming both files and every differing field.
        VolumeError: a header that cannot be read, or is not of a 3-D scalar volume.
    """
    for case in cases:
        if os.path.isdir(case.images[0]):
            continue  # a DICOM series has no single header to read; checked when read
        ref = read_geometry(case.images[0])
        for other in case.images[1:] + [case.label]:
            diffs = ref.differences(read_geometry(other))
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
    case: Case,
    n_classes: int,
    intensity: Sequence[str],
    spacing: Sequence[float] | None,
    intensity_params: Sequence[dict] | None = None,
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
        label_img = resample_image(label_img, spacing, label=True)
        images = [resample_image(img, spacing) for img in images]
    label = image_to_array(label_img).astype(np.uint8)
    params = intensity_params or [None] * len(intensity)
    channels = [
        normalise_intensity(image_to_array(img), mode, p)
        for img, mode, p in zip(images, intensity, params, strict=True)
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
    intensity_params: Sequence[dict] | None = None,
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
        intensity_params: per channel, its mode's parameters (the plan's: "ct_foreground"
            needs clip, mean and std); None: none.

    Returns:
        The `PreparedCase`s, in `source.cases` order.

    Raises:
        FinetuneInputError: a geometry mismatch, label values outside dataset.json's labels,
            or no foreground in any case.
        VolumeError: a volume that cannot be used (`volume_io.read_image`), naming the file.
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
            "version": CACHE_VERSION,
            "files": [file_stamp(p) for p in [*case.images, case.label]],
            "intensity": list(intensity),
            "spacing": None if spacing is None else [float(s) for s in spacing],
            "n_classes": source.n_classes,
        }
        if intensity_params and any(intensity_params):
            key["intensity_params"] = [dict(p or {}) for p in intensity_params]
        digest = cache_digest(key)
        base = os.path.join(cache_dir, f"{case.case_id}-{digest}")
        record = base + ".json"
        if not os.path.isfile(record):
            image, label, fg = _prepare_one(
                case, source.n_classes, intensity, spacing, intensity_params
            )
            save_npy(base + "_image.npy", image)
            save_npy(base + "_label.npy", label)
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


def fingerprint_cases(
    source: SegmentationSource, seed: int = 0, progress: bool = True
) -> list[dict[str, Any]]:
    """Each case's fingerprint (`finetune_fingerprint.case_fingerprint`) at its own spacing.

    Args:
        source: the data set.
        seed: the intensity samples' generator seed (one generator for all cases, in order).
        progress: show a progress bar.

    Returns:
        The per-case fingerprints, in `source.cases` order.

    Raises:
        VolumeError: a volume that cannot be used, naming the file.
    """
    from finetune_fingerprint import case_fingerprint

    rng = np.random.default_rng(seed)
    iterator = source.cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(source.cases, desc="Fingerprint", unit="case")
    prints = []
    for case in iterator:
        label_img = read_image(case.label)
        images = [image_to_array(read_image(p)) for p in case.images]
        prints.append(
            case_fingerprint(
                np.stack(images),
                image_to_array(label_img),
                label_img.GetSpacing(),
                rng=rng,
                case_id=case.case_id,
            )
        )
    return prints


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
# Which layout
# ------------------------------------------------------------------------------------------

# The original's array files: x_train.npy, m_valid_64x64x32.npy, y_test_64x64x32.npy...
ARRAY_NAME = re.compile(
    r"^(?P<kind>[xmy])_(?P<part>train|valid|test)(?:_(?P<size>\d+x\d+x\d+))?\.npy$"
)


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
    names = list_visible(folder)
    if "dataset.json" in names or "imagesTr" in names:
        return "volumes"
    if any(ARRAY_NAME.match(n) and n.startswith("x_") for n in names):
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
