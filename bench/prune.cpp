// moeprune-bench prune: inference images/s and expert memory of a fine-tuned model
// (a checkpoint) before and after pruning 50% of its experts by router_norm_change
// (global), with drop and zero routing, same run.
#include <cstdio>

#include "benches.h"
#include "ckpt/manifest.h"
#include "ckpt/reader.h"
#include "ckpt/store.h"
#include "core/error.h"
#include "harness.h"
#include "model/model_state.h"
#include "pipeline/job.h"
#include "prune/plan.h"
#include "prune/rebalance.h"
#include "prune/router_history.h"

namespace moeprune::bench {

int prune(World& world, const Options& o) {
  const JobConfig cfg = parse_config(o.config);
  const std::string dir = resolve_checkpoint(o.from);
  require(!dir.empty(), concat("bench prune: no checkpoint at '", o.from, "'"));
  const Manifest m = read_manifest(dir);
  VisionTransformer model = build_saved_model(cfg, m, world);
  const ModelConfig& mc = model->config();
  ModelState state(model);
  RouterHistory history;
  load_checkpoint(m, {&state, &history});
  const int64_t B = cfg.data.eval_batch_size / world.size();
  at::Tensor images = at::randn({B, mc.channels, mc.image_size, mc.image_size}).to(world.device());
  auto measure = [&](VisionTransformer& net) {
    net->eval();
    at::NoGradGuard ng;
    const Timing t = time_it(world, o.reps, [&] {
      ForwardContext ctx;
      net->forward(images, ctx);
    });
    int64_t bytes = 0;
    for (const auto& p : net->expert_parameters()) bytes += p.numel() * 4;
    at::Tensor b = at::tensor({bytes}, at::kLong);
    world.host_comm().all_reduce(b, ReduceOp::Sum);
    return std::pair{t, b.item<int64_t>()};
  };
  const auto [t0, mem0] = measure(model);
  const double ips0 = B * world.size() / t0.median;
  std::map<int, at::Tensor> now;
  std::map<int, std::vector<int>> ids;
  for (const auto& l : model->moe_layers()) {
    now[l->layer()] = layer_router_weights(*l);
    ids[l->layer()] = l->expert_ids();
  }
  if (world.rank() == 0) {
    std::printf("pruning benchmark: %s from %s, %d rank(s), batch %lld, median of %d\n", mc.name.c_str(), dir.c_str(),
                world.size(), static_cast<long long>(B * world.size()), o.reps);
    std::printf("  %-22s %12s %10s %14s %10s %8s  %s\n", "model", "images/s", "speed-up", "expert MiB", "memory",
                "spread", "target: speed-up >= 1.25x, memory <= 0.5x");
    std::printf("  %-22s %12.1f %10s %14.2f %10s %7.0f%%\n", "unpruned", ips0, "1.00x", mem0 / 1048576.0, "1.00x",
                100 * t0.spread());
  }
  json_row(world, "prune", {{"model", mc.name}, {"variant", "unpruned"}, {"images_per_s", ips0},
                            {"expert_bytes", mem0}, {"forward_spread", t0.spread()}});
  for (PrunedRouting routing : {PrunedRouting::Drop, PrunedRouting::Zero}) {
    PruneConfig pc = cfg.prune;
    pc.ratio = 0.5;
    pc.routing = routing;
    const PrunePlan plan = make_plan(
        expert_scores(Criterion::RouterNormChange, history.reference(), now, {}, ids, cfg.seed), pc, mc.moe.top_k);
    std::vector<Placement> pl;
    for (const auto& lp : plan.layers)
      pl.push_back(Placement::contiguous(static_cast<int>(lp.kept.size()), world.size(), true));
    Migration mg = apply_plan(model, {}, plan, pl, world.comms(), 0);
    const auto [t, mem] = measure(mg.model);
    const double ips = B * world.size() / t.median;
    const bool met = ips / ips0 >= 1.25 && static_cast<double>(mem) / mem0 <= 0.5 + 1e-9;
    if (world.rank() == 0)
      std::printf("  %-22s %12.1f %9.2fx %14.2f %9.2fx %7.0f%%  %s\n", concat("pruned 50%, ", name_of(routing)).c_str(),
                  ips, ips / ips0, mem / 1048576.0, static_cast<double>(mem) / mem0, 100 * t.spread(),
                  verdict(true, met));
    json_row(world, "prune", {{"model", mc.name}, {"variant", concat("pruned_50_", name_of(routing))},
                              {"images_per_s", ips}, {"speedup", ips / ips0}, {"expert_bytes", mem},
                              {"memory_ratio", static_cast<double>(mem) / mem0}, {"forward_spread", t.spread()}});
  }
  return 0;
}

}  // namespace moeprune::bench
