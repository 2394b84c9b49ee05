#!/usr/bin/env bash
# sentence-transformers' backend="onnx" on graphs written by `sembed export`, against sembed's own
# vectors: every tiny golden architecture (Jina with a merged task), and the real all-MiniLM-L6-v2 in
# f32 and int8. Prints one JSON line per model with the largest absolute difference.
#
#   python3 -m venv .venv-stonnx && .venv-stonnx/bin/pip install -r tools/onnx/st-requirements.txt
#   tools/onnx/st_check.sh .venv-stonnx/bin/python
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${1:?usage: tools/onnx/st_check.sh PYTHON}
cargo build --release -q -p sembed-cli
bin=target/release/sembed
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for m in bert-tiny qwen2-bidir-tiny qwen3-causal-tiny; do
  $bin export tests/fixtures/$m --onnx "$out/$m" > /dev/null 2>&1
  "$py" tools/onnx/st_onnx_check.py $bin tests/fixtures/$m "$out/$m" 2>/dev/null
done
$bin export tests/fixtures/jina-v3-tiny --task retrieval.query --onnx "$out/jina" > /dev/null 2>&1
"$py" tools/onnx/st_onnx_check.py $bin tests/fixtures/jina-v3-tiny "$out/jina" --task retrieval.query 2>/dev/null
minilm=$($bin export --onnx "$out/minilm" 2>&1 >/dev/null | sed -n 's/^exported \(.*\) (bert.*/\1/p')
"$py" tools/onnx/st_onnx_check.py $bin "$minilm" "$out/minilm" 2>/dev/null
$bin export --quantize int8 --onnx "$out/minilm-int8" > /dev/null 2>&1
"$py" tools/onnx/st_onnx_check.py $bin "$minilm" "$out/minilm-int8" 2>/dev/null
