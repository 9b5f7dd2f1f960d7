#!/bin/bash
# Models Genesis pre-training on several nodes under SLURM (JAX backend); see docs/multihost.md.
#
# One task per node, each training on all GPUs of its node. JAX reads the coordinator (the
# first node; the port comes from the job id), the number of tasks and each task's rank from
# SLURM's environment, so the trainer needs no --coordinator_address/--num_processes/--process_id.
# Task 0 writes the weights, checkpoint and logs to MODEL_PATH, which must be on a file system
# that every node sees (for --resume).
#
# Usage, from the repository root (adapt the #SBATCH lines to your cluster):
#   sbatch docs/slurm_pretrain.sh                       # a new run
#   RESUME=--resume sbatch docs/slurm_pretrain.sh       # continue it after a failure
#
#SBATCH --job-name=genesis-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --output=genesis-%j.out

set -euo pipefail

DATA=${DATA:-generated_cubes}          # the cube files, readable by every node
MODEL_PATH=${MODEL_PATH:-pretrained_weights}
# Global batch: a multiple of all GPUs of all nodes (2 nodes x 4 GPUs = 8 here).
BATCH_SIZE=${BATCH_SIZE:-32}
RESUME=${RESUME:-}

export KERAS_BACKEND=jax
# Unbuffered output, so the log of a task that dies ends with its last line.
export PYTHONUNBUFFERED=1

# srun starts one copy per task; each finds its rank in SLURM_PROCID.
srun python keras/Genesis_Chest_CT.py \
    --data "$DATA" \
    --model_path "$MODEL_PATH" \
    --batch_size "$BATCH_SIZE" \
    --workers "${SLURM_CPUS_PER_TASK:-10}" \
    --collective_timeout 600 \
    $RESUME
