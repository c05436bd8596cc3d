#!/usr/bin/env bash
# The measurements behind the training defaults: short runs (STEPS steps, batch 32, seed 0) on the
# movie-review split, varying one choice at a time; prints the best dev accuracy of each.
# Usage: scripts/sweep_defaults.sh [STEPS]   (needs `make assets` and a release build)
set -euo pipefail
steps=${1:-150}
bin=target/release/softprompt
model=assets/models/all-MiniLM-L6-v2
data=assets/data/movie-reviews
out=$(mktemp -d)
run() {
  local name=$1; shift
  "$bin" train --model "$model" --train "$data/train.tsv" --dev "$data/dev.tsv" --output "$out/$name" \
    --max-steps "$steps" --eval-every $((steps / 2)) --seed 0 "$@" >/dev/null 2>&1 || { echo "$name failed"; return; }
  printf '%-28s %s\n' "$name" "$(grep -o '"dev_accuracy":[0-9.]*' "$out/$name/metrics.jsonl" | cut -d: -f2 | sort -n | tail -1)"
}
for pool in first pooler cls mean; do run "pool=$pool" --pool "$pool"; done
for init in uniform normal vocab labels; do run "init=$init" --init "$init"; done
run "init=text" --init text --init-text "Classify the sentiment of this movie review as positive or negative:"
run "adamw lr=1e-3" --lr 1e-3
run "adamw lr=1e-2" --lr 1e-2
run "adafactor lr=0.3 constant" --optimizer adafactor --schedule constant
rm -rf "$out"
