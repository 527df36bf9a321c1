// Which experts to prune: importance scores per expert from a criterion, and a
// plan from the scores (scope, target, constraints). Everything here is computed
// from data every rank holds identically (replicated router weights, calibration
// counts summed over ranks), and plan_agreement() checks that before it is applied.
//
// Criteria (higher score = more important; the lowest are pruned):
//   router_norm_change  ||w_ft[:,e]|| - ||w_pre[:,e]||   Chowdhury et al., ICML 2024
//   router_delta        ||w_ft[:,e] - w_pre[:,e]||
//   heavy_hitter        top-k assignments on the calibration set   SEER-MoE (Muzio et al. 2024)
//   soft_count          sum of router probabilities on the calibration set   SEER-MoE
//   random              seeded uniform scores (baseline)
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

#include "core/config.h"
#include "dist/communicator.h"
#include "model/layer_stats.h"

namespace moeprune {

struct LayerScores {
  int block = 0;
  std::vector<int> ids;        // original expert ids of the layer (slot order)
  std::vector<double> scores;  // one per id
};

// reference / current: [hidden, E] router matrices per block (columns in id order);
// calibration: counts per block (slot order). UserError when the criterion's input is missing.
std::vector<LayerScores> expert_scores(Criterion criterion, const std::map<int, at::Tensor>& reference,
                                       const std::map<int, at::Tensor>& current, const RoutingStats& calibration,
                                       const std::map<int, std::vector<int>>& ids, uint64_t seed);

struct LayerPlan {
  int block = 0;
  std::vector<int> kept, pruned;  // original ids, ascending
  std::vector<double> scores;     // of the layer's experts before pruning (slot order)
  std::vector<double> normalized; // what was ranked (z-scores in global scope)
};

struct PrunePlan {
  Criterion criterion = Criterion::RouterNormChange;
  PruneScope scope = PruneScope::Global;
  PrunedRouting routing = PrunedRouting::Drop;
  std::vector<LayerPlan> layers;
  // FNV-1a over (block, kept ids, routing): equal plans have equal hashes.
  uint64_t hash() const;
  int total_pruned() const;
};

// per_layer: prune round(ratio * E_l) (or `count`) of each eligible layer.
// global: rank the per-layer z-scores ((s - mean_l) / std_l) of all eligible experts
// together and prune round(ratio * total) (or `count`) of them. Every layer keeps at
// least max(top_k, min_experts). UserError when the target cannot be met.
PrunePlan make_plan(const std::vector<LayerScores>& scores, const PruneConfig& cfg, int top_k);

// Collective: throws (on every rank) unless every rank holds the same plan.
void plan_agreement(const PrunePlan& plan, Communicator& host);

// The model config of the pruned model.
ModelConfig pruned_config(const ModelConfig& cfg, const PrunePlan& plan);

}  // namespace moeprune
