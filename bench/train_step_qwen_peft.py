"""The peer of sembed's LoRA training step at a Qwen2 shape: PEFT + PyTorch, each at its best setting.

A randomly initialised Qwen2Model of a published config (e.g. Qodo-Embed-1-1.5B's) with LAYERS layers,
bidirectional as the config says (transformers 5 honours `is_causal: false`), PEFT LoRA rank 8, alpha
16 on q_proj/v_proj, MNRL (scale 20) over last-token-pooled, L2-normalised embeddings of PAIRS random
anchor/positive sequences of LEN tokens, AdamW on the adapters. Times whole steps (forward, backward,
optimizer) after one warm-up step, in f32 and with `torch.autocast("cpu", dtype=torch.bfloat16)`.

    python bench/train_step_qwen_peft.py CONFIG LAYERS PAIRS LEN [STEPS] [THREADS]

Prints one JSON object per precision: seconds per step (median), peak RSS.
"""

import json
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2Model


def main():
    config_path, layers, pairs, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    steps = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    threads = int(sys.argv[6]) if len(sys.argv) > 6 else 2
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = Qwen2Config.from_json_file(config_path)
    cfg.num_hidden_layers = layers
    cfg.use_cache = False
    model = Qwen2Model(cfg).float()
    model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(3)

    def embed(ids):
        h = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return F.normalize(h[:, -1], dim=-1)

    for precision in ["f32", "bf16-autocast"]:
        times = []
        for step in range(steps + 1):
            a = torch.randint(0, cfg.vocab_size, (pairs, length), generator=g)
            p = torch.randint(0, cfg.vocab_size, (pairs, length), generator=g)
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "f32"):
                ea, ep = embed(a), embed(p)
                scores = ea.float() @ ep.float().T * 20.0
                loss = F.cross_entropy(scores, torch.arange(pairs))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step > 0:
                times.append(time.perf_counter() - t)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(
            json.dumps(
                {
                    "engine": f"PEFT + PyTorch {torch.__version__} {precision}",
                    "layers": layers,
                    "pairs": pairs,
                    "len": length,
                    "seconds_per_step": round(statistics.median(times), 3),
                    "peak_rss_gib": round(peak, 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
