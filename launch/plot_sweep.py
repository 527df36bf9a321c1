#!/usr/bin/env python3
"""Plot launch/sweep.sh's CSV: test accuracy against pruned fraction, one line per
criterion (mean over fine-tuning seeds and random draws, bars = 95% confidence
interval of the mean, Student t), one row per pruned routing (and scope), without and
with re-fine-tuning. usage: plot_sweep.py sweep.csv sweep.png"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, __import__("os").path.dirname(__file__))
from sweep_table import CRITS, cells, panels  # noqa: E402

rows = list(csv.DictReader(open(sys.argv[1])))
rowkeys = panels(rows)
fig, axes = plt.subplots(len(rowkeys), 2, figsize=(11, 4 * len(rowkeys)), sharex=True, sharey=True, squeeze=False)
for i, (routing, scope) in enumerate(rowkeys):
    for j, (col, label) in enumerate([("test_after", "pruned"), ("test_refinetuned", "pruned + re-fine-tuned")]):
        ax = axes[i][j]
        for c in CRITS:
            stats = cells(rows, routing, scope, c, col)
            xs = sorted(stats)
            if not xs:
                continue
            mean = [stats[x]["mean"] for x in xs]
            ci = [0 if stats[x]["ci"] != stats[x]["ci"] else stats[x]["ci"] for x in xs]  # one run: no bar
            ax.errorbar(xs, mean, yerr=ci, marker="o", capsize=3, label=c)
        zeroed = [100 * float(r["test_experts_zeroed"]) for r in rows
                  if r.get("routing", "drop") == routing and r.get("test_experts_zeroed")]
        if zeroed:
            ax.axhline(sum(zeroed) / len(zeroed), color="grey", ls=":", label="every expert zeroed")
        ax.set_title(f"{routing} routing, {scope} scope, {label}")
        ax.grid(alpha=0.3)
        if i == len(rowkeys) - 1:
            ax.set_xlabel("fraction of experts pruned")
        if j == 0:
            ax.set_ylabel("downstream test accuracy (%)")
axes[0][0].legend(fontsize=8)
fig.suptitle("pruning sweep: mean over fine-tuning seeds (random: also over draws), 95% CI")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
print(f"wrote {sys.argv[2]}")
