// Optimisers over named parameters: SGD with momentum (the V-MoE fine-tuning
// recipe) and AdamW; the learning-rate schedule (linear warmup, cosine decay to
// end_lr); gradient synchronisation and global-norm clipping for expert
// parallelism. Optimiser state lives beside each parameter and has the parameter's
// shape, so expert state can later be sliced, pruned and moved with its expert.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "core/config.h"
#include "core/state.h"
#include "dist/world.h"

namespace moeprune {

struct ParamSlot {
  std::string name;
  at::Tensor param;
  bool expert = false;        // held by this rank only; not replicated
  at::Tensor m1, m2;          // momentum / Adam moments (undefined until the first step)
  int block = -1;             // expert parameters: the MoE block
  std::vector<int> expert_ids;  // expert parameters: the original id of each row
};

// lr at `step` (0-based): linear warmup from 0 over warmup_steps, then cosine to end_lr at `steps`.
double learning_rate(const PhaseConfig& p, int64_t step);

// A checkpoint state owner (section "optimizer"): the moments as "optim.m1.<name>"
// and "optim.m2.<name>" tensors (experts' by block and id), kind and step count in
// the manifest.
class Optimizer final : public StateOwner {
 public:
  Optimizer(const PhaseConfig& cfg, std::vector<ParamSlot> params);
  // Sums dense gradients over all ranks (one flat all-reduce) and expert gradients
  // over the expert-data-parallel group (the ranks holding the same experts). Collective.
  // dense = false: the dense gradients were summed already (GradBuckets).
  void sync_gradients(const Comms& comms, bool dense = true);
  // Global gradient norm: replicated parameters counted once, expert parameters once
  // on the rank of `ep` (an expert-parallel group) holding them (all-reduce of their
  // squares). Collective over ep.
  double grad_norm(Communicator& ep);
  // Clips to cfg.clip_norm (when > 0) and applies one update with learning rate lr.
  // Returns the norm before clipping. Collective.
  double step(const Comms& comms, double lr);
  void zero_grad();
  std::vector<ParamSlot>& slots() { return slots_; }
  const std::vector<ParamSlot>& slots() const { return slots_; }
  int64_t steps_taken() const { return steps_; }
  OptimizerKind kind() const { return cfg_.optimizer; }

  std::string state_key() const override { return "optimizer"; }
  void save_state(StateWriter& out) const override;
  // UserError when the checkpoint's optimiser is of another kind.
  void load_state(const StateReader& in) override;

 private:
  PhaseConfig cfg_;
  std::vector<ParamSlot> slots_;
  int64_t steps_ = 0;
};

}  // namespace moeprune
