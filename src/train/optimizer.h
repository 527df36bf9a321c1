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
  // Expert parameters with replicas in the layer (prune.replicate): which rows are
  // this rank's primary copies (checkpoints write and the gradient norm counts only
  // those; empty = all), their indices (undefined = all), and the ids of the
  // layer's experts that have replicas (ascending; the same on every rank).
  std::vector<bool> primary;
  at::Tensor primary_rows;
  std::vector<int> replicated_ids;
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
  // over every rank holding a copy of the expert: the other copies in its
  // expert-parallel group (replicas, when there are any) and the
  // expert-data-parallel group. Collective.
  // dense = false: the dense gradients were summed already (GradBuckets).
  void sync_gradients(const Comms& comms, bool dense = true);
  // Global gradient norm: replicated parameters counted once, expert parameters once
  // on the rank of `ep` (an expert-parallel group) holding their primary copy
  // (all-reduce of their squares). Collective over ep.
  double grad_norm(Communicator& ep);
  // Clips to cfg.clip_norm (when > 0) and applies one update with learning rate lr.
  // Returns the norm before clipping. Collective.
  double step(const Comms& comms, double lr);
  // Leaves every gradient undefined: the next backward stores them (see optimizer.cpp).
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
  // The update of one float32 CPU parameter in one pass (step() on CPUs).
  void update_fused(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& m1, const at::Tensor& m2,
                    double scale, double lr) const;

  PhaseConfig cfg_;
  std::vector<ParamSlot> slots_;
  int64_t steps_ = 0;
};

}  // namespace moeprune
