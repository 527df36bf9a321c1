#!/usr/bin/env python3
"""Pictures of one pruning report (prune_report.json, written by `moeprune prune`
or `moeprune run`):
  prune_experts.png     per MoE block, the criterion's score of every expert, pruned
                        ones in red, and the expected load per rank before/after
                        rebalancing (imbalance = max / mean);
  prune_ratio_auto.png  with prune.ratio: auto, the masked accuracy of every
                        candidate ratio on the calibration split, the budget and the
                        chosen ratio.
usage: plot_prune.py REPORT.json [OUT_DIR]   (default: the report's directory)
Prints the paths it wrote."""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

report = json.load(open(sys.argv[1]))
out = sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(os.path.abspath(sys.argv[1]))
os.makedirs(out, exist_ok=True)
written = []

layers = report["layers"]
fig, axes = plt.subplots(1, len(layers) + 1, figsize=(3.2 * (len(layers) + 1), 3.4), squeeze=False)
for ax, l in zip(axes[0], layers):
    ids = sorted(l["kept"] + l["pruned"])
    colors = ["tab:red" if i in l["pruned"] else "tab:blue" for i in ids]
    ax.bar([str(i) for i in ids], l["scores"], color=colors)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_title(f"block {l['block']}: {len(l['pruned'])} of {len(ids)} pruned", fontsize=9)
    ax.set_xlabel("expert id")
axes[0][0].set_ylabel(f"score ({report['criterion']})")
ax = axes[0][-1]
blocks = [str(l["block"]) for l in layers]
x = range(len(layers))
ax.bar([i - 0.2 for i in x], [l["imbalance_before"] for l in layers], width=0.4, label="survivors in place")
ax.bar([i + 0.2 for i in x], [l["imbalance_after"] for l in layers], width=0.4, label="rebalanced")
ax.set_xticks(list(x), blocks)
ax.axhline(1, color="black", lw=0.5)
ax.set_xlabel("MoE block")
ax.set_ylabel("load imbalance (max / mean per rank)")
ax.set_title(f"{report['ranks']} ranks", fontsize=9)
ax.legend(fontsize=7)
fig.suptitle(f"{report['criterion']}, {report['scope']} scope, {report['routing']} routing, ratio {report['ratio']}: "
             f"test accuracy {100 * report['test_accuracy_before']:.2f}% -> {100 * report['test_accuracy_after']:.2f}%",
             fontsize=10)
fig.tight_layout()
path = os.path.join(out, "prune_experts.png")
fig.savefig(path, dpi=110)
written.append(path)

auto = report.get("ratio_auto")
if auto:
    pts = auto["candidates"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [0.0] + [p["ratio"] for p in pts]
    ys = [100 * auto["unpruned_accuracy"]] + [100 * p["accuracy"] for p in pts]
    ax.plot(xs, ys, marker="o", label=f"{auto['split']} accuracy, masked")
    floor = 100 * auto["unpruned_accuracy"] - auto["max_accuracy_drop"]
    ax.axhline(floor, color="tab:red", ls="--", label=f"budget: {auto['max_accuracy_drop']} pt below unpruned")
    if auto["chosen"] > 0:
        c = [p for p in pts if p["ratio"] == auto["chosen"]][0]
        ax.plot([c["ratio"]], [100 * c["accuracy"]], marker="*", ms=16, color="tab:green",
                label=f"chosen: ratio {c['ratio']} ({c['pruned']} experts)")
    ax.set_xlabel("pruning ratio")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"prune.ratio: auto ({report['criterion']}, {report['routing']} routing)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "prune_ratio_auto.png")
    fig.savefig(path, dpi=110)
    written.append(path)
print(" ".join(written))
