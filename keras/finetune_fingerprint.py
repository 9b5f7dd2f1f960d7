"""The data set's fingerprint: spacings, sizes, labelled objects and foreground intensities.

`finetune_plan` turns it into the fine-tuning plan (docs/finetuning.md, "The plan"). Measured
per case by `case_fingerprint` from arrays and a spacing, gathered by `dataset_fingerprint`
into plain JSON-ready data (``fingerprint.json``).

Standard library, NumPy and `volume_io`'s constants (no SimpleITK is loaded). Arrays are in
(x, y, z) order, as ``volume_io`` returns them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from volume_io import INTENSITY_MODES

__all__ = [
    "ALL_INTENSITY_MODES",
    "PLAN_INTENSITY_MODES",
    "PlanInputError",
    "case_fingerprint",
    "check_spacing",
    "dataset_fingerprint",
    "foreground_objects",
]

# Foreground voxels whose intensities each case contributes (nnU-Net draws 10,000 too).
SAMPLES_PER_CASE = 10_000
# A connected piece of a class smaller than this share of the case's largest piece of that class
# is a speck (a stray voxel of a contour) and does not count as an object.
SPECK_SHARE = 0.05
# At most this many objects per class and case are kept (the largest).
MAX_OBJECTS_PER_CASE = 50

# The modes that normalise intensities to the pre-trained weights' range, and the two that
# standardise them for training from scratch (volume_io applies all of them).
PLAN_INTENSITY_MODES = ("ct_foreground", "zscore")
VOLUME_INTENSITY_MODES = tuple(m for m in INTENSITY_MODES if m not in PLAN_INTENSITY_MODES)
ALL_INTENSITY_MODES = INTENSITY_MODES

FINGERPRINT_VERSION = 1


class PlanInputError(ValueError):
    """Bad input to the fingerprint or the plan (a shape, a spacing, an override)."""


def check_spacing(spacing: Any, what: str = "spacing") -> tuple[float, float, float]:
    """Check a voxel spacing: three positive finite numbers (x, y, z) in mm.

    Args:
        spacing: the value to check.
        what: its name in the error.

    Returns:
        The spacing as a tuple of floats.

    Raises:
        PlanInputError: anything else.
    """
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise PlanInputError(
            f"Expected {what} of three positive numbers (x, y, z) in mm. "
            f"Received: {what}={spacing!r}"
        )
    return values


# ------------------------------------------------------------------------------------------
# Objects: connected pieces of a class, found with NumPy alone
# ------------------------------------------------------------------------------------------


def _component_roots(mask: np.ndarray) -> np.ndarray:
    """The component of each True voxel of `mask` (6-connected), as the smallest flat index
    among its True voxels' ranks.

    Union-find on arrays: every neighbouring pair of True voxels is an edge; each round hooks the
    root of the larger label under the smaller one for every edge whose ends have different
    roots, then points every voxel straight at its root. Roots only move to smaller labels, so
    no cycle forms and every round merges at least two trees; it ends when every edge lies
    inside one tree, i.e. each tree is one connected piece.
    """
    n = int(mask.sum())
    ranks = np.full(mask.shape, -1, dtype=np.int64)
    ranks[mask] = np.arange(n, dtype=np.int64)
    us, vs = [], []
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        a, b = ranks[tuple(lo)], ranks[tuple(hi)]
        both = (a >= 0) & (b >= 0)
        us.append(a[both])
        vs.append(b[both])
    u, v = np.concatenate(us), np.concatenate(vs)
    parent = np.arange(n, dtype=np.int64)
    while True:
        pu, pv = parent[u], parent[v]
        open_ = pu != pv
        if not open_.any():
            return parent
        # An edge whose ends share a root stays inside that tree for good: drop it.
        u, v, pu, pv = u[open_], v[open_], pu[open_], pv[open_]
        low = np.minimum(pu, pv)
        np.minimum.at(parent, pu, low)
        np.minimum.at(parent, pv, low)
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up


def foreground_objects(mask: np.ndarray) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """The connected pieces (6-connected) of a 3D boolean mask, largest first.

    Args:
        mask: a 3D boolean array.

    Returns:
        One ``(low corner, high corner, voxel count)`` per piece, corners inclusive voxel
        indices (x, y, z); sorted by voxel count, largest first, then by low corner.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise PlanInputError(f"Expected a 3D mask. Received: shape={mask.shape}")
    where = np.argwhere(mask)
    if not len(where):
        return []
    # Work inside the mask's bounding box: the arrays below are as large as that box.
    start, stop = where.min(axis=0), where.max(axis=0) + 1
    crop = mask[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]
    roots = _component_roots(crop)
    coords = np.argwhere(crop)  # the same C order as the ranks
    order = np.argsort(roots, kind="stable")
    roots, coords = roots[order], coords[order]
    firsts = np.flatnonzero(np.r_[True, roots[1:] != roots[:-1]])
    counts = np.diff(np.r_[firsts, len(roots)])
    lows = np.minimum.reduceat(coords, firsts, axis=0) + start
    highs = np.maximum.reduceat(coords, firsts, axis=0) + start
    pieces = [
        (tuple(int(v) for v in lo), tuple(int(v) for v in hi), int(c))
        for lo, hi, c in zip(lows, highs, counts, strict=True)
    ]
    pieces.sort(key=lambda p: (-p[2], p[0]))
    return pieces


# ------------------------------------------------------------------------------------------
# Fingerprints
# ------------------------------------------------------------------------------------------


def case_fingerprint(
    image: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float],
    *,
    rng: np.random.Generator,
    case_id: str | None = None,
    n_samples: int = SAMPLES_PER_CASE,
) -> dict[str, Any]:
    """What the plan needs to know of one labelled case.

    Objects are the connected pieces of each class (6-connected), not each class's bounding
    box: a class made of several separate structures (two kidneys, scattered lesions) has
    objects of each structure's size, and the patch should see a structure, not the span of all
    of them. Pieces smaller than ``SPECK_SHARE`` of the class's largest piece in the case are
    specks of the contour and are left out.

    Args:
        image: (channels, X, Y, Z) or (X, Y, Z), raw intensities (HU for CT).
        label: (X, Y, Z) integer class map, 0 the background.
        spacing: (x, y, z) voxel spacing in mm.
        rng: draws the foreground voxels whose intensities are kept.
        case_id: a name for the case (kept in the fingerprint).
        n_samples: foreground intensities kept per channel: a random subset without
            replacement, or with replacement when the case has fewer foreground voxels, so
            every case weighs the same in the intensity statistics.

    Returns:
        A dict: ``case_id``, ``shape``, ``spacing``, ``size_mm``, ``n_channels``,
        ``class_voxels`` (class -> voxels, str keys), ``foreground_voxels``, ``objects`` (each
        ``{"class", "extent_mm", "voxels"}``, largest first per class) and
        ``intensity_samples`` (one list of floats per channel; empty without foreground).
    """
    image = np.asarray(image)
    label = np.asarray(label)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise PlanInputError(
            f"Expected an image of shape (channels, X, Y, Z) or (X, Y, Z). Received: "
            f"shape={image.shape} for case {case_id!r}"
        )
    if label.ndim != 3 or tuple(label.shape) != tuple(image.shape[1:]):
        raise PlanInputError(
            f"Expected a label of the image's spatial shape {tuple(image.shape[1:])}. Received: "
            f"shape={label.shape} for case {case_id!r}"
        )
    if not (np.issubdtype(label.dtype, np.integer) or label.dtype == np.bool_):
        raise PlanInputError(
            f"Expected an integer label map. Received: dtype={label.dtype} for case {case_id!r}"
        )
    spacing = check_spacing(spacing)
    if not isinstance(rng, np.random.Generator):
        raise PlanInputError(
            f"Expected rng to be a numpy.random.Generator. Received: {type(rng).__name__}"
        )
    if int(n_samples) < 0:
        raise PlanInputError(f"Expected n_samples >= 0. Received: n_samples={n_samples}")
    values, counts = np.unique(label, return_counts=True)
    if len(values) and values[0] < 0:
        raise PlanInputError(
            f"Expected label values >= 0. Received: {int(values[0])} in case {case_id!r}"
        )
    class_voxels = {str(int(c)): int(n) for c, n in zip(values, counts, strict=True) if c > 0}
    objects = []
    for c in (int(k) for k in class_voxels):
        pieces = foreground_objects(label == c)
        largest = pieces[0][2]
        kept = [p for p in pieces if p[2] >= SPECK_SHARE * largest][:MAX_OBJECTS_PER_CASE]
        for lo, hi, n in kept:
            extent = [(h - lo_ + 1) * s for lo_, h, s in zip(lo, hi, spacing, strict=True)]
            objects.append({"class": c, "extent_mm": [float(e) for e in extent], "voxels": n})
    foreground = np.flatnonzero(label.reshape(-1) > 0)
    samples: list[list[float]] = [[] for _ in range(image.shape[0])]
    if len(foreground) and n_samples:
        pick = rng.choice(len(foreground), int(n_samples), replace=len(foreground) < n_samples)
        where = foreground[pick]
        samples = [
            image[c].reshape(-1)[where].astype(np.float64).tolist() for c in range(len(image))
        ]
    return {
        "case_id": None if case_id is None else str(case_id),
        "shape": [int(v) for v in label.shape],
        "spacing": list(spacing),
        "size_mm": [float(n * s) for n, s in zip(label.shape, spacing, strict=True)],
        "n_channels": int(image.shape[0]),
        "class_voxels": class_voxels,
        "foreground_voxels": int(len(foreground)),
        "objects": objects,
        "intensity_samples": samples,
    }


def _extent_summary(extents: np.ndarray) -> dict[str, Any] | None:
    if not len(extents):
        return None
    out: dict[str, Any] = {"n": len(extents)}
    for name, q in (
        ("min", 0),
        ("p25", 25),
        ("median", 50),
        ("p75", 75),
        ("p90", 90),
        ("max", 100),
    ):
        out[name] = [float(v) for v in np.percentile(extents, q, axis=0)]
    return out


def dataset_fingerprint(case_fps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The data set's fingerprint: the cases' fingerprints gathered and summarised.

    JSON-ready (plain lists, floats and ints); the intensity samples are summarised, not kept.

    Args:
        case_fps: the `case_fingerprint` of every training case.

    Returns:
        A dict with ``n_cases``, ``n_channels``, ``case_ids``, ``classes``, per case
        ``spacings`` and ``shapes``, summaries ``spacing``, ``shape``, ``size_mm`` (median,
        10th percentile, min, max per axis), every object (``objects``: case, class, extent in
        mm, voxels), ``object_extent_mm`` (per class and ``"all"``: n, min, p25, median, p75,
        p90, max per axis, or None without objects) and ``intensity`` (per channel: n_samples,
        mean, std, min, max, percentile_00_5, median, percentile_99_5 of the foreground, or None
        without foreground).
    """
    case_fps = list(case_fps)
    if not case_fps:
        raise PlanInputError("Expected at least one case fingerprint. Received: none")
    channels = {int(fp["n_channels"]) for fp in case_fps}
    if len(channels) != 1:
        raise PlanInputError(
            f"Expected every case to have the same number of channels. Received: {sorted(channels)}"
        )
    spacings = np.array([fp["spacing"] for fp in case_fps], dtype=np.float64)
    shapes = np.array([fp["shape"] for fp in case_fps], dtype=np.int64)
    sizes = shapes * spacings
    ids = [fp.get("case_id") or f"case_{i}" for i, fp in enumerate(case_fps)]
    objects = [
        {"case": ids[i], **{k: o[k] for k in ("class", "extent_mm", "voxels")}}
        for i, fp in enumerate(case_fps)
        for o in fp["objects"]
    ]
    classes = sorted({int(c) for fp in case_fps for c in fp["class_voxels"]})
    extent_summaries = {
        "all": _extent_summary(np.array([o["extent_mm"] for o in objects]).reshape(-1, 3))
    }
    for c in classes:
        chosen = [o["extent_mm"] for o in objects if o["class"] == c]
        extent_summaries[str(c)] = _extent_summary(np.array(chosen).reshape(-1, 3))
    n_channels = channels.pop()
    intensity: list[dict[str, Any] | None] = []
    for c in range(n_channels):
        pooled = np.concatenate(
            [np.asarray(fp["intensity_samples"][c], dtype=np.float64) for fp in case_fps]
        )
        if not len(pooled):
            intensity.append(None)
            continue
        p005, p50, p995 = np.percentile(pooled, (0.5, 50.0, 99.5))
        intensity.append(
            {
                "n_samples": len(pooled),
                "mean": float(pooled.mean()),
                "std": float(pooled.std()),
                "min": float(pooled.min()),
                "max": float(pooled.max()),
                "percentile_00_5": float(p005),
                "median": float(p50),
                "percentile_99_5": float(p995),
            }
        )

    def summary(a: np.ndarray) -> dict[str, list[float]]:
        return {
            "median": [float(v) for v in np.median(a, axis=0)],
            "p10": [float(v) for v in np.percentile(a, 10, axis=0)],
            "min": [float(v) for v in a.min(axis=0)],
            "max": [float(v) for v in a.max(axis=0)],
        }

    return {
        "version": FINGERPRINT_VERSION,
        "n_cases": len(case_fps),
        "n_channels": n_channels,
        "case_ids": ids,
        "classes": classes,
        "spacings": spacings.tolist(),
        "shapes": shapes.tolist(),
        "spacing": summary(spacings),
        "shape": summary(shapes.astype(np.float64)),
        "size_mm": summary(sizes),
        "foreground_voxels": int(sum(fp["foreground_voxels"] for fp in case_fps)),
        "objects": objects,
        "object_extent_mm": extent_summaries,
        "intensity": intensity,
    }
