#!/usr/bin/env python3
"""One peer MoE layer, forward + backward, timed the way `moeprune-bench moe` times
moeprune's layer: one warm-up, then --repeat timed runs of
    y, aux = layer(x); (y.float().sum() + aux).backward()
(gradients accumulate; the device is synchronised around each run), median; and in the
same process the dense reference of `moeprune-bench moe`: the two expert GEMMs
(H -> 4H, GELU tanh, 4H -> H) on all k*tokens rows at once, no routing, same precision.
Prints one JSON line.

Implementations (--impl); every one: softmax router, top-k, experts H -> 4H -> H with
GELU (tanh), except titan_shipped:
  titan_grouped  torchtitan 0.3.0's MoE (TokenChoiceTopKRouter with score_func softmax,
                 LocalTokenDispatcher; dropless: k*T rows, no capacity, no aux loss, no
                 noise) with its inner experts replaced by the same two grouped GEMMs
                 (torch._grouped_mm, its weight layout [E, F, D], no bias) with GELU
  titan_loop     the same with one GEMM pair per expert (torchtitan's former
                 _run_experts_for_loop: split by counts, w[i] per expert)
  titan_shipped  torchtitan's MoE unmodified: bf16 SwiGLU experts through
                 torch._grouped_mm, F = 8H/3 rounded up to 16 (the FLOPs of 2 GEMMs of 4H)
  deepspeed      DeepSpeed 0.19.8's deepspeed.moe.layer.MoE(ep_size=1, k, capacity_factor
                 1.25, min_capacity 4, drop_tokens): capacity over all tokens, padded
                 [E, C, H] expert inputs (1.25 x the expert FLOPs), a loop over E copies of
                 Sequential(Linear, GELU, Linear); l_aux
  einsum         GShard / V-MoE style (written here, vmoe's semantics): groups of 1024
                 tokens, capacity ceil(1024 k 1.25 / E) rounded up to 4, choice-major
                 priority, noise std 1/E, one-hot dispatch and combine tensors [G,S,E,C],
                 experts as batched GEMMs over padded [E, G*C, H], importance + load loss
Precision: fp32, or bf16 under autocast with float32 master weights (as moeprune).
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def gelu(x):
    return F.gelu(x, approximate="tanh")


def compute_dtype(x):
    """The dtype autocast would compute in here (ops outside autocast's lists are cast by hand)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class Einsum(nn.Module):
    def __init__(self, H, E, k, group=1024, cf=1.25):
        super().__init__()
        self.E, self.k, self.group = E, k, group
        self.capacity = int(math.ceil(group * k * cf / E / 4.0)) * 4
        self.router = nn.Linear(H, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, H, 4 * H) * H**-0.5)
        self.b1 = nn.Parameter(torch.zeros(E, 1, 4 * H))
        self.w2 = nn.Parameter(torch.randn(E, 4 * H, H) * (4 * H) ** -0.5)
        self.b2 = nn.Parameter(torch.zeros(E, 1, H))

    def forward(self, x):
        T, H = x.shape
        E, k, S, C = self.E, self.k, self.group, self.capacity
        G = T // S
        xg = x.view(G, S, H)
        with torch.autocast(x.device.type, enabled=False):
            logits = self.router(xg.float())
            gates = torch.softmax(logits + torch.randn_like(logits) / E, dim=-1)
            vals, idx = gates.topk(k, dim=-1)  # [G,S,k]
            choice = F.one_hot(idx, E).permute(0, 2, 1, 3).reshape(G, k * S, E)  # choice-major order
            pos = (torch.cumsum(choice, dim=1) - 1).view(G, k, S, E).permute(0, 2, 1, 3)  # [G,S,k,E]
            choice = choice.view(G, k, S, E).permute(0, 2, 1, 3)
            slot = (pos * choice).sum(-1)  # [G,S,k]
            kept = (slot < C).to(gates.dtype)
            dispatch = gates.new_zeros(G, S, E, C)
            combine = gates.new_zeros(G, S, E, C)
            for j in range(k):
                oh = F.one_hot(idx[..., j], E).to(gates.dtype)[..., None] * F.one_hot(
                    slot[..., j].clamp(max=C - 1), C
                ).to(gates.dtype)[..., None, :]
                dispatch = dispatch + oh * kept[..., j, None, None]
                combine = combine + oh * (kept[..., j] * vals[..., j])[..., None, None]
            importance = gates.sum(1)
            load = choice.sum((1, 2)).to(gates.dtype)
            cv2 = lambda v: (v.var(-1, unbiased=False) / v.mean(-1).pow(2).clamp_min(1e-9)).mean()
            aux = 0.5 * cv2(importance) + 0.5 * cv2(load)
        dt = compute_dtype(x)
        xe = torch.einsum("gsec,gsm->egcm", dispatch.to(dt), xg.to(dt)).reshape(E, G * C, H)
        h = gelu(torch.baddbmm(self.b1, xe, self.w1))
        ye = torch.baddbmm(self.b2, h, self.w2).view(E, G, C, H)
        y = torch.einsum("gsec,egcm->gsm", combine.to(ye.dtype), ye)
        return y.reshape(T, H), aux


class GeluExperts(nn.Module):
    """torchtitan's inner-experts interface (x_RD sorted by expert, tokens per expert),
    its weight layout [E, F, D], two GEMMs with GELU instead of three with SwiGLU."""

    def __init__(self, H, E, grouped):
        super().__init__()
        self.grouped = grouped
        self.w1 = nn.Parameter(torch.randn(E, 4 * H, H) * H**-0.5)
        self.w2 = nn.Parameter(torch.randn(E, H, 4 * H) * (4 * H) ** -0.5)

    def forward(self, x, counts):
        dt = compute_dtype(x)
        if self.grouped:
            offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
            h = gelu(torch._grouped_mm(x.to(dt), self.w1.to(dt).transpose(-2, -1), offs=offs))
            return torch._grouped_mm(h, self.w2.to(dt).transpose(-2, -1), offs=offs).type_as(x)
        outs = []
        for i, xi in enumerate(torch.split(x, counts.tolist(), dim=0)):
            outs.append(torch.matmul(gelu(torch.matmul(xi, self.w1[i].transpose(-2, -1))), self.w2[i].transpose(-2, -1)))
        return torch.cat(outs).type_as(x)


class Titan(nn.Module):
    def __init__(self, H, E, k, experts):
        super().__init__()
        from torchtitan.models.common.linear import Linear
        from torchtitan.models.common.moe import MoE, GroupedExperts, RoutedExperts, TokenChoiceTopKRouter
        from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

        F_ = H * 4 if experts != "shipped" else int(math.ceil(8 * H / 3 / 16)) * 16
        cfg = MoE.Config(
            num_experts=E,
            routed_experts=RoutedExperts.Config(
                inner_experts=GroupedExperts.Config(dim=H, hidden_dim=F_, num_experts=E),
                token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=k),
            ),
            router=TokenChoiceTopKRouter.Config(
                num_experts=E, gate=Linear.Config(in_features=H, out_features=E), top_k=k, score_func="softmax"
            ),
            load_balance_coeff=None,
        )
        self.moe = cfg.build()
        for p in self.moe.parameters():  # torchtitan allocates with torch.empty and initialises later
            nn.init.normal_(p, std=0.02)
        if experts != "shipped":
            self.moe.routed_experts.inner_experts = GeluExperts(H, E, grouped=experts == "grouped")

    def forward(self, x):
        return self.moe(x.unsqueeze(0)).squeeze(0), x.new_zeros(())


class DeepSpeed(nn.Module):
    def __init__(self, H, E, k):
        super().__init__()
        from deepspeed.moe.layer import MoE

        expert = nn.Sequential(nn.Linear(H, 4 * H), nn.GELU(approximate="tanh"), nn.Linear(4 * H, H))
        self.moe = MoE(hidden_size=H, expert=expert, num_experts=E, ep_size=1, k=k, capacity_factor=1.25,
                       eval_capacity_factor=1.25, min_capacity=4, drop_tokens=True)

    def forward(self, x):
        y, aux, _ = self.moe(x.unsqueeze(0))
        return y.squeeze(0), aux


def build(impl, H, E, k):
    if impl == "einsum":
        return Einsum(H, E, k)
    if impl.startswith("titan_"):
        return Titan(H, E, k, impl[len("titan_"):])
    if impl == "deepspeed":
        return DeepSpeed(H, E, k)
    raise SystemExit(f"peer_moe.py: unknown --impl {impl}")


def time_it(f, reps, dev):
    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    f()
    out = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    T, H, E, k = a.tokens, a.hidden, a.experts, a.k
    amp = a.precision == "bf16"
    layer = build(a.impl, H, E, k).to(dev).train()
    x = torch.randn(T, H, device=dev, requires_grad=True)

    def moe_step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            y, aux = layer(x)
        (y.float().sum() + aux.float()).backward()

    xd = torch.randn(k * T, H, device=dev, requires_grad=True)
    w1 = torch.randn(H, 4 * H, device=dev, requires_grad=True)
    w2 = torch.randn(4 * H, H, device=dev, requires_grad=True)

    def dense_step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            yd = torch.mm(gelu(torch.mm(xd, w1)), w2)
        yd.float().sum().backward()

    m = time_it(moe_step, a.repeat, dev)
    d = time_it(dense_step, a.repeat, dev)
    row = {"impl": a.impl, "tokens": T, "hidden": H, "experts": E, "k": k, "precision": a.precision,
           "device": str(dev), "threads": torch.get_num_threads(), "moe_s": statistics.median(m),
           "moe_spread": (max(m) - min(m)) / statistics.median(m), "dense_s": statistics.median(d)}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
