// Re-placing experts across ranks after pruning, and applying a plan to a running
// job: the pruned model is rebuilt with the surviving experts, which move (with
// their optimiser state) to their new ranks by one all-to-all per layer.
#pragma once
#include <vector>

#include "dist/world.h"
#include "model/vit.h"
#include "prune/plan.h"
#include "train/optimizer.h"

namespace moeprune {

// A placement of n experts with expected loads on W ranks: every rank holds
// floor(n/W) or ceil(n/W) experts (even memory); the largest per-rank load is
// minimised (longest-processing-time first, then pairwise swaps while they lower
// the larger of the two ranks' loads); the resulting groups go to the ranks that
// already hold most of their experts (greedy), so few bytes move.
// current_rank[i]: where expert i is now (-1: nowhere). Returns the new rank of each.
std::vector<int> balanced_placement(const std::vector<double>& loads, const std::vector<int>& current_rank, int W);

// max over ranks of the summed expected load / mean over ranks.
double load_imbalance(const std::vector<double>& loads, const std::vector<int>& rank, int W);
// The same with replicas: ranks[i] holds a copy of expert i each, and an expert's
// load is split evenly among its copies (the split rule of MoeLayer, on average).
double load_imbalance(const std::vector<double>& loads, const std::vector<std::vector<int>>& ranks, int W);

// Hot-expert replicas (prune.replicate): starting from balanced_placement(), adds
// a copy of the expert with the largest load per copy, one at a time, and packs the
// copies again (largest load per copy first, each to the least loaded rank with
// room that holds no copy of that expert yet); a packing is kept when it lowers the
// largest rank load. Stops when the imbalance is at most `target`, no expert can get
// another copy, or every rank holds `max_copies` copies of this layer. Returns the
// ranks of each expert's copies, primary first (the expert's current rank when it
// is one of them, so fewer bytes move). Without replicas the result is
// balanced_placement()'s.
std::vector<std::vector<int>> replicated_placement(const std::vector<double>& loads,
                                                   const std::vector<int>& current_rank, int W, int max_copies,
                                                   double target);

// Expert copies one rank may hold in a MoE layer with `survivors` experts on W
// ranks when replicas are added: with memory_mb = 0 the copies the layer held per
// rank before pruning (ceil(experts_before / W): the memory pruning freed), else
// ceil(survivors / W) plus the copies that memory_mb / moe_layers MiB holds (an
// expert copy costs expert_copy_bytes(); the config check refuses a bound that
// holds none).
int replica_copies_per_rank(int experts_before, int survivors, int W, double memory_mb, int moe_layers, int hidden,
                            int mlp_dim);

struct Migration {
  VisionTransformer model{nullptr};
  std::vector<ParamSlot> slots;   // optimiser state carried over (same order as model parameters)
  int64_t bytes_moved = 0;        // expert bytes (weights + optimiser state) sent between ranks, all ranks
};

// Collective. Builds the pruned model (pruned_config(old config, plan)) with the
// given placements (one per MoE block, over the kept experts in id order) and fills
// it: dense parameters copied (router columns of pruned experts dropped in "drop"
// routing), surviving experts and their optimiser state moved to their new ranks
// (from the rank of their primary copy to every rank of a copy: replicas start
// identical, optimiser state included).
// old_slots may be empty (no optimiser state). Pruned experts are not kept anywhere.
Migration apply_plan(const VisionTransformer& old_model, const std::vector<ParamSlot>& old_slots,
                     const PrunePlan& plan, const std::vector<Placement>& placements, Comms comms, uint64_t seed);

// Collective. The same model (same experts) with new placements: experts and their
// optimiser state move; the maths does not change (placement invariance).
Migration replace_experts(const VisionTransformer& model, const std::vector<ParamSlot>& slots,
                          const std::vector<Placement>& placements, Comms comms, uint64_t seed);

}  // namespace moeprune
