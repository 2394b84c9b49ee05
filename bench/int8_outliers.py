"""int8 against f32 with and without the outlier-feature decomposition (SEMBED_INT8_OUTLIERS=off|on), per
model and kernel set: the cosine between each text's int8 and f32 vectors (min, mean).

    python3 bench/int8_outliers.py --texts TEXTS.jsonl [--sembed target/release/sembed]
        [--kernels avx512,avx2] MODEL_DIR[=NAME] ... [--plant MODEL_DIR]

--plant DIR writes a copy of DIR (a Qwen2/Qwen3-shaped folder, e.g. from bench/peer_shapes.py make)
whose RMSNorm weights are 40× larger on 4 fixed channels, the "massive activation" channels that
trained decoder models grow (random weights have none), and measures it too. Standard library
only, but for --plant, which needs safetensors and numpy (bench/requirements.txt).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile


def embed(sembed, model, texts, env, extra):
    out = subprocess.run(
        [sembed, "embed", "-m", model, "-i", texts, "--max-length", "256"] + extra,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        sys.exit(f"sembed embed {model} {extra} failed: {out.stderr}")
    return [json.loads(line)["embedding"] for line in out.stdout.splitlines() if line.strip()]


def cosines(a, b):
    cos = []
    for x, y in zip(a, b):
        dot = sum(p * q for p, q in zip(x, y))
        nx = sum(p * p for p in x) ** 0.5
        ny = sum(q * q for q in y) ** 0.5
        cos.append(dot / (nx * ny))
    return min(cos), sum(cos) / len(cos)


def plant(src):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    dst = tempfile.mkdtemp(prefix="sembed-planted-")
    for name in os.listdir(src):
        if os.path.isfile(os.path.join(src, name)) and name != "model.safetensors":
            shutil.copy(os.path.join(src, name), dst)
    for name in os.listdir(src):
        if os.path.isdir(os.path.join(src, name)):
            shutil.copytree(os.path.join(src, name), os.path.join(dst, name))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    channels = [7, 100, 401, 1000]
    for name, t in tensors.items():
        if name.endswith("layernorm.weight"):
            t = t.copy()
            t[[c for c in channels if c < t.shape[0]]] *= 40.0
            tensors[name] = t
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", required=True)
    ap.add_argument("--sembed", default="target/release/sembed")
    ap.add_argument("--kernels", default="avx512,avx2")
    ap.add_argument("--plant", action="append", default=[])
    ap.add_argument("models", nargs="*")
    a = ap.parse_args()
    models = []
    for m in a.models:
        path, _, name = m.partition("=")
        models.append((path, name or os.path.basename(path.rstrip("/"))))
    for p in a.plant:
        models.append((plant(p), os.path.basename(p.rstrip("/")) + " + planted outlier channels"))
    cpu_flags = open("/proc/cpuinfo").read()
    print("| model | kernels | cosine int8 vs f32, outliers off (min / mean) | on (min / mean) |")
    print("|---|---|---:|---:|")
    rows = []
    for path, name in models:
        ref = embed(a.sembed, path, a.texts, {}, [])
        for k in a.kernels.split(","):
            if k == "avx512" and " avx512_vnni" not in cpu_flags:
                continue
            env = {"SEMBED_CPU_KERNELS": k}
            off = cosines(embed(a.sembed, path, a.texts, {**env, "SEMBED_INT8_OUTLIERS": "off"}, ["--quantize", "int8"]), ref)
            on = cosines(embed(a.sembed, path, a.texts, {**env, "SEMBED_INT8_OUTLIERS": "on"}, ["--quantize", "int8"]), ref)
            print(f"| {name} | {k} | {off[0]:.4f} / {off[1]:.4f} | {on[0]:.4f} / {on[1]:.4f} |")
            rows.append({"model": name, "kernels": k, "off": off, "on": on})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
