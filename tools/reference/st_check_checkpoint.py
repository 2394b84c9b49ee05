"""Check that a checkpoint written by `sembed train` loads in sentence-transformers and gives the
embeddings sembed gives.

    .venv-ref/bin/python tools/reference/st_check_checkpoint.py CHECKPOINT_DIR [SEMBED_BINARY]

Prints the worst cosine between the two over a few code and text inputs and exits non-zero below
0.99999.
"""
import json
import subprocess
import sys

import numpy as np
from sentence_transformers import SentenceTransformer

TEXTS = [
    "def add(a, b):\n    return a + b",
    "Return the area of a rectangle.",
    "fn main() { println!(\"hi\"); }",
    "parse a JSON document from a string",
    "for line in open(path):\n    handle(line)",
]


def main():
    ckpt = sys.argv[1]
    binary = sys.argv[2] if len(sys.argv) > 2 else "target/release/sembed"
    st = SentenceTransformer(ckpt, device="cpu").encode(TEXTS, normalize_embeddings=True)
    out = subprocess.run([binary, "embed", "-m", ckpt, *TEXTS], check=True, capture_output=True, text=True).stdout
    ours = np.array([json.loads(l)["embedding"] for l in out.splitlines()])
    cos = (st * ours).sum(1) / (np.linalg.norm(st, axis=1) * np.linalg.norm(ours, axis=1))
    print(json.dumps({"checkpoint": ckpt, "texts": len(TEXTS), "worst_cosine": float(cos.min()), "max_abs_diff": float(np.abs(st - ours).max())}))
    sys.exit(0 if cos.min() >= 0.99999 else 1)


if __name__ == "__main__":
    main()
