"""The runs of bench/mixed_precision.sh side by side: held-out retrieval after training, the time,
and OUT/loss.svg with the loss of every optimiser step, f32 against bf16, one panel per mode.
Written without a plotting library (the SVG is a few polylines), so it runs on any Python 3.

    python3 bench/loss_curves.py OUT
"""
import json
import pathlib
import re
import sys

out = pathlib.Path(sys.argv[1])
runs = {}
for d in sorted(out.iterdir()):
    metrics = d / "out" / "metrics.json"
    if not metrics.is_file():
        continue
    mode, precision = d.name.split("-", 1)
    m = json.loads(metrics.read_text())
    states = sorted((d / "out" / "checkpoints").glob("epoch-*/trainer_state.json"))
    losses = json.loads(states[-1].read_text())["losses"] if states else []
    log = (out / f"{d.name}.log").read_text() if (out / f"{d.name}.log").is_file() else ""
    secs = re.search(r"trained in (\d+) s", log)
    runs[(mode, precision)] = {
        "before": m["before"],
        "after": m["epochs"][-1]["metrics"],
        "losses": losses,
        "seconds": int(secs.group(1)) if secs else None,
        "precision": m.get("precision"),
    }

print("| mode | precision | NDCG@10 before | after | MRR@10 | R@1 | R@10 | trained in | computed as |")
print("|---|---|---:|---:|---:|---:|---:|---:|---|")
for (mode, precision), r in sorted(runs.items()):
    a = r["after"]
    print(
        f"| {mode} | {precision} | {r['before']['ndcg_at_10']:.4f} | {a['ndcg_at_10']:.4f} | "
        f"{a['mrr_at_10']:.4f} | {a['recall_at_1']:.4f} | {a['recall_at_10']:.4f} | "
        f"{r['seconds']} s | {r['precision']} |"
    )
for mode in sorted({m for m, _ in runs}):
    if (mode, "f32") in runs and (mode, "bf16") in runs:
        a, b = runs[(mode, "f32")], runs[(mode, "bf16")]
        d = b["after"]["ndcg_at_10"] - a["after"]["ndcg_at_10"]
        steps = list(zip(a["losses"], b["losses"]))
        worst = max((abs(x - y) for x, y in steps), default=0.0)
        print(f"{mode}: NDCG@10 bf16 - f32 = {d:+.4f}; largest loss difference at a step {worst:.4f} over {len(steps)} steps")

# The plot: one panel per mode, x = step, y = loss.
modes = sorted({m for m, _ in runs})
W, H, pad = 420, 260, 44
colors = {"f32": "#1f77b4", "bf16": "#d62728"}
parts = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * len(modes)}" height="{H}" '
    f'font-family="sans-serif" font-size="11">',
    f'<rect width="100%" height="100%" fill="white"/>',
]
for i, mode in enumerate(modes):
    x0 = i * W
    curves = {p: runs[(mode, p)]["losses"] for p in ("f32", "bf16") if (mode, p) in runs}
    values = [v for c in curves.values() for v in c]
    if not values:
        continue
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1
    steps = max(len(c) for c in curves.values())
    sx = lambda s: x0 + pad + (W - 2 * pad) * s / max(steps - 1, 1)
    sy = lambda v: H - pad - (H - 2 * pad) * (v - lo) / (hi - lo)
    parts.append(
        f'<text x="{x0 + W / 2}" y="16" text-anchor="middle" font-size="13">'
        f"MiniLM {'LoRA' if mode == 'lora' else mode} fine-tuning: loss per step (bf16 dashed)</text>"
    )
    parts.append(
        f'<polyline fill="none" stroke="black" points="{x0 + pad},{pad} {x0 + pad},{H - pad} {x0 + W - pad},{H - pad}"/>'
    )
    for t in range(5):
        v = lo + (hi - lo) * t / 4
        parts.append(f'<text x="{x0 + pad - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for t in range(5):
        s = round((steps - 1) * t / 4)
        parts.append(f'<text x="{sx(s):.1f}" y="{H - pad + 14}" text-anchor="middle">{s + 1}</text>')
    parts.append(f'<text x="{x0 + W / 2}" y="{H - 8}" text-anchor="middle">optimiser step</text>')
    for j, (p, c) in enumerate(curves.items()):
        pts = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in enumerate(c))
        dash = ' stroke-dasharray="5,3"' if p == "bf16" else ""
        parts.append(f'<polyline fill="none" stroke="{colors[p]}" stroke-width="1.5"{dash} points="{pts}"/>')
        parts.append(
            f'<text x="{x0 + W - pad - 4}" y="{pad + 14 * j}" text-anchor="end" fill="{colors[p]}">{p}</text>'
        )
parts.append("</svg>")
(out / "loss.svg").write_text("\n".join(parts) + "\n")
print(f"wrote {out / 'loss.svg'}")
