#!/usr/bin/env bash
# Training memory and time, MiniLM, side by side in one run: 640 (docstring → function) pairs mined
# from the Python standard library, MNRL, batch 32, max length 128, one epoch, 2 threads; sembed plain,
# with GradCache (--cache-mini-batch), with checkpointed layers and with both; sentence-transformers'
# MNRL and CachedMNRL.
#   bench/train_memory.sh PYTHON   (a Python with bench/requirements.txt installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: bench/train_memory.sh PYTHON}
cargo build --release -q -p sembed-cli
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stdlib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
target/release/sembed mine "$stdlib" --out "$work/all.jsonl" 2>/dev/null
python3 -c "import random,sys; l=open(sys.argv[1]).readlines(); random.Random(0).shuffle(l); open(sys.argv[2],'w').writelines(l[:640])" "$work/all.jsonl" "$work/pairs.jsonl"
model=$(target/release/sembed embed x >/dev/null && echo "${SEMBED_CACHE_DIR:-$HOME/.cache/sembed}/models/all-MiniLM-L6-v2")
sembed_run() {
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o "$work/time" target/release/sembed train -m "$model" --data "$work/pairs.jsonl" \
    --epochs 1 --batch-size 32 --max-length 128 --loss mnrl --lr 2e-5 -o "$work/out" "$@" > /dev/null
  read -r secs kib < "$work/time"
  python3 -c "import json,sys; print(json.dumps({'engine': sys.argv[1], 'seconds': float(sys.argv[2]), 'peak_rss_gib': round(int(sys.argv[3]) / 2**20, 2)}))" "$label" "$secs" "$kib"
}
grep -m1 "model name" /proc/cpuinfo
RAYON_NUM_THREADS=2 sembed_run "sembed MNRL"
RAYON_NUM_THREADS=2 sembed_run "sembed MNRL --cache-mini-batch 8" --cache-mini-batch 8
RAYON_NUM_THREADS=2 sembed_run "sembed MNRL --checkpoint-activations" --checkpoint-activations
RAYON_NUM_THREADS=2 sembed_run "sembed MNRL --cache-mini-batch 8 --checkpoint-activations" --cache-mini-batch 8 --checkpoint-activations
"$PY" bench/train_epoch_st.py "$work/pairs.jsonl" "$model" 2 2>/dev/null
"$PY" bench/train_epoch_st.py "$work/pairs.jsonl" "$model" 2 8 2>/dev/null
