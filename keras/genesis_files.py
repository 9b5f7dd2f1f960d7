"""File conventions shared by extraction, transforms, config, dataset and trainer.

Standard library only (no NumPy, no Keras), so the Keras-free extraction CLI and the pure-NumPy
transforms can import it as well as the trainer. It holds, once each:

* the two tensor layouts (`DATA_FORMATS`) and which default each part of the project uses;
* the names of the cube files that extraction writes and pre-training reads;
* the original's transform probabilities and sample-picture defaults, which both the pre-training
  config and the transforms' config-like objects fall back to;
* `atomic_path`, the one write-then-rename used for every output outside the model file itself.

`unet3d.py` is the one deliberate exception: it must import only Keras so a fine-tuning user can
take it alone, so it keeps its own copy of the two layout names and of the atomic save of model
files (`tests/test_genesis_files.py` checks that the copies agree). See docs/design.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator

__all__ = [
    "SAMPLE_DEFAULTS",
    "TRANSFORM_RATES",
    "DATA_FORMATS",
    "MODEL_DATA_FORMAT",
    "TRAINING_DATA_FORMAT",
    "atomic_path",
    "cube_file_name",
    "cube_file_names",
    "original_cube_file_name",
]

# The two tensor layouts. The weights do not depend on the layout (kernel shapes are the same),
# so a file saved in one loads into the other.
DATA_FORMATS = ("channels_first", "channels_last")
# The library API (`unet_model_3d`, `GenesisPairDataset`) defaults to the original's layout, so
# code written for the original keeps working unchanged.
MODEL_DATA_FORMAT = "channels_first"
# The pre-training command line defaults to channels-last: faster on GPUs and CPUs alike, and the
# weights it saves are the same as in the original's layout.
TRAINING_DATA_FORMAT = "channels_last"


# The original's transform probabilities (docs/transforms.md), in the order the config lists them.
# outpaint_rate is kept for the original's config files; inpaint_rate alone decides the painting.
TRANSFORM_RATES = {
    "flip_rate": 0.4,
    "local_rate": 0.5,
    "nonlinear_rate": 0.9,
    "paint_rate": 0.9,
    "outpaint_rate": 0.8,
    "inpaint_rate": 0.2,
}
# Where and whether sample pictures of training pairs are written (docs/pretraining.md).
SAMPLE_DEFAULTS = {
    "save_samples": "png",
    "exp_name": "Vnet-genesis_chest_ct",
    "sample_path": "pair_samples",
}


def cube_file_name(scale: int, rows: int, cols: int, deps: int, fold: int) -> str:
    """The name extraction writes for one fold: ``bat_{scale}_s_{R}x{C}x{D}_{fold}.npy``."""
    return f"bat_{scale}_s_{rows}x{cols}x{deps}_{fold}.npy"


def original_cube_file_name(scale: int, rows: int, cols: int, deps: int, fold: int) -> str:
    """The name the original trainer read: ``bat_{scale}_{R}x{C}x{D}_{fold}.npy``."""
    return f"bat_{scale}_{rows}x{cols}x{deps}_{fold}.npy"


def cube_file_names(scale: int, rows: int, cols: int, deps: int, fold: int) -> list[str]:
    """The names pre-training looks for, in order: this project's, then the original's."""
    return [
        cube_file_name(scale, rows, cols, deps, fold),
        original_cube_file_name(scale, rows, cols, deps, fold),
    ]


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _fsync(path: str) -> None:
    # A directory cannot be opened for writing; its files were synced by whoever wrote them.
    if os.path.isfile(path):
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, sync: bool = True) -> Iterator[str]:
    """Write `path` atomically: yield a temporary path beside it, rename it over `path` on success.

    The temporary name is ``.tmp-{random}-{name}`` in the same folder, so it ends with the final
    name and writers that choose a format by the suffix (``np.save``, Keras, SimpleITK) choose
    the same one. It does not exist yet when yielded. On any exception, Ctrl-C included, the
    temporary file (or folder) is removed and the final path is left as it was.

    Args:
        path: the final file (or folder) path.
        sync: flush a written file to disk before the rename, so a power loss cannot leave a
            renamed but empty file.

    Returns:
        A context manager yielding the temporary path (a str).
    """
    final = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(final)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex[:12]}-{name}")
    try:
        yield tmp
        if sync:
            _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
