"""finetune_metrics: the metric definitions against hand values and slow references, the report
files and pictures, and bad input."""

from __future__ import annotations

import argparse
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

import finetune
import finetune_metrics as fm
import unet3d
from finetune_helpers import write_xyz

# --------------------------------------------------------------------------------------------
# Definitions
# --------------------------------------------------------------------------------------------


def test_dice_iou_hand_values():
    p = np.zeros((4, 4, 2), bool)
    t = np.zeros((4, 4, 2), bool)
    p[0, 0, 0] = p[0, 1, 0] = p[0, 2, 0] = True  # 3 voxels
    t[0, 2, 0] = t[3, 3, 1] = True  # 2 voxels, 1 shared
    dice, iou = fm.dice_iou(p, t)
    assert dice == pytest.approx(2 * 1 / (3 + 2))
    assert iou == pytest.approx(1 / 4)
    assert fm.dice_iou(np.zeros(5), np.zeros(5)) == (1.0, 1.0)  # empty vs empty
    assert fm.dice_iou(np.ones(5), np.zeros(5)) == (0.0, 0.0)
    assert fm.dice_iou(t, t) == (1.0, 1.0)


def _mean_iou_slow(truth, pred):
    """Per threshold: the confusion matrix counted voxel by voxel, then the mean class IoU."""
    g = [bool(v > 0.5) for v in np.ravel(truth)]
    scores = []
    for k in range(10):
        t = 0.5 + 0.05 * k
        q = [bool(v > t) for v in np.ravel(pred)]
        ious = []
        for cls in (True, False):
            inter = sum(1 for a, b in zip(q, g, strict=True) if a == cls and b == cls)
            union = sum(1 for a, b in zip(q, g, strict=True) if a == cls or b == cls)
            if union:
                ious.append(inter / union)
        scores.append(sum(ious) / len(ious))
    return sum(scores) / len(scores)


def test_mean_iou_hand_and_slow_values():
    # Probabilities 0.52, 0.7, 0.97 on foreground voxels, 0.1 and 0.6 on background ones.
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    pred = np.array([0.52, 0.7, 0.97, 0.1, 0.6, 0.1, 0.1, 0.1])
    # t = 0.5: pred fg = {0,1,2,4}: fg IoU 3/4, bg IoU 4/5 -> 0.775.
    # t = 0.55, 0.6: pred fg = {1,2,4} (0.6 > 0.6 is false at t=0.6 -> {1,2}).
    t05 = (3 / 4 + 4 / 5) / 2
    t055 = (2 / 4 + 4 / 6) / 2
    t060_to_065 = (2 / 3 + 5 / 6) / 2  # {1, 2}: fg 2/3, bg 5/6
    t070_to_095 = (1 / 3 + 5 / 7) / 2  # {2}: fg 1/3, bg 5/7
    hand = (t05 + t055 + 2 * t060_to_065 + 6 * t070_to_095) / 10
    assert fm.mean_iou(truth, pred) == pytest.approx(hand)
    rng = np.random.default_rng(0)
    for _ in range(3):
        t = rng.random(60) > 0.6
        p = np.clip(t * 0.4 + rng.random(60) * 0.7, 0, 1)
        assert fm.mean_iou(t, p) == pytest.approx(_mean_iou_slow(t, p))
    # All background, predicted so: only the background class is present -> 1.0.
    assert fm.mean_iou(np.zeros(10), np.zeros(10)) == pytest.approx(1.0)


@pytest.mark.multibackend
def test_mean_iou_agrees_with_the_keras_metric():
    rng = np.random.default_rng(1)
    t = (rng.random((2, 8, 8, 4)) > 0.7).astype(np.float32)
    p = np.clip(0.5 * t + 0.6 * rng.random(t.shape), 0, 1).astype(np.float32)
    keras_value = float(unet3d.mean_iou(t, p))
    assert fm.mean_iou(t, p) == pytest.approx(keras_value, abs=1e-6)


def _auc_slow(y, s):
    pos = [b for a, b in zip(y, s, strict=True) if a == 1]
    neg = [b for a, b in zip(y, s, strict=True) if a == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_roc_auc_against_pairwise_count_with_ties():
    rng = np.random.default_rng(2)
    for _ in range(5):
        y = rng.integers(0, 2, 40)
        y[:2] = [0, 1]
        s = np.round(rng.random(40) + 0.3 * y, 1)  # rounded: many ties
        assert fm.roc_auc(y, s) == pytest.approx(_auc_slow(list(y), list(s)))
    assert fm.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert fm.roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert fm.roc_auc([0, 1], [0.5, 0.5]) == 0.5
    with pytest.raises(fm.EvaluateInputError, match="both classes"):
        fm.roc_auc([1, 1], [0.2, 0.3])


def test_roc_curve_area_is_the_auc():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 50)
    s = np.round(rng.random(50) + 0.4 * y, 1)
    fpr, tpr = fm.roc_curve(y, s)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(_auc_slow(list(y), list(s)))


def test_accuracy():
    assert fm.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75


# --------------------------------------------------------------------------------------------
# Segmentation reports
# --------------------------------------------------------------------------------------------


def eval_args(predictions, labels, output, **kw):
    """The flags of `finetune.py evaluate` (keyword flags: True for a switch, else a value)."""
    argv = ["--predictions", str(predictions), "--output", str(output)]
    if labels is not None:
        argv += ["--labels", str(labels)]
    for k, v in kw.items():
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return argv


def run_evaluate(argv):
    """`finetune.py evaluate` with these flags: its exit status."""
    return finetune.main(["evaluate", *argv])


def _cases(tmp_path):
    """Two cases with hand-countable overlaps, and a third with nothing in either."""
    labels, preds, images = (tmp_path / n for n in ("labels", "pred", "images"))
    for d in (labels, preds, images):
        d.mkdir()
    shape = (10, 8, 6)
    t1 = np.zeros(shape, np.uint8)
    t1[2:6, 2:6, 3] = 1  # 16 voxels on slice z=3
    t1[2:4, 2:4, 1] = 1  # 4 voxels on z=1
    p1 = np.zeros(shape, np.uint8)
    p1[2:6, 2:4, 3] = 1  # 8 voxels, all inside the truth
    t2 = np.zeros(shape, np.uint8)
    t2[0:2, 0:2, 0:2] = 1  # 8 voxels
    p2 = np.zeros(shape, np.uint8)
    p2[5:7, 5:7, 4:6] = 1  # 8 voxels, disjoint
    empty = np.zeros(shape, np.uint8)
    for case, t, p in (("a", t1, p1), ("b", t2, p2), ("c", empty, empty)):
        write_xyz(t, labels / f"{case}.nii.gz")
        write_xyz(p, preds / f"{case}.nii.gz")
        write_xyz(np.full(shape, -500, np.int16), images / f"{case}_0000.nii.gz")
    return labels, preds, images


def test_segmentation_report_hand_values(tmp_path):
    labels, preds, images = _cases(tmp_path)
    report_path = tmp_path / "out" / "report.json"
    assert run_evaluate(eval_args(preds, labels, report_path, images=images)) == 0
    report = json.loads(report_path.read_text())
    by_case = {r["case"]: r for r in report["cases"]}
    assert set(by_case) == {"a", "b", "c"} and report["n_cases"] == 3
    # a: |P|=8, |T|=20, |P&T|=8 -> Dice 16/28, IoU 8/20.
    assert by_case["a"]["dice"] == pytest.approx(16 / 28)
    assert by_case["a"]["iou"] == pytest.approx(8 / 20)
    assert by_case["b"]["dice"] == 0.0 and by_case["b"]["iou"] == 0.0
    assert by_case["c"]["dice"] == 1.0 and by_case["c"]["iou"] == 1.0  # empty vs empty
    # mean_iou of a label map (the same at every threshold): fg 8/20, bg 460/472 (480 voxels).
    assert by_case["a"]["mean_iou"] == pytest.approx((8 / 20 + 460 / 472) / 2)
    assert by_case["a"]["mean_iou_from"] == "label map"
    summary = report["summary"]["class_1"]
    dices = [16 / 28, 0.0, 1.0]
    assert summary["dice"]["mean"] == pytest.approx(np.mean(dices))
    assert summary["dice"]["median"] == pytest.approx(16 / 28)
    # The CSV beside it has the same rows.
    with open(tmp_path / "out" / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["a", "b", "c"]
    assert float(rows[0]["dice"]) == pytest.approx(16 / 28, abs=1e-6)
    # One PNG per case, drawn on slice 3 for case a (most foreground in the truth).
    pngs = sorted(os.listdir(tmp_path / "out" / "report_png"))
    assert pngs == ["a.png", "b.png", "c.png"]
    assert fm.most_foreground_slice(*[_read(d / "a.nii.gz") for d in (labels, preds)]) == 3


def _read(path):
    import SimpleITK as sitk

    return np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), (2, 1, 0))


def _case_masks():
    truth = np.zeros((24, 20, 3), np.uint8)
    truth[4:16, 4:12, 2] = 1  # 96 voxels
    pred = np.zeros_like(truth)
    pred[6:18, 6:14, 2] = 1  # 96 voxels, 10 x 6 = 60 shared
    return truth, pred


def _grey_pixels(path):
    """Pixels of the PNG that are grey: neither black, white, nor an outline colour."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(np.count_nonzero((r == g) & (g == b) & (r > 20) & (r < 235)))


def test_case_png_shows_the_image_slice_in_grey_with_both_outlines(tmp_path):
    truth, pred = _case_masks()
    # Only slice z=2 (the one with the foreground) holds a ramp of grey values.
    image = np.zeros(truth.shape, np.float32)
    image[:, :, 2] = np.add.outer(np.arange(24), np.arange(20))
    with_image, without = tmp_path / "with.png", tmp_path / "without.png"
    assert fm.save_case_png(str(with_image), truth, pred, image, title="a") == 2
    assert fm.save_case_png(str(without), truth, pred, None, title="a") == 2
    rgb = np.asarray(Image.open(with_image).convert("RGB")).astype(int)
    assert rgb.shape == (400, 500, 3) and os.path.getsize(with_image) > 5000
    # The slice's grey ramp fills the axes; without the image only text edges are grey.
    assert _grey_pixels(with_image) > _grey_pixels(without) + 20000
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    assert np.count_nonzero((g > 200) & (r < 80) & (b < 80)) > 100  # the label's green
    assert np.count_nonzero((r > 200) & (g < 80) & (b < 80)) > 100  # the prediction's red


def test_case_png_title_and_legend(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(fm, "_save_png", lambda fig, path: drawn.append(fig))
    truth, pred = _case_masks()
    fm.save_case_png(str(tmp_path / "x.png"), truth, pred, None, title="case_7")
    ax = drawn[0].axes[0]
    # Dice by hand: 2 * 60 / (96 + 96) on the slice, and over the volume (the only slice).
    assert ax.get_title() == "case_7: slice z=2, Dice 0.625 (volume 0.625)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["label", "prediction"]


def test_mean_iou_from_saved_probabilities(tmp_path):
    labels, preds, _ = _cases(tmp_path)
    shape = (10, 8, 6)
    probs = np.zeros((2, *shape), np.float32)
    truth_a = _read(labels / "a.nii.gz")
    probs[1] = np.where(truth_a > 0, 0.8, 0.3)  # > 0.75 until t = 0.8
    probs[0] = 1 - probs[1]
    np.savez(preds / "a.npz", probabilities=probs, class_values=np.array([0, 1]))
    out = tmp_path / "r.json"
    assert run_evaluate(eval_args(preds, labels, out, no_png=True)) == 0
    a = [r for r in json.loads(out.read_text())["cases"] if r["case"] == "a"][0]
    assert a["mean_iou_from"] == "probabilities"
    # t = 0.5 .. 0.75 (6 thresholds): perfect (1.0); t = 0.8 .. 0.95 (4): nothing predicted,
    # fg IoU 0, bg IoU 460/480.
    assert a["mean_iou"] == pytest.approx((6 * 1.0 + 4 * (0 + 460 / 480) / 2) / 10)
    assert not (tmp_path / "r_png").exists()


def test_class_names_from_dataset_json(tmp_path):
    labels, preds, _ = _cases(tmp_path)
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({"labels": {"background": 0, "tumour": 1, "oedema": 2}}))
    out = tmp_path / "r.json"
    assert run_evaluate(eval_args(preds, labels, out, no_png=True)) == 0  # beside labels/
    report = json.loads(out.read_text())
    assert report["classes"] == {"tumour": 1, "oedema": 2}
    # Class 2 is in neither: empty vs empty, Dice 1.0.
    assert {r["dice"] for r in report["cases"] if r["class"] == "oedema"} == {1.0}


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_unpaired_files_are_named(tmp_path, capsys):
    labels, preds, _ = _cases(tmp_path)
    os.rename(preds / "b.nii.gz", preds / "extra.nii.gz")
    assert run_evaluate(eval_args(preds, labels, tmp_path / "r.json")) == 2
    err = capsys.readouterr().err
    assert "extra.nii.gz" in err and "b.nii.gz" in err and err.count("\n") == 1
    assert "without a label" in err and "without a prediction" in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(spacing=(0.8, 0.9, 3.0)), "spacing"),
        (dict(origin=(0.0, 0.0, 0.0)), "origin"),
        (dict(direction=(1.0, 0, 0, 0, 1, 0, 0, 0, 1)), "direction"),
        (dict(shape=(10, 8, 7)), "size"),
    ],
)
def test_geometry_mismatch_names_both_files_and_field(tmp_path, capsys, change, field):
    labels, preds, _ = _cases(tmp_path)
    shape = change.pop("shape", (10, 8, 6))
    write_xyz(np.zeros(shape, np.uint8), preds / "b.nii.gz", **change)
    assert run_evaluate(eval_args(preds, labels, tmp_path / "r.json")) == 2
    err = capsys.readouterr().err
    assert str(preds / "b.nii.gz") in err and str(labels / "b.nii.gz") in err
    assert f"differ in {field}" in err


def test_missing_labels_folder_and_image(tmp_path, capsys):
    labels, preds, images = _cases(tmp_path)
    assert run_evaluate(eval_args(preds, None, tmp_path / "r.json")) == 2
    assert "--labels" in capsys.readouterr().err
    assert run_evaluate(eval_args(preds, tmp_path / "nope", tmp_path / "r.json")) == 2
    assert "nope" in capsys.readouterr().err
    os.remove(images / "c_0000.nii.gz")
    assert run_evaluate(eval_args(preds, labels, tmp_path / "r.json", images=images)) == 2
    assert "case 'c'" in capsys.readouterr().err


def test_unreadable_prediction_is_one_line_and_a_bug_keeps_its_traceback(
    tmp_path, capsys, monkeypatch
):
    labels, preds, _ = _cases(tmp_path)
    (preds / "b.nii.gz").write_bytes(b"not an image")
    assert run_evaluate(eval_args(preds, labels, tmp_path / "r.json", no_png=True)) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune.py evaluate: error: ") and err.count("\n") == 1
    assert "b.nii.gz" in err
    (tmp_path / "again").mkdir()
    labels, preds, _ = _cases(tmp_path / "again")

    def broken(pred, truth):
        return 1 / 0  # a bug while scoring

    monkeypatch.setattr(fm, "dice_iou", broken)
    with pytest.raises(ZeroDivisionError) as info:
        run_evaluate(eval_args(preds, labels, tmp_path / "r.json", no_png=True))
    assert info.traceback[-1].name == "broken"
    assert "error:" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def _write_predictions(path, probs, labels=None):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prob_0", "prob_1", "predicted"] + (["label"] if labels else []))
        for i, p in enumerate(probs):
            row = [f"s:{i}", 1 - p, p, int(p >= 0.5)]
            w.writerow(row + ([labels[i]] if labels else []))


def test_classification_report(tmp_path):
    y = [0, 0, 1, 1, 1, 0]
    p = [0.1, 0.6, 0.7, 0.4, 0.9, 0.2]
    csv_path = tmp_path / "predictions.csv"
    _write_predictions(csv_path, p, y)
    out = tmp_path / "cls.json"
    assert run_evaluate(eval_args(tmp_path, None, out)) == 0  # the folder form
    report = json.loads(out.read_text())
    # Pairs (pos, neg): 0.7 beats 0.1, 0.6, 0.2; 0.4 beats 0.1, 0.2; 0.9 beats all: 8 / 9.
    assert report["roc_auc"] == pytest.approx(8 / 9)
    assert report["accuracy"] == pytest.approx(4 / 6)  # wrong: 0.6 (neg), 0.4 (pos)
    png = Image.open(tmp_path / "cls_roc.png")
    assert png.size == (500, 400) and os.path.getsize(tmp_path / "cls_roc.png") > 5000
    # Labels from a y .npy instead of the CSV's column.
    csv2 = tmp_path / "nolabel.csv"
    _write_predictions(csv2, p)
    np.save(tmp_path / "y.npy", 1 - np.array(y))
    assert run_evaluate(eval_args(csv2, tmp_path / "y.npy", out, no_png=True)) == 0
    assert json.loads(out.read_text())["roc_auc"] == pytest.approx(1 / 9)


def test_classification_labels_from_candidates_csv_and_errors(tmp_path, capsys):
    csv_path = tmp_path / "pred.csv"
    _write_predictions(csv_path, [0.2, 0.8, 0.3])
    cands = tmp_path / "candidates.csv"
    cands.write_text("seriesuid,coordX,coordY,coordZ,class\ns,0,0,0,0\ns,1,1,1,1\ns,2,2,2,1\n")
    out = tmp_path / "r.json"
    assert run_evaluate(eval_args(csv_path, cands, out, no_png=True)) == 0
    assert json.loads(out.read_text())["roc_auc"] == pytest.approx(1.0)
    assert run_evaluate(eval_args(csv_path, None, out)) == 2
    assert "label column" in capsys.readouterr().err
    np.save(tmp_path / "y.npy", np.array([0, 1]))
    assert run_evaluate(eval_args(csv_path, tmp_path / "y.npy", out)) == 2
    assert "Expected 3 labels" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert run_evaluate(eval_args(bad, None, out)) == 2
    assert "bad.csv" in capsys.readouterr().err
    words = tmp_path / "words.csv"
    words.write_text("id,prob_0,prob_1,predicted,label\ns:0,0.5,high,1,1\n")
    assert run_evaluate(eval_args(words, None, out)) == 2
    assert "'high' in data row 1" in capsys.readouterr().err


def test_help_shows_a_real_example():
    parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter)
    fm.add_evaluate_arguments(parser)
    text = parser.format_help()
    assert "python keras/finetune.py evaluate --predictions" in text


def test_evaluate_and_volume_io_need_no_keras():
    import subprocess
    import sys

    from conftest import ROOT

    code = (
        "import sys; sys.path[:0] = ['keras']; import finetune_metrics, volume_io; "
        "assert not {'keras', 'tensorflow', 'jax', 'torch'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
