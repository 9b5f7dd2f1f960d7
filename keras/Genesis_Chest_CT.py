"""Models Genesis pre-training from the command line: restore cubes corrupted by the transforms.

Every field of `config.models_genesis_config` is a command-line flag (see `--help` and
docs/pretraining.md). This script parses them and hands the config to
`genesis_trainer.run_with_oom_retry`, imported only afterwards so `--help` and bad flags
answer without loading Keras. Bad input (missing cube files, unfitting weights, an existing
run: `genesis_trainer.PretrainingInputError`) is reported as one line with exit status 2; every
other error keeps its traceback.

Outputs, in `--model_path` (default `pretrained_weights/`):
  {exp_name}.h5           best weights so far (lowest val_loss): a Keras .h5 model file
  {exp_name}.last.npz     last finished epoch: weights, optimizer and callback state (for --resume)
  {exp_name}.csv          one row per epoch (loss, mae, mse, val_*, learning_rate)
  {exp_name}.json         the resolved configuration
  {exp_name}.txt          the model summary
  Logs/{exp_name}/run-N/  TensorBoard logs, a new run folder per start

Imports: stdlib and config at start; genesis_trainer (Keras) after parsing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence

# Sibling modules (config, genesis_trainer...) are imported from this script's own folder, so
# the script works from any working directory.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from config import FIELD_CHOICES, FIELD_HELP, PretrainingInputError, models_genesis_config

EXAMPLE = """\
example (a small run on the demo's cubes, under a minute on a CPU):
  bash datasets/demo.sh demo_output      # makes demo_output/generated_cubes (folds 0 and 1)
  python keras/Genesis_Chest_CT.py --data demo_output/generated_cubes --train_fold 0 \\
      --valid_fold 1 --nb_epoch 3 --batch_size 2 --n_base_filters 4 --steps_per_epoch 6 \\
      --validation_steps 2 --model_path my_weights

full pre-training as the original (LUNA16 folds 0-6 extracted with infinite_generator_3D.py):
  python keras/Genesis_Chest_CT.py --data generated_cubes
after a crash or kill, continue from the last finished epoch: the same command plus --resume.
"""

# What --help shows as the default of fields derived from others.
_SHOWN_DEFAULTS = {"exp_name": "MODEL-SUFFIX", "logs_path": "MODEL_PATH/Logs"}


def _field_kind(f: dataclasses.Field) -> tuple[type, bool, bool]:
    """(base type, is_list, is_optional) of a config field from its annotation."""
    tp = typing.get_type_hints(models_genesis_config)[f.name]
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X], X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def _optional(base: type) -> Callable[[str], object]:
    """An argparse type that maps 'none' / 'None' to None."""

    def convert(text: str) -> object:
        return None if text.lower() == "none" else base(text)

    convert.__name__ = base.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    """An argument parser with one `--field` flag per config field (generated, never listed).

    Returns:
        The parser; `parse_config` turns its result into a `models_genesis_config`.
    """
    parser = argparse.ArgumentParser(
        prog="Genesis_Chest_CT.py",
        description="Models Genesis self-supervised pre-training of a 3D U-Net on CT cubes.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = models_genesis_config()
    for f in dataclasses.fields(models_genesis_config):
        base, is_list, optional = _field_kind(f)
        flag = f"--{f.name}"
        default = getattr(defaults, f.name)
        text = FIELD_HELP.get(f.name, "")
        if base is bool:
            # Booleans are flags that are off by default.
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
        elif is_list:
            shown = " ".join(map(str, default)) or "none"
            parser.add_argument(
                flag,
                type=base,
                nargs="+",
                default=argparse.SUPPRESS,
                metavar="PATH" if base is str else "N",
                help=f"{text}; space-separated (default: {shown})",
            )
        else:
            shown = _SHOWN_DEFAULTS.get(f.name, default)
            parser.add_argument(
                flag,
                type=_optional(base) if optional else base,
                default=argparse.SUPPRESS,
                choices=FIELD_CHOICES.get(f.name),
                metavar=base.__name__.upper(),
                help=f"{text} (default: {shown})",
            )
    return parser


def parse_config(argv: Sequence[str] | None = None) -> models_genesis_config:
    """Parse command-line arguments into a config (unset flags keep the config's defaults).

    Args:
        argv: the arguments, without the program name; None reads sys.argv.

    Returns:
        The resolved `models_genesis_config` (bad values exit with status 2 and the usage).
    """
    parser = build_parser()
    given = vars(parser.parse_args(argv))  # only the flags given: defaults are suppressed
    try:
        return models_genesis_config(**given)
    except PretrainingInputError as exc:  # the config's own checks of the values
        parser.error(str(exc))  # exits with status 2 and the usage line


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: the arguments, without the program name; None reads sys.argv.

    Returns:
        The process exit status: 0, or 2 for bad input found before training.
    """
    config = parse_config(argv)
    import genesis_trainer  # after parsing: --help and bad flags never wait for Keras

    try:
        genesis_trainer.run_with_oom_retry(config)
    except genesis_trainer.PretrainingInputError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
