"""The peers of `sembed bench` on the same texts: sentence-transformers (PyTorch, CPU, f32), ONNX Runtime
on the model exported with torch.onnx (f32), and ONNX Runtime with its dynamic int8 quantisation
(quantize_dynamic, the int8 a user would reach for). Prints one JSON object: texts/s of each (best of
REPEAT runs over all texts, after a warm-up batch) and the max |difference| between its vectors and
sembed's f32 vectors (read from SEMBED_VECTORS, a JSON list of lists).

    python bench/peer_inference.py MODEL_DIR TEXTS.json SEMBED_VECTORS.json [MAX_LEN] [BATCH] [REPEAT]

`sembed bench --peers PYTHON` runs this; it needs bench/requirements.txt.
"""
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from sentence_transformers import SentenceTransformer


def best_of(repeat, fn):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    model_dir, texts_path, ours_path = sys.argv[1], sys.argv[2], sys.argv[3]
    max_len = int(sys.argv[4]) if len(sys.argv) > 4 else 256
    batch = int(sys.argv[5]) if len(sys.argv) > 5 else 32
    repeat = int(sys.argv[6]) if len(sys.argv) > 6 else 3
    texts = json.load(open(texts_path))
    ours = np.array(json.load(open(ours_path)), dtype=np.float32)
    torch.set_num_threads(os.cpu_count())
    st = SentenceTransformer(model_dir, device="cpu")
    st.max_seq_length = max_len
    st.encode(texts[:batch], batch_size=batch)
    dt, ref = best_of(repeat, lambda: st.encode(texts, batch_size=batch, normalize_embeddings=True))
    out = {
        "sentence-transformers (PyTorch f32)": {
            "texts_per_s": len(texts) / dt,
            "max_abs_diff_vs_sembed": float(np.abs(ref - ours).max()),
            "version": f"torch {torch.__version__}",
        }
    }
    # A plain PyTorch loop over length-sorted batches (no sentence-transformers overhead): the fastest
    # way a PyTorch user would run the same model.
    tok = st.tokenizer
    hf = st[0].auto_model.eval()
    order = np.argsort([-len(x) for x in texts])

    def torch_all():
        vecs = np.zeros_like(ours)
        with torch.inference_mode():
            for k in range(0, len(texts), batch):
                idx = order[k : k + batch]
                enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
                h = hf(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                v = (h * m).sum(1) / m.sum(1)
                vecs[idx] = torch.nn.functional.normalize(v, dim=-1).numpy()
        return vecs

    torch_all()
    dt, vecs = best_of(repeat, torch_all)
    out["PyTorch f32 (plain loop, length-sorted batches)"] = {
        "texts_per_s": len(texts) / dt,
        "max_abs_diff_vs_sembed": float(np.abs(vecs - ours).max()),
        "version": f"torch {torch.__version__}",
    }
    try:
        import onnxruntime as ort
    except ImportError as e:
        out["onnxruntime"] = {"skipped": str(e)}
        print(json.dumps(out))
        return

    work = tempfile.mkdtemp()
    path = os.path.join(work, "model.onnx")
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
    models = {"onnxruntime (f32)": path}
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        qpath = os.path.join(work, "model-int8.onnx")
        quantize_dynamic(path, qpath, weight_type=QuantType.QInt8)
        models["onnxruntime (dynamic int8)"] = qpath
    except Exception as e:  # quantisation tooling missing: report it, keep the f32 peer
        out["onnxruntime (dynamic int8)"] = {"skipped": repr(e)}
    # Same length-sorted batching as sentence-transformers (order from above).
    for name, p in models.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = os.cpu_count()
        sess = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])

        def run(chunk):
            enc = tok(chunk, padding=True, truncation=True, max_length=max_len, return_tensors="np")
            h = sess.run(None, {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
            m = enc["attention_mask"][..., None].astype(np.float32)
            v = (h * m).sum(1) / m.sum(1)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

        def all_texts():
            vecs = np.zeros_like(ref)
            for k in range(0, len(texts), batch):
                idx = order[k : k + batch]
                vecs[idx] = run([texts[i] for i in idx])
            return vecs

        run([texts[i] for i in order[:batch]])
        dt, vecs = best_of(repeat, all_texts)
        out[name] = {
            "texts_per_s": len(texts) / dt,
            "max_abs_diff_vs_sembed": float(np.abs(vecs - ours).max()),
            "version": f"onnxruntime {ort.__version__}",
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
