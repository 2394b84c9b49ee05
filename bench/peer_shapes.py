"""PyTorch peer of sembed at the real widths of Qwen3-Embedding-0.6B, Qodo-Embed-1-1.5B (Qwen2,
bidirectional) and jina-embeddings-v3, with random weights and few layers.

    python bench/peer_shapes.py make --config REAL_CONFIG_JSON --fixture TINY_DIR --layers N --seed S --out OUT_DIR
    python bench/peer_shapes.py run --model OUT_DIR --arch qwen2|qwen3|jina --texts TEXTS.json
        [--max-len 256] [--batch 32] [--repeat 3] [--threads 2] [--dtype f32|bf16] [--autocast | --openvino]
        [--ours OURS.json] [--task T]
    python bench/peer_shapes.py gemm --shapes K,N [K,N ...] [--m 1024] [--threads 2]
    python bench/peer_shapes.py selftest

`make` writes a model folder: the real config.json (from ../shared/real-configs) with
num_hidden_layers = N and the tiny fixture's vocabulary (the texts are tokenised with the fixture's
tokenizer), a float32 model.safetensors of seeded random weights under the upstream tensor names, and
the fixture's tokenizer and sentence-transformers files (truncation length raised to 512).

`run` embeds the texts the way the upstream stack does (Qwen2/Qwen3: transformers' Qwen2Model /
Qwen3Model with sdpa attention, last-token pooling; Jina: bench/jina_torch.py, mean pooling; then L2
normalisation) and prints one JSON object with the throughput (best of REPEAT full passes, tokenisation
included, after a warm-up batch), and with --ours the max |difference| to sembed's vectors. With
--openvino the same PyTorch module (embedding, pooling and normalisation) is converted by
`openvino.convert_model` (dynamic batch and length) and compiled for the CPU at OpenVINO's default
precision (bf16 where the CPU has AVX-512 BF16 or AMX; the output names the precision it chose).

`gemm` times PyTorch's bf16 and f32 matrix products (`torch.matmul`, oneDNN on x86: its AMX or
AVX-512 BF16 kernels in bf16) at m × k × n for each K,N: the practical ceiling of a bf16 GEMM on
this CPU, for the bench's fraction-of-ceiling column.

`selftest` proves that this peer computes the upstream function: on the golden fixtures of
tests/fixtures it checks tensor names and shapes, token ids, and the embeddings of every case and
padded batch of tests/fixtures/cases (within 2e-5), and that Qwen2 with `is_causal: false` runs
bidirectional attention.

Needs bench/requirements.txt.
"""

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import Qwen2Model, Qwen3Model
from transformers.utils import logging as hf_logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jina_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
SERVING_MAX_LEN = 512


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# Checkpoint layout: tensor names and shapes as the upstream checkpoints store them.


def is_jina(config):
    return "lora_adaptations" in config


def qwen_spec(c):
    """Qwen2Model / Qwen3Model checkpoint (no `model.` prefix). Qwen2 always has q/k/v biases;
    Qwen3 has them only with attention_bias, and adds per-head RMSNorm on q and k."""
    h, inter = c["hidden_size"], c["intermediate_size"]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // heads
    bias = c["model_type"] == "qwen2" or c.get("attention_bias", False)
    spec = [("embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        pre = f"layers.{i}."
        spec.append((pre + "input_layernorm.weight", (h,)))
        for proj, out in [("q_proj", heads * hd), ("k_proj", kv_heads * hd), ("v_proj", kv_heads * hd)]:
            spec.append((pre + f"self_attn.{proj}.weight", (out, h)))
            if bias:
                spec.append((pre + f"self_attn.{proj}.bias", (out,)))
        spec.append((pre + "self_attn.o_proj.weight", (h, heads * hd)))
        if c["model_type"] == "qwen3":
            spec += [(pre + "self_attn.q_norm.weight", (hd,)), (pre + "self_attn.k_norm.weight", (hd,))]
        spec.append((pre + "post_attention_layernorm.weight", (h,)))
        spec += [
            (pre + "mlp.gate_proj.weight", (inter, h)),
            (pre + "mlp.up_proj.weight", (inter, h)),
            (pre + "mlp.down_proj.weight", (h, inter)),
        ]
    spec.append(("norm.weight", (h,)))
    return spec


def jina_spec(c):
    """XLMRobertaLoRA checkpoint: `roberta.` prefix, LoRA parametrisations on every Linear and
    Embedding (base weight `.original`, adapters stacked on dim 0 in `.0.lora_A` / `.0.lora_B`)."""
    h, inter, tasks, r = c["hidden_size"], c["intermediate_size"], len(c["lora_adaptations"]), c["lora_rank"]
    spec = []

    def embedding(name, rows):
        p = f"roberta.embeddings.{name}.parametrizations.weight."
        spec.extend([(p + "original", (rows, h)), (p + "0.lora_A", (tasks, rows, r)), (p + "0.lora_B", (tasks, r, h))])

    def linear(name, out, inp):
        p = f"roberta.{name}.parametrizations.weight."
        spec.extend([(p + "original", (out, inp)), (p + "0.lora_A", (tasks, r, inp)), (p + "0.lora_B", (tasks, out, r))])
        spec.append((f"roberta.{name}.bias", (out,)))

    def layer_norm(name):
        spec.extend([(f"roberta.{name}.weight", (h,)), (f"roberta.{name}.bias", (h,))])

    embedding("word_embeddings", c["vocab_size"])
    embedding("token_type_embeddings", c["type_vocab_size"])
    layer_norm("emb_ln")
    for i in range(c["num_hidden_layers"]):
        pre = f"encoder.layers.{i}."
        linear(pre + "mixer.Wqkv", 3 * h, h)
        linear(pre + "mixer.out_proj", h, h)
        layer_norm(pre + "norm1")
        linear(pre + "mlp.fc1", inter, h)
        linear(pre + "mlp.fc2", h, inter)
        layer_norm(pre + "norm2")
    linear("pooler.dense", h, h)
    return spec


def tensor_spec(config):
    return jina_spec(config) if is_jina(config) else qwen_spec(config)


def random_tensor(name, shape, gen):
    """Seeded values that keep activations O(1) at any width: LoRA N(0, 0.05²), norm weights
    1 + N(0, 0.1²), biases N(0, 0.02²), embedding tables N(0, 0.5²), other weights N(0, 1/fan_in)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if "lora_A" in name or "lora_B" in name:
        return x * 0.05
    if len(shape) == 1:
        return 1.0 + 0.1 * x if name.endswith("weight") else 0.02 * x
    if "embed" in name:
        return 0.5 * x
    return x / math.sqrt(shape[1])


def checkpoint_shapes(folder):
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# ----------------------------------------------------------------------------------------------
# make


def make(args):
    real, tiny = read_json(args.config), read_json(os.path.join(args.fixture, "config.json"))
    if is_jina(real) != is_jina(tiny) or real.get("model_type") != tiny.get("model_type"):
        sys.exit(f"{args.config} and {args.fixture} are not the same architecture")
    config = dict(real, num_hidden_layers=args.layers, vocab_size=tiny["vocab_size"], torch_dtype="float32")
    # Special token ids must index the tiny vocabulary.
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in config:
            config[key] = tiny[key]
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "config.json"), config)

    gen = torch.Generator().manual_seed(args.seed)
    tensors = {name: random_tensor(name, shape, gen) for name, shape in tensor_spec(config)}
    save_file(tensors, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})

    for dirpath, _, files in os.walk(args.fixture):
        rel = os.path.relpath(dirpath, args.fixture)
        for name in files:
            path = os.path.normpath(os.path.join(rel, name))
            if path in ("config.json", "model.safetensors"):
                continue
            os.makedirs(os.path.join(args.out, rel), exist_ok=True)
            shutil.copyfile(os.path.join(dirpath, name), os.path.join(args.out, path))

    def patch(path, key, value):
        full = os.path.join(args.out, path)
        if os.path.exists(full):
            write_json(full, dict(read_json(full), **{key: value}))

    # The declared truncation length: sentence-transformers' for Qwen, the tokenizer's for Jina.
    patch("sentence_bert_config.json", "max_seq_length", SERVING_MAX_LEN)
    if is_jina(config):
        patch("tokenizer_config.json", "model_max_length", SERVING_MAX_LEN)
    patch(os.path.join("1_Pooling", "config.json"), "word_embedding_dimension", config["hidden_size"])
    params = sum(t.numel() for t in tensors.values())
    print(json.dumps({"out": args.out, "tensors": len(tensors), "parameters": params}))


# ----------------------------------------------------------------------------------------------
# Tokenising, loading, embedding


class TextTokenizer:
    """The folder's tokenizer.json through `tokenizers`: truncation to max_len (special tokens
    included, added after the cut), padding by hand on the side tokenizer_config.json names."""

    def __init__(self, folder, max_len):
        self.tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(max_len)
        cfg = read_json(os.path.join(folder, "tokenizer_config.json"))
        self.pad_id = self.tok.token_to_id(cfg["pad_token"])
        self.left = cfg.get("padding_side", "right") == "left"

    def ids(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts)]

    def pad(self, rows):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            cols = slice(width - len(r), width) if self.left else slice(0, len(r))
            ids[i, cols], mask[i, cols] = torch.tensor(r), 1
        return ids, mask


def load_qwen(folder, arch, dtype, **config_overrides):
    """transformers' Qwen2Model / Qwen3Model with sdpa attention (named directly: Qodo's config has an
    `auto_map` to remote code that is not shipped); fails if any checkpoint tensor is missing or left
    unused."""
    hf_logging.disable_progress_bar()
    cls = {"qwen2": Qwen2Model, "qwen3": Qwen3Model}[arch]
    model, info = cls.from_pretrained(
        folder, dtype=dtype, attn_implementation="sdpa", output_loading_info=True, **config_overrides
    )
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"{folder}: checkpoint does not match {cls.__name__}: {bad}")
    return model.eval()


class Embedder:
    """Last hidden state → pooled float32 vectors for one architecture."""

    def __init__(self, folder, arch, dtype=torch.float32, task=None, **config_overrides):
        config = read_json(os.path.join(folder, "config.json"))
        self.arch = arch
        self.prefix = ""
        if arch == "jina":
            if not is_jina(config):
                sys.exit(f"{folder} is not a jina-embeddings-v3 folder")
            self.model = jina_torch.load(folder, task, dtype)
            self.prefix = config["task_instructions"][task] if task else ""
        else:
            if config.get("model_type") != arch:
                sys.exit(f"{folder} has model_type {config.get('model_type')}, not {arch}")
            if task:
                sys.exit("--task applies to jina only")
            self.model = load_qwen(folder, arch, dtype, **config_overrides)

    def pooled(self, ids, mask):
        if self.arch == "jina":
            h = self.model(ids, mask).float()
            m = mask.unsqueeze(-1).float()
            return (h * m).sum(1) / m.sum(1)
        h = self.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.float()
        # The last position whose mask is 1, under left and right padding alike.
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
        return h[torch.arange(h.shape[0]), last]


def embed_all(embedder, tok, texts, batch):
    """Normalised vectors in text order and the number of real tokens: texts sorted by token
    count (longest first) and run in batches, as sentence-transformers does."""
    rows = tok.ids([embedder.prefix + t for t in texts])
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = [None] * len(rows)
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            vecs = torch.nn.functional.normalize(embedder.pooled(*tok.pad([rows[i] for i in chunk])), dim=-1)
            for i, v in zip(chunk, vecs.float().numpy()):
                out[i] = v
    return np.stack(out), sum(len(r) for r in rows)


# ----------------------------------------------------------------------------------------------
# run


def max_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Pooled(torch.nn.Module):
    """ids, mask → L2-normalised pooled vectors: the whole embedding path as one module, for
    `openvino.convert_model`."""

    def __init__(self, embedder):
        super().__init__()
        self.embedder = embedder
        self.model = embedder.model

    def forward(self, input_ids, attention_mask):
        return torch.nn.functional.normalize(self.embedder.pooled(input_ids, attention_mask), dim=-1)


class OpenVinoEmbedder:
    """An `Embedder` converted by OpenVINO and compiled for the CPU at its default precision."""

    def __init__(self, embedder, tok, texts, threads):
        import openvino as ov

        self.prefix = embedder.prefix
        # Right padding for every model (last-token pooling finds the last real token either way,
        # and under a causal mask no real token sees the padding after it, so the vectors are the
        # same). Left padding leaves the padding rows fully masked, which OpenVINO's bf16 turns into
        # NaN that then spreads through the attention values.
        tok.left = False
        example = tok.pad(tok.ids([self.prefix + t for t in texts[:2]]))
        with torch.inference_mode():
            model = ov.convert_model(
                Pooled(embedder).eval(),
                example_input=example,
                input=[(ov.PartialShape([-1, -1]), ov.Type.i64)] * 2,
            )
        core = ov.Core()
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
        self.precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.req = self.compiled.create_infer_request()
        self.version = f"openvino {ov.__version__.split('-')[0]}"

    def pooled(self, ids, mask):
        out = self.req.infer({0: ids.numpy(), 1: mask.numpy()})[self.compiled.output(0)]
        return torch.from_numpy(np.array(out))


def run(args):
    # The tokenizer's Rayon pool reads this when it first starts.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    texts = read_json(args.texts)
    rss_before_load = max_rss_mb()
    embedder = Embedder(args.model, args.arch, DTYPES[args.dtype], args.task)
    tok = TextTokenizer(args.model, args.max_len)
    dtype = args.dtype + (" (bf16 autocast)" if args.autocast else "")
    version = f"torch {torch.__version__} transformers {transformers.__version__}"
    if args.arch == "jina":
        version = f"torch {torch.__version__} (bench/jina_torch.py)"
    if args.openvino:
        embedder = OpenVinoEmbedder(embedder, tok, texts, args.threads)
        dtype = f"OpenVINO default precision: {embedder.precision}"
        version = embedder.version
    # --autocast: f32 weights, bf16 compute (oneDNN's AMX / AVX-512 BF16 kernels where the CPU has
    # them), what a PyTorch user reaches for on such a CPU.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast)
    with autocast:
        embed_all(embedder, tok, texts[: args.batch], args.batch)
    best = math.inf
    for _ in range(args.repeat):
        t = time.perf_counter()
        with autocast:
            vectors, tokens = embed_all(embedder, tok, texts, args.batch)
        best = min(best, time.perf_counter() - t)
    out = {
        "texts_per_s": len(texts) / best,
        "tokens_per_s": tokens / best,
        "tokens": tokens,
        "texts": len(texts),
        "seconds": best,
        "batch": args.batch,
        "max_len": args.max_len,
        "threads": args.threads,
        "dtype": dtype,
        "version": version,
    }
    if args.ours:
        ours = np.array(read_json(args.ours), dtype=np.float32)
        out["max_abs_diff_vs_sembed"] = float(np.abs(vectors - ours).max())
    # Peak resident memory of the whole process; the libraries alone take rss_before_load_mb of it.
    out["peak_rss_mb"] = max_rss_mb()
    out["rss_before_load_mb"] = rss_before_load
    print(json.dumps(out))


# ----------------------------------------------------------------------------------------------
# gemm


def gemm(args):
    """GFLOP/s of torch.matmul (m × k) · (k × n), best of 5 after a warm-up, bf16 and f32."""
    torch.set_num_threads(args.threads)
    out = {"m": args.m, "threads": args.threads, "version": f"torch {torch.__version__}", "shapes": []}
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split(","))
        row = {"k": k, "n": n}
        for name, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(args.m, k, generator=gen).to(dtype)
            b = torch.randn(k, n, generator=gen).to(dtype)
            with torch.inference_mode():
                torch.matmul(a, b)
                best = math.inf
                for _ in range(5):
                    t = time.perf_counter()
                    torch.matmul(a, b)
                    best = min(best, time.perf_counter() - t)
            row[f"{name}_gflops"] = 2 * args.m * k * n / best / 1e9
        out["shapes"].append(row)
    print(json.dumps(out))


# ----------------------------------------------------------------------------------------------
# selftest


def check_fixture(name, arch):
    """Worst differences of this peer against the golden cases of one fixture."""
    folder = os.path.join(FIXTURES, name)
    golden = read_json(os.path.join(FIXTURES, "cases", name + ".json"))
    config = read_json(os.path.join(folder, "config.json"))
    names_ok = dict(tensor_spec(config)) == checkpoint_shapes(folder)
    tok = TextTokenizer(folder, golden["max_seq_length"])
    ids_ok = all(tok.ids([c["input_text"]])[0] == c["input_ids"] for c in golden["cases"])

    embedders = {}

    def pooled(task, ids, mask):
        if task not in embedders:
            embedders[task] = Embedder(folder, arch, task=task)
        with torch.inference_mode():
            return embedders[task].pooled(ids, mask)

    worst = worst_norm = 0.0

    def compare(vec, truncate_dim, embedding, normalized):
        nonlocal worst, worst_norm
        vec = vec[:truncate_dim] if truncate_dim else vec
        worst = max(worst, (vec - torch.tensor(embedding)).abs().max().item())
        normed = torch.nn.functional.normalize(vec, dim=-1)
        worst_norm = max(worst_norm, (normed - torch.tensor(normalized)).abs().max().item())

    for c in golden["cases"]:
        ids = torch.tensor([c["input_ids"]])
        compare(
            pooled(c.get("task"), ids, torch.ones_like(ids))[0], c.get("truncate_dim"), c["embedding"], c["embedding_normalized"]
        )
    for b in golden["batched"]:
        vecs = pooled(b.get("task"), torch.tensor(b["input_ids"]), torch.tensor(b["attention_mask"]))
        for v, e, n in zip(vecs, b["embedding"], b["embedding_normalized"]):
            compare(v, b.get("truncate_dim"), e, n)

    ok = names_ok and ids_ok and worst <= 2e-5 and worst_norm <= 1e-5
    line = (
        f"{name}: {len(golden['cases'])} cases + {len(golden['batched'])} padded batches, "
        f"worst |diff| embedding {worst:.2e}, normalised {worst_norm:.2e}; "
        f"token ids {'exact' if ids_ok else 'DIFFER'}; tensor names/shapes {'match' if names_ok else 'DIFFER'}"
    )
    if arch == "qwen2":
        # The same weights read with a causal config must give other vectors, or the golden's
        # bidirectional attention was not what ran above.
        c = golden["cases"][0]
        ids = torch.tensor([c["input_ids"]])
        causal = Embedder(folder, arch, is_causal=True)
        with torch.inference_mode():
            moved = (causal.pooled(ids, torch.ones_like(ids))[0] - torch.tensor(c["embedding"])).abs().max().item()
        ok = ok and moved > 1e-3
        line += f"; is_causal=true instead moves case '{c['name']}' by {moved:.2e}"
    print(("OK   " if ok else "FAIL ") + line)
    return ok


def selftest(_args):
    results = [
        check_fixture(n, a) for n, a in [("qwen2-bidir-tiny", "qwen2"), ("qwen3-causal-tiny", "qwen3"), ("jina-v3-tiny", "jina")]
    ]
    sys.exit(0 if all(results) else 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write a random-weight model folder at a real config's widths")
    m.add_argument("--config", required=True, help="real config.json (../shared/real-configs/…)")
    m.add_argument("--fixture", required=True, help="tiny fixture folder of the same architecture (tokenizer, ST files)")
    m.add_argument("--layers", type=int, required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True)
    m.set_defaults(fn=make)
    r = sub.add_parser("run", help="embed texts with PyTorch and print throughput as JSON")
    r.add_argument("--model", required=True)
    r.add_argument("--arch", required=True, choices=["qwen2", "qwen3", "jina"])
    r.add_argument("--texts", required=True, help="JSON list of strings")
    r.add_argument("--max-len", type=int, default=256)
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--repeat", type=int, default=3)
    r.add_argument("--threads", type=int, default=os.cpu_count())
    r.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    r.add_argument("--ours", help="JSON list of sembed's normalised vectors, in text order")
    how = r.add_mutually_exclusive_group()
    how.add_argument("--autocast", action="store_true", help="run under torch.autocast('cpu', bfloat16)")
    how.add_argument("--openvino", action="store_true", help="convert to OpenVINO, run at its default precision")
    r.add_argument("--task", help="Jina task: its instruction is prefixed and its adapter merged")
    r.set_defaults(fn=run)
    g = sub.add_parser("gemm", help="time PyTorch's bf16 and f32 matrix products")
    g.add_argument("--shapes", nargs="+", required=True, help="K,N pairs")
    g.add_argument("--m", type=int, default=1024)
    g.add_argument("--threads", type=int, default=os.cpu_count())
    g.set_defaults(fn=gemm)
    s = sub.add_parser("selftest", help="check this peer against the golden fixtures")
    s.set_defaults(fn=selftest)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
