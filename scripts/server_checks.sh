#!/usr/bin/env bash
# The server tried as an attacker would, in two checks that share their set-up (a decoder, one
# verbalizer adapter "sentiment" and one generation adapter "writer", a few steps of training each):
#   api   (make api-check): schemathesis (PyPI, in .venv-api) generates requests for every operation
#         of crates/softprompt-server/openapi.json; every response must match its schema, none a 5xx.
#         On the tiny decoder of the fixtures, so it takes a minute.
#   soak  (make soak): scripts/hostile_soak.py for SOAK_SECONDS (600) against SmolLM2 served with the
#         default limits: ordinary traffic must all succeed beside hostile clients, the peak RSS stay
#         under 2 GB, and SIGTERM end the server within 10 s.
# Usage: scripts/server_checks.sh api|soak
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: server_checks.sh api|soak}
BIN=target/release/softprompt
DATA=assets/data/movie-reviews
PORT=${PORT:-18090}
URL=http://127.0.0.1:$PORT
WORK=$(mktemp -d)
server_pid=
trap '[ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$WORK"' EXIT

case "$MODE" in
  api)
    MODEL=$WORK/decoder
    mkdir -p "$MODEL"
    cp tests/fixtures/tiny-gpt2/config.json tests/fixtures/tiny-gpt2/model.safetensors "$MODEL/"
    cp tests/fixtures/tiny-bert/tokenizer.json "$MODEL/" ;;
  soak) MODEL=assets/models/SmolLM2-135M-Instruct.Q4_1.gguf ;;
  *) echo "usage: server_checks.sh api|soak" >&2; exit 2 ;;
esac

head -n 33 "$DATA/train.tsv" > "$WORK/train.tsv"
few=(--model "$MODEL" --train "$WORK/train.tsv" --max-steps 2 --min-steps 2 --batch-size 4
     --num-virtual-tokens 4)
"$BIN" train "${few[@]}" --task verbalizer --template '{text} It was' --label-words bad,good \
  --output "$WORK/adapters/sentiment" > /dev/null
"$BIN" train "${few[@]}" --task causal-lm --template '{text} It was' \
  --output "$WORK/adapters/writer" > /dev/null

"$BIN" serve --model "$MODEL" --adapters "$WORK/adapters" --port "$PORT" 2> "$WORK/serve.log" &
server_pid=$!
for _ in $(seq 150); do curl -sf "$URL/health" > /dev/null && break; sleep 0.2; done
curl -sf "$URL/health" > /dev/null || { cat "$WORK/serve.log" >&2; exit 1; }

case "$MODE" in
  api)
    [ -x .venv-api/bin/schemathesis ] ||
      { python3 -m venv .venv-api && .venv-api/bin/pip install --quiet schemathesis; }
    .venv-api/bin/schemathesis run crates/softprompt-server/openapi.json --url "$URL" \
      --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
      --max-examples "${API_EXAMPLES:-200}" --workers 2 ;;
  soak)
    python3 scripts/hostile_soak.py --pid "$server_pid" --url "$URL" --classify sentiment \
      --generate writer --data "$DATA/test.tsv" --duration "${SOAK_SECONDS:-600}"
    server_pid= ;;
esac
