#!/usr/bin/env python3
"""Where a training step goes, by phase, from a profiler trace of `moeprune-bench step --profile FILE`.

    .venv/bin/python bench/step_phases.py FILE [--steps 3]

The step and the model mark their phases with named ranges (step::forward / backward /
grad_sync / optimizer; vit::embed, vit::attention, vit::mlp, vit::head; the MoE layer's
moe::route, plan, dispatch, experts, combine). Every top-level operator is charged to the
innermost range around it; a backward operator is charged to the range of the forward
operator it differentiates (linked by autograd's sequence number), so that "attention"
holds its forward and its backward. Time inside a range that no operator accounts for
(moeprune's own loops: the direct exchange, the optimiser; MPI) is charged to that range
(the optimiser's and the gradient sync's in the forward column). Prints milliseconds per
step and shares.
"""
import argparse
import bisect
import collections
import gzip
import json


def load(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        d = json.load(f)
    return [e for e in (d["traceEvents"] if isinstance(d, dict) else d) if e.get("ph") == "X"]


def innermost(ranges, t):
    """The shortest range (start, end, name) containing time t, or None; ranges: sorted."""
    best = None
    i = bisect.bisect_right(ranges, (t, float("inf"), "")) - 1
    while i >= 0:
        s, e, n = ranges[i]
        if s <= t < e and (best is None or e - s < best[1] - best[0]):
            best = (s, e, n)
        i -= 1
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=3, help="steps in the trace (moeprune-bench profiles 3)")
    a = ap.parse_args()
    ev = load(a.trace)
    ranges = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in ev if e.get("cat") == "user_annotation")
    ops = sorted((e for e in ev if e.get("cat") == "cpu_op"), key=lambda e: (e["tid"], e["ts"], -e["dur"]))
    # Top-level operators of each thread (not inside another operator of that thread).
    top, end = [], {}
    for e in ops:
        if e["ts"] >= end.get(e["tid"], -1):
            top.append(e)
            end[e["tid"]] = e["ts"] + e["dur"]
    # Forward operators by sequence number -> their phase.
    seq_phase = {}
    for e in ops:
        s = e.get("args", {}).get("Sequence number")
        if s is not None and not e["name"].startswith("autograd::"):
            r = innermost(ranges, e["ts"])
            if r and r[2] != "step::backward":
                seq_phase.setdefault(s, r[2])
    rules = {"DirectDispatchFn": "moe::dispatch", "DirectCombineFn": "moe::combine", "PermuteRowsFn": "moe::dispatch",
             "CombineFn": "moe::combine"}
    fwd, bwd = collections.Counter(), collections.Counter()
    traced_in = collections.Counter()  # per range (start, end, name): time of the operators directly in it
    for e in top:
        r = innermost(ranges, e["ts"])
        p = r[2] if r else "(outside the step)"
        if r:
            traced_in[r] += e["dur"]
        if p == "step::backward":
            s = e.get("args", {}).get("Sequence number")
            if s is not None and s in seq_phase:
                bwd[seq_phase[s]] += e["dur"]
            elif "AccumulateGrad" in e["name"]:
                bwd["(gradient accumulation into .grad)"] += e["dur"]
            else:
                hit = [v for k, v in rules.items() if k in e["name"]]
                bwd[hit[0] if hit else "(autograd engine)"] += e["dur"]
        else:
            fwd[p] += e["dur"]
    # Time inside a range that no operator or inner range accounts for: moeprune's own
    # loops (the direct exchange, the optimiser's update), MPI, the autograd engine.
    for r in ranges:
        parent = innermost([q for q in ranges if q != r], r[0])
        if parent:
            traced_in[parent] += r[1] - r[0]
    for r in ranges:
        own = (r[1] - r[0]) - traced_in[r]
        if own > 0:
            (bwd if r[2] == "step::backward" else fwd)["(autograd engine)" if r[2] == "step::backward" else r[2]] += own
    names = sorted(set(fwd) | set(bwd), key=lambda n: -(fwd[n] + bwd[n]))
    total = sum(fwd.values()) + sum(bwd.values())
    label = {"step::forward": "rest of the forward (loss, glue)", "step::grad_sync": "gradient sync",
             "step::optimizer": "optimizer (norm, update)"}
    print(f"{'phase (ms per step)':<36} {'forward':>11} {'backward':>12} {'total':>9} {'share':>6}")
    for n in names:
        f, b = fwd[n] / 1e3 / a.steps, bwd[n] / 1e3 / a.steps
        print(f"{label.get(n, n):<36} {f:>11.1f} {b:>12.1f} {f + b:>9.1f} {100 * (fwd[n] + bwd[n]) / total:>5.1f}%")
    print(f"{'step':<36} {sum(fwd.values()) / 1e3 / a.steps:>11.1f} {sum(bwd.values()) / 1e3 / a.steps:>12.1f} "
          f"{total / 1e3 / a.steps:>9.1f}")


if __name__ == "__main__":
    main()
