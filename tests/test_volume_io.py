"""volume_io: geometry, (x, y, z) arrays, atomic writes, intensities, resampling."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

import volume_io as vio

DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _image(shape_xyz=(5, 4, 3), spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 30.0)):
    # Built through SimpleITK's own (z, y, x) array convention, independent of the module.
    arr_zyx = np.arange(np.prod(shape_xyz), dtype=np.int16).reshape(shape_xyz[::-1])
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(DIRECTION)
    return img, arr_zyx


def test_geometry_of_and_json_round_trip():
    img, _ = _image()
    g = vio.Geometry.of(img)
    assert g.size == (5, 4, 3)
    assert g.spacing == pytest.approx((0.8, 0.9, 2.5))
    assert g.origin == pytest.approx((10.0, -20.0, 30.0))
    assert g.direction == pytest.approx(DIRECTION)
    assert vio.Geometry.from_json(g.to_json()) == g
    with pytest.raises(ValueError, match="missing"):
        vio.Geometry.from_json({"size": [1, 2, 3]})


def test_geometry_differences_name_field_and_values():
    img, _ = _image()
    g = vio.Geometry.of(img)
    assert g.differences(g) == []
    other = vio.Geometry(g.size, (0.8, 0.9, 3.0), g.origin, g.direction)
    diffs = g.differences(other)
    assert diffs == ["spacing (0.8, 0.9, 2.5) vs (0.8, 0.9, 3)"]
    # Rounding below the tolerance is not a difference.
    close = vio.Geometry(g.size, g.spacing, (10.0 + 1e-7, -20.0, 30.0), g.direction)
    assert g.differences(close) == []
    moved = vio.Geometry((5, 4, 4), g.spacing, (11.0, -20.0, 30.0), (1.0, 0, 0, 0, 1, 0, 0, 0, 1))
    names = [d.split()[0] for d in g.differences(moved)]
    assert names == ["size", "origin", "direction"]


def test_image_to_array_is_xyz_transpose():
    img, arr_zyx = _image()
    arr = vio.image_to_array(img)
    assert arr.shape == (5, 4, 3)
    # Voxel (x, y, z) through SimpleITK's own accessor.
    for x, y, z in [(0, 0, 0), (4, 1, 2), (2, 3, 1)]:
        assert arr[x, y, z] == img.GetPixel(x, y, z) == arr_zyx[z, y, x]


def test_array_to_image_round_trip_and_shape_error():
    img, _ = _image()
    g = vio.Geometry.of(img)
    arr = vio.image_to_array(img)
    back = vio.array_to_image(arr, g)
    assert vio.Geometry.of(back).differences(g) == []
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    with pytest.raises(ValueError, match=r"Expected an array of shape \(5, 4, 3\)"):
        vio.array_to_image(arr.transpose(2, 1, 0), g)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_write_image_round_trip(tmp_path, ext):
    img, _ = _image()
    g = vio.Geometry.of(img)
    arr = vio.image_to_array(img)
    path = tmp_path / f"case{ext}"
    vio.write_image(arr, g, str(path))
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left
    back = sitk.ReadImage(str(path))  # read by SimpleITK directly
    assert vio.Geometry.of(back).differences(g) == []
    np.testing.assert_array_equal(vio.image_to_array(back), arr)
    if ext == ".nii.gz":
        with open(path, "rb") as f:
            assert f.read(2) == b"\x1f\x8b"  # gzip magic


def test_write_image_interrupted_leaves_nothing(tmp_path, monkeypatch):
    img, _ = _image()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sitk, "WriteImage", boom)
    with pytest.raises(KeyboardInterrupt):
        vio.write_image(vio.image_to_array(img), vio.Geometry.of(img), str(tmp_path / "a.nii.gz"))
    assert os.listdir(tmp_path) == []


def test_read_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        vio.read_image(str(missing))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.nii.gz"):
        vio.read_image(str(bad))
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(4, 4, sitk.sitkInt16), str(flat))
    with pytest.raises(vio.VolumeError, match=r"flat\.nii\.gz: Expected a 3-D volume"):
        vio.read_image(str(flat))


def test_read_image_reads_dicom_folder(abdomen_dicom_path):
    img = vio.read_image(str(abdomen_dicom_path))
    assert img.GetSize() == (512, 512, 20)


@pytest.mark.parametrize(
    "name,mode",
    [
        ("CT", "ct"),
        ("ct", "ct"),
        ("MRI", "mri"),
        ("t1", "mri"),
        ("T2", "mri"),
        ("Flair", "mri"),
        ("ADC", "mri"),
        ("dwi", "mri"),
        ("T1w", "mri"),
        ("T2W", "mri"),
        ("PET", "minmax"),
        ("noise", "minmax"),
    ],
)
def test_intensity_mode_for(name, mode):
    assert vio.intensity_mode_for(name) == mode


def test_normalise_intensity_hand_values():
    ct = np.array([-3000, -1000, 0, 500, 1000, 3000], dtype=np.int16)
    out = vio.normalise_intensity(ct, "ct")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 0.75, 1.0, 1.0], atol=1e-7)
    mri = np.array([-5.0, 0.0, 1000.0, 4000.0, 9000.0])
    np.testing.assert_allclose(vio.normalise_intensity(mri, "mri"), [0, 0, 0.25, 1, 1], atol=1e-7)
    mm = np.array([2.0, 4.0, 6.0])
    np.testing.assert_allclose(vio.normalise_intensity(mm, "minmax"), [0, 0.5, 1], atol=1e-7)
    const = np.full((2, 2, 2), 7.0)
    np.testing.assert_array_equal(vio.normalise_intensity(const, "minmax"), np.zeros((2, 2, 2)))
    raw = np.array([1, 2, 3], dtype=np.int32)
    none = vio.normalise_intensity(raw, "none")
    assert none.dtype == np.float32
    np.testing.assert_array_equal(none, [1, 2, 3])
    with pytest.raises(ValueError, match="mode='hu'"):
        vio.normalise_intensity(raw, "hu")


def test_resample_size_and_linear_values():
    # A ramp along x: value = x index * 10. Halving the spacing along x doubles the size and
    # linear interpolation gives value = 10 * physical offset / old spacing.
    arr_xyz = np.zeros((4, 3, 2), dtype=np.float32)
    arr_xyz += (np.arange(4, dtype=np.float32) * 10)[:, None, None]
    g = vio.Geometry((4, 3, 2), (2.0, 1.0, 1.0), (5.0, 6.0, 7.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    img = vio.array_to_image(arr_xyz, g)
    out = vio.resample_image(img, (1.0, 1.0, 1.0))
    og = vio.Geometry.of(out)
    assert og.size == (8, 3, 2)  # round(4 * 2 / 1)
    assert og.origin == g.origin and og.direction == g.direction
    values = vio.image_to_array(out)[:, 0, 0]
    # New voxel i sits at offset i mm from the origin = i / 2 old voxels; the last lies past
    # the old grid's last centre (outside: the volume's minimum, 0 here).
    expected = [0, 5, 10, 15, 20, 25, 30, 0]
    np.testing.assert_allclose(values, expected, atol=1e-4)
    # Size rounding: 5 voxels of 3 mm at 2 mm -> round(7.5) = 8.
    img5 = vio.array_to_image(
        np.zeros((5, 3, 2), np.float32),
        vio.Geometry((5, 3, 2), (3.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
    )
    assert vio.resample_image(img5, (2.0, 1.0, 1.0)).GetSize() == (8, 3, 2)
    with pytest.raises(ValueError, match="spacing"):
        vio.resample_image(img, (1.0, 0.0, 1.0))


def test_resample_label_nearest_keeps_values_and_round_trips():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, size=(6, 5, 4)).astype(np.uint8)
    g = vio.Geometry((6, 5, 4), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), DIRECTION)
    img = vio.array_to_image(lab, g)
    up = vio.resample_image(img, (0.5, 0.5, 1.0), label=True)
    assert up.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(vio.image_to_array(up))) <= {0, 1, 2}
    # Exactly every second voxel of the finer grid sits on an old voxel centre.
    np.testing.assert_array_equal(vio.image_to_array(up)[::2, ::2, ::2], lab)
    back = vio.resample_image(up, g, label=True)
    assert vio.Geometry.of(back).differences(g) == []
    np.testing.assert_array_equal(vio.image_to_array(back), lab)


def test_standardising_modes_by_hand():
    x = np.array([-50.0, 0.0, 50.0, 100.0, 150.0])
    out = vio.normalise_intensity(x, "ct_foreground", {"clip": [0, 100], "mean": 50, "std": 25})
    np.testing.assert_allclose(out, [-2, -2, 0, 2, 2])
    assert out.dtype == np.float32
    z = vio.normalise_intensity(np.array([1.0, 2.0, 3.0, 4.0]), "zscore")
    np.testing.assert_allclose(z, (np.arange(1, 5) - 2.5) / np.std(np.arange(1, 5)), rtol=1e-6)
    np.testing.assert_array_equal(vio.normalise_intensity(np.full(4, 7.0), "zscore"), np.zeros(4))
    with pytest.raises(ValueError, match="clip, mean and std"):
        vio.normalise_intensity(x, "ct_foreground", {})
