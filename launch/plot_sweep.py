#!/usr/bin/env python3
"""Plot launch/sweep.sh's CSV: test accuracy against pruned fraction, one line per
criterion (mean over seeds, bars = min..max), for global and per-layer scope,
without and with re-fine-tuning. usage: plot_sweep.py sweep.csv sweep.png"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = list(csv.DictReader(open(sys.argv[1])))
crits = ["router_norm_change", "router_delta", "heavy_hitter", "soft_count", "random"]
fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True, sharey=True)
for i, scope in enumerate(["global", "per_layer"]):
    for j, (col, label) in enumerate([("test_after", "pruned"), ("test_refinetuned", "pruned + re-fine-tuned")]):
        ax = axes[i][j]
        for c in crits:
            by = defaultdict(list)
            for r in rows:
                if r["scope"] == scope and r["criterion"] == c:
                    by[float(r["fraction"])].append(100 * float(r[col]))
            xs = sorted(by)
            if not xs:
                continue
            mean = [sum(by[x]) / len(by[x]) for x in xs]
            lo = [m - min(by[x]) for m, x in zip(mean, xs)]
            hi = [max(by[x]) - m for m, x in zip(mean, xs)]
            ax.errorbar(xs, mean, yerr=[lo, hi], marker="o", capsize=3, label=c)
        ax.set_title(f"{scope} scope, {label}")
        ax.grid(alpha=0.3)
        if i == 1:
            ax.set_xlabel("fraction of experts pruned")
        if j == 0:
            ax.set_ylabel("downstream test accuracy (%)")
axes[0][0].legend(fontsize=8)
fig.suptitle("vmoe-tiny, Fashion-MNIST 5-9 after pre-training on 0-4")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
print(f"wrote {sys.argv[2]}")
