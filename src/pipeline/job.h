// What every phase of a job needs from the job: where its outputs go, its data and
// loaders, how the model is built, the job's progress as a checkpoint state owner,
// and preemption signals.
#pragma once
#include <atomic>
#include <string>
#include <vector>

#include "ckpt/manifest.h"
#include "core/config.h"
#include "core/phase.h"
#include "core/state.h"
#include "data/loader.h"
#include "dist/world.h"
#include "model/vit.h"

namespace moeprune {

std::string pretrained_path(const JobConfig& cfg);  // <output.dir>/pretrained.safetensors
std::string finetuned_path(const JobConfig& cfg);   // <output.dir>/finetuned.safetensors
std::string history_path(const JobConfig& cfg);     // <output.dir>/router_history.json
std::string report_path(const JobConfig& cfg);      // <output.dir>/prune_report.json
std::string metrics_path(const JobConfig& cfg);     // <output.dir>/metrics.jsonl
std::string finetune_init(const JobConfig& cfg);    // finetune.init, or the pretrained model

struct PhaseData {
  Split train, val, test;
};
// The task's train / val / test splits of cfg.data (loads the data set). task_name:
// the config section of the task, for names and messages.
PhaseData phase_data(const JobConfig& cfg, const PhaseConfig& task, const std::string& task_name);
// Loader settings of this rank for a global batch. seed: the phase's seed (phase_seed()).
LoaderOptions loader_options(const JobConfig& cfg, const World& world, int64_t batch, bool train, uint64_t seed);
// The job's model: mc with these placements, seeded with the job seed, on this
// rank's device, computing as runtime: says. A model that cannot fit in the node's
// memory is refused first (one line on every rank): for training (weights,
// gradients, optimiser moments, activations of the largest micro-batch) or, with
// inference, for evaluation only (weights, activations of an evaluation batch).
VisionTransformer build_job_model(const JobConfig& cfg, const ModelConfig& mc, const std::vector<Placement>& placements,
                                  World& world, bool inference = false);
// The model a checkpoint holds (its `model` section: head, surviving experts),
// built for this job's world size, to load the checkpoint into.
VisionTransformer build_saved_model(const JobConfig& cfg, const Manifest& m, World& world, bool inference = false);

// The job's progress (section "progress"): which phases are finished, and torch's
// default CPU generator (everything else random is drawn from counters).
class JobProgress final : public StateOwner {
 public:
  std::vector<Phase> finished;
  bool is_finished(Phase p) const;
  void finish(Phase p);  // adds p once
  // The progress stored in a manifest section, without touching the generator.
  static JobProgress from_meta(const nlohmann::json& meta, const std::string& where);

  std::string state_key() const override { return "progress"; }
  void save_state(StateWriter& out) const override;
  void load_state(const StateReader& in) override;
};

// The signal (SIGTERM or SIGUSR1) that asked the job to stop, 0 while none did.
extern std::atomic<int> g_stop_signal;
// Routes SIGTERM and SIGUSR1 to g_stop_signal: training phases then save a
// checkpoint on every rank and the job exits with kExitPreempted.
void install_stop_signals();

}  // namespace moeprune
