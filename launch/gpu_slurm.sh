#!/usr/bin/env bash
# Train on several GPU nodes under SLURM: one process per node, each seeing its node's GPUs.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh configs/l.py WORKDIR DATA [--config.KEY=VALUE ...]
#
# jax.distributed.initialize() reads the SLURM environment (coordinator = first node). 120 s before the time
# limit SLURM sends SIGTERM to this script (--signal=B:TERM@120); it forwards it to the job step, the
# processes agree on a step, save it and exit with the trainer's "preempted" status, and only then does this
# script requeue the job (scontrol requeue), whose next start resumes from that checkpoint. A run that
# finished, or failed, is not requeued. Requeued starts append to the same log (--open-mode=append).
# Submit from the Python environment the nodes should run (sbatch passes the environment on to srun).
#SBATCH --job-name=npp_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
CONFIG=${1:?usage: sbatch launch/gpu_slurm.sh CONFIG WORKDIR DATA [--config.KEY=VALUE ...]}
WORKDIR=${2:?WORKDIR}
DATA=${3:?DATA}
shift 3
PREEMPTED=75  # npp_jax.train.EXIT_PREEMPTED: saved on SIGTERM and stopped before the last step.

trap 'echo "SIGTERM: asking the job step to save and stop"; kill -TERM "$PID" 2>/dev/null || true' TERM
# --kill-on-bad-exit=0: the first process to exit "preempted" must not kill the others (srun would then
# report their signal, not the preempted status). A crashed process still stops the rest: JAX's coordination
# service ends the peers of a process whose heartbeat stops.
srun --kill-on-bad-exit=0 python -m npp_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.data.path="$DATA" --config.model.dtype=bfloat16 --distributed=true "$@" &
PID=$!
# `wait` returns early (status > 128) when the trap runs: wait again while the job step is alive. Then one
# more `wait` gives the step's own status (bash keeps it; 127 where an older bash forgot it, so keep ours).
STATUS=0
while kill -0 "$PID" 2>/dev/null; do wait "$PID" && STATUS=0 || STATUS=$?; done
wait "$PID" && STATUS=0 || { LAST=$?; [ "$LAST" -eq 127 ] || STATUS=$LAST; }
if [ "$STATUS" -eq "$PREEMPTED" ]; then
  echo "Preempted with a checkpoint: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
