"""sentence-transformers' side of bench/train_memory.sh: one epoch of MNRL (or CachedMNRL) on the
pairs, batch 32, max length 128, AdamW (lr 2e-5, weight decay 0.01), clipping at 1, dropout on, the
loop sentence-transformers' fit runs, without its data-loading machinery. Prints wall time and peak
RSS as JSON.

    python bench/train_epoch_st.py PAIRS.jsonl MODEL_DIR THREADS [CACHE_MINI_BATCH]
"""
import json
import resource
import sys
import time

import torch
from sentence_transformers import SentenceTransformer, losses


def main():
    data, model_dir, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = int(sys.argv[4]) if len(sys.argv) > 4 else None
    torch.set_num_threads(threads)
    rows = [json.loads(l) for l in open(data)]
    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = 128
    if cache:
        loss_fn = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=cache)
    else:
        loss_fn = losses.MultipleNegativesRankingLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    model.train()
    t = time.perf_counter()
    steps = 0
    for i in range(0, len(rows) - 31, 32):
        batch = rows[i : i + 32]
        cols = [model.tokenize([r["anchor"] for r in batch]), model.tokenize([r["positive"] for r in batch])]
        opt.zero_grad()
        loss = loss_fn(cols, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps += 1
    print(json.dumps({
        "engine": "sentence-transformers" + (f" CachedMNRL mini_batch_size={cache}" if cache else " MNRL"),
        "steps": steps,
        "seconds": round(time.perf_counter() - t, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
