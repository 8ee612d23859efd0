#!/usr/bin/env bash
# Cloud TPU pod slice: creates a TPU VM slice, installs this project on every worker, runs the same command on
# all workers (JAX discovers the pod), streams their logs here and deletes the slice at the end.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh --name NAME --zone ZONE [options] CONFIG WORKDIR [ENTRY-POINT FLAGS ...]

Creates the TPU VM slice NAME, copies this checkout to every worker (or clones --repo), installs it with
jax[tpu], runs `python -m vlm_jax.pretrain --config=CONFIG --workdir=WORKDIR FLAGS...` on --worker=all with
the output of all workers streamed here, and deletes the slice when the run ends or fails (unless --keep).
WORKDIR must be shared by all workers (gs://...). Options come before CONFIG; everything after WORKDIR goes to
the entry point unchanged.

options (environment variable in brackets):
  --name NAME             TPU slice name (required)                                                [TPU_NAME]
  --zone ZONE             zone, e.g. us-west4-a (required)                                             [ZONE]
  --project PROJECT       GCP project (default: gcloud's configured project)                        [PROJECT]
  --accelerator-type T    e.g. v4-32, v5litepod-64, v5p-128, v6e-64 (required unless --no-create)
                                                                                            [ACCELERATOR_TYPE]
  --version V             TPU runtime version (default from the type: v4 tpu-ubuntu2204-base,
                          v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
                                                                                             [RUNTIME_VERSION]
  --spot                  create a Spot slice                                                       [SPOT=1]
  --no-create             use an existing slice (it is then never deleted)                      [NO_CREATE=1]
  --keep                  do not delete the slice at the end                                         [KEEP=1]
  --repo URL              git clone URL on the workers instead of copying this checkout                [REPO]
  --ref REF               branch or tag to clone with --repo                                    [REF, main]
  --no-install            skip copying and installing (already set up on the slice)            [NO_INSTALL=1]
  --extras E              pip extras installed with the project                                  [EXTRAS, gcs]
  --python-version V      Python version of the workers' virtualenv (made with uv)        [PYTHON_VERSION, 3.11]
  --env KEY=VALUE         environment variable for the run on every worker (repeatable)
  --module MODULE         entry-point module                                         [MODULE, vlm_jax.pretrain]
  --log FILE              also append the streamed output to FILE                                       [LOG]
  --dry-run               print every command instead of running it (gcloud not needed)          [DRY_RUN=1]
  -h, --help              show this help

example:
  launch/tpu_pod.sh --name siglip-v5e-64 --zone us-west4-a --accelerator-type v5litepod-64 \
      configs/pretrain/siglip.py:img=B/16,txt=B,res=224 gs://bucket/runs/siglip_b16 \
      --config.data.shards='gs://bucket/laion/{00000..09999}.tar'
EOF
}

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

name=${TPU_NAME:-}
zone=${ZONE:-}
project=${PROJECT:-}
accelerator_type=${ACCELERATOR_TYPE:-}
version=${RUNTIME_VERSION:-}
spot=${SPOT:-0}
no_create=${NO_CREATE:-0}
keep=${KEEP:-0}
repo=${REPO:-}
ref=${REF:-main}
no_install=${NO_INSTALL:-0}
extras=${EXTRAS:-gcs}
python_version=${PYTHON_VERSION:-3.11}
module=${MODULE:-vlm_jax.pretrain}
log=${LOG:-}
dry_run=${DRY_RUN:-0}
envs=()
while (($#)); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --spot) spot=1; shift ;;
    --no-create) no_create=1; shift ;;
    --keep) keep=1; shift ;;
    --no-install) no_install=1; shift ;;
    --name|--zone|--project|--accelerator-type|--version|--repo|--ref|--extras|--python-version|--env|--module|--log)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --name) name=$2 ;;
        --zone) zone=$2 ;;
        --project) project=$2 ;;
        --accelerator-type) accelerator_type=$2 ;;
        --version) version=$2 ;;
        --repo) repo=$2 ;;
        --ref) ref=$2 ;;
        --extras) extras=$2 ;;
        --python-version) python_version=$2 ;;
        --env) [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$2'"; envs+=("$2") ;;
        --module) module=$2 ;;
        --log) log=$2 ;;
      esac
      shift 2 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (launcher options come before CONFIG)" ;;
    *) break ;;
  esac
done
[[ -n $name ]] || die "--name (or TPU_NAME) is required"
[[ -n $zone ]] || die "--zone (or ZONE) is required"
(($# >= 2)) || die "CONFIG and WORKDIR are required"
config=$1; workdir=$2; shift 2
if [[ $no_create != 1 ]]; then
  [[ -n $accelerator_type ]] || die "--accelerator-type (or ACCELERATOR_TYPE) is required to create the slice"
  if [[ -z $version ]]; then
    case $accelerator_type in
      v4-*) version=tpu-ubuntu2204-base ;;
      v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
      v5p-*) version=v2-alpha-tpuv5 ;;
      v6e-*) version=v2-alpha-tpuv6e ;;
      *) die "no default runtime version for '$accelerator_type'; pass --version" ;;
    esac
  fi
fi
if [[ $workdir != gs://* ]]; then
  printf 'warning: WORKDIR %s is not gs://; every worker must see the same directory\n' "$workdir" >&2
fi

# Prints the command (dry run) or runs it.
run() {
  if [[ $dry_run == 1 ]]; then shell_quote "$@"; else "$@"; fi
}

where=(--zone="$zone")
if [[ -n $project ]]; then where+=(--project="$project"); fi
on_all_workers() { run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"; }

if [[ $no_create != 1 ]]; then
  create=(gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type="$accelerator_type"
          --version="$version")
  if [[ $spot == 1 ]]; then create+=(--spot); fi
  run "${create[@]}"
  if [[ $keep != 1 ]]; then
    # Deletes the slice however the script ends: success, failure or Ctrl-C.
    delete_slice() { run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet; }
    if [[ $dry_run == 1 ]]; then
      trap delete_slice EXIT
    else
      trap 'delete_slice || printf "warning: could not delete TPU %s; delete it by hand\n" "$name" >&2' EXIT
      trap 'exit 130' INT TERM
    fi
  fi
fi

if [[ $no_install != 1 ]]; then
  if [[ -n $repo ]]; then
    on_all_workers "rm -rf ~/vlm_jax && git clone --depth 1 --branch $(shell_quote "$ref") $(shell_quote "$repo") ~/vlm_jax"
  else
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    tarball=${TMPDIR:-/tmp}/vlm_jax_${name}.tar.gz
    run tar -czf "$tarball" -C "$root" --exclude=.git --exclude=.venv --exclude=workdirs --exclude='*.egg-info' \
      --exclude=__pycache__ --exclude=.pytest_cache .
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:vlm_jax.tar.gz" "${where[@]}" --worker=all
    on_all_workers "rm -rf ~/vlm_jax && mkdir -p ~/vlm_jax && tar -xzf ~/vlm_jax.tar.gz -C ~/vlm_jax"
  fi
  spec=.
  if [[ -n $extras ]]; then spec=".[$extras]"; fi
  on_all_workers "set -e; cd ~/vlm_jax; command -v ~/.local/bin/uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
~/.local/bin/uv venv --quiet --python $(shell_quote "$python_version") .venv; \
~/.local/bin/uv pip install --quiet --python .venv/bin/python -e $(shell_quote "$spec") 'jax[tpu]>=0.10.2,<0.11'"
fi

remote="cd ~/vlm_jax &&"
for kv in "${envs[@]+"${envs[@]}"}"; do remote+=" export $(shell_quote "$kv") &&"; done
remote+=" .venv/bin/python -m $(shell_quote "$module" "--config=$config" "--workdir=$workdir" "$@")"
if [[ -z $log ]]; then
  on_all_workers "$remote"
elif [[ $dry_run == 1 ]]; then
  printf '%s 2>&1 | tee -a %s\n' "$(on_all_workers "$remote")" "$(shell_quote "$log")"
else
  on_all_workers "$remote" 2>&1 | tee -a "$log"
fi
