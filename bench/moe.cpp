// moeprune-bench moe: one MoE layer forward+backward (routing, dispatch, experts,
// combine) against dense GEMMs doing the same expert FLOPs (the two expert GEMMs
// on all k*tokens rows at once, no routing, same precision), same run.
#include <cstdio>
#include <string>

#include "benches.h"
#include "core/error.h"
#include "core/precision.h"
#include "harness.h"
#include "model/moe_layer.h"

namespace moeprune::bench {
namespace {
std::string fixed2(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}
}  // namespace

int moe(World& world, const Options& o) {
  const c10::Device dev = world.device();
  const Precision precision =
      o.precision.empty() ? (dev.is_cuda() ? Precision::Bf16 : Precision::Fp32) : parse_choice<Precision>(o.precision, "--precision");
  const JobConfig cfg = parse_config(o.config);  // its runtime: section (dispatcher, expert GEMM)
  if (world.rank() == 0) {
    std::printf("MoE layer forward+backward, %d rank(s) on %s, %s, %d threads per rank, dispatcher %s, expert GEMM %s;\n"
                "'dense' = the two expert GEMMs on all k*tokens rows at once (same FLOPs, no routing), median of %d\n",
                world.size(), dev.str().c_str(), str(precision).c_str(), at::get_num_threads(),
                str(cfg.runtime.moe.dispatcher).c_str(), str(cfg.runtime.moe.expert_gemm).c_str(), o.reps);
    std::printf("  %7s %6s %4s %2s %12s %12s %10s %10s %8s  %s\n", "tokens", "hidden", "E", "k", "moe ms", "dense ms",
                "ratio", "ktok/s", "spread", dev.is_cuda() ? "target <= 1.3 (hidden 768, 16k tokens)" : "target <= 1.3 (hidden 768)");
  }
  for (int64_t tokens : {4096, 16384})
    for (int hidden : {128, 768})
      for (int E : {8, 32})
        for (int k : {1, 2}) {
          if (E < world.size()) continue;
          if ((o.hidden && hidden != o.hidden) || (o.experts && E != o.experts) || (o.tokens && tokens != o.tokens) ||
              (o.top_k && k != o.top_k))
            continue;
          ModelConfig mc;
          mc.hidden = hidden;
          mc.mlp_dim = 4 * hidden;
          mc.num_heads = 1;
          mc.moe.num_experts = E;
          mc.moe.top_k = k;
          mc.moe.group_size = 1024;  // images of one token: groups of 1024 tokens
          mc.moe.capacity_factor = 1.25;
          at::manual_seed(0);
          MoeLayer layer(mc, 1, Placement::contiguous(E, world.size()), world.comm(), 0, cfg.runtime.moe);
          layer->to(dev);
          const int64_t local = tokens / world.size();
          const auto opt = at::TensorOptions().device(dev);
          at::Tensor x = at::randn({local, 1, hidden}, opt).requires_grad_(true);
          at::Tensor w1 = at::randn({hidden, 4 * hidden}, opt).requires_grad_(true);
          at::Tensor w2 = at::randn({4 * hidden, hidden}, opt).requires_grad_(true);
          at::Tensor xd = at::randn({local * k, hidden}, opt).requires_grad_(true);
          const auto moe_step = [&] {
            ForwardContext ctx;
            ctx.in.train = true;
            ctx.in.total_groups = tokens / 1024;
            ctx.in.first_group = world.rank() * local / 1024;
            at::Tensor y;
            {
              AutocastGuard amp(dev, precision);
              y = layer->forward(x, ctx);
            }
            (y.to(at::kFloat).sum() + ctx.aux_loss).backward();
          };
          const Timing m = time_it(world, o.reps, moe_step);
          if (!o.profile.empty())
            profile_to(world, concat(o.profile, "-t", tokens, "-h", hidden, "-e", E, "-k", k, ".json"), 3, moe_step);
          const Timing d = time_it(world, o.reps, [&] {
            at::Tensor yd;
            {
              AutocastGuard amp(dev, precision);
              yd = at::mm(at::gelu(at::mm(xd, w1), "tanh"), w2);
            }
            yd.to(at::kFloat).sum().backward();
          });
          if (o.chunks > 1) {
            // The overlapped exchange against the config's setting, alternating rounds
            // so that the machine's drift hits both alike.
            MoeRuntime one = cfg.runtime.moe, piped = cfg.runtime.moe;
            piped.dispatch_chunks = o.chunks;
            std::string a, b;
            for (int round = 0; round < 3; ++round) {
              layer->set_runtime(one);
              a += concat(round ? " / " : "", fixed2(1e3 * time_it(world, o.reps, moe_step).median));
              layer->set_runtime(piped);
              b += concat(round ? " / " : "", fixed2(1e3 * time_it(world, o.reps, moe_step).median));
            }
            layer->set_runtime(one);
            if (world.rank() == 0)
              std::printf("      dispatch_chunks %d: %s ms; %d: %s ms (3 alternating rounds)\n",
                          cfg.runtime.moe.dispatch_chunks, a.c_str(), o.chunks, b.c_str());
          }
          const double ratio = m.median / d.median;
          const bool targeted = hidden == 768 && (!dev.is_cuda() || tokens == 16384);
          if (world.rank() == 0)
            std::printf("  %7lld %6d %4d %2d %12.2f %12.2f %10.2f %10.2f %7.0f%%  %s\n", static_cast<long long>(tokens),
                        hidden, E, k, 1e3 * m.median, 1e3 * d.median, ratio, tokens / m.median / 1e3,
                        100 * std::max(m.spread(), d.spread()), verdict(targeted, ratio <= 1.3));
          nlohmann::json row = {{"precision", str(precision)}, {"dispatcher", str(cfg.runtime.moe.dispatcher)},
                                {"expert_gemm", str(cfg.runtime.moe.expert_gemm)}, {"tokens", tokens},
                                {"hidden", hidden}, {"experts", E}, {"k", k}, {"ratio", ratio},
                                {"tokens_per_s", tokens / m.median}};
          row.update(timing_json("moe", m));
          row.update(timing_json("dense", d));
          json_row(world, "moe", row);
        }
  return 0;
}

}  // namespace moeprune::bench
