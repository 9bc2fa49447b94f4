#!/usr/bin/env bash
# Ahead-of-time compiles of every recipe stage for TPU slices (minutes to tens of minutes each on a CPU
# host), one after the other, in the background-friendly way: every result lands in
# benchmarks/results/aot_<stage>_<topology>_b<per-chip batch>.{json,log}; benchmarks/RESULTS.md quotes them.
#
#   TPU_PYTHON=/path/to/python-with-libtpu benchmarks/run_aot.sh [CONFIG] [STAGES...]
#
# CONFIG defaults to configs/kinetics.py (stage via ':stage=NAME'). Needs libtpu in TPU_PYTHON; no TPU.
set -euo pipefail
cd "$(dirname "$0")/.."
TPU_PYTHON="${TPU_PYTHON:-python}"
CONFIG="${1:-configs/kinetics.py}"
shift || true
STAGES=("$@")
if [[ ${#STAGES[@]} -eq 0 ]]; then
  STAGES=(deltatok_256 deltatok_512 deltaworld dinoworld)
fi
OUT=benchmarks/results
mkdir -p "${OUT}"
export JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1

compile() {  # stage topology per_chip_batch [extra flags...]
  local stage="$1" topology="$2" batch="$3"
  shift 3
  local name="aot_${stage}_${topology//:/_}_b${batch}"
  echo "$(date -u +%H:%M:%S) ${name}"
  "${TPU_PYTHON}" -m deltaworld_jax.benchmark aot --config="${CONFIG}:stage=${stage}" --topology="${topology}" \
    --per_chip_batch="${batch}" --json_out="${OUT}/${name}.json" "$@" > "${OUT}/${name}.log" 2>&1 \
    || echo "  failed: see ${OUT}/${name}.log"
}

for stage in "${STAGES[@]}"; do
  # Two per-chip batches on the smallest v5e slice give the per-example memory (benchmark fit's model).
  compile "${stage}" v5e:2x2 1 --sharding=fsdp
  compile "${stage}" v5e:2x2 2 --sharding=fsdp
  compile "${stage}" v5p:2x2x1 8 --sharding=fsdp
done
