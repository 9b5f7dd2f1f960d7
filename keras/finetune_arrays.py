"""Fine-tuning from pre-cut cubes: the original's arrays, and cubes around candidates of a CSV.

* the original's arrays: ``x_{train,valid,test}_{R}x{C}x{D}.npy`` with masks ``m_*``
  (segmentation) or labels ``y_*`` (classification), memory-mapped (`discover_arrays`) and
  batched by `ArrayBatches`;
* a LUNA16-format candidates CSV beside a folder of volumes (classification): cubes centred on
  each candidate (`load_candidate_cubes`), cut once and cached (`discover_candidates`).

Imports: the standard library, NumPy, Keras (the batches are a ``keras.utils.PyDataset``),
tqdm, `finetune_cases`, `finetune_patches`, `volume_io` and `genesis_files`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from finetune_cases import (
    ARRAY_NAME,
    CACHE_VERSION,
    FinetuneInputError,
    cache_digest,
    file_stamp,
    list_visible,
    save_npy,
    split_ending,
)
from finetune_patches import crop_padded, one_hot
from genesis_files import atomic_path
from volume_io import (
    INTENSITY_MODES,
    VolumeError,
    image_to_array,
    normalise_intensity,
    read_image,
)

__all__ = [
    "ArrayBatches",
    "ArraySource",
    "CandidateSource",
    "discover_arrays",
    "discover_candidates",
    "load_candidate_cubes",
    "read_candidates",
]


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
    for name in list_visible(folder):
        m = ARRAY_NAME.match(name)
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
            y = one_hot(t.astype(np.int64), self.n_classes, -1)
        else:
            y = one_hot(np.rint(t).astype(np.int64), self.n_classes, 1)
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
    skipped: list[str] | None = None,
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
        skipped: None stops at a volume that cannot be used (training: `VolumeError`); a list
            skips its candidates instead, with a warning, and gets its message
            (``"{path}: {problem}"``) appended (predicting: the other volumes go on).

    Returns:
        (cubes float32 (N, R, C, D), labels int64 (N,) or None without a class column,
        ids ``"{seriesuid}:{row}"`` with the CSV's 0-based data row).

    Raises:
        VolumeError: a volume cannot be used (truncated, NaN voxels, not 3-D...) and `skipped`
            is None.

    Warns:
        UserWarning: for a candidate outside its volume, a seriesuid with no volume, or a volume
            that cannot be used when `skipped` is a list (skipped, named).
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
        try:
            image = read_image(volumes[uid])
        except VolumeError as exc:
            if skipped is None:
                raise
            skipped.append(str(exc))
            warnings.warn(
                f"Skipping the {len(by_uid[uid])} candidate(s) of {uid}: {exc}",
                UserWarning,
                stacklevel=2,
            )
            continue
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
        csvs = [n for n in list_visible(folder) if n.lower().endswith(".csv")]
        if len(csvs) != 1:
            raise FinetuneInputError(
                f"Expected one candidates CSV (seriesuid,coordX,coordY,coordZ,class) in {folder}. "
                f"Received: {csvs or 'none'}"
            )
        csv_path = os.path.join(folder, csvs[0])
    key = {
        "v": CACHE_VERSION,
        "csv": file_stamp(csv_path),
        "patch": list(patch),
        "mode": intensity,
    }
    base = os.path.join(cache_dir, f"candidates-{cache_digest(key)}")
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
        save_npy(base + "_cubes.npy", cubes)
        save_npy(base + "_labels.npy", labels)
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
