"""Check that a LoRA adapter written by `sembed train --lora` loads with PEFT and gives the embeddings
sembed gives (mean pooling + normalisation, as the model's sentence-transformers config says).

    .venv-ref/bin/python tools/reference/peft_check.py ADAPTER_DIR [SEMBED_BINARY]
"""
import json
import subprocess
import sys

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

TEXTS = ["def add(a, b):\n    return a + b", "parse a JSON document", "fn main() {}"]


def main():
    adapter = sys.argv[1]
    binary = sys.argv[2] if len(sys.argv) > 2 else "target/release/sembed"
    cfg = json.load(open(f"{adapter}/adapter_config.json"))
    base = cfg["base_model_name_or_path"]
    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter).eval()
    max_len = json.load(open(f"{base}/sentence_bert_config.json"))["max_seq_length"]
    enc = tok(TEXTS, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (h * m).sum(1) / m.sum(1)
    ref = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    out = subprocess.run([binary, "embed", "-m", adapter, *TEXTS], check=True, capture_output=True, text=True).stdout
    ours = np.array([json.loads(l)["embedding"] for l in out.splitlines()])
    diff = float(np.abs(ref - ours).max())
    print(json.dumps({"adapter": adapter, "max_abs_diff": diff}))
    sys.exit(0 if diff <= 1e-5 else 1)


if __name__ == "__main__":
    main()
