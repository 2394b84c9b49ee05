#!/usr/bin/env bash
# Inference side by side on real code: sembed vs sentence-transformers vs ONNX Runtime, same texts,
# same run. all-MiniLM-L6-v2, f32, max length 256, batch 32, chunks of this repository's Rust sources
# and of the Python standard library.
#   bench/inference.sh PYTHON   (a Python with tools/reference/requirements.txt + onnxruntime)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv-ref/bin/python}
cargo build --release -p sembed-cli
work=$(mktemp -d)
stdlib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
python3 - "$work" "$stdlib" <<'PYEOF'
import json, pathlib, sys
work, stdlib = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
files = sorted(pathlib.Path("crates").rglob("*.rs")) + sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))
texts = []
for f in files:
    lines = f.read_text(errors="replace").splitlines()
    for i in range(0, len(lines), 12):
        chunk = "\n".join(lines[i : i + 4 + (i // 12 * 5) % 9]).strip()
        if chunk:
            texts.append(chunk)
texts = texts[:320]
json.dump(texts, open(work / "texts.json", "w"))
with open(work / "texts.jsonl", "w") as out:
    for t in texts:
        out.write(json.dumps({"text": t}) + "\n")
print(f"{len(texts)} code texts", file=sys.stderr)
PYEOF
model="${SEMBED_CACHE_DIR:-$HOME/.cache/sembed}/models/all-MiniLM-L6-v2"
target/release/sembed embed x > /dev/null
start=$(date +%s.%N)
target/release/sembed embed -m "$model" -i "$work/texts.jsonl" -o "$work/sembed.jsonl" --max-length 256 --batch-size 32
end=$(date +%s.%N)
peers=$("$PY" bench/peer_inference.py "$model" "$work/texts.json" "$work/sembed.jsonl" 256 32)
python3 - "$start" "$end" "$peers" "$work/texts.json" <<'PYEOF'
import json, sys
start, end, peers, texts = float(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3]), json.load(open(sys.argv[4]))
ours = len(texts) / (end - start)
print(f"sembed (whole command, model load included): {ours:.1f} texts/s")
for name, p in peers.items():
    if "texts_per_s" in p:
        print(f"{name}: {p['texts_per_s']:.1f} texts/s → sembed ratio {ours / p['texts_per_s']:.2f}×, max |diff| {p['max_abs_diff_vs_sembed']:.2e}")
    else:
        print(f"{name}: {p}")
PYEOF
