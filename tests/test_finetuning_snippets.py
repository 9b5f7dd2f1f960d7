"""The README's fine-tuning snippets, extracted from README.md and run as written.

Only a few literal strings are swapped for tiny ones (each must occur exactly once, so an edit
to the README that drops one fails here): the input size, the filter count, the weight path
and the epochs. The weights are a Keras 2 file written by tf_keras, like the published one.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keras2_reference import keras2_reference

ROOT = Path(__file__).resolve().parents[1]


def readme_snippets() -> dict[str, str]:
    """The ```python blocks marked `<!-- snippet:NAME -->` in the README's finetuning section."""
    text = (ROOT / "README.md").read_text()
    section = text[
        text.index("<!-- SECTION:finetuning -->") : text.index("<!-- /SECTION:finetuning -->")
    ]
    return dict(re.findall(r"<!-- snippet:(\w+) -->\s*```python\n(.*?)```", section, re.S))


def _substitute(code: str, weight_path: str) -> str:
    swaps = {
        "input_rows, input_cols, input_deps = 64, 64, 32": (
            "input_rows, input_cols, input_deps = 16, 16, 8"
        ),
        "batch_normalization=True)": "batch_normalization=True, n_base_filters=4)",
        '"pretrained_weights/Genesis_Chest_CT.h5"': repr(weight_path),
        "epochs=100": "epochs=1",
    }
    for old, new in swaps.items():
        assert code.count(old) == 1, f"README snippet changed: expected {old!r} exactly once"
        code = code.replace(old, new)
    return code


@pytest.fixture
def run_snippet(monkeypatch, capsys):
    """Exec a README snippet from the repository root, as a fresh script would run it."""
    ref = keras2_reference(
        input_shape=(1, 16, 16, 8), depth=4, n_base_filters=4, batch_normalization=True
    )
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the snippet appends keras/
    # A fresh process would have channels_first from `import unet3d`; other tests may have
    # changed it.
    before = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")

    def run(name: str, data: dict) -> dict:
        code = _substitute(readme_snippets()[name], ref.weights_only)
        namespace = {"__name__": "__snippet__", **data}
        exec(compile(code, f"README.md:{name}", "exec"), namespace)
        assert (
            f"Load pre-trained Models Genesis weights from {ref.weights_only}"
            in capsys.readouterr().out
        )
        return namespace

    yield run, ref
    keras.config.set_image_data_format(before)


def test_readme_has_both_snippets_with_the_typo_fixed():
    snippets = readme_snippets()
    assert set(snippets) == {"classification", "segmentation"}
    for code in snippets.values():
        assert "models.compile" not in code and "model.compile(" in code
        assert "from unet3d import *" in code


def _loaded_from_file(namespace, ref):
    """The pre-trained encoder still carries the file's weights (one small fine-tuning step)."""
    kernel = np.asarray(namespace["models_genesis"].get_layer("depth_0_conv").kernel).ravel()
    return np.corrcoef(kernel, ref.weights[0].ravel())[0, 1]


@pytest.mark.multibackend
def test_classification_snippet(run_snippet):
    run, ref = run_snippet
    rng = np.random.default_rng(0)
    data = {
        "x_train": rng.random((4, 1, 16, 16, 8)).astype("float32"),
        "y_train": np.eye(2, dtype="float32")[[0, 1, 0, 1]],
        "x_valid": rng.random((2, 1, 16, 16, 8)).astype("float32"),
        "y_valid": np.eye(2, dtype="float32")[[1, 0]],
    }
    ns = run("classification", data)
    model = ns["model"]
    assert model.input_shape == (None, 1, 16, 16, 8)
    assert model.get_layer(index=-3).output.shape == (
        None,
        4 * 16,
    )  # GAP of depth_7_relu's channels
    probs = model.predict(data["x_valid"], verbose=0)
    assert probs.shape == (2, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    assert _loaded_from_file(ns, ref) > 0.99


@pytest.mark.multibackend
def test_segmentation_snippet(run_snippet):
    run, ref = run_snippet
    rng = np.random.default_rng(1)
    labels = rng.random((6, 16, 16, 8)) > 0.7
    onehot = np.stack([~labels, labels], axis=1).astype("float32")
    data = {
        "x_train": rng.random((4, 1, 16, 16, 8)).astype("float32"),
        "y_train": onehot[:4],
        "x_valid": rng.random((2, 1, 16, 16, 8)).astype("float32"),
        "y_valid": onehot[4:],
    }
    ns = run("segmentation", data)
    model = ns["model"]
    probs = model.predict(data["x_valid"], verbose=0)
    assert probs.shape == (2, 2, 16, 16, 8)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)  # softmax over channels
    history = model.history.history
    assert {"loss", "mean_iou", "dice_coef", "val_loss"} <= set(history)
    assert _loaded_from_file(ns, ref) > 0.99
