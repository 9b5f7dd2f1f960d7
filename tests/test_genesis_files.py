"""The shared file conventions (keras/genesis_files.py): names, layouts, the atomic writer."""

import inspect
import os

import numpy as np
import pytest

import genesis_files as gf


def test_cube_file_names_written_by_hand():
    assert gf.cube_file_name(32, 64, 64, 32, 0) == "bat_32_s_64x64x32_0.npy"
    assert gf.original_cube_file_name(32, 64, 64, 32, 9) == "bat_32_64x64x32_9.npy"
    assert gf.cube_file_names(4, 96, 80, 16, 3) == [
        "bat_4_s_96x80x16_3.npy",
        "bat_4_96x80x16_3.npy",
    ]


def test_extraction_writes_the_name_the_trainer_reads_first():
    import infinite_generator_3D as ig

    path = ig.output_path("cubes", 32, 64, 64, 32, 5)
    assert path == os.path.join("cubes", gf.cube_file_names(32, 64, 64, 32, 5)[0])


def test_layouts_and_defaults():
    assert gf.DATA_FORMATS == ("channels_first", "channels_last")
    assert gf.MODEL_DATA_FORMAT in gf.DATA_FORMATS and gf.TRAINING_DATA_FORMAT in gf.DATA_FORMATS


def test_the_model_copy_of_the_layouts_agrees():
    """unet3d.py keeps its own copy (it imports only Keras): it must say the same."""
    import unet3d

    assert unet3d._DATA_FORMATS == gf.DATA_FORMATS
    model = unet3d.unet_model_3d((1, 16, 16, 8), depth=2, n_base_filters=2)  # data_format=None
    assert model.get_layer("depth_0_conv").data_format == gf.MODEL_DATA_FORMAT


def test_config_and_dataset_defaults_come_from_here():
    from config import models_genesis_config
    from genesis_dataset import GenesisPairDataset

    assert models_genesis_config().data_format == gf.TRAINING_DATA_FORMAT
    default = inspect.signature(GenesisPairDataset).parameters["data_format"].default
    assert default == gf.MODEL_DATA_FORMAT


def test_atomic_path_writes_through_a_sibling_with_the_same_name_ending(tmp_path):
    target = tmp_path / "cubes.npy"
    with gf.atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        assert tmp.endswith("-cubes.npy") and os.path.basename(tmp).startswith(".tmp-")
        assert not os.path.exists(tmp)  # writers that refuse an existing file still work
        np.save(tmp, np.arange(5))  # np.save would append .npy to any other suffix
        assert not target.exists()  # nothing under the final name until the end
    assert os.listdir(tmp_path) == ["cubes.npy"]
    assert np.array_equal(np.load(target), np.arange(5))


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_atomic_path_keeps_the_old_file_on_error_and_ctrl_c(tmp_path, error):
    target = tmp_path / "notes.txt"
    target.write_text("old")
    with pytest.raises(error), gf.atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise error
    assert os.listdir(tmp_path) == ["notes.txt"]
    assert target.read_text() == "old"


def test_atomic_path_replaces_and_can_write_a_folder(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with gf.atomic_path(str(target)) as tmp, open(tmp, "w") as f:
        f.write("new")
    assert target.read_text() == "new"

    folder = tmp_path / "volumes"
    with pytest.raises(RuntimeError), gf.atomic_path(folder) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        raise RuntimeError
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]  # the half-made folder is gone too
    with gf.atomic_path(folder) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
    assert os.path.isdir(folder / "sub")
