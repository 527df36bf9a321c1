// moeprune-bench prune: inference images/s and expert memory of a fine-tuned model
// (a checkpoint) before and after pruning 50% of its experts by router_norm_change
// (global), with drop and zero routing, same run; then, for the drop-routed pruned
// model, each layer's expected load imbalance over the ranks (loads measured on the
// fine-tuning task's prune.calibration split, as the pruning phase measures them) with
// the survivors placed contiguously, rebalanced, and rebalanced with hot-expert replicas
// (prune.replicate with the config's replica settings; target <= 1.10).
#include <cstdio>

#include "benches.h"
#include "ckpt/manifest.h"
#include "ckpt/reader.h"
#include "ckpt/store.h"
#include "core/error.h"
#include "harness.h"
#include "model/model_state.h"
#include "pipeline/job.h"
#include "train/evaluator.h"
#include "prune/plan.h"
#include "prune/rebalance.h"
#include "prune/router_history.h"

namespace moeprune::bench {

namespace {
// The rebalancing table (see the top of the file) for a pruned model.
void imbalance(World& world, const JobConfig& cfg, VisionTransformer& model, const PrunePlan& plan) {
  const PruneConfig& pc = cfg.prune;
  const PhaseData d = phase_data(cfg, cfg.finetune, "finetune");
  const Split& split = pc.calibration.split == SplitPart::Train  ? d.train
                       : pc.calibration.split == SplitPart::Test ? d.test
                                                                 : d.val;
  ShardedLoader calib(split, loader_options(cfg, world, cfg.data.eval_batch_size, false, cfg.seed));
  const EvalResult r = evaluate(model, calib, world.comms(), pc.calibration.batches);
  const int N = world.ep_size();
  if (world.rank() == 0)
    std::printf("  expected load imbalance (max / mean over %d ranks) after pruning 50%%, drop routing, loads of %lld "
                "%s images:\n  %-6s %9s %10s %11s %14s %9s  %s\n",
                N, static_cast<long long>(r.count), str(pc.calibration.split).c_str(), "block", "survivors",
                "contiguous", "rebalanced", "with replicas", "replicas", "target: <= 1.10 with replicas");
  const auto layers = model->moe_layers();
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerStats& s = r.load.at(layers[l]->layer());
    const std::vector<double> loads(s.kept.begin(), s.kept.end());
    const std::vector<int>& cur = layers[l]->placement().expert_rank();
    const int before = static_cast<int>(plan.layers[l].kept.size() + plan.layers[l].pruned.size());
    const int max_copies = replica_copies_per_rank(before, static_cast<int>(loads.size()), N, pc.replica_memory_mb,
                                                   static_cast<int>(layers.size()), model->config().hidden,
                                                   model->config().mlp_dim);
    const auto rep = replicated_placement(loads, cur, N, max_copies, pc.replica_imbalance);
    int copies = 0;
    for (const auto& c : rep) copies += static_cast<int>(c.size()) - 1;
    const double in_place = load_imbalance(loads, cur, N);
    const double plain = load_imbalance(loads, balanced_placement(loads, cur, N), N);
    const double with = load_imbalance(loads, rep, N);
    if (world.rank() == 0)
      std::printf("  %-6d %9zu %10.3f %11.3f %14.3f %9d  %s\n", layers[l]->layer(), loads.size(), in_place, plain, with,
                  copies, verdict(true, with <= 1.10 + 1e-9));
    json_row(world, "prune_imbalance", {{"model", model->config().name}, {"block", layers[l]->layer()},
                                        {"survivors", loads.size()}, {"ranks", N}, {"contiguous", in_place},
                                        {"rebalanced", plain}, {"replicated", with}, {"replicas", copies}});
  }
}
}  // namespace

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
    if (routing == PrunedRouting::Drop) imbalance(world, cfg, mg.model, plan);
  }
  return 0;
}

}  // namespace moeprune::bench
