#!/usr/bin/env bash
# Fine-tuning on one codebase, evaluated on another: mine (documentation → code) pairs from TRAIN_SRC,
# train MiniLM on up to N of them (MNRL, batch 32, lr 5e-5, max length 128, one epoch, GradCache 8),
# and report retrieval on up to 300 pairs mined from EVAL_SRC before and after. Any language
# `sembed mine` reads. Arguments after N go to `sembed train` (e.g. --lora); LR=… sets the learning rate;
# KEEP=DIR keeps the pairs and the trained model (DIR/out: metrics.json, checkpoints/epoch-0 with the
# loss of every step in trainer_state.json) instead of a temporary folder.
#   bench/finetune_lang.sh TRAIN_SRC EVAL_SRC [N [TRAIN_ARGS…]]
set -euo pipefail
cd "$(dirname "$0")/.."
train_src=${1:?usage: bench/finetune_lang.sh TRAIN_SRC EVAL_SRC [N]}
eval_src=${2:?usage}
n=${3:-1000}
shift $(( $# < 3 ? $# : 3 ))
cargo build --release -q -p sembed-cli
bin=$PWD/target/release/sembed
if [ -n "${KEEP:-}" ]; then
  work=$KEEP
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
$bin mine -q "$train_src" --out "$work/train-all.jsonl" --heldout-fraction 0
$bin mine -q "$eval_src" --out "$work/eval-all.jsonl" --heldout-fraction 0
sample() { python3 -c "import random,sys; l=open(sys.argv[1]).readlines(); random.Random(0).shuffle(l); open(sys.argv[2],'w').writelines(l[:int(sys.argv[3])])" "$@"; }
sample "$work/train-all.jsonl" "$work/train.jsonl" "$n"
sample "$work/eval-all.jsonl" "$work/eval.jsonl" 300
echo "pairs: $(wc -l < "$work/train-all.jsonl") mined for training (using $(wc -l < "$work/train.jsonl")), $(wc -l < "$work/eval-all.jsonl") for evaluation (using $(wc -l < "$work/eval.jsonl"))"
start=$(date +%s)
$bin train --data "$work/train.jsonl" --eval "$work/eval.jsonl" --epochs 1 --batch-size 32 --lr "${LR:-5e-5}" \
  --max-length 128 --loss mnrl --cache-mini-batch 8 -o "$work/out" "$@" > /dev/null
echo "trained in $(( $(date +%s) - start )) s"
python3 - "$work/out/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
b, a = m["before"], m["epochs"][-1]["metrics"]
for k in ["ndcg_at_10", "mrr_at_10", "recall_at_1", "recall_at_10"]:
    print(f"{k}: {b[k]:.4f} -> {a[k]:.4f}")
PY
