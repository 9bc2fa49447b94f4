#!/usr/bin/env bash
# Submit a multi-node GPU run to SLURM. `launch/gpu_slurm.sh --help` explains; `--dry-run` prints the
# sbatch command and the srun line the job will run, and submits nothing.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_slurm.sh (--stage=STAGE | --recipe=NAME) --workdir=DIR [flags]

Submits launch/slurm_job.sbatch, which runs on every task
  PYTHON -m deltaworld_jax.main --config=configs/kinetics.py:stage=STAGE (or :recipe=NAME) --workdir=DIR --mode=MODE
and jax.distributed.initialize() (called by main.py) configures itself from SLURM's variables.
Install first on the cluster (shared home or every node): pip install -e ".[gpu]"

Flags:
  --stage=STAGE           one stage (configs/kinetics.py:stage=STAGE); nodes and GPUs per node default to
                          launch/topologies.json [gpu] (the official recipe's hardware).
  --recipe=NAME           or several stages in order (configs/kinetics.py:recipe=deltatok|deltaworld|all),
                          on the hardware of the recipe's largest stage. One of --stage / --recipe is required.
  --workdir=DIR           a directory every node sees (shared filesystem or gs://). Required.
  --mode=train|eval|recipe   default train.
  --nodes=N               override the table.
  --gpus-per-node=G       override the table.
  --tasks-per-node=gpu|node  one process per GPU (default) or one per node (JAX_LOCAL_DEVICE_IDS then
                          hands it all the node's GPUs).
  --python=PATH           Python with deltaworld_jax installed, on the nodes (default: python3).
  --partition=P --account=A --time=HH:MM:SS --qos=Q   passed to sbatch.
  --job-name=NAME         default deltaworld-STAGE.
  --config-flag=FLAG      extra flag for main.py, repeatable (e.g. --config-flag=--config.train.num_steps=10).
  --dry-run               print the commands instead of submitting.
  -h, --help              this text.
EOF
}

STAGE="" RECIPE="" WORKDIR="" MODE="train" NODES="" GPUS_PER_NODE="" TASKS_PER_NODE="gpu" PYTHON="python3"
JOB_NAME=""
SBATCH_EXTRA=()
CONFIG_FLAGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --stage | --stage=*) flag_value --stage "$@"; STAGE="${REPLY}"; shift "${SHIFT_BY}" ;;
    --recipe | --recipe=*) flag_value --recipe "$@"; RECIPE="${REPLY}"; shift "${SHIFT_BY}" ;;
    --workdir | --workdir=*) flag_value --workdir "$@"; WORKDIR="${REPLY%/}"; shift "${SHIFT_BY}" ;;
    --mode | --mode=*) flag_value --mode "$@"; MODE="${REPLY}"; shift "${SHIFT_BY}" ;;
    --nodes | --nodes=*) flag_value --nodes "$@"; NODES="${REPLY}"; shift "${SHIFT_BY}" ;;
    --gpus-per-node | --gpus-per-node=*) flag_value --gpus-per-node "$@"; GPUS_PER_NODE="${REPLY}"; shift "${SHIFT_BY}" ;;
    --tasks-per-node | --tasks-per-node=*) flag_value --tasks-per-node "$@"; TASKS_PER_NODE="${REPLY}"; shift "${SHIFT_BY}" ;;
    --python | --python=*) flag_value --python "$@"; PYTHON="${REPLY}"; shift "${SHIFT_BY}" ;;
    --job-name | --job-name=*) flag_value --job-name "$@"; JOB_NAME="${REPLY}"; shift "${SHIFT_BY}" ;;
    --partition | --partition=* | --account | --account=* | --time | --time=* | --qos | --qos=*)
      flag="${1%%=*}"; flag_value "${flag}" "$@"; SBATCH_EXTRA+=("${flag}=${REPLY}"); shift "${SHIFT_BY}" ;;
    --config-flag | --config-flag=*) flag_value --config-flag "$@"; CONFIG_FLAGS+=("${REPLY}"); shift "${SHIFT_BY}" ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

[[ -n "${STAGE}${RECIPE}" ]] || die "--stage or --recipe is required"
[[ -z "${STAGE}" || -z "${RECIPE}" ]] || die "give --stage or --recipe, not both"
HW_STAGE="${STAGE}"
if [[ -n "${RECIPE}" ]]; then HW_STAGE="$(recipe_stage "${RECIPE}")"; fi
require_shared_workdir "${WORKDIR}" any
case "${MODE}" in train | eval | recipe) ;; *) die "--mode must be train, eval or recipe (got ${MODE})" ;; esac
NODES="${NODES:-$(topology_field gpu "${HW_STAGE}" nodes)}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(topology_field gpu "${HW_STAGE}" gpus_per_node)}"
[[ "${NODES}" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer (got ${NODES})"
[[ "${GPUS_PER_NODE}" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer (got ${GPUS_PER_NODE})"
case "${TASKS_PER_NODE}" in
  gpu) NTASKS_PER_NODE="${GPUS_PER_NODE}" ;;
  node) NTASKS_PER_NODE=1 ;;
  *) die "--tasks-per-node must be gpu or node (got ${TASKS_PER_NODE})" ;;
esac

MAIN_ARGV=("${PYTHON}" -m deltaworld_jax.main "--config=$(kinetics_config "${STAGE}" "${RECIPE}")"
  "--workdir=${WORKDIR}" "--mode=${MODE}" "${CONFIG_FLAGS[@]}")

run_cmd sbatch --job-name="${JOB_NAME:-deltaworld-${STAGE:-${RECIPE}}}" --nodes="${NODES}" \
  --ntasks-per-node="${NTASKS_PER_NODE}" --gpus-per-node="${GPUS_PER_NODE}" --chdir="${REPO_ROOT}" \
  "${SBATCH_EXTRA[@]}" "${LAUNCH_DIR}/slurm_job.sbatch" "${MAIN_ARGV[@]}"

if [[ "${DRY_RUN}" == 1 ]]; then
  echo "# inside the job (on the first node), launch/slurm_job.sbatch runs:"
  SLURM_JOB_ID=0 SLURM_JOB_NUM_NODES="${NODES}" SLURM_NTASKS_PER_NODE="${NTASKS_PER_NODE}" \
    SLURM_GPUS_ON_NODE="${GPUS_PER_NODE}" DRY_RUN=1 \
    "${LAUNCH_DIR}/slurm_job.sbatch" --dry-run "${MAIN_ARGV[@]}" 2>/dev/null
fi
