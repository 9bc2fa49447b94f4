#!/usr/bin/env bash
# Train or evaluate on Cloud TPU: one slice (TPU VM) or several (queued resource, multi-slice).
# `launch/tpu.sh --help` explains; `--dry-run` prints the exact commands and runs nothing.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh COMMAND [flags]

Commands (run them in this order, or `up` for create + setup + run + logs):
  create   Create the TPU: a TPU VM (`gcloud compute tpus tpu-vm create`), or a queued resource
           (`gcloud compute tpus queued-resources create`) with --queued or --num-slices > 1,
           then wait until it is ACTIVE.
  setup    Copy this checkout (or clone --git-url) to EVERY worker and `pip install -e ".[tpu]"` there,
           in a Python 3.11 virtual environment (TPU VM images ship Python 3.10).
  run      Start `python -m deltaworld_jax.main --config=configs/kinetics.py:stage=STAGE
           --workdir=gs://... --mode=MODE` on every worker at once, detached, logging to a file per worker.
           jax.distributed.initialize() finds the other workers (and slices) from the TPU metadata.
  logs     Stream the log of one worker (worker 0 by default; --log-worker=N).
  stop     Stop the run on every worker.
  delete   Delete the TPU VM or queued resource.
  up       create, setup, run, logs.

Flags:
  --name=NAME               TPU VM / queued-resource name (required).
  --zone=ZONE               e.g. us-east5-a (v5p), us-east1-d (v6e) (required).
  --project=PROJECT         default: gcloud's configured project.
  --stage=STAGE             one stage (configs/kinetics.py:stage=STAGE), e.g. deltatok_256; picks the TPU
                            type from launch/topologies.json. Stages that continue another run need its
                            path: --config-flag=--config.train.init_from=gs://.../checkpoints (see the config).
  --recipe=NAME             or several stages in order (configs/kinetics.py:recipe=deltatok|deltaworld|all),
                            each in WORKDIR/<stage>/, on the TPU of the recipe's largest stage.
                            One of --stage / --recipe is required for create and run.
  --mode=train|eval|recipe  what main.py runs (default train).
  --workdir=gs://BUCKET/DIR checkpoints, metrics and logs; must be on GCS (required for setup and run:
                            setup stages the source tarball under WORKDIR/launch/).
  --accelerator-type=TYPE   override the table, e.g. v5p-64, v6e-32.
  --topology=AxBxC --type=v4  chip-based shape instead of an accelerator type.
  --version=RUNTIME         TPU software version (default: per family, from launch/topologies.json).
  --num-slices=N            N > 1: multi-slice queued resource (--node-count=N).
  --queued                  use a queued resource even for one slice.
  --spot | --reserved | --guaranteed   capacity (guaranteed: queued resources only).
  --git-url=URL [--git-ref=REF]  clone this repository on the workers instead of copying the checkout.
  --python=3.11             Python version of the workers' virtual environment.
  --config-flag=FLAG        extra flag for main.py, repeatable, e.g. --config-flag=--config.data.root=gs://b/k700
                            or --config-flag=--stages=deltatok_512 (a recipe's stages to run).
  --env=NAME=VALUE          environment variable for the run on every worker, repeatable (e.g. HF_TOKEN for
                            the gated DINOv3 weights; it is visible in the workers' process list).
  --log-worker=N            worker whose log `logs` streams (default 0).
  --dry-run                 print the commands instead of running them.
  -h, --help                this text.

Example (see `--dry-run` for the exact commands):
  launch/tpu.sh up --name=dw-tok --zone=us-east5-a --stage=deltatok_256 --spot \
      --workdir=gs://my-bucket/deltatok_256 --config-flag=--config.data.root=gs://my-bucket/k700
  launch/tpu.sh up --name=dw-world --zone=us-east5-a --stage=deltaworld_512 --num-slices=2 --reserved \
      --workdir=gs://my-bucket/world --config-flag=--config.data.root=gs://my-bucket/k700 \
      --config-flag=--config.tokenizer.checkpoint=/path/to/deltatok-kinetics/pytorch_model.bin
EOF
}

COMMAND=""
NAME="" ZONE="" PROJECT="" STAGE="" RECIPE="" HW_STAGE="" MODE="train" WORKDIR=""
ACCELERATOR_TYPE="" TOPOLOGY="" TPU_TYPE="" VERSION="" NUM_SLICES="" QUEUED=0
CAPACITY="" GIT_URL="" GIT_REF="" PYTHON_VERSION="3.11" LOG_WORKER=0
CONFIG_FLAGS=()
RUN_ENV=()

parse_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --queued) QUEUED=1; shift ;;
      --spot | --reserved | --guaranteed)
        [[ -z "${CAPACITY}" ]] || die "give only one of --spot, --reserved, --guaranteed"
        CAPACITY="$1"; shift ;;
      --name | --name=*) flag_value --name "$@"; NAME="${REPLY}"; shift "${SHIFT_BY}" ;;
      --zone | --zone=*) flag_value --zone "$@"; ZONE="${REPLY}"; shift "${SHIFT_BY}" ;;
      --project | --project=*) flag_value --project "$@"; PROJECT="${REPLY}"; shift "${SHIFT_BY}" ;;
      --stage | --stage=*) flag_value --stage "$@"; STAGE="${REPLY}"; shift "${SHIFT_BY}" ;;
      --recipe | --recipe=*) flag_value --recipe "$@"; RECIPE="${REPLY}"; shift "${SHIFT_BY}" ;;
      --env | --env=*)
        flag_value --env "$@"
        [[ "${REPLY}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes NAME=VALUE (got ${REPLY})"
        RUN_ENV+=("${REPLY}"); shift "${SHIFT_BY}" ;;
      --mode | --mode=*) flag_value --mode "$@"; MODE="${REPLY}"; shift "${SHIFT_BY}" ;;
      --workdir | --workdir=*) flag_value --workdir "$@"; WORKDIR="${REPLY%/}"; shift "${SHIFT_BY}" ;;
      --accelerator-type | --accelerator-type=*)
        flag_value --accelerator-type "$@"; ACCELERATOR_TYPE="${REPLY}"; shift "${SHIFT_BY}" ;;
      --topology | --topology=*) flag_value --topology "$@"; TOPOLOGY="${REPLY}"; shift "${SHIFT_BY}" ;;
      --type | --type=*) flag_value --type "$@"; TPU_TYPE="${REPLY}"; shift "${SHIFT_BY}" ;;
      --version | --version=*) flag_value --version "$@"; VERSION="${REPLY}"; shift "${SHIFT_BY}" ;;
      --num-slices | --num-slices=*) flag_value --num-slices "$@"; NUM_SLICES="${REPLY}"; shift "${SHIFT_BY}" ;;
      --git-url | --git-url=*) flag_value --git-url "$@"; GIT_URL="${REPLY}"; shift "${SHIFT_BY}" ;;
      --git-ref | --git-ref=*) flag_value --git-ref "$@"; GIT_REF="${REPLY}"; shift "${SHIFT_BY}" ;;
      --python | --python=*) flag_value --python "$@"; PYTHON_VERSION="${REPLY}"; shift "${SHIFT_BY}" ;;
      --log-worker | --log-worker=*) flag_value --log-worker "$@"; LOG_WORKER="${REPLY}"; shift "${SHIFT_BY}" ;;
      --config-flag | --config-flag=*) flag_value --config-flag "$@"; CONFIG_FLAGS+=("${REPLY}"); shift "${SHIFT_BY}" ;;
      -*) die "unknown flag $1 (see --help)" ;;
      *)
        [[ -z "${COMMAND}" ]] || die "one command only (got ${COMMAND} and $1)"
        COMMAND="$1"; shift ;;
    esac
  done
  [[ -n "${COMMAND}" ]] || { usage >&2; exit 2; }
  [[ -n "${NAME}" ]] || die "--name is required"
  [[ -n "${ZONE}" ]] || die "--zone is required"
  case "${MODE}" in train | eval | recipe) ;; *) die "--mode must be train, eval or recipe (got ${MODE})" ;; esac
  [[ "${LOG_WORKER}" =~ ^[0-9]+$ ]] || die "--log-worker must be a worker index (got ${LOG_WORKER})"
  if [[ -n "${TOPOLOGY}" || -n "${TPU_TYPE}" ]]; then
    [[ -n "${TOPOLOGY}" && -n "${TPU_TYPE}" ]] || die "--topology and --type go together"
    [[ -z "${ACCELERATOR_TYPE}" ]] || die "give --accelerator-type or --topology/--type, not both"
  fi
  [[ -z "${STAGE}" || -z "${RECIPE}" ]] || die "give --stage or --recipe, not both"
  HW_STAGE="${STAGE}"
  if [[ -n "${RECIPE}" ]]; then HW_STAGE="$(recipe_stage "${RECIPE}")"; fi
  if [[ -n "${HW_STAGE}" ]]; then
    # Validates the stage name even where the table's values are overridden.
    local table_type table_slices
    table_type="$(topology_field tpu "${HW_STAGE}" accelerator_type)"
    table_slices="$(topology_field tpu "${HW_STAGE}" num_slices)"
    if [[ -z "${ACCELERATOR_TYPE}" && -z "${TOPOLOGY}" ]]; then ACCELERATOR_TYPE="${table_type}"; fi
    if [[ -z "${NUM_SLICES}" ]]; then NUM_SLICES="${table_slices:-1}"; fi
  fi
  NUM_SLICES="${NUM_SLICES:-1}"
  [[ "${NUM_SLICES}" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer (got ${NUM_SLICES})"
  if [[ "${NUM_SLICES}" -gt 1 ]]; then QUEUED=1; fi
  if [[ "${CAPACITY}" == --guaranteed && "${QUEUED}" != 1 ]]; then
    die "--guaranteed exists for queued resources only: add --queued"
  fi
}

# The TPU family ("v5p" from "v5p-64", or --type) picks the default runtime version.
runtime_version() {
  if [[ -n "${VERSION}" ]]; then
    printf '%s' "${VERSION}"
    return
  fi
  local family="${TPU_TYPE:-${ACCELERATOR_TYPE%-*}}"
  [[ -n "${family}" ]] || die "no TPU type: give --stage, --recipe, --accelerator-type or --topology/--type"
  python3 - "${TOPOLOGIES_JSON}" "${family}" <<'PY'
import json
import sys

path, family = sys.argv[1:]
versions = json.load(open(path))["runtime_versions"]
if family not in versions:
    sys.exit(f"error: no default runtime version for TPU family {family!r}; pass --version "
             f"(known families: {', '.join(sorted(versions))})")
print(versions[family])
PY
}

gcloud_common() {
  GCLOUD_COMMON=(--zone="${ZONE}")
  if [[ -n "${PROJECT}" ]]; then GCLOUD_COMMON+=(--project="${PROJECT}"); fi
}

shape_flags() {
  if [[ -n "${TOPOLOGY}" ]]; then
    SHAPE_FLAGS=(--topology="${TOPOLOGY}" --type="${TPU_TYPE}")
  else
    [[ -n "${ACCELERATOR_TYPE}" ]] || die "no TPU type: give --stage, --recipe, --accelerator-type or --topology/--type"
    SHAPE_FLAGS=(--accelerator-type="${ACCELERATOR_TYPE}")
  fi
}

# Run a shell command on every worker of every slice.
on_all_workers() {
  local remote="$1"
  if [[ "${QUEUED}" == 1 ]]; then
    run_cmd gcloud compute tpus queued-resources ssh "${NAME}" "${GCLOUD_COMMON[@]}" \
      --node=all --worker=all --batch-size=all --command="${remote}"
  else
    run_cmd gcloud compute tpus tpu-vm ssh "${NAME}" "${GCLOUD_COMMON[@]}" --worker=all --command="${remote}"
  fi
}

cmd_create() {
  local version
  version="$(runtime_version)"
  shape_flags
  local capacity=()
  if [[ -n "${CAPACITY}" ]]; then capacity=("${CAPACITY}"); fi
  if [[ "${QUEUED}" == 1 ]]; then
    local nodes=(--node-id="${NAME}")
    if [[ "${NUM_SLICES}" -gt 1 ]]; then nodes=(--node-count="${NUM_SLICES}" --node-prefix="${NAME}"); fi
    run_cmd gcloud compute tpus queued-resources create "${NAME}" "${GCLOUD_COMMON[@]}" \
      "${SHAPE_FLAGS[@]}" --runtime-version="${version}" "${nodes[@]}" "${capacity[@]}"
    wait_until_active
  else
    run_cmd gcloud compute tpus tpu-vm create "${NAME}" "${GCLOUD_COMMON[@]}" \
      "${SHAPE_FLAGS[@]}" --version="${version}" "${capacity[@]}"
  fi
}

# A queued resource is created at once but provisioned when capacity frees up.
wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "${NAME}" "${GCLOUD_COMMON[@]}"
    --format="value(state.state)")
  if [[ "${DRY_RUN}" == 1 ]]; then
    echo "# until ACTIVE, every 60 s:"
    run_cmd "${describe[@]}"
    return
  fi
  local state
  while true; do
    state="$("${describe[@]}")"
    echo "queued resource ${NAME}: ${state}" >&2
    case "${state}" in
      ACTIVE) return ;;
      FAILED | SUSPENDED) die "queued resource ${NAME} is ${state}" ;;
    esac
    sleep 60
  done
}

SOURCE_URI_SUFFIX="launch/source.tar.gz"
REMOTE_REPO="\$HOME/deltaworld_jax"
REMOTE_VENV="\$HOME/deltaworld_venv"
REMOTE_LOGS="\$HOME/deltaworld_logs"

# Pack the checkout's tracked and untracked-but-not-ignored files (what `git status` shows), so
# uncommitted edits travel too and build outputs do not.
stage_local_source() {
  local source_uri="$1" tarball
  if [[ "${DRY_RUN}" == 1 ]]; then
    tarball="/tmp/deltaworld_jax_source.tar.gz"
    echo "# pack the checkout: git ls-files --cached --others --exclude-standard | tar -czf ${tarball}"
  else
    tarball="$(mktemp --suffix=.tar.gz)"
    git -C "${REPO_ROOT}" ls-files -z --cached --others --exclude-standard |
      tar -C "${REPO_ROOT}" --null -T - -czf "${tarball}"
  fi
  run_cmd gcloud storage cp "${tarball}" "${source_uri}"
}

cmd_setup() {
  require_shared_workdir "${WORKDIR}" gcs
  local fetch
  if [[ -n "${GIT_URL}" ]]; then
    fetch="rm -rf ${REMOTE_REPO} && git clone $(shell_quote "${GIT_URL}") ${REMOTE_REPO}"
    if [[ -n "${GIT_REF}" ]]; then fetch+=" && git -C ${REMOTE_REPO} checkout $(shell_quote "${GIT_REF}")"; fi
  else
    local source_uri="${WORKDIR}/${SOURCE_URI_SUFFIX}"
    stage_local_source "${source_uri}"
    fetch="rm -rf ${REMOTE_REPO} && mkdir -p ${REMOTE_REPO}"
    fetch+=" && gcloud storage cp $(shell_quote "${source_uri}") - | tar -xz -C ${REMOTE_REPO}"
  fi
  # uv brings the Python version the package needs; pip then installs the package as everywhere else.
  # (--break-system-packages only where the image's pip refuses --user installs: PEP 668 images)
  local install="{ python3 -m pip install --user --quiet uv || python3 -m pip install --user --quiet --break-system-packages uv; }"
  install+=" && { [ -x ${REMOTE_VENV}/bin/python ] || \$HOME/.local/bin/uv venv --seed --python $(shell_quote "${PYTHON_VERSION}") ${REMOTE_VENV}; }"
  install+=" && cd ${REMOTE_REPO} && ${REMOTE_VENV}/bin/python -m pip install --quiet -e '.[tpu]'"
  install+=" && ${REMOTE_VENV}/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
  on_all_workers "set -euo pipefail; ${fetch} && ${install}"
}

# The main command every worker runs: the same argv everywhere; the worker's rank comes from the TPU.
main_command() {
  # The table's flags for a stage (e.g. gradient accumulation to fit the chips' memory) come before the
  # user's, so a --config-flag can override them.
  local table_flags=()
  if [[ -n "${STAGE}" ]]; then mapfile -t table_flags < <(table_config_flags tpu "${STAGE}"); fi
  if [[ -n "${RECIPE}" ]]; then mapfile -t table_flags < <(table_config_flags recipes "${RECIPE}"); fi
  MAIN_ARGV=("${REMOTE_VENV}/bin/python" -m deltaworld_jax.main "--config=$(kinetics_config "${STAGE}" "${RECIPE}")" "--workdir=${WORKDIR}"
    "--mode=${MODE}" "${table_flags[@]}" "${CONFIG_FLAGS[@]}")
}

cmd_run() {
  require_shared_workdir "${WORKDIR}" gcs
  [[ -n "${STAGE}${RECIPE}" ]] || die "--stage or --recipe is required for run"
  main_command
  local main_line="" word assignment
  if [[ ${#RUN_ENV[@]} -gt 0 ]]; then main_line="env "; fi
  for assignment in "${RUN_ENV[@]}"; do
    main_line+="${assignment%%=*}=$(shell_quote "${assignment#*=}") "
  done
  for word in "${MAIN_ARGV[@]}"; do
    # $HOME stays unquoted so the worker's shell expands it.
    if [[ "${word}" == "${REMOTE_VENV}/bin/python" ]]; then main_line+="${word} "; else main_line+="$(shell_quote "${word}") "; fi
  done
  local log="${REMOTE_LOGS}/${NAME}.log" pid="${REMOTE_LOGS}/${NAME}.pid"
  # setsid + nohup + redirected stdin/stdout: the run outlives the ssh session; its process group id
  # is kept so `stop` ends exactly this run.
  on_all_workers "set -euo pipefail; mkdir -p ${REMOTE_LOGS}; cd ${REMOTE_REPO}; setsid nohup ${main_line% } > ${log} 2>&1 < /dev/null & echo \$! > ${pid}"
}

cmd_logs() {
  local log="${REMOTE_LOGS}/${NAME}.log"
  if [[ "${QUEUED}" == 1 ]]; then
    run_cmd gcloud compute tpus queued-resources ssh "${NAME}" "${GCLOUD_COMMON[@]}" --node=0 \
      --worker="${LOG_WORKER}" --command="tail -n +1 -F ${log}"
  else
    run_cmd gcloud compute tpus tpu-vm ssh "${NAME}" "${GCLOUD_COMMON[@]}" --worker="${LOG_WORKER}" \
      --command="tail -n +1 -F ${log}"
  fi
}

cmd_stop() {
  local pid="${REMOTE_LOGS}/${NAME}.pid"
  on_all_workers "if [ -f ${pid} ]; then kill -- -\$(cat ${pid}) || true; rm -f ${pid}; fi"
}

cmd_delete() {
  if [[ "${QUEUED}" == 1 ]]; then
    run_cmd gcloud compute tpus queued-resources delete "${NAME}" "${GCLOUD_COMMON[@]}" --force --quiet
  else
    run_cmd gcloud compute tpus tpu-vm delete "${NAME}" "${GCLOUD_COMMON[@]}" --quiet
  fi
}

main() {
  parse_args "$@"
  gcloud_common
  case "${COMMAND}" in
    create) cmd_create ;;
    setup) cmd_setup ;;
    run) cmd_run ;;
    logs) cmd_logs ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
    up) cmd_create; cmd_setup; cmd_run; cmd_logs ;;
    *) die "unknown command ${COMMAND} (see --help)" ;;
  esac
}

main "$@"
