#!/usr/bin/env python3
"""Markdown tables of launch/sweep.sh's CSV: mean test accuracy (%) over seeds
(min..max in brackets) per criterion and pruned fraction. usage: sweep_table.py sweep.csv"""
import csv
import sys
from collections import defaultdict

rows = list(csv.DictReader(open(sys.argv[1])))
crits = ["router_norm_change", "router_delta", "heavy_hitter", "soft_count", "random"]
fracs = sorted({float(r["fraction"]) for r in rows})
seeds = sorted({r["seed"] for r in rows})
for scope in ["global", "per_layer"]:
    for col, label in [("test_after", "pruned, no re-fine-tuning"), ("test_refinetuned", "pruned + re-fine-tuned")]:
        print(f"\n{scope} scope, {label} (test accuracy %, mean over {len(seeds)} seeds [min..max])\n")
        print("| criterion | " + " | ".join(f"{f:.2f}" for f in fracs) + " |")
        print("| --- |" + " --- |" * len(fracs))
        for c in crits:
            by = defaultdict(list)
            for r in rows:
                if r["scope"] == scope and r["criterion"] == c:
                    by[float(r["fraction"])].append(100 * float(r[col]))
            cells = []
            for f in fracs:
                v = by.get(f, [])
                cells.append(f"{sum(v)/len(v):.2f} [{min(v):.2f}..{max(v):.2f}]" if v else "-")
            print(f"| {c} | " + " | ".join(cells) + " |")
