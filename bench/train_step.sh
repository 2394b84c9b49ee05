#!/usr/bin/env bash
# One MiniLM training step (16 triplets, max length 128): sembed vs sentence-transformers, same run.
#   bench/train_step.sh PYTHON   (a Python with tools/reference/requirements.txt installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv-ref/bin/python}
cargo build --release -p sembed --example train_step -p sembed-cli
work=$(mktemp -d)
# Triplets from real code: Python standard library docstring → function pairs, a negative from
# another pair.
stdlib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
target/release/sembed mine "$stdlib/email" --out "$work/pairs.jsonl" 2>/dev/null
python3 - "$work/pairs.jsonl" > "$work/triplets.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for i, r in enumerate(rows):
    print(json.dumps({"anchor": r["anchor"], "positive": r["positive"], "negative": rows[(i + 7) % len(rows)]["positive"]}))
PYEOF
model=$(target/release/sembed embed x >/dev/null && echo "${SEMBED_CACHE_DIR:-$HOME/.cache/sembed}/models/all-MiniLM-L6-v2")
ours=$(target/release/examples/train_step "$work/triplets.jsonl" "$model")
peer=$("$PY" bench/train_step_st.py "$work/triplets.jsonl" "$model" "$(nproc)")
echo "$ours"
echo "$peer"
python3 - "$ours" "$peer" <<'PYEOF'
import json, sys
ours = json.loads(sys.argv[1].splitlines()[0]); peer = json.loads(sys.argv[2])
print(f"MiniLM training step, {ours['triplets']} triplets, max length 128: sembed {ours['seconds_per_step']:.3f}s, "
      f"sentence-transformers {peer['seconds_per_step']:.3f}s → sembed speed = {peer['seconds_per_step'] / ours['seconds_per_step']:.2f}× PyTorch")
PYEOF
