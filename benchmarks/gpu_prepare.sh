#!/usr/bin/env bash
# Prepare, on THIS machine (it needs PyPI), what benchmarks/gpu_session.sh needs on a lent GPU machine, which
# can download nothing:
#
#   bash benchmarks/gpu_prepare.sh /path/to/deltatok_official_checkout
#
# Writes .gpu_carry/ (ignored by git; ~8 MB, under the device tool's 64 MiB):
#   wheels/    Python 3.12 x86-64 wheels of the packages the device image ('cuda': jax with the CUDA plugin,
#              torch, transformers, optax, tensorstore, ...) lacks, or holds at another version than this
#              checkout is tested with: flax and orbax-checkpoint (pinned to the versions installed here),
#              grain, array_record, portpicker, ml_collections. Their other requirements are in the image
#              (the device tool's KINDS.md lists it).
#   deltatok/  a copy of the official code's checkout named on the command line (github.com/amazon-far/deltatok),
#              which benchmarks/official_side_by_side.py imports with --official_repo; nothing of it is
#              copied into the project.
set -euo pipefail
cd "$(dirname "$0")/.."
official=${1:?usage: benchmarks/gpu_prepare.sh OFFICIAL_CHECKOUT (a checkout of github.com/amazon-far/deltatok)}
[[ -d "$official/models" ]] || { echo "$official is not a checkout of amazon-far/deltatok (no models/ folder)" >&2; exit 2; }

version() {  # the version installed here, so the device runs what the tests here ran
  python -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'
}
pins=()
for name in flax orbax-checkpoint grain array_record ml_collections portpicker; do
  v=$(version "$name")
  [[ -n "$v" ]] || { echo "$name is not installed here: run pip install -e . first" >&2; exit 2; }
  pins+=("$name==$v")
done

rm -rf .gpu_carry && mkdir -p .gpu_carry/wheels
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .gpu_carry/wheels "${pins[@]}"
cp -r "$official" .gpu_carry/deltatok
rm -rf .gpu_carry/deltatok/.git
echo "prepared .gpu_carry ($(du -sh .gpu_carry | cut -f1)): ${pins[*]}"
ls .gpu_carry/wheels
