#!/usr/bin/env bash
# The machine's f32 FMA peak (GFLOP/s, both cores), by ../shared/reference/pytorch/fma_peak.c:
# the AVX-512 figure where the CPU has AVX-512, else the AVX2 one. On a CPU without AVX-512 the
# probe's AVX-512 and BF16 loops would fault, so a copy with those two calls taken out runs.
#   scripts/fma_peak.sh          prints one number
#   scripts/fma_peak.sh --all    prints the probe's own lines too (on stderr)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
probe="$here/../shared/reference/pytorch/fma_peak.c"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if grep -qw avx512f /proc/cpuinfo; then
    cp "$probe" "$tmp/fma_peak.c"
    column=1
else
    sed 's/{ r512+=bench512(); }/{ }/; s/{ rbf+=benchbf16(); }/{ }/' "$probe" > "$tmp/fma_peak.c"
    column=2
fi
gcc -O2 -mavx512f -mavx512bf16 -mavx512vl -mfma -fopenmp "$tmp/fma_peak.c" -o "$tmp/fma_peak"
"$tmp/fma_peak" > "$tmp/out"
[ "${1:-}" = --all ] && cat "$tmp/out" >&2
# threads=2  AVX-512 f32 FMA: X GFLOP/s  AVX2 f32 FMA: Y GFLOP/s  AVX512-BF16 dot: Z GFLOP/s
grep '^threads=2' "$tmp/out" | sed -E 's/.*FMA: ([0-9.]+) GFLOP\/s .*FMA: ([0-9.]+) GFLOP\/s.*/\1 \2/' | cut -d' ' -f$column
