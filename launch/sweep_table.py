#!/usr/bin/env python3
"""Markdown tables of launch/sweep.sh's CSV: per pruned routing and scope, test
accuracy (%) per criterion and pruned fraction as mean ± half-width of the 95%
confidence interval of the mean (Student t over the runs: fine-tuning seeds, and for
random also its draws) [min..max] (n). usage: sweep_table.py sweep.csv"""
import csv
import math
import sys
from collections import defaultdict

CRITS = ["router_norm_change", "router_delta", "heavy_hitter", "soft_count", "random"]
# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df):
    return T95.get(df) or T95[max(k for k in T95 if k <= df)] if df >= 1 else float("nan")


def panels(rows):
    keys = []
    for r in rows:
        k = (r.get("routing", "drop"), r["scope"])
        if k not in keys:
            keys.append(k)
    return keys


def cells(rows, routing, scope, crit, col):
    by = defaultdict(list)
    for r in rows:
        if r.get("routing", "drop") == routing and r["scope"] == scope and r["criterion"] == crit:
            by[float(r["fraction"])].append(100 * float(r[col]))
    out = {}
    for f, v in by.items():
        n = len(v)
        m = sum(v) / n
        sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else float("nan")
        out[f] = {"mean": m, "ci": t95(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan"), "min": min(v), "max": max(v), "n": n}
    return out


def main():
    rows = list(csv.DictReader(open(sys.argv[1])))
    fracs = sorted({float(r["fraction"]) for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    for routing, scope in panels(rows):
        for col, label in [("test_after", "pruned, no re-fine-tuning"), ("test_refinetuned", "pruned + re-fine-tuned")]:
            print(f"\n{routing} routing, {scope} scope, {label} (test accuracy %, mean ± 95% CI [min..max] (n), "
                  f"{len(seeds)} fine-tuning seeds)\n")
            print("| criterion | " + " | ".join(f"{f:.3g}" for f in fracs) + " |")
            print("| --- |" + " --- |" * len(fracs))
            for c in CRITS:
                st = cells(rows, routing, scope, c, col)
                row = []
                for f in fracs:
                    s = st.get(f)
                    row.append(f"{s['mean']:.2f} ± {s['ci']:.2f} [{s['min']:.2f}..{s['max']:.2f}] ({s['n']})" if s else "-")
                print(f"| {c} | " + " | ".join(row) + " |")
    # Paired by fine-tuning seed: each criterion minus the mean of random's draws on the
    # same fine-tuned model (the seed-to-seed spread of the model cancels out).
    for routing, scope in panels(rows):
        for col, label in [("test_after", "pruned, no re-fine-tuning"), ("test_refinetuned", "pruned + re-fine-tuned")]:
            print(f"\n{routing} routing, {scope} scope, {label}: criterion minus random on the same fine-tuned "
                  f"model (points, mean ± 95% CI over fine-tuning seeds [min..max])\n")
            print("| criterion | " + " | ".join(f"{f:.3g}" for f in fracs if f > 0) + " |")
            print("| --- |" + " --- |" * len([f for f in fracs if f > 0]))
            for c in CRITS[:-1]:
                row = []
                for f in fracs:
                    if f == 0:
                        continue
                    diffs = []
                    for sd in seeds:
                        pick = lambda crit: [100 * float(r[col]) for r in rows if r.get("routing", "drop") == routing
                                             and r["scope"] == scope and r["criterion"] == crit
                                             and float(r["fraction"]) == f and r["seed"] == sd]
                        mine, rnd = pick(c), pick("random")
                        if mine and rnd:
                            diffs.append(sum(mine) / len(mine) - sum(rnd) / len(rnd))
                    if not diffs:
                        row.append("-")
                        continue
                    n, m = len(diffs), sum(diffs) / len(diffs)
                    ci = t95(n - 1) * math.sqrt(sum((x - m) ** 2 for x in diffs) / (n - 1)) / math.sqrt(n) if n > 1 else float("nan")
                    row.append(f"{m:+.2f} ± {ci:.2f} [{min(diffs):+.2f}..{max(diffs):+.2f}]")
                print(f"| {c} | " + " | ".join(row) + " |")
    z = [100 * float(r["test_experts_zeroed"]) for r in rows if r.get("test_experts_zeroed")]
    b = [100 * float(r["test_before"]) for r in rows]
    if z:
        print(f"\nunpruned {sum(b)/len(b):.2f}%, every expert zeroed {sum(z)/len(z):.2f}% "
              f"(mean over the runs; per seed: {sorted({round(x, 2) for x in z})})")


if __name__ == "__main__":
    main()
