"""One sentence-transformers training step (forward, backward, clip, AdamW) on 16 triplets,
TripletLoss (euclidean, margin 5), max length 128 — the peer of sembed's train_step example."""
import json
import sys
import time

import torch
from sentence_transformers import SentenceTransformer, losses


def main():
    data, model_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else torch.get_num_threads())
    rows = [json.loads(l) for l in open(data)][:16]
    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = 128
    loss_fn = losses.TripletLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    model.train()

    def features(texts):
        return model.tokenize(texts)

    cols = [features([r["anchor"] for r in rows]), features([r["positive"] for r in rows]), features([r["negative"] for r in rows])]

    def step():
        opt.zero_grad()
        loss = loss_fn(cols, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()
    n = 3
    t = time.perf_counter()
    for _ in range(n):
        step()
    print(json.dumps({"engine": "sentence-transformers", "seconds_per_step": (time.perf_counter() - t) / n, "triplets": len(rows), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
