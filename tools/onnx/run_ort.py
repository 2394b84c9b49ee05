"""Run an ONNX model exported by `sembed export` in ONNX Runtime (CPU) on token ids.

    python run_ort.py MODEL.onnx IN.json OUT.json

IN.json: {"rows": [[ids...], ...], "padding": "right"|"left", "pad_id": N, "task_id": N|null}.
The rows are padded into one batch, as a tokenizer would pad them. OUT.json: {"sentence_embedding":
[[...]...], "token_embeddings": [[[...] per real token] per row], "inputs": [...], "outputs": [...]}.
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def main():
    model, inp, out = sys.argv[1:4]
    spec = json.load(open(inp))
    rows = spec["rows"]
    left = spec.get("padding", "right") == "left"
    pad = spec.get("pad_id", 0)
    s = max(len(r) for r in rows)
    ids = np.full((len(rows), s), pad, dtype=np.int64)
    mask = np.zeros((len(rows), s), dtype=np.int64)
    for i, r in enumerate(rows):
        if left:
            ids[i, s - len(r):] = r
            mask[i, s - len(r):] = 1
        else:
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask}
    names = [i.name for i in sess.get_inputs()]
    if "task_id" in names:
        feeds["task_id"] = np.array(spec["task_id"], dtype=np.int64)
    hidden, pooled = sess.run(["last_hidden_state", "sentence_embedding"], feeds)
    tokens = []
    for i, r in enumerate(rows):
        real = hidden[i][mask[i] == 1]
        tokens.append(real.tolist())
    json.dump(
        {
            "sentence_embedding": pooled.tolist(),
            "token_embeddings": tokens,
            "inputs": names,
            "outputs": [o.name for o in sess.get_outputs()],
        },
        open(out, "w"),
    )


if __name__ == "__main__":
    main()
