#!/usr/bin/env bash
# Everything issue 18 asks of a GPU, in ONE call on a lent GPU machine (the device tool: one H100 / H200, no
# network, ~15 minutes of device time per session, a machine start included). Prepare here first:
#
#   bash benchmarks/gpu_prepare.sh /path/to/deltatok_official_checkout      # writes .gpu_carry/
#
# then run, as the device tool's command (carry: [".gpu_carry"], timeout_s: 590):
#
#   bash benchmarks/gpu_session.sh
#
# Steps, most wanted first, each under its own time limit and all within one budget, so that the call ends
# inside the device tool's 10 minutes and what finished comes back. The tool returns at most 8 files from $OUT
# (elsewhere $OUT defaults to /tmp/gpu_session): $OUT/summary.txt, and $OUT/gpu_session.tgz, remade after every
# step, which holds the files below (written to $GPU_SESSION_WORK, default /tmp/gpu_session_work). One process
# per row and mode: a row that runs past its limit costs only itself.
#   versions.txt                 the GPU, jax / flax / torch versions, the devices jax sees
#   test_gpu.log                 tests/test_gpu.py: cuDNN flash attention against the reference path (forward
#                                and gradients, frame-causal mask, inside the predictor)
#   sbs_fp32_eager_<row>.*       the side-by-side rows: float32 on both sides with TF32 matmuls (the official
#                                trainer's torch.set_float32_matmul_precision("high")), official eager
#   sbs_bf16_eager_<row>.*       official bf16-mixed (autocast) against ours in bfloat16 with cuDNN attention
#   sbs_fp32_compile_<row>.*, sbs_bf16_compile_<row>.*   the same with the official side under torch.compile
#                                (slow to compile: last); the table's "official" is the better of the two modes
#   summary.txt                  each step's exit status and time, then every table row measured
# Seconds: GPU_SESSION_BUDGET (default 540, all steps together), GPU_SESSION_TEST_LIMIT (default 60),
# GPU_SESSION_ROW_LIMIT (default 60, one row in one mode).
# GPU_SESSION_DEVICE=cpu rehearses the script on a CPU machine where the package is installed (no wheels, no
# GPU: the tests skip, the rows run on the CPU), e.g. `OUT=/tmp/rehearsal GPU_SESSION_ROW_LIMIT=300 ...`.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/gpu_session}
WORK=${GPU_SESSION_WORK:-/tmp/gpu_session_work}
rm -rf "${WORK:?}" "$OUT/summary.txt" "$OUT/gpu_session.tgz"  # a fresh record of this run only
mkdir -p "$OUT" "$WORK"
CARRY=.gpu_carry
budget=${GPU_SESSION_BUDGET:-540}
test_limit=${GPU_SESSION_TEST_LIMIT:-60}
row_limit=${GPU_SESSION_ROW_LIMIT:-60}
device=${GPU_SESSION_DEVICE:-gpu}

if [[ ! -d $CARRY/wheels || ! -d $CARRY/deltatok ]]; then
  echo "no $CARRY/wheels or $CARRY/deltatok: run benchmarks/gpu_prepare.sh here first and carry .gpu_carry" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [[ $device == gpu ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $CARRY/wheels/*.whl || exit 2
  export PYTHONPATH=/tmp/site:$PWD JAX_PLATFORMS=cuda
else
  export PYTHONPATH=$PWD JAX_PLATFORMS=cpu
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch',
torch.__version__, 'transformers', transformers.__version__); print(jax.devices())"
  uptime
} 2>&1 | tee "$WORK/versions.txt"

step() {  # step NAME LIMIT COMMAND...: run under a time limit (and the budget), log to $WORK/NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$((budget - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    echo "== $name: skipped, the budget ($budget s) is spent" | tee -a "$OUT/summary.txt"
    return
  fi
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
  tail -n 12 "$WORK/$name.log"
  tar czf "$OUT/gpu_session.tgz" -C "$WORK" .
}

step test_gpu "$test_limit" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
sbs=(python3 benchmarks/official_side_by_side.py "--official_repo=$CARRY/deltatok" "--device=$device" --fp32_matmul=tf32
     --rounds=2 --steps=10 --warmup=3)
bf16=(--official_autocast=bf16 --ours_dtype=bfloat16 --ours_attention=auto)
for mode in eager compile; do
  for row in deltatok deltaworld dinoworld forecast; do
    step "sbs_fp32_${mode}_$row" "$row_limit" "${sbs[@]}" --rows=$row --official_modes=$mode \
      --json_out="$WORK/sbs_fp32_${mode}_$row.json"
    step "sbs_bf16_${mode}_$row" "$row_limit" "${sbs[@]}" "${bf16[@]}" --rows=$row --official_modes=$mode \
      --json_out="$WORK/sbs_bf16_${mode}_$row.json"
  done
done
{
  echo "== table rows (median ms per step, range of per-round medians; official / ours)"
  for f in "$WORK"/sbs_*.log; do
    grep -h -B0 "^| [A-Zf]" "$f" | head -n 1 | sed "s|^|$(basename "$f" .log) |"
  done
} | tee -a "$OUT/summary.txt"
