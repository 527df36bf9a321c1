// Pruning a fine-tuned model as one library call: calibrate on the calibration
// split, score every expert by the criterion, make the plan (every rank agrees
// on it by hash), prune with survivors staying on their ranks, measure their loads,
// rebalance, and evaluate before and after. Knows nothing of checkpoints or files:
// the pipeline (src/pipeline) gives the inputs and stores what comes out.
#pragma once
#include <map>
#include <optional>
#include <vector>

#include "core/config.h"
#include "data/loader.h"
#include "dist/world.h"
#include "prune/plan.h"
#include "prune/rebalance.h"
#include "prune/router_history.h"
#include "train/evaluator.h"

namespace moeprune {

struct PruneInputs {
  VisionTransformer model{nullptr};     // the fine-tuned model; released once pruned
  std::vector<ParamSlot> slots;         // its optimiser state, carried with the surviving experts
  const RouterHistory* history = nullptr;  // reference routers (router_norm_change, router_delta)
  ShardedLoader* calibration = nullptr;    // evaluation loader over prune.calibration.split
  ShardedLoader* test = nullptr;           // evaluation loader over the test split
};

struct ModelFigures {
  int64_t params = 0;                  // all parameters of the model (every expert counted once)
  int64_t max_rank_bytes = 0;          // largest parameter bytes held by one rank
  double expert_flops_per_token = 0;   // per MoE layer, measured (kept choices / tokens)
};

// prune.ratio: auto: each candidate ratio evaluated by masking the unpruned model.
struct AutoRatioPoint {
  double ratio = 0;
  int pruned = 0;           // experts the candidate's plan prunes
  double accuracy = 0;      // on the calibration split, masked
};
struct AutoRatio {
  double max_accuracy_drop = 0;  // points
  double baseline = 0;           // unpruned accuracy on the calibration split
  std::vector<AutoRatioPoint> points;
  double chosen = 0;             // the largest ratio within the budget (0: none was)
};

struct PruneOutcome {
  PrunePlan plan;
  std::optional<AutoRatio> auto_ratio;  // set when prune.ratio is auto
  Migration pruned;                     // the pruned, rebalanced model and its optimiser state
  std::vector<Placement> placements;    // of the pruned model
  EvalResult before, after;             // on the test split
  // What the experts contribute: the unpruned model on the test split with every
  // expert's output zeroed (zero routing with no expert kept: each MoE layer adds 0).
  EvalResult experts_zeroed;
  RoutingStats calibration_load;        // per block, before pruning (slot order)
  std::map<int, std::vector<double>> router_norm_change;  // per block (id order), when the reference is known
  int64_t calibration_examples = 0;
  ModelFigures figures_before, figures_after;
  std::vector<double> imbalance_before, imbalance_after;  // per MoE layer, expected load max / mean
  int64_t bytes_moved = 0;              // expert bytes sent between ranks (pruning + rebalancing)
};

// Collective: masks the layers of `model` as `plan` would prune them (nullptr: unmask).
void mask_experts(VisionTransformer& model, const PrunePlan* plan);

// Collective.
PruneOutcome prune_job(PruneInputs in, const JobConfig& cfg, World& world);

}  // namespace moeprune
