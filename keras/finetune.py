"""Fine-tune Models Genesis on your own labelled data: train, predict, evaluate.

  python keras/finetune.py train    --data DIR --output RUN_DIR [--weights FILE|none] [options]
  python keras/finetune.py predict  --model RUN_DIR --input DIR_OR_FILES --output PRED_DIR
  python keras/finetune.py evaluate --predictions PRED_DIR --labels LABEL_DIR --output REPORT.json

Each subcommand's --help lists its options with an example. See docs/finetuning.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

TRAIN_DESCRIPTION = """\
Fine-tune the Models Genesis 3D U-Net on labelled data, from pre-trained weights or from scratch.

--data is one of:
  * a folder of volumes: imagesTr/{case}_0000.nii.gz (nnU-Net) or imagesTr/{case}.nii.gz
    (Decathlon), labelsTr/{case}.nii.gz and dataset.json (channel_names, labels, file_ending);
    any format SimpleITK reads (segmentation);
  * the original's arrays x_{train,valid}_RxCxD.npy with masks m_* (segmentation) or labels
    y_* (classification);
  * a LUNA16-format candidates CSV (seriesuid,coordX,coordY,coordZ,class) beside its volumes
    (classification: cubes of --patch centred on each candidate).

Two recipes set what the flags leave out (docs/finetuning.md, "Recipes"):
  * default: a plan from the data set's fingerprint (spacing, patch, batch size, intensities;
    printed at the start, saved as fingerprint.json and plan.json), augmentation, cross-entropy
    plus the foreground Dice, Adam at 1e-3 with a polynomial decay, batch-norm momentum 0.9,
    channels-last; predict mirrors each window (test-time augmentation);
  * original (--recipe original): the original's downstream settings: patch 64 64 32 at the
    volumes' own spacing, no augmentation, Adam at 1e-3, dice_coef_loss (segmentation) or
    categorical cross-entropy (classification), ReduceLROnPlateau(factor 0.5, patience 6,
    min_delta 1e-4, min_lr 1e-6), batch 8, channels-first.
Any flag given wins over the recipe. Early stopping on val_loss; the best val_loss model kept.
RUN_DIR gets best_model.keras, last_checkpoint.npz (--resume), finetune_config.json,
training_log.csv and curves.png."""

TRAIN_EPILOG = """\
example (36 sarcoma CTs from scratch on a CPU, planned for a 64x64x32 patch):
  python keras/finetune.py train --data ../shared/data/sts_ct --output runs/sts-cpu \\
      --weights none --n_base_filters 8 --batch_size 2 --epochs 64 --steps_per_epoch 8 \\
      --patch 64 64 32
pre-trained weights, then a rerun after a crash:
  python keras/finetune.py train --data ../shared/data/sts_ct --output runs/sts \\
      --weights pretrained_weights/Genesis_Chest_CT.h5 --patch 64 64 32 --epochs 50
  python keras/finetune.py train --data ../shared/data/sts_ct --output runs/sts \\
      --weights pretrained_weights/Genesis_Chest_CT.h5 --patch 64 64 32 --epochs 50 --resume
from scratch, for comparison, on fold 0 of 5:
  python keras/finetune.py train --data ../shared/data/sts_ct --output runs/sts-scratch \\
      --weights none --fold 0 --folds 5"""


def _patch(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text}")
    return value


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `finetune.py train`.

    Args:
        parser: the subcommand's parser.
    """
    parser.description, parser.epilog = TRAIN_DESCRIPTION, TRAIN_EPILOG
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, help="the data set folder (see above)")
    g.add_argument("--output", required=True, help="the run folder (RUN_DIR), created")
    g.add_argument(
        "--task",
        choices=("segmentation", "classification"),
        default=None,
        help="default: from the data (volumes and m_* masks: segmentation; y_* or a CSV: "
        "classification)",
    )
    g.add_argument(
        "--patch",
        nargs=3,
        type=_patch,
        metavar=("R", "C", "D"),
        default=None,
        help="patch size along x, y, z, each divisible by 8 (default: planned; original recipe "
        "and candidates: 64 64 32; arrays: their own size)",
    )
    g.add_argument(
        "--intensity",
        nargs="+",
        choices=("ct", "mri", "minmax", "none", "ct_foreground", "zscore"),
        default=None,
        help="intensity mapping, one for all channels or one per channel (default: planned; "
        "original recipe: from dataset.json's channel names: CT -> ct, MRI names -> mri, else "
        "minmax; arrays: none)",
    )
    g.add_argument(
        "--spacing",
        nargs=3,
        type=float,
        metavar=("X", "Y", "Z"),
        default=None,
        help="resample volumes to this spacing in mm first (default: planned; original recipe: "
        "off)",
    )
    g.add_argument(
        "--fold", type=int, default=None, help="validation fold of --folds (default: 80/20 split)"
    )
    g.add_argument("--folds", type=int, default=5, help="folds of --fold (default: 5)")
    g.add_argument(
        "--candidates", default=None, help="the candidates CSV (default: the one in --data)"
    )
    g.add_argument(
        "--cache", default=None, help="preprocessed volumes (default: RUN_DIR/preprocessed)"
    )
    m = parser.add_argument_group("model")
    m.add_argument(
        "--weights",
        default=None,
        help="pre-trained weights (default: pretrained_weights/Genesis_Chest_CT.h5); 'none' "
        "trains from scratch; 'hf:...' downloads",
    )
    m.add_argument(
        "--n_base_filters",
        type=int,
        default=None,
        help="U-Net width (default: the weights', or 32 from scratch)",
    )
    m.add_argument("--freeze_encoder", action="store_true", help="train only decoder and head")
    m.add_argument(
        "--data_format",
        choices=("channels_first", "channels_last"),
        default=None,
        help="tensor layout; both load the same weights (default: channels_last, several times "
        "faster on a CPU; original recipe: channels_first)",
    )
    m.add_argument(
        "--mixed_precision",
        action="store_true",
        help="mixed bfloat16: faster on GPUs and on CPUs with bfloat16 units (docs/finetuning.md)",
    )
    t = parser.add_argument_group("training")
    t.add_argument(
        "--recipe",
        choices=("default", "original"),
        default="default",
        help="what the flags left out are: this project's measured recipe, or the original's "
        "settings exactly (default: default)",
    )
    t.add_argument(
        "--batch_size", type=int, default=None, help="default: planned; original recipe: 8"
    )
    t.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: 1000; original recipe: 10000 (early stopping ends it)",
    )
    t.add_argument(
        "--steps_per_epoch",
        type=int,
        default=None,
        help="default: 250 for volumes, one pass for arrays",
    )
    t.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help="default: as many as --steps_per_epoch, at most 50 (original recipe: 50) for "
        "volumes (fixed patches); one pass for arrays",
    )
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-3)")
    t.add_argument(
        "--optimizer",
        choices=("adam", "sgd", "sgd_nesterov", "rmsprop", "adamw"),
        default=None,
        help="sgd: momentum 0.9; sgd_nesterov: nnU-Net's, Nesterov momentum 0.99, with --lr 0.01 "
        "(default: adam)",
    )
    t.add_argument(
        "--schedule",
        choices=("poly", "plateau"),
        default=None,
        help="learning rate: poly, lr * (1 - epoch / epochs) ** 0.9; plateau, halved when "
        "val_loss stalls (default: poly; original recipe: plateau)",
    )
    t.add_argument(
        "--augment",
        choices=("default", "none"),
        default=None,
        help="augmentation of training patches: rotation, scaling, mirroring, intensity "
        "(docs/finetuning.md) (default: default; original recipe: none)",
    )
    t.add_argument(
        "--loss",
        choices=("dice_coef_loss", "bce_dice_loss", "bce_foreground_dice_loss"),
        default=None,
        help="segmentation loss, from unet3d: dice_coef_loss (the original's; its Dice counts "
        "the background too), bce_dice_loss (adds per-voxel cross-entropy) or "
        "bce_foreground_dice_loss (cross-entropy and the Dice of the foreground alone, which "
        "an all-background output cannot score on) (default: bce_foreground_dice_loss; "
        "original recipe: dice_coef_loss)",
    )
    t.add_argument(
        "--bn_momentum",
        type=float,
        default=None,
        help="momentum of the batch normalization statistics that inference uses; lower for "
        "short runs (default: 0.9; original recipe: Keras' 0.99)",
    )
    t.add_argument(
        "--foreground_fraction",
        type=float,
        default=None,
        help="share of training patches centred on a labelled voxel, the rest anywhere "
        "(default: 0.33, nnU-Net's)",
    )
    t.add_argument("--patience", type=int, default=50, help="early stopping (default: 50)")
    t.add_argument("--seed", type=int, default=0, help="split, patches and weights (default: 0)")
    t.add_argument("--workers", type=int, default=1, help="threads making batches (default: 1)")
    t.add_argument("--resume", action="store_true", help="continue from last_checkpoint.npz")
    t.add_argument("--overwrite", action="store_true", help="start again in an existing RUN_DIR")
    t.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="Keras' fit verbosity (default: 1)",
    )


def _command(argv: list[str]) -> str | None:
    """The subcommand named in argv (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser, with the full options of `command` only (so --help needs no heavy import).

    Args:
        command: "train", "predict", "evaluate" or None.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="finetune.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,predict,evaluate}")
    helps = {
        "train": "fine-tune on a labelled data set",
        "predict": "label whole volumes (or classify candidates) with a trained run",
        "evaluate": "Dice, IoU (or ROC AUC) of predictions against labels",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name != command:
            continue
        if name == "train":
            add_train_arguments(p)
        elif name == "predict":
            from finetune_predict import add_predict_arguments

            add_predict_arguments(p)
        else:
            from finetune_metrics import add_evaluate_arguments

            add_evaluate_arguments(p)
    return parser


def settings_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The settings dataclass `cls` from parsed flags, converted once (lists become tuples).

    Args:
        cls: `FinetuneSettings`, `PredictSettings` or `EvaluateSettings`.
        args: the subcommand's parsed flags.

    Returns:
        A `cls`.

    Raises:
        TypeError: a flag with no field of `cls` (the parser and the settings disagree).
    """
    given = {k: v for k, v in vars(args).items() if k != "command"}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise TypeError(f"Expected flags that {cls.__name__} has. Received: {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def _run(command: str, args: argparse.Namespace) -> int:
    """Convert the flags into the subcommand's settings and run it; its exit status."""
    if command == "train":
        from finetune_prepare import FinetuneSettings
        from finetune_trainer import train

        train(settings_from_args(FinetuneSettings, args))
    elif command == "predict":
        from finetune_predict import PredictSettings, predict

        return predict(settings_from_args(PredictSettings, args))
    else:
        from finetune_metrics import EvaluateSettings, evaluate

        evaluate(settings_from_args(EvaluateSettings, args))
    return 0


def input_errors(command: str) -> tuple[type[Exception], ...]:
    """The typed bad-input errors of a subcommand (imported only then): its own, and
    `volume_io.VolumeError`, a volume that cannot be used (named with what is wrong).

    Args:
        command: "train", "predict" or "evaluate".

    Returns:
        The exception types its `main` prints in one line with exit status 2.
    """
    from volume_io import VolumeError

    if command == "train":
        from finetune_cases import FinetuneInputError

        return (FinetuneInputError, VolumeError)
    if command == "predict":
        from finetune_predict import PredictInputError

        return (PredictInputError, VolumeError)
    from finetune_metrics import EvaluateInputError

    return (EvaluateInputError, VolumeError)


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand.

    Args:
        argv: the arguments (default: sys.argv[1:]).

    Returns:
        The exit status: 0 done, 1 when predict skipped cases whose volumes cannot be used, 2 bad
        input (one line on stderr). Other errors are raised with their traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _run(args.command, args)
    except input_errors(args.command) as exc:
        print(f"finetune.py {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
