#!/usr/bin/env bash
# The benchmark, from a clean clone, in one command:
#   bench/run.sh [extra `sembed bench` flags]
# Builds sembed, installs the peers (sentence-transformers/PyTorch, ONNX Runtime) into .venv-bench
# (or uses SEMBED_BENCH_PYTHON), and runs `sembed bench` on real code: this repository's Rust sources
# and the Python standard library's json and email packages (≥ 300 texts), with f32-against-int8
# retrieval on (docstring → function) pairs mined from the whole standard library. Prints the ratio
# table; writes bench/results/{report.json,report.md,throughput.svg,scaling.svg}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SEMBED_BENCH_PYTHON:-}
if [ -z "$PY" ]; then
  [ -x .venv-bench/bin/python ] || python3 -m venv .venv-bench
  .venv-bench/bin/pip install -q -r bench/requirements.txt
  PY=.venv-bench/bin/python
fi
cargo build --release -p sembed-cli
stdlib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
exec target/release/sembed bench --peers "$PY" \
  --corpus crates --corpus "$stdlib/json" --corpus "$stdlib/email" \
  --eval-src "$stdlib" "$@"
