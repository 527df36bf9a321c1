// One MoE layer = Router(s) + TokenDispatcher + ExpertBank. For E3-MoE (M members)
// the layer has M routers; member m routes its copy of the tokens among experts
// [m*E/M, (m+1)*E/M) only. Routing groups are `group_size` whole images.
// forward() reads as route -> dispatch -> compute -> combine.
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "core/config.h"
#include "dist/communicator.h"
#include "model/dispatcher.h"
#include "model/expert_bank.h"
#include "model/layer_stats.h"
#include "model/placement.h"
#include "model/router.h"

namespace moeprune {

// Forward-pass wall time of the MoE parts, seconds (host clock).
struct MoeTimers {
  double router = 0, dispatch = 0, experts = 0, combine = 0;  // seconds; a pipelined call counts as experts
  int64_t pipelined = 0;  // calls that overlapped the exchange with the experts (runtime.dispatch_chunks)
};

// What one forward call of the model is given.
struct ForwardInputs {
  bool train = false;
  uint64_t noise_seed = 0;     // router noise seed for this step
  int64_t first_group = 0;     // global index of this rank's first routing group
  int64_t total_groups = 0;    // routing groups in the global batch (per E3 member)
  double entropy_weight = 0.0;  // adds weight * router entropy (per group) to the auxiliary loss
  int top_k = 0;                // > 0: route with this many experts per token instead of the config's
  // [B] bool, B = images of this rank (before E3 repetition); false for padding
  // images (the last evaluation batch). Their tokens come last in the priority
  // order (BPR included), are never dispatched and are left out of the statistics,
  // so real images route exactly as without padding. Undefined = all valid.
  at::Tensor image_valid;
};

// Observers of a forward call, each filled when non-null.
struct ForwardProbes {
  RoutingStats* stats = nullptr;                            // per MoE block, accumulated
  std::vector<std::vector<int64_t>>* expert_rows = nullptr;  // rows each local expert computed, one vector per layer call
  MoeTimers* timers = nullptr;
};

// One forward call: inputs, probes, and the auxiliary loss it produces.
struct ForwardContext {
  ForwardInputs in;
  ForwardProbes probes;
  at::Tensor aux_loss;  // out: weighted sum over groups of the auxiliary losses of every MoE layer
};

class MoeLayerImpl : public torch::nn::Module {
 public:
  MoeLayerImpl(const ModelConfig& cfg, int layer, Placement placement, Communicator& comm, uint64_t seed,
               MoeRuntime runtime = {});
  // x: [M*B, T, hidden], member-major for E3 (member m owns rows m*B..(m+1)*B);
  // returns [M*B, T, hidden].
  at::Tensor forward(const at::Tensor& x, ForwardContext& ctx);

  int layer() const { return layer_; }
  const Placement& placement() const { return placement_; }
  // Per row of this rank's expert bank: is it the expert's primary copy (the one
  // checkpoints write and the gradient norm counts)? All true without replicas.
  std::vector<bool> primary_copies() const;
  // Original ids of the layer's experts; slot s (placement index) is expert_ids()[s].
  const std::vector<int>& expert_ids() const { return ids_; }
  // Experts each router may send tokens to (top-k is taken among them).
  int routed_experts(int member) const;
  // Original expert id of each router column of member m (pruned ones included in zero routing).
  const std::vector<int>& router_column_ids(int member) const { return column_ids_.at(member); }
  const MoeRuntime& runtime() const { return runtime_; }
  // Another dispatcher backend or expert GEMM strategy; the maths stays the same.
  void set_runtime(const MoeRuntime& rt);
  // Evaluation as if only `kept_ids` (original ids, a subset of expert_ids()) were
  // left by pruning with `routing`, without rebuilding anything: zero routing drops
  // the other experts' choices, drop routing masks their router columns (softmax,
  // top-k and capacity over the kept). Equals the pruned layer up to float rounding.
  // nullptr: no mask.
  void set_expert_mask(const std::vector<int>* kept_ids, PrunedRouting routing);
  // The backend that routes and moves this layer's tokens on `device`.
  TokenDispatcher& dispatcher(c10::Device device);

  ExpertBank experts{nullptr};
  torch::nn::ModuleList routers{nullptr};  // M routers, each over E/M experts

 private:
  struct Shape;
  struct Routed;
  Routed route(const at::Tensor& x, const Shape& s, const SlotSelector& selector, ForwardContext& ctx);
  void record(const Routed& r, const DispatchPlan& plan, const Shape& s, ForwardContext& ctx) const;
  // The row count the batched expert product pads to (ExpertBankImpl::forward), 0
  // when the experts use another strategy (collective when batched).
  int64_t rows_bound(const DispatchPlan& plan, const at::Tensor& expert_in);
  // Whether this call can overlap the exchange with the experts (runtime.dispatch_chunks > 1);
  // warns once per process when it cannot, saying why.
  bool pipelined_here(const at::Tensor& flat, const TokenDispatcher& d, const DispatchPlan& plan) const;

  ModelConfig cfg_;
  int layer_;
  std::vector<int> ids_;
  std::vector<at::Tensor> column_slot_;  // per member: router column -> layer slot, -1 = pruned (buffers)
  std::vector<std::vector<int>> column_ids_;
  std::vector<at::Tensor> mask_keep_;  // per member: router column kept by the mask (empty: no mask)
  bool mask_columns_ = false;          // drop routing: mask the columns; zero: drop the choices
  Placement placement_;
  at::Tensor first_copy_, replicas_;  // with replicas: per layer slot, on the device of the last call
  Communicator* comm_;
  MoeRuntime runtime_;
  std::unique_ptr<TokenDispatcher> dispatcher_;  // made on first use for its device
  c10::Device dispatcher_device_{c10::kCPU};
};
TORCH_MODULE(MoeLayer);

}  // namespace moeprune
