#!/usr/bin/env bash
# Ahead-of-time compiles of every recipe stage for TPU slices (minutes to tens of minutes each on a CPU
# host), one after the other; every result lands in benchmarks/results/aot_<stage>_<topology>_b<batch>.json
# (+ .log). Then `python -m benchmarks.benchmark fit --inputs='benchmarks/results/aot_<stage>_*.json'
# --chip=v5p` predicts every slice from them, and `benchmark table` renders them for RESULTS.md.
#
#   TPU_PYTHON=/path/to/python-with-libtpu benchmarks/run_aot.sh [CONFIG_SPEC...]
#
# CONFIG_SPEC: e.g. configs/kinetics.py:stage=deltaworld_512 (default: the four stage kinds of the recipe).
# Needs libtpu in TPU_PYTHON (pip install libtpu==0.0.42.1); no TPU.
set -euo pipefail
cd "$(dirname "$0")/.."
TPU_PYTHON="${TPU_PYTHON:-python}"
SPECS=("$@")
if [[ ${#SPECS[@]} -eq 0 ]]; then
  SPECS=(configs/kinetics.py:stage=deltatok_256 configs/kinetics.py:stage=deltatok_512
         configs/kinetics.py:stage=deltaworld_512 configs/kinetics.py:stage=dinoworld_512)
fi
OUT=benchmarks/results
mkdir -p "${OUT}"
export JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1

compile() {  # config_spec topology per_chip_batch [extra flags...]
  local spec="$1" topology="$2" batch="$3"
  shift 3
  local stage="${spec##*=}"
  local name="aot_${stage}_${topology//:/_}_b${batch}"
  echo "$(date -u +%H:%M:%S) ${name}"
  "${TPU_PYTHON}" -m benchmarks.benchmark aot --config="${spec}" --topology="${topology}" \
    --per_chip_batch="${batch}" --json_out="${OUT}/${name}.json" "$@" > "${OUT}/${name}.log" 2>&1 \
    || echo "  failed: see ${OUT}/${name}.log"
}

for spec in "${SPECS[@]}"; do
  case "${spec}" in
    *dinoworld*)
      # DINO-World's predictor attends over every patch of the clip: with the `xla` attention that is ~76 GiB
      # of temporaries per example (fits v5p only); with splash attention FSDP alone fits v5e (7.56 GiB at 2/chip).
      compile "${spec}" v5e:2x2 2 --sharding=fsdp --config.model.attention_impl=splash \
        --config.vfm.attention_impl=splash
      compile "${spec}" v5p:2x2x1 1 --sharding=fsdp
      ;;
    *deltaworld*)
      # With the frozen tokenizer's attention on `xla`, libtpu 0.0.42.1 crashes (SIGSEGV) compiling 4/chip on v5e;
      # with it on splash, 4, 8 and 16/chip compile (5.54 / 8.44 / 11.89 GiB): the v5e fit is 16/chip.
      compile "${spec}" v5e:2x2 4 --sharding=fsdp --config.tokenizer.attention_impl=splash
      compile "${spec}" v5e:2x2 16 --sharding=fsdp --config.tokenizer.attention_impl=splash
      compile "${spec}" v5p:2x2x1 8 --sharding=fsdp
      ;;
    *)
      # Two per-chip batches on the smallest v5e slice give the per-example memory (benchmark fit's model),
      # one larger batch on the smallest v5p slice checks it on the other chip.
      compile "${spec}" v5e:2x2 1 --sharding=fsdp
      compile "${spec}" v5e:2x2 2 --sharding=fsdp
      compile "${spec}" v5p:2x2x1 8 --sharding=fsdp
      ;;
  esac
done
