// The optimisation loop of one training phase (pretrain, finetune, refinetune),
// read top to bottom: per step, micro-batches forward + backward (all-to-alls
// inside the MoE layers), dense gradients summed over ranks, expert gradients
// local, clipping, update, metrics; periodic validation; validation and test at
// the end. Router history, checkpoints and preemption attach through TrainHooks
// (src/prune and src/pipeline are above this module).
#pragma once
#include <functional>
#include <map>
#include <string>

#include "core/config.h"
#include "core/phase.h"
#include "data/loader.h"
#include "dist/world.h"
#include "model/vit.h"
#include "train/evaluator.h"
#include "train/metrics.h"
#include "train/optimizer.h"

namespace moeprune {

struct TrainHooks {
  // After every optimiser step with that step's routing statistics of this rank.
  std::function<void(int64_t step, const RoutingStats&)> on_step;
  // Every history_every steps and after the last step (collective).
  std::function<void(int64_t step)> on_history;
  // After every step, on every rank (collective: checkpointing, preemption).
  // Returning true stops the phase after this step.
  std::function<bool(int64_t step)> after_step;
};

struct PhaseResult {
  EvalResult val, test;
  double images_per_s = 0;      // training throughput over the phase
  double train_loss = 0;        // mean over the last logging window
  int64_t steps = 0;               // the step the phase ended at
  double seconds = 0;
  bool stopped = false;            // after_step asked to stop before the last step
};

class Trainer {
 public:
  // settings: the phase's section (phase_config(job, phase), or a test's own).
  Trainer(Comms comms, const JobConfig& job, const PhaseConfig& settings, Phase phase, VisionTransformer& model,
          MetricsSink& metrics);
  // Runs the phase from start_step. A resumed phase (start_step > 0) has its
  // optimiser state and the train loader's position loaded already (checkpoint
  // state owners). test may be null. A stopped phase skips the final evaluation.
  PhaseResult run(ShardedLoader& train, ShardedLoader& val, ShardedLoader* test, const TrainHooks& hooks = {},
                  int64_t start_step = 0);
  Optimizer& optimizer() { return opt_; }

 private:
  Comms comms_;
  const JobConfig& job_;
  PhaseConfig phase_;
  Phase phase_id_;
  std::string name_;
  VisionTransformer& model_;
  MetricsSink& metrics_;
  Optimizer opt_;
};

// Named parameters of the model as optimiser slots (experts marked).
std::vector<ParamSlot> param_slots(const VisionTransformer& model);

}  // namespace moeprune
