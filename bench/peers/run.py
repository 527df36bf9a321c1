#!/usr/bin/env python3
"""moeprune's MoE layer against its peers, alternated in one run.

For every shape and round, moeprune (`moeprune-bench moe ... --top-k K`) and every
peer (`peer_moe.py --impl X`) run once each, one process per measurement, in an
order rotated from round to round and shape to shape, so that a slow spell of the
machine hits all alike. Each process times its layer and, in the same process, the
same dense reference (the two expert GEMMs on all k*tokens rows, no routing); a
cell's ratio is its layer's time over that dense time (lower is better), and
moeprune:peer is moeprune's time over the peer's in the same round (below 1 =
moeprune faster). While each process runs, the CPU time used by every other process
on the machine is measured (from /proc/stat minus the child's own usage): rounds in
which others used more than --busy-max cores are reported but left out of the table.

  PYTHONPATH=.peers/site .venv/bin/python bench/peers/run.py --bench build/bench/moeprune-bench
  (bench/peers/setup.sh installs the peers into .peers/; see docs/performance.md)
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = ["titan_grouped", "titan_loop", "deepspeed", "einsum"]
SHAPES = [(t, h, e) for t in (4096, 16384) for h in (768, 128) for e in (8, 32)]


def cpu_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle  # busy jiffies of all CPUs


def measure(cmd, env, timeout):
    """Runs cmd; returns (last JSON row it printed or None, error text, cores others used)."""
    hz = os.sysconf("SC_CLK_TCK")
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0, t0 = cpu_jiffies(), time.monotonic()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired:
        out, err, rc = "", f"timed out after {timeout} s", -1
    b1, t1 = cpu_jiffies(), time.monotonic()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    others = max(0.0, ((b1 - b0) / hz - own) / max(t1 - t0, 1e-9))
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    if rc != 0 or not rows:
        tail = (err or out).strip().splitlines()[-1:] or [f"exit {rc}"]
        return None, tail[0][:200], others
    return rows[-1], "", others


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="build/bench/moeprune-bench", help="the moeprune-bench binary")
    ap.add_argument("--impls", default=",".join(PEERS),
                    help="peers, comma-separated (titan_grouped, titan_loop, titan_shipped, deepspeed, einsum)")
    ap.add_argument("--shapes", default="", help="TOKENSxHIDDENxE,... (default: the 8 of tokens 4096/16384, "
                                                 "hidden 768/128, E 8/32)")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every process (CPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (moeprune-bench uses a GPU when it sees one)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--busy-max", type=float, default=0.3, help="cores other processes may use during a cell")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per process")
    ap.add_argument("--out", default="", help="also append every row (JSON lines) to this file")
    a = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes else SHAPES
    impls = ["moeprune"] + [i for i in a.impls.split(",") if i]
    if not os.access(a.bench, os.X_OK):
        sys.exit(f"run.py: {a.bench} is not an executable moeprune-bench (build first, or pass --bench)")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               DS_ACCELERATOR="cuda" if a.device.startswith("cuda") else "cpu", PYTHONWARNINGS="ignore")
    if not a.device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""
    out = open(a.out, "a") if a.out else None
    rows = []
    print(f"# {len(shapes)} shape(s) x {len(impls)} implementation(s) x {a.rounds} round(s), k={a.k}, {a.precision}, "
          f"{a.device}, {a.threads} thread(s); load before: {os.getloadavg()[0]:.2f}", flush=True)
    n = 0
    for rnd in range(a.rounds):
        for si, (T, H, E) in enumerate(shapes):
            shift = (rnd + si) % len(impls)
            for impl in impls[shift:] + impls[:shift]:
                if impl == "moeprune":
                    cmd = [a.bench, "moe", "--tokens", str(T), "--hidden", str(H), "--experts", str(E), "--top-k",
                           str(a.k), "--precision", a.precision, "--repeat", str(a.repeat)]
                else:
                    cmd = [sys.executable, os.path.join(HERE, "peer_moe.py"), "--impl", impl, "--tokens", str(T),
                           "--hidden", str(H), "--experts", str(E), "--k", str(a.k), "--repeat", str(a.repeat),
                           "--threads", str(a.threads), "--device", a.device, "--precision", a.precision]
                row, err, others = measure(cmd, env, a.timeout)
                n += 1
                rec = {"round": rnd, "impl": impl, "tokens": T, "hidden": H, "experts": E, "k": a.k,
                       "precision": a.precision, "device": a.device, "others_cores": round(others, 3),
                       "load1": round(os.getloadavg()[0], 2)}
                if row is None:
                    rec["error"] = err
                    print(f"  {impl} {T}x{H} E{E}: FAILED: {err}", flush=True)
                else:
                    rec.update(moe_ms=1e3 * row["moe_s"], dense_ms=1e3 * row["dense_s"],
                               moe_spread=row["moe_spread"])
                    print(f"  [{n}] round {rnd} {T}x{H} E{E} {impl:14s} {rec['moe_ms']:9.2f} ms  dense "
                          f"{rec['dense_ms']:9.2f} ms  x{rec['moe_ms'] / rec['dense_ms']:.2f}  others "
                          f"{others:.2f} cores", flush=True)
                rows.append(rec)
                if out:
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
    print(table(rows, shapes, impls, a.busy_max))


def table(rows, shapes, impls, busy_max):
    """Markdown: per shape the dense ms, then per implementation ms / x dense / moeprune:peer."""
    lines = ["| tokens | H | E | dense ms | " + " | ".join(impls) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in impls) + " |"]
    left_out = 0
    for T, H, E in shapes:
        cell = {}
        for r in rows:
            if (r["tokens"], r["hidden"], r["experts"]) != (T, H, E) or "moe_ms" not in r:
                continue
            if r["others_cores"] > busy_max:
                left_out += 1
                continue
            cell.setdefault(r["impl"], {})[r["round"]] = r
        dense = [r["dense_ms"] for c in cell.values() for r in c.values()]
        out = [str(T), str(H), str(E), f"{statistics.median(dense):.1f}" if dense else "-"]
        for impl in impls:
            c = cell.get(impl)
            if not c:
                out.append("-")
                continue
            ms = statistics.median(r["moe_ms"] for r in c.values())
            x = statistics.median(r["moe_ms"] / r["dense_ms"] for r in c.values())
            s = f"{ms:.1f} / {x:.2f}"
            if impl != "moeprune":
                mine = cell.get("moeprune", {})
                q = [mine[k]["moe_ms"] / r["moe_ms"] for k, r in c.items() if k in mine]
                s += f" / {statistics.median(q):.2f}" if q else " / -"
            out.append(s)
        lines.append("| " + " | ".join(out) + " |")
    lines.append(f"\ncell: ms / x dense (same process) / moeprune:peer (same round, below 1 = moeprune faster); "
                 f"median over rounds; {left_out} measurement(s) left out (others used > {busy_max} cores)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
