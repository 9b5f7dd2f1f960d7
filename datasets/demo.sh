#!/usr/bin/env bash
# Models Genesis demo on data the repository makes itself (run by `make demo`).
#
#   bash datasets/demo.sh [OUTDIR]      (default OUTDIR: demo_output)
#
# Step 1 writes synthetic LUNA16-style chest CT volumes to OUTDIR/luna16 (kept if present),
# step 2 cuts 64x64x32 training cubes from folds 0 (training) and 1 (validation) into
# OUTDIR/generated_cubes, step 3 pre-trains a small U-Net on them, step 4 fine-tunes it with the
# README's segmentation snippet, step 5 fine-tunes it with finetune.py on a tiny labelled set.
# PY selects the interpreter (default: the project's .venv).
set -euo pipefail
# Keep TensorFlow's C++ start-up chatter out of the demo's output.
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

OUT=${1:-demo_output}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PY:-.venv/bin/python}

LUNA="$OUT/luna16"
CUBES="$OUT/generated_cubes"

echo "== Step 1: synthetic LUNA16-style volumes -> $LUNA"
if [ -d "$LUNA" ]; then
    echo "   present, kept (delete $LUNA to make them again)"
else
    "$PY" datasets/make_demo_volumes.py --out "$LUNA" --subsets 0 1 --per-subset 2 --seed 0
fi

echo "== Step 2: cube extraction, folds 0 and 1 -> $CUBES"
for fold in 0 1; do
    "$PY" infinite_generator_3D.py --fold "$fold" --scale 32 --data "$LUNA" --save "$CUBES" --no-progress
done

WEIGHTS="$OUT/pretrained_weights"

echo "== Step 3: pre-training a small U-Net (4 base filters, 3 short epochs) -> $WEIGHTS"
# The demo's own output folder: a rerun starts it afresh (the trainer refuses to overwrite a
# run silently; real runs continue with --resume).
rm -rf "$WEIGHTS" "$OUT/pair_samples"
# lr 0.1, not the original's 1.0: with 4 filters and a handful of steps, lr 1.0 often collapses
# the network to a constant output (the trainer warns when it does).
"$PY" keras/Genesis_Chest_CT.py --data "$CUBES" --train_fold 0 --valid_fold 1 \
    --nb_epoch 3 --batch_size 2 --lr 0.1 --n_base_filters 4 --steps_per_epoch 6 --validation_steps 2 \
    --workers 2 --verbose 2 --model_path "$WEIGHTS" --sample_path "$OUT/pair_samples"
echo "   best weights: $WEIGHTS/Vnet-genesis_chest_ct.h5; log: $WEIGHTS/Vnet-genesis_chest_ct.csv"

echo "== Step 4: the README's segmentation snippet loads the demo weights and fine-tunes"
"$PY" datasets/demo_finetune.py --weights "$WEIGHTS/Vnet-genesis_chest_ct.h5" \
    --cubes "$CUBES/bat_32_s_64x64x32_1.npy" --n_base_filters 4
LABELLED="$OUT/labelled"
RUN="$OUT/finetune_run"
echo "== Step 5: finetune.py train + predict + evaluate on a tiny labelled set -> $RUN"
"$PY" datasets/make_demo_labelled.py --out "$LABELLED" --cases 6 --seed 0
# A demo rerun starts its run afresh (--overwrite); real runs continue with --resume. The
# default recipe plans the spacing and intensities from the labelled set's fingerprint
# (printed, and saved as plan.json); the flags fix only the patch and a tiny budget.
"$PY" keras/finetune.py train --data "$LABELLED" --output "$RUN" --overwrite \
    --weights "$WEIGHTS/Vnet-genesis_chest_ct.h5" --patch 32 32 16 --batch_size 2 \
    --epochs 1 --steps_per_epoch 4 --validation_steps 1 --verbose 2
"$PY" keras/finetune.py predict --model "$RUN" --input "$LABELLED/imagesTr" \
    --output "$OUT/finetune_predictions" --overwrite
"$PY" keras/finetune.py evaluate --predictions "$OUT/finetune_predictions" \
    --labels "$LABELLED/labelsTr" --output "$OUT/finetune_report.json"
echo "   model: $RUN/best_model.keras; report: $OUT/finetune_report.json"
echo "== Demo done: outputs under $OUT"
