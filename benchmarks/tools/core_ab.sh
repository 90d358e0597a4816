#!/usr/bin/env bash
# A/B of the CPU core between git revisions (or the working tree, "."), in one process:
#
#   bash benchmarks/tools/core_ab.sh [ROUNDS] [D] REV [REV ...]    e.g.  core_ab.sh 15 16 HEAD~1 .
#
# Builds csrc/kernels/cpu of each revision as a shared library (g++ -O3, the flags setup.py
# uses) and times them alternately with benchmarks/tools/core_ab.cpp (see there: env BATCH,
# SEQ, HUGE). Trust ratios within one run, not times across runs (shared machines).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
rounds=${1:-15}; dim=${2:-16}; shift 2 || true
[ $# -gt 0 ] || set -- HEAD .
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
g++ -O2 -std=c++17 -I"$root/csrc/include" "$root/benchmarks/tools/core_ab.cpp" -ldl -o "$work/core_ab"
libs=()
for rev in "$@"; do
  src="$work/src-${#libs[@]}"; mkdir -p "$src"
  if [ "$rev" = . ]; then cp -r "$root/csrc" "$src/"; else git -C "$root" archive "$rev" csrc | tar -x -C "$src"; fi
  lib="$work/${rev//\//_}-${#libs[@]}.so"
  g++ -O3 -std=c++17 -shared -fPIC -Wno-psabi -I"$src/csrc/include" -I"$src/csrc" "$src"/csrc/kernels/cpu/*.cpp -o "$lib"
  libs+=("$lib")
done
"$work/core_ab" "$rounds" "$dim" "${libs[@]}"
