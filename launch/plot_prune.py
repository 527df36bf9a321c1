#!/usr/bin/env python3
"""Pictures of one pruning report (prune_report.json, written by `moeprune prune`
or `moeprune run`):
  prune_experts.png     per MoE block, the criterion's score of every expert, its
                        router norm change and its downstream load, pruned ones in
                        red, and the expected load per rank before/after
                        rebalancing (imbalance = max / mean);
  prune_ratio_auto.png  with prune.ratio: auto, the masked accuracy of every
                        candidate ratio on the calibration split, the budget and the
                        chosen ratio;
  training_curves.png   loss and validation accuracy of every phase, from the
                        metrics.jsonl beside the report.
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


def save(fig, name):
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)


layers = report["layers"]
# Rows: the criterion's score; the router norm change (when not the criterion); the
# downstream load (kept choices on the calibration split). Pruned experts in red.
rows = [("scores", f"score ({report['criterion']})")]
if report["criterion"] != "router_norm_change" and all(l.get("router_norm_change") for l in layers):
    rows.append(("router_norm_change", "router norm change"))
if all(l.get("calibration_load") for l in layers):
    rows.append(("calibration_load", "downstream load (choices)"))
fig, axes = plt.subplots(len(rows), len(layers) + 1, figsize=(3.2 * (len(layers) + 1), 2.9 * len(rows)),
                         squeeze=False)
for j, l in enumerate(layers):
    ids = sorted(l["kept"] + l["pruned"])
    colors = ["tab:red" if i in l["pruned"] else "tab:blue" for i in ids]
    for i, (key, label) in enumerate(rows):
        ax = axes[i][j]
        ax.bar([str(e) for e in ids], l[key], color=colors)
        ax.axhline(0, color="black", lw=0.5)
        if i == 0:
            ax.set_title(f"block {l['block']}: {len(l['pruned'])} of {len(ids)} pruned (red)", fontsize=9)
        if i == len(rows) - 1:
            ax.set_xlabel("expert id")
        if j == 0:
            ax.set_ylabel(label, fontsize=9)
for i in range(1, len(rows)):
    axes[i][-1].axis("off")
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
zeroed = report.get("test_accuracy_experts_zeroed")
fig.suptitle(f"{report['criterion']}, {report['scope']} scope, {report['routing']} routing, ratio {report['ratio']}: "
             f"test accuracy {100 * report['test_accuracy_before']:.2f}% -> {100 * report['test_accuracy_after']:.2f}%"
             + (f"; every expert zeroed: {100 * zeroed:.2f}%" if zeroed is not None else ""),
             fontsize=10)
save(fig, "prune_experts.png")

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
    save(fig, "prune_ratio_auto.png")
# Training curves of the run, when its metrics.jsonl is beside the report.
metrics = os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "metrics.jsonl")
if os.path.exists(metrics):
    curves, evals = {}, {}
    for line in open(metrics):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        ph = r.get("phase")
        if ph and "loss" in r and "step" in r and "event" not in r:
            curves.setdefault(ph, []).append((r["step"], r["loss"]))
        if ph and "val_accuracy" in r and "step" in r:
            evals.setdefault(ph, []).append((r["step"], 100 * r["val_accuracy"]))
    if curves:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
        for ph, pts in curves.items():
            a1.plot([p[0] for p in pts], [p[1] for p in pts], label=ph)
        for ph, pts in evals.items():
            a2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=ph)
        a1.set_xlabel("step")
        a1.set_ylabel("training loss")
        a1.set_yscale("log")
        a2.set_xlabel("step")
        a2.set_ylabel("validation accuracy (%)")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        save(fig, "training_curves.png")
print(" ".join(written))
