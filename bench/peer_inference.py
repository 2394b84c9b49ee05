"""Peers of `sembed embed` on the same texts: sentence-transformers (PyTorch, CPU) and ONNX Runtime
(the model exported with torch.onnx). Prints texts/s for each and the max |difference| between each
peer's vectors and sembed's (read from SEMBED_JSONL).

    python bench/peer_inference.py MODEL_DIR TEXTS.json SEMBED_JSONL [MAX_LEN] [BATCH]
"""
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from sentence_transformers import SentenceTransformer


def main():
    model_dir, texts_path, ours_path = sys.argv[1], sys.argv[2], sys.argv[3]
    max_len = int(sys.argv[4]) if len(sys.argv) > 4 else 256
    batch = int(sys.argv[5]) if len(sys.argv) > 5 else 32
    texts = json.load(open(texts_path))
    ours = np.array([json.loads(l)["embedding"] for l in open(ours_path)], dtype=np.float32)
    torch.set_num_threads(os.cpu_count())
    st = SentenceTransformer(model_dir, device="cpu")
    st.max_seq_length = max_len
    st.encode(texts[:batch], batch_size=batch)
    t = time.perf_counter()
    ref = st.encode(texts, batch_size=batch, normalize_embeddings=True)
    st_tps = len(texts) / (time.perf_counter() - t)
    out = {"sentence_transformers": {"texts_per_s": st_tps, "max_abs_diff_vs_sembed": float(np.abs(ref - ours).max())}}
    try:
        import onnxruntime as ort

        tok = st.tokenizer
        hf = st[0].auto_model.eval()
        path = os.path.join(tempfile.mkdtemp(), "model.onnx")
        dummy = tok(["a b c"], return_tensors="pt")
        torch.onnx.export(
            hf,
            (dummy["input_ids"], dummy["attention_mask"]),
            path,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, "last_hidden_state": {0: "b", 1: "s"}},
            opset_version=17,
        )
        so = ort.SessionOptions()
        so.intra_op_num_threads = os.cpu_count()
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

        def run(chunk):
            enc = tok(chunk, padding=True, truncation=True, max_length=max_len, return_tensors="np")
            h = sess.run(None, {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
            m = enc["attention_mask"][..., None].astype(np.float32)
            v = (h * m).sum(1) / m.sum(1)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

        # Same length-sorted batching as sentence-transformers.
        order = np.argsort([-len(x) for x in texts])
        run([texts[i] for i in order[:batch]])
        t = time.perf_counter()
        vecs = np.zeros_like(ref)
        for k in range(0, len(texts), batch):
            idx = order[k : k + batch]
            vecs[idx] = run([texts[i] for i in idx])
        ort_tps = len(texts) / (time.perf_counter() - t)
        out["onnxruntime"] = {"texts_per_s": ort_tps, "max_abs_diff_vs_sembed": float(np.abs(vecs - ours).max()), "version": ort.__version__}
    except ImportError as e:
        out["onnxruntime"] = {"skipped": str(e)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
