"""Fine-tuning data: layouts, checks, the cache, the split, the sampler, candidate cubes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SHARED_DATA, require_shared

from finetune_arrays import ArrayBatches, discover_arrays, load_candidate_cubes
from finetune_cases import (
    FinetuneInputError,
    default_intensity,
    detect_layout,
    discover_segmentation,
    find_images,
    prepare_cases,
    split_cases,
)
from finetune_helpers import (
    make_candidates,
    make_classification_arrays,
    make_segmentation_arrays,
    make_segmentation_folder,
    read_xyz,
    write_xyz,
)
from finetune_patches import SegmentationPatches, check_patch, crop_padded, foreground_item


def _prepared(tmp_path, **kwargs):
    root = make_segmentation_folder(tmp_path / "data", **kwargs)
    source = discover_segmentation(str(root))
    cases = prepare_cases(
        source, str(tmp_path / "cache"), ["ct"] * len(source.channel_names), progress=False
    )
    return root, source, cases


# -- layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nnunet", "decathlon"])
def test_discover_both_layouts(tmp_path, layout):
    root = make_segmentation_folder(tmp_path / "d", n_cases=3, layout=layout)
    source = discover_segmentation(str(root))
    assert [c.case_id for c in source.cases] == ["case_000", "case_001", "case_002"]
    assert source.layout == layout
    assert source.labels == {"background": 0, "tumour": 1} and source.n_classes == 2
    for c in source.cases:
        assert os.path.basename(c.label) == c.case_id + ".nii.gz"
        assert len(c.images) == 1 and os.path.isfile(c.images[0])
    assert detect_layout(str(root)) == "volumes"


def test_find_images_groups_channels_and_explicit_files(tmp_path):
    root = make_segmentation_folder(tmp_path / "d", n_cases=2, n_channels=2)
    found = find_images([str(root / "imagesTr")], ".nii.gz")
    assert [case for case, _ in found] == ["case_000", "case_001"]
    assert [os.path.basename(p) for p in found[1][1]] == [
        "case_001_0000.nii.gz",
        "case_001_0001.nii.gz",
    ]
    # Explicit files, ending guessed; a Decathlon-style name is its own one-channel case.
    write_xyz(np.zeros((8, 8, 8), np.int16), tmp_path / "scan.mha")
    assert find_images([str(tmp_path / "scan.mha")], None) == [
        ("scan", [str(tmp_path / "scan.mha")])
    ]
    os.remove(root / "imagesTr" / "case_001_0001.nii.gz")
    with pytest.raises(FinetuneInputError, match=r"case_001.*channel\(s\) \[1\] missing"):
        find_images([str(root / "imagesTr")], ".nii.gz")


def test_prepare_matches_simpleitk_and_is_memory_mapped(tmp_path):
    root, source, cases = _prepared(tmp_path, n_cases=2)
    for case, prepared in zip(source.cases, cases, strict=True):
        hu = read_xyz(case.images[0]).astype(np.float64)
        expected = (np.clip(hu, -1000, 1000) + 1000) / 2000
        np.testing.assert_allclose(prepared.image[0], expected, atol=1e-6)
        np.testing.assert_array_equal(prepared.label, read_xyz(case.label))
        assert isinstance(prepared.image, np.memmap) and isinstance(prepared.label, np.memmap)
        fg = np.argwhere(read_xyz(case.label) == 1)
        np.testing.assert_array_equal(prepared.foreground[1], fg)


def test_cache_is_reused_and_redone_when_the_source_changes(tmp_path):
    root, source, cases = _prepared(tmp_path, n_cases=2)
    cache = tmp_path / "cache"
    records = sorted(p for p in os.listdir(cache) if p.endswith(".json"))
    stamp = {p: os.stat(cache / p).st_mtime_ns for p in records}
    prepare_cases(source, str(cache), ["ct"], progress=False)
    assert {p: os.stat(cache / p).st_mtime_ns for p in records} == stamp  # nothing redone
    # Rewriting a label makes a new cache entry for that case only.
    lab = source.cases[0].label
    write_xyz(read_xyz(lab), lab)
    again = prepare_cases(source, str(cache), ["ct"], progress=False)
    assert len([p for p in os.listdir(cache) if p.endswith(".json")]) == 3
    np.testing.assert_array_equal(again[0].label, cases[0].label)
    assert not [p for p in os.listdir(cache) if p.startswith(".tmp-")]


def test_spacing_resamples_image_and_label(tmp_path):
    root = make_segmentation_folder(tmp_path / "d", n_cases=2, size=(20, 20, 8))
    source = discover_segmentation(str(root))
    cases = prepare_cases(
        source, str(tmp_path / "c"), ["ct"], spacing=(1.6, 1.8, 5.0), progress=False
    )
    # 20 * 0.8 / 1.6 = 10, 20 * 0.9 / 1.8 = 10, 8 * 2.5 / 5 = 4
    assert cases[0].image.shape == (1, 10, 10, 4) and cases[0].label.shape == (10, 10, 4)
    assert set(np.unique(cases[0].label)) <= {0, 1}


def test_arrays_layouts(tmp_path):
    seg = make_segmentation_arrays(tmp_path / "seg")
    src = discover_arrays(str(seg))
    assert src.task == "segmentation" and src.patch == (16, 16, 8) and src.n_classes == 2
    assert detect_layout(str(seg)) == "arrays"
    cls = make_classification_arrays(tmp_path / "cls")
    src = discover_arrays(str(cls))
    assert src.task == "classification" and src.n_classes == 2
    ds = ArrayBatches(src.x["train"], src.t["train"], 2, 3, seed=1, data_format="channels_last")
    x, y = ds[0]
    assert x.shape == (3, 16, 16, 8, 1) and y.shape == (3, 2)
    # The batch is the items the permutation of epoch 0 picks, in sorted order.
    picks = np.sort(np.random.default_rng([1, 0]).permutation(8)[:3])
    np.testing.assert_array_equal(x[..., 0], np.load(cls / "x_train_16x16x8.npy")[picks])
    np.testing.assert_array_equal(y.argmax(1), np.load(cls / "y_train_16x16x8.npy")[picks])


# -- split -----------------------------------------------------------------------------------


def test_split_by_case_is_deterministic_and_folds_partition():
    ids = [f"c{i:02d}" for i in range(11)]
    train, valid = split_cases(ids[::-1], seed=3)
    assert (train, valid) == split_cases(ids, seed=3)  # input order does not matter
    assert len(valid) == 2 and not set(train) & set(valid) and set(train) | set(valid) == set(ids)
    folds = [split_cases(ids, fold=k, folds=4, seed=3)[1] for k in range(4)]
    assert sorted(sum(folds, [])) == ids  # every case validates exactly once
    assert [len(f) for f in folds] == [3, 3, 3, 2]
    with pytest.raises(FinetuneInputError, match="--fold 4 --folds 4"):
        split_cases(ids, fold=4, folds=4)


# -- sampler ---------------------------------------------------------------------------------


def test_sampler_third_foreground_padding_and_determinism(tmp_path):
    # Volumes smaller than the patch along z (16 < 24): padded.
    _, source, cases = _prepared(tmp_path, n_cases=3, size=(24, 24, 16))
    patch = (16, 16, 24)
    ds = SegmentationPatches(cases, patch, 3, 2, steps=4, seed=5)
    x, y = ds[1]
    assert x.shape == (3, 1, 16, 16, 24) and y.shape == (3, 2, 16, 16, 24)
    np.testing.assert_array_equal(y.sum(1), 1)  # one-hot
    # Item 5 of the epoch (batch 1, position 2) is centred on foreground.
    assert [foreground_item(k) for k in range(6)] == [False, False, True, False, False, True]
    assert y[2, 1].sum() > 0
    # Reproduce batch 1 with an obvious loop over the same random draws.
    rng = np.random.default_rng([5, 0, 1])
    for j in range(3):
        image, label, on_fg = ds.sample(rng, 3 + j)
        np.testing.assert_array_equal(x[j], image)
        np.testing.assert_array_equal(y[j, 1], label)
    # The z padding: 16 voxels of volume, 8 of zeros, somewhere in the 24.
    assert (x[0, 0].reshape(-1, 24) != 0).any(0).sum() == 16
    # Same seed, epoch and index: same bytes, whatever the workers; another epoch differs.
    ds2 = SegmentationPatches(cases, patch, 3, 2, steps=4, seed=5, workers=2)
    assert ds2[1][0].tobytes() == x.tobytes()
    ds2.set_epoch(1)
    assert ds2[1][0].tobytes() != x.tobytes()


def test_sampler_with_augmentation(tmp_path):
    from finetune_augment import AugmentSettings

    _, _, cases = _prepared(tmp_path, n_cases=2, size=(40, 40, 24))
    plain = SegmentationPatches(cases, (16, 16, 8), 3, 2, steps=3, seed=2)
    # Settings that draw nothing: the same crops, byte for byte.
    off = SegmentationPatches(
        cases, (16, 16, 8), 3, 2, steps=3, seed=2, augment=AugmentSettings.none()
    )
    for i in range(3):
        assert off[i][0].tobytes() == plain[i][0].tobytes()
        assert off[i][1].tobytes() == plain[i][1].tobytes()
    # Every transform on every patch: shapes, one-hot labels, the same seed the same bytes.
    busy = AugmentSettings(p_rotation=1, p_scale=1, p_gamma=1, p_noise=1, p_brightness=1)
    aug = SegmentationPatches(cases, (16, 16, 8), 3, 2, steps=3, seed=2, augment=busy)
    x, y = aug[1]
    assert x.shape == (3, 1, 16, 16, 8) and x.dtype == np.float32 and y.shape == (3, 2, 16, 16, 8)
    np.testing.assert_array_equal(y.sum(1), 1)
    assert x.tobytes() != plain[1][0].tobytes()
    again = SegmentationPatches(cases, (16, 16, 8), 3, 2, steps=3, seed=2, augment=busy)
    assert again[1][0].tobytes() == x.tobytes() and again[1][1].tobytes() == y.tobytes()
    # Item 2 of batch 0 is centred on foreground: the rotated label patch still holds some.
    assert aug[0][1][2, 1].sum() > 0


def test_foreground_share_over_many_batches(tmp_path):
    _, _, cases = _prepared(tmp_path, n_cases=2, size=(40, 40, 24))
    ds = SegmentationPatches(cases, (8, 8, 8), 4, 2, steps=30, seed=0)
    with_fg = [bool(y[j, 1].any()) for i in range(30) for y in [ds[i][1]] for j in range(4)]
    forced = [foreground_item(k) for k in range(120)]
    assert all(f for f, w in zip(forced, with_fg, strict=True) if f)  # every forced one has fg
    assert sum(forced) == 40


@pytest.mark.parametrize("fraction", [0.0, 0.25, 1 / 3, 0.5, 2 / 3, 0.9, 1.0])
def test_foreground_fraction_forces_an_even_share(fraction):
    forced = [foreground_item(k, fraction) for k in range(600)]
    # Every prefix holds its share, rounded down: the forced items are spread evenly.
    for n in range(1, 601):
        assert sum(forced[:n]) == int(n * fraction + 1e-9)


def test_sampler_foreground_fraction_all_or_none(tmp_path):
    _, _, cases = _prepared(tmp_path, n_cases=2, size=(40, 40, 24))
    every = SegmentationPatches(cases, (8, 8, 8), 4, 2, steps=5, seed=0, foreground_fraction=1)
    assert all(every[i][1][j, 1].any() for i in range(5) for j in range(4))
    # None forced: the same draws as a sampler asked for none by a loop over `sample`.
    none = SegmentationPatches(cases, (8, 8, 8), 4, 2, steps=5, seed=0, foreground_fraction=0)
    rng = np.random.default_rng([0, 0, 3])
    for j in range(4):
        assert not none.sample(rng, 4 * 3 + j)[2]
    with pytest.raises(FinetuneInputError, match=r"foreground_fraction in \[0, 1\]"):
        SegmentationPatches(cases, (8, 8, 8), 4, 2, steps=5, seed=0, foreground_fraction=1.5)


def test_crop_padded_against_a_loop():
    a = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    out = crop_padded(a, (-2, 1, 1), (4, 4, 4), fill=-1)
    for i in range(4):
        for j in range(4):
            for k in range(4):
                x, y, z = i - 2, j + 1, k + 1
                inside = 0 <= x < 5 and 0 <= y < 4 and 0 <= z < 3
                assert out[i, j, k] == (a[x, y, z] if inside else -1)


# -- candidates ------------------------------------------------------------------------------


def test_candidate_cubes_through_the_physical_mapping(tmp_path):
    outside = dict(seriesuid="1.3.6.1.4.0", coordX=1e4, coordY=0.0, coordZ=0.0, **{"class": 0})
    csv_path, vol_dir, rows = make_candidates(tmp_path, extra=[outside])
    patch = (8, 8, 8)
    with pytest.warns(UserWarning, match=r"1\.3\.6\.1\.4\.0:8 .* outside"):
        cubes, labels, ids = load_candidate_cubes(str(csv_path), str(vol_dir), patch, "ct")
    assert len(ids) == len(rows) - 1 and "1.3.6.1.4.0:8" not in ids
    np.testing.assert_array_equal(labels, [r["class"] for r in rows[:-1] if "index" in r])
    for cube, r in zip(cubes, [r for r in rows if "index" in r], strict=True):
        vol = read_xyz(vol_dir / f"{r['seriesuid']}.mha").astype(np.float64)
        i, j, k = r["index"]
        expected = (np.clip(vol[i, j, k], -1000, 1000) + 1000) / 2000
        assert cube[4, 4, 4] == pytest.approx(expected, abs=1e-6)  # the centre voxel
    assert detect_layout(str(tmp_path)) == "candidates"


# -- bad input -------------------------------------------------------------------------------


def test_patch_not_divisible_by_8_names_the_nearest():
    assert check_patch([64, 64, 32]) == (64, 64, 32)
    with pytest.raises(FinetuneInputError, match=r"D=30; the nearest valid sizes are 24 or 32"):
        check_patch([64, 64, 30])


def test_geometry_mismatch_names_both_files_and_the_field(tmp_path):
    root = make_segmentation_folder(tmp_path / "d", n_cases=2)
    lab = root / "labelsTr" / "case_001.nii.gz"
    write_xyz(read_xyz(lab), lab, spacing=(0.8, 0.9, 3.0))
    source = discover_segmentation(str(root))
    with pytest.raises(FinetuneInputError, match=r"case_001\.nii\.gz.*case_001_0000.*spacing"):
        prepare_cases(source, str(tmp_path / "c"), ["ct"], progress=False)


def test_label_values_outside_dataset_json(tmp_path):
    root = make_segmentation_folder(tmp_path / "d", n_cases=2)
    lab = root / "labelsTr" / "case_000.nii.gz"
    write_xyz(read_xyz(lab) * 3, lab)
    with pytest.raises(FinetuneInputError, match=r"\[3\] in .*case_000\.nii\.gz"):
        prepare_cases(discover_segmentation(str(root)), str(tmp_path / "c"), ["ct"], progress=False)


def test_unpaired_images_and_labels(tmp_path):
    root = make_segmentation_folder(tmp_path / "d", n_cases=3)
    os.remove(root / "labelsTr" / "case_002.nii.gz")
    with pytest.raises(FinetuneInputError, match=r"label .*case_002\.nii\.gz.*case_002_0000"):
        discover_segmentation(str(root))
    root = make_segmentation_folder(tmp_path / "e", n_cases=3)
    os.remove(root / "imagesTr" / "case_001_0000.nii.gz")
    with pytest.raises(FinetuneInputError, match=r"image .* for the label .*case_001\.nii\.gz"):
        discover_segmentation(str(root))


def test_no_foreground_anywhere(tmp_path):
    root = make_segmentation_folder(tmp_path / "d", n_cases=2)
    for name in os.listdir(root / "labelsTr"):
        write_xyz(np.zeros((24, 24, 16), np.uint8), root / "labelsTr" / name)
    with pytest.raises(FinetuneInputError, match="all background"):
        prepare_cases(discover_segmentation(str(root)), str(tmp_path / "c"), ["ct"], progress=False)


def test_dataset_json_fields(tmp_path):
    root = make_segmentation_folder(tmp_path / "d", n_cases=2, labels={"bg": 0, "a": 2})
    with pytest.raises(FinetuneInputError, match=r"consecutive values 0\.\.n-1"):
        discover_segmentation(str(root))
    meta = json.loads((root / "dataset.json").read_text())
    del meta["file_ending"]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(FinetuneInputError, match=r"'file_ending' in .*dataset\.json"):
        discover_segmentation(str(root))


def test_intensity_defaults_and_override():
    assert default_intensity(["CT", "T2", "PET"], None) == ["ct", "mri", "minmax"]
    assert default_intensity(["CT", "T2"], ["minmax"]) == ["minmax", "minmax"]
    with pytest.raises(FinetuneInputError, match="one per channel"):
        default_intensity(["CT", "T2", "x"], ["ct", "mri"])


def test_real_sts_ct_case(tmp_path):
    root = require_shared(SHARED_DATA / "sts_ct")
    source = discover_segmentation(str(root))
    assert len(source.cases) == 36 and source.channel_names == ["CT"]
    sub = type(source)(
        source.root,
        source.cases[:1],
        source.channel_names,
        source.labels,
        source.file_ending,
        source.layout,
    )
    [case] = prepare_cases(sub, str(tmp_path / "c"), ["ct"], progress=False)
    img = sitk.ReadImage(source.cases[0].images[0])
    assert case.image.shape[1:] == img.GetSize() and case.has_foreground
    assert float(case.image.min()) >= 0.0 and float(case.image.max()) <= 1.0
