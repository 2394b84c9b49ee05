#!/usr/bin/env bash
# Does training with mined hard negatives beat training without, at the same number of steps?
#
#   bench/hard_negatives.sh [SEMBED] [STEPS] [HELD_OUT_TREE]
#
# Training pairs: `sembed mine` over part of the CPython standard library (email, json, http, urllib,
# logging, asyncio, concurrent, importlib, xml, unittest, multiprocessing; their tests left out), with
# one hard negative per pair from the base model (all-MiniLM-L6-v2). Two runs from the same base, same
# seed, same pairs, same number of optimiser steps (batch 16, lr 5e-5, max length 128, MNRL): without
# and with the negatives. Both are evaluated on pairs mined from another codebase (pip's sources by
# default), never seen in training. Prints one JSON line per model. (`--max-steps` stops training
# there and saves the model in out/checkpoints/interrupted, which is what is evaluated.)
set -euo pipefail
sembed=${1:-target/release/sembed}
steps=${2:-40}
stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
heldout_tree=${3:-$(python3 -c 'import pip, os; print(os.path.dirname(pip.__file__))')}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src"
python3 - "$stdlib" "$work/src" <<'EOF'
import shutil, sys
for pkg in "email json http urllib logging asyncio concurrent importlib xml unittest multiprocessing".split():
    shutil.copytree(f"{sys.argv[1]}/{pkg}", f"{sys.argv[2]}/{pkg}",
                    ignore=shutil.ignore_patterns("test", "tests", "__pycache__"))
EOF
"$sembed" mine "$work/src" --out "$work/with.jsonl" --hard-negatives 1 -q
python3 - "$work/with.jsonl" "$work/without.jsonl" <<'EOF'
import json, sys
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as g:
    for line in f:
        r = json.loads(line)
        r.pop("negatives", None)
        g.write(json.dumps(r) + "\n")
EOF
"$sembed" mine "$heldout_tree" --out "$work/heldout-all.jsonl" -q
head -n 400 "$work/heldout-all.jsonl" > "$work/heldout.jsonl"
echo "training pairs: $(wc -l < "$work/with.jsonl"), held-out pairs: $(wc -l < "$work/heldout.jsonl") from $heldout_tree" >&2
echo "{\"model\": \"base\", \"eval\": $("$sembed" eval --data "$work/heldout.jsonl" -q)}"
for kind in without with; do
  start=$(date +%s)
  "$sembed" train --data "$work/$kind.jsonl" --max-steps "$steps" --epochs 100 --batch-size 16 \
    --lr 5e-5 --max-length 128 --seed 7 -o "$work/out-$kind" > /dev/null
  secs=$(( $(date +%s) - start ))
  echo "{\"model\": \"$kind hard negatives\", \"steps\": $steps, \"train_seconds\": $secs, \"eval\": $("$sembed" eval -m "$work/out-$kind/checkpoints/interrupted" --data "$work/heldout.jsonl" -q)}"
done
