// Token dispatching for expert parallelism (the Megatron-Core MoETokenDispatcher
// role): the router's selection of top-k experts and capacity slots, then moving
// the kept choices to the ranks that hold their experts and bringing the expert
// outputs back. Knows the Placement, not the experts' internals.
//
// TokenDispatcher is the interface; two backends implement it:
//   TorchDispatcher   PyTorch ops (index_select, index_add, sort): the reference.
//   KernelDispatcher  the kernels of kernels/ (top-k, capacity, permute,
//                     unpermute + combine): CUDA grids on GPUs; on CPUs their host
//                     path for top-k and capacity, and the direct exchange
//                     (model/direct_exchange.h) for moving rows.
// Both share the plan (send order, count exchange, blocks) and the block
// all-to-all, so they differ only in the local steps. make_dispatcher() picks one
// from runtime.dispatcher (auto | torch | kernels) and the device.
//
// plan(): kept choices are sorted into send order (by the rank holding the expert,
// then expert, then group, then capacity slot), counts are exchanged, and
// dispatch() moves the payload with one block all-to-all (one block per (rank,
// expert)) that writes each local expert's rows contiguously on arrival: no
// regrouping pass. combine() sends the expert outputs back the same way and sums
// them weighted by their gates in the original token order.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <string_view>
#include <vector>

#include "core/choices.h"
#include "dist/communicator.h"
#include "model/placement.h"
#include "model/router.h"

namespace moeprune {

// The routing decisions of one MoE layer call, flattened over N tokens (all E3
// members' copies) with k choices each.
struct RoutedChoices {
  at::Tensor expert;    // [N, k] int64: layer slot (placement index) of each choice
  at::Tensor gate;      // [N, k] float: its combine weight (differentiable)
  at::Tensor keep;      // [N, k] bool: false where dropped (capacity, pruned expert, padding)
  at::Tensor group;     // [N, k] int64: routing group of the token, in dispatch order
  at::Tensor position;  // [N, k] int64: capacity slot of the choice in its (group, expert) buffer
  int64_t capacity = 0;    // > every kept choice's position (E3: the largest member's capacity); the sort key's radix
  int64_t num_groups = 0;
};

// What plan() computed for one call; backends may extend it.
struct DispatchPlan {
  virtual ~DispatchPlan() = default;
  // Send side (this rank's tokens), in send order.
  at::Tensor choice;       // [A] int64: flat index n*k + j of each kept choice
  at::Tensor token;        // [A] int64: its source token n
  at::Tensor gate;         // [A] float: its gate (differentiable)
  at::Tensor send_expert;  // [A] int64: its expert (layer slot)
  std::vector<int64_t> send_splits, recv_splits;  // rows per rank
  std::vector<int64_t> send_counts;   // kept choices per expert of the placement (all ranks' experts; copy slots)
  std::vector<RowBlock> send_blocks;  // one per (destination rank, its local expert), in send order
  // Receive side (rows for this rank's experts), expert-major: (local expert, source rank).
  std::vector<RowBlock> recv_blocks;  // one per (source rank, local expert), in each source's send order
  std::vector<int64_t> expert_counts;  // rows per local expert, local order
  int64_t recv_rows = 0;
  int64_t num_tokens = 0;
  int64_t top_k = 0;  // choices per token (choice = n * top_k + j)
};

class TokenDispatcher : public SlotSelector {
 public:
  TokenDispatcher(Communicator& comm, const Placement& placement) : comm_(&comm), placement_(&placement) {}
  virtual std::string_view name() const = 0;
  // Builds the plan and exchanges counts with the other ranks (collective).
  virtual std::unique_ptr<DispatchPlan> plan(const RoutedChoices& c) const = 0;
  // x: [N, H] -> [sum(expert_counts), H] rows grouped by local expert.
  virtual at::Tensor dispatch(const at::Tensor& x, const DispatchPlan& plan) const = 0;
  // y: [sum(expert_counts), H] expert outputs in dispatch() order -> [N, H].
  virtual at::Tensor combine(const at::Tensor& y, const DispatchPlan& plan) const = 0;
  // Where the experts should write their outputs for combine() (RowsAlloc of
  // model/expert_bank.h), given the dispatched rows; empty: anywhere. Called on every
  // rank at the same point, after dispatch().
  virtual std::function<at::Tensor(int64_t, int64_t, const at::TensorOptions&)> output_alloc(const at::Tensor&) const {
    return {};
  }

 protected:
  // The plan every backend shares: send order, count exchange, blocks.
  void fill_plan(const RoutedChoices& c, DispatchPlan& p) const;
  // The exchanges of dispatch() and combine(), differentiable.
  at::Tensor send(const at::Tensor& payload, const DispatchPlan& p) const;
  at::Tensor send_back(const at::Tensor& y, const DispatchPlan& p) const;

  Communicator* comm_;
  const Placement* placement_;

 private:
  // Send slot of each expert id, on the device of the last plan (made once: a
  // host-to-device copy per layer would stall a GPU's stream every step).
  mutable at::Tensor slot_of_;
};

class TorchDispatcher final : public TokenDispatcher {
 public:
  using TokenDispatcher::TokenDispatcher;
  std::string_view name() const override { return "torch"; }
  Selection select(const at::Tensor& probs, int k, int64_t capacity, bool bpr,
                   const at::Tensor& token_valid) const override;
  std::unique_ptr<DispatchPlan> plan(const RoutedChoices& c) const override;
  at::Tensor dispatch(const at::Tensor& x, const DispatchPlan& plan) const override;
  at::Tensor combine(const at::Tensor& y, const DispatchPlan& plan) const override;
};

class KernelDispatcher final : public TokenDispatcher {
 public:
  using TokenDispatcher::TokenDispatcher;
  std::string_view name() const override { return "kernels"; }
  Selection select(const at::Tensor& probs, int k, int64_t capacity, bool bpr,
                   const at::Tensor& token_valid) const override;
  std::unique_ptr<DispatchPlan> plan(const RoutedChoices& c) const override;
  at::Tensor dispatch(const at::Tensor& x, const DispatchPlan& plan) const override;
  at::Tensor combine(const at::Tensor& y, const DispatchPlan& plan) const override;
  // On CPUs: the node memory of the direct exchange, so that the combine reads the
  // outputs in place on the other ranks.
  std::function<at::Tensor(int64_t, int64_t, const at::TensorOptions&)> output_alloc(
      const at::Tensor& rows) const override;
};

// The backend for `kind` on `device`: auto = kernels on CPUs and on a CUDA device
// they were built for, torch ops on other GPUs; kernels = the kernels, or torch
// ops with one warning on a GPU they were not built for; torch = torch ops.
std::unique_ptr<TokenDispatcher> make_dispatcher(DispatcherKind kind, c10::Device device, Communicator& comm,
                                                 const Placement& placement);

namespace detail {
// The plan's host path (in the header for its test): the kept choices of [N, k]
// host tensors (any strides) in send-key order ((slot_of[expert], group), then
// position) by a counting pass, with their tokens and experts and the kept choices
// per expert. `order` is undefined where a (slot, group)'s positions are not
// 0 .. n-1 (plan() then sorts).
struct HostOrder {
  at::Tensor order, token, expert;  // [kept] int64 each
  std::vector<int64_t> counts;      // [E] kept choices per expert
};
HostOrder kept_in_key_order(const at::Tensor& slot_of, const at::Tensor& expert, const at::Tensor& group,
                            const at::Tensor& position, const at::Tensor& keep, int64_t groups, int64_t K, int E);
}  // namespace detail

}  // namespace moeprune
