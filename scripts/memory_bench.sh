#!/usr/bin/env bash
# Peak memory of training SmolLM2 (verbalizer, the movie-review split) with the GGUF dequantized at
# load and with --keep-quantized, one after the other: peak RSS (GNU time) and seconds per step.
#   scripts/memory_bench.sh [STEPS] [BATCH]      (make memory-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5}
batch=${2:-16}
model=assets/models/SmolLM2-135M-Instruct.Q4_1.gguf
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%-16s %14s %10s  %s\n' "weights" "peak RSS MiB" "s/step" "losses (the same both ways)"
for mode in dequantized keep-quantized; do
  flag=$([ "$mode" = keep-quantized ] && echo --keep-quantized || true)
  /usr/bin/time -f '%M' -o "$tmp/rss" target/release/softprompt train --model "$model" $flag \
    --task verbalizer --template 'Review: {text}\nSentiment:' --label-words negative,positive \
    --train assets/data/movie-reviews/train.tsv --output "$tmp/$mode" \
    --max-steps "$steps" --batch-size "$batch" --eval-every "$steps" --seed 0 >/dev/null 2>&1
  rss_kib=$(tail -1 "$tmp/rss")
  read -r per_step losses < <(python3 -c "import json,statistics as s; r=[json.loads(l) for l in open('$tmp/$mode/metrics.jsonl') if 'loss' in l and 'examples_per_s' in l]; print(f'{s.median($batch/x[\"examples_per_s\"] for x in r):.2f}', ' '.join(f'{x[\"loss\"]:.6f}' for x in r))")
  printf '%-16s %14.0f %10s  %s\n' "$mode" "$((rss_kib / 1024))" "$per_step" "$losses"
done
