#!/usr/bin/env bash
# Train on several GPU nodes under SLURM: one process per node, each seeing its node's GPUs.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh configs/l.py WORKDIR DATA [--config.KEY=VALUE ...]
#
# jax.distributed.initialize() reads the SLURM environment (coordinator = first node). SIGTERM, sent by
# SLURM before the time limit (--signal=TERM@120), makes the trainer save and exit; requeue resumes.
#SBATCH --job-name=npp_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
set -euo pipefail
CONFIG=${1:?usage: sbatch launch/gpu_slurm.sh CONFIG WORKDIR DATA [--config.KEY=VALUE ...]}
WORKDIR=${2:?WORKDIR}
DATA=${3:?DATA}
shift 3
# Forward the scheduler's SIGTERM to the training processes so they checkpoint before the limit.
trap 'kill -TERM "$PID" 2>/dev/null; wait "$PID"' TERM
srun --kill-on-bad-exit=1 python -m npp_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.data.path="$DATA" --config.model.dtype=bfloat16 --distributed=true "$@" &
PID=$!
wait "$PID"
