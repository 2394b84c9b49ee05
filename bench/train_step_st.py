"""sentence-transformers' training steps (forward, backward, clip, AdamW), the peer of sembed's
train_step example: `mnrl` (MultipleNegativesRankingLoss, batch 32 pairs, the default) or `triplet`
(TripletLoss, euclidean, margin 5, 16 triplets), max length 128, dropout on. Batch i is rows
[i·B, (i+1)·B); batch 0 warms up, batches 1..=STEPS are timed, as in the example. PRECISION `bf16`
runs the forward pass and the loss under `torch.autocast("cpu", dtype=torch.bfloat16)` (what the
Trainer's `bf16=True` does on a CPU), f32 master weights and AdamW as in sembed's `--precision bf16`.

    python bench/train_step_st.py DATA.jsonl MODEL_DIR THREADS [mnrl|triplet] [STEPS] [f32|bf16]
"""
import json
import sys
import time

import torch
from sentence_transformers import SentenceTransformer, losses


def main():
    data, model_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else torch.get_num_threads())
    mode = sys.argv[4] if len(sys.argv) > 4 else "mnrl"
    steps = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    bf16 = len(sys.argv) > 6 and sys.argv[6] == "bf16"
    rows = [json.loads(l) for l in open(data)]
    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = 128
    if mode == "triplet":
        size, keys, loss_fn = 16, ["anchor", "positive", "negative"], losses.TripletLoss(model)
    else:
        size, keys, loss_fn = 32, ["anchor", "positive"], losses.MultipleNegativesRankingLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    model.train()

    def batch(i):
        b = rows[i * size : (i + 1) * size]
        return [model.tokenize([r[k] for r in b]) for k in keys]

    def step(cols):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(cols, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step(batch(0))
    t = time.perf_counter()
    for i in range(1, steps + 1):
        step(batch(i))
    print(json.dumps({"engine": "sentence-transformers", "mode": mode, "precision": "bf16 autocast" if bf16 else "f32",
                      "batch": size, "steps": steps,
                      "seconds_per_step": (time.perf_counter() - t) / steps, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
