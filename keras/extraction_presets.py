"""Extraction's settings: the original's constants (`setup_config`) and the presets for other data.

`setup_config` keeps the original's names and defaults: 64x64x32 cubes, a 100-voxel border in
x and y and 30 slices in z, the air (lung) test, and the CT window [-1000, 1000] HU
(`volume_io.CT_WINDOW`, the one definition of that window). `PRESETS` say what the constants
are for a kind of data (docs/own_data.md): ``ct-chest`` is the original's, ``ct`` and ``mri``
drop the border and keep windows mostly inside the body.

Imports: the standard library and `volume_io` (for its intensity windows; NumPy only). Never
Keras.
"""

from __future__ import annotations

from collections.abc import Sequence

from volume_io import CT_WINDOW, MRI_WINDOW

__all__ = ["DEFAULT_PRESET", "PRESETS", "WINDOW_TESTS", "config_from_preset", "setup_config"]

# How a drawn window is accepted: the original's air (lung) test, or a foreground test.
WINDOW_TESTS = ("air", "foreground")

# What the constants mean for a kind of data (docs/own_data.md). `ct-chest` is the original's
# (LUNA16 chest CT); the others drop the 100-voxel border, which most collections are too small
# for, and replace the lung test by a test that the cube is mostly inside the body. A flag given
# on the command line overrides the preset's value.
PRESETS: dict[str, dict[str, object]] = {
    "ct-chest": {
        "hu_min": CT_WINDOW[0],
        "hu_max": CT_WINDOW[1],
        "len_border": 100,
        "len_border_z": 30,
        "test": "air",
        "air_hu": -150.0,
        "lung_max": 0.15,
        "percentiles": None,
    },
    "ct": {
        "hu_min": CT_WINDOW[0],
        "hu_max": CT_WINDOW[1],
        "len_border": 0,
        "len_border_z": 0,
        "test": "foreground",
        # -500 HU: fat and soft tissue (about -100 HU and above) count, air does not.
        "foreground_threshold": 0.25,
        "foreground_fraction": 0.5,
        "percentiles": None,
    },
    "mri": {
        # The clip the published weights' README gives for MRI.
        "hu_min": MRI_WINDOW[0],
        "hu_max": MRI_WINDOW[1],
        "len_border": 0,
        "len_border_z": 0,
        "test": "foreground",
        "foreground_threshold": 0.02,
        "foreground_fraction": 0.5,
        "percentiles": None,
    },
}
DEFAULT_PRESET = "ct-chest"


class setup_config:
    """Settings of the cube extraction, with the original's names (docs/extraction.md).

    Args:
        input_rows, input_cols, input_deps: size of a saved cube.
        crop_rows, crop_cols: size of the window cut from the volume before it is resized to
            ``input_rows x input_cols`` (no resize when equal).
        len_border: voxels kept away from the x and y edges.
        len_border_z: slices kept away from the z ends.
        scale: cubes wanted per volume; at most ``50 * scale`` windows are tried.
        DATA_DIR: the LUNA16 root holding ``subset0`` .. ``subset9`` (informative only).
        train_fold, valid_fold, test_fold: fold lists of the original config (informative only).
        len_depth: slices looked ahead by the air test (at least 2).
        lung_min: kept for compatibility; unused, as in the original.
        lung_max: reject a window whose tissue score exceeds this fraction of its voxels.
        hu_min, hu_max: the intensity window clipped to and scaled to [0, 1] (None: the
            original's -1000 and 1000 HU).
        air_hu: the air test's tissue threshold in the volume's units (-150 HU).
        test: "air" (the original's lung test) or "foreground" (reject windows that are mostly
            background).
        foreground_threshold: a voxel is foreground when its value scaled to [0, 1] is at least
            this (0.25 is -500 HU in the default window).
        foreground_fraction: the foreground test keeps a cube with at least this fraction of
            foreground voxels.
        percentiles: (LOW, HIGH): take each volume's window from these percentiles of its
            voxels instead of hu_min and hu_max (None: the fixed window).

    Attributes ``hu_min = -1000.0``, ``hu_max = 1000.0`` and ``HU_thred``, the normalised value
    of -150 HU (0.425), complete the original's constants.
    """

    hu_min, hu_max = CT_WINDOW

    def __init__(
        self,
        input_rows: int = 64,
        input_cols: int = 64,
        input_deps: int = 32,
        crop_rows: int = 64,
        crop_cols: int = 64,
        len_border: int = 100,
        len_border_z: int = 30,
        scale: int = 32,
        DATA_DIR: str | None = None,
        train_fold: Sequence[int] = (0, 1, 2, 3, 4),
        valid_fold: Sequence[int] = (5, 6),
        test_fold: Sequence[int] = (7, 8, 9),
        len_depth: int = 3,
        lung_min: float = 0.7,
        lung_max: float = 0.15,
        *,
        hu_min: float | None = None,
        hu_max: float | None = None,
        air_hu: float = -150.0,
        test: str = "air",
        foreground_threshold: float = 0.25,
        foreground_fraction: float = 0.5,
        percentiles: Sequence[float] | None = None,
    ) -> None:
        self.input_rows = input_rows
        self.input_cols = input_cols
        self.input_deps = input_deps
        self.crop_rows = crop_rows
        self.crop_cols = crop_cols
        self.len_border = len_border
        self.len_border_z = len_border_z
        self.scale = scale
        self.DATA_DIR = DATA_DIR
        self.train_fold = list(train_fold)
        self.valid_fold = list(valid_fold)
        self.test_fold = list(test_fold)
        self.len_depth = len_depth
        self.lung_min = lung_min
        self.lung_max = lung_max
        # Only set on the instance when given: the class attributes stay the original's.
        if hu_min is not None:
            self.hu_min = float(hu_min)
        if hu_max is not None:
            self.hu_max = float(hu_max)
        if not self.hu_max > self.hu_min:
            raise ValueError(
                f"Expected hu_max > hu_min. Received: hu_min={self.hu_min}, hu_max={self.hu_max}"
            )
        if test not in WINDOW_TESTS:
            raise ValueError(f"Expected test in {WINDOW_TESTS}. Received: test={test!r}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(
                "Expected foreground_fraction in [0, 1]. "
                f"Received: foreground_fraction={foreground_fraction}"
            )
        if percentiles is not None:
            percentiles = tuple(float(q) for q in percentiles)
            if len(percentiles) != 2 or not 0.0 <= percentiles[0] < percentiles[1] <= 100.0:
                raise ValueError(
                    "Expected percentiles LOW HIGH with 0 <= LOW < HIGH <= 100. "
                    f"Received: percentiles={percentiles}"
                )
        self.air_hu = float(air_hu)
        self.test = test
        self.foreground_threshold = float(foreground_threshold)
        self.foreground_fraction = float(foreground_fraction)
        self.percentiles = percentiles
        # Computed exactly as the original does, so the float matches bit for bit.
        self.HU_thred = (self.air_hu - self.hu_min) / (self.hu_max - self.hu_min)

    def display(self) -> None:
        """Print every setting, one per line."""
        print("\nConfigurations:")
        for name in sorted(dir(self)):
            value = getattr(self, name)
            if not name.startswith("__") and not callable(value):
                print(f"{name:30} {value}")
        print("\n")


def config_from_preset(preset: str = DEFAULT_PRESET, **overrides: object) -> setup_config:
    """A ``setup_config`` with a preset's constants, any of them overridden.

    Args:
        preset: a key of ``PRESETS``: "ct-chest" (the original's), "ct" or "mri".
        **overrides: setup_config arguments; None values are ignored (the preset's stand).

    Returns:
        The configuration.
    """
    if preset not in PRESETS:
        raise ValueError(f"Expected preset in {tuple(PRESETS)}. Received: preset={preset!r}")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return setup_config(**values)
