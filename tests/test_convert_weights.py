"""The PyTorch weight bridge: a reference PyTorch network in the release's format, converted to
Keras and back (docs/weights.md).

Outputs are compared with the PyTorch network's own; round trips compare every tensor bit for
bit, which also sees what outputs cannot (a conv bias just before batch statistics cancels).
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import torch

import convert_weights as cw
import torch_reference as tr
import unet3d
from unet3d import Conv3DTranspose, TorchBatchNormalization, unet_model_3d

ROOT = Path(__file__).resolve().parents[1]
N = 4  # base width of the tiny networks
SHAPE = (32, 32, 16)
FORMATS = ("channels_first", "channels_last")


def _batch(seed: int = 0, n: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, *SHAPE)).astype("float32")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny reference network with random weights, saved as the release saved its own."""
    model = tr.randomize(tr.ReferenceUNet3D(n=N), seed=3)
    path = tmp_path_factory.mktemp("pt") / "tiny.pt"
    tr.save_published(model, path)
    return model, str(path)


def _predict(model, x_cf: np.ndarray) -> np.ndarray:
    """Channels-first output of a Keras model of either layout, one batch."""
    channels_last = model.input_shape[-1] == 1 and model.input_shape[1] != 1
    x = np.moveaxis(x_cf, 1, -1) if channels_last else x_cf
    out = np.asarray(model.predict(x, batch_size=len(x), verbose=0))
    return np.moveaxis(out, -1, 1) if channels_last else out


def _state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------ mapping


def test_entries_follow_the_published_table():
    shapes = cw.expected_torch_shapes()  # the 32-filter release
    convs = {k: s for k, s in shapes.items() if k.endswith(("conv1.weight", "final_conv.weight"))}
    table = [
        ("down_tr64.ops.0", 1, 32),
        ("down_tr64.ops.1", 32, 64),
        ("down_tr128.ops.0", 64, 64),
        ("down_tr128.ops.1", 64, 128),
        ("down_tr256.ops.0", 128, 128),
        ("down_tr256.ops.1", 128, 256),
        ("down_tr512.ops.0", 256, 256),
        ("down_tr512.ops.1", 256, 512),
        ("up_tr256.ops.0", 768, 256),
        ("up_tr256.ops.1", 256, 256),
        ("up_tr128.ops.0", 384, 128),
        ("up_tr128.ops.1", 128, 128),
        ("up_tr64.ops.0", 192, 64),
        ("up_tr64.ops.1", 64, 64),
    ]
    expected = {f"{p}.conv1.weight": (o, i, 3, 3, 3) for p, i, o in table}
    expected["out_tr.final_conv.weight"] = (1, 64, 1, 1, 1)
    assert convs == expected
    for name, c in (("up_tr256", 512), ("up_tr128", 256), ("up_tr64", 128)):
        assert shapes[f"{name}.up_conv.weight"] == (c, c, 2, 2, 2)
    # The reference network written from the same table has exactly these keys and shapes.
    ref = {k: tuple(v.shape) for k, v in tr.ReferenceUNet3D(n=32).state_dict().items()}
    assert ref == shapes and list(ref) == list(shapes)
    keras_layers = {layer for _, _, layer, _ in cw.torch_entries()}
    model = unet_model_3d((1, 16, 16, 8), n_base_filters=2, variant="pytorch")
    with_weights = {layer.name for layer in model.layers if layer.weights}
    assert keras_layers == with_weights


def test_variant_keeps_the_layer_names_and_the_default_network():
    torch_like = unet_model_3d((1, 16, 16, 8), n_base_filters=2, variant="pytorch")
    deconv = unet_model_3d(
        (1, 16, 16, 8), n_base_filters=2, batch_normalization=True, deconvolution=True
    )
    assert [layer.name for layer in torch_like.layers] == [layer.name for layer in deconv.layers]
    bn = torch_like.get_layer("depth_3_bn")
    assert type(bn) is TorchBatchNormalization and bn.batch_statistics
    assert bn.epsilon == pytest.approx(1e-5) and bn.momentum == pytest.approx(0.9)
    assert isinstance(torch_like.get_layer("level_1_up"), Conv3DTranspose)
    # 14 batch norms each add one counter to the deconvolution network's parameters.
    assert torch_like.count_params() == deconv.count_params() + 14
    default_bn = deconv.get_layer("depth_3_bn")
    assert type(default_bn) is keras.layers.BatchNormalization
    assert default_bn.epsilon == pytest.approx(1e-3) and default_bn.momentum == pytest.approx(0.99)
    off = unet_model_3d((1, 16, 16, 8), n_base_filters=2, variant="pytorch", batch_statistics=False)
    assert not off.get_layer("depth_0_bn").batch_statistics


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variant": "torch"}, "Expected variant in"),
        ({"batch_statistics": True}, "Expected batch_statistics=None for variant='keras'"),
    ],
)
def test_variant_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        unet_model_3d((1, 16, 16, 8), n_base_filters=2, **kwargs)


# ---------------------------------------------------------------------------------- exactness


@pytest.mark.multibackend
@pytest.mark.parametrize("data_format", FORMATS)
def test_converted_model_equals_pytorch(published, tmp_path, data_format):
    ref_model, pt = published
    x = _batch()
    expected = tr.run(ref_model, x)
    dst = tmp_path / "tiny.keras"
    cw.convert(pt, dst, data_format=data_format)
    model = keras.models.load_model(dst)
    assert model.get_layer("depth_0_conv").data_format == data_format
    got = _predict(model, x)
    assert got.shape == expected.shape == (2, 1, *SHAPE)
    assert expected.std() > 0.05  # not a saturated output that would hide errors
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # Batch statistics: one volume alone gives another output than in the pair, in both.
    alone = tr.run(ref_model, x[:1])
    assert np.abs(alone - expected[:1]).max() > 1e-3
    np.testing.assert_allclose(_predict(model, x[:1]), alone, atol=1e-4, rtol=0)


@pytest.mark.multibackend
@pytest.mark.parametrize("data_format", FORMATS)
def test_moving_statistics_when_batch_statistics_are_off(tmp_path, data_format):
    # A plain BatchNorm3d in eval() uses the running statistics: the outputs see them too.
    ref_model = tr.randomize(tr.ReferenceUNet3D(n=N, batch_stats=False), seed=5)
    pt = tmp_path / "plain.pt"
    tr.save_published(ref_model, pt)
    dst = tmp_path / "plain.weights.h5"
    cw.convert(pt, dst, data_format=data_format, batch_statistics=False)
    shape = (1, *SHAPE) if data_format == "channels_first" else (*SHAPE, 1)
    model = unet_model_3d(
        shape, n_base_filters=N, variant="pytorch", batch_statistics=False, data_format=data_format
    )
    model.load_weights(dst)
    x = _batch(1)
    expected = tr.run(ref_model, x)
    np.testing.assert_allclose(_predict(model, x), expected, atol=1e-4, rtol=0)
    # Per volume too: no batch statistics, so one volume alone gives its part of the pair.
    np.testing.assert_allclose(_predict(model, x[:1]), expected[:1], atol=1e-4, rtol=0)


@pytest.mark.multibackend
def test_training_updates_moving_statistics_as_pytorch(published):
    ref_model, pt = published
    model = cw.keras_model_from_torch(cw.read_torch_checkpoint(pt))
    x = _batch(2)
    before = int(np.asarray(model.get_layer("depth_5_bn").num_batches_tracked.numpy()))
    model(x, training=True)
    torch_model = tr.randomize(tr.ReferenceUNet3D(n=N), seed=3)  # the same weights afresh
    torch_model.train()
    with torch.no_grad():
        torch_model(torch.from_numpy(x))
    for layer, key in (("depth_0_bn", "down_tr64.ops.0"), ("depth_13_bn", "up_tr64.ops.1")):
        bn = model.get_layer(layer)
        running = torch_model.state_dict()
        np.testing.assert_allclose(
            bn.moving_mean.numpy(), running[f"{key}.bn1.running_mean"].numpy(), rtol=1e-5, atol=1e-6
        )
        # PyTorch updates the running variance with the unbiased batch variance.
        np.testing.assert_allclose(
            bn.moving_variance.numpy(), running[f"{key}.bn1.running_var"].numpy(), rtol=1e-5
        )
    after = int(np.asarray(model.get_layer("depth_5_bn").num_batches_tracked.numpy()))
    assert after == before + 1


@pytest.mark.slow
def test_full_size_network_equals_pytorch(tmp_path):
    ref_model = tr.randomize(tr.ReferenceUNet3D(n=32), seed=11)
    pt = tmp_path / "full.pt"
    tr.save_published(ref_model, pt)
    x = np.random.default_rng(4).random((2, 1, 64, 64, 32)).astype("float32")
    expected = tr.run(ref_model, x)
    model = cw.keras_model_from_torch(cw.read_torch_checkpoint(pt))
    assert model.count_params() == 16_324_929 + sum(8 * c * c + c for c in (512, 256, 128)) + 14
    np.testing.assert_allclose(_predict(model, x), expected, atol=1e-4, rtol=0)
    back = tmp_path / "back.pt"
    cw.save_torch_checkpoint(cw.torch_state_from_keras(model), back)
    _assert_same_tensors(_state(pt), _state(back))


# --------------------------------------------------------------------------------- round trip


@pytest.mark.multibackend
@pytest.mark.parametrize("middle", ["m.keras", "m.weights.h5", "m.h5"])
def test_round_trip_is_bit_for_bit(published, tmp_path, middle):
    ref_model, pt = published
    cw.convert(pt, tmp_path / middle, data_format="channels_last")
    back = tmp_path / "back.pt"
    cw.convert(tmp_path / middle, back, epoch=12)
    _assert_same_tensors(_state(pt), _state(back))
    saved = torch.load(back, map_location="cpu", weights_only=True)
    assert set(saved) == {"epoch", "state_dict", "optimizer_state_dict"}
    assert saved["epoch"] == 12
    assert all(key.startswith("module.") for key in saved["state_dict"])
    assert any(key.endswith("num_batches_tracked") for key in saved["state_dict"])
    # Loadable, strictly, into the PyTorch network (as users of the release load it).
    fresh = tr.ReferenceUNet3D(n=N)
    fresh.load_state_dict({k[len("module.") :]: v for k, v in saved["state_dict"].items()})
    x = _batch(3)
    np.testing.assert_array_equal(tr.run(fresh, x), tr.run(ref_model, x))


def test_bare_state_dicts_and_no_prefix_are_accepted(published, tmp_path):
    ref_model, pt = published
    original = ref_model.state_dict()
    bare = tmp_path / "bare.pt"
    torch.save(original, bare)  # no training dict, no "module."
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in original.items()}}, wrapped)
    for path in (bare, wrapped):
        state = cw.read_torch_checkpoint(path)
        assert list(state) == list(original)
        for key, value in original.items():
            np.testing.assert_array_equal(state[key], value.numpy())


def test_file_without_batch_counters_converts(published, tmp_path):
    ref_model, _ = published
    old = {k: v for k, v in ref_model.state_dict().items() if "num_batches_tracked" not in k}
    src = tmp_path / "old.pt"
    torch.save({"state_dict": old}, src)
    cw.convert(src, tmp_path / "old.keras")
    back = tmp_path / "back.pt"
    cw.convert(tmp_path / "old.keras", back)
    state = _state(back)
    for key, value in old.items():
        assert torch.equal(state["module." + key], value), key
    counters = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert len(counters) == 14 and all(int(c) == 0 for c in counters)


def test_fine_tuning_heads_work_on_the_converted_model(published):
    _, pt = published
    model = cw.keras_model_from_torch(cw.read_torch_checkpoint(pt))
    x = model.get_layer("depth_7_relu").output
    x = keras.layers.GlobalAveragePooling3D()(x)
    out = keras.layers.Dense(2, activation="softmax")(x)
    classifier = keras.Model(model.input, out)
    x = np.random.default_rng(0).random((2, 1, 16, 16, 8)).astype("float32")
    assert tuple(classifier(x).shape) == (2, 2)
    seg = model.get_layer("depth_13_relu").output
    seg = keras.layers.Softmax(axis=1)(unet3d.Conv3D(3, 1)(seg))
    assert tuple(keras.Model(model.input, seg)(x).shape) == (2, 3, 16, 16, 8)


# ---------------------------------------------------------------------------------- bad input


def _no_files_left(folder: Path, keep: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == keep  # no partial or temporary file


def _save_modified(published, tmp_path, change) -> Path:
    ref_model, _ = published
    state = {"module." + k: v.clone() for k, v in ref_model.state_dict().items()}
    change(state)
    path = tmp_path / "other.pt"
    torch.save({"epoch": 0, "state_dict": state, "optimizer_state_dict": {}}, path)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda s: s.pop("module.up_tr128.ops.0.conv1.bias"),
            "Expected key 'up_tr128.ops.0.conv1.bias' with shape (16,)",
        ),
        (
            lambda s: s.__setitem__("module.extra.fc.weight", torch.zeros(3, 2)),
            "unexpected key 'extra.fc.weight' with shape (3, 2)",
        ),
        (
            lambda s: s.__setitem__("module.up_tr64.up_conv.weight", torch.zeros(16, 8, 2, 2, 2)),
            "Expected 'up_tr64.up_conv.weight' with shape (16, 16, 2, 2, 2) in ",
        ),
        (
            lambda s: s.pop("module.down_tr64.ops.0.conv1.weight"),
            "a 5-d 'down_tr64.ops.0.conv1.weight'. Received: no such key",
        ),
    ],
)
def test_other_networks_are_refused_naming_the_key(published, tmp_path, change, message):
    src = _save_modified(published, tmp_path, change)
    dst = tmp_path / "out.keras"
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        cw.convert(src, dst)
    if "up_conv" in message:
        assert str(err.value).endswith("Received: shape (16, 8, 2, 2, 2)")
    _no_files_left(tmp_path, {"other.pt"})


def test_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"Expected a PyTorch checkpoint .*notes\.pt.*cannot read"):
        cw.convert(text, tmp_path / "out.keras")
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(ValueError, match=r"holding list"):
        cw.read_torch_checkpoint(listing)
    other = tmp_path / "pickle.pt"
    other.write_bytes(pickle.dumps({"state_dict": {"a": object()}}, protocol=2))
    with pytest.raises(ValueError, match=r"Expected a PyTorch checkpoint"):
        cw.read_torch_checkpoint(other)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        cw.convert(tmp_path / "missing.pt", tmp_path / "out.keras")
    with pytest.raises(ValueError, match=r"Expected SRC \.pt and DST"):
        cw.convert(text, tmp_path / "out.onnx")
    _no_files_left(tmp_path, {"notes.pt", "list.pt", "pickle.pt"})


def test_keras_network_of_the_other_variant_is_refused(tmp_path):
    model = unet_model_3d(
        (1, 16, 16, 8), n_base_filters=2, batch_normalization=True, deconvolution=True
    )
    model.save(tmp_path / "keras_variant.keras")
    with pytest.raises(ValueError, match=r"variant='pytorch'.*'depth_0_bn' is a BatchNorm"):
        cw.convert(tmp_path / "keras_variant.keras", tmp_path / "out.pt")
    model.save_weights(tmp_path / "keras_variant.weights.h5")
    with pytest.raises(ValueError, match=r"Expected weights of unet_model_3d\(\.\.\., variant="):
        cw.convert(tmp_path / "keras_variant.weights.h5", tmp_path / "out.pt")
    _no_files_left(tmp_path, {"keras_variant.keras", "keras_variant.weights.h5"})


def test_interrupted_pt_write_leaves_nothing(published, tmp_path, monkeypatch):
    ref_model, _ = published
    state = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    dst = tmp_path / "out.pt"
    real_save = torch.save

    def save_then_interrupt(obj, path):
        real_save(obj, path)  # the whole file under the temporary name, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cw.save_torch_checkpoint(state, dst)
    _no_files_left(tmp_path, set())


# ------------------------------------------------------------------------------ command line


def _cli(args, pre: str = ""):
    code = (
        f"import sys; sys.argv = ['convert_weights.py'] + {list(map(str, args))!r}; {pre}"
        "import runpy; runpy.run_path('keras/convert_weights.py', run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        # The PyTorch backend starts faster than TensorFlow; the script needs torch anyway.
        env=dict(os.environ, KERAS_BACKEND="torch"),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_help_has_an_example():
    out = _cli(["--help"])
    assert out.returncode == 0, out.stderr
    assert "examples:" in out.stdout and "convert_weights.py" in out.stdout
    assert "Genesis_Chest_CT.pt" in out.stdout


def test_cli_converts_and_reports_bad_input_in_one_line(published, tmp_path):
    _, pt = published
    dst = tmp_path / "cli.weights.h5"
    out = _cli([pt, dst, "--data_format", "channels_last"])
    assert out.returncode == 0, out.stderr
    assert f"Wrote {dst}" in out.stdout and dst.is_file()
    bad = _cli([tmp_path / "absent.pt", tmp_path / "x.keras"])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("convert_weights.py: error: Expected")


def test_missing_torch_gives_an_install_hint(published, tmp_path):
    _, pt = published
    # A None in sys.modules makes `import torch` raise ImportError, as if it were not installed.
    out = _cli([pt, tmp_path / "x.keras"], pre="sys.modules['torch'] = None; ")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install torch" in lines[0], out.stderr
    assert not (tmp_path / "x.keras").exists()


# ----------------------------------------------------------------------- documentation snippet


def _doc_snippet(name: str) -> str:
    text = (ROOT / "docs" / "weights.md").read_text()
    pattern = r"<!-- snippet:([\w-]+) -->\s*```python\n(.*?)```\s*<!-- /snippet -->"
    found = dict(re.findall(pattern, text, re.S))
    assert name in found, f"docs/weights.md has no snippet {name!r}"
    return found[name]


@pytest.mark.multibackend
def test_pt_finetune_snippet_runs_as_written(published, tmp_path, monkeypatch, capsys):
    ref_model, pt = published
    weights = tmp_path / "tiny_torch.weights.h5"
    cw.convert(pt, weights)
    code = _doc_snippet("pt-finetune")
    swaps = {
        "input_rows, input_cols, input_deps = 64, 64, 32": (
            "input_rows, input_cols, input_deps = 16, 16, 8"
        ),
        'variant="pytorch")': 'variant="pytorch", n_base_filters=4)',
        '"pretrained_weights/Genesis_Chest_CT_torch.weights.h5"': repr(str(weights)),
        "epochs=100": "epochs=1",
    }
    for old, new in swaps.items():
        assert code.count(old) == 1, f"docs snippet changed: expected {old!r} exactly once"
        code = code.replace(old, new)
    rng = np.random.default_rng(7)
    labels = rng.random((6, 16, 16, 8)) > 0.7
    onehot = np.stack([~labels, labels], axis=1).astype("float32")
    data = {
        "x_train": rng.random((4, 1, 16, 16, 8)).astype("float32"),
        "y_train": onehot[:4],
        "x_valid": rng.random((2, 1, 16, 16, 8)).astype("float32"),
        "y_valid": onehot[4:],
    }
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the snippet appends keras/
    before = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")  # as a fresh `import unet3d` leaves it
    try:
        namespace = {"__name__": "__snippet__", **data}
        exec(compile(code, "docs/weights.md:pt-finetune", "exec"), namespace)
    finally:
        keras.config.set_image_data_format(before)
    assert f"Load pre-trained Models Genesis weights from {weights}" in capsys.readouterr().out
    model = namespace["model"]
    probs = model.predict(data["x_valid"], verbose=0)
    assert probs.shape == (2, 2, 16, 16, 8)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    assert {"loss", "dice_coef", "val_loss"} <= set(model.history.history)
    # The encoder started from the PyTorch weights: one short fine-tuning keeps them close.
    kernel = np.asarray(namespace["models_genesis"].get_layer("depth_0_conv").kernel).ravel()
    source = ref_model.state_dict()["down_tr64.ops.0.conv1.weight"].numpy()
    assert np.corrcoef(kernel, np.transpose(source, (2, 3, 4, 1, 0)).ravel())[0, 1] > 0.99
