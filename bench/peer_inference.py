"""The peers of `sembed bench` on the same texts: sentence-transformers (PyTorch, CPU, f32), a plain
PyTorch loop, ONNX Runtime on the model exported with torch.onnx (f32) and with its dynamic int8
quantisation (quantize_dynamic, the int8 a user would reach for), OpenVINO (f32, same ONNX file) and
CTranslate2 (f32 and int8, converted from the Hugging Face folder). Prints one JSON object: texts/s of each (best of
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
    # PyTorch at its own best precision on this CPU: bf16 autocast (oneDNN's AMX / AVX-512 BF16
    # kernels where the CPU has them), what a PyTorch user reaches for.
    def torch_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch_all()

    torch_bf16()
    dt, vecs = best_of(repeat, torch_bf16)
    out["PyTorch bf16 autocast (plain loop, length-sorted batches)"] = {
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
    # Every runtime below gets the same length-sorted batches as the PyTorch loop (order from above)
    # and the same mean pooling; `infer(enc)` returns the last hidden state for one tokenised batch.
    def measure(name, infer, version):
        def run(chunk):
            enc = tok(chunk, padding=True, truncation=True, max_length=max_len, return_tensors="np")
            h = infer(enc)
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
            "version": version,
        }

    def feeds(enc):
        return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}

    for name, p in models.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = os.cpu_count()
        sess = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
        measure(name, lambda enc, sess=sess: sess.run(None, feeds(enc))[0], f"onnxruntime {ort.__version__}")

    # OpenVINO on the same ONNX file. Its CPU plugin runs bf16 by default where the CPU has AVX-512
    # BF16 or AMX; the hint keeps it at f32, the precision compared here.
    try:
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(
            path, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": os.cpu_count()}
        )
        req = compiled.create_infer_request()
        measure(
            "OpenVINO (f32)",
            lambda enc: req.infer(feeds(enc))[compiled.output(0)],
            f"openvino {ov.__version__.split('-')[0]}",
        )
    except Exception as e:  # not installed, or the model does not convert: say so, keep the others
        out["OpenVINO (f32)"] = {"skipped": repr(e)}
    # OpenVINO at its default precision: bf16 where the CPU has AVX-512 BF16 or AMX (the name says
    # which precision it chose).
    try:
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": os.cpu_count()})
        prec = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        req2 = compiled.create_infer_request()
        measure(
            f"OpenVINO (default precision: {prec})",
            lambda enc: req2.infer(feeds(enc))[compiled.output(0)],
            f"openvino {ov.__version__.split('-')[0]}",
        )
    except Exception as e:
        out["OpenVINO (default precision)"] = {"skipped": repr(e)}

    # CTranslate2: its converter reads the Hugging Face folder (BERT-family encoders); the Encoder
    # takes unpadded token ids per sequence and pads internally.
    try:
        import ctranslate2

        for ct2_name, quant in (("CTranslate2 (f32)", "float32"), ("CTranslate2 (int8)", "int8")):
            ct2_dir = os.path.join(work, f"ct2-{quant}")
            ctranslate2.converters.TransformersConverter(model_dir).convert(ct2_dir, quantization=quant)
            enc2 = ctranslate2.Encoder(ct2_dir, device="cpu", intra_threads=os.cpu_count(), compute_type=quant)

            def ct2_infer(enc, enc2=enc2):
                ids = [row[: int(n)].tolist() for row, n in zip(enc["input_ids"], enc["attention_mask"].sum(1))]
                return np.array(enc2.forward_batch(ids).last_hidden_state)

            measure(ct2_name, ct2_infer, f"ctranslate2 {ctranslate2.__version__}")
    except Exception as e:
        out["CTranslate2"] = {"skipped": repr(e)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
