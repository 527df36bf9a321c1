#include "prune/prune_job.h"

#include <algorithm>
#include <map>

#include "core/error.h"
#include "core/log.h"

namespace moeprune {
namespace {

// host: an expert-parallel group (each expert counted once).
ModelFigures figures(const VisionTransformer& model, const RoutingStats& load, Communicator& host) {
  ModelFigures f;
  int64_t dense = 0, local_expert = 0;
  for (const auto& item : model->named_parameters()) {
    if (!is_expert_param(item.key())) dense += item.value().numel();
    else local_expert += item.value().numel();
  }
  at::Tensor t = at::tensor({local_expert}, at::kLong);
  host.all_reduce(t, ReduceOp::Sum);
  f.params = dense + t.item<int64_t>();
  at::Tensor mx = at::tensor({(dense + local_expert) * 4}, at::kLong);
  host.all_reduce(mx, ReduceOp::Max);
  f.max_rank_bytes = mx.item<int64_t>();
  f.expert_flops_per_token = expert_flops_per_token(model->config(), load);
  return f;
}

// Where each of `ids` lives now in `layer` (-1: not in the layer).
std::vector<int> current_ranks(const MoeLayerImpl& layer, const std::vector<int>& ids) {
  std::vector<int> out;
  for (int id : ids) {
    const auto& all = layer.expert_ids();
    const auto it = std::find(all.begin(), all.end(), id);
    out.push_back(it == all.end() ? -1 : layer.placement().rank_of(static_cast<int>(it - all.begin())));
  }
  return out;
}

// A model evaluated as `plan` would prune it for as long as this lives (also when
// the evaluation throws).
class Masked {
 public:
  Masked(VisionTransformer& model, const PrunePlan& plan) : model_(model) { mask_experts(model_, &plan); }
  ~Masked() { mask_experts(model_, nullptr); }
  Masked(const Masked&) = delete;
  Masked& operator=(const Masked&) = delete;

 private:
  VisionTransformer& model_;
};

// prune.ratio: auto. Candidates step, 2*step, ... until the plan cannot be made (the
// floor), each evaluated by masking; the largest within the budget is chosen.
AutoRatio choose_ratio(VisionTransformer& model, const std::vector<LayerScores>& scores, const PruneConfig& pc,
                       int top_k, const EvalResult& baseline, ShardedLoader& calibration, const Comms& comms) {
  AutoRatio a;
  a.max_accuracy_drop = pc.max_accuracy_drop;
  a.baseline = baseline.accuracy;
  std::map<uint64_t, double> seen;  // plan hash -> accuracy: ratios that prune the same experts
  PruneConfig c = pc;
  for (int i = 1; i * pc.auto_step < 1.0 - 1e-9; ++i) {
    c.ratio = i * pc.auto_step;
    PrunePlan plan;
    try {
      plan = make_plan(scores, c, top_k);
    } catch (const UserError&) {
      break;  // past the floor: every larger ratio is too
    }
    AutoRatioPoint pt{c.ratio, plan.total_pruned(), 0};
    if (auto it = seen.find(plan.hash()); it != seen.end()) {
      pt.accuracy = it->second;
    } else {
      const Masked masked(model, plan);
      pt.accuracy = evaluate(model, calibration, comms, pc.calibration.batches).accuracy;
      seen[plan.hash()] = pt.accuracy;
    }
    const bool ok = 100 * (a.baseline - pt.accuracy) <= pc.max_accuracy_drop + 1e-9;
    log::info(concat("prune: ratio auto: ", c.ratio, " (", pt.pruned, " experts) ", calibration.split().name,
                     " accuracy ", pt.accuracy, " (", 100 * (pt.accuracy - a.baseline), " pt)",
                     ok ? "" : concat(": more than ", pc.max_accuracy_drop, " pt below unpruned")));
    if (ok) a.chosen = c.ratio;
    a.points.push_back(pt);
  }
  return a;
}

}  // namespace

void mask_experts(VisionTransformer& model, const PrunePlan* plan) {
  for (MoeLayer l : model->moe_layers()) {
    const LayerPlan* lp = nullptr;
    if (plan)
      for (const auto& x : plan->layers)
        if (x.block == l->layer()) lp = &x;
    l->set_expert_mask(lp ? &lp->kept : nullptr, plan ? plan->routing : PrunedRouting::Drop);
  }
}

PruneOutcome prune_job(PruneInputs in, const JobConfig& cfg, World& world) {
  const PruneConfig& pc = cfg.prune;
  const Comms comms = world.comms();
  const int top_k = in.model->config().moe.top_k;
  PruneOutcome out;

  // 0. Whether the ratio or count can be met at all depends only on the layers' expert
  // counts and the floor: refuse an impossible one before evaluating anything.
  if (!pc.ratio_auto) world.agree([&] {
    std::vector<LayerScores> shapes;
    for (const auto& l : in.model->moe_layers())
      shapes.push_back(LayerScores{l->layer(), l->expert_ids(), std::vector<double>(l->expert_ids().size(), 0.0)});
    (void)make_plan(shapes, pc, top_k);
  });

  // 1. Before pruning: accuracy and calibration counts.
  out.before = evaluate(in.model, *in.test, comms);
  const EvalResult cal = evaluate(in.model, *in.calibration, comms, pc.calibration.batches);
  require(cal.count > 0, concat("prune: the calibration split '", name_of(pc.calibration.split), "' is empty"));
  out.calibration_examples = cal.count;
  log::info(concat("prune: test accuracy before pruning ", out.before.accuracy, "; calibrated on ", cal.count,
                   " examples of ", in.calibration->split().name));
  out.figures_before = figures(in.model, out.before.load, comms.ep_h());
  out.calibration_load = cal.load;
  {
    PrunePlan none;  // zero routing keeping no expert: every MoE layer's output is 0
    none.routing = PrunedRouting::Zero;
    for (const auto& l : in.model->moe_layers()) none.layers.push_back(LayerPlan{l->layer(), {}, l->expert_ids(), {}, {}});
    {
      const Masked masked(in.model, none);
      out.experts_zeroed = evaluate(in.model, *in.test, comms);
    }
    log::info(concat("prune: test accuracy with every expert's output zeroed ", out.experts_zeroed.accuracy,
                     " (what the experts contribute: ", 100 * (out.before.accuracy - out.experts_zeroed.accuracy),
                     " pt)"));
  }

  // 2. Scores, plan, agreement.
  std::map<int, at::Tensor> current;
  std::map<int, std::vector<int>> ids;
  for (const auto& l : in.model->moe_layers()) {
    current[l->layer()] = layer_router_weights(*l);
    ids[l->layer()] = l->expert_ids();
  }
  static const RouterHistory kNoHistory;
  const RouterHistory& history = in.history ? *in.history : kNoHistory;
  PruneConfig chosen = pc;
  world.agree([&] {
    const auto scores = expert_scores(pc.criterion, history.reference(), current, cal.load, ids, cfg.seed);
    if (!history.reference().empty())  // for the report; the scores themselves when that is the criterion
      for (const auto& ls : pc.criterion == Criterion::RouterNormChange
                                ? scores
                                : expert_scores(Criterion::RouterNormChange, history.reference(), current, cal.load,
                                                ids, cfg.seed))
        out.router_norm_change[ls.block] = ls.scores;
    if (pc.ratio_auto) {
      out.auto_ratio = choose_ratio(in.model, scores, pc, top_k, cal, *in.calibration, comms);
      chosen.ratio = out.auto_ratio->chosen;
      log::info(concat("prune: ratio auto: chose ", chosen.ratio, ", the largest of ", out.auto_ratio->points.size(),
                       " candidates within ", pc.max_accuracy_drop, " pt of the unpruned ", cal.accuracy, " on ",
                       in.calibration->split().name));
    }
    out.plan = make_plan(scores, chosen, top_k);
  });
  plan_agreement(out.plan, world.host_comm());
  log::info(concat("prune: plan (", name_of(pc.criterion), ", ", name_of(pc.scope), ", ", name_of(pc.routing),
                   " routing) prunes ", out.plan.total_pruned(), " experts; agreed by all ranks (hash ",
                   out.plan.hash(), ")"));

  // 3. Apply with survivors staying where they are, then measure their loads.
  std::vector<Placement> stay;
  std::vector<int> experts_before;  // per MoE layer
  {
    const auto layers = in.model->moe_layers();  // released before the old model is
    for (size_t l = 0; l < layers.size(); ++l) {
      stay.push_back(Placement(current_ranks(*layers[l], out.plan.layers[l].kept), comms.ep_size()));
      experts_before.push_back(static_cast<int>(layers[l]->expert_ids().size()));
    }
  }
  out.pruned = apply_plan(in.model, in.slots, out.plan, stay, comms, cfg.seed);
  in.model = VisionTransformer(nullptr);  // frees the pruned experts and their state
  in.slots.clear();
  const EvalResult cal_after = evaluate(out.pruned.model, *in.calibration, comms, pc.calibration.batches);

  // 4. Rebalance by the measured loads (with replicas of the hottest experts when asked).
  const int N = comms.ep_size();
  const auto new_layers = out.pruned.model->moe_layers();
  for (size_t l = 0; l < new_layers.size(); ++l) {
    const MoeLayerImpl& layer = *new_layers[l];
    const LayerStats& s = cal_after.load.at(layer.layer());
    const std::vector<double> loads(s.kept.begin(), s.kept.end());  // expected tokens per expert slot
    const auto& cur = layer.placement().expert_rank();
    out.imbalance_before.push_back(load_imbalance(loads, cur, N));
    std::vector<std::vector<int>> ranks;
    if (pc.replicate) {
      const ModelConfig& mc = out.pruned.model->config();
      const int max_copies =
          replica_copies_per_rank(experts_before[l], static_cast<int>(loads.size()), N, pc.replica_memory_mb,
                                  static_cast<int>(new_layers.size()), mc.hidden, mc.mlp_dim);
      ranks = replicated_placement(loads, cur, N, max_copies, pc.replica_imbalance);
    } else {
      for (int r : pc.rebalance ? balanced_placement(loads, cur, N) : cur) ranks.push_back({r});
    }
    out.imbalance_after.push_back(load_imbalance(loads, ranks, N));
    out.placements.push_back(Placement(ranks, N));
  }
  out.bytes_moved = out.pruned.bytes_moved;
  if (pc.rebalance) {
    Migration moved = replace_experts(out.pruned.model, out.pruned.slots, out.placements, comms, cfg.seed);
    out.bytes_moved += moved.bytes_moved;
    out.pruned = std::move(moved);
  }
  out.after = evaluate(out.pruned.model, *in.test, comms);
  out.figures_after = figures(out.pruned.model, out.after.load, comms.ep_h());
  log::info(concat("prune: test accuracy after pruning ", out.after.accuracy));
  return out;
}

}  // namespace moeprune
