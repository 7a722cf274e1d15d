#!/usr/bin/env bash
# Train on a TPU VM pod slice: every worker runs the same command; jax.distributed finds its peers.
#
#   TPU=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://bucket/npp-b DATA=/mnt/gcs/imagenet256_codes \
#     bash launch/tpu_pod.sh configs/b.py [--config.KEY=VALUE ...]
#
# Each launch copies the package, configs/ and setup.py (nothing else: no venvs, workdirs or .git) to
# ~/npp_jax on every worker, stops the run this launcher started there before (SIGTERM first, so that it
# saves), builds ~/npp_jax/.venv once (again only when setup.py changed), and starts the run detached with one
# log per worker in ~/npp_jax/logs/. The data set and workdir must be on storage that every worker reads (GCS,
# or a Filestore mount). Arguments reach the workers' bash quoted (printf %q), so '((4,10),(1,20))' survives.
# Optional: JAX_PIP (default 'jax[tpu]'), STOP_TIMEOUT (seconds a stale run gets to save; default 300).
set -euo pipefail
CONFIG=${1:?usage: TPU=... ZONE=... WORKDIR=... DATA=... bash launch/tpu_pod.sh CONFIG [--config.KEY=VALUE ...]}
shift
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}" "${DATA:?set DATA}"
REPO=$(cd "$(dirname "$0")/.." && pwd)

# Runs on every worker (sent as its source by `declare -f`): stop, unpack, venv, start.
worker() {
  set -euo pipefail
  local stop_timeout=$1 jax_pip=$2 pid setup log
  shift 2
  mkdir -p ~/npp_jax && cd ~/npp_jax
  pid=$(cat run.pid 2>/dev/null || true)
  # Only a process that is still our run: after a reboot the pid may belong to something else.
  if [ -n "$pid" ] && grep -qa npp_jax.main "/proc/$pid/cmdline" 2>/dev/null; then
    echo "$(hostname): stopping the previous run (pid $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq "$stop_timeout"); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -rf npp_jax configs setup.py  # Files deleted from the checkout must not linger here.
  tar -xzf ~/npp_jax.tar.gz
  setup=$(sha256sum setup.py | cut -d' ' -f1)
  if [ ! -x .venv/bin/pip ]; then  # Not yet, or a half-made one (no pip): start over.
    rm -rf .venv
    python3 -m venv .venv || { echo "$(hostname): python3 -m venv failed; install python3-venv" >&2; exit 1; }
  fi
  if [ "$(cat .venv/setup.sha256 2>/dev/null || true)" != "$setup" ]; then
    .venv/bin/pip install -q "$jax_pip" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
    .venv/bin/pip install -q -e .
    echo "$setup" > .venv/setup.sha256
  fi
  mkdir -p logs
  log=logs/$(hostname).log
  # Own session: the run outlives this ssh, and the next launch stops its whole process group.
  setsid nohup .venv/bin/python "$@" >> "$log" 2>&1 < /dev/null &
  echo $! > run.pid
  echo "$(hostname): started pid $! -> ~/npp_jax/$log"
}

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
tar -C "$REPO" --exclude=__pycache__ -czf "$STAGE/npp_jax.tar.gz" npp_jax configs setup.py
REMOTE="$(declare -f worker); worker$(printf ' %q' "${STOP_TIMEOUT:-300}" "${JAX_PIP:-jax[tpu]}" \
  -m npp_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "--config.data.path=$DATA" \
  --config.model.dtype=bfloat16 --distributed=true "$@")"

gcloud compute tpus tpu-vm scp "$STAGE/npp_jax.tar.gz" "$TPU":npp_jax.tar.gz --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$REMOTE"
echo "Logs: gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command 'tail -n 5 ~/npp_jax/logs/*.log'"
