// The phases of the pipeline (internal to src/pipeline): what one phase hands to
// the next in the same process, and the two kinds of phase.
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "pipeline/job.h"
#include "pipeline/pipeline.h"
#include "prune/router_history.h"
#include "train/optimizer.h"

namespace moeprune {

// In-memory hand-over between phases. Empty (no model) when the phase before did
// not run in this process.
struct Carry {
  VisionTransformer model{nullptr};       // the model the last phase ended with
  std::vector<ParamSlot> optimizer;       // finetune -> prune: its optimiser state
  std::shared_ptr<RouterHistory> history;  // finetune -> prune
  std::string checkpoint;                  // the checkpoint the last phase saved
  JobProgress progress;                       // phases finished so far
};

// pretrain, finetune or refinetune. Returns kExitOk or kExitPreempted.
int run_training_phase(World& world, const JobConfig& cfg, Phase phase, const RunOptions& opts, Carry& carry);
// prune: calibrate, score, plan, prune, rebalance, evaluate; checkpoint and report.
int run_prune_phase(World& world, const JobConfig& cfg, const RunOptions& opts, Carry& carry);

}  // namespace moeprune
