#!/usr/bin/env bash
# Fuzz a live `sembed serve` from its own OpenAPI document with schemathesis: loopback only, bounded
# in examples per operation and in time. Fails on any 5xx, on a response that does not match the
# document, on a request that hangs past --request-timeout, and if the server died.
#   tools/fuzz/run.sh PYTHON_VENV_BIN [SEMBED_BINARY] [MODEL]
set -euo pipefail
bin=${1:?the bin folder of a venv with tools/fuzz/requirements.txt}
sembed=${2:-target/release/sembed}
model=${3:-tests/fixtures/bert-tiny}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
# A code index of the fixtures, so POST /search is fuzzed too.
index_dir=$(mktemp -d)
"$sembed" index tests/fixtures/code -m "$model" --db "$index_dir/index.sqlite" -q
"$sembed" serve -m "$model" --index "$index_dir/index.sqlite" --host 127.0.0.1 --port "$port" \
  --auto-truncate > "$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$index_dir"' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
  sleep 0.2
done
timeout 600 "$bin/schemathesis" run "http://127.0.0.1:$port/openapi.json" \
  --checks not_a_server_error,response_schema_conformance \
  --max-examples 100 --request-timeout 30 --seed 1
if ! kill -0 "$pid" 2>/dev/null; then
  echo "sembed serve died during the fuzz run:"; cat "$log"; exit 1
fi
echo "fuzz: server alive after the run"
