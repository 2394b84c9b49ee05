#!/usr/bin/env bash
# bf16 mixed precision against f32 on one fine-tuning task: bench/finetune_lang.sh's run (mine TRAIN_SRC,
# train MiniLM on N pairs, score held-out pairs mined from EVAL_SRC) four times, full fine-tuning
# and LoRA (rank 8 on query, key, value and the dense projections, lr 5e-4), each in f32 and with
# `--precision bf16`; then the table of held-out retrieval, times, and OUT/loss.svg, the loss of every
# step side by side (bench/loss_curves.py).
#   bench/mixed_precision.sh TRAIN_SRC EVAL_SRC OUT [N]
set -euo pipefail
cd "$(dirname "$0")/.."
train_src=${1:?usage: bench/mixed_precision.sh TRAIN_SRC EVAL_SRC OUT [N]}
eval_src=${2:?usage}
out=${3:?usage}
n=${4:-1000}
mkdir -p "$out"
grep -o 'model name.*' /proc/cpuinfo | head -1 | tee "$out/cpu.txt"
echo "flags: $(grep -o 'avx512[a-z_0-9]*\|amx[a-z_0-9]*\|avx2\|fma' /proc/cpuinfo | sort -u | tr '\n' ' ')" | tee -a "$out/cpu.txt"
for mode in full lora; do
  for precision in f32 bf16; do
    echo "== $mode $precision"
    if [ "$mode" = lora ]; then
      KEEP="$out/$mode-$precision" LR=5e-4 bench/finetune_lang.sh "$train_src" "$eval_src" "$n" \
        --precision "$precision" --lora --lora-targets query,key,value,dense
    else
      KEEP="$out/$mode-$precision" bench/finetune_lang.sh "$train_src" "$eval_src" "$n" --precision "$precision"
    fi | tee "$out/$mode-$precision.log"
  done
done
python3 bench/loss_curves.py "$out"
