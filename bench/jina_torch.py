"""A compact PyTorch port of jina-embeddings-v3's forward pass (XLMRobertaLoRA from
jinaai/xlm-roberta-flash-implementation, `use_flash_attn: false`), for inference only.

It reads a model folder as published (config.json + model.safetensors with the upstream tensor
names) and computes the last hidden state:

  word embedding + token-type embedding row 0 (no position table: positions come from rotary)
  -> emb_ln (LayerNorm)
  -> per layer, post-LN:
       x = norm1(x + out_proj(attention(Wqkv x)))      Wqkv output split as (3, heads, head_dim);
                                                       rotary (rotate_half) on q and k;
                                                       padded keys get -10000.0 added to the logits
       x = norm2(x + fc2(gelu_erf(fc1 x)))

Task adapters: every Linear and Embedding carries stacked LoRA tensors (one slice per entry of
`lora_adaptations`). Choosing a task merges that slice into the weights once at load time, as
upstream's parametrisation does per task:
  Linear:    W_t = W + (lora_B[t] @ lora_A[t]) * lora_alpha / lora_rank   (A: [T, r, in], B: [T, out, r])
  Embedding: E_t = E + (lora_A[t] @ lora_B[t]) * lora_alpha / lora_rank   (A: [T, V, r],  B: [T, r, dim])
No task means the base weights. The pooler (`roberta.pooler.*`) is not part of the sentence embedding.

bench/peer_shapes.py `selftest` checks this port against the golden cases of
tests/fixtures/jina-v3-tiny (computed with the upstream code).
"""

import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

PREFIX = "roberta."
LORA = ".parametrizations.weight."


def merged_weight(tensors, module, adapter, scaling, embedding):
    """The weight of `module` with adapter index `adapter` merged in (None: the base weight)."""
    w = tensors[module + LORA + "original"]
    if adapter is None:
        return w
    a = tensors[module + LORA + "0.lora_A"][adapter]
    b = tensors[module + LORA + "0.lora_B"][adapter]
    return w + (a @ b if embedding else b @ a) * scaling


class JinaV3(torch.nn.Module):
    def __init__(self, config, tensors, task=None):
        super().__init__()
        adapter = None if task is None else config["lora_adaptations"].index(task)
        scaling = config["lora_alpha"] / config["lora_rank"]
        self.heads = config["num_attention_heads"]
        self.head_dim = config["hidden_size"] // self.heads
        self.eps = config["layer_norm_eps"]
        self.base = float(config["rotary_emb_base"])

        def t(name):
            return tensors[PREFIX + name]

        def lin(name):
            return merged_weight(tensors, PREFIX + name, adapter, scaling, embedding=False)

        def emb(name):
            return merged_weight(tensors, PREFIX + name, adapter, scaling, embedding=True)

        p = {}
        p["word"] = emb("embeddings.word_embeddings")
        p["type0"] = emb("embeddings.token_type_embeddings")[0]
        p["emb_ln_w"], p["emb_ln_b"] = t("emb_ln.weight"), t("emb_ln.bias")
        for i in range(config["num_hidden_layers"]):
            pre = f"encoder.layers.{i}."
            for key, name in [("qkv", "mixer.Wqkv"), ("out", "mixer.out_proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")]:
                p[f"{i}_{key}_w"], p[f"{i}_{key}_b"] = lin(pre + name), t(pre + name + ".bias")
            for norm in ("norm1", "norm2"):
                p[f"{i}_{norm}_w"], p[f"{i}_{norm}_b"] = t(pre + norm + ".weight"), t(pre + norm + ".bias")
        self.p = torch.nn.ParameterDict({k: torch.nn.Parameter(v.contiguous(), requires_grad=False) for k, v in p.items()})
        self.layers = config["num_hidden_layers"]

    def rotary(self, seq_len, dtype, device):
        """cos, sin of shape [seq_len, head_dim] (non-interleaved halves), computed in float32."""
        d = self.head_dim
        inv_freq = 1.0 / (self.base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        freqs = torch.cat([freqs, freqs], dim=-1)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    @staticmethod
    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def forward(self, input_ids, attention_mask):
        """Last hidden state [batch, seq, hidden] for padded ids and their 0/1 mask."""
        p = self.p
        bsz, seq = input_ids.shape
        hidden = p["word"].shape[1]
        x = F.embedding(input_ids, p["word"]) + p["type0"]
        x = F.layer_norm(x, (hidden,), p["emb_ln_w"], p["emb_ln_b"], self.eps)
        cos, sin = self.rotary(seq, x.dtype, x.device)
        # Additive key-padding mask, broadcast over heads and queries: 0 for real keys, -10000 for pads.
        bias = ((1.0 - attention_mask.to(x.dtype)) * -10000.0)[:, None, None, :]
        for i in range(self.layers):
            qkv = F.linear(x, p[f"{i}_qkv_w"], p[f"{i}_qkv_b"]).view(bsz, seq, 3, self.heads, self.head_dim)
            q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # [batch, heads, seq, head_dim]
            q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0 / math.sqrt(self.head_dim))
            a = F.linear(a.transpose(1, 2).reshape(bsz, seq, hidden), p[f"{i}_out_w"], p[f"{i}_out_b"])
            x = F.layer_norm(x + a, (hidden,), p[f"{i}_norm1_w"], p[f"{i}_norm1_b"], self.eps)
            m = F.linear(F.gelu(F.linear(x, p[f"{i}_fc1_w"], p[f"{i}_fc1_b"])), p[f"{i}_fc2_w"], p[f"{i}_fc2_b"])
            x = F.layer_norm(x + m, (hidden,), p[f"{i}_norm2_w"], p[f"{i}_norm2_b"], self.eps)
        return x


def load(folder, task=None, dtype=torch.float32):
    """The model in `folder` with `task`'s adapter merged (None: base weights), cast to `dtype`."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    return JinaV3(config, tensors, task).to(dtype).eval()
