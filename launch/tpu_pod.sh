#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every worker; JAX discovers the pod (jax.distributed.initialize()
# is called by vlm_jax when it sees several processes). The workdir must be shared (gs://…).
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a launch/tpu_pod.sh configs/pretrain/siglip.py:img=B/16,txt=B,res=224 \
#       gs://bucket/runs/siglip_b16 --config.data.shards='gs://bucket/laion/{00000..09999}.tar'
set -euo pipefail
config=${1:?config}; workdir=${2:?workdir (gs://…)}; shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
extra=$(printf " %q" "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/vlm_jax && .venv/bin/python -m vlm_jax.pretrain --config=$config --workdir=$workdir$extra"
