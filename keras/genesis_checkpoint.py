"""Where a pre-training run writes, and the last-epoch checkpoint that `--resume` reads.

One run of `Genesis_Chest_CT.py` writes, in `--model_path` (see docs/pretraining.md):

  {exp_name}.h5           best weights so far (written by `genesis_callbacks`)
  {exp_name}.last.npz     last finished epoch: weights, optimizer variables and `RunState`
  {exp_name}.csv          one row per epoch (Keras' CSVLogger; `truncate_csv` trims it on resume)
  {exp_name}.json         the resolved configuration
  {exp_name}.txt          the model summary
  Logs/{exp_name}/run-N/  TensorBoard logs, a new run folder per start (`next_run_dir`)

Every file written here goes through `genesis_files.atomic_path`, so a crash or a kill never
leaves a truncated file under its final name.

Imports: stdlib, numpy, genesis_files (no Keras: the model is only used through its methods).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from typing import Any

import numpy as np

from genesis_files import atomic_path

__all__ = [
    "RunPaths",
    "RunState",
    "check_writable",
    "load_last_checkpoint",
    "next_run_dir",
    "read_checkpoint_state",
    "save_last_checkpoint",
    "truncate_csv",
    "write_text_atomic",
]


@dataclasses.dataclass
class RunPaths:
    """Where one run writes its outputs (absolute paths).

    Attributes:
        best: the best weights (.h5 model file).
        last: the last-epoch checkpoint (.last.npz).
        csv: the per-epoch log.
        config_json: the resolved configuration.
        summary: the model summary.
        logs: the TensorBoard folder of this experiment (runs go in run-N below it).
    """

    best: str
    last: str
    csv: str
    config_json: str
    summary: str
    logs: str

    @classmethod
    def of(cls, config: Any) -> RunPaths:
        """The paths of the run `config` describes (model_path, logs_path and exp_name).

        Args:
            config: the run's configuration (a `config.models_genesis_config`, or anything with
                those three attributes: this module does not import config).

        Returns:
            Its `RunPaths`.
        """
        base = os.path.join(os.path.abspath(config.model_path), config.exp_name)
        return cls(
            best=base + ".h5",
            last=base + ".last.npz",
            csv=base + ".csv",
            config_json=base + ".json",
            summary=base + ".txt",
            logs=os.path.join(os.path.abspath(config.logs_path), config.exp_name),
        )


@dataclasses.dataclass
class RunState:
    """What a last-epoch checkpoint records besides the arrays (its JSON `state` entry).

    The field order is the key order of the JSON in the file.

    Attributes:
        batch_size: the batch size the epoch ran with.
        exp_name: the experiment name.
        epoch: the last finished epoch (0-based).
        finished: True when early stopping ended the run at this epoch.
        best: the best val_loss so far (None before any finite one).
        learning_rate: the optimizer's learning rate after the epoch.
        early_stopping: `ResumableEarlyStopping.get_state()`.
        reduce_lr: `ResumableReduceLROnPlateau.get_state()`.
    """

    batch_size: int
    exp_name: str
    epoch: int
    finished: bool
    best: float | None
    learning_rate: float
    early_stopping: dict = dataclasses.field(default_factory=dict)
    reduce_lr: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """The state as JSON-able data, for `save_last_checkpoint`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> RunState:
        """The state of `read_checkpoint_state`'s dict.

        Args:
            values: the checkpoint's state dict.

        Returns:
            A `RunState`; keys it does not know are ignored.
        """
        return cls(
            batch_size=values.get("batch_size", 0),
            exp_name=values.get("exp_name", ""),
            epoch=int(values["epoch"]),
            finished=bool(values.get("finished", False)),
            best=values.get("best"),
            learning_rate=float(values["learning_rate"]),
            early_stopping=values.get("early_stopping") or {},
            reduce_lr=values.get("reduce_lr") or {},
        )


def check_writable(folder: str) -> None:
    """Create `folder` if needed and check that a file can be written in it.

    Args:
        folder: the run's model_path.

    Raises:
        PermissionError: it cannot be created or written to.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PermissionError(
            f"Cannot write to model_path {folder!r}: {exc}. "
            "Expected a writable folder; pass another --model_path."
        ) from exc


def next_run_dir(logs: str) -> str:
    """`logs/run-N` with N one above the highest existing run (old runs are never wiped).

    Args:
        logs: the experiment's TensorBoard folder (need not exist).

    Returns:
        The path of the new run folder (not created).
    """
    names = os.listdir(logs) if os.path.isdir(logs) else []
    numbers = [int(m.group(1)) for name in names if (m := re.fullmatch(r"run-(\d+)", name))]
    return os.path.join(logs, f"run-{max(numbers, default=0) + 1}")


def write_text_atomic(path: str, text: str) -> None:
    """Write a text file through `genesis_files.atomic_path`.

    Args:
        path: the final file.
        text: its whole content.
    """
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_last_checkpoint(path: str, model: Any, state: dict) -> None:
    """Write weights, optimizer variables and `state` to one .npz, atomically.

    Args:
        path: the checkpoint file (`{exp_name}.last.npz`).
        model: a compiled model whose optimizer is built.
        state: JSON-able data (the trainer's is `RunState.to_dict()`).
    """
    arrays = {"state": np.array(json.dumps(state))}
    for i, w in enumerate(model.get_weights()):
        arrays[f"weight_{i:04d}"] = w
    for i, v in enumerate(model.optimizer.variables):
        arrays[f"optimizer_{i:04d}"] = np.asarray(v.numpy())
    # A file object, so that np.savez adds no suffix to the temporary name.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def read_checkpoint_state(path: str) -> dict:
    """The `state` dict of a last-epoch checkpoint (no array is read).

    Args:
        path: a file written by `save_last_checkpoint`.

    Returns:
        The state it was saved with.
    """
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["state"]))


def load_last_checkpoint(path: str, model: Any) -> dict:
    """Restore weights and optimizer variables from `save_last_checkpoint`'s file.

    Args:
        path: the checkpoint file.
        model: a compiled model of the same architecture.

    Returns:
        The checkpoint's state dict.

    Raises:
        ValueError: the checkpoint does not fit this model (naming the file).
    """
    with np.load(path, allow_pickle=False) as z:
        state = json.loads(str(z["state"]))
        weights = [z[k] for k in sorted(k for k in z.files if k.startswith("weight_"))]
        opt_values = [z[k] for k in sorted(k for k in z.files if k.startswith("optimizer_"))]
    expected = [tuple(w.shape) for w in model.weights]
    received = [tuple(w.shape) for w in weights]
    if expected != received:
        raise ValueError(
            f"The checkpoint {path} does not fit this model: expected {len(expected)} weights "
            f"of shapes {expected[:3]}..., received {len(received)} of shapes {received[:3]}... "
            "Resume with the same --input_rows/--input_cols/--input_deps/--n_base_filters."
        )
    model.set_weights(weights)
    opt = model.optimizer
    if not opt.built:
        opt.build(model.trainable_variables)
    if [tuple(v.shape) for v in opt.variables] != [tuple(v.shape) for v in opt_values]:
        raise ValueError(f"The optimizer state in {path} does not fit this model's optimizer.")
    for var, value in zip(opt.variables, opt_values, strict=True):  # lengths checked above
        var.assign(value.astype(var.dtype))  # np.load gives arrays, 0-d ones included
    return state


def truncate_csv(path: str, first_dropped_epoch: int) -> None:
    """Keep the header and the rows of epochs < `first_dropped_epoch` (rewritten atomically).

    A crash between the CSV row and the checkpoint of an epoch leaves a row that the resumed
    run will write again; this drops it so every epoch appears exactly once.

    Args:
        path: the run's CSV log (nothing happens when it does not exist or is empty).
        first_dropped_epoch: the first epoch (0-based) whose row goes.
    """
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    if not lines:
        return
    kept = [lines[0]]
    for line in lines[1:]:
        if not line.endswith(("\n", "\r")):
            continue  # a row cut off by the crash
        first = line.split(",", 1)[0].strip()
        if first.isdigit() and int(first) < first_dropped_epoch:
            kept.append(line)
    write_text_atomic(path, "".join(kept))
