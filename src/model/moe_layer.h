// One MoE layer = Router(s) + Dispatcher + ExpertBank. For E3-MoE (M members) the
// layer has M routers; member m routes its copy of the tokens among experts
// [m*E/M, (m+1)*E/M) only. Routing groups are `group_size` whole images.
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>

#include <cstdint>
#include <map>
#include <vector>

#include "core/config.h"
#include "dist/communicator.h"
#include "model/dispatcher.h"
#include "model/expert_bank.h"
#include "model/placement.h"
#include "model/router.h"

namespace moeprune {

// Routing statistics of one MoE layer from this rank's tokens (per expert of the layer).
struct LayerStats {
  std::vector<int64_t> assigned;  // top-k choices, before capacity
  std::vector<int64_t> kept;      // choices that got a capacity slot
  std::vector<double> soft;       // sum of router probabilities
  int64_t tokens = 0;             // routed tokens (E3: per member copy)
  void add(const LayerStats& o);
};

// Forward-pass wall time of the MoE parts, seconds (host clock).
struct MoeTimers {
  double router = 0, dispatch = 0, experts = 0, combine = 0;
};

// Per-call state threaded through the model's forward pass.
struct ForwardContext {
  bool train = false;
  uint64_t noise_seed = 0;     // router noise seed for this step
  int64_t first_group = 0;     // global index of this rank's first routing group
  int64_t total_groups = 0;    // routing groups in the global batch (per E3 member)
  at::Tensor aux_loss;         // accumulated, weighted sum over groups of the auxiliary losses
  // Filled when non-null: routing statistics per MoE block index (accumulated),
  // rows each local expert computed (one vector per MoE layer call), MoE timers.
  std::map<int, LayerStats>* stats = nullptr;
  std::vector<std::vector<int64_t>>* expert_rows = nullptr;
  MoeTimers* timers = nullptr;
  double entropy_weight = 0.0;  // adds weight * router entropy (per group) to aux_loss
  int top_k = 0;                // > 0: route with this many experts per token instead of the config's
  // [B] bool, B = images of this rank (before E3 repetition); false for padding
  // images (the last evaluation batch). Their tokens come last in the priority
  // order (BPR included), are never dispatched and are left out of the statistics,
  // so real images route exactly as without padding. Undefined = all valid.
  at::Tensor image_valid;
};

class MoeLayerImpl : public torch::nn::Module {
 public:
  MoeLayerImpl(const ModelConfig& cfg, int layer, Placement placement, Communicator& comm, uint64_t seed);
  // x: [M*B, T, hidden], member-major for E3 (member m owns rows m*B..(m+1)*B);
  // returns [M*B, T, hidden].
  at::Tensor forward(const at::Tensor& x, ForwardContext& ctx);

  int layer() const { return layer_; }
  const Placement& placement() const { return placement_; }
  // Original ids of the layer's experts; slot s (placement index) is expert_ids()[s].
  const std::vector<int>& expert_ids() const { return ids_; }
  // Experts each router may send tokens to (top-k is taken among them).
  int routed_experts(int member) const;
  // Original expert id of each router column of member m (pruned ones included in "zero" routing).
  const std::vector<int>& router_column_ids(int member) const { return column_ids_.at(member); }
  ExpertBank experts{nullptr};
  torch::nn::ModuleList routers{nullptr};  // M routers, each over E/M experts

 private:
  ModelConfig cfg_;
  int layer_;
  std::vector<int> ids_;
  std::vector<at::Tensor> column_slot_;  // per member: router column -> layer slot, -1 = pruned (buffers)
  std::vector<std::vector<int>> column_ids_;
  Placement placement_;
  Dispatcher dispatcher_;
};
TORCH_MODULE(MoeLayer);

}  // namespace moeprune
