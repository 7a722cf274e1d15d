#!/usr/bin/env bash
# Train on a TPU VM pod slice: every worker runs the same command; jax.distributed finds its peers.
#
#   TPU=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://bucket/npp-b DATA=gs://bucket/imagenet256_codes \
#     bash launch/tpu_pod.sh configs/b.py [--config.KEY=VALUE ...]
#
# The code is copied to every worker from this checkout; the data set and workdir must be on storage that
# every worker reads (GCS through gcsfuse, or a Filestore mount), since each worker reads its own slice.
set -euo pipefail
CONFIG=${1:?usage: launch/tpu_pod.sh CONFIG [--config.KEY=VALUE ...]}
shift
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}" "${DATA:?set DATA}"
REPO=$(cd "$(dirname "$0")/.." && pwd)

gcloud compute tpus tpu-vm scp --recurse "$REPO" "$TPU":~/npp_jax --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  cd ~/npp_jax
  python3 -m pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python3 -m npp_jax.main --config=$CONFIG --workdir=$WORKDIR --config.data.path=$DATA \
    --config.model.dtype=bfloat16 --distributed=true $*
"
