#include "prune/plan.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "core/hash.h"

namespace moeprune {

std::vector<LayerScores> expert_scores(Criterion criterion, const std::map<int, at::Tensor>& reference,
                                       const std::map<int, at::Tensor>& current, const RoutingStats& calibration,
                                       const std::map<int, std::vector<int>>& ids, uint64_t seed) {
  std::vector<LayerScores> out;
  for (const auto& [block, layer_ids] : ids) {
    LayerScores ls;
    ls.block = block;
    ls.ids = layer_ids;
    const size_t E = layer_ids.size();
    switch (criterion) {
    case Criterion::RouterNormChange:
    case Criterion::RouterDelta: {
      require(reference.count(block) && current.count(block),
              concat("prune: criterion ", name_of(criterion), " needs the router weights from before fine-tuning for block ",
                     block, " (fine-tune with moeprune first: the checkpoint carries them)"));
      at::Tensor ref = reference.at(block).to(at::kCPU).to(at::kDouble);
      at::Tensor now = current.at(block).to(at::kCPU).to(at::kDouble);
      require(ref.sizes() == now.sizes() && static_cast<size_t>(now.size(1)) == E,
              concat("prune: block ", block, " router is ", now.sizes(), ", its reference ", ref.sizes(),
                     ", for ", E, " experts"));
      at::Tensor s = criterion == Criterion::RouterNormChange ? now.norm(2, {0}) - ref.norm(2, {0})
                                                             : (now - ref).norm(2, {0});
      ls.scores.assign(s.data_ptr<double>(), s.data_ptr<double>() + E);
      break;
    }
    case Criterion::HeavyHitter:
    case Criterion::SoftCount: {
      require(calibration.count(block), concat("prune: no calibration counts for block ", block));
      const LayerStats& st = calibration.at(block);
      require(st.assigned.size() == E, concat("prune: block ", block, " has ", st.assigned.size(),
                                              " calibration counts for ", E, " experts"));
      for (size_t e = 0; e < E; ++e)
        ls.scores.push_back(criterion == Criterion::HeavyHitter ? static_cast<double>(st.assigned[e]) : st.soft[e]);
      break;
    }
    case Criterion::Random: {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 1000003ULL + static_cast<uint64_t>(block));
      at::Tensor s = at::rand({static_cast<int64_t>(E)}, gen, at::kDouble);
      ls.scores.assign(s.data_ptr<double>(), s.data_ptr<double>() + E);
      break;
    }
    }
    out.push_back(std::move(ls));
  }
  return out;
}

uint64_t PrunePlan::hash() const {
  Fnv1a h;
  for (char c : name_of(routing)) h.add(static_cast<uint64_t>(c));
  for (const auto& l : layers) {
    h.add(static_cast<uint64_t>(l.block) + 0x1000);
    for (int id : l.kept) h.add(static_cast<uint64_t>(id));
  }
  return h.value();
}

int PrunePlan::total_pruned() const {
  int n = 0;
  for (const auto& l : layers) n += static_cast<int>(l.pruned.size());
  return n;
}

PrunePlan make_plan(const std::vector<LayerScores>& scores, const PruneConfig& cfg, int top_k) {
  PrunePlan plan;
  plan.criterion = cfg.criterion;
  plan.scope = cfg.scope;
  plan.routing = cfg.routing;
  const int floor_n = std::max(top_k, cfg.min_experts);
  auto eligible = [&](int block) {
    return cfg.layers.empty() || std::find(cfg.layers.begin(), cfg.layers.end(), block) != cfg.layers.end();
  };
  struct Cand {
    double key;
    size_t layer;
    size_t slot;
  };
  std::vector<Cand> cands;
  std::vector<int> prune_count(scores.size(), 0), cap(scores.size(), 0);
  int total = 0, total_cap = 0;
  for (size_t l = 0; l < scores.size(); ++l) {
    const LayerScores& ls = scores[l];
    LayerPlan lp;
    lp.block = ls.block;
    lp.scores = ls.scores;
    lp.normalized = ls.scores;
    const int E = static_cast<int>(ls.ids.size());
    if (eligible(ls.block)) {
      cap[l] = std::max(0, E - floor_n);
      total_cap += cap[l];
      total += E;
      if (cfg.scope == PruneScope::Global) {
        const double mean = std::accumulate(ls.scores.begin(), ls.scores.end(), 0.0) / E;
        double var = 0;
        for (double s : ls.scores) var += (s - mean) * (s - mean) / E;
        const double sd = std::sqrt(var);
        for (size_t e = 0; e < ls.scores.size(); ++e) lp.normalized[e] = sd > 0 ? (ls.scores[e] - mean) / sd : 0.0;
      }
      for (size_t e = 0; e < ls.scores.size(); ++e) cands.push_back({lp.normalized[e], l, e});
      if (cfg.scope == PruneScope::PerLayer) {
        const int want = cfg.count > 0 ? cfg.count : static_cast<int>(std::lround(cfg.ratio * E));
        require(want <= cap[l],
                concat("prune: pruning ", want, " of the ", E, " experts of MoE block ", ls.block, " (",
                       cfg.count > 0 ? concat("prune.count=", cfg.count) : concat("prune.ratio=", cfg.ratio),
                       ") would leave fewer than max(top_k=", top_k, ", prune.min_experts=", cfg.min_experts,
                       ") = ", floor_n, " experts; expected at most ", cap[l]));
        prune_count[l] = want;
      }
    }
    plan.layers.push_back(std::move(lp));
  }
  // Lowest first; ties broken by (layer, slot) so every rank orders alike.
  std::stable_sort(cands.begin(), cands.end(), [](const Cand& a, const Cand& b) {
    if (a.key != b.key) return a.key < b.key;
    if (a.layer != b.layer) return a.layer < b.layer;
    return a.slot < b.slot;
  });
  std::vector<std::vector<bool>> pruned(scores.size());
  for (size_t l = 0; l < scores.size(); ++l) pruned[l].assign(scores[l].ids.size(), false);
  if (cfg.scope == PruneScope::Global) {
    const int want = cfg.count > 0 ? cfg.count : static_cast<int>(std::lround(cfg.ratio * total));
    require(want <= total_cap,
            concat("prune: pruning ", want, " of the ", total, " eligible experts (",
                   cfg.count > 0 ? concat("prune.count=", cfg.count) : concat("prune.ratio=", cfg.ratio),
                   ") would leave some MoE layer with fewer than max(top_k=", top_k, ", prune.min_experts=",
                   cfg.min_experts, ") = ", floor_n, " experts; expected at most ", total_cap));
    int done = 0;
    for (const Cand& c : cands) {
      if (done == want) break;
      if (prune_count[c.layer] >= cap[c.layer]) continue;  // layer at its floor
      pruned[c.layer][c.slot] = true;
      ++prune_count[c.layer];
      ++done;
    }
  } else {
    std::vector<int> taken(scores.size(), 0);
    for (const Cand& c : cands)
      if (taken[c.layer] < prune_count[c.layer]) {
        pruned[c.layer][c.slot] = true;
        ++taken[c.layer];
      }
  }
  for (size_t l = 0; l < scores.size(); ++l)
    for (size_t e = 0; e < scores[l].ids.size(); ++e)
      (pruned[l][e] ? plan.layers[l].pruned : plan.layers[l].kept).push_back(scores[l].ids[e]);
  return plan;
}

void plan_agreement(const PrunePlan& plan, Communicator& host) {
  const auto h = static_cast<int64_t>(plan.hash() >> 1);
  at::Tensor lo = at::tensor({h}, at::kLong), hi = at::tensor({-h}, at::kLong);
  host.all_reduce(lo, ReduceOp::Max);
  host.all_reduce(hi, ReduceOp::Max);
  if (lo.item<int64_t>() != -hi.item<int64_t>())
    throw std::runtime_error(concat("prune: the ranks computed different pruning plans (hash ", h,
                                    " here); refusing to apply. Router weights or calibration counts differ "
                                    "between ranks."));
}

ModelConfig pruned_config(const ModelConfig& cfg, const PrunePlan& plan) {
  ModelConfig out = cfg;
  out.pruned_routing = plan.routing;
  for (const auto& l : plan.layers) out.kept_experts[l.block] = l.kept;
  return out;
}

}  // namespace moeprune
