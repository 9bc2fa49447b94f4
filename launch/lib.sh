# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, never run on its own).
#
# Every command that touches the cloud or the cluster goes through `run_cmd`, so `--dry-run` prints
# exactly what would run (one command per line, quoted so the line can be pasted into a shell) and
# runs nothing.

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT="$(cd "${LAUNCH_DIR}/.." && pwd)"
TOPOLOGIES_JSON="${TOPOLOGIES_JSON:-${LAUNCH_DIR}/topologies.json}"
DRY_RUN="${DRY_RUN:-0}"

die() {
  echo "error: $*" >&2
  exit 2
}

# Quote one word for a POSIX shell: bare when it is made of safe characters only, else single-quoted.
shell_quote() {
  local word="$1"
  if [[ -n "${word}" && "${word}" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "${word}"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# The command line for argv, quoted word by word.
quote_command() {
  local out="" word
  for word in "$@"; do
    out+="$(shell_quote "${word}") "
  done
  printf '%s' "${out% }"
}

# Run argv, or print it under --dry-run.
run_cmd() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '%s\n' "$(quote_command "$@")"
  else
    echo "+ $(quote_command "$@")" >&2
    "$@"
  fi
}

# `--flag=value` or `--flag value`: sets REPLY to the value and SHIFT_BY to the number of words used.
flag_value() {
  local flag="$1" word="$2" next="${3-}"
  # shellcheck disable=SC2034  # REPLY and SHIFT_BY are this function's outputs
  if [[ "${word}" == *=* ]]; then
    REPLY="${word#*=}"
    SHIFT_BY=1
  else
    [[ $# -ge 3 ]] || die "${flag} needs a value"
    REPLY="${next}"
    SHIFT_BY=2
  fi
}

# Read one field of a stage from launch/topologies.json: `topology_field SECTION STAGE FIELD`.
# Prints nothing when the field is absent; fails with the list of known stages for an unknown stage.
topology_field() {
  python3 - "${TOPOLOGIES_JSON}" "$1" "$2" "$3" <<'PY'
import json
import sys

path, section, stage, field = sys.argv[1:]
with open(path) as f:
    table = json.load(f)[section]
if stage not in table:
    sys.exit(f"error: unknown stage {stage!r} in {path} [{section}]; known: {', '.join(sorted(table))}")
value = table[stage].get(field)
if value is not None:
    print(value)
PY
}

# Extra main.py flags for a stage or a recipe on its table hardware (`config_flags` in
# launch/topologies.json), one per line: `table_config_flags tpu STAGE` or `table_config_flags recipes NAME`.
table_config_flags() {
  python3 - "${TOPOLOGIES_JSON}" "$1" "$2" <<'PY'
import json
import sys

path, section, name = sys.argv[1:]
for flag in json.load(open(path))[section][name].get("config_flags", []):
    print(flag)
PY
}

# The stage whose hardware a recipe (configs/kinetics.py:recipe=NAME) runs on: its largest stage.
recipe_stage() {
  python3 - "${TOPOLOGIES_JSON}" "$1" <<'PY'
import json
import sys

path, recipe = sys.argv[1:]
recipes = json.load(open(path))["recipes"]
if recipe not in recipes:
    sys.exit(f"error: unknown recipe {recipe!r} in {path}; known: {', '.join(sorted(recipes))}")
print(recipes[recipe]["hardware"])
PY
}

# The --config value for main.py: one stage or a recipe of stages.
kinetics_config() {
  local stage="$1" recipe="$2"
  if [[ -n "${recipe}" ]]; then
    printf 'configs/kinetics.py:recipe=%s' "${recipe}"
  else
    printf 'configs/kinetics.py:stage=%s' "${stage}"
  fi
}

# Check a workdir that every host of a multi-host run must see.
require_shared_workdir() {
  local workdir="$1" kind="$2"
  [[ -n "${workdir}" ]] || die "--workdir is required"
  if [[ "${kind}" == gcs && "${workdir}" != gs://* ]]; then
    die "--workdir must be a gs:// path: every TPU worker writes checkpoints and logs there (got ${workdir})"
  fi
}
