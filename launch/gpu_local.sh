#!/usr/bin/env bash
# One host, all local GPUs (or CPU). By default one process drives every local device; with --num-processes N
# it starts N processes, each seeing --gpus-per-process GPUs through CUDA_VISIBLE_DEVICES, and vlm_jax calls
# jax.distributed.initialize() from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu_local.sh [options] CONFIG WORKDIR [ENTRY-POINT FLAGS ...]

Runs `python -m vlm_jax.pretrain --config=CONFIG --workdir=WORKDIR FLAGS...` on this host.
Options come before CONFIG; everything after WORKDIR goes to the entry point unchanged.

options (environment variable in brackets):
  --num-processes N     processes on this host, one GPU group each; 1 = one process, all devices [NUM_PROCESSES, 1]
  --gpus-per-process K  GPUs per process when N > 1 (process i gets GPUs i*K .. i*K+K-1)      [GPUS_PER_PROCESS, 1]
  --port PORT           coordinator port on localhost when N > 1                          [COORDINATOR_PORT, 12355]
  --python PATH         Python interpreter                                           [PYTHON, .venv/bin/python]
  --module MODULE       entry-point module                                           [MODULE, vlm_jax.pretrain]
  --dry-run             print the commands instead of running them                             [DRY_RUN=1]
  -h, --help            show this help

example:
  launch/gpu_local.sh --num-processes 8 configs/pretrain/clip.py:img=B/16,txt=B,res=224 workdirs/clip_b16 \
      --config.data.shards='/data/laion/{00000..09999}.tar'
EOF
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

num_processes=${NUM_PROCESSES:-1}
gpus_per_process=${GPUS_PER_PROCESS:-1}
port=${COORDINATOR_PORT:-12355}
python=${PYTHON:-.venv/bin/python}
module=${MODULE:-vlm_jax.pretrain}
dry_run=${DRY_RUN:-0}
while (($#)); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --num-processes|--gpus-per-process|--port|--python|--module)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --num-processes) num_processes=$2 ;;
        --gpus-per-process) gpus_per_process=$2 ;;
        --port) port=$2 ;;
        --python) python=$2 ;;
        --module) module=$2 ;;
      esac
      shift 2 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (launcher options come before CONFIG)" ;;
    *) break ;;
  esac
done
(($# >= 2)) || die "CONFIG and WORKDIR are required"
config=$1; workdir=$2; shift 2
[[ $num_processes =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer, got '$num_processes'"
[[ $gpus_per_process =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-process must be a positive integer, got '$gpus_per_process'"

cmd=("$python" -m "$module" "--config=$config" "--workdir=$workdir" "$@")
if ((num_processes == 1)); then
  if [[ $dry_run == 1 ]]; then shell_quote "${cmd[@]}"; exit 0; fi
  exec "${cmd[@]}"
fi

pids=()
for ((i = 0; i < num_processes; i++)); do
  gpus=$(seq -s, $((i * gpus_per_process)) $(((i + 1) * gpus_per_process - 1)))
  proc=(env "CUDA_VISIBLE_DEVICES=$gpus" "JAX_COORDINATOR_ADDRESS=localhost:$port"
        "JAX_NUM_PROCESSES=$num_processes" "JAX_PROCESS_ID=$i" "${cmd[@]}")
  if [[ $dry_run == 1 ]]; then shell_quote "${proc[@]}"; continue; fi
  "${proc[@]}" &
  pids+=($!)
done
[[ $dry_run == 1 ]] && exit 0
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT   # forward preemption: every process checkpoints
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
