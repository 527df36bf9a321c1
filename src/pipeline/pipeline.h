// The job as phases run top to bottom (core/phase.h has the table):
//   [pretrain] -> finetune -> prune (calibrate, plan, prune, rebalance, evaluate) -> [refinetune]
// Every phase writes the checkpoints that make it resumable, on any number of
// ranks. Phases that run in the same process hand the model, its optimiser state,
// the router history and the pruning outcome to the next one in memory; a phase
// reads its input from disk only when it starts the process (resume, or a
// single-phase command).
#pragma once
#include <string>
#include <vector>

#include "core/config.h"
#include "core/phase.h"
#include "dist/world.h"

namespace moeprune {

struct RunOptions {
  // "" or "none": start each phase fresh; "auto": continue from the latest
  // checkpoint (a phase's own unfinished one, or the input the phase needs); a
  // directory: resume that checkpoint (one training phase only).
  std::string resume;
  std::string prune_from;         // prune: a fine-tuning checkpoint or root ("" = checkpoint.dir)
  bool reuse_pretrained = false;  // pretrain: keep pretrained.safetensors made with the same settings
};

class Pipeline {
 public:
  Pipeline(World& world, const JobConfig& cfg) : world_(world), cfg_(cfg) {}
  // Runs `phases` in order; returns kExitOk, or kExitPreempted when a signal
  // stopped a phase (its checkpoint is saved).
  int run(const std::vector<Phase>& phases, const RunOptions& opts);
  // `moeprune run`: the config's phases (job_phases); with resume auto, from the
  // phase and step of the latest checkpoint.
  int run_job(const std::string& resume);

 private:
  World& world_;
  const JobConfig& cfg_;
};

}  // namespace moeprune
