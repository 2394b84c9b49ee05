#!/usr/bin/env bash
# MiniLM training steps side by side in one run, sembed vs sentence-transformers/PyTorch: MNRL, batch
# 32 (docstring → function) pairs mined from the Python standard library, max length 128, dropout on,
# AdamW + clipping, every core; one warm-up step, then STEPS timed steps on the next batches.
#   bench/train_step.sh PYTHON [STEPS] [avx2]   (a Python with bench/requirements.txt installed)
# `avx2` times both on AVX2+FMA only, as on a CPU without AVX-512: sembed built without the gemm
# crate's AVX-512 kernels (`--no-default-features`), PyTorch with its own kernels, MKL and oneDNN
# capped at AVX2. SEMBED_TRAIN_KERNELS=candle times sembed's candle graph instead of the fast pass.
# Each side also runs in bf16 mixed precision, its best setting on CPUs with AMX or AVX-512 BF16:
# sembed `--precision bf16` (SEMBED_PRECISION=bf16), sentence-transformers under bf16 autocast.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: bench/train_step.sh PYTHON [STEPS] [avx2]}
STEPS=${2:-5}
ISA=${3:-native}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --release -q -p sembed-cli
if [ "$ISA" = avx2 ]; then
  cargo build --release -q -p sembed --example train_step --no-default-features
  export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
else
  cargo build --release -q -p sembed --example train_step
fi
cp target/release/examples/train_step "$work/train_step"
stdlib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
target/release/sembed mine "$stdlib" --out "$work/all.jsonl" 2>/dev/null
python3 -c "import random,sys; l=open(sys.argv[1]).readlines(); random.Random(0).shuffle(l); open(sys.argv[2],'w').writelines(l[:640])" "$work/all.jsonl" "$work/pairs.jsonl"
model=$(target/release/sembed embed x >/dev/null && echo "${SEMBED_CACHE_DIR:-$HOME/.cache/sembed}/models/all-MiniLM-L6-v2")
threads=$(nproc)
grep -m1 "model name" /proc/cpuinfo
echo "instruction sets: $ISA; CPU flags: $(grep -m1 -ow 'avx2\|fma\|avx512f\|avx512bw\|avx512_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
ours=$(SEMBED_STEP_ONLY=1 RAYON_NUM_THREADS=$threads "$work/train_step" "$work/pairs.jsonl" "$model" mnrl "$STEPS")
ours16=$(SEMBED_PRECISION=bf16 SEMBED_STEP_ONLY=1 RAYON_NUM_THREADS=$threads "$work/train_step" "$work/pairs.jsonl" "$model" mnrl "$STEPS")
peer=$("$PY" bench/train_step_st.py "$work/pairs.jsonl" "$model" "$threads" mnrl "$STEPS" f32 2>/dev/null)
peer16=$("$PY" bench/train_step_st.py "$work/pairs.jsonl" "$model" "$threads" mnrl "$STEPS" bf16 2>/dev/null)
printf '%s\n' "$ours" "$ours16" "$peer" "$peer16"
python3 - "$ours" "$ours16" "$peer" "$peer16" "$threads" "$ISA" <<'PYEOF'
import json, sys
ours, ours16, peer, peer16 = (json.loads(a)["seconds_per_step"] for a in sys.argv[1:5])
print(f"MiniLM training step, MNRL, batch 32, max length 128, {sys.argv[5]} threads, {sys.argv[6]}: "
      f"sembed f32 {ours:.3f}s, bf16 {ours16:.3f}s; sentence-transformers f32 {peer:.3f}s, bf16 autocast {peer16:.3f}s")
print(f"sembed f32 = {peer / ours:.2f}× sentence-transformers f32; sembed bf16 = {ours / ours16:.2f}× sembed f32, "
      f"{peer16 / ours16:.2f}× sentence-transformers bf16 autocast, {min(peer, peer16) / ours16:.2f}× its best")
PYEOF
