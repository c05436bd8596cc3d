#!/usr/bin/env bash
# Measures `softprompt serve` on MiniLM with 8 adapters over loopback (make serve-bench):
#   1. mixed traffic: each request names one of the 8 adapters at random;
#   2. the same traffic for one adapter only;
#   3. mixed traffic against the same server with batching across adapters turned off;
#   4. with SOAK=seconds, a soak at 80 % of (1)'s throughput, the server's RSS sampled each minute.
# Usage: scripts/serve_bench.sh [seconds per run, default 60]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-60}
CONCURRENCY=${CONCURRENCY:-32}
BIN=target/release/softprompt
MODEL=assets/models/all-MiniLM-L6-v2
DATA=assets/data/movie-reviews
ADAPTERS=runs/serve-adapters
PORT=${PORT:-18080}
URL=http://127.0.0.1:$PORT

# 8 adapters: a few training steps each (their quality does not matter for speed)
if [ ! -f "$ADAPTERS/task7/adapter_config.json" ]; then
  mkdir -p "$ADAPTERS"
  head -n 65 "$DATA/train.tsv" > "$ADAPTERS/.train.tsv"
  for i in 0 1 2 3 4 5 6 7; do
    "$BIN" train --model "$MODEL" --train "$ADAPTERS/.train.tsv" --dev "$ADAPTERS/.train.tsv" \
      --output "$ADAPTERS/task$i" --max-steps 2 --min-steps 2 --seed "$i" --batch-size 8 > /dev/null
    rm -f "$ADAPTERS/task$i/checkpoint.safetensors" "$ADAPTERS/task$i/metrics.jsonl"
  done
  rm "$ADAPTERS/.train.tsv"
fi
ALL=(); for i in 0 1 2 3 4 5 6 7; do ALL+=(--adapter "task$i"); done

server_pid=
start_server() {
  "$BIN" serve --model "$MODEL" --adapters "$ADAPTERS" --port "$PORT" "$@" 2> runs/serve-bench.log &
  server_pid=$!
  for _ in $(seq 100); do curl -sf "$URL/health" > /dev/null && return; sleep 0.2; done
  echo "the server did not start; see runs/serve-bench.log" >&2; exit 1
}
stop_server() { kill -TERM "$server_pid"; wait "$server_pid" || true; }
trap '[ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true' EXIT
load() { "$BIN" loadgen --url "$URL" --data "$DATA/test.tsv" --json "$@"; }

start_server
load "${ALL[@]}" --concurrency "$CONCURRENCY" --duration 10 > /dev/null   # warm-up
mixed=$(load "${ALL[@]}" --concurrency "$CONCURRENCY" --duration "$SECONDS_PER_RUN")
single=$(load --adapter task0 --concurrency "$CONCURRENCY" --duration "$SECONDS_PER_RUN")
stop_server
start_server --no-mixed-batches
load "${ALL[@]}" --concurrency "$CONCURRENCY" --duration 10 > /dev/null
unmixed=$(load "${ALL[@]}" --concurrency "$CONCURRENCY" --duration "$SECONDS_PER_RUN")
stop_server

python3 - "$mixed" "$single" "$unmixed" <<'PY'
import json, sys
mixed, single, unmixed = (json.loads(a) for a in sys.argv[1:])
print(f"{'traffic':34} {'inputs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
for name, r in [("8 adapters, mixed batches", mixed), ("1 adapter", single),
                ("8 adapters, one adapter per batch", unmixed)]:
    print(f"{name:34} {r['inputs_per_second']:9.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {sum(r['errors'].values()):7d}")
print(f"mixed / single adapter: {mixed['inputs_per_second'] / single['inputs_per_second']:.2f}  (goal >= 0.9)")
print(f"mixed / one adapter per batch: {mixed['inputs_per_second'] / unmixed['inputs_per_second']:.2f}  (goal >= 3)")
PY

if [ -n "${SOAK:-}" ]; then
  rate=$(python3 -c "import json,sys; print(round(0.8 * json.loads(sys.argv[1])['requests_per_second'], 1))" "$mixed")
  echo "soak: ${SOAK} s at $rate requests/s (80 %), RSS of the server each minute:"
  start_server
  load "${ALL[@]}" --duration "$SOAK" --rate "$rate" --concurrency 64 > runs/soak.json &
  load_pid=$!
  for m in $(seq 0 $((SOAK / 60))); do
    echo "  minute $m: $(($(ps -o rss= -p "$server_pid") / 1024)) MiB"
    [ "$m" -lt $((SOAK / 60)) ] && sleep 60
  done
  wait "$load_pid"
  stop_server
  cat runs/soak.json
fi
