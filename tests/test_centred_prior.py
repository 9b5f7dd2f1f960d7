"""The centred-ellipsoid baseline (benchmarks/centred_prior.py): shapes and scores by hand."""

import math
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import centred_prior as cp  # noqa: E402


def test_extent_counts_spanned_voxels_times_spacing():
    mask = np.zeros((10, 8, 6), np.uint8)
    mask[2:5, 1:2, 0:6] = 1  # 3 x 1 x 6 voxels
    assert cp.foreground_extent_mm(mask, (2.0, 0.5, 3.0)) == (6.0, 0.5, 18.0)
    assert cp.foreground_extent_mm(np.zeros((3, 3, 3)), (1, 1, 1)) == (0.0, 0.0, 0.0)


def test_ellipsoid_by_hand_and_its_volume():
    # A 5x5x5 grid, unit spacing, radius 1: the centre and its 6 neighbours.
    small = cp.ellipsoid_mask((5, 5, 5), (1, 1, 1), (1, 1, 1))
    assert small.sum() == 7 and small[2, 2, 2] and small[3, 2, 2] and not small[3, 3, 2]
    # Even sizes centre between voxels: 4 voxels along x at 1 mm, semi-axis 2 -> all 4.
    assert cp.ellipsoid_mask((4, 1, 1), (1, 1, 1), (2, 1, 1)).sum() == 4
    # Anisotropic spacing: the voxel count approaches 4/3 pi abc / voxel volume.
    big = cp.ellipsoid_mask((120, 100, 40), (0.5, 0.5, 2.0), (20.0, 15.0, 30.0))
    expected = 4 / 3 * math.pi * 20 * 15 * 30 / (0.5 * 0.5 * 2.0)
    assert big.sum() == pytest.approx(expected, rel=0.02)
    with pytest.raises(ValueError, match="positive semi-axes"):
        cp.ellipsoid_mask((4, 4, 4), (1, 1, 1), (1, 0, 1))


def test_dice_by_hand():
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], bool)
    assert cp.dice(a, b) == 0.5
    assert cp.dice(a, a) == 1.0 and cp.dice(~(a | True), ~(a | True)) == 1.0


def _write(path, mask, spacing):
    image = sitk.GetImageFromArray(mask.transpose(2, 1, 0).copy())
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_prior_sized_from_training_masks_scores_a_test_case(tmp_path):
    spacing = (1.0, 1.0, 2.0)
    train = []
    for i, (nx, ny, nz) in enumerate([(8, 6, 3), (10, 6, 5), (12, 6, 4)]):
        mask = np.zeros((20, 20, 10), np.uint8)
        mask[:nx, :ny, :nz] = 1
        _write(tmp_path / f"t{i}.nii.gz", mask, spacing)
        train.append(tmp_path / f"t{i}.nii.gz")
    # Median extents: x 10 mm, y 6 mm, z 4 voxels * 2 mm = 8 mm -> semi-axes 5, 3, 4.
    assert cp.prior_semi_axes(train) == (5.0, 3.0, 4.0)
    # Margins (volume 20 x 20 x 20 mm less the extent, halved): 5, 7, 6 mm.
    assert cp.training_sizes(train)[1] == (5.0, 7.0, 6.0)
    truth = cp.ellipsoid_mask((20, 20, 10), spacing, (5.0, 3.0, 4.0)).astype(np.uint8)
    _write(tmp_path / "case.nii.gz", truth, spacing)
    assert cp.score_prior(train, [tmp_path / "case.nii.gz"], "fixed") == {"case": 1.0}
    shifted = np.roll(truth, 3, axis=0)
    _write(tmp_path / "off.nii.gz", shifted, spacing)
    scores = cp.score_prior(train, [tmp_path / "off.nii.gz"], "fixed")
    assert scores["off"] == pytest.approx(cp.dice(truth > 0, shifted > 0)) and scores["off"] < 1


def test_margin_prior_follows_the_test_volume_size():
    extent, margin = (10.0, 6.0, 8.0), (5.0, 7.0, 6.0)
    # A 40 x 30 x 20 mm volume less 2 x margin: 30, 16, 8 mm -> semi-axes 15, 8, 4.
    assert cp.semi_axes_for((40, 30, 10), (1, 1, 2), extent, margin, "margin") == (15, 8, 4)
    # Smaller than twice the margin: one voxel.
    assert cp.semi_axes_for((8, 8, 4), (1, 1, 2), extent, margin, "margin") == (0.5, 0.5, 1)
    assert cp.semi_axes_for((8, 8, 4), (1, 1, 2), extent, margin, "fixed") == (5, 3, 4)
    with pytest.raises(ValueError, match="'margin' or 'fixed'"):
        cp.semi_axes_for((8, 8, 4), (1, 1, 2), extent, margin, "round")
