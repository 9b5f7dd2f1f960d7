"""Pre-training settings of Models Genesis (plain data: no Keras import).

`models_genesis_config` keeps the original's field names and defaults (docs/pretraining.md) and
adds a few settings the original hard-coded or lacked (seed, network width, step counts, mixed
precision, data layout, resuming, multi-device training). Every field can be set on the command
line of `keras/Genesis_Chest_CT.py` as `--field value`.

Layouts: the library API (`unet3d.unet_model_3d`, `GenesisPairDataset`) defaults to the
original's channels-first layout, so code written for the original keeps working; pre-training
defaults to channels-last (`genesis_files.TRAINING_DATA_FORMAT`), which trains faster. The
weights do not depend on the layout: the saved .h5 loads into a model of either.

Imports: stdlib, genesis_files.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from genesis_files import DATA_FORMATS, SAMPLE_DEFAULTS, TRAINING_DATA_FORMAT, TRANSFORM_RATES

DISTRIBUTE_MODES = ("auto", "off", "all")


class PretrainingInputError(ValueError):
    """Bad pre-training input (flags, files, weights, folders), raised where it is checked.

    `Genesis_Chest_CT.py` prints it in one line and exits with status 2.
    """


# HOST:PORT, the host a name, an IPv4 address or a bracketed IPv6 address.
ADDRESS_PATTERN = r"(\[[0-9A-Fa-f:.]+\]|[\w.\-]+):\d{1,5}"


@dataclass
class models_genesis_config:  # the original's class name (N801 is ignored project-wide)
    """Models Genesis pre-training configuration.

    Fields left as None are derived in `__post_init__`: `exp_name` is `model + "-" + suffix`,
    `logs_path` is `model_path/Logs`. `steps_per_epoch` and `validation_steps` stay None in the
    config and mean "number of cubes // batch_size", as the original.
    """

    # Experiment naming.
    model: str = "Vnet"
    suffix: str = "genesis_chest_ct"
    exp_name: str | None = None
    # Data: the folder holding the extracted cube files (the original called it DATA_DIR / data).
    data: str = "generated_cubes"
    train_fold: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    valid_fold: list[int] = field(default_factory=lambda: [5, 6])
    test_fold: list[int] = field(default_factory=lambda: [7, 8, 9])
    # Cube files by path or glob pattern instead of folds (docs/own_data.md). Empty lists (not
    # None, so every list field is a plain list on the command line) mean "use the folds".
    train_files: list[str] = field(default_factory=list)
    valid_files: list[str] = field(default_factory=list)
    valid_fraction: float | None = None
    scale: int = 32
    input_rows: int = 64
    input_cols: int = 64
    input_deps: int = 32
    # Model pre-training.
    weights: str | None = None
    batch_size: int = 6
    optimizer: str = "sgd"
    lr: float = 1.0
    nb_epoch: int = 10000
    patience: int = 50
    workers: int = 10
    max_queue_size: int = 40
    save_samples: str | None = SAMPLE_DEFAULTS["save_samples"]
    verbose: int = 1
    # Image deformation (docs/transforms.md).
    flip_rate: float = TRANSFORM_RATES["flip_rate"]
    local_rate: float = TRANSFORM_RATES["local_rate"]
    nonlinear_rate: float = TRANSFORM_RATES["nonlinear_rate"]
    paint_rate: float = TRANSFORM_RATES["paint_rate"]
    outpaint_rate: float = TRANSFORM_RATES["outpaint_rate"]
    inpaint_rate: float = TRANSFORM_RATES["inpaint_rate"]
    # Outputs. Relative paths are taken against the current working directory.
    model_path: str = "pretrained_weights"
    logs_path: str | None = None
    sample_path: str = SAMPLE_DEFAULTS["sample_path"]
    # Additions (the original hard-coded these or lacked them); defaults keep its behaviour.
    seed: int = 0
    n_base_filters: int = 32
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    mixed_precision: bool = False
    data_format: str = TRAINING_DATA_FORMAT  # "channels_last": see the module docstring
    resume: bool = False
    use_multiprocessing: bool = False
    distribute: str = "auto"
    # Multi-process training (docs/multihost.md); None: single process or the environment's.
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    collective_timeout: int = 300

    def __post_init__(self) -> None:
        if self.exp_name is None:
            self.exp_name = f"{self.model}-{self.suffix}"
        if self.logs_path is None:
            self.logs_path = f"{self.model_path.rstrip('/')}/Logs"
        self.validate()

    def validate(self) -> None:
        """Check value ranges; raise PretrainingInputError naming the field and the range."""
        for name in (
            "batch_size",
            "input_rows",
            "input_cols",
            "input_deps",
            "scale",
            "nb_epoch",
            "n_base_filters",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PretrainingInputError(
                    f"Expected {name} to be a positive integer. Received: {name}={value!r}"
                )
        for name in ("patience", "workers", "max_queue_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PretrainingInputError(
                    f"Expected {name} to be an integer >= 0. Received: {name}={value!r}"
                )
        for name in ("steps_per_epoch", "validation_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PretrainingInputError(
                    f"Expected {name} to be None or a positive integer. Received: {name}={value!r}"
                )
        for name in TRANSFORM_RATES:
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise PretrainingInputError(
                    f"Expected {name} in [0, 1]. Received: {name}={value!r}"
                )
        if not float(self.lr) > 0:
            raise PretrainingInputError(f"Expected lr > 0. Received: lr={self.lr!r}")
        if self.optimizer.lower() != "sgd":
            # The original only ever ran SGD; other names are refused rather than ignored.
            raise PretrainingInputError(
                f"Expected optimizer='sgd' (the only one the original trains with). "
                f"Received: optimizer={self.optimizer!r}"
            )
        if self.data_format not in DATA_FORMATS:
            raise PretrainingInputError(
                f"Expected data_format in {DATA_FORMATS}. "
                f"Received: data_format={self.data_format!r}"
            )
        if self.distribute not in DISTRIBUTE_MODES:
            raise PretrainingInputError(
                f"Expected distribute in {DISTRIBUTE_MODES}. "
                f"Received: distribute={self.distribute!r}"
            )
        self._validate_processes()
        if self.save_samples not in (None, "png"):
            raise PretrainingInputError(
                f"Expected save_samples to be 'png' or None. "
                f"Received: save_samples={self.save_samples!r}"
            )
        for name in ("train_fold", "valid_fold", "test_fold"):
            folds = getattr(self, name)
            if not isinstance(folds, (list, tuple)) or not all(
                isinstance(f, int) and not isinstance(f, bool) for f in folds
            ):
                raise PretrainingInputError(
                    f"Expected {name} to be a list of integers. Received: {name}={folds!r}"
                )
        self._validate_files()
        if not self.train_fold or not self.valid_fold:
            raise PretrainingInputError(
                "Expected at least one training and one validation fold. "
                f"Received: train_fold={self.train_fold}, "
                f"valid_fold={self.valid_fold}"
            )

    def _validate_processes(self) -> None:
        """Check the multi-process fields (their meaning is in genesis_multihost)."""
        timeout = self.collective_timeout
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1:
            raise PretrainingInputError(
                "Expected collective_timeout to be a positive integer (seconds). "
                f"Received: collective_timeout={timeout!r}"
            )
        n, pid = self.num_processes, self.process_id
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise PretrainingInputError(
                f"Expected num_processes >= 1. Received: num_processes={n!r}"
            )
        if pid is not None and (
            not isinstance(pid, int) or isinstance(pid, bool) or pid < 0 or (n and pid >= n)
        ):
            raise PretrainingInputError(
                "Expected process_id in [0, num_processes). "
                f"Received: process_id={pid!r}, num_processes={n!r}"
            )
        address = self.coordinator_address
        if address is not None and not re.fullmatch(ADDRESS_PATTERN, str(address)):
            raise PretrainingInputError(
                "Expected coordinator_address as HOST:PORT (e.g. 10.0.0.1:12345). "
                f"Received: coordinator_address={address!r}"
            )

    def _validate_files(self) -> None:
        """Check the cube-file fields: lists of paths or patterns, a fraction in (0, 1)."""
        for name in ("train_files", "valid_files"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise PretrainingInputError(
                    f"Expected {name} to be a list of paths or glob patterns. "
                    f"Received: {name}={value!r}"
                )
        fraction = self.valid_fraction
        if fraction is not None and (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0.0 < fraction < 1.0
        ):
            raise PretrainingInputError(
                f"Expected valid_fraction in (0, 1). Received: valid_fraction={fraction!r}"
            )
        if fraction is not None and self.valid_files:
            raise PretrainingInputError(
                "Expected valid_files or valid_fraction, not both. "
                f"Received: valid_files={self.valid_files}, valid_fraction={fraction}"
            )
        if self.train_files and not self.valid_files and fraction is None:
            raise PretrainingInputError(
                "Expected valid_files or valid_fraction with train_files. "
                f"Received: train_files={self.train_files} and neither"
            )

    @property
    def input_shape(self) -> tuple:
        """The network input shape of one cube in this config's `data_format`."""
        spatial = (self.input_rows, self.input_cols, self.input_deps)
        return (1,) + spatial if self.data_format == "channels_first" else spatial + (1,)

    def to_dict(self) -> dict:
        """All fields as plain JSON-able data."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """All fields as an indented JSON document."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values: dict) -> models_genesis_config:
        """Build a config from a dict (such as a saved JSON); unknown keys are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise PretrainingInputError(
                f"Expected config keys among {sorted(names)}. Received unknown keys: {unknown}"
            )
        return cls(**values)

    def display(self) -> None:
        """Print the resolved configuration, one `name: value` line per field."""
        print("Configurations:")
        for f in dataclasses.fields(self):
            value: Any = getattr(self, f.name)
            print(f"{f.name:30s}{value}")
        print()


# One line of --help per field (the trainer generates its flags from the dataclass fields).
FIELD_HELP = {
    "model": "model name, the first part of exp_name",
    "suffix": "experiment suffix, the second part of exp_name",
    "exp_name": "experiment name: file names of the weights, logs and samples",
    "data": "folder of the cube files bat_{scale}_s_{R}x{C}x{D}_{fold}.npy "
    "(or the original's bat_{scale}_{R}x{C}x{D}_{fold}.npy)",
    "train_fold": "folds to train on",
    "valid_fold": "folds to validate on",
    "test_fold": "folds kept for testing (not used in pre-training)",
    "train_files": "cube files to train on instead of train_fold: paths or quoted glob patterns "
    "(e.g. 'cubes/*.npy'), relative to the current folder",
    "valid_files": "cube files to validate on instead of valid_fold: paths or glob patterns",
    "valid_fraction": "validate on this fraction of the training cubes' source volumes instead "
    "(split by source with each cube file's CSV, from seed; e.g. 0.2)",
    "scale": "cubes per volume at extraction: part of the cube file names",
    "input_rows": "cube rows (R)",
    "input_cols": "cube columns (C)",
    "input_deps": "cube depth (D)",
    "weights": "weights to start from (.h5 of unet_model_3d, e.g. Genesis_Chest_CT.h5)",
    "batch_size": "cubes per batch; lowered by 2 on an out-of-memory error",
    "optimizer": "optimizer (the original trains with SGD, momentum 0.9)",
    "lr": "initial learning rate",
    "nb_epoch": "maximum number of epochs",
    "patience": "early-stopping patience in epochs (val_loss)",
    "workers": "threads (or processes) that make training pairs",
    "max_queue_size": "batches made ahead of the training step",
    "save_samples": "'png' writes about one training pair in 100 batches to "
    "sample_path/exp_name; 'none' writes none",
    "verbose": "Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch",
    "flip_rate": "probability of each of up to three flips",
    "local_rate": "probability of local pixel shuffling",
    "nonlinear_rate": "probability of the non-linear intensity transform",
    "paint_rate": "probability of in- or out-painting",
    "outpaint_rate": "share of out-painting among paintings (1 - inpaint_rate)",
    "inpaint_rate": "share of in-painting among paintings",
    "model_path": "output folder for weights, checkpoint, CSV log, config and summary",
    "logs_path": "TensorBoard folder; runs go to logs_path/exp_name/run-N",
    "sample_path": "folder for the sample pair PNGs",
    "seed": "seed of the weight initialisation and of every transform draw",
    "n_base_filters": "filters of the first convolution (32 in the published weights)",
    "steps_per_epoch": "training batches per epoch (default: training cubes // batch_size)",
    "validation_steps": "validation batches per epoch (default: validation cubes // batch_size)",
    "mixed_precision": "train in mixed bfloat16 (weights stay float32)",
    "data_format": "tensor layout while training: channels_last (fastest) or channels_first; "
    "the saved weights load into either",
    "resume": "continue the run in model_path from its last finished epoch",
    "use_multiprocessing": "make training pairs in processes instead of threads",
    "distribute": "auto: data-parallel over all GPUs when more than one is visible; "
    "off: one device; all: every visible device, CPUs included (tests)",
    "coordinator_address": "JAX multi-process training: HOST:PORT of process 0's coordinator "
    "(default: single process, or what JAX detects from SLURM / Open MPI)",
    "num_processes": "JAX multi-process training: number of processes",
    "process_id": "JAX multi-process training: this process' id, 0 to num_processes - 1",
    "collective_timeout": "multi-process training: seconds after which a silent process "
    "(JAX heartbeat) or a stuck collective (TensorFlow) stops the run with an error",
}

FIELD_CHOICES = {"data_format": DATA_FORMATS, "distribute": DISTRIBUTE_MODES}
