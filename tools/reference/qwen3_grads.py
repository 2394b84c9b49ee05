"""Upstream reference gradients for qwen3-causal-tiny, the architecture ../shared/golden has none
for: the loss and the gradient of every parameter of transformers' own `Qwen3Model` (float64, train
mode, dropout 0), for the 3 triplets of tests/fixtures/grads/qwen3-causal-tiny/triplets.jsonl, in the
layout of the golden `grads/<model>/` files (see tests/fixtures/GOLDEN_README.md): a safetensors file
per loss, float64 gradients keyed by the names of model.safetensors, the loss as a decimal string in
the metadata entry `loss`.

What the embedding is, as sembed trains (and as sentence-transformers encodes): the anchor gets the
model's `query` prompt of config_sentence_transformers.json, positives and negatives its `document`
prompt (empty); the text is tokenised by the model's tokenizer.json (its post-processor appends
`<|endoftext|>`), run alone (no padding), pooled at its last token and L2-normalised. RMSNorm is
evaluated in float64 (the stock module computes it in float32, which would cap the reference at
float32 precision). Losses, by formula, as the golden README gives them:
  triplet: mean_i relu((1 - cos(a_i, p_i)) - (1 - cos(a_i, n_i)) + 0.5)
  mnrl:    mean_i cross_entropy(20 · cos(a_i, [p_1..p_B, n_1..n_B]), i)

    .venv-bench/bin/python tools/reference/qwen3_grads.py tests/fixtures/qwen3-causal-tiny \
        tests/fixtures/grads/qwen3-causal-tiny

Needs bench/requirements.txt (torch, transformers 5, tokenizers, safetensors).
"""
import json
import pathlib
import sys

import safetensors.torch
import tokenizers
import torch
import transformers
from transformers.models.qwen3 import modeling_qwen3


def rms_norm_f64(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def main():
    model_dir, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    modeling_qwen3.Qwen3RMSNorm.forward = rms_norm_f64
    model = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="eager")
    assert type(model).__name__ == "Qwen3Model", type(model)
    model = model.double()
    model.train()
    assert model.config.attention_dropout == 0.0
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompts = json.loads((model_dir / "config_sentence_transformers.json").read_text())["prompts"]
    triplets = [json.loads(l) for l in (out / "triplets.jsonl").read_text().splitlines() if l.strip()]
    names = list(safetensors.torch.load_file(str(model_dir / "model.safetensors")).keys())
    params = dict(model.named_parameters())
    assert sorted(names) == sorted(params), (sorted(names), sorted(params))

    ids = {}

    def embed(text, prompt, column):
        i = tok.encode(prompt + text).ids
        ids.setdefault(column, []).append(i)
        h = model(input_ids=torch.tensor([i])).last_hidden_state[0, -1]
        return h / h.norm()

    def columns():
        ids.clear()
        a = torch.stack([embed(t["anchor"], prompts.get("query", ""), "anchor") for t in triplets])
        p = torch.stack([embed(t["positive"], prompts.get("document", ""), "positive") for t in triplets])
        n = torch.stack([embed(t["negative"], prompts.get("document", ""), "negative") for t in triplets])
        return a, p, n

    report = {"model": model_dir.name, "triplets": triplets, "losses": {},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "tokenizers": tokenizers.__version__, "python": sys.version.split()[0]},
              "reference": "transformers Qwen3Model in float64 (RMSNorm in float64), train mode, "
                           "dropout 0; last-token pooling of each text alone; losses by formula"}
    for loss_name in ["triplet", "mnrl"]:
        model.zero_grad(set_to_none=True)
        a, p, n = columns()
        if loss_name == "triplet":
            loss = torch.relu((1 - (a * p).sum(1)) - (1 - (a * n).sum(1)) + 0.5).mean()
        else:
            scores = 20.0 * a @ torch.cat([p, n]).T
            loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(triplets)))
        loss.backward()
        grads = {k: (params[k].grad if params[k].grad is not None else torch.zeros_like(params[k]))
                 .detach().contiguous() for k in names}
        safetensors.torch.save_file(grads, str(out / f"{loss_name}_loss.safetensors"),
                                    metadata={"loss": repr(loss.item())})
        report["losses"][loss_name] = {"value_f64": loss.item()}
    report["input_ids"] = ids
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["losses"]))


if __name__ == "__main__":
    main()
