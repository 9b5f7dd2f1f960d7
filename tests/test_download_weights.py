"""Getting the published weights (docs/weights.md): the Hugging Face download code path, offline.

There is no network here, so each test builds a Hugging Face cache in the hub's own layout
(``models--MrGiovanni--ModelsGenesis/{blobs, refs/main, snapshots/<commit>/FILE}``) under a
temporary ``HF_HUB_CACHE`` or ``HF_HOME`` and runs with ``HF_HUB_OFFLINE=1``: the real
``huggingface_hub.hf_hub_download`` finds the files there as it would after a download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from huggingface_hub import constants as hub_constants

import download_weights as dw
import genesis_trainer
import torch_reference as tr
from unet3d import unet_model_3d

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "4f1c0ffee0ddba11de7ec7ab1e5a1adf00d5eed5"


def make_hub_cache(cache: Path, files: dict[str, Path]) -> dict[str, Path]:
    """Put files into a hub cache as hf_hub_download leaves them; returns the snapshot paths."""
    repo = cache / "models--MrGiovanni--ModelsGenesis"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir(exist_ok=True)
    snapshots = repo / "snapshots" / COMMIT
    snapshots.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, src in files.items():
        etag = hashlib.sha256(src.read_bytes()).hexdigest()
        shutil.copyfile(src, repo / "blobs" / etag)
        link = snapshots / name
        link.symlink_to(Path("..") / ".." / "blobs" / etag)
        out[name] = link
    return out


def _run(code: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    full = dict(os.environ, KERAS_BACKEND="torch", HF_HUB_OFFLINE="1", **env)
    if "HF_HOME" in env:  # a cache set in the environment would win over HF_HOME
        full.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _cli(args: list[str], env: dict, pre: str = "") -> subprocess.CompletedProcess:
    code = (
        f"import sys; sys.argv = ['download_weights.py'] + {args!r}; {pre}"
        "import runpy; runpy.run_path('keras/download_weights.py', run_name='__main__')"
    )
    return _run(code, env)


@pytest.fixture(scope="module")
def published_pt(tmp_path_factory) -> Path:
    """A .pt of the full-size PyTorch network in the published format (default init)."""
    path = tmp_path_factory.mktemp("published") / "Genesis_Chest_CT.pt"
    tr.save_published(tr.ReferenceUNet3D(n=32), path)
    return path


def test_resolve_weights_finds_the_cached_file_offline(published_pt, tmp_path):
    cache = tmp_path / "hub"
    snap = make_hub_cache(cache, {"Genesis_Chest_CT.pt": published_pt})["Genesis_Chest_CT.pt"]
    code = (
        "import sys; sys.path.insert(0, 'keras'); import download_weights as d;"
        "print(d.resolve_weights('hf:Genesis_Chest_CT.pt'))"
    )
    for env in ({"HF_HUB_CACHE": str(cache)}, {"HF_HOME": str(tmp_path / "home")}):
        if "HF_HOME" in env:
            (tmp_path / "home").mkdir(exist_ok=True)
            os.symlink(cache, tmp_path / "home" / "hub")  # HF_HOME/hub is the default cache
        out = _run(code, env)
        assert out.returncode == 0, out.stderr
        path = out.stdout.strip().splitlines()[-1]
        assert Path(path).parent.name == COMMIT and Path(path).name == "Genesis_Chest_CT.pt"
        assert os.path.samefile(path, snap)
        assert Path(path).read_bytes() == published_pt.read_bytes()


def test_plain_paths_pass_through_and_bad_names_are_refused():
    assert dw.resolve_weights("pretrained_weights/Genesis_Chest_CT.h5") == (
        "pretrained_weights/Genesis_Chest_CT.h5"
    )
    assert dw.resolve_weights(Path("a/b.h5")) == "a/b.h5"
    with pytest.raises(ValueError, match=r"Expected hf:FILE .*Received: 'hf:'"):
        dw.resolve_weights("hf:")


def test_offline_miss_says_what_to_do(tmp_path):
    code = (
        "import sys; sys.path.insert(0, 'keras'); import download_weights as d;"
        "d.resolve_weights('hf:Genesis_Chest_CT.h5')"
    )
    out = _run(code, {"HF_HUB_CACHE": str(tmp_path / "empty")})
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("FileNotFoundError: Expected Genesis_Chest_CT.h5 of MrGiovanni/")
    assert "HF_HUB_OFFLINE is set" in last and "unset HF_HUB_OFFLINE" in last
    assert "python keras/download_weights.py" in last
    assert "huggingface.co/MrGiovanni/ModelsGenesis/resolve/main/Genesis_Chest_CT.h5" in last


def test_cli_pt_checks_and_copies_then_reruns_cleanly(published_pt, tmp_path):
    cache = tmp_path / "hub"
    make_hub_cache(cache, {"Genesis_Chest_CT.pt": published_pt})
    dest = tmp_path / "weights"
    env = {"HF_HUB_CACHE": str(cache)}
    out = _cli(["--format", "pt", "--to", str(dest)], env)
    assert out.returncode == 0, out.stderr
    copied = dest / "Genesis_Chest_CT.pt"
    assert copied.read_bytes() == published_pt.read_bytes()
    assert "the PyTorch network of Genesis_Chest_CT.pt, 106 tensors" in out.stdout
    assert "copied from" in out.stdout
    again = _cli(["--format", "pt", "--to", str(dest)], env)
    assert again.returncode == 0 and "already the same as" in again.stdout
    assert sorted(p.name for p in dest.iterdir()) == ["Genesis_Chest_CT.pt"]


def test_cli_refuses_a_file_of_another_network_and_copies_nothing(tmp_path):
    tiny = tmp_path / "src" / "Genesis_Chest_CT.pt"
    tiny.parent.mkdir()
    tr.save_published(tr.ReferenceUNet3D(n=4), tiny)
    cache = tmp_path / "hub"
    make_hub_cache(cache, {"Genesis_Chest_CT.pt": tiny})
    out = _cli(["--format", "pt", "--to", str(tmp_path / "weights")], {"HF_HUB_CACHE": str(cache)})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "Expected (in_channels, n_base_filters, n_labels)=(1, 32, 1)" in lines[0]
    assert "Received: (1, 4, 1)" in lines[0]
    assert not (tmp_path / "weights").exists()


@pytest.mark.slow
def test_cli_h5_loads_into_the_published_network(tmp_path):
    src = tmp_path / "src" / "Genesis_Chest_CT.h5"
    src.parent.mkdir()
    model = unet_model_3d((1, 64, 64, 32), batch_normalization=True)
    model.save(src)  # an .h5 model file, as the published one is
    cache = tmp_path / "hub"
    make_hub_cache(cache, {"Genesis_Chest_CT.h5": src})
    out = _cli(["--to", str(tmp_path / "weights")], {"HF_HUB_CACHE": str(cache)})
    assert out.returncode == 0, out.stderr
    assert "the Keras network of Genesis_Chest_CT.h5, 16,324,929 parameters" in out.stdout
    assert (tmp_path / "weights" / "Genesis_Chest_CT.h5").read_bytes() == src.read_bytes()


def test_cli_offline_miss_is_one_line(tmp_path):
    out = _cli(["--to", str(tmp_path / "w")], {"HF_HUB_CACHE": str(tmp_path / "empty")})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE is set" in lines[0], out.stderr


def test_cli_help_has_examples():
    out = _run(
        "import runpy, sys; sys.argv = ['download_weights.py', '--help'];"
        "runpy.run_path('keras/download_weights.py', run_name='__main__')",
        {},
    )
    assert out.returncode == 0, out.stderr
    assert "examples:" in out.stdout and "--format" in out.stdout and "hf:" in out.stdout


def test_missing_huggingface_hub_gives_an_install_hint(tmp_path):
    out = _cli(["--to", str(tmp_path / "w")], {}, pre="sys.modules['huggingface_hub'] = None; ")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install huggingface_hub" in lines[0], out.stderr
    code = (
        "import sys; sys.modules['huggingface_hub'] = None; sys.path.insert(0, 'keras');"
        "import download_weights as d; print(d.resolve_weights('w/x.h5'));"
        "d.resolve_weights('hf:Genesis_Chest_CT.h5')"
    )
    out = _run(code, {})
    assert out.stdout.strip() == "w/x.h5"  # plain paths need no hub
    assert out.stderr.strip().splitlines()[-1] == f"ImportError: {dw.HUB_INSTALL_HINT}"


def test_trainer_weights_accept_hf_names(tmp_path, monkeypatch):
    # The trainer's --weights loader resolves hf:FILE through the same cache.
    tiny = unet_model_3d((1, 16, 16, 8), n_base_filters=2, batch_normalization=True)
    rng = np.random.default_rng(0)
    tiny.set_weights([rng.normal(size=w.shape).astype("float32") for w in tiny.weights])
    src = tmp_path / "src" / "Genesis_Chest_CT.h5"
    src.parent.mkdir()
    tiny.save(src)
    cache = tmp_path / "hub"
    make_hub_cache(cache, {"Genesis_Chest_CT.h5": src})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    fresh = unet_model_3d((1, 16, 16, 8), n_base_filters=2, batch_normalization=True)
    genesis_trainer.load_weights_checked(fresh, "hf:Genesis_Chest_CT.h5")
    for a, b in zip(fresh.weights, tiny.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    # A name that is not in the cache is bad input to the trainer: its one type, the cause kept.
    with pytest.raises(
        genesis_trainer.PretrainingInputError, match=r"Genesis_Chest_CT\.pt of MrGiovanni"
    ) as info:
        genesis_trainer.load_weights_checked(fresh, "hf:Genesis_Chest_CT.pt")
    assert isinstance(info.value.__cause__, FileNotFoundError)
