"""sentence-transformers' ONNX backend on graphs written by `sembed export`, against sembed's vectors.

    python tools/onnx/st_onnx_check.py SEMBED_BIN MODEL EXPORT_DIR [--task T]

Runs `SentenceTransformer(EXPORT_DIR, backend="onnx")` (Optimum + ONNX Runtime) on a few texts of
different lengths in one padded batch, and `SEMBED_BIN embed -m MODEL` on the same texts, and prints
the largest absolute difference. Needs sentence-transformers with the ONNX extra
(`pip install "sentence-transformers[onnx]"`, i.e. optimum-onnx + onnxruntime) and torch; see
tools/onnx/README.md.
"""
import argparse
import json
import subprocess

import numpy as np
from sentence_transformers import SentenceTransformer

TEXTS = [
    "fn main() { println!(\"hello\"); }",
    "how do I sort a list of numbers in place without allocating a second list?",
    "x",
    "def parse(path):\n    with open(path) as f:\n        return json.load(f)",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sembed")
    ap.add_argument("model")
    ap.add_argument("export_dir")
    ap.add_argument("--task")
    a = ap.parse_args()
    st = SentenceTransformer(a.export_dir, backend="onnx", model_kwargs={"file_name": "onnx/model.onnx"})
    got = st.encode(TEXTS, batch_size=len(TEXTS))
    cmd = [a.sembed, "embed", "-m", a.model] + (["--task", a.task] if a.task else []) + TEXTS
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    want = np.array([json.loads(l)["embedding"] for l in out.splitlines() if l.strip()])
    diff = float(np.abs(got - want).max())
    print(json.dumps({"model": a.model, "task": a.task, "texts": len(TEXTS), "max_abs_diff": diff}))


if __name__ == "__main__":
    main()
