"""`finetune.py evaluate`: score predictions against labels.

Segmentation: per case and per foreground class, Dice and IoU of the label maps, and the
original's ``mean_iou`` (the mean over thresholds 0.5, 0.55, .., 0.95 of the two-class mean IoU
between ``prediction > t`` and the truth, background included), from the saved probabilities
when predict wrote them, else from the label map's one-hot. Mean and median over cases; a JSON
report, a CSV beside it, and a PNG per case (the axial slice with the most foreground, with
the label's and the prediction's outlines, drawn with matplotlib).

Classification: ROC AUC (the Mann-Whitney statistic, ties counted one half) and accuracy from
the CSV that predict writes, and the ROC curve as a PNG.

Definitions that matter when comparing figures: two empty masks have Dice 1.0 and IoU 1.0 (the
prediction is exactly right); ``mean_iou``'s per-threshold score averages only the classes
present in the truth or the prediction, as ``tf.metrics.mean_iou`` did.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

import volume_io as vio
from finetune_predict import CLASSIFICATION_CSV, image_ending
from genesis_files import atomic_path

__all__ = [
    "EvaluateInputError",
    "EvaluateSettings",
    "MEAN_IOU_THRESHOLDS",
    "accuracy",
    "add_evaluate_arguments",
    "dice_iou",
    "evaluate",
    "evaluate_classification",
    "evaluate_segmentation",
    "mean_iou",
    "roc_auc",
    "roc_curve",
]

MEAN_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))

DESCRIPTION = """\
Score predictions against labels.

Segmentation: label maps in PRED_DIR paired by case with LABEL_DIR ({case}{ext} in both).
Per case and per foreground class: Dice, IoU and the original's mean_iou (background included,
thresholds 0.5..0.95; from {case}.npz probabilities when predict saved them). Writes
REPORT.json, REPORT.csv beside it and REPORT_png/{case}.png (the axial slice with the most
foreground: label outline green, prediction outline red and dashed, on the image with --images).

Classification: --predictions is the CSV predict wrote (or its folder); labels come from its
label column, or --labels y.npy / a candidates CSV with a class column. Writes ROC AUC and
accuracy to REPORT.json and the ROC curve to REPORT_roc.png."""

EPILOG = """\
examples:
  python keras/finetune.py evaluate --predictions predictions/sts \\
      --labels ../shared/data/sts_ct/labelsTr --images ../shared/data/sts_ct/imagesTr \\
      --output reports/sts.json
  python keras/finetune.py evaluate --predictions pred/nodules.csv --output reports/nodules.json"""


class EvaluateInputError(ValueError):
    """Bad input to evaluate, raised where it is checked: the command line exits with 2."""


@dataclasses.dataclass
class EvaluateSettings:
    """The settings of ``finetune.py evaluate``: one field per flag (`add_evaluate_arguments`).

    Attributes:
        predictions: predict's output folder (classification: its CSV, or its folder).
        output: the JSON report.
        labels: the folder of true label maps (classification: y .npy or a candidates CSV);
            None: classification reads the CSV's label column.
        images: images to draw the outlines on; None: a black background.
        dataset_json: class names; None: dataset.json beside ``labels``, else class_{value}.
        no_png: write no pictures.
    """

    predictions: str
    output: str
    labels: str | None = None
    images: str | None = None
    dataset_json: str | None = None
    no_png: bool = False


def _read_image(path: str) -> np.ndarray:
    """The (x, y, z) voxels of an image file; its reader's refusals typed as ours."""
    try:
        return vio.image_to_array(vio.read_image(path))
    except (FileNotFoundError, vio.VolumeError) as exc:  # the reader's checks, naming the file
        raise EvaluateInputError(str(exc)) from exc


def _read_geometry(path: str) -> vio.Geometry:
    """The geometry of an image file (its header); its reader's refusals typed as ours."""
    try:
        return vio.read_geometry(path)
    except (FileNotFoundError, vio.VolumeError) as exc:  # the reader's checks, naming the file
        raise EvaluateInputError(str(exc)) from exc


# --------------------------------------------------------------------------------------------
# Metric definitions
# --------------------------------------------------------------------------------------------


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice ``2|P&T| / (|P| + |T|)`` and IoU ``|P&T| / |P|T|`` of two binary masks.

    Args:
        pred: the predicted mask (anything non-zero is foreground).
        truth: the true mask, same shape.

    Returns:
        (dice, iou); both 1.0 when both masks are empty.
    """
    p = np.asarray(pred).astype(bool, copy=False)
    t = np.asarray(truth).astype(bool, copy=False)
    inter = int(np.count_nonzero(p & t))
    n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    if n_p + n_t == 0:
        return 1.0, 1.0
    union = n_p + n_t - inter
    return 2.0 * inter / (n_p + n_t), inter / union


def mean_iou(truth: np.ndarray, pred: np.ndarray) -> float:
    """The original's ``mean_iou``: the mean over thresholds 0.5..0.95 of the two-class mean IoU.

    For each threshold t the prediction is ``pred > t`` and the truth ``truth > 0.5``; the IoU
    of the foreground and of the background are averaged over those present in either mask.

    Args:
        truth: binary truth (0/1).
        pred: probabilities of the foreground (or a 0/1 one-hot of a label map).

    Returns:
        The score in [0, 1].
    """
    g = np.asarray(truth).reshape(-1) > 0.5
    p = np.asarray(pred, dtype=np.float32).reshape(-1)
    n = g.size
    n_g = int(np.count_nonzero(g))
    scores = []
    for t in MEAN_IOU_THRESHOLDS:
        q = p > t
        inter_fg = int(np.count_nonzero(q & g))
        n_q = int(np.count_nonzero(q))
        union_fg = n_q + n_g - inter_fg
        # Background: the complement of both masks.
        inter_bg = n - union_fg
        union_bg = n - inter_fg
        ious = [i / u for i, u in ((inter_fg, union_fg), (inter_bg, union_bg)) if u > 0]
        scores.append(sum(ious) / len(ious) if ious else 0.0)
    return float(np.mean(scores))


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve: the chance a random positive outscores a random negative.

    Computed from ranks (ties averaged, so a tie counts one half), in O(n log n).

    Args:
        labels: 0/1 truth.
        scores: the positive class's scores.

    Returns:
        The AUC in [0, 1].

    Raises:
        EvaluateInputError: when only one class is present.
    """
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int(np.count_nonzero(y == 1))
    n_neg = int(np.count_nonzero(y == 0))
    if n_pos == 0 or n_neg == 0:
        raise EvaluateInputError(
            "Expected both classes among the labels for ROC AUC. Received: "
            f"{n_pos} positive and {n_neg} negative"
        )
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # Average 1-based rank over each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    rank_sum = ranks[y == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve's points, from (0, 0) to (1, 1), one per distinct score.

    Args:
        labels: 0/1 truth.
        scores: the positive class's scores.

    Returns:
        (false positive rates, true positive rates).
    """
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tp = np.cumsum(y == 1)[last]
    fp = np.cumsum(y == 0)[last]
    n_pos, n_neg = max(int(np.sum(y == 1)), 1), max(int(np.sum(y == 0)), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def accuracy(labels: Sequence[int], predicted: Sequence[int]) -> float:
    """The fraction of predictions equal to the labels.

    Args:
        labels: the true classes.
        predicted: the predicted classes.

    Returns:
        The accuracy in [0, 1].
    """
    y = np.asarray(labels).reshape(-1)
    p = np.asarray(predicted).reshape(-1)
    return float(np.mean(y == p)) if y.size else float("nan")


# --------------------------------------------------------------------------------------------
# Pictures (matplotlib, Agg)
# --------------------------------------------------------------------------------------------

# Outline colours of the case pictures (the legend names them).
LABEL_COLOUR, PREDICTION_COLOUR = "#00ff00", "#ff0000"


def _figure(size: tuple[float, float]) -> Any:
    """A matplotlib figure drawn by the Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Any, path: str) -> None:
    """Write the figure as a PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def most_foreground_slice(truth: np.ndarray, pred: np.ndarray) -> int:
    """The axial (z) slice with the most foreground in the truth (else in the prediction).

    Args:
        truth: the label map (x, y, z).
        pred: the predicted label map.

    Returns:
        The z index (the middle one when both are empty).
    """
    for m in (truth, pred):
        counts = np.count_nonzero(m.reshape(-1, m.shape[2]), axis=0)
        if counts.max() > 0:
            return int(np.argmax(counts))
    return truth.shape[2] // 2


def _grey_range(slice_xy: np.ndarray) -> tuple[float, float]:
    # The 1st to 99th percentile: a few very bright or dark voxels do not wash the slice out.
    lo, hi = (float(v) for v in np.percentile(slice_xy, [1, 99]))
    return lo, hi if hi > lo else lo + 1.0


def save_case_png(
    path: str,
    truth: np.ndarray,
    pred: np.ndarray,
    image: np.ndarray | None = None,
    title: str = "",
) -> int:
    """Draw the slice with the most foreground: the image in grey, outlines of truth and prediction.

    The label's outline is green, the prediction's red and dashed; the legend names them. The
    title gives the case, the slice and the foreground Dice on the slice and over the volume.
    x runs across the picture, y down.

    Args:
        path: the PNG to write (atomically).
        truth: the label map (x, y, z).
        pred: the predicted label map.
        image: the image on the same grid, or None for a black background.
        title: the case's name.

    Returns:
        The z index drawn.
    """
    from matplotlib.lines import Line2D

    z = most_foreground_slice(truth, pred)
    t, p = truth[:, :, z].T > 0, pred[:, :, z].T > 0
    background = np.zeros(t.shape, np.float32) if image is None else image[:, :, z].T
    lo, hi = _grey_range(background) if image is not None else (0.0, 1.0)
    fig = _figure((5, 4))
    ax = fig.add_subplot()
    ax.imshow(background, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    for mask, colour, style in ((t, LABEL_COLOUR, "solid"), (p, PREDICTION_COLOUR, "dashed")):
        if 0 < np.count_nonzero(mask) < mask.size:  # a contour needs both sides
            ax.contour(mask, levels=[0.5], colors=[colour], linewidths=1.5, linestyles=style)
    ax.legend(
        handles=[
            Line2D([], [], color=LABEL_COLOUR, lw=1.5, label="label"),
            Line2D([], [], color=PREDICTION_COLOUR, lw=1.5, ls="--", label="prediction"),
        ],
        loc="upper right",
        fontsize=8,
        framealpha=0.8,
    )
    slice_dice = dice_iou(p, t)[0]
    volume_dice = dice_iou(pred > 0, truth > 0)[0]
    name = f"{title}: " if title else ""
    ax.set_title(
        f"{name}slice z={z}, Dice {slice_dice:.3f} (volume {volume_dice:.3f})", fontsize=10
    )
    ax.set_xlabel("x (voxels)")
    ax.set_ylabel("y (voxels)")
    _save_png(fig, path)
    return z


def save_roc_png(path: str, fpr: np.ndarray, tpr: np.ndarray, auc: float) -> None:
    """Draw the ROC curve (with the chance diagonal and the AUC) as a PNG, atomically.

    Args:
        path: the PNG.
        fpr: false positive rates.
        tpr: true positive rates.
        auc: the area, in the legend and the title.
    """
    fig = _figure((5, 4))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="chance (AUC 0.5)")
    ax.plot(fpr, tpr, color="tab:blue", lw=2, drawstyle="default", label=f"ROC (AUC {auc:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC curve, AUC = {auc:.3f}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save_png(fig, path)


# --------------------------------------------------------------------------------------------
# Pairing the files
# --------------------------------------------------------------------------------------------


def _case_files(folder: str, what: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise EvaluateInputError(f"Expected a folder of {what}. Received: {folder!r}")
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        ending = image_ending(name)
        if name.startswith(".") or not os.path.isfile(path) or ending in ("", ".npz", ".raw"):
            continue
        if ending in (".json", ".csv", ".png", ".txt", ".md", ".zraw"):
            continue
        found[name[: -len(ending)]] = path
    return found


def pair_cases(predictions: str, labels: str) -> list[tuple[str, str, str]]:
    """(case, prediction file, label file) for every case, matched by name without the ending.

    Args:
        predictions: the folder predict wrote.
        labels: the folder of true label maps.

    Returns:
        The sorted triples.

    Raises:
        EvaluateInputError: naming the cases that have a prediction but no label, or a label but
            no prediction.
    """
    pred = _case_files(predictions, "predicted label maps")
    truth = _case_files(labels, "label maps")
    no_label = sorted(set(pred) - set(truth))
    no_pred = sorted(set(truth) - set(pred))
    problems = []
    if no_label:
        problems.append(
            f"prediction(s) without a label in {labels}: "
            + ", ".join(os.path.basename(pred[c]) for c in no_label)
        )
    if no_pred:
        problems.append(
            f"label(s) without a prediction in {predictions}: "
            + ", ".join(os.path.basename(truth[c]) for c in no_pred)
        )
    if problems:
        raise EvaluateInputError(
            "Expected one prediction per label, paired by case. Received: " + "; ".join(problems)
        )
    if not pred:
        raise EvaluateInputError(f"Expected label maps in {predictions}. Received: none")
    return [(c, pred[c], truth[c]) for c in sorted(pred)]


def _find_image(folder: str, case: str) -> str | None:
    for name in sorted(os.listdir(folder)):
        ending = image_ending(name)
        if ending and name[: -len(ending)] in (f"{case}_0000", case):
            return os.path.join(folder, name)
    return None


def _class_names(
    dataset_json: str | None, labels: str, triples: list[tuple[str, str, str]]
) -> dict[int, str]:
    """dataset.json's foreground labels, else every non-zero value found in the files."""
    path = dataset_json
    if path is None:
        guess = os.path.join(os.path.dirname(os.path.abspath(labels)), "dataset.json")
        path = guess if os.path.isfile(guess) else None
    if path:
        try:
            with open(path) as f:
                names = {int(v): str(k) for k, v in json.load(f)["labels"].items() if int(v) != 0}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # parsing it
            raise EvaluateInputError(
                f"Expected a dataset.json with a labels dict. Received: {path!r} ({e})"
            ) from None
        return dict(sorted(names.items()))
    values: set[int] = set()
    for _, pred_path, label_path in triples:
        for p in (pred_path, label_path):
            values |= {int(v) for v in np.unique(_read_image(p))}
    return {v: f"class_{v}" for v in sorted(values - {0})}


# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


def _load_probabilities(pred_path: str, case: str) -> dict[int, np.ndarray] | None:
    path = os.path.join(os.path.dirname(pred_path), case + ".npz")
    if not os.path.isfile(path):
        return None
    with np.load(path) as f:
        probs, values = f["probabilities"], f["class_values"]
    return {int(v): probs[i] for i, v in enumerate(values)}


def check_pairs(triples: list[tuple[str, str, str]], images: str | None) -> dict[str, str | None]:
    """Check every pair's grid (headers only) before scoring any, and find each case's image.

    Args:
        triples: from `pair_cases`.
        images: the folder of images to draw on, or None.

    Returns:
        case -> its image file (None without ``images``).

    Raises:
        EvaluateInputError: a prediction off its label's grid (naming both files and the
            field), a missing image, or an image of another size.
    """
    found: dict[str, str | None] = {}
    for case, pred_path, label_path in triples:
        truth_grid = _read_geometry(label_path)
        diffs = _read_geometry(pred_path).differences(truth_grid)
        if diffs:
            raise EvaluateInputError(
                f"Expected the prediction on its label's grid. Received: {pred_path} and "
                f"{label_path} differ in {'; '.join(diffs)}"
            )
        found[case] = None
        if images:
            image_path = _find_image(images, case)
            if image_path is None:
                raise EvaluateInputError(
                    f"Expected an image of case {case!r} ({case}_0000 or {case} with an "
                    f"image ending) in --images. Received: none in {images}"
                )
            image_grid = _read_geometry(image_path)
            if image_grid.size != truth_grid.size:
                raise EvaluateInputError(
                    f"Expected {image_path} on the grid of {label_path}. Received: size "
                    f"{image_grid.size} vs {truth_grid.size}"
                )
            found[case] = image_path
    return found


def score_case(
    case: str, pred: np.ndarray, truth: np.ndarray, classes: dict[int, str], probs: Any
) -> list[dict[str, Any]]:
    """One row per class: Dice, IoU and mean_iou of a case.

    Args:
        case: its name.
        pred, truth: the label maps.
        classes: value -> name of the foreground classes.
        probs: value -> probabilities, or None (mean_iou from the label map).

    Returns:
        The rows of the report.
    """
    rows = []
    for value, name in classes.items():
        t, p = truth == value, pred == value
        dice, iou = dice_iou(p, t)
        soft = probs.get(value) if probs else None
        rows.append(
            {
                "case": case,
                "class": name,
                "value": value,
                "dice": dice,
                "iou": iou,
                "mean_iou": mean_iou(t, soft if soft is not None else p),
                "mean_iou_from": "probabilities" if soft is not None else "label map",
                "truth_voxels": int(np.count_nonzero(t)),
                "predicted_voxels": int(np.count_nonzero(p)),
            }
        )
    return rows


def _summary(results: list[dict[str, Any]], classes: dict[int, str]) -> dict[str, Any]:
    summary = {}
    for value, name in classes.items():
        mine = [r for r in results if r["value"] == value]
        summary[name] = {
            key: {
                "mean": float(np.mean([r[key] for r in mine])),
                "median": float(statistics.median([r[key] for r in mine])),
            }
            for key in ("dice", "iou", "mean_iou")
        }
    return summary


def evaluate_segmentation(settings: EvaluateSettings) -> dict[str, Any]:
    """Score every case; write the JSON, the CSV and the PNGs.

    Args:
        settings: the command's settings (``labels`` is needed).

    Returns:
        The report written to ``settings.output``.

    Raises:
        EvaluateInputError: bad input, raised where it is checked.
    """
    from tqdm import tqdm

    if settings.labels is None:
        raise EvaluateInputError(
            "Expected --labels LABEL_DIR for segmentation. Received: no --labels"
        )
    triples = pair_cases(settings.predictions, settings.labels)
    images = check_pairs(triples, None if settings.no_png else settings.images)
    stem = os.path.splitext(settings.output)[0]
    png_dir = stem + "_png"
    if not settings.no_png:
        os.makedirs(png_dir, exist_ok=True)
    classes = _class_names(settings.dataset_json, settings.labels, triples)
    results = []
    for case, pred_path, label_path in tqdm(triples, desc="evaluate", unit="case"):
        # One case in memory at a time.
        pred, truth = _read_image(pred_path), _read_image(label_path)
        results += score_case(case, pred, truth, classes, _load_probabilities(pred_path, case))
        if not settings.no_png:
            image = None if images[case] is None else _read_image(images[case])
            save_case_png(os.path.join(png_dir, case + ".png"), truth, pred, image, title=case)
    report = {
        "task": "segmentation",
        "predictions": os.path.abspath(settings.predictions),
        "labels": os.path.abspath(settings.labels),
        "n_cases": len(triples),
        "classes": {name: value for value, name in classes.items()},
        "summary": _summary(results, classes),
        "cases": results,
        "definitions": {
            "dice": "2|P&T| / (|P| + |T|); 1.0 when both are empty",
            "iou": "|P&T| / |P or T|; 1.0 when both are empty",
            "mean_iou": "mean over t = 0.5, 0.55, .., 0.95 of the mean IoU of foreground and "
            "background between pred > t and the truth (classes present in either)",
        },
    }
    _write_json(settings.output, report)
    columns = ["case", "class", "value", "dice", "iou", "mean_iou", "mean_iou_from"]
    columns += ["truth_voxels", "predicted_voxels"]
    _write_csv(stem + ".csv", columns, results)
    return report


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def _numbers(path: str, column: str, values: Sequence[str], kind: type) -> list:
    """The CSV column's values as numbers; a value that is not one is refused naming it."""
    out = []
    for i, v in enumerate(values):
        try:
            out.append(kind(float(v)))
        except (TypeError, ValueError):
            raise EvaluateInputError(
                f"Expected numbers in column {column!r} of {path}. Received: {v!r} in data "
                f"row {i + 1}"
            ) from None
    return out


def _read_prediction_csv(path: str) -> tuple[list[str], np.ndarray, list[str] | None]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        prob_cols = [c for c in fields if c.startswith("prob_")]
        if "id" not in fields or not prob_cols:
            raise EvaluateInputError(
                f"Expected a CSV with id and prob_* columns (as predict writes). Received: "
                f"{path!r} with columns {fields}"
            )
        rows = list(reader)
    ids = [r["id"] for r in rows]
    columns = [_numbers(path, c, [r[c] for r in rows], float) for c in prob_cols]
    probs = np.array(columns, dtype=np.float64).T
    labels = [r["label"] for r in rows] if "label" in fields else None
    return ids, probs.reshape(len(rows), len(prob_cols)), labels


def _classification_labels(
    labels: str | None, predictions: str, ids: list[str], own: list[str] | None
) -> np.ndarray:
    """The true class of each prediction: from ``labels`` (.npy or candidates CSV), else the
    prediction CSV's own label column."""
    if labels is None:
        if own is None:
            raise EvaluateInputError(
                f"Expected --labels (y .npy or candidates .csv) or a label column in "
                f"{predictions}. Received: neither"
            )
        return np.array(_numbers(predictions, "label", own, int), dtype=np.int64)
    if not os.path.isfile(labels):
        raise EvaluateInputError(f"Expected a labels file. Received: {labels!r} not found")
    if labels.lower().endswith(".npy"):
        try:
            y = np.load(labels).reshape(-1).astype(np.int64)
        except (OSError, ValueError, EOFError) as exc:  # truncated, pickled or not .npy
            raise EvaluateInputError(
                f"Expected a NumPy .npy array of labels in {labels}. Received: {exc}"
            ) from exc
        if y.shape[0] != len(ids):
            raise EvaluateInputError(
                f"Expected {len(ids)} labels (one per prediction in {predictions}). "
                f"Received: {y.shape[0]} in {labels}"
            )
        return y
    with open(labels, newline="") as f:
        reader = csv.DictReader(f)
        if "class" not in (reader.fieldnames or []) or "seriesuid" not in reader.fieldnames:
            raise EvaluateInputError(
                f"Expected a candidates CSV with seriesuid and class columns. Received: "
                f"{labels!r} with columns {reader.fieldnames}"
            )
        rows = list(reader)
    classes = _numbers(labels, "class", [r["class"] for r in rows], int)
    by_id = {f"{r['seriesuid']}:{i}": c for i, (r, c) in enumerate(zip(rows, classes, strict=True))}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise EvaluateInputError(
            f"Expected a label in {labels} for every prediction. Received: none for "
            f"{', '.join(missing[:5])}" + (" .." if len(missing) > 5 else "")
        )
    return np.array([by_id[i] for i in ids], dtype=np.int64)


def evaluate_classification(settings: EvaluateSettings) -> dict[str, Any]:
    """ROC AUC and accuracy of predict's CSV; write the JSON and the ROC PNG.

    Args:
        settings: the command's settings.

    Returns:
        The report written to ``settings.output``.

    Raises:
        EvaluateInputError: bad input, raised where it is checked.
    """
    path = settings.predictions
    if os.path.isdir(path):
        path = os.path.join(path, CLASSIFICATION_CSV)
    if not os.path.isfile(path):
        raise EvaluateInputError(f"Expected predict's CSV. Received: {path!r} not found")
    ids, probs, own = _read_prediction_csv(path)
    y = _classification_labels(settings.labels, settings.predictions, ids, own)
    k = probs.shape[1]
    predicted = (probs[:, 0] >= 0.5).astype(np.int64) if k == 1 else np.argmax(probs, axis=1)
    report: dict[str, Any] = {
        "task": "classification",
        "predictions": os.path.abspath(path),
        "n": len(ids),
        "accuracy": accuracy(y, predicted),
    }
    stem = os.path.splitext(settings.output)[0]
    if k <= 2:
        score = probs[:, 0] if k == 1 else probs[:, 1]
        auc = roc_auc(y, score)
        report["roc_auc"] = auc
        fpr, tpr = roc_curve(y, score)
        if not settings.no_png:
            save_roc_png(stem + "_roc.png", fpr, tpr, auc)
    else:
        # More classes: one-vs-rest AUC per class present, and their mean.
        per_class = {}
        for c in range(k):
            yc = (y == c).astype(np.int64)
            if 0 < yc.sum() < len(yc):
                per_class[str(c)] = roc_auc(yc, probs[:, c])
        report["roc_auc_per_class"] = per_class
        report["roc_auc"] = float(np.mean(list(per_class.values()))) if per_class else None
    report["definitions"] = {
        "roc_auc": "P(score of a positive > score of a negative), ties counted 1/2",
        "accuracy": "fraction with argmax of the probabilities (or p >= 0.5) equal to the label",
    }
    _write_json(settings.output, report)
    return report


# --------------------------------------------------------------------------------------------
# Writing and the command
# --------------------------------------------------------------------------------------------


def _write_json(path: str, obj: Any) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _write_csv(path: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(buf.getvalue())


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``evaluate`` flags (and its description and example) to `parser`.

    Args:
        parser: the subcommand's parser.
    """
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.add_argument(
        "--predictions",
        required=True,
        metavar="PRED_DIR",
        help="predict's output folder (classification: its CSV or folder)",
    )
    parser.add_argument(
        "--labels",
        default=None,
        metavar="LABEL_DIR",
        help="folder of true label maps (classification: y .npy or candidates .csv, optional)",
    )
    parser.add_argument("--output", required=True, metavar="REPORT.json", help="the JSON report")
    parser.add_argument(
        "--images", default=None, metavar="DIR", help="images to draw the outlines on"
    )
    parser.add_argument(
        "--dataset_json",
        default=None,
        help="class names (default: dataset.json beside LABEL_DIR, else class_{value})",
    )
    parser.add_argument("--no_png", action="store_true", help="write no pictures")


def is_classification(predictions: str) -> bool:
    """Whether ``--predictions`` names predict's classification CSV (or a folder holding it)."""
    return predictions.lower().endswith(".csv") or (
        os.path.isdir(predictions) and os.path.isfile(os.path.join(predictions, CLASSIFICATION_CSV))
    )


def evaluate(settings: EvaluateSettings) -> dict[str, Any]:
    """``finetune.py evaluate``: score the predictions, write the report, print its summary.

    Args:
        settings: the command's settings.

    Returns:
        The report.

    Raises:
        EvaluateInputError: bad input, raised where it is checked; the command line prints it
            in one line and exits with 2. Other errors keep their type.
    """
    if is_classification(settings.predictions):
        report = evaluate_classification(settings)
        print(
            f"accuracy {report['accuracy']:.4f}, ROC AUC {report['roc_auc']}; "
            f"wrote {settings.output}"
        )
        return report
    report = evaluate_segmentation(settings)
    for name, s in report["summary"].items():
        print(
            f"{name}: Dice mean {s['dice']['mean']:.4f} median {s['dice']['median']:.4f}, "
            f"IoU mean {s['iou']['mean']:.4f}, mean_iou {s['mean_iou']['mean']:.4f}"
        )
    print(f"wrote {settings.output} for {report['n_cases']} case(s)")
    return report
