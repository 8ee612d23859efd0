#!/usr/bin/env bash
# One host, all local GPUs (or CPU): one process drives every local device.
#   launch/gpu_local.sh configs/pretrain/clip.py:img=B/16,txt=B,res=224 workdirs/clip_b16 [--config.key=value …]
# Several processes on one machine (e.g. one per GPU) instead: NUM_PROCESSES=4 launch/gpu_local.sh …
set -euo pipefail
config=${1:?config, e.g. configs/pretrain/clip.py:tiny}; workdir=${2:?workdir}; shift 2
python=${PYTHON:-.venv/bin/python}
n=${NUM_PROCESSES:-1}
if [ "$n" -eq 1 ]; then
  exec "$python" -m vlm_jax.pretrain --config="$config" --workdir="$workdir" "$@"
fi
port=${COORDINATOR_PORT:-12355}
pids=()
for ((i = 0; i < n; i++)); do
  CUDA_VISIBLE_DEVICES=$i JAX_COORDINATOR_ADDRESS=localhost:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    "$python" -m vlm_jax.pretrain --config="$config" --workdir="$workdir" "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT   # forward preemption: every process checkpoints
wait "${pids[@]}"
